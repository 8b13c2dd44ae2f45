"""Truncation masks: which tokens a row keeps. ``True`` = kept.

Tie rules (documented, tested):
- ``top_k`` keeps exactly ``k`` tokens; among equal logits at the boundary the lower token
  ids win. So ``top_k = 1`` is exactly greedy (``argmax`` also returns the first maximum).
- ``top_p`` and ``min_p`` are thresholds on the value: a token tied with a kept token is kept.

All masks are computed for every row; callers restrict them to active rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from samplerkit.ops import histogram
from samplerkit.ops.sync import sync_free

NEG_INF = float("-inf")

# Partial selection size for top_p: rows whose top candidates already hold mass p (the
# usual case for real models) never pay for a full-vocabulary sort.
TOP_P_CANDIDATES = 256


def top_k_mask(logits: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Keep the ``k[b]`` highest logits of row ``b`` (``k[b] >= V`` keeps all).

    ``k_max`` is the host-side maximum of ``k`` (known when parameters are packed), so no
    device sync is needed to size the selection.

    >>> x = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    >>> top_k_mask(x, torch.tensor([2]), 2)
    tensor([[False,  True,  True, False]])
    >>> top_k_mask(x, torch.tensor([1]), 1)   # tie at the top: the lower id wins
    tensor([[False,  True, False, False]])
    """
    vocab = logits.shape[-1]
    k_sel = min(max(k_max, 1), vocab)
    kth = largest(logits, k_sel)[0]
    k_eff = k.clamp(min=1, max=k_sel)
    threshold = kth.gather(-1, (k_eff - 1).unsqueeze(-1))                   # [B, 1]
    above = logits > threshold
    at = logits == threshold
    # Tokens equal to the threshold fill the remaining slots, lowest ids first.
    # (int32 sums: a bool reduction with the default int64 result is ~6x slower on CPU)
    slots = k_eff.unsqueeze(-1) - above.sum(-1, keepdim=True, dtype=torch.int32)   # >= 1
    if bool((at.sum(-1, keepdim=True, dtype=torch.int32) > slots).any()):
        rank_among_ties = at.to(torch.int32).cumsum(-1)
        at = at & (rank_among_ties <= slots)
    return above | at


# Groups of consecutive logits whose maxima preselect the candidates of :func:`largest` on CPU.
_GROUP = 32


def largest(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of each row, sorted descending, and their ids: the values of
    ``logits.topk(k)`` exactly (among tied values any of the tied ids, as ``topk``'s own order
    is unspecified there).

    On CPU, when the row has at least ``4 k`` groups of 32 logits, the candidates come from the
    ``k`` groups with the largest maxima. Why that is exact, with ``v`` the ``k``-th largest value
    and ``c < k`` logits above it: those ``c`` lie in the at most ``c`` groups whose maximum is
    above ``v``, which rank first; the groups ranked next have maximum ``v`` and hold at least one
    logit equal to ``v`` each, so the chosen groups hold either all of those groups or ``k - c``
    or more logits equal to ``v``. Either way the ``k`` largest of the ``32 k`` candidates (plus
    the short last group) are the row's. Two to three times faster than one ``topk`` over the
    vocabulary here.
    """
    rows, vocab = logits.shape
    n_groups = vocab // _GROUP
    if logits.device.type != "cpu" or n_groups < 4 * k:
        return logits.topk(k, dim=-1)
    full = n_groups * _GROUP
    maxima = logits[:, :full].unflatten(-1, (n_groups, _GROUP)).amax(-1)
    groups = maxima.topk(k, dim=-1, sorted=False).indices
    ids = (groups.unsqueeze(-1) * _GROUP + torch.arange(_GROUP, device=logits.device)).flatten(1)
    if full < vocab:
        ids = torch.cat([ids, torch.arange(full, vocab, device=logits.device).expand(rows, -1)], dim=-1)
    values, position = logits.gather(-1, ids).topk(k, dim=-1)
    return values, ids.gather(-1, position)


def top_p_mask(logits: torch.Tensor, p: torch.Tensor, work: dict | None = None) -> torch.Tensor:
    """Nucleus: keep the smallest set of highest-probability tokens whose mass reaches ``p``
    (plus any token tied with the last one kept).

    With the row's weights ``w_i`` (:func:`nucleus_stats`) sorted by logit, descending, token
    ``j`` is kept iff the weight strictly before it is below ``p`` times the total:
    ``sum_{i<j} w_(i) < p * W`` (float64 sums of float32 weights). No full sort in the common case
    (:func:`top_p_threshold`); the result equals :func:`top_p_mask_reference`.

    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> top_p_mask(x, torch.tensor([0.8]))
    tensor([[ True,  True, False, False]])
    >>> top_p_mask(x, torch.tensor([0.81]))
    tensor([[ True,  True,  True, False]])
    """
    return logits >= top_p_threshold(logits, p, work=work)


# Tokens more than this many nats below the row maximum weigh exp(-87) (just above float32's
# smallest normal number) instead of less: a difference below float64's resolution of a total
# >= 1, and it keeps exp off the subnormal range, where x86 runs it tens of times slower.
EXP_FLOOR = -87.0
# The nucleus histogram's last bin holds exactly the tokens at the floor (all weigh exp(-87)).
assert histogram.BINS == -EXP_FLOOR * histogram.SCALE


def exp_weights(logits: torch.Tensor, top: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w = exp(max(x - top, -87))`` in float32 (``out`` may be a workspace or ``None``).

    An elementwise function of each logit alone, so a candidate list and the dense row get
    bit-identical weights for the same token. Into a workspace on CPU it runs one column chunk at
    a time: each chunk's three passes stay in cache (the step is memory-bound there)."""
    if out is None:
        return torch.sub(logits, top).clamp_(min=EXP_FLOOR).exp_()
    for cols in histogram.column_chunks(logits):
        torch.sub(logits[:, cols], top, out=out[:, cols]).clamp_(min=EXP_FLOOR).exp_()
    return out


def safe_top(logits: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """Row maxima ``[B, 1]`` with ``+-inf`` replaced by 0 (as ``torch.logsumexp`` does)."""
    top = logits.amax(dim=-1, keepdim=True) if row_max is None else row_max
    return torch.where(torch.isinf(top), torch.zeros_like(top), top)


class Stats(NamedTuple):
    """A row's weights: ``top`` (:func:`safe_top`), ``weights = exp_weights(x, top)`` ``[B, V]``
    (the top token weighs 1), their float32 sum ``total`` and the raw ``row_max`` (NaN, +-inf kept)."""
    top: torch.Tensor
    weights: torch.Tensor
    total: torch.Tensor
    row_max: torch.Tensor


def nucleus_stats(logits: torch.Tensor, work: dict | None = None) -> Stats:
    row_max = logits.amax(dim=-1, keepdim=True)
    top = safe_top(logits, row_max)
    weights = exp_weights(logits, top, out=histogram.buffer(work, "weights", logits, torch.float32))
    return Stats(top, weights, weights.sum(dim=-1, keepdim=True), row_max)


class Cut(NamedTuple):
    """A truncation not yet applied: the row keeps ``x >= threshold`` (``[B, 1]``). ``row_max`` is
    the raw row maximum (a kept token, so the truncated row is valid iff it is finite);
    ``weights``, when known, are ``exp_weights(x, safe_top(x))`` of the untruncated logits.

    ``source``, when set, is the tensor the threshold compares instead of the logits handed
    with the cut: the row keeps ``y_i`` where ``source_i >= threshold`` (a truncation followed by
    monotone steps, ``y = f(source)``: the kept set is decided on the values the truncation saw,
    since ``f`` may merge a kept and a removed value into one float). ``row_max`` and ``weights``
    are then those of ``y``.

    ``block_max``, when known, is :func:`block_maxima` of the values the threshold compares
    (``source`` when set, else the logits), and ``value_block_max`` that of the logits handed
    with the cut when they differ (a ``source`` cut): the sampler's race bounds each block's
    kept mass from them instead of weighing the whole vocabulary."""
    threshold: torch.Tensor
    row_max: torch.Tensor
    weights: torch.Tensor | None = None
    source: torch.Tensor | None = None
    block_max: torch.Tensor | None = None
    value_block_max: torch.Tensor | None = None


def block_maxima(x: torch.Tensor, block: int) -> torch.Tensor:
    """The maximum of each ``block`` consecutive logits of a row, ``[B, ceil(V / block)]`` (a
    short last block's over its tokens). Their row maximum is ``x.amax(-1)`` exactly, and a
    blocked max costs about what the row max costs (one read pass)."""
    vocab = x.shape[-1]
    full = vocab // block
    if full == 0:
        return x.amax(dim=-1, keepdim=True)
    top = x[:, :full * block].view(-1, full, block).amax(-1)
    if full * block < vocab:
        top = torch.cat([top, x[:, full * block:].amax(-1, keepdim=True)], dim=-1)
    return top


def top_p_threshold(logits: torch.Tensor, p: torch.Tensor, stats=None, work: dict | None = None,
                    candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The nucleus threshold ``[B, 1]``: the logit of the last kept token (keep ``x >= threshold``).

    Rows whose total weight is at most ``256 / p`` (a peaked distribution: the nucleus may fit)
    look at their top 256 candidates; a row is decided there when a candidate is dropped. The
    others (``W > 256 / p``: since every ``w_i <= 1``, 256 tokens cannot reach ``p W``) and the
    undecided ones go to :func:`nucleus_threshold_histogram`, never to a full sort.
    ``candidates``: the rows' top 256 values when the caller already has them.
    """
    rows, vocab = logits.shape
    stats = stats if stats is not None else nucleus_stats(logits, work)
    top, weights, total = stats.top, stats.weights, stats.total
    n_cand = min(vocab, TOP_P_CANDIDATES)
    if n_cand == vocab or sync_free(logits):
        # Sync-free (CUDA): one sort is fixed-shape work, where the fallbacks below need host checks.
        values = candidates if candidates is not None and n_cand == vocab else logits.sort(dim=-1, descending=True).values
        return nucleus_threshold(values, top, total, p)[0]
    target = p.double().unsqueeze(-1) * total.double()
    wide = (target > n_cand * (1 + 1e-9)).squeeze(-1) & torch.isfinite(total).squeeze(-1)
    n_wide = int(wide.sum())
    if 2 * n_wide >= rows and candidates is None:
        # Mostly flat rows: the histogram is exact on any row, so skip the topk altogether.
        # Except rows holding NaN or +inf (their weights are not finite): there the reference
        # keeps the top value alone, which is the row maximum.
        bad = (stats.row_max.isnan() | (stats.row_max == float("inf"))).squeeze(-1)
        if not bool(bad.any()):
            return nucleus_threshold_histogram(logits, top, weights, total, p, work)
        good = (~bad).nonzero().squeeze(-1)
        return stats.row_max.clone().index_copy_(0, good, _histogram_on_rows(good, logits, top, weights, total, p))
    values = candidates if candidates is not None else largest(logits, n_cand)[0]   # descending
    threshold, covered = nucleus_threshold(values, top, total, p)
    wide = wide | ~covered
    if bool(wide.all()):
        return nucleus_threshold_histogram(logits, top, weights, total, p, work)
    if bool(wide.any()):
        rows_w = wide.nonzero().squeeze(-1)
        threshold = threshold.index_copy(0, rows_w, _histogram_on_rows(rows_w, logits, top, weights, total, p))
    return threshold


def _histogram_on_rows(rows: torch.Tensor, *row_tensors: torch.Tensor) -> torch.Tensor:
    """:func:`nucleus_threshold_histogram` of the ``rows`` (ids) of its arguments
    ``(logits, top, weights, total, p)``."""
    return nucleus_threshold_histogram(*(t.index_select(0, rows) for t in row_tensors))


def nucleus_threshold_histogram(logits: torch.Tensor, top: torch.Tensor, weights: torch.Tensor,
                                total: torch.Tensor, p: torch.Tensor, work: dict | None = None) -> torch.Tensor:
    """The nucleus threshold ``[R, 1]`` of each row without sorting the vocabulary.

    Tokens are binned by ``min(top - x, 87) * 128`` (bins ordered by value, descending; the
    binning is monotone in ``x``); one scatter-add gives each bin's weight in float64
    (:mod:`samplerkit.ops.histogram`), a cumulative sum over the bins finds the bin where the running weight reaches ``p W``, and only
    that bin's tokens (a few hundred at most on a flat row of 128k) are gathered and sorted to
    place the boundary exactly. Same definition and float64 accumulation as :func:`top_p_mask_reference`; rows whose
    boundary lies among tokens 87 nats or more below the maximum (which all weigh ``exp(-87)``)
    use the full sort.
    """
    top_scaled = top * histogram.SCALE

    def position_into(cols: slice, out: torch.Tensor) -> torch.Tensor:
        # 128 top - 128 x: both products exact, one rounding, so this is -128 max(x - top, -87)
        # (the weight's exponent, scaled) once clamped: monotone in x, 0 for the top token.
        return torch.add(top_scaled, logits[:, cols], alpha=-histogram.SCALE, out=out).clamp_(max=histogram.BINS)

    bins16, mass = histogram.bin_masses(position_into, weights, work)
    target = p.double().unsqueeze(-1) * total.double()
    boundary, before_bin = histogram.boundary_bin(mass, target)
    # The boundary bin's tokens, padded into [R, width] and sorted by value.
    members = histogram.bin_members(bins16, boundary, work)
    bin_values = members.padded(logits, NEG_INF)
    bin_weights = members.padded(weights, 0.0, torch.float64)
    bin_values, order = bin_values.sort(dim=-1, descending=True)
    bin_weights = bin_weights.gather(-1, order)
    mass_before = before_bin + bin_weights.cumsum(-1) - bin_weights
    keep = (mass_before < target) & (torch.arange(members.width, device=logits.device) < members.counts.unsqueeze(-1))
    keep[:, 0].fill_(True)                  # fill_, not setitem: no host round trip on CUDA
    threshold = bin_values.gather(-1, keep.sum(-1, keepdim=True) - 1)
    underflow = (boundary == histogram.BINS).squeeze(-1)
    if bool(underflow.any()):
        rows_u = underflow.nonzero().squeeze(-1)
        full_values, _ = logits.index_select(0, rows_u).sort(dim=-1, descending=True)
        full_threshold, _ = nucleus_threshold(full_values, top.index_select(0, rows_u), total.index_select(0, rows_u),
                                              p.index_select(0, rows_u))
        threshold = threshold.index_copy(0, rows_u, full_threshold)
    return threshold


def top_p_mask_reference(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The straightforward full-sort nucleus mask (the definition :func:`top_p_mask` must match)."""
    top, _, total = nucleus_stats(logits)[:3]
    values, _ = logits.sort(dim=-1, descending=True)
    threshold, _ = nucleus_threshold(values, top, total, p)
    return logits >= threshold


def nucleus_threshold(sorted_values: torch.Tensor, top: torch.Tensor, total: torch.Tensor, p: torch.Tensor):
    """Given the top logits of each row sorted descending, return ``(threshold [B,1], covered [B])``:
    the logit of the last kept token, and whether the candidates were enough to decide."""
    keep = nucleus_keep_sorted(sorted_values, top, total, p)
    n_keep = keep.sum(-1, keepdim=True)
    threshold = sorted_values.gather(-1, n_keep - 1)
    # Decided when the prefix ended inside the candidates and the threshold is above the last
    # candidate: a token outside the list (at most that value) could otherwise tie with the
    # threshold, and ties with a kept token are kept. (The whole vocabulary as candidates is
    # decided whatever this says.)
    covered = (n_keep < sorted_values.shape[-1]) & (threshold > sorted_values[:, -1:])
    return threshold, covered.squeeze(-1)


def nucleus_keep_sorted(sorted_values: torch.Tensor, top: torch.Tensor, total: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Kept prefix ``[B, K]`` of logits sorted descending: position ``j`` is kept iff the weight
    strictly before it is below ``p W`` (at least one is kept); ``top``/``total`` are the row's
    :func:`nucleus_stats` over the whole vocabulary.

    Weights are accumulated in float64: a float32 running sum over 10^5 tokens drifts by about
    1e-4 of the total, enough to move the boundary; in float64 the fast paths and the sort-based
    reference agree however they sum.
    """
    weights = exp_weights(sorted_values, top).double()
    before = weights.cumsum(-1) - weights
    keep = before < p.double().unsqueeze(-1) * total.double()
    keep[:, 0].fill_(True)                  # fill_, not setitem: no host round trip on CUDA
    return keep


def cut_below(logits: torch.Tensor, threshold: torch.Tensor, out: torch.Tensor | None = None,
              work: dict | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` where ``x >= threshold`` (per row ``[B, 1]``), else ``-inf``; into ``out`` (may be
    ``logits`` itself, or ``None`` for a new tensor). With ``source`` (a tensor shaped like
    ``logits``, not ``out``): ``x`` where ``source >= threshold`` (see :class:`Cut`).

    Computed as ``min(x, copysign(inf, x - threshold))``: ``x - t`` has the sign of the comparison
    exactly (IEEE subtraction never rounds a nonzero difference to zero, and ``x - t`` is ``+0``
    when ``x = t``, once a zero threshold is taken as ``-0.0``: ``(-0) - (+0)`` would be ``-0``),
    and kept values pass through ``min(x, +inf)`` unchanged. Three arithmetic passes: on CPU a
    bool mask plus ``masked_fill_`` costs about twice as much (bool kernels are not vectorised
    there). A NaN logit stays NaN (the row is reported invalid later).
    """
    if out is None:
        out = torch.empty_like(logits)
    threshold = torch.where(threshold == 0, threshold.new_full((), -0.0), threshold)
    bound = out if out is not logits else histogram.buffer(work, "bound", logits, logits.dtype)
    compared = logits if source is None else source
    bound = torch.sub(compared, threshold, out=bound) if bound is not None else compared - threshold
    return keep_where_nonnegative(logits, bound, out)


def keep_where_nonnegative(x: torch.Tensor, sign: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x`` where ``sign`` is ``+0`` or positive, else ``-inf``, into ``out`` (may be ``x``);
    ``sign`` (same shape, float) is overwritten. ``min(x, copysign(inf, sign))``: arithmetic, no
    bool kernel (not vectorised on CPU); a NaN in ``x`` stays NaN. The callers make ``sign`` a
    difference whose sign is exactly the comparison they mean."""
    torch.copysign(sign.new_full((), float("inf")), sign, out=sign)
    return torch.clamp(x, max=sign, out=out)


def remove_unkept(x: torch.Tensor, keep: torch.Tensor, work: dict | None = None) -> torch.Tensor:
    """``x`` with every token not in ``keep`` (a bool mask) set to ``-inf``, in place: exactly
    ``x.masked_fill_(~keep, -inf)``.

    On CPU ``masked_fill_`` branches on each element, and a truncation's mask is random in token
    order: it measured more than twice as slow (docs/performance.md) as the
    branch-free ``min(x, copysign(inf, keep - 1/2))`` (the mask's bytes read as 0/1, no bool
    kernel). A NaN would survive ``min`` where ``masked_fill_`` removes it, so a tensor whose
    sum is NaN (it holds a NaN, or both infinities) takes ``masked_fill_``. ``work``: reusable buffers.
    """
    if x.device.type != "cpu" or keep.shape != x.shape or bool(x.sum().isnan()):
        return x.masked_fill_(~keep, NEG_INF)
    sign = histogram.scratch(work, "bound", x, x.dtype).copy_(keep.view(torch.uint8)).sub_(0.5)
    return keep_where_nonnegative(x, sign, x)


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top probability.

    ``p_i >= min_p * p_max`` is ``x_i >= x_max + log(min_p)`` in logit space: no softmax, and
    the candidate fast path computes the very same numbers.

    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> min_p_mask(x, torch.tensor([0.3]))
    tensor([[ True,  True,  True, False]])
    """
    return logits >= min_p_threshold(logits.amax(dim=-1, keepdim=True), min_p)


def min_p_threshold(top_logit: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``x_max + log(min_p)`` as ``[B, 1]`` (``-inf`` for ``min_p = 0``: nothing removed)."""
    return top_logit + min_p.unsqueeze(-1).log()
