"""4-bit GGUF weights kept packed, multiplied by torch's int4 CPU kernel.

Every 4-bit GGUF format this module reads is, per group of 32 consecutive inputs of one output
row, an affine map of 4-bit codes ``q`` in ``0..15``::

    Q4_0:  w = d * (q - 8)                      scale = d,        zero = 0
    Q4_1:  w = d * q + m                        scale = d,        zero = m + 8 d
    Q4_K:  w = (d * sc_j) * q - dmin * m_j      scale = d sc_j,   zero = 8 d sc_j - dmin m_j
                                                (sub-block j of 32 in a super-block of 256)

which is exactly the form ``w = (q - 8) * scale + zero`` of ``torch.ops.aten._weight_int4pack_mm_for_cpu``
(the kernel torchao and gpt-fast use), with group size 32. So the product ``x @ W.T`` can be
computed from the file's own codes: a decode step reads 4.5-5 bits per weight instead of 32,
which is what bounds a small model's speed on a CPU (memory bandwidth).

The kernel takes bfloat16 activations and bfloat16 scales and returns bfloat16 (it accumulates
in float32); the rest of the model (residual stream, norms, rotary, attention, KV cache) stays
in the compute dtype. The weights are the file's codes exactly; ``scale`` and ``zero`` are
rounded from float16/float32 to bfloat16 (relative error <= 2**-9), and the activations are
rounded to bfloat16 before each product — the same kind of approximation llama.cpp makes when
it multiplies quantized weights by 8-bit-quantized activations. ``weights: dequantize`` gives
the exact float32 model instead.

A product of many rows (a prefill, :data:`DENSE_ROWS` or more) unpacks the matrix to a transient
dense copy instead and runs a dense GEMM, which is much faster there: bfloat16 where the CPU has
native bfloat16 GEMMs (the weights are then rounded to bfloat16 too), float32 elsewhere (AVX2
emulates bfloat16 GEMMs, 67x slower than float32; see :func:`dense_dtype`).

Q8_0 (``w = d * q``, ``q`` in ``-128..127``) is two 4-bit planes: with ``q + 128 = 16 h + l``
(``h``, ``l`` in ``0..15``), ``w = 16 d (h - 8) + d (l - 8) + 8 d``, i.e. one int4 product with
``scale = 16 d, zero = 0`` plus one with ``scale = d, zero = 8 d``. Same bytes as int8 and
exact codes again; used for the output projection (tied to a Q8_0 token embedding in SmolLM2).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

#: Inputs per scale/zero group in every format handled here.
GROUP = 32
#: The kernel computes fast only with bfloat16 activations and scales (float16 takes a slow path).
_ACT = torch.bfloat16

#: GGUF tensor types whose codes this module can keep packed.
PACKABLE_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")


@functools.cache
def int4_kernel_available() -> bool:
    """Whether this torch has the CPU int4 kernels (torch >= 2.5) and they run here."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return False
    try:
        packed = ops._convert_weight_to_int4pack_for_cpu(torch.zeros(16, GROUP, dtype=torch.int32), 1)
        scales = torch.ones(1, 16, 2, dtype=torch.bfloat16)
        ops._weight_int4pack_mm_for_cpu(torch.ones(1, GROUP, dtype=torch.bfloat16), packed, GROUP, scales)
    except (RuntimeError, NotImplementedError):
        return False
    return True


class AffineInt4:
    """A weight matrix ``[N, K]`` as 4-bit codes with one affine map per group of 32 inputs.

    ``codes`` is uint8 ``[N, K]`` (values 0..15); ``scale`` and ``zero`` are float32 ``[N, K/32]``;
    ``w[n, k] = (codes[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]``. A Q8_0 matrix is a
    list of two of these (see the module docstring).
    """

    __slots__ = ("codes", "scale", "zero")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.codes, self.scale, self.zero = codes, scale, zero

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix the codes stand for."""
        n, k = self.codes.shape
        q = self.codes.view(n, k // GROUP, GROUP).float() - 8.0
        return (q * self.scale[..., None] + self.zero[..., None]).view(n, k)

    @staticmethod
    def cat(parts: list[AffineInt4]) -> AffineInt4:
        """Stack the output rows of several matrices (fused q/k/v or gate/up)."""
        return AffineInt4(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]))


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Unpack bytes laid out as runs of ``run`` bytes: low nibbles are the run's first ``run``
    values, high nibbles the next ``run`` (the ggml layout of Q4_0/Q4_1 (run 16) and Q4_K (32))."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, run)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, -1)


def _affine_rows(data: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes int8 [N, K], scale, zero float32 [N, K/32])`` with ``w = codes * scale + zero``
    evaluated exactly as gguf's dequantizer evaluates it (same operands, same two roundings), so
    rows come out bit-identical to ``gguf.quants.dequantize``. Block order, flattened: the
    callers reshape to ``[N, K]`` and ``[N, K/32]``."""
    raw = np.asarray(data, dtype=np.uint8).reshape(-1)
    if type_name == "Q8_0":                                   # d * q
        blocks = raw.reshape(-1, 34)
        d = _f16(blocks[:, 0:2])[:, 0]
        return blocks[:, 2:].view(np.int8), d, np.zeros_like(d)
    if type_name in ("Q4_0", "Q4_1"):                         # d * (q - 8)   /   d * q + m
        head = 2 if type_name == "Q4_0" else 4
        blocks = raw.reshape(-1, head + 16)
        d = _f16(blocks[:, 0:2])[:, 0]
        q = _nibbles(blocks[:, head:], 16).astype(np.int8)
        if type_name == "Q4_0":
            return q - 8, d, np.zeros_like(d)
        return q, d, _f16(blocks[:, 2:4])[:, 0]
    if type_name == "Q4_K":                                   # (d sc) * q - (dmin m)
        import gguf

        blocks = raw.reshape(-1, 144)
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        return (_nibbles(blocks[:, 16:], 32).astype(np.int8), (d * sc.astype(np.float32)).reshape(-1),
                -(dmin * mn.astype(np.float32)).reshape(-1))
    raise ValueError(f"tensor type {type_name} cannot be kept packed (only {', '.join(PACKABLE_TYPES)})")


def read_packed(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> list[AffineInt4]:
    """The codes and affine maps of one GGUF tensor (raw block bytes), as a list of int4 planes
    whose products sum to the matrix's product (one plane, two for Q8_0).

    From :func:`_affine_rows`' ``w = c * scale + zero``: a 4-bit code ``c`` from ``low`` upwards
    (``low`` is -8 for Q4_0, else 0) is stored as ``c - low`` with ``zero + (8 + low) * scale``;
    a Q8_0 code is split into two planes (see the module docstring)."""
    rows, cols = shape
    if cols % GROUP:
        raise ValueError(f"{cols} inputs is not a multiple of {GROUP}")
    codes, scale, zero = _affine_rows(data, type_name)
    if type_name == "Q8_0":
        shifted = (codes.astype(np.int16) + 128).astype(np.uint8)
        planes = [(shifted >> 4, 16 * scale, np.zeros_like(scale)), (shifted & 0x0F, scale, 8 * scale)]
    else:
        low = -8 if type_name == "Q4_0" else 0
        planes = [((codes - low).astype(np.uint8), scale, zero + (8 + low) * scale)]
    return [AffineInt4(torch.from_numpy(np.ascontiguousarray(c).reshape(rows, cols)),
                       torch.from_numpy(np.ascontiguousarray(sc, dtype=np.float32).reshape(rows, -1)),
                       torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32).reshape(rows, -1)))
            for c, sc, z in planes]


class QuantizedTensor:
    """A GGUF tensor left in its file's block format until the model decides how to use it:
    ``dense()`` dequantizes it (gguf's own reference dequantizer), ``planes()`` gives its int4
    planes for :class:`Int4Linear`. ``shape`` is ``(rows, cols)`` in PyTorch order."""

    __slots__ = ("data", "type_name", "shape")

    def __init__(self, data: np.ndarray, type_name: str, shape: tuple[int, int]):
        self.data, self.type_name, self.shape = data, type_name, tuple(shape)

    def dense(self) -> torch.Tensor:
        import gguf

        arr = gguf.quants.dequantize(self.data, gguf.GGMLQuantizationType[self.type_name])
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(self.shape))

    def planes(self) -> list[AffineInt4]:
        return read_packed(self.data, self.type_name, self.shape)


def can_pack(parts: list, device: torch.device) -> bool:
    """Whether matrices (fused along their outputs) can run as one :class:`Int4Linear`: all are
    :class:`QuantizedTensor` with the same plane count and inputs, on a CPU with the kernel, and the
    kernel's layout constraint holds (outputs a multiple of 16)."""
    if device.type != "cpu" or not all(isinstance(p, QuantizedTensor) for p in parts):
        return False
    if len({p.type_name == "Q8_0" for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
        return False
    return parts[0].shape[1] % GROUP == 0 and sum(p.shape[0] for p in parts) % 16 == 0 and int4_kernel_available()


#: From this many rows (prompt tokens of a prefill) a product dequantizes its matrix to a
#: transient bfloat16 copy and runs a dense GEMM: the int4 kernel is built for a few rows and
#: does ~150 GFLOP/s here, a bfloat16 GEMM (AMX) over ten times that; unpacking a matrix costs
#: about as much as 100 rows through the kernel.
DENSE_ROWS = 128


@functools.cache
def _kernel_layout() -> tuple[int, torch.Tensor] | None:
    """How this torch, on this CPU, packs int4 weights: ``(block, order)`` or None if unknown.

    ``_convert_weight_to_int4pack_for_cpu`` dispatches per CPU capability and each build packs
    differently (AVX-512: blocks of 64 outputs, byte ``j`` holding outputs ``j`` (low nibble) and
    ``j + 32`` (high); AVX2: blocks of 32, ``j`` and ``j + 16``; the generic build: blocks of 32,
    outputs ``2j`` and ``2j + 1``). Rather than hard-coding one, the layout is *measured*: four
    probe matrices whose codes spell out each weight's output index ``n`` and input index ``k`` in
    base 16 are packed, and each nibble's ``(n, k)`` is read back. The result is accepted only if
    it has the form ``[N / block, K, block / 2]`` bytes with one fixed nibble order per block
    (``order[i]`` = output within the block of nibble ``i``, low nibbles first), and then only if
    unpacking random codes of two shapes with it gives them back exactly.
    """
    ops = torch.ops.aten
    n, k = 256, 128
    try:
        def pack(codes: torch.Tensor) -> torch.Tensor:
            return ops._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1).reshape(-1)

        rows = torch.arange(n)[:, None].expand(n, k)
        cols = torch.arange(k)[None, :].expand(n, k)
        digits = [pack(rows % 16), pack(rows // 16), pack(cols % 16), pack(cols // 16)]
        if digits[0].numel() * 2 != n * k:
            return None
        nib = [torch.cat([d & 15, d >> 4]).long() for d in digits]      # low nibbles, then high
        out_n, in_k = nib[0] + 16 * nib[1], nib[2] + 16 * nib[3]         # [n * k] each
        half = n * k // 2
        # Byte b = (block, kk, j): its input must be kk and its outputs a fixed set in the block.
        lo_n, hi_n, lo_k = out_n[:half], out_n[half:], in_k[:half]
        for block in (64, 32, 16, 128):
            if n % block:
                continue
            shape = (n // block, k, block // 2)
            order = torch.cat([lo_n.view(shape)[0, 0], hi_n.view(shape)[0, 0]])
            start = (torch.arange(n // block) * block)[:, None, None]
            want_lo = start + order[: block // 2]
            want_hi = start + order[block // 2:]
            if (torch.equal(lo_k.view(shape), torch.arange(k)[None, :, None].expand(shape))
                    and torch.equal(lo_n.view(shape), want_lo.expand(shape))
                    and torch.equal(hi_n.view(shape), want_hi.expand(shape))
                    and torch.equal(order.sort().values, torch.arange(block))):
                layout = (block, order)
                break
        else:
            return None
        gen = torch.Generator().manual_seed(0)
        for rows_, cols_ in ((128, 64), (3 * layout[0], 96)):
            codes = torch.randint(0, 16, (rows_, cols_), dtype=torch.int32, generator=gen)
            if not torch.equal(_unpack_codes_t(pack(codes), rows_, cols_, layout), codes.t().to(torch.uint8)):
                return None
        return layout
    except (RuntimeError, NotImplementedError):
        return None


def _unpack_codes_t(packed: torch.Tensor, n: int, k: int, layout: tuple[int, torch.Tensor]) -> torch.Tensor:
    """The codes ``[K, N]`` (uint8) of a matrix packed in the kernel's ``layout`` (see
    :func:`_kernel_layout`): blocks of ``block`` outputs, each ``[K, block / 2]`` bytes whose low
    and high nibbles hold the outputs ``order`` lists."""
    block, order = layout
    bytes_ = packed.reshape(n // block, k, block // 2)
    nibbles = torch.empty(k, n // block, block, dtype=torch.uint8)
    by_k = bytes_.transpose(0, 1)                                     # [K, N / block, block / 2]
    torch.bitwise_and(by_k, 15, out=nibbles[:, :, : block // 2])
    torch.bitwise_right_shift(by_k, 4, out=nibbles[:, :, block // 2:])
    inverse = torch.argsort(order)                                    # output j is nibble inverse[j]
    if torch.equal(inverse, torch.arange(block)):
        return nibbles.view(k, n)
    return nibbles.index_select(2, inverse).view(k, n)


@functools.cache
def dense_dtype() -> torch.dtype:
    """The dtype of a prefill's transient dense copy: bfloat16 where oneDNN has native bfloat16
    GEMMs (AVX512-BF16, AMX), float32 elsewhere. On an AVX2 CPU a bfloat16 GEMM is emulated and
    was measured 67x slower than float32 (``[256, 576] @ [576, 3072]``: 1750 ms vs 26 ms, one
    thread), so there the copy costs twice the memory but runs at float32 GEMM speed."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def _kernel_layout_known() -> bool:
    """Whether this torch's int4 packing was recognised (see :func:`_kernel_layout`), so that the
    prefill path can unpack a matrix; True on every capability torch 2.5-2.13 ships."""
    return _kernel_layout() is not None


class Int4Linear:
    """``x @ W.T`` for a matrix kept as int4 planes (see :class:`AffineInt4`), on the CPU.

    Inputs of any float dtype ``[..., K]``; the output has the input's dtype. Products of
    :data:`DENSE_ROWS` rows or more (prefill) go through a transient bfloat16 copy of ``W``.
    """

    __slots__ = ("planes", "out_features", "_held")

    def __init__(self, planes: list[AffineInt4]):
        if not int4_kernel_available():
            raise RuntimeError("this torch build has no int4 CPU kernel (_weight_int4pack_mm_for_cpu)")
        ops = torch.ops.aten
        self.out_features = planes[0].shape[0]
        self._held: torch.Tensor | None = None
        #: (packed codes in the kernel's layout, [K/32, N, 2] (scale, zero) in the activation dtype)
        self.planes: list[tuple[torch.Tensor, torch.Tensor]] = []
        for p in planes:
            packed = ops._convert_weight_to_int4pack_for_cpu(p.codes.to(torch.int32), 1)
            scales = torch.stack([p.scale.t(), p.zero.t()], dim=-1).to(_ACT).contiguous()
            self.planes.append((packed, scales))

    @classmethod
    def from_packed(cls, planes: list[tuple[torch.Tensor, torch.Tensor]], out_features: int) -> Int4Linear:
        """Rebuild from :attr:`planes` saved earlier (same torch build and CPU kind: the packed
        layout is the kernel's own)."""
        self = cls.__new__(cls)
        self.planes, self.out_features, self._held = list(planes), out_features, None
        return self

    @classmethod
    def from_parts(cls, parts: list[QuantizedTensor]) -> Int4Linear:
        """One product for several matrices stacked along their outputs (see :func:`can_pack`)."""
        per_part = [p.planes() for p in parts]
        return cls([AffineInt4.cat([planes[i] for planes in per_part]) for i in range(len(per_part[0]))])

    def can_unpack(self) -> bool:
        """Whether :meth:`dense_t` works here: the packing is recognised and the outputs fill whole blocks."""
        layout = _kernel_layout()
        return layout is not None and self.out_features % layout[0] == 0

    def dense_t(self) -> torch.Tensor:
        """``W.T`` ``[K, N]`` dequantized from the packed planes (summed in float32), in
        :func:`dense_dtype` (bfloat16 where the CPU multiplies it natively, else float32)."""
        k = self.planes[0][1].shape[0] * GROUP
        layout = _kernel_layout()
        if layout is None:
            raise RuntimeError("this torch's int4 packing is not recognised; dense_t is unavailable")
        w = None
        for packed, scales in self.planes:
            codes = _unpack_codes_t(packed, self.out_features, k, layout).view(k // GROUP, GROUP, self.out_features)
            part = codes.float().sub_(8).mul_(scales[:, None, :, 0].float()).add_(scales[:, None, :, 1].float())
            w = part if w is None else w.add_(part)
        return w.view(k, self.out_features).to(dense_dtype())

    def __call__(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """``x @ W.T``; ``dense`` picks the transient-bfloat16-copy path (None: when ``x`` has
        :data:`DENSE_ROWS` rows or more). The model passes it explicitly so that the path never
        depends on how many rows of a batch share the call. The int4 kernel computes each output
        row on its own (the same bits for a row alone or among others)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(_ACT)
        if dense is None:
            dense = x2.shape[0] >= DENSE_ROWS
        if dense and self.can_unpack():
            w = self._held if self._held is not None else self.dense_t()
            return torch.matmul(x2.to(w.dtype), w).to(x.dtype).view(*lead, self.out_features)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        packed, scales = self.planes[0]
        y = mm(x2, packed, GROUP, scales)
        for packed, scales in self.planes[1:]:
            y = y.float().add_(mm(x2, packed, GROUP, scales))   # sum the planes in float32
        return y.to(x.dtype).view(*lead, self.out_features)

    def nbytes(self) -> int:
        """Bytes one product reads (codes + scales)."""
        return sum(p.numel() * p.element_size() + s.numel() * s.element_size() for p, s in self.planes)


#: Rows per fbgemm call of a :class:`Fp16Linear` outside a prefill (see its docstring): 4 rows
#: cost about as much as one in that kernel, and larger batches run as several 4-row calls at
#: nearly a single call's cost per row (measured with benchmarks/bench_q4_kernels.py).
FP16_ROWS = 4


@functools.cache
def fp16_kernel_available() -> bool:
    """Whether torch's fbgemm float16-weight GEMM (``quantized.linear_dynamic_fp16``) runs here
    and computes each row of a :data:`FP16_ROWS`-row call the same whatever its position and its
    neighbours (what makes :class:`Fp16Linear` batch-invariant); checked once on a probe matrix."""
    ops = torch.ops.quantized
    if not (hasattr(ops, "linear_prepack_fp16") and hasattr(ops, "linear_dynamic_fp16")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(96, 2 * GROUP * 3, generator=gen)
        packed = ops.linear_prepack_fp16(w, None)
        row = torch.randn(1, w.shape[1], generator=gen)
        want = None
        for pos in range(FP16_ROWS):
            x = torch.randn(FP16_ROWS, w.shape[1], generator=gen)
            x[pos] = row
            got = ops.linear_dynamic_fp16(x, packed)[pos]
            want = got if want is None else want
            if not torch.equal(got, want):
                return False
        return torch.allclose(want, (row @ w.t())[0], rtol=1e-2, atol=1e-2)
    except (RuntimeError, NotImplementedError):
        return False


class Fp16Linear:
    """``x @ W.T`` with ``W`` in float16, by fbgemm's float16-weight GEMM (CPU; AVX2/F16C and
    AVX-512 kernels): float32 activations, each weight widened to float32 in the kernel, float32
    accumulation. ``W`` is the file's matrix dequantized exactly (``w = d q + m``, gguf's own
    dequantizer) and rounded once to float16 (relative error <= 2**-11 per weight): closer to the
    exact model than :class:`Int4Linear`, which rounds the scales and the activations to bfloat16
    (2**-9), at 2 bytes per weight instead of about 0.56.

    Batch invariance: fbgemm picks its micro-kernels by the call's row count, and a row's bits
    differ between some of them (1, 2, 7 or 14 rows against the rest, on AVX2). Outside a
    prefill, rows therefore go through calls of exactly :data:`FP16_ROWS` rows (the last padded
    with zeros), in which a row's bits depend on neither its position nor the other rows
    (checked at start, :func:`fp16_kernel_available`). A prefill (``dense=True``, one prompt on
    its own) is one call.
    """

    __slots__ = ("packed", "out_features", "in_features")

    def __init__(self, weight16: torch.Tensor):
        if not fp16_kernel_available():
            raise RuntimeError("this torch build has no usable fbgemm float16 GEMM (quantized.linear_dynamic_fp16)")
        self.out_features, self.in_features = weight16.shape
        # Only fbgemm's packed copy is kept (its float16 values are the rounded weights):
        # :attr:`weight16` unpacks it when the cache is written, so memory holds one copy.
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight16.to(torch.float16).float(), None)

    @property
    def weight16(self) -> torch.Tensor:
        """``W`` ``[N, K]`` float16 as the kernel holds it (what the model cache stores)."""
        weight, _ = torch.ops.quantized.linear_unpack_fp16(self.packed)
        return weight.to(torch.float16).contiguous()

    @classmethod
    def from_parts(cls, parts: list) -> Fp16Linear:
        """Several matrices (:class:`QuantizedTensor` or float tensors ``[N_i, K]``) stacked along
        their outputs, each dequantized in float32 first."""
        dense = [p.dense() if isinstance(p, QuantizedTensor) else p.float() for p in parts]
        return cls(torch.cat(dense) if len(dense) > 1 else dense[0])

    def __call__(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """``x @ W.T`` in ``x``'s dtype; ``dense`` (a prefill of one prompt) runs all rows in one
        call, otherwise in calls of :data:`FP16_ROWS` rows (see the class docstring)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()
        mm = torch.ops.quantized.linear_dynamic_fp16
        m = x2.shape[0]
        if dense:
            y = mm(x2, self.packed)
        else:
            if m % FP16_ROWS:
                x2 = torch.cat([x2, x2.new_zeros(FP16_ROWS - m % FP16_ROWS, x2.shape[1])])
            parts = [mm(c, self.packed) for c in x2.split(FP16_ROWS)]
            y = (parts[0] if len(parts) == 1 else torch.cat(parts))[:m]
        return y.to(x.dtype).view(*lead, self.out_features)

    def nbytes(self) -> int:
        """Bytes one product reads (the float16 weights)."""
        return self.out_features * self.in_features * 2


class dense_copies:  # noqa: N801 - a context manager, named like torch's lower-case ones
    """Within the block, each :class:`Int4Linear` or :class:`~.blocks.BlockLinear` in ``linears``
    (others are ignored) keeps its transient dense copy, so the rows of a prefill that each take the dense path unpack a
    matrix once between them; the copies are dropped on exit. Nothing happens if not ``enabled``."""

    def __init__(self, linears, enabled: bool):
        self.linears = [m for m in linears if hasattr(m, "dense_t") and m.can_unpack()] if enabled else []

    def __enter__(self):
        for m in self.linears:
            m._held = m.dense_t()
        return self

    def __exit__(self, *exc):
        for m in self.linears:
            m._held = None
        return False


class QuantizedEmbedding:
    """Token embedding lookup from the file's codes: ``rows(ids)`` gathers the ids' codes and
    dequantizes only those rows (bit-identical to dequantizing the whole table), so the table
    costs 1.25 bytes per weight in memory instead of 4."""

    __slots__ = ("codes", "scale", "zero")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.codes, self.scale, self.zero = codes, scale, zero

    @classmethod
    def from_tensor(cls, qt: QuantizedTensor) -> QuantizedEmbedding:
        codes, scale, zero = _affine_rows(qt.data, qt.type_name)
        rows, cols = qt.shape
        as_t = lambda a, *shape: torch.from_numpy(np.ascontiguousarray(a)).reshape(*shape)  # noqa: E731
        return cls(as_t(codes, rows, cols), as_t(scale, rows, -1), as_t(zero, rows, -1))

    def __call__(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = ids.reshape(-1)
        n, k = flat.numel(), self.codes.shape[1]
        q = self.codes.index_select(0, flat).float().view(n, k // GROUP, GROUP)
        w = q.mul_(self.scale.index_select(0, flat)[..., None]).add_(self.zero.index_select(0, flat)[..., None])
        return w.view(*ids.shape, k).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


class DenseEmbedding:
    """Token embedding lookup from a dense ``[V, d]`` table (also the tied output matrix)."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class DenseLinear:
    """``x @ W.T`` with ``W`` stored transposed (``[in, out]``): ``x @ W_t`` measured up to 2x
    faster than ``F.linear(x, W)`` for batch-8 decode shapes with cache-resident weights on CPU,
    and never slower."""

    __slots__ = ("weight_t",)

    def __init__(self, weight_t: torch.Tensor):
        self.weight_t = weight_t

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    def __call__(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """``x @ W.T`` (``dense`` is accepted for a common signature with :class:`Int4Linear`)."""
        return torch.matmul(x, self.weight_t)

    def nbytes(self) -> int:
        return self.weight_t.numel() * self.weight_t.element_size()


__all__ = ["FP16_ROWS", "GROUP", "PACKABLE_TYPES", "AffineInt4", "DenseEmbedding", "DenseLinear", "Fp16Linear",
           "Int4Linear", "QuantizedEmbedding", "QuantizedTensor", "can_pack", "fp16_kernel_available",
           "int4_kernel_available", "read_packed"]
