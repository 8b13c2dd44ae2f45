"""Candidate lists: the sort-free fast path of truncation pipelines.

After a truncation keeps few tokens, a row is fully described by its candidates: ``values``
``[B, K]`` (sorted descending, ``-inf`` for unused slots) and their token ``ids`` ``[B, K]``
(an unused slot's id may repeat another slot's); every other token is ``-inf``. Steps after that work on ``K`` columns instead of ``V``
(top_k 50 then top_p sorts 50 numbers, not 128k), and :func:`densify` turns the list back
into ``[B, V]`` logits that are identical to what the dense path produces.
"""

from __future__ import annotations

import torch

from samplerkit.ops import _triton
from samplerkit.ops.truncation import NEG_INF, exp_weights, largest, nucleus_threshold, safe_top


def densify(values: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` logits: ``values`` at ``ids``, ``-inf`` elsewhere."""
    out = torch.full((values.shape[0], vocab_size), NEG_INF, dtype=values.dtype, device=values.device)
    # amax, not a plain scatter: an unused slot (-inf) may repeat a used slot's id.
    return out.scatter_reduce_(-1, ids, values, reduce="amax")


def top_k_candidates(logits: torch.Tensor, k: torch.Tensor, k_max: int, transform=None):
    """The top ``k[b]`` logits of each row as a candidate list, or ``None`` when a row has a tie
    at its ``k``-th value (then only the dense path applies the lower-id tie rule exactly).

    One ``topk(k_max + 1)``: the extra column reveals boundary ties for free. ``transform``
    (values, ids) -> values is an order-preserving elementwise map that the pipeline deferred
    (temperature before top_k): it is applied to the ``k + 1`` selected values only, and the tie
    check runs on the transformed values, so the result equals top_k of the transformed logits
    exactly (a map that merges the ``k``-th and ``(k+1)``-th values makes a tie: dense path).
    """
    vocab = logits.shape[-1]
    width = min(k_max + 1, vocab)
    values, ids = largest(logits, width)
    if transform is not None:
        values = transform(values, ids)
    k_eff = k.clamp(min=1, max=width)
    if width > k_max:            # there is a (k+1)-th value to compare with
        kth = values.gather(-1, (k_eff - 1).unsqueeze(-1))
        nxt = values.gather(-1, k_eff.clamp(max=width - 1).unsqueeze(-1))
        tie = (kth == nxt) & (k_eff < width).unsqueeze(-1) & torch.isfinite(kth)
        if bool(tie.any()):
            return None
    column = torch.arange(width, device=logits.device)
    values = values.masked_fill(column >= k_eff.unsqueeze(-1), NEG_INF)
    return values[:, :k_max], ids[:, :k_max]


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ``(order(x) << 32) + (2^32 - 1 - id)`` of float32 ``x`` ``[B, V]``: larger keys
    are larger values and, among equal values, lower ids (see :func:`top_k_candidates_keyed`)."""
    bits = (x + 0.0).view(torch.int32)                 # + 0.0: -0.0 becomes +0.0
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (order.to(torch.int64) << 32) + ((1 << 32) - 1 - torch.arange(x.shape[-1], device=x.device))


def top_k_candidates_keyed(logits: torch.Tensor, k: torch.Tensor, k_max: int, transform=None,
                           divisor: torch.Tensor | None = None):
    """The top ``k[b]`` logits of each row as a candidate list, exact under the lower-id tie rule
    with no host check (the sync-free path, see :mod:`samplerkit.ops.sync`).

    One ``topk`` over int64 keys ``(order(x) << 32) + (2^32 - 1 - id)``: ``order`` maps float32
    bits to int32 monotonically (negative floats flip their magnitude bits; ``-0.0`` is
    ``+0.0`` first, as they compare equal), so the largest keys are the largest logits and, among
    equal logits, the lowest ids: the very set :func:`samplerkit.ops.top_k_mask` keeps.
    ``transform`` (values, ids) -> values is a deferred order-preserving map (temperature): keys
    are built from the transformed logits, so ties it creates follow the same rule, and only the
    selected values are transformed again for the list (the same elementwise result). With
    Triton on CUDA, :func:`samplerkit.ops._triton.top_k_candidates` selects the same list
    without the ``topk`` over ``[B, V]`` keys (``k_max <= 256``, ``V <= 2^18``; ``divisor``: the
    transform is ``x / divisor`` with saturation, fused into its kernels); otherwise, with
    ``divisor``, one fused kernel builds the keys without writing the divided logits.
    """
    vocab = logits.shape[-1]
    width = min(max(k_max, 1), vocab)
    fusable = transform is None or divisor is not None       # nothing deferred, or only the division
    if fusable and _triton.available(logits) and _triton.fused_top_k_supported(vocab, k_max):
        return _triton.top_k_candidates(logits, k, k_max, divisor)
    if divisor is not None and _triton.available(logits):
        keys = _triton.topk_keys(logits, divisor)
    else:
        source = logits
        if transform is not None:
            source = transform(logits.clone(), torch.arange(vocab, device=logits.device).expand_as(logits))
        keys = order_keys(source)
    top = keys.topk(width, dim=-1).values
    ids = ((1 << 32) - 1) - (top & 0xFFFFFFFF)
    values = logits.gather(-1, ids)
    if transform is not None:
        values = transform(values, ids)
    k_eff = k.clamp(min=1, max=width)
    values = values.masked_fill(torch.arange(width, device=logits.device) >= k_eff.unsqueeze(-1), NEG_INF)
    return values, ids


def top_k_candidates_repaired(logits: torch.Tensor, k: torch.Tensor, k_max: int, transform=None,
                              divisor: torch.Tensor | None = None):
    """:func:`top_k_candidates_keyed` with a float32 ``topk`` (half the key bytes, half the
    radix passes) and the tie rule restored on the device, still without a host check.

    ``topk(k + 1)`` gives the ``k``-th value ``t`` of each row; the tokens above ``t`` are
    among the first ``k`` candidates whatever ``topk`` did with ties, and the remaining
    ``k - #above`` slots go to the tokens equal to ``t`` with the lowest ids: a running count
    of ``x == t`` along the row and a ``searchsorted`` for counts ``1, 2, ...`` find them. NaN
    ranks above everything, as in ``topk``. The same set and values as the keyed selection
    (unused slots may repeat an id).
    """
    vocab = logits.shape[-1]
    width = min(max(k_max, 1) + 1, vocab)
    k_eff = k.clamp(min=1, max=min(max(k_max, 1), vocab))
    if divisor is not None and _triton.available(logits):
        source = _triton.divide(logits, divisor)
    elif transform is not None:
        source = transform(logits.clone(), torch.arange(vocab, device=logits.device).expand_as(logits))
    else:
        source = logits
    values, ids = source.topk(width, dim=-1)
    kth = values.gather(-1, (k_eff - 1).unsqueeze(-1))
    above = ((values > kth) | values.isnan()).sum(-1, keepdim=True)             # all within the first k
    count = torch.eq(source, kth).to(torch.int32).cumsum(-1, dtype=torch.int32)  # ties seen so far, by id
    slots = min(max(k_max, 1), vocab)
    column = torch.arange(slots, device=logits.device)
    wanted = (column - above + 1).clamp_(min=1).to(torch.int32)                 # which tie each slot takes
    tied = torch.searchsorted(count, wanted).clamp_(max=vocab - 1)
    ids = torch.where(column < above, ids[:, :slots], tied)
    values = source.gather(-1, ids)
    values = values.masked_fill(column >= k_eff.unsqueeze(-1), NEG_INF)
    return values, ids


def top_p_on_sorted(values: torch.Tensor, p: torch.Tensor, stats=None) -> torch.Tensor:
    """Nucleus threshold on candidates already sorted descending: returns the kept mask ``[B, K]``.

    ``stats`` is ``(top, total)`` of the whole row (:func:`samplerkit.ops.truncation.nucleus_stats`);
    when the candidates hold every finite logit they are the candidates' own and may be omitted.
    """
    if stats is None:
        top = safe_top(values)
        # Summed in float64 and rounded once: the float32 total does not depend on the order of
        # the sum (:func:`samplerkit.ops._triton.top_p_candidates_` sums in another order).
        stats = (top, exp_weights(values, top).double().sum(dim=-1, keepdim=True).float())
    threshold, _ = nucleus_threshold(values, *stats, p)
    return values >= threshold
