"""Temperature scaling."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.context import StepContext
from samplerkit.fastpath import FastPathProcessor
from samplerkit.ops import NEG_INF
from samplerkit.ops.histogram import column_chunks
from samplerkit.ops.sync import sync_free
from samplerkit.params import StepParams

#: Temperatures below this are treated as 0 (greedy).
GREEDY_BELOW = 1e-5
_FLOAT32_MAX = torch.finfo(torch.float32).max


def finite_division(x: torch.Tensor, divisor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x / divisor`` into ``out`` (may be ``x``), saturating at the float32 range where a finite
    logit overflows: a finite logit never becomes ``inf`` (its row's softmax would be NaN), while
    ``-inf`` (removed) and ``+inf`` inputs (invalid, reported later) stay what they were.
    The usual case costs one cheap read pass (each row's sum is finite)."""
    was_infinite = torch.isinf(x) if out is x else None    # x is about to be overwritten
    quotient = torch.div(x, divisor, out=out)
    if sync_free(x):                      # no host check: the saturation is selected on the device
        if was_infinite is None:
            was_infinite = torch.isinf(x)
        overflow = torch.isinf(quotient) & ~was_infinite
        return torch.where(overflow, torch.copysign(quotient.new_full((), _FLOAT32_MAX), quotient), quotient,
                           out=quotient)
    # A finite row sum means no infinite quotient (one cheap pass; a sum that overflows or a
    # row with -inf logits takes the exact check). Not isfinite().all(): CPU bool reductions
    # are several times slower.
    if bool(torch.isfinite(quotient.sum(dim=-1)).all()):
        return quotient
    if bool(torch.isfinite(quotient.amax(dim=-1)).all() & torch.isfinite(quotient.amin(dim=-1)).all()):
        return quotient
    if out is not x and _no_overflow(x, quotient):
        return quotient
    if was_infinite is None:
        was_infinite = torch.isinf(x)
    overflow = torch.isinf(quotient) & ~was_infinite
    quotient.masked_fill_(overflow & (quotient > 0), _FLOAT32_MAX)
    return quotient.masked_fill_(overflow & (quotient < 0), -_FLOAT32_MAX)


def _no_overflow(x: torch.Tensor, quotient: torch.Tensor) -> bool:
    """True if no finite ``x`` became an infinite ``quotient = x / d`` (``d > 0``), for rows with
    ``-inf`` logits (a truncation ran before). ``q - x`` is finite for finite ``x`` and ``q``
    (same signs, ``|q - x| <= max(|q|, |x|)``), NaN where ``x`` is infinite (``inf - inf``) or
    NaN, and infinite exactly where a finite ``x`` overflowed; ``nansum`` skips the NaNs. A sum
    that overflows only sends the row to the exact check. One pass in column chunks (cached),
    against the exact check's bool masks and ``masked_fill_`` (58% of a B = 64, V = 128256
    ``min_p -> temperature`` step in a profile, before that chain skipped the check)."""
    for cols in column_chunks(x):
        if not bool(torch.isfinite(torch.nansum(quotient[:, cols] - x[:, cols], dim=-1)).all()):
            return False
    return True


class Temperature(FastPathProcessor):
    """Divide logits by a temperature: ``x_i / T``, so ``p_i ∝ exp(x_i / T)``.

    ``T < 1`` sharpens, ``T > 1`` flattens, ``T = 1`` is neutral. ``T = 0`` means greedy for
    that row: only the highest logit is kept (the lowest token id among ties), as in vLLM and
    llama.cpp (transformers raises instead). Temperatures below ``1e-5`` are greedy too (as
    vLLM's clamp); above that, a finite logit whose quotient would overflow float32 saturates at
    the largest finite value instead of becoming ``inf``. Usually followed by ``top_k``/``top_p``/``min_p``
    (transformers and vLLM order) or placed last (llama.cpp order).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> step = Temperature([Temperature.Params(temperature=0.5), Temperature.Params(temperature=0.0)])
    >>> step.apply(torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0]]), StepContext(2))
    tensor([[2., 4., 4.],
            [-inf, 2., -inf]])
    """

    name = "temperature"
    rescales = True
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    argmax_invariant = True

    class Params(StepParams):
        temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 1 is neutral, 0 means greedy")

    @classmethod
    def kept_at_most(cls, params):
        return 1 if params.temperature < GREEDY_BELOW else None       # greedy rows keep one token

    def reference(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Slow and plain (``samplerkit verify`` checks :meth:`apply` against it): ``x / T`` in
        float64; a greedy row keeps only its first highest logit."""
        out = logits.clone()
        for b in range(logits.shape[0]):
            t = float(self.p.temperature[b])
            if t < GREEDY_BELOW:
                top = int(logits[b].argmax())
                out[b] = NEG_INF
                out[b, top] = logits[b, top]
            else:
                q = (logits[b].double() / t).float()          # a finite logit saturates, -inf stays
                out[b] = torch.where(torch.isinf(q) & torch.isfinite(logits[b]), q.clamp(-_FLOAT32_MAX, _FLOAT32_MAX), q)
        return out

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        t = self.p.temperature
        greedy = t < GREEDY_BELOW
        self._any_greedy = bool(greedy.any())
        self._greedy = greedy.unsqueeze(-1)
        # Greedy rows divide by 1 (their other logits are masked below).
        self._divisor = torch.where(greedy, torch.ones_like(t), t).unsqueeze(-1)
        # Division by a positive number never reverses an order: deferrable past top_k.
        self.monotone = not self._any_greedy

    def fused_divisor(self) -> torch.Tensor | None:
        # What the deferred step computes, for kernels that fuse it: ``x / divisor`` per row.
        return self._divisor if self.monotone else None

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.apply_into(logits, logits, ctx)

    def apply_into(self, logits: torch.Tensor, out: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        logits = finite_division(logits, self._divisor, out)   # one pass, no separate copy
        if self._any_greedy:
            top = logits.argmax(dim=-1, keepdim=True)
            is_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
            logits = logits.masked_fill_(self._greedy & ~is_top, NEG_INF)
        return logits

    def apply_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        values = finite_division(values, self._divisor, values)   # T > 0 keeps the descending order
        if self._any_greedy:
            # Among candidates tied with the top value, the lowest token id survives.
            tied = values == values[:, :1]
            winner = torch.where(tied, ids, torch.full_like(ids, torch.iinfo(ids.dtype).max)).argmin(-1, keepdim=True)
            is_top = torch.zeros_like(values, dtype=torch.bool).scatter_(-1, winner, True)
            values = values.masked_fill_(self._greedy & ~is_top, NEG_INF)
            # Keep the survivor first so the list stays sorted descending.
            order = torch.where(self._greedy, (~is_top).to(torch.int8), torch.zeros_like(is_top, dtype=torch.int8))
            perm = order.argsort(dim=-1, stable=True)
            values = values.gather(-1, perm)
            ids.copy_(ids.gather(-1, perm))
        return values
