"""The model store under ``$MOEINF_HOME`` (default ``~/.moeinf``): layout, manifests, pull.

Store format (``format_version`` 1)
===================================

```
models/<name>/manifest.json                 written last; its presence marks a complete model
models/<name>/config.json                   the source config.json; its dtype (and torch_dtype) key names
                                            the stored dtype, and quantization_config is removed when
                                            the pull dequantised the weights
models/<name>/generation_config.json        copied when the source has one
models/<name>/tokenizer.json, tokenizer_config.json, chat_template.jinja (when the source has
              it; older repos keep the template inside tokenizer_config.json), special_tokens_map.json,
              tokenizer.model (when present)
models/<name>/dense/part-<k>.safetensors    every tensor that is not a routed expert
models/<name>/experts/L<layer>/E<expert>.safetensors   one routed expert, all its matrices
models/.partial-<name>/                     a pull in progress (never listed; resumed by the next pull)
```

Dense tensors (``dense/``) keep the names transformers 5 gives them in memory, e.g.
``model.embed_tokens.weight``, ``model.layers.3.self_attn.q_proj.weight``, ``model.layers.3.mlp.gate.weight``
(a family's MoE block module, e.g. Mixtral's ``block_sparse_moe.``, becomes ``mlp.``; nothing else is renamed),
``lm_head.weight``. Shared experts, routers, DeepSeek-V3's ``e_score_correction_bias`` and the dense
MLPs of non-MoE layers are dense tensors. DeepSeek-V3's multi-token-prediction layers (decoder layer
index >= num_hidden_layers) are not used for decoding and are dropped. ``dense/part-<k>`` holds the
dense tensors that came from the k-th source shard; which part holds what is in the safetensors headers
(use ``safe_open`` on each part). Dense parts are 4 KiB-aligned too.

An expert shard holds, in nn.Linear layout (see ``engine/model/experts.py``):
``gate_proj.weight`` [I, H], ``up_proj.weight`` [I, H], ``down_proj.weight`` [H, I], and for gpt-oss
also ``gate_proj.bias`` [I], ``up_proj.bias`` [I], ``down_proj.bias`` [H] (its interleaved, transposed
``gate_up_proj`` [E, H, 2I] is untangled: gate = columns 0::2, up = columns 1::2). Its safetensors header
is padded with spaces so the tensor data starts at byte 4096·n of the file; the tensors follow each
other in the order gate, up, down (then the biases), so one read of ``[data_start, file_end)`` is the
whole expert. ``engine.store.header.read_header(path).data_start`` gives the data start.

Weights keep the source dtype unless ``moeinf pull --dtype`` asks otherwise (DeepSeek-V3's
``e_score_correction_bias`` is always kept in float32, as transformers keeps it). Quantised sources are
dequantised at pull: gpt-oss MXFP4 experts (``*_blocks`` + ``*_scales``) and DeepSeek-V3 FP8 weights
with 128x128 ``weight_scale_inv`` blocks (``quantization_config.weight_block_size``) are dequantised in
float32 and stored, like every other float tensor of a quantised source, in the config's compute dtype
(bf16 unless ``--dtype``); the manifest's ``dequantized`` field says which.

manifest.json
-------------
``format_version`` (1), ``name``, ``created`` (ISO 8601 UTC), ``moeinf_version``,
``source``: ``{"kind": "hub", "repo", "revision", "commit"}``, ``{"kind": "local", "path"}`` or
``{"kind": "gguf", "path"}``; plus ``"upcycled": {"from", "num_experts", "top_k"}`` when the model
was made by ``--upcycle`` (random-free copies of a dense FFN: "upcycled, not trained"),
``family`` (config ``model_type``), ``num_layers``, ``num_experts`` (per MoE layer), ``top_k``,
``moe_layers`` (decoder-layer indices with routed experts), ``hidden_size``, ``expert_intermediate_size``,
``dtype`` (torch dtype name of the stored weights, e.g. "bfloat16"), ``source_dtype``,
``dequantized`` (null, "mxfp4" or "fp8"), ``expert_tensors`` (names in every expert shard),
``dense_bytes`` (sum of dense/ file sizes), ``expert_bytes`` (size of one expert shard file),
``total_bytes`` (all files), ``files``: ``{relative path: {"size": int, "sha256": hex}}`` for every
file of the model except manifest.json itself.

Modules: ``paths`` (where things live), ``families`` (the family descriptors and their registry, ``moe_layout``), ``manifest``
(``read_manifest``, ``resolve_model``, ``list_models``), ``opened`` (``open_model``: the ``StoreModel``
a run is given: manifest, config, layout, every tensor's file, dtype/format, shape and byte range),
``config`` (the one config.json reader), ``dtypes`` (the one dtype table), ``header`` (the one
safetensors header reader), ``shards`` (aligned streaming safetensors writer), ``convert`` (checkpoint dir or shard source -> store model), ``hub`` (aliases, downloads),
``pull`` (the whole pull), ``verify`` (re-hash a model), ``export`` (a store model back to a Hugging Face
checkpoint directory).
"""
