"""Truncation and shaping math shared by :mod:`samplerkit.builtins.shaping` (pure functions).

Every function takes ``[B, V]`` float32 logits (``-inf`` = already removed) and per-row
``[B]`` parameter tensors, and returns a kept mask (``True`` = kept) or new logits. They are
computed for every row; the processors restrict them to their active rows. Tokens that are
already ``-inf`` count as absent, as in llama.cpp where earlier samplers shrink the candidate
list: statistics (entropy, standard deviation, candidate counts) are over finite logits only.
"""

from __future__ import annotations

import torch

from samplerkit.ops import histogram
from samplerkit.ops.sync import sync_free
from samplerkit.ops.truncation import largest, top_k_mask


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats ``[B]`` of ``softmax(logits)``, in float64 (``0 log 0 = 0``).

    >>> import math
    >>> entropy(torch.log(torch.tensor([[0.5, 0.5, 0.0]]))).item() == math.log(2)
    True
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    return -(p * logp).nan_to_num(nan=0.0).sum(-1)


def keep_top_count(logits: torch.Tensor, count: torch.Tensor, count_max: int) -> torch.Tensor:
    """Tokens at or above the ``count[b]``-th highest logit of row ``b`` (transformers'
    ``min_tokens_to_keep`` rule: ``scores >= topk(scores, k)[-1]``, ties included)."""
    k = min(max(count_max, 1), logits.shape[-1])
    kth = largest(logits, k)[0].gather(-1, (count.clamp(min=1, max=k) - 1).unsqueeze(-1))
    return logits >= kth


def typical_scores(logits: torch.Tensor, work: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, |-log p - H|)`` ``[B, V]`` float32: the probabilities and each token's typicality
    score (the distance of its surprise from the row's entropy ``H``); ``-inf`` logits score
    ``inf``. ``work``: reusable buffers (the same numbers as without)."""
    score_buf = histogram.buffer(work, "typical_score", logits, torch.float32)
    normalized = (torch.log_softmax(logits, dim=-1) if score_buf is None
                  else torch.log_softmax(logits, dim=-1, out=score_buf))
    p = torch.exp(normalized, out=histogram.buffer(work, "typical_p", logits, torch.float32))
    # "bound": the float32 scratch buffer that remove_unkept also uses, later in the step.
    product = torch.mul(normalized, p, out=histogram.buffer(work, "bound", logits, torch.float32))
    ent = -product.nansum(-1, keepdim=True)
    return p, normalized.neg_().sub_(ent).abs_()


# Vocabularies up to this size take the sort (cheap there); larger ones the histogram.
_TYPICAL_SORT_MAX = 1024


def typical_cut(logits: torch.Tensor, mass: torch.Tensor, work: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """typical_p (without ``min_keep``) as a threshold on the score: ``(score [B, V], s [B, 1])``,
    the kept tokens being ``score <= s``; ``None`` where the histogram does not apply (small
    vocabularies, sync-free CUDA steps, rows with NaN, ``+inf`` or no finite logit, a boundary
    among scores of 87 or more): use :func:`typical_mask` then.

    No sort of the vocabulary: scores are binned (``min(score, 87) * 128``), a float64 histogram
    of the probabilities finds the bin where the ranking's running mass reaches ``mass`` and only
    that bin's tokens are sorted (:mod:`samplerkit.ops.histogram`), which keeps the same set as
    :func:`typical_mask_reference`.
    """
    if (logits.shape[-1] <= _TYPICAL_SORT_MAX or sync_free(logits)
            or not bool(torch.isfinite(logits.amax(dim=-1)).all())):
        return None
    score, threshold, overflow = _typical_threshold(logits, mass, work)
    return None if bool(overflow.any()) else (score, threshold)


def _typical_threshold(logits: torch.Tensor, mass: torch.Tensor, work: dict | None):
    """``(score, s, overflow [B])`` on rows whose maximum is finite: see :func:`typical_cut`."""
    p, score = typical_scores(logits, work)

    def position_into(cols: slice, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(score[:, cols], histogram.SCALE, out=out).clamp_(max=histogram.BINS)

    bins16, bin_mass = histogram.bin_masses(position_into, p, work)
    target = mass.double().unsqueeze(-1)
    boundary, before_bin = histogram.boundary_bin(bin_mass, target)
    # The boundary bin's tokens, in id order, ranked as the reference does: a stable sort.
    members = histogram.bin_members(bins16, boundary, work)
    bin_scores, order = members.padded(score, float("inf")).sort(dim=-1, stable=True)
    cumulative = members.padded(p, 0.0, torch.float64).gather(-1, order).cumsum(-1).add_(before_bin)
    last = torch.minimum((cumulative < target).sum(-1, keepdim=True), (members.counts.unsqueeze(-1) - 1).clamp(min=0))
    return score, bin_scores.gather(-1, last), (boundary == histogram.BINS).squeeze(-1)


def typical_mask(logits: torch.Tensor, mass: torch.Tensor, min_keep: torch.Tensor, min_keep_max: int,
                 work: dict | None = None) -> torch.Tensor:
    """Locally typical sampling (transformers ``TypicalLogitsWarper``).

    Tokens are ranked by ``|-log p_i - H|`` (distance of their surprise from the entropy),
    ascending; the smallest prefix whose probability reaches ``mass`` is kept, with every token
    whose distance ties the last kept one, and at least the first ``min_keep`` of the ranking
    (ties in the ranking: the lower token id first). The running mass is a float64 sum of the
    float32 probabilities (as the nucleus). Computed without a sort (:func:`typical_cut`) except
    on the rows that needs; equal to :func:`typical_mask_reference`.

    >>> x = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    >>> typical_mask(x, torch.tensor([0.45]), torch.tensor([1]), 1)
    tensor([[False,  True,  True, False]])
    """
    rows, vocab = logits.shape
    if vocab <= _TYPICAL_SORT_MAX or sync_free(logits):     # sync-free (CUDA): the sort is fixed-shape work
        return typical_mask_reference(logits, mass, min_keep, min_keep_max)

    def on_rows(mask_of, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows.nonzero().squeeze(-1)
        return idx, mask_of(logits.index_select(0, idx), mass.index_select(0, idx),
                            min_keep.index_select(0, idx), min_keep_max)

    regular = torch.isfinite(logits.amax(dim=-1))
    if not bool(regular.all()):
        keep = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
        for rows_of, mask_of in ((regular, typical_mask), (~regular, typical_mask_reference)):
            if bool(rows_of.any()):
                idx, rows_keep = on_rows(mask_of, rows_of)
                keep[idx] = rows_keep
        return keep
    score, threshold, overflow = _typical_threshold(logits, mass, work)
    keep = score <= threshold
    if min_keep_max > 1:
        keep |= top_k_mask(-score, min_keep, min_keep_max)      # the first min_keep of the ranking
    if bool(overflow.any()):
        idx, rows_keep = on_rows(typical_mask_reference, overflow)
        keep[idx] = rows_keep
    return keep


def typical_mask_reference(logits: torch.Tensor, mass: torch.Tensor, min_keep: torch.Tensor,
                           min_keep_max: int) -> torch.Tensor:
    """:func:`typical_mask` by a full stable sort of the scores (the definition it must match)."""
    p, shifted = typical_scores(logits)
    sorted_scores, order = shifted.sort(dim=-1, stable=True)
    # float64 running mass (as the nucleus): a float32 cumsum drifts over large vocabularies.
    cumulative = p.gather(-1, order).double().cumsum(-1)
    last = (cumulative < mass.double().unsqueeze(-1)).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    keep_sorted = sorted_scores <= sorted_scores.gather(-1, last)
    width = min(max(min_keep_max, 1), logits.shape[-1])
    keep_sorted[:, :width] |= torch.arange(width, device=logits.device) < min_keep.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def epsilon_mask(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """Keep ``p_i >= epsilon`` (transformers ``EpsilonLogitsWarper``, before min-keep)."""
    return logits.softmax(dim=-1) >= epsilon.unsqueeze(-1)


def eta_threshold(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """``eta = min(epsilon, sqrt(epsilon) * exp(-H))`` as ``[B, 1]`` (transformers ``EtaLogitsWarper``,
    float32 with its entropy: ``log p`` clamped to the float32 minimum so ``0 * -inf`` is 0)."""
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.clamp(min=torch.finfo(logp.dtype).min) * logp.exp()).sum(-1)
    return torch.minimum(epsilon, epsilon.sqrt() * torch.exp(-ent)).unsqueeze(-1)


def top_a_mask(logits: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Keep ``p_i >= a * max_j(p_j)^2`` (text-generation-webui's top-a; the top token always stays)."""
    p = logits.softmax(dim=-1)
    p_max = p.amax(dim=-1, keepdim=True)
    return p >= p_max * p_max * a.unsqueeze(-1)


def tail_free_mask(logits: torch.Tensor, z: torch.Tensor, min_keep: torch.Tensor) -> torch.Tensor:
    """Tail-free sampling (llama.cpp ``llama_sample_tail_free``) over each row's finite logits.

    With ``p`` sorted descending over the ``n`` finite tokens, ``d_i = |p_i - 2 p_{i+1} + p_{i+2}|``
    for ``i < n - 2``, normalised to sum 1 (uniform when the sum is ``<= 1e-6``); the cut is the
    first ``i >= min_keep`` whose running sum exceeds ``z``, keeping the ``i`` most probable tokens.
    Rows with ``n <= 2`` are unchanged. Position ties: the lower token id ranks first.

    >>> x = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    >>> tail_free_mask(x, torch.tensor([0.5]), torch.tensor([1]))
    tensor([[ True, False, False, False, False]])
    """
    values, order = logits.sort(dim=-1, descending=True, stable=True)
    vocab = logits.shape[-1]
    n = torch.isfinite(values).sum(-1, keepdim=True)
    p = torch.softmax(values.double(), dim=-1).nan_to_num(nan=0.0)
    if vocab < 3:
        return torch.ones_like(logits, dtype=torch.bool)
    second = (p[:, :-2] - 2 * p[:, 1:-1] + p[:, 2:]).abs()                  # [B, V-2]
    pos = torch.arange(vocab - 2, device=logits.device)
    valid = pos < (n - 2)
    second = second.masked_fill(~valid, 0.0)
    total = second.sum(-1, keepdim=True)
    uniform = valid.double() / (n - 2).clamp(min=1).double()
    weights = torch.where(total > 1e-6, second / total.clamp(min=1e-300), uniform)
    over = (weights.cumsum(-1) > z.double().unsqueeze(-1)) & valid & (pos >= min_keep.unsqueeze(-1))
    # First qualifying i, or keep everything (llama.cpp's last_idx = size) when none.
    first = torch.where(over.any(-1, keepdim=True), over.to(torch.int8).argmax(-1, keepdim=True), torch.full_like(n, vocab))
    keep_sorted = torch.arange(vocab, device=logits.device) < first
    keep_sorted |= (n <= 2)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def top_n_sigma_mask(logits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Keep ``x_i >= max(x) - n * std(x)`` (llama.cpp ``top_n_sigma``): mean and population
    standard deviation over the row's finite logits, in float64.

    >>> top_n_sigma_mask(torch.tensor([[4.0, 3.0, 1.0, 0.0]]), torch.tensor([1.0]))
    tensor([[ True,  True, False, False]])
    """
    return logits >= top_n_sigma_threshold(logits, n)


def top_n_sigma_threshold(logits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The float32 threshold ``[B, 1]`` of :func:`top_n_sigma_mask`: the smallest float32 ``t`` at
    or above ``max(x) - n std(x)`` (float64), so that for float32 logits ``x >= t`` is exactly
    the float64 comparison. Rows without a non-finite logit (the usual case) skip the masking."""
    # A finite row sum means every logit is finite: then the masking passes are skipped.
    masked = sync_free(logits) or not bool(torch.isfinite(logits.sum(dim=-1)).all())
    x = logits.double()
    if masked:
        finite = torch.isfinite(logits)
        x.masked_fill_(~finite, 0.0)
        count = finite.sum(-1, keepdim=True).clamp(min=1).double()
    else:
        count = logits.shape[-1]
    mean = x.sum(-1, keepdim=True) / count
    x.sub_(mean)
    if masked:
        x.masked_fill_(~finite, 0.0)
    var = x.square_().sum(-1, keepdim=True) / count
    top = logits.amax(dim=-1, keepdim=True).double()
    return float32_at_least(top - n.double().unsqueeze(-1) * var.sqrt())


def float32_at_least(t: torch.Tensor) -> torch.Tensor:
    """The smallest float32 ``>= t`` (float64; NaN stays NaN): ``x >= result`` for float32 ``x``
    is exactly ``x >= t`` in float64."""
    t32 = t.float()
    return torch.where(t32.double() < t, torch.nextafter(t32, t32.new_full((), float("inf"))), t32)


def dynamic_temperature(logits: torch.Tensor, low: torch.Tensor, high: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Per-row temperature ``[B]`` (float64) ``T = low + (high - low) * (H / log n)^exponent``,
    with ``H`` the entropy and ``n`` the number of finite logits (llama.cpp ``temp_ext``);
    ``T = 1`` for rows with fewer than two finite logits.

    >>> dynamic_temperature(torch.zeros(1, 4), torch.tensor([0.5]), torch.tensor([1.5]), torch.tensor([1.0]))
    tensor([1.5000], dtype=torch.float64)
    """
    n = torch.isfinite(logits).sum(-1, dtype=torch.int32)
    h_max = n.clamp(min=2).double().log()
    ratio = (entropy(logits) / h_max).clamp(min=0.0, max=1.0)
    t = low.double() + (high.double() - low.double()) * ratio.pow(exponent.double())
    return torch.where(n > 1, t, torch.ones_like(t))


def quadratic_smoothing(logits: torch.Tensor, factor: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """text-generation-webui's quadratic sampling, per row (its ``max`` is over the row):
    with ``d = x - max(x)``, ``k = (3 - curve) / 2``, ``s = (curve - 1) / 2``:
    ``x' = max(x) - k f d^2 + s f d^3``; ``-inf`` stays ``-inf``.

    >>> quadratic_smoothing(torch.tensor([[2.0, 1.0, float('-inf')]]), torch.tensor([0.5]), torch.tensor([1.0]))
    tensor([[2.0000, 1.5000,   -inf]])
    """
    out = _smoothing(logits, factor, curve)
    finite = torch.isfinite(logits)
    # Extreme finite logits or parameters overflow float32 (d alone reaches 6.8e38): those
    # entries are recomputed in float64, where every term fits (|c f d^3| <= 3.4e38^2 * 6.8e38^3
    # < 1e194), and saturated at the float32 range, as temperature saturates its quotient.
    overflow = finite & ~torch.isfinite(out)
    if sync_free(logits) or bool(overflow.any()):
        exact = saturate(_smoothing(logits.double(), factor.double(), curve.double()), logits.double())
        out = torch.where(overflow, exact.float(), out)
    return torch.where(finite, out, logits)


def _smoothing(logits: torch.Tensor, factor: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    top = logits.amax(dim=-1, keepdim=True)
    d = logits - top
    f = factor.unsqueeze(-1)
    c = curve.unsqueeze(-1)
    k = (3 - c) / 2
    s = (c - 1) / 2
    return -(k * f * d * d) + (s * f * d * d * d) + top


#: The largest finite float32.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def saturate(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` with every entry whose ``old`` value was finite clamped to the float32 range
    ``[-3.4e38, 3.4e38]``: arithmetic on a finite logit never produces ``inf`` (which would make
    its row's softmax NaN), while ``-inf`` (removed) stays removed. NaN is left as is."""
    clamped = new.clamp(-FLOAT32_MAX, FLOAT32_MAX)
    return torch.where(torch.isfinite(old), clamped, new)


def xtc_mask(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Exclude top choices (llama.cpp ``xtc``): when at least two tokens have ``p >= threshold``,
    remove all of them but the least probable (tokens tied with it stay too).

    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> xtc_mask(x, torch.tensor([0.1]))
    tensor([[False, False,  True,  True]])
    """
    p = logits.softmax(dim=-1)
    above = torch.isfinite(logits) & (p >= threshold.unsqueeze(-1))
    least = p.masked_fill(~above, float("inf")).amin(dim=-1, keepdim=True)
    remove = above & (p > least) & (above.sum(-1, keepdim=True, dtype=torch.int32) >= 2)
    return ~remove


__all__ = ["dynamic_temperature", "entropy", "epsilon_mask", "eta_threshold", "keep_top_count", "quadratic_smoothing",
           "tail_free_mask", "top_a_mask", "top_n_sigma_mask", "top_n_sigma_threshold", "typical_cut", "typical_mask",
           "typical_mask_reference", "typical_scores", "xtc_mask"]
