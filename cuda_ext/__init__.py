"""moeinf's native code: the CPU kernels (``csrc/cpu``), the CUDA kernels (``csrc/cuda``), the one
loader that builds and caches them (``loader``), and the PyTorch-facing calls with their fallbacks
(``cpu``: bf16 decode products; ``cuda``: dequantisers of the block formats on a GPU).

A low layer: it imports only torch, and ``engine.model`` / ``engine.memory`` / ``engine.formats``
call it. Every call here has a pure-PyTorch fallback, taken where no compiler exists or
``MOEINF_NATIVE_KERNELS=0``. ``python -m cuda_ext`` builds the kernels ahead of first use (``make
setup`` runs it) and prints which are in use.
"""
