"""Model code: shared layers and one small file per family.

Contract with the runtime (``engine/runtime``):

``engine.model.loader.load_model(model_root, dtype=torch.float32, device="cpu", experts=None,
max_seq_len=4096) -> CausalLM`` builds the model of a store directory (``$MOEINF_HOME/models/<name>``):
dense weights from ``dense/*.safetensors``, routed experts reached only through an
``engine.model.experts.ExpertSource`` (``MappedExperts`` when ``experts`` is None).

A ``CausalLM`` (batch size one) has ``vocab_size``, ``max_seq_len`` and
``forward(tokens: LongTensor[T], start_pos: int) -> FloatTensor[T, vocab]``: it runs tokens at
positions ``start_pos .. start_pos+T-1`` against its static KV cache (positions below ``start_pos``
must have been run before; running from an earlier ``start_pos`` overwrites, which is how a
conversation is rewound). Logits are float32. ``forward(tokens, start_pos, last_only=True)`` returns
only the last position's row ([1, vocab]), which spares the LM head on long prompts.

Layout: ``args.py`` (ModelArgs from config.json), ``layers/`` (the layers families share: rope, norm,
attention + kv_cache + context (GQA over the static cache), mlp, activations, router, moe (the MoE
block over an ExpertSource; one token's products go through ``cuda_ext.cpu``)), ``transformer.py``
(decoder layer, CausalLM), ``loader.py``, and ``families/``: one module per family
named after its ``model_type`` (mixtral, qwen2_moe, qwen3_moe, olmoe, llama), a folder for the big
ones (``deepseek/`` for deepseek_v2 and deepseek_v3, ``gpt_oss/``).
"""
