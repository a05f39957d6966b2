"""Tokenizer and chat template, sampling, generate loop, session.

Modules: ``tokenizer`` (tokenizer.json + special tokens + chat template), ``chat_template``
(transformers-identical rendering in a jinja2 sandbox), ``detokenize`` (streaming, never splits a
UTF-8 character), ``stops`` (stop strings across pieces), ``sampling`` (Ollama's options and
defaults), ``stats`` (GenerationStats, Ollama's --verbose lines), ``devices`` (device/dtype
resolution), ``session`` (``load`` and ``Session``: prefill, decode, KV prefix reuse).
The public entry point is ``engine.load`` (re-exported lazily by ``engine``).
"""

MIN_CTX = 8  # the smallest context a session takes (``--ctx``, ``/set parameter num_ctx``)
