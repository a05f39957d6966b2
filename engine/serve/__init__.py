"""``moeinf serve``: the OpenAI- and Ollama-compatible HTTP API over one loaded model.

Modules: ``server`` (uvicorn, signals, drain), ``app`` (the FastAPI app and its lifespan), ``state``
(settings, the model loading in the background, the 503s), ``scheduler`` (the bounded queue and the
worker thread that owns the session), ``generation`` (prompt ids, queueing, the piece stream,
disconnects, counts: shared by both APIs), ``openai_api`` and ``ollama_api`` (each API's fields in and
out), ``tools`` (tool calls in the model's output), ``errors`` (each API's error shape),
``middleware`` (API key, body limit, access log), ``metrics`` (Prometheus).
The server sits above the runtime: nothing below imports it.
"""
