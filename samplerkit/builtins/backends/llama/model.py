"""A Llama-family decoder in plain PyTorch, with a preallocated KV cache.

Per layer, for hidden states ``h`` (``[B, L, d]``)::

    x  = rms_norm(h) * g_attn                 rms_norm(x) = x / sqrt(mean(x**2) + eps)
    q, k, v = x @ Wq.T, x @ Wk.T, x @ Wv.T    (one fused matmul with [Wq; Wk; Wv])
    q, k = rope(q, pos), rope(k, pos)         rotate pairs (x[2i], x[2i+1]) by pos * theta**(-2i/D)
    h  = h + softmax(q k^T / sqrt(D) + mask) v @ Wo.T     (grouped-query: H/KVH q heads per kv head)
    x  = rms_norm(h) * g_ffn
    h  = h + (silu(x @ Wgate.T) * (x @ Wup.T)) @ Wdown.T  (one fused matmul with [Wgate; Wup])

and ``logits = rms_norm(h) * g_out @ Wout.T`` (``Wout`` may be the token embedding: tied).

Q/K rows are kept in the *interleaved* rotary layout (the one GGUF stores): rotating adjacent
pairs is a single complex multiplication. HF checkpoints use the half-split layout and are
permuted at load; attention scores are unchanged because q and k are permuted alike.

Batches of prompts with different lengths are **left**-padded in the cache, so every row writes
its next token to the same cache column (one slice assignment per layer per step). Each row keeps
its own rotary positions (``column - pad``).

**Batch invariance.** A row's logits are bit-identical whether it runs alone or at any position
of any batch (other prompt lengths, rows dropped or duplicated by :meth:`LlamaModel.select_rows`),
as long as every product it goes through computes each output row by a reduction that does not
depend on the other rows. The model makes sure of the parts it controls: a prefill runs each
prompt on its own (no padding enters any reduction; the dense-copy choice of a packed matrix
depends on the prompt's own length), and a decode step's attention reduces each row over exactly
its own keys ``[pad, t]`` (consecutive rows with the same padding share one call), never over
masked pad columns, whose presence changes the blocking of the softmax sums. The compiled kernels
(``weights: blocks``, and ``auto`` where they load; :mod:`.blocks`) compute every output, and the
fused decode glue every row, in one fixed order whatever the batch and the thread count; the packed
int4 kernel reduces each output row alone (checked for 1-140 rows), and the float16 products
(``weights: fp16``, and ``auto``'s output matrix without the compiled kernels) run in calls of 4
rows where a row's bits depend on neither its position nor its neighbours (checked at start), so the default model
is batch-invariant end to end; a float32 GEMM (``weights: dequantize``) is not: BLAS picks its
blocking by the number of rows (see docs/cli.md for what is guaranteed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from samplerkit.builtins.backends.llama import blocks
from samplerkit.builtins.backends.llama.blocks import BlockLinear, can_block
from samplerkit.builtins.backends.llama.config import LlamaConfig
from samplerkit.builtins.backends.llama.quant import (
    DENSE_ROWS,
    DenseEmbedding,
    DenseLinear,
    Fp16Linear,
    Int4Linear,
    QuantizedEmbedding,
    QuantizedTensor,
    can_pack,
    dense_copies,
)
from samplerkit.errors import GenerationError

# The cache grows in steps of this many positions (then doubles): a short generation does not
# pay for a max_context-sized cache, a long one reallocates O(log n) times.
_CACHE_CHUNK = 256


class _Layer:
    """One decoder block: norms and its four (fused) linear maps, each a callable ``x -> x @ W.T``
    (:class:`~.quant.DenseLinear`, :class:`~.blocks.BlockLinear`, :class:`~.quant.Int4Linear` or
    :class:`~.quant.Fp16Linear`)."""

    __slots__ = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")
    #: The linear maps, in the order a step applies them.
    LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")

    def __init__(self, attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down):
        self.attn_norm = attn_norm
        self.wqkv = wqkv
        self.wo = wo
        self.ffn_norm = ffn_norm
        self.w_gate_up = w_gate_up
        self.w_down = w_down

    def linears(self) -> tuple:
        return tuple(getattr(self, n) for n in self.LINEARS)


def rope_inv_freq(config: LlamaConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """``theta ** (-2i / D)`` for ``i < D/2`` in float32, computed as HF does; optionally divided by
    per-frequency factors (GGUF ``rope_freqs.weight``; Llama 3 long-context scaling)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    return inv_freq


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` over the last two dims (``q`` ``[B, H, Q, D]``, ``k``/``v``
    ``[B, H, T, D]``), softmax in float32.

    Written out rather than ``F.scaled_dot_product_attention`` for the decode step: torch's fused
    CPU kernel is not batch-invariant (measured: with odd key counts, two identical rows of one
    call get different bits, and a row in a batch differs from the row alone), while each
    ``(b, h)`` slice of these batched matmuls and the row-wise softmax is computed alone.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class LlamaModel:
    """Weights, rotary table and KV cache of one Llama decoder; see the module docstring.

    ``weights`` uses this package's canonical names (see :data:`WEIGHT_NAMES`), Q/K in the
    interleaved rotary layout. They are moved to ``device``/``dtype`` and fused here; the dict
    is consumed (entries are popped) so the unfused copies can be freed as we go. Entries may be
    :class:`~.quant.QuantizedTensor` (4-bit/8-bit GGUF blocks): matrices whose fused parts can all
    stay packed run as :class:`~.blocks.BlockLinear` (``block_weights``, samplerkit's compiled
    kernels) or :class:`~.quant.Int4Linear` (torch's int4 kernel), the rest are dequantized here.
    """

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_context: int | None = None, fp16_weights: bool = False, fp16_head: bool = False,
                 block_weights: bool = False):
        """``block_weights``: every matrix whose GGUF blocks the compiled kernels take runs as
        :class:`~.blocks.BlockLinear` (``weights: blocks``, and ``auto`` where the kernels load), the
        output matrix too; the others as below. ``fp16_weights``: every matrix (the output one
        too) runs as :class:`~.quant.Fp16Linear` (``weights: fp16``); the token embedding then stays in the file's codes if it has any.
        ``fp16_head``: only the output matrix does, where it would otherwise run packed
        (``weights: auto``: at one row it is the largest product of a step, and the int4 kernel
        takes a Q8_0 output matrix as two 4-bit planes)."""
        self._setup(config, device, dtype, max_context)

        def dense(w) -> torch.Tensor:
            w = w.dense() if isinstance(w, QuantizedTensor) else w
            return w.to(device=self.device, dtype=dtype)

        def take(name: str) -> torch.Tensor:
            return dense(weights.pop(name)).contiguous()

        def linear(*parts):
            if block_weights and can_block(list(parts), self.device):
                return BlockLinear.from_parts(list(parts))
            if fp16_weights:
                return Fp16Linear.from_parts(list(parts))
            if can_pack(list(parts), self.device):
                return Int4Linear.from_parts(list(parts))
            # [W1; W2; ...]^T written in one copy: cat of the transposed views along dim 1.
            return DenseLinear(torch.cat([dense(w).t() for w in parts], dim=1))

        embed = weights.pop("embed")
        head = weights.pop("lm_head", None)
        head_blocks = block_weights and can_block([embed if head is None else head], self.device)
        tied_packed = head is None and not head_blocks and can_pack([embed], self.device)
        head_fp16 = not head_blocks and (
            fp16_weights or (fp16_head and can_pack([embed if head is None else head], self.device)))
        if isinstance(embed, QuantizedTensor) and (head is not None or tied_packed or head_fp16 or head_blocks):
            # Only looked up row by row (the output matrix is separate or packed): keep the codes.
            self.embed = QuantizedEmbedding.from_tensor(embed)
        else:
            self.embed = DenseEmbedding(dense(embed).contiguous())
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            self.layers.append(_Layer(
                attn_norm=take(p + "attn_norm"),
                wqkv=linear(*(weights.pop(p + n) for n in ("wq", "wk", "wv"))),
                wo=linear(weights.pop(p + "wo")),
                ffn_norm=take(p + "ffn_norm"),
                w_gate_up=linear(weights.pop(p + "w_gate"), weights.pop(p + "w_up")),
                w_down=linear(weights.pop(p + "w_down")),
            ))
        self.norm = take("norm")
        if head_blocks:
            self.lm_head = BlockLinear.from_parts([embed if head is None else head])
        elif head_fp16:
            self.lm_head = Fp16Linear.from_parts([embed if head is None else head])
        elif head is None:                    # tied: reuse the embedding (no transposed copy)
            self.lm_head = Int4Linear.from_parts([embed]) if tied_packed else DenseLinear(self.embed.weight.t())
        else:
            self.lm_head = linear(head)
        self.freq_factors = weights.pop("rope_freqs", None)
        self._finish()

    def _setup(self, config: LlamaConfig, device, dtype: torch.dtype, max_context: int | None) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_context = int(max_context or config.max_position)
        #: Decode attention per run of equally padded rows (True: batch-invariant, see the module
        #: docstring) or one masked fused call over the whole batch (False: fewer calls when the
        #: rows' paddings differ, but a row's bits then depend on its batch).
        self.batch_invariant = True

    def _finish(self) -> None:
        """Rotary table, head counts and an empty cache, once the weights are in place."""
        config = self.config
        # Rotary table as unit complex numbers e^{i * pos * inv_freq}, float32 like HF's cos/sin.
        inv_freq = rope_inv_freq(config, self.freq_factors)
        angles = torch.outer(torch.arange(self.max_context, dtype=torch.float32), inv_freq)
        self._rope = torch.polar(torch.ones_like(angles), angles).to(self.device)  # [T, D/2] complex64
        self._rope_real = torch.view_as_real(self._rope)                              # [T, D/2, 2] (cos, sin)

        self._n_q = config.num_heads * config.head_dim
        self._n_qk = (config.num_heads + config.num_kv_heads) * config.head_dim
        self._n_rep = config.num_heads // config.num_kv_heads
        #: Decode steps run each layer as four compiled calls (norm + q/k/v product; rotary, cache
        #: writes and attention; output product + residual; feed-forward block + residual): float32
        #: on the CPU, every layer matrix a BlockLinear, head_dim a multiple of the kernels' 8 lanes.
        norms = [w for layer in self.layers for w in (layer.attn_norm, layer.ffn_norm)] + [self.norm]
        self._fused = (self.dtype == torch.float32 and self.device.type == "cpu" and config.head_dim % 8 == 0
                       and blocks.fusable(self.layers, norms))
        self._reset_cache(0, 0)

    # -- prepared weights (the load cache) ----------------------------------------------
    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, layout)``: the weights as this model holds them (fused, transposed,
        packed), contiguous on the CPU, from which :meth:`from_state` rebuilds the model without
        the source file; ``layout`` is JSON-able (which linear is dense, int4 or tied)."""
        tensors: dict[str, torch.Tensor] = {"norm": self.norm}
        layout: dict[str, dict] = {}
        if isinstance(self.embed, QuantizedEmbedding):
            tensors |= {"embed.codes": self.embed.codes, "embed.scale": self.embed.scale,
                        "embed.zero": self.embed.zero}
            layout["embed"] = {"kind": "quantized"}
        else:
            tensors["embed"] = self.embed.weight
            layout["embed"] = {"kind": "dense"}

        def put(name: str, lin) -> None:
            if isinstance(lin, Int4Linear):
                for j, (packed, scales) in enumerate(lin.planes):
                    tensors[f"{name}.{j}.packed"], tensors[f"{name}.{j}.scales"] = packed, scales
                layout[name] = {"kind": "int4", "planes": len(lin.planes), "out": lin.out_features}
            elif isinstance(lin, Fp16Linear):
                tensors[f"{name}.fp16"] = lin.weight16
                layout[name] = {"kind": "fp16"}
            elif isinstance(lin, BlockLinear):
                tensors[f"{name}.tiles"] = lin.tiles
                layout[name] = {"kind": "blocks", "format": lin.format, "out": lin.out_features}
            elif name == "lm_head" and isinstance(self.embed, DenseEmbedding) and \
                    lin.weight_t.data_ptr() == self.embed.weight.data_ptr():
                layout[name] = {"kind": "tied"}
            else:
                tensors[name] = lin.weight_t
                layout[name] = {"kind": "dense"}

        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.attn_norm"], tensors[f"layers.{i}.ffn_norm"] = layer.attn_norm, layer.ffn_norm
            for n in _Layer.LINEARS:
                put(f"layers.{i}.{n}", getattr(layer, n))
        put("lm_head", self.lm_head)
        if self.freq_factors is not None:
            tensors["rope_freqs"] = self.freq_factors
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, layout

    @classmethod
    def from_state(cls, config: LlamaConfig, tensors: dict[str, torch.Tensor], layout: dict, *,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   max_context: int | None = None) -> LlamaModel:
        """The model :meth:`export_state` described (same device/dtype it was exported with)."""
        self = cls.__new__(cls)
        self._setup(config, device, dtype, max_context)

        def tensor(name: str) -> torch.Tensor:
            return tensors[name].to(self.device)

        def linear(name: str):
            kind = layout[name]["kind"]
            if kind == "int4":
                planes = [(tensors[f"{name}.{j}.packed"], tensors[f"{name}.{j}.scales"])
                          for j in range(layout[name]["planes"])]
                return Int4Linear.from_packed(planes, layout[name]["out"])
            if kind == "fp16":
                return Fp16Linear(tensors[f"{name}.fp16"])
            if kind == "blocks":
                return BlockLinear(tensors[f"{name}.tiles"], layout[name]["format"], layout[name]["out"])
            if kind == "tied":
                return DenseLinear(self.embed.weight.t())
            return DenseLinear(tensor(name))

        if layout["embed"]["kind"] == "quantized":
            self.embed = QuantizedEmbedding(tensors["embed.codes"], tensors["embed.scale"], tensors["embed.zero"])
        else:
            self.embed = DenseEmbedding(tensor("embed"))
        self.layers = [_Layer(attn_norm=tensor(f"layers.{i}.attn_norm"),
                              ffn_norm=tensor(f"layers.{i}.ffn_norm"),
                              **{n: linear(f"layers.{i}.{n}") for n in _Layer.LINEARS})
                       for i in range(config.num_layers)]
        self.norm = tensor("norm")
        self.lm_head = linear("lm_head")
        self.freq_factors = tensors.get("rope_freqs")
        self._finish()
        return self

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def packed(self) -> bool:
        """Whether any matrix runs on the file's codes (torch's int4 kernel or the compiled kernels)."""
        return any(isinstance(m, Int4Linear | BlockLinear) for m in self.linears())

    def linears(self) -> list:
        """Every linear map a decode step applies, the output projection last."""
        return [m for layer in self.layers for m in layer.linears()] + [self.lm_head]

    @property
    def batch_size(self) -> int:
        return self._k.shape[1]

    # -- cache ------------------------------------------------------------------------
    def _reset_cache(self, batch: int, capacity: int) -> None:
        c = self.config
        shape = (c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim)
        self._k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._layer_views()
        self._len = 0                                       # columns filled (same for every row)
        self._set_pad(torch.zeros(batch, dtype=torch.long, device=self.device))

    def _set_pad(self, pad: torch.Tensor) -> None:
        """Left pad per row, and the runs ``(first row, end row, pad)`` of consecutive rows with the
        same pad that one attention call serves (each row attends to exactly its own keys)."""
        self._pad = pad
        runs: list[tuple[int, int, int]] = []
        for b, p in enumerate(pad.tolist()):
            if runs and runs[-1][2] == p:
                runs[-1] = (runs[-1][0], b + 1, p)
            else:
                runs.append((b, b + 1, p))
        self._runs = runs

    def _layer_views(self) -> None:
        # Per-layer views made once per (re)allocation, not once per step.
        self._k_layers = list(self._k.unbind(0))
        self._v_layers = list(self._v.unbind(0))

    def _ensure_capacity(self, needed: int) -> None:
        cap = self._k.shape[3]
        if needed <= cap:
            return
        if needed > self.max_context:
            raise GenerationError(f"sequence of {needed} tokens exceeds the context of {self.max_context}")
        new_cap = min(self.max_context, max(needed, 2 * cap, _CACHE_CHUNK))
        grow = new_cap - cap
        k_pad = self._k.new_zeros(*self._k.shape[:3], grow, self._k.shape[4])
        self._k = torch.cat([self._k, k_pad], dim=3)
        self._v = torch.cat([self._v, k_pad], dim=3)
        self._layer_views()

    def select_rows(self, keep: Sequence[int]) -> None:
        """Row ``j`` becomes old row ``keep[j]`` (repeats duplicate a row's cache).

        Only the filled columns are copied: compaction costs what the rows hold, not the capacity.
        Columns that are padding in every kept row (left of the smallest pad, e.g. after the
        longest row left) are dropped, so a batch that rows keep joining and leaving
        (:meth:`join`) holds only as many columns as its longest row. Positions are unchanged:
        a row's position is ``column - pad`` and both shift alike.
        """
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.batch_size):
            raise IndexError(f"select_rows: index out of range for batch of {self.batch_size}")
        if not idx.numel():
            self._reset_cache(0, 0)
            return
        pad = self._pad.index_select(0, idx)
        m = int(pad.min())
        n = self._len
        k = self._k.new_zeros(self._k.shape[0], idx.numel(), *self._k.shape[2:])
        v = torch.zeros_like(k)
        k[:, :, :, :n - m] = self._k[:, :, :, m:n].index_select(1, idx)
        v[:, :, :, :n - m] = self._v[:, :, :, m:n].index_select(1, idx)
        self._k, self._v = k, v
        self._len = n - m
        self._set_pad(pad - m)
        self._layer_views()

    @torch.inference_mode()
    def join(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False
             ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Prefill ``prompts`` as new rows after the current ones (continuous batching).

        The cache stays left-padded with one shared length ``T = max(t, L_i)`` (``t`` the current
        length): when a new prompt is longer than ``t`` the old rows get ``T - t`` more columns
        of left padding (their positions ``column - pad`` do not change). Each new prompt is
        prefilled on its own exactly as :meth:`prefill` does, so a joined row's cache and
        logits are the bits it gets alone. Returns the new rows' logits as :meth:`prefill` does.

        Atomic: if it raises, the running rows are as they were (the old cache tensors are never
        written; the new ones are dropped), so a continuous batch can go on without the new rows.
        """
        if self.batch_size == 0:
            return self.prefill(prompts, keep_all_logits=keep_all_logits)
        before = (self._k, self._v, self._pad, self._len)
        try:
            return self._join(prompts, keep_all_logits)
        except BaseException:
            self._k, self._v, pad, self._len = before
            self._layer_views()
            self._set_pad(pad)
            raise

    def _join(self, prompts: Sequence[Sequence[int]], keep_all_logits: bool
              ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        lengths = self._check_prompts(prompts)
        old, t = self.batch_size, self._len
        L = max(t, *lengths)
        shift = L - t
        cap = min(self.max_context, max(self._k.shape[3] + shift, L + _CACHE_CHUNK))
        shape = (self._k.shape[0], old + len(lengths), self._k.shape[2], cap, self._k.shape[4])
        k = self._k.new_zeros(shape)
        v = torch.zeros_like(k)
        k[:, :old, :, shift:L] = self._k[:, :, :, :t]
        v[:, :old, :, shift:L] = self._v[:, :, :, :t]
        self._k, self._v = k, v
        self._layer_views()
        new_pad = torch.tensor([L - n for n in lengths], dtype=torch.long, device=self.device)
        self._set_pad(torch.cat([self._pad + shift, new_pad]))
        self._len = L
        return self._fill(prompts, lengths, old, L, keep_all_logits)

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        lengths = [len(p) for p in prompts]
        if not lengths:
            raise GenerationError("prefill needs at least one prompt")
        if min(lengths) == 0:
            raise GenerationError("every prompt needs at least one token")
        if max(lengths) > self.max_context:
            raise GenerationError(f"prompt of {max(lengths)} tokens exceeds the context of {self.max_context}")
        return lengths

    # -- compute ----------------------------------------------------------------------
    def _rotate(self, qkv: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the rotary embedding to the q and k parts of ``qkv`` ``[B, L, n]`` in one
        complex multiply; ``rope`` is ``[B, L, 1, D/2]``. Returns q ``[B,L,H,D]``, k ``[B,L,KVH,D]``."""
        B, L, _ = qkv.shape
        c = self.config
        qk = qkv[..., :self._n_qk].float().reshape(B, L, c.num_heads + c.num_kv_heads, c.head_dim // 2, 2)
        qk = torch.view_as_real(torch.view_as_complex(qk) * rope).flatten(3).to(self.dtype)
        return qk[:, :, :c.num_heads], qk[:, :, c.num_heads:]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run every prompt and fill a fresh, left-padded cache.

        Returns ``last`` (``[B, V]`` float32, next-token logits) and, if asked, the logits at every
        prompt position of each row (``[L_i, V]``).

        Each prompt goes through the layers on its own (``[1, L_i]``, causal attention, no padding),
        so its logits and cache entries are exactly what it gets alone: batching prompts never
        changes a row (see the module docstring). The rows still share each layer's weights while
        they are hot in cache (layer-outer, row-inner loop), and a packed matrix's transient
        bfloat16 copy is made once per layer for all the rows that use it.
        """
        lengths = self._check_prompts(prompts)
        B, L = len(prompts), max(lengths)
        self._reset_cache(B, min(self.max_context, L + _CACHE_CHUNK))
        self._set_pad(torch.tensor([L - n for n in lengths], dtype=torch.long, device=self.device))
        self._len = L
        return self._fill(prompts, lengths, 0, L, keep_all_logits)

    def _fill(self, prompts: Sequence[Sequence[int]], lengths: list[int], row0: int, L: int,
              keep_all_logits: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run each prompt on its own and write its keys/values right-aligned at columns
        ``[L - n, L)`` of cache rows ``row0, row0 + 1, ...``; the logits as :meth:`prefill` returns."""
        dev = self.device
        c = self.config
        hs = [self.embed(torch.as_tensor(list(p), dtype=torch.long, device=dev).view(1, -1), self.dtype)
              for p in prompts]                                             # [1, L_i, d] each
        ropes = [self._rope[:n].view(1, n, 1, -1) for n in lengths]
        dense = [n >= DENSE_ROWS for n in lengths]   # a row's own length picks its product path
        for i, layer in enumerate(self.layers):
            with dense_copies(layer.linears(), any(dense)):
                for b, n in enumerate(lengths):
                    h = hs[b]
                    x = F.rms_norm(h, (c.hidden_size,), layer.attn_norm, c.rms_norm_eps)
                    qkv = layer.wqkv(x, dense[b])
                    q, k = self._rotate(qkv, ropes[b])
                    v = qkv[..., self._n_qk:].view(1, n, c.num_kv_heads, c.head_dim)
                    k, v = k.transpose(1, 2), v.transpose(1, 2)             # [1, KVH, n, D]
                    self._k_layers[i][row0 + b:row0 + b + 1, :, L - n:L] = k
                    self._v_layers[i][row0 + b:row0 + b + 1, :, L - n:L] = v
                    a = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=True)
                    h = h + layer.wo(a.transpose(1, 2).reshape(1, n, self._n_q), dense[b])
                    hs[b] = h + self._mlp(layer, h, dense[b])

        with dense_copies([self.lm_head], keep_all_logits and any(dense)):
            hs = [F.rms_norm(h[0], (c.hidden_size,), self.norm, c.rms_norm_eps) for h in hs]
            last = torch.cat([self.lm_head(h[-1:], False) for h in hs]).float()
            every = [self.lm_head(h, dense[b]).float() for b, h in enumerate(hs)] if keep_all_logits else None
        return last, every

    def _mlp(self, layer: _Layer, h: torch.Tensor, dense: bool = False) -> torch.Tensor:
        c = self.config
        x = F.rms_norm(h, (c.hidden_size,), layer.ffn_norm, c.rms_norm_eps)
        gate, up = layer.w_gate_up(x, dense).chunk(2, dim=-1)
        return layer.w_down(F.silu(gate).mul_(up), dense)

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row and return the next-token logits ``[B, V]`` float32."""
        B = self.batch_size
        if next_ids.shape != (B,):
            raise ValueError(f"step expects {B} token ids (one per row), got shape {tuple(next_ids.shape)}")
        t = self._len
        self._ensure_capacity(t + 1)
        c = self.config
        kvh, d = c.num_kv_heads, c.head_dim

        positions = t - self._pad                                           # per-row rotary position
        h = self.embed(next_ids.to(self.device).view(B, 1), self.dtype)    # [B, 1, d]
        fused, eps = self._fused, c.rms_norm_eps
        rope = None if fused else self._rope[positions].view(B, 1, 1, -1)
        for i, layer in enumerate(self.layers):
            if fused:
                # The whole layer in four compiled calls (see blocks.py): norm + q/k/v product;
                # rotary + cache writes + attention; output product + residual; feed-forward + residual.
                qkv = blocks.norm_mm(h, layer.attn_norm, eps, layer.wqkv)
                a = blocks.attend_decode(qkv, c.num_heads, kvh, self._rope_real, positions, self._k_layers[i],
                                         self._v_layers[i], t, self._pad)
                blocks.mm_add(a, layer.wo, h)
                blocks.mlp(h, layer.ffn_norm, eps, layer.w_gate_up, layer.w_down)
                continue
            qkv = layer.wqkv(F.rms_norm(h, (c.hidden_size,), layer.attn_norm, eps), False)
            q, k = self._rotate(qkv, rope)
            k_cache, v_cache = self._k_layers[i], self._v_layers[i]
            k_cache[:, :, t] = k[:, 0]
            v_cache[:, :, t] = qkv[:, 0, self._n_qk:].view(B, kvh, d)
            # One query position: group the q heads that share a kv head as that head's
            # "queries", so GQA needs neither repeat_kv nor a causal mask.
            q = q.view(B, kvh, self._n_rep, d)
            # Each run of rows with the same pad attends to exactly its keys [pad, t]: a row's
            # softmax sums never see another row's padding (batch invariance).
            if not self.batch_invariant and len(self._runs) > 1:
                keys_ok = (torch.arange(t + 1, device=self.device) >= self._pad[:, None])[:, None, None, :]
                a = F.scaled_dot_product_attention(q, k_cache[:, :, :t + 1], v_cache[:, :, :t + 1], attn_mask=keys_ok)
            elif len(self._runs) > 1:
                a = torch.cat([_attend(q[b0:b1], k_cache[b0:b1, :, p:t + 1], v_cache[b0:b1, :, p:t + 1])
                               for b0, b1, p in self._runs])
            else:
                a = _attend(q, k_cache[:, :, self._runs[0][2]:t + 1], v_cache[:, :, self._runs[0][2]:t + 1])
            # reshape: on CUDA the attention output need not be contiguous.
            h.add_(layer.wo(a.reshape(B, 1, self._n_q), False))  # h is ours: add in place
            h.add_(self._mlp(layer, h))
        self._len = t + 1
        if fused and isinstance(self.lm_head, BlockLinear):
            return blocks.norm_mm(h[:, 0], self.norm, eps, self.lm_head)
        h = F.rms_norm(h[:, 0], (c.hidden_size,), self.norm, eps)
        return self.lm_head(h, False).float()


#: Canonical weight names the loaders produce (``{i}`` = layer index).
WEIGHT_NAMES = (
    "embed", "norm", "lm_head (optional: tied to embed)", "rope_freqs (optional)",
    "layers.{i}.attn_norm", "layers.{i}.wq", "layers.{i}.wk", "layers.{i}.wv", "layers.{i}.wo",
    "layers.{i}.ffn_norm", "layers.{i}.w_gate", "layers.{i}.w_up", "layers.{i}.w_down",
)
