"""Layers every family shares: RMSNorm (``norm``), rotary embeddings (``rope``), grouped-query
attention over the static KV cache (``attention``, ``kv_cache``, ``context``), the dense MLP
(``mlp``), activations, the softmax top-k router (``router``) and the MoE block over an
``ExpertSource`` (``moe``)."""
