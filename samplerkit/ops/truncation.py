"""Truncation masks: which tokens a row keeps. ``True`` = kept.

Tie rules (documented, tested):
- ``top_k`` keeps exactly ``k`` tokens; among equal logits at the boundary the lower token
  ids win. So ``top_k = 1`` is exactly greedy (``argmax`` also returns the first maximum).
- ``top_p`` and ``min_p`` are thresholds on the value: a token tied with a kept token is kept.

All masks are computed for every row; callers restrict them to active rows.
"""

from __future__ import annotations

import torch

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
    kth = logits.topk(k_sel, dim=-1).values
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


def top_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of highest-probability tokens whose mass reaches ``p``
    (plus any token tied with the last one kept).

    With probabilities sorted descending, token ``j`` is kept iff the mass strictly before it
    is below ``p``: ``sum_{i<j} p_(i) < p``. Exact without a full sort in the common case:
    the top ``min(V, 256)`` candidates are selected first, and only rows whose candidates
    hold less than ``p`` of the mass fall back to the full sort (:func:`top_p_mask_reference`).
    Both paths compute the same float32 values, so they keep identical sets.

    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> top_p_mask(x, torch.tensor([0.8]))
    tensor([[ True,  True, False, False]])
    >>> top_p_mask(x, torch.tensor([0.81]))
    tensor([[ True,  True,  True, False]])
    """
    vocab = logits.shape[-1]
    n_cand = min(vocab, TOP_P_CANDIDATES)
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, _ = logits.topk(n_cand, dim=-1)                                 # sorted descending
    threshold, covered = nucleus_threshold(values, log_norm, p)
    if n_cand < vocab and not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(-1)
        row_threshold = nucleus_threshold_histogram(
            logits.index_select(0, rows), log_norm.index_select(0, rows), p.index_select(0, rows),
            values.index_select(0, rows)[:, :1])
        threshold = threshold.index_copy(0, rows, row_threshold)
    return logits >= threshold


# Histogram fallback of the nucleus: bins of logit distance below the row maximum.
_BINS = 2048
_SPAN = 64.0     # nats; tokens further below the maximum share the last ("underflow") bin


def nucleus_threshold_histogram(logits: torch.Tensor, log_norm: torch.Tensor, p: torch.Tensor,
                                top: torch.Tensor) -> torch.Tensor:
    """The nucleus threshold ``[R, 1]`` of each row without sorting the vocabulary.

    Tokens are binned by ``top - x`` (bins sorted by value, descending); one scatter-add gives
    each bin's probability mass, a cumulative sum over 2048 bins finds the bin where the
    running mass crosses ``p``, and only that bin's tokens are sorted to place the boundary
    exactly. Same definition and float64 accumulation as :func:`top_p_mask_reference`; rows
    whose boundary falls among tokens more than 64 nats below the maximum (mass < V e^-64)
    use the full sort.
    """
    scale = _BINS / _SPAN
    bins = ((top - logits) * scale).clamp_(max=_BINS).to(torch.int64)        # -inf -> underflow bin
    probs = (logits.double() - log_norm.double()).exp()
    mass = torch.zeros(logits.shape[0], _BINS + 1, dtype=torch.float64, device=logits.device)
    mass.scatter_add_(1, bins, probs)
    through = mass.cumsum(-1)
    boundary = (through < p.double().unsqueeze(-1)).sum(-1, keepdim=True).clamp(max=_BINS)
    mass_before_bin = through.gather(-1, boundary) - mass.gather(-1, boundary)
    in_bin = bins == boundary
    width = int(in_bin.sum(-1, dtype=torch.int32).max())
    bin_values = logits.masked_fill(~in_bin, NEG_INF).topk(width, dim=-1).values
    bin_probs = (bin_values.double() - log_norm.double()).exp()
    mass_before = mass_before_bin + bin_probs.cumsum(-1) - bin_probs
    keep = mass_before < p.double().unsqueeze(-1)
    keep[:, 0] = True
    threshold = bin_values.gather(-1, keep.sum(-1, keepdim=True) - 1)
    underflow = (boundary == _BINS).squeeze(-1)
    if bool(underflow.any()):
        rows = underflow.nonzero().squeeze(-1)
        full_values, _ = logits.index_select(0, rows).sort(dim=-1, descending=True)
        full_threshold, _ = nucleus_threshold(full_values, log_norm.index_select(0, rows), p.index_select(0, rows))
        threshold = threshold.index_copy(0, rows, full_threshold)
    return threshold


def top_p_mask_reference(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The straightforward full-sort nucleus mask (the definition :func:`top_p_mask` must match)."""
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, _ = logits.sort(dim=-1, descending=True)
    threshold, _ = nucleus_threshold(values, log_norm, p)
    return logits >= threshold


def nucleus_threshold(sorted_values: torch.Tensor, log_norm: torch.Tensor, p: torch.Tensor):
    """Given the top logits of each row sorted descending, return ``(threshold [B,1], covered [B])``:
    the logit of the last kept token, and whether the candidates were enough to decide."""
    keep = nucleus_keep_sorted(sorted_values, log_norm, p)
    n_keep = keep.sum(-1, keepdim=True)
    threshold = sorted_values.gather(-1, n_keep - 1)
    # Decided when a candidate is dropped (the prefix ended inside the candidates) or the
    # candidates are the whole vocabulary.
    covered = n_keep.squeeze(-1) < sorted_values.shape[-1]
    return threshold, covered


def nucleus_keep_sorted(sorted_values: torch.Tensor, log_norm: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Kept prefix ``[B, K]`` of logits sorted descending: position ``j`` is kept iff the mass
    strictly before it is below ``p`` (at least one is kept).

    Probabilities are accumulated in float64: a float32 running sum over 10^5 tokens drifts
    by about 1e-4, enough to move the boundary; float64 makes the fast paths and the sort-based
    reference agree however they sum.
    """
    probs = (sorted_values.double() - log_norm.double()).exp()
    mass_before = probs.cumsum(-1) - probs
    keep = mass_before < p.double().unsqueeze(-1)
    keep[:, 0] = True
    return keep


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
