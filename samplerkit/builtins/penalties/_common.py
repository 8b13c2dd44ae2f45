"""Helpers shared by the penalty, ban and bias processors (pure functions, no parameters).

Per-row lists (token ids, sequences) are packed once per batch composition into padded
``[B, N]`` index tables. Every step then touches only those ``N`` entries per row (gather,
scatter) instead of building ``[B, V]`` masks: with ``V = 128k`` a dense mask costs more than
the whole penalty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from samplerkit.ops import NEG_INF

POS_INF = float("inf")


def padded_ids(per_row: Sequence[Iterable[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, N] int64 ids, [B, N] bool valid)``: row ``i`` holds ``per_row[i]`` (deduplicated);
    padding slots hold id 0 and ``valid = False``. ``N >= 1``."""
    lists = [list(dict.fromkeys(ids)) for ids in per_row]
    width = max((len(x) for x in lists), default=0) or 1
    ids = torch.zeros(len(lists), width, dtype=torch.int64)
    valid = torch.zeros(len(lists), width, dtype=torch.bool)
    for i, x in enumerate(lists):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.int64)
        valid[i, :len(x)] = True
    return ids.to(device), valid.to(device)


def check_vocab(step: str, largest_id: int, vocab: int) -> None:
    """Raise a clear error when a configured token id does not exist in this vocabulary.

    ``largest_id`` is a host-side int computed once in ``__init__``: the check costs no sync.
    """
    if largest_id >= vocab:
        raise ValueError(f"{step}: token id {largest_id} is outside the vocabulary "
                         f"(size {vocab}: ids 0..{vocab - 1})")


def ban_(logits: torch.Tensor, idx: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """In place, ``logits[b, idx[b, j]] = -inf`` wherever ``on[b, j]``, except in rows where
    that would remove every finite logit: such a row is left unchanged, so the sampler
    always has a token to pick.

    ``idx`` (``[B, N]``, ids in ``[0, V)``) may repeat an id with different ``on`` values: the
    ban is a scatter-*min* with ``+inf`` for "leave", which is order-independent.
    """
    if idx.shape[1] == 0:
        return logits
    saved = logits.gather(1, idx)
    fill = torch.where(on, torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device),
                       torch.tensor(POS_INF, dtype=logits.dtype, device=logits.device))
    logits.scatter_reduce_(1, idx, fill, "amin")
    emptied = logits.amax(-1, keepdim=True) == NEG_INF      # one read pass; no host sync
    # Duplicated ids write identical values here (same saved, same banned state).
    return logits.scatter_(1, idx, torch.where(emptied, saved, logits.gather(1, idx)))


def fill_padding(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For token ids ``[B, L]`` padded with ``-1`` on the left: ``(index, present)`` where
    padding slots point at the row's last token (so a scatter through them rewrites a token
    that is written anyway, with the same value), or at id 0 in a row without tokens;
    ``present [B, 1]`` says whether the row has any token."""
    newest = ids[:, -1:]
    present = newest >= 0
    return torch.where(ids >= 0, ids, newest.clamp(min=0)), present
