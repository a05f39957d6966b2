"""`moeinf serve MODEL`: an OpenAI- and Ollama-compatible HTTP server over one loaded model (``engine.serve``)."""

from __future__ import annotations

import socket

import typer

from moeinf_cli.options import LOAD, Model, with_options

HELP = """Serve a model over HTTP with the OpenAI and Ollama APIs.

Listens on localhost unless --host says otherwise. The model loads in the background (GET /health answers 503 until it is ready). Up to --batch-size requests are decoded together (continuous batching: a request joins the running batch at the next step and leaves it when it ends; --batch-size 1 runs them one after another and reuses the KV cache of a resent conversation); the clients take turns for a place, and at most --max-queue wait (more get 503 with Retry-After). With --api-key (or MOEINF_API_KEY) every route but /health needs `Authorization: Bearer KEY`. Ctrl+C or SIGTERM finishes the requests in flight, then exits.

\b
Routes:
  POST /v1/chat/completions  POST /v1/completions  GET /v1/models        (OpenAI)
  POST /api/chat  POST /api/generate  GET /api/tags  POST /api/show  GET /api/ps  GET /api/version  (Ollama)
  GET /health  GET /metrics (Prometheus)

\b
Examples:
  moeinf serve mixtral
  moeinf serve mixtral --port 8000 --expert-budget 25% --api-key secret
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "mixtral", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def _check_bindable(host: str, port: int) -> None:
    """Fail with one line, before loading anything, when ``host:port`` cannot be listened on."""
    from engine.errors import MoeinfError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise MoeinfError(
            f"cannot resolve --host {host} ({err}); give an address such as 127.0.0.1"
        ) from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as err:
            raise MoeinfError(
                f"cannot listen on {host}:{port} ({err.strerror}); choose another --port"
            ) from None


def _check_load_options(load: dict) -> None:
    """The loading options that can be checked without loading: one error line before the server starts
    (the model itself loads in the background, where a failure stops the server with exit status 1)."""
    from engine.errors import MoeinfError
    from engine.memory.budget import parse_budget
    from engine.policy.registry import policy_class
    from engine.runtime.devices import resolve_device
    from engine.store.dtypes import canonical_dtype

    if int(load.get("ctx", 2)) < 2:
        raise MoeinfError(f"--ctx must be at least 2 tokens, got {load['ctx']}")
    parse_budget(load.get("expert_budget"))
    if load.get("policy") is not None:
        policy_class(load["policy"])
    canonical_dtype(load.get("dtype"))
    if load.get("activations") is not None:
        from engine.formats.linear import check_activations

        try:
            check_activations(load["activations"])
        except ValueError as e:
            raise MoeinfError(str(e)) from None
    resolve_device(load.get("device", "auto"))


def serve(
    model: Model,
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        metavar="ADDRESS",
        help="Address to listen on; 0.0.0.0 = every interface. (default 127.0.0.1)",
        show_default=False,
    ),
    port: int = typer.Option(
        8080,
        "--port",
        "-p",
        metavar="N",
        help="Port to listen on; 0 = any free port. (default 8080)",
        show_default=False,
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        metavar="KEY",
        envvar="MOEINF_API_KEY",
        show_envvar=True,
        help="Require `Authorization: Bearer KEY` on every route but /health.",
    ),
    max_queue: int = typer.Option(
        64,
        "--max-queue",
        metavar="N",
        help="Requests that may wait for the model; more get 503. (default 64)",
        show_default=False,
    ),
    batch_size: int = typer.Option(
        4,
        "--batch-size",
        "-b",
        metavar="N",
        help="Requests decoded together; 1 = one at a time, reusing the KV prefix. (default 4)",
        show_default=False,
    ),
    log_level: str = typer.Option(
        "info",
        "--log-level",
        metavar="LEVEL",
        help="debug, info, warning or error. (default info)",
        show_default=False,
    ),
    *,
    load: dict,
) -> None:
    from engine.errors import MoeinfError
    from engine.store.manifest import read_manifest, resolve_model

    if not 0 <= port <= 65535:
        raise MoeinfError(f"--port must be between 0 and 65535, got {port}")
    if max_queue < 0:
        raise MoeinfError(f"--max-queue must be 0 or more, got {max_queue}")
    if batch_size < 1:
        raise MoeinfError(f"--batch-size must be at least 1, got {batch_size}")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise MoeinfError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
    if api_key is not None and not api_key.strip():
        raise MoeinfError("--api-key (or MOEINF_API_KEY) is empty; give a key or leave it unset")
    root = resolve_model(model)  # an unknown model fails here, before binding or importing torch
    name = str(read_manifest(root).get("name") or root.name)
    _check_load_options(load)
    _check_bindable(host, port)

    from engine.serve.server import serve as run_server
    from engine.serve.state import ServeSettings

    def load_model():
        import engine

        return engine.load(root, **load)

    settings = ServeSettings(
        model=name,
        api_key=api_key.strip() if api_key else None,
        max_queue=max_queue,
        batch_size=batch_size,
    )
    code = run_server(settings, load_model, host=host, port=port, log_level=log_level.lower())
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("serve", help=HELP, no_args_is_help=True)(with_options(load=LOAD)(serve))
