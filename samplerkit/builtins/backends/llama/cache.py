"""The load cache: a GGUF model's prepared weights, config and tokenizer in one safetensors file.

A cold start parses the GGUF metadata (tens of thousands of vocabulary strings through gguf's
reader), then dequantizes or packs, fuses and transposes every matrix. All of that depends only
on the file's bytes and on how the model is prepared, so the result is saved once under
``<cache dir>/models/`` (``$SAMPLERKIT_CACHE``, else ``~/.cache/samplerkit``) and memory-mapped
on later starts.

The entry's name is a hash of: the source file's sha256 (computed once per path, size and
mtime, then remembered), the compute dtype, whether matrices are packed, this cache format,
and — because the packed layout is the int4 kernel's own — the torch version and the CPU's
vector ISA. A stale, partial or unreadable entry is ignored and rebuilt, never trusted: the
file is written to a temporary name and renamed into place, and its metadata carries the sha256
of its payload (every tensor's bytes, in name order), checked on every load, so flipped weight
bytes are caught as the cache's damage (and rebuilt), never run as the model. An entry that
cannot be removed (a read-only cache directory) is bypassed: the model loads from its file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from samplerkit.builtins.backends.llama.config import LlamaConfig
from samplerkit.builtins.backends.llama.default_model import cache_dir, file_digest
from samplerkit.builtins.backends.llama.default_model import write_atomic as _write_atomic
from samplerkit.builtins.backends.llama.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

#: Bump when what is stored, or how it is laid out, changes.
FORMAT = 2


def entry_path(source: Path, *, dtype: torch.dtype, packed: bool, fp16: bool = False,
               fp16_head: bool = False, blocks: bool = False) -> Path:
    """Where the prepared form of ``source`` for these options lives (see the module docstring)."""
    key = {"format": FORMAT, "sha256": file_digest(source), "dtype": str(dtype), "packed": packed}
    if fp16:                                  # absent otherwise: earlier entries keep their names
        key["fp16"] = True
    if fp16_head:
        key["fp16_head"] = True
    if blocks:
        key["blocks"] = True
    if packed:
        key |= {"torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "models" / f"{source.stem}-{name}.safetensors"


def save(path: Path, config: LlamaConfig, tokenizer: Tokenizer, model) -> None:
    """Write ``model``'s prepared weights, ``config`` and ``tokenizer`` to ``path``; failures
    (read-only or full disk) warn and leave the next start to load from the source again."""
    from safetensors.torch import save_file

    tensors, layout = model.export_state()
    kind, blob, kwargs = _tokenizer_state(tokenizer)
    tensors["tokenizer"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    meta = {"format": str(FORMAT), "config": json.dumps(config.__dict__), "layout": json.dumps(layout),
            "tokenizer_kind": kind, "tokenizer_kwargs": json.dumps(kwargs), "payload_sha256": payload_digest(tensors)}
    try:
        _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except Exception as e:  # noqa: BLE001 - OSError or safetensors' own error (disk full...): never fatal
        warnings.warn(f"could not write the model cache {path}: {e}; the next start loads the model file again",
                      stacklevel=2)


def load(path: Path) -> tuple[LlamaConfig, Tokenizer, dict[str, torch.Tensor], dict] | None:
    """``(config, tokenizer, tensors, layout)`` from a cache entry, or None when there is none
    or it cannot be read (then it is removed so that it is rebuilt)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("format") != str(FORMAT):
                raise ValueError(f"cache format {meta.get('format')}, expected {FORMAT}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        digest = payload_digest(tensors)
        if digest != meta.get("payload_sha256"):
            raise ValueError(f"its weights are damaged (payload sha256 {digest[:16]}..., recorded "
                             f"{str(meta.get('payload_sha256'))[:16]}...); the model file itself is not affected")
        config = LlamaConfig(**json.loads(meta["config"]))
        tokenizer = _tokenizer_from_state(meta["tokenizer_kind"], tensors.pop("tokenizer").numpy().tobytes(),
                                          json.loads(meta["tokenizer_kwargs"]))
        return config, tokenizer, tensors, json.loads(meta["layout"])
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild from the source file
        try:
            path.unlink(missing_ok=True)
            then = "rebuilding it"
        except OSError as gone:                # a read-only cache directory: leave it, load the model file
            then = f"it cannot be removed ({gone.strerror}), so the model loads from its file"
        warnings.warn(f"ignoring unreadable model cache {path} ({type(e).__name__}: {e}); {then}", stacklevel=2)
        return None


def payload_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: what an entry's
    ``payload_sha256`` records, so that any changed byte of the stored weights is detected."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _tokenizer_state(tok: Tokenizer) -> tuple[str, bytes, dict[str, Any]]:
    common = {"bos_id": tok.bos_id, "eos_ids": sorted(tok.eos_ids), "add_bos": tok.add_bos,
              "chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    if isinstance(tok, HFTokenizer):
        return "tokenizers", tok.tok.to_str().encode(), {**common, "uses_post_processor": tok.uses_post_processor}
    if isinstance(tok, SentencePieceTokenizer):
        return "sentencepiece", tok.sp.serialized_model_proto(), common
    raise TypeError(f"cannot cache a {type(tok).__name__}")


def _tokenizer_from_state(kind: str, blob: bytes, kwargs: dict[str, Any]) -> Tokenizer:
    if kind == "tokenizers":
        from tokenizers import Tokenizer as HFTok

        return HFTokenizer(HFTok.from_str(blob.decode()), **kwargs)
    if kind == "sentencepiece":
        import sentencepiece

        return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_proto=blob), **kwargs)
    raise ValueError(f"unknown tokenizer kind {kind!r}")


__all__ = ["FORMAT", "entry_path", "load", "save"]
