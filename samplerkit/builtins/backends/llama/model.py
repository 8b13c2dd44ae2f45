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

Batches of prompts with different lengths are **left**-padded, so every row writes its next
token to the same cache column (one slice assignment per layer per step). Each row keeps its
own rotary positions (``column - pad``) and a key mask hides its pad columns, so padding never
changes a row's logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from samplerkit.builtins.backends.llama.config import LlamaConfig
from samplerkit.errors import GenerationError

# The cache grows in steps of this many positions (then doubles): a short generation does not
# pay for a max_context-sized cache, a long one reallocates O(log n) times.
_CACHE_CHUNK = 256


class _Layer:
    """One decoder block's weights, fused for fewer, larger matmuls and stored transposed
    (``[in, out]``): ``x @ W_t`` measured up to 2x faster than ``F.linear(x, W)`` for batch-8
    decode shapes with cache-resident weights on CPU, and never slower; in the full model, where
    weights stream from DRAM, the two are within noise."""

    __slots__ = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")

    def __init__(self, attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down):
        self.attn_norm = attn_norm
        self.wqkv = wqkv
        self.wo = wo
        self.ffn_norm = ffn_norm
        self.w_gate_up = w_gate_up
        self.w_down = w_down


def rope_inv_freq(config: LlamaConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """``theta ** (-2i / D)`` for ``i < D/2`` in float32, computed as HF does; optionally divided by
    per-frequency factors (GGUF ``rope_freqs.weight``; Llama 3 long-context scaling)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    return inv_freq


class LlamaModel:
    """Weights, rotary table and KV cache of one Llama decoder; see the module docstring.

    ``weights`` uses this package's canonical names (see :data:`WEIGHT_NAMES`), Q/K in the
    interleaved rotary layout. They are moved to ``device``/``dtype`` and fused here; the dict
    is consumed (entries are popped) so the unfused copies can be freed as we go.
    """

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_context: int | None = None):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_context = int(max_context or config.max_position)

        def take(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=self.device, dtype=dtype).contiguous()

        def fuse_t(*names: str) -> torch.Tensor:
            # [W1; W2; ...]^T written in one copy: cat of the transposed views along dim 1.
            parts = [weights.pop(n).to(device=self.device, dtype=dtype) for n in names]
            return torch.cat([w.t() for w in parts], dim=1)

        self.embed = take("embed")
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            self.layers.append(_Layer(
                attn_norm=take(p + "attn_norm"),
                wqkv=fuse_t(p + "wq", p + "wk", p + "wv"),
                wo=fuse_t(p + "wo"),
                ffn_norm=take(p + "ffn_norm"),
                w_gate_up=fuse_t(p + "w_gate", p + "w_up"),
                w_down=fuse_t(p + "w_down"),
            ))
        self.norm = take("norm")
        self.lm_head = take("lm_head") if "lm_head" in weights else self.embed
        freq_factors = weights.pop("rope_freqs", None)

        # Rotary table as unit complex numbers e^{i * pos * inv_freq}, float32 like HF's cos/sin.
        inv_freq = rope_inv_freq(config, freq_factors)
        angles = torch.outer(torch.arange(self.max_context, dtype=torch.float32), inv_freq)
        self._rope = torch.polar(torch.ones_like(angles), angles).to(self.device)  # [T, D/2] complex64

        self._n_q = config.num_heads * config.head_dim
        self._n_qk = (config.num_heads + config.num_kv_heads) * config.head_dim
        self._n_rep = config.num_heads // config.num_kv_heads
        self._reset_cache(0, 0)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]

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
        self._pad = torch.zeros(batch, dtype=torch.long, device=self.device)  # left pad per row
        self._key_ok = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)
        self._any_pad = False

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
        self._key_ok = torch.cat([self._key_ok, self._key_ok.new_ones(self._key_ok.shape[0], grow)], dim=1)
        self._layer_views()

    def select_rows(self, keep: Sequence[int]) -> None:
        """Row ``j`` becomes old row ``keep[j]`` (repeats duplicate a row's cache).

        Only the filled columns are copied: compaction costs what the rows hold, not the capacity.
        """
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.batch_size):
            raise IndexError(f"select_rows: index out of range for batch of {self.batch_size}")
        n = self._len
        k = self._k.new_zeros(self._k.shape[0], idx.numel(), *self._k.shape[2:])
        v = torch.zeros_like(k)
        k[:, :, :, :n] = self._k[:, :, :, :n].index_select(1, idx)
        v[:, :, :, :n] = self._v[:, :, :, :n].index_select(1, idx)
        self._k, self._v = k, v
        self._pad = self._pad.index_select(0, idx)
        self._key_ok = self._key_ok.index_select(0, idx)
        self._any_pad = bool(self._pad.any()) if idx.numel() else False
        self._layer_views()

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
        """Run all prompts in one left-padded batch and fill a fresh cache.

        Returns ``last`` (``[B, V]`` float32, next-token logits) and, if asked, the logits at every
        prompt position of each row (``[L_i, V]``).
        """
        lengths = [len(p) for p in prompts]
        if not lengths:
            raise GenerationError("prefill needs at least one prompt")
        if min(lengths) == 0:
            raise GenerationError("every prompt needs at least one token")
        B, L = len(prompts), max(lengths)
        if L > self.max_context:
            raise GenerationError(f"prompt of {L} tokens exceeds the context of {self.max_context}")
        self._reset_cache(B, min(self.max_context, L + _CACHE_CHUNK))
        dev = self.device

        pad = torch.tensor([L - n for n in lengths], dtype=torch.long, device=dev)
        ids = torch.zeros(B, L, dtype=torch.long, device=dev)  # pad id 0: any valid row works
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        col = torch.arange(L, device=dev)
        key_ok = col[None, :] >= pad[:, None]                               # [B, L]
        self._pad = pad
        self._key_ok[:, :L] = key_ok
        self._any_pad = bool(pad.any())
        positions = (col[None, :] - pad[:, None]).clamp_(min=0)            # [B, L]
        rope = self._rope[positions].unsqueeze(2)                           # [B, L, 1, D/2]

        # Causal mask plus the row's pad columns; a pad query still sees itself so its softmax
        # is finite (its output is never used, and its key is masked for real queries).
        causal = col[None, :] <= col[:, None]                               # [L, L] query x key
        mask = (causal[None] & key_ok[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)[None]
        mask = mask[:, None]                                                # [B, 1, L, L]

        c = self.config
        h = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(h, (c.hidden_size,), layer.attn_norm, c.rms_norm_eps)
            qkv = torch.matmul(x, layer.wqkv)
            q, k = self._rotate(qkv, rope)
            v = qkv[..., self._n_qk:].view(B, L, c.num_kv_heads, c.head_dim)
            k, v = k.transpose(1, 2), v.transpose(1, 2)                     # [B, KVH, L, D]
            self._k_layers[i][:, :, :L] = k
            self._v_layers[i][:, :, :L] = v
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
            h = h + torch.matmul(a.transpose(1, 2).reshape(B, L, self._n_q), layer.wo)
            h = h + self._mlp(layer, h)
        self._len = L

        h = F.rms_norm(h, (c.hidden_size,), self.norm, c.rms_norm_eps)
        last = F.linear(h[:, -1], self.lm_head).float()
        every = None
        if keep_all_logits:
            every = [F.linear(h[b, L - n:], self.lm_head).float() for b, n in enumerate(lengths)]
        return last, every

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = F.rms_norm(h, (c.hidden_size,), layer.ffn_norm, c.rms_norm_eps)
        gate, up = torch.matmul(x, layer.w_gate_up).chunk(2, dim=-1)
        return torch.matmul(F.silu(gate).mul_(up), layer.w_down)

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

        rope = self._rope[t - self._pad].view(B, 1, 1, -1)                 # per-row position
        mask = self._key_ok[:, None, None, :t + 1] if self._any_pad else None
        h = F.embedding(next_ids.to(self.device).view(B, 1), self.embed)   # [B, 1, d]
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(h, (c.hidden_size,), layer.attn_norm, c.rms_norm_eps)
            qkv = torch.matmul(x, layer.wqkv)
            q, k = self._rotate(qkv, rope)
            k_cache, v_cache = self._k_layers[i], self._v_layers[i]
            k_cache[:, :, t] = k[:, 0]
            v_cache[:, :, t] = qkv[:, 0, self._n_qk:].view(B, kvh, d)
            # One query position: group the q heads that share a kv head as that head's
            # "queries", so GQA needs neither repeat_kv nor a causal mask.
            q = q.view(B, kvh, self._n_rep, d)
            a = F.scaled_dot_product_attention(q, k_cache[:, :, :t + 1], v_cache[:, :, :t + 1], attn_mask=mask)
            # reshape: on CUDA the attention output need not be contiguous.
            h.add_(torch.matmul(a.reshape(B, 1, self._n_q), layer.wo))  # h is ours: add in place
            h.add_(self._mlp(layer, h))
        self._len = t + 1
        h = F.rms_norm(h[:, 0], (c.hidden_size,), self.norm, c.rms_norm_eps)
        return F.linear(h, self.lm_head).float()


#: Canonical weight names the loaders produce (``{i}`` = layer index).
WEIGHT_NAMES = (
    "embed", "norm", "lm_head (optional: tied to embed)", "rope_freqs (optional)",
    "layers.{i}.attn_norm", "layers.{i}.wq", "layers.{i}.wk", "layers.{i}.wv", "layers.{i}.wo",
    "layers.{i}.ffn_norm", "layers.{i}.w_gate", "layers.{i}.w_up", "layers.{i}.w_down",
)
