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
``e_score_correction_bias`` is always kept in float32, as transformers keeps it). Quantised sources stay
quantised (``engine.formats``): a GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/MXFP4 tensors are copied block for
block (other GGUF types go to the nearest supported format, with a notice), gpt-oss's MXFP4 experts are
stored as ``mxfp4`` (the same values regrouped) and DeepSeek-V3's FP8 weights as ``q8_0``; with
``--dtype`` they are dequantised instead (the manifest's ``dequantized`` field says which).
``--quantize FORMAT`` / ``--quantize-dense FORMAT`` quantise a float source's experts / dense matrices.
A quantised tensor is stored as a ``U8`` tensor of its raw blocks under its own name, the file's
``__metadata__`` key ``moeinf.formats`` naming its format and logical shape
(``engine/formats/storage.py``).

manifest.json
-------------
``format_version`` (1), ``name``, ``created`` (ISO 8601 UTC), ``moeinf_version``,
``source``: ``{"kind": "hub", "repo", "revision", "commit"}``, ``{"kind": "local", "path"}`` or
``{"kind": "gguf", "path"}``; plus ``"upcycled": {"from", "num_experts", "top_k"}`` when the model
was made by ``--upcycle`` (random-free copies of a dense FFN: "upcycled, not trained"),
``family`` (config ``model_type``), ``num_layers``, ``num_experts`` (per MoE layer), ``top_k``,
``moe_layers`` (decoder-layer indices with routed experts), ``hidden_size``, ``expert_intermediate_size``,
``dtype`` (torch dtype name of the stored weights, e.g. "bfloat16"), ``source_dtype``,
``dequantized`` (null, "mxfp4", "fp8" or "fp8->q8_0"), ``formats``: ``{"experts": {tensor: format},
"dense": {tensor: format}}`` (every tensor's format: f32/bf16/f16 or a block format), ``expert_tensors`` (names in every expert shard),
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
