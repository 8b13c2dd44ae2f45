"""Hyper-parameters of a Llama-family decoder, independent of the file format they came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaConfig:
    """The numbers that fix a Llama decoder's shapes and math.

    ``head_dim`` defaults to ``hidden_size // num_heads``; ``max_position`` is the context the
    model was trained for (GGUF ``llama.context_length``, HF ``max_position_embeddings``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")


def permute_for_interleaved_rope(w, n_heads: int):
    """Reorder the output rows of a Q or K projection from HF's half-split rotary layout to the
    interleaved layout (llama.cpp's ``convert_hf_to_gguf.py`` ``permute``; GGUF stores this one).

    HF rotates pairs ``(x[i], x[i + D/2])``; the interleaved layout rotates ``(x[2i], x[2i + 1])``.
    Row ``h*D + 2i + j`` of the result is row ``h*D + j*D/2 + i`` of ``w``. Works on torch tensors
    and numpy arrays (2-D weights or 1-D biases).
    """
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_interleaved_rope(w, n_heads: int):
    """Inverse of :func:`permute_for_interleaved_rope` (GGUF layout back to HF's)."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
