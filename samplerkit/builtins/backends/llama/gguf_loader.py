"""Load a Llama-architecture GGUF file: hyper-parameters, dequantized weights, tokenizer.

Quantized tensors are dequantized once at load, vectorized (``gguf.quants.dequantize``, numpy),
to the compute dtype. GGUF keeps Q/K rows in the interleaved rotary layout, which is the layout
:mod:`.model` computes in, so they are used as stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from samplerkit.builtins.backends.llama.config import LlamaConfig
from samplerkit.builtins.backends.llama.quant import PACKABLE_TYPES, QuantizedTensor
from samplerkit.builtins.backends.llama.tokenizer import (
    HFTokenizer,
    Tokenizer,
    byte_level_bpe,
    sentencepiece_from_vocab,
)
from samplerkit.errors import ModelNotFoundError, SamplerkitError

#: Tensor types we dequantize (all vectorized in gguf-py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
    "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down",
}
_GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head", "rope_freqs": "rope_freqs"}

Progress = Callable[[int, int], None]


def _canonical_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``layers.3.wq``; None for tensors we do not use."""
    parts = gguf_name.split(".")
    if parts[-1] != "weight":
        return None
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    if len(parts) == 2:
        return _GLOBAL_NAMES.get(parts[0])
    return None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def open_reader(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for ``path``; missing or unreadable files are samplerkit errors."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF model file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on bad magic or truncation
        raise SamplerkitError(f"cannot read {path} as GGUF: {e}") from e


def read_config(reader, path: str | os.PathLike) -> LlamaConfig:
    """Hyper-parameters from the ``llama.*`` metadata keys."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise SamplerkitError(f"{path}: architecture {arch!r} is not supported by the llama backend "
                              "(only 'llama')")

    def need(key: str):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise SamplerkitError(f"{path}: missing metadata key llama.{key}")
        return v

    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none", ""):
        raise SamplerkitError(f"{path}: rope scaling {scaling!r} is not supported by the llama backend")
    return LlamaConfig(
        vocab_size=int(embd.shape[1]),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // n_heads)),
    )


def read_weights(reader, path: str | os.PathLike, dtype: torch.dtype,
                 progress: Progress | None = None, *, keep_packed: bool = False
                 ) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Every tensor the model uses, dequantized to ``dtype``, under canonical names.

    With ``keep_packed``, matrices in a format :mod:`.quant` can multiply packed (Q4_0, Q4_1,
    Q4_K, Q8_0) are returned as :class:`~.quant.QuantizedTensor` views of the file instead; the
    model packs or dequantizes them (a fused matrix packs only if all its parts can).
    """
    import gguf
    import numpy as np

    wanted = [(t, _canonical_name(t.name)) for t in reader.tensors]
    wanted = [(t, n) for t, n in wanted if n is not None]
    for t, _ in wanted:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise SamplerkitError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the llama backend does not "
                f"support (supported: {', '.join(SUPPORTED_TYPES)})")
    out: dict[str, torch.Tensor] = {}
    for i, (t, name) in enumerate(wanted):
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))   # GGUF lists dims fastest-first
        if keep_packed and len(shape) == 2 and t.tensor_type.name in PACKABLE_TYPES:
            out[name] = QuantizedTensor(t.data, t.tensor_type.name, shape)
            if progress is not None:
                progress(i + 1, len(wanted))
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
        if not arr.flags.writeable:  # F32 tensors come back as views of the read-only memmap
            arr = arr.copy()
        out[name] = torch.from_numpy(arr).to(dtype)
        if progress is not None:
            progress(i + 1, len(wanted))
    return out


def read_tokenizer(reader, path: str | os.PathLike) -> Tokenizer:
    """The tokenizer embedded in the ``tokenizer.ggml.*`` keys (``gpt2`` BPE or ``llama`` SPM)."""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise SamplerkitError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.*)")
    types = _field(reader, "tokenizer.ggml.token_type")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [int(i) for i in (eos, eot) if i is not None]
    template = _field(reader, "tokenizer.chat_template")
    common = dict(
        bos_id=None if bos is None else int(bos), eos_ids=eos_ids, chat_template=template,
        bos_token=tokens[bos] if bos is not None else "", eos_token=tokens[eos] if eos is not None else "")
    if kind == "gpt2":
        merges = _field(reader, "tokenizer.ggml.merges") or []
        tok = byte_level_bpe(tokens, merges, types, pre=_field(reader, "tokenizer.ggml.pre", "gpt2"))
        return HFTokenizer(tok, add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)), **common)
    if kind == "llama":
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = types or [1] * len(tokens)
        unk = _field(reader, "tokenizer.ggml.unknown_token_id", 0)
        return sentencepiece_from_vocab(
            tokens, scores, types, unk_id=int(unk), bos_id=common["bos_id"], eos_ids=eos_ids,
            add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
            add_dummy_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
            chat_template=template)
    raise SamplerkitError(f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: Progress | None = None,
              *, keep_packed: bool = False) -> tuple[LlamaConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, canonical weights (Q/K in interleaved rotary layout) and tokenizer of a GGUF file
    (``keep_packed``: see :func:`read_weights`)."""
    reader = open_reader(path)
    config = read_config(reader, path)
    tokenizer = read_tokenizer(reader, path)
    weights = read_weights(reader, path, dtype, progress, keep_packed=keep_packed)
    return config, weights, tokenizer


__all__ = ["SUPPORTED_TYPES", "load_gguf", "open_reader", "read_config", "read_tokenizer",
           "read_weights"]
