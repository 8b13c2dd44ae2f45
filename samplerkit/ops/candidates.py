"""Candidate lists: the sort-free fast path of truncation pipelines.

After a truncation keeps few tokens, a row is fully described by its candidates: ``values``
``[B, K]`` (sorted descending, ``-inf`` for unused slots) and their token ``ids`` ``[B, K]``;
every other token is ``-inf``. Steps after that work on ``K`` columns instead of ``V``
(top_k 50 then top_p sorts 50 numbers, not 128k), and :func:`densify` turns the list back
into ``[B, V]`` logits that are identical to what the dense path produces.
"""

from __future__ import annotations

import torch

from samplerkit.ops.truncation import NEG_INF, nucleus_threshold


def densify(values: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` logits: ``values`` at ``ids``, ``-inf`` elsewhere."""
    out = torch.full((values.shape[0], vocab_size), NEG_INF, dtype=values.dtype, device=values.device)
    return out.scatter_(-1, ids, values)


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
    values, ids = logits.topk(width, dim=-1)
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


def top_p_on_sorted(values: torch.Tensor, p: torch.Tensor, log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Nucleus threshold on candidates already sorted descending: returns the kept mask ``[B, K]``.

    ``log_norm`` is the row's full log-partition (``logsumexp`` over the whole vocabulary); when
    the candidates hold every finite logit it is theirs and may be omitted.
    """
    if log_norm is None:
        log_norm = torch.logsumexp(values, dim=-1, keepdim=True)
    threshold, _ = nucleus_threshold(values, log_norm, p)
    return values >= threshold
