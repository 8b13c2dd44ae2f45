"""``samplerkit serve``: an OpenAI-compatible HTTP server where every request may bring its own
sampling pipeline (``pip install 'samplerkit[serve]'``).

Layers inside the package: :mod:`~samplerkit.serve.protocol` (OpenAI's request bodies, error
bodies, limits), :mod:`~samplerkit.serve.translate` (a request to a job: prompts, a resolved
pipeline, loop options), :mod:`~samplerkit.serve.runner` (the one seam to the decode loop),
:mod:`~samplerkit.serve.app` (FastAPI routes, SSE) and :mod:`~samplerkit.serve.command` (the CLI
verb). See docs/serve.md.
"""

from __future__ import annotations

from samplerkit.serve.protocol import ApiError, Limits

__all__ = ["ApiError", "Limits"]
