"""The ``samplerkit serve`` verb: load the model once, then serve it over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from samplerkit.errors import SamplerkitError
from samplerkit.serve.protocol import Limits

# The config, the decode loop and torch are imported when the verb runs, not when the CLI
# builds its parser (every `samplerkit ...` invocation does that).

#: Environment variable read when --api-key is not given (keeps the key out of `ps` listings).
API_KEY_ENV = "SAMPLERKIT_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML run config: backend, default pipeline, generation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value (repeatable), as for generate")
    parser.add_argument("--preset", metavar="NAME", help="start from a shipped preset (the default pipeline)")
    parser.add_argument("--model", help="path to a GGUF file or Hugging Face model directory (sets backend.model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", metavar="KEY", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} "
                                                         "if set, else no key)")
    parser.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: the model "
                                                                     "file's name, else the backend's name)")
    parser.add_argument("--max-rows", type=int, default=Limits.max_rows, metavar="N",
                        help=f"rows (prompts x n) in flight at once over all requests; more get 429 (default {Limits.max_rows})")
    parser.add_argument("--max-waiting-rows", type=int, default=Limits.max_waiting_rows, metavar="N",
                        help="rows that may wait for a place in the running batch; a request beyond running + "
                             f"waiting gets 429 (default {Limits.max_waiting_rows})")
    parser.add_argument("--max-tokens", type=int, default=Limits.max_tokens, metavar="N",
                        help=f"largest max_tokens a request may ask for (default {Limits.max_tokens})")
    parser.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, metavar="N",
                        help=f"largest request body; larger ones get 413 (default {Limits.max_body_bytes})")
    parser.add_argument("--timeout", type=float, default=Limits.request_timeout_s, metavar="SECONDS",
                        help=f"longest a request may take, queueing included; then 504 (default {Limits.request_timeout_s:g})")


def server_config(config_file: str | None, overrides: Sequence[str], preset: str | None = None,
                  model: str | None = None) -> tuple[Any, Any]:
    """The server's resolved config and registry, built like ``samplerkit generate``'s."""
    from samplerkit.config import apply_override, read_yaml, resolve
    from samplerkit.presets import PRESET_KEY, apply_preset, list_presets
    from samplerkit.registry import default_registry

    data: dict[str, Any] = read_yaml(config_file) if config_file else {}
    if preset is not None:
        data = {**data, PRESET_KEY: preset}
    if data.get(PRESET_KEY) in list_presets():
        data = apply_preset(data)
    overrides = list(overrides)
    if model:
        overrides.append(f"backend.model={json.dumps(model)}")
    for assignment in overrides:
        data = apply_override(data, assignment)
    plugins = data.get("plugins") if isinstance(data.get("plugins"), dict) else {}
    block = plugins.get("block", []) if isinstance(plugins.get("block", []), list) else []
    registry = default_registry(block)
    return resolve(data, registry, config_file), registry


def model_name(config: Any, backend: Any = None) -> str:
    """The id clients send as ``model``: the loaded model file's name without ``.gguf``
    (``SmolLM2-135M-Instruct.Q4_1``), else the configured ``backend.model``, else the backend's name."""
    model = getattr(backend, "model_path", None) or getattr(config.backend.params, "model", None)
    if not model:
        return config.backend.name
    path = Path(str(model))
    return path.stem if path.suffix == ".gguf" else path.name


def build(config: Any, registry: Any, limits: Limits, *, api_key: str | None = None,
          served_model_name: str | None = None, backend: Any = None):
    """The ASGI app for ``config`` (loads the model unless ``backend`` is given). Its engine
    runs until the app shuts down (uvicorn's lifespan)."""
    from samplerkit.engine import Engine
    from samplerkit.generate import Generator, load_backend
    from samplerkit.serve.app import create_app, require_fastapi
    from samplerkit.serve.runner import EngineRunner
    from samplerkit.serve.translate import ServerSide

    require_fastapi()
    raw = backend if backend is not None else load_backend(config)
    runner = EngineRunner(Engine(Generator(config, backend=raw, registry=registry), max_rows=limits.max_rows))
    server = ServerSide(config, registry, int(raw.vocab_size), limits)
    return create_app(runner, server, model_name=served_model_name or model_name(config, raw), api_key=api_key)


def _limits(args: argparse.Namespace) -> Limits:
    for name in ("max_rows", "max_tokens", "max_body_bytes", "max_waiting_rows"):
        least = 0 if name == "max_waiting_rows" else 1
        if getattr(args, name) < least:
            raise SamplerkitError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if not args.timeout > 0:
        raise SamplerkitError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not 0 <= args.port <= 65535:
        raise SamplerkitError(f"--port must be in [0, 65535], got {args.port}")
    return Limits(max_rows=args.max_rows, max_waiting_rows=args.max_waiting_rows, max_tokens=args.max_tokens,
                  max_body_bytes=args.max_body_bytes, request_timeout_s=args.timeout)


def run(args: argparse.Namespace) -> int:
    from samplerkit.serve.app import require_fastapi

    require_fastapi()
    import uvicorn

    limits = _limits(args)
    config, registry = server_config(args.config, args.overrides, args.preset, args.model)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise SamplerkitError("--api-key is empty; give a non-empty key or leave it out")
    app = build(config, registry, limits, api_key=api_key, served_model_name=args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread for the duration of the ``with`` block;
    yields the base URL (``http://127.0.0.1:PORT``; port 0 picks a free one). For tests,
    notebooks and benchmarks: the server is always shut down on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="samplerkit-serve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise SamplerkitError(f"the server did not start on {host}:{port} (port in use?)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
