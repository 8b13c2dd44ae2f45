"""GGUF block-quantized matrices multiplied by samplerkit's compiled kernels (``weights: blocks``).

A :class:`BlockLinear` holds a matrix ``W [N, K]`` as the file's codes and per-block scales,
regrouped into tiles of 4 output rows x 32 inputs (the layout is documented in
``kernels/blockmm.c``), and computes ``x @ W.T`` with float32 activations:

    w[n, k] = scale[n, k // 32] * c[n, k] + zero[n, k // 32]       (Q4_0, Q4_1, Q4_K; c in 0..15)
    w[n, k] = scale[n, k // 32] * c[n, k]                          (Q8_0; c in -128..127)

The codes are converted to float32 inside the kernel and no activation is rounded: the product
is the exact model's up to float32 rounding of the sums (torch's int4 kernel, ``weights:
packed``, rounds activations and scales to bfloat16; llama.cpp rounds activations to 8 bits).
A decode step still reads only the codes and scales: 0.625 bytes per weight for Q4_1 with
float16 scales (the file's own size), 1.06 for Q8_0, 0.75 for Q4_K (float32 scales).

Every output ``(i, n)`` goes through the same sequence of float operations whatever the number
of rows, their order and the thread count, so the matrix is batch-invariant by construction
(tests/backends/test_llama_blocks.py checks it). A product of :data:`DENSE_ROWS` rows or more
(a long prefill) dequantizes the matrix to a transient float32 copy and runs torch's GEMM.

The functions at the end (:func:`norm_mm`, :func:`attend_decode`, :func:`mm_add`, :func:`mlp`)
are a decode step's layer in four compiled calls; ``LlamaModel.step`` uses them when every layer
matrix is a :class:`BlockLinear` (float32 on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch

from samplerkit.builtins.backends.llama import native
from samplerkit.builtins.backends.llama.native import TILE_ROWS
from samplerkit.builtins.backends.llama.quant import DENSE_ROWS, GROUP, QuantizedTensor, _affine_rows

#: GGUF types each tile family takes.
Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
Q8_TYPES = ("Q8_0",)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return a if a.shape[0] == rows else np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


def family(type_name: str) -> int | None:
    """4 or 8 (the tile family of a GGUF type), or None if the kernels do not take it."""
    return 4 if type_name in Q4_TYPES else 8 if type_name in Q8_TYPES else None


def can_block(parts: list, device: torch.device) -> bool:
    """Whether matrices (stacked along their outputs) can run as one :class:`BlockLinear`: all
    are GGUF blocks of one tile family with the same inputs, on a CPU where the kernels load."""
    if device.type != "cpu" or not parts or not all(isinstance(p, QuantizedTensor) for p in parts):
        return False
    families = {family(p.type_name) for p in parts}
    if len(families) != 1 or None in families or len({p.shape[1] for p in parts}) != 1:
        return False
    return parts[0].shape[1] % GROUP == 0 and native.kernels() is not None


class BlockLinear:
    """``x @ W.T`` for a block-quantized matrix on the CPU (see the module docstring). Inputs of
    any float dtype ``[..., K]``; the output has the input's dtype."""

    __slots__ = ("tiles", "format", "format_id", "out_features", "in_features", "rows", "_mm", "_dequantize",
                 "_held", "_lib")

    def __init__(self, tiles: torch.Tensor, fmt: str, out_features: int, lib=None):
        lib = lib if lib is not None else native.kernels()
        if lib is None:
            raise RuntimeError(f"samplerkit's compiled kernels are unavailable: {native.unavailable_reason()}")
        if tiles.dtype != torch.uint8 or tiles.dim() != 3 or tiles.shape[2] != native.TILE_BYTES[fmt]:
            raise ValueError(f"tiles of format {fmt} must be uint8 [N/4, K/32, {native.TILE_BYTES[fmt]}]")
        self.tiles, self.format, self.format_id = tiles.contiguous(), fmt, native.FORMAT_IDS[fmt]
        self.out_features, self.in_features = out_features, tiles.shape[1] * GROUP
        #: Output rows the kernel computes (``out_features`` padded to whole tiles).
        self.rows = tiles.shape[0] * TILE_ROWS
        self._lib = lib
        self._mm, self._dequantize = getattr(lib, f"{fmt}_mm"), getattr(lib, f"{fmt}_dequantize")
        self._held: torch.Tensor | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
                   lib=None) -> BlockLinear:
        """From codes ``[N, K]`` (``c``: uint8 0..15, or int8 for ``bits=8``) and float32
        ``scale``/``zero`` ``[N, K/32]`` (``w = scale * c + zero``; no ``zero`` for 8 bits)."""
        n = codes.shape[0]
        padded = -(-n // TILE_ROWS) * TILE_ROWS
        arrays = [_pad_rows(t.numpy(), padded) if t is not None else None for t in (codes, scale, zero)]
        tiles, fmt = native.pack_tiles(*arrays, bits=bits)
        return cls(torch.from_numpy(tiles), fmt, n, lib=lib)

    @classmethod
    def from_parts(cls, parts: list[QuantizedTensor]) -> BlockLinear:
        """One product for several GGUF matrices stacked along their outputs (see :func:`can_block`)."""
        codes, scales, zeros = [], [], []
        bits = family(parts[0].type_name)
        for p in parts:
            rows, cols = p.shape
            c, s, z = (a.reshape(rows, -1) for a in _affine_rows(p.data, p.type_name))
            if bits == 4:
                low = -8 if p.type_name == "Q4_0" else 0       # Q4_0's codes come back as q - 8
                c, z = (c - low).astype(np.uint8), z + np.float32(low) * s
            codes.append(c.reshape(rows, cols))
            scales.append(s)
            zeros.append(z)
        cat = lambda a: torch.from_numpy(np.ascontiguousarray(np.concatenate(a)))  # noqa: E731
        return cls.from_codes(cat(codes), cat(scales), cat(zeros) if bits == 4 else None, bits=bits)

    def can_unpack(self) -> bool:
        """Always: :meth:`dense_t` works for every tile format (the prefill path)."""
        return True

    def dense_t(self) -> torch.Tensor:
        """``W.T`` ``[K, N]`` in float32, each weight as the kernel computes it."""
        out = torch.empty(self.rows, self.in_features)
        self._dequantize(self.tiles.data_ptr(), self.rows, self.in_features, out.data_ptr(), torch.get_num_threads())
        return out[: self.out_features].t()

    def __call__(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """``x @ W.T``; ``dense`` picks the transient float32 copy (None: when ``x`` has
        :data:`DENSE_ROWS` rows or more; the model passes it explicitly so that the path never
        depends on how many rows of a batch share the call)."""
        lead = x.shape[:-1]
        x2 = _f32(x).view(-1, self.in_features)
        if dense is None:
            dense = x2.shape[0] >= DENSE_ROWS
        if dense:
            w = self._held if self._held is not None else self.dense_t()
            y = torch.matmul(x2, w)
        else:
            y = torch.empty(x2.shape[0], self.rows)
            _check(self._mm(x2.data_ptr(), x2.shape[0], self.in_features, self.tiles.data_ptr(), self.rows,
                            y.data_ptr(), torch.get_num_threads()), "product")
            if self.rows != self.out_features:
                y = y[:, : self.out_features]
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).reshape(*lead, self.out_features)

    def nbytes(self) -> int:
        """Bytes one product reads (codes and scales)."""
        return self.tiles.numel()


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous float32 tensor (itself when it is one already)."""
    if x.dtype != torch.float32:
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"{what}: the compiled kernel failed (out of memory for its scratch buffers)")


# -- a decode step's fused glue (float32, CPU; every matrix a BlockLinear) ----------------------
# Each is one C call for what the model otherwise runs as several torch ops; each row is computed
# on its own in a fixed order, so these keep the batch invariance of the products.

def norm_mm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, lin: BlockLinear) -> torch.Tensor:
    """``rms_norm(x) @ W.T`` for ``x`` ``[..., K]`` float32 (RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight``)."""
    x2 = _f32(x)
    m = x2.numel() // lin.in_features
    y = torch.empty(m, lin.rows)
    _check(lin._lib.norm_mm(x2.data_ptr(), m, lin.in_features, norm_weight.data_ptr(), eps, lin.format_id,
                            lin.tiles.data_ptr(), lin.rows, y.data_ptr(), torch.get_num_threads()), "norm_mm")
    if lin.rows != lin.out_features:
        y = y[:, : lin.out_features]
    return y.reshape(*x.shape[:-1], lin.out_features)


def mm_add(x: torch.Tensor, lin: BlockLinear, h: torch.Tensor) -> None:
    """``h += x @ W.T`` in place (``h`` contiguous float32 with ``W``'s outputs, unpadded)."""
    x2 = _f32(x)
    _check(lin._lib.mm_add(x2.data_ptr(), x2.numel() // lin.in_features, lin.in_features, lin.format_id,
                           lin.tiles.data_ptr(), lin.rows, h.data_ptr(), torch.get_num_threads()), "mm_add")


def mlp(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up: BlockLinear, down: BlockLinear) -> None:
    """The feed-forward block and its residual add, in place on ``h`` ``[..., K]`` (contiguous
    float32): ``h += (silu(g) * u) @ W_down.T`` with ``g, u = rms_norm(h) @ W_gate_up.T``."""
    _check(gate_up._lib.mlp(h.data_ptr(), h.numel() // down.rows, down.rows, norm_weight.data_ptr(), eps,
                            gate_up.format_id, gate_up.tiles.data_ptr(), gate_up.rows // 2, down.format_id,
                            down.tiles.data_ptr(), torch.get_num_threads()), "mlp")


def attend_decode(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, rope: torch.Tensor, pos: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, t: int, start: torch.Tensor) -> torch.Tensor:
    """One decode step's rotary, cache writes and attention (``attend_decode`` in the C file):
    ``qkv`` ``[B, ..., (H + 2 KVH) D]`` contiguous float32 (its q and k are rotated in place), ``rope``
    ``[T, D/2, 2]`` (cos, sin), ``pos`` and ``start`` int64 ``[B]`` (each row's position and first
    key column), caches ``[B, KVH, cap, D]`` contiguous; returns ``[B, H D]``."""
    b, _, cap, d = k_cache.shape
    out = torch.empty(b, num_heads * d)
    _check(native.kernels().attend_decode(qkv.data_ptr(), b, num_heads, num_kv_heads, d, rope.data_ptr(),
                                          pos.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cap, t,
                                          start.data_ptr(), out.data_ptr(), torch.get_num_threads()), "attend_decode")
    return out


def fusable(layers, norm_weights) -> bool:
    """Whether a decode step can run the fused calls: every layer matrix a :class:`BlockLinear`
    without padded outputs, and every norm weight a contiguous float32 CPU tensor."""
    return all(isinstance(m, BlockLinear) and m.rows == m.out_features for layer in layers for m in layer.linears()) \
        and all(w.dtype == torch.float32 and w.is_contiguous() and w.device.type == "cpu" for w in norm_weights)


__all__ = ["Q4_TYPES", "Q8_TYPES", "TILE_ROWS", "BlockLinear", "attend_decode", "can_block", "family", "fusable", "mlp", "mm_add", "norm_mm"]
