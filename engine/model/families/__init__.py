"""One module per model family (``config.json``'s ``model_type``); a folder for the big ones
(``deepseek``: MLA and its routers; ``gpt_oss``: sink attention and clamped experts)."""
