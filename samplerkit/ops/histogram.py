"""Exact prefix searches without a sort: float64 mass histograms over a ranking key.

``top_p`` (tokens by logit, descending) and ``typical_p`` (tokens by ``|-log p - H|``,
ascending) both keep the shortest prefix of a ranking whose mass reaches a target. Sorting the
vocabulary finds it in ``O(V log V)`` per row; here a monotone function of the ranking key maps
each token to one of ``BINS + 1`` bins (``position`` in ``[0, BINS]``, truncated), one
scatter-add gives each bin's mass in float64 (:func:`bin_masses`), a search over the bins'
running sums finds the bin where the prefix reaches the target (:func:`boundary_bin`), and
only that bin's tokens, a few hundred on a flat row of 128k, are gathered (:func:`bin_members`)
for the caller to sort. The running sums are float64 sums of the same float32 weights as the
sort-based references, so both agree however they sum.

On CPU the passes over ``[R, V]`` run in column chunks (:func:`column_chunks`): the step is
memory-bound there, and a chunk's intermediate results (int64 bin indices, float64 weights)
stay in cache instead of going through memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

SCALE = 128.0       # bins per unit of the key (a power of two: scaling a float by it is exact)
BINS = 11136        # 87 * 128: keys of 87 or more share the last bin, BINS
# The boundary bin is found in two levels, groups of 128 bins then the bins of one group: two
# short cumulative sums instead of one over all 11137 bins (a slow, sequential op on CPU).
GROUP = 128
GROUPS = BINS // GROUP + 1          # the mass array is padded to GROUPS * GROUP bins

# CPU passes over [R, V] run in column chunks of about this many elements (4 MB of float32, the
# size of this machine's L2 caches together) where a chunk's intermediate results are reused.
CHUNK_ELEMENTS = 1 << 20


def buffer(work: dict | None, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A reusable ``like``-shaped buffer from ``work`` (a fresh ``[B, V]`` allocation costs more
    in page faults than a pass over it on CPU), or ``None`` to allocate."""
    if work is None:
        return None
    buf = work.get(name)
    if buf is None or buf.shape != like.shape or buf.dtype != dtype or buf.device != like.device:
        buf = work[name] = torch.empty(like.shape, dtype=dtype, device=like.device)
    return buf


def scratch(work: dict | None, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`buffer`, or a fresh tensor when there is no workspace."""
    buf = buffer(work, name, like, dtype)
    return buf if buf is not None else torch.empty(like.shape, dtype=dtype, device=like.device)


def column_chunks(x: torch.Tensor) -> list[slice]:
    """Column slices covering ``x`` ``[R, V]``: one on CUDA, about ``CHUNK_ELEMENTS`` each on CPU."""
    rows, vocab = x.shape
    width = vocab if x.device.type != "cpu" else min(vocab, max(256, CHUNK_ELEMENTS // max(rows, 1)))
    return [slice(start, min(vocab, start + width)) for start in range(0, vocab, width)]


def bin_masses(position_into: Callable[[slice, torch.Tensor], torch.Tensor], weights: torch.Tensor,
               work: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's bin ``[R, V]`` int16 and each bin's float64 mass ``[R, GROUPS * GROUP]``
    (bins past ``BINS`` stay empty).

    ``position_into(cols, out)`` writes the positions of the columns ``cols`` (floats in
    ``[0, BINS]``, a monotone function of the ranking key within a row) into ``out`` ``[R, n]``
    and returns it; a token's bin is its position truncated. The scatter-add needs int64 indices
    and float64 weights: they are made one column chunk at a time."""
    rows, vocab = weights.shape
    chunks = column_chunks(weights)
    bins16 = scratch(work, "bins16", weights, torch.int16)
    mass = scratch(work, "mass", weights[:, :1].expand(rows, GROUPS * GROUP), torch.float64).zero_()
    chunk = weights[:, chunks[0]]
    position, index, weights64 = (scratch(work, "chunk_position", chunk, torch.float32),
                                  scratch(work, "chunk_index", chunk, torch.int64),
                                  scratch(work, "chunk_weights64", chunk, torch.float64))
    for cols in chunks:
        n = cols.stop - cols.start
        pos = position_into(cols, position[:, :n])
        # Truncation toward zero (monotone); the int16 copy stays for bin_members.
        chunk_bins = bins16[:, cols].copy_(pos)
        mass.scatter_add_(1, index[:, :n].copy_(chunk_bins), weights64[:, :n].copy_(weights[:, cols]))
    return bins16, mass


def boundary_bin(mass: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first bin where the running mass reaches ``target`` (``[R, 1]`` float64; the result is
    ``[R, 1]``, at most ``BINS``) and the mass of the bins before it, from :func:`bin_masses`."""
    rows = mass.shape[0]
    by_group = mass.view(rows, GROUPS, GROUP)
    group_mass = by_group.sum(-1)
    group_through = group_mass.cumsum(-1)
    group = torch.searchsorted(group_through, target).clamp_(max=GROUPS - 1)
    before_group = group_through.gather(-1, group) - group_mass.gather(-1, group)
    inner = by_group.gather(1, group.unsqueeze(-1).expand(rows, 1, GROUP)).squeeze(1)     # [R, 128]
    inner_through = inner.cumsum(-1).add_(before_group)
    # Clamped: a group found by its total may, summed bin by bin, round just short of the target.
    bin_in_group = torch.searchsorted(inner_through, target).clamp_(max=GROUP - 1)
    boundary = (group * GROUP + bin_in_group).clamp_(max=BINS)
    before_bin = inner_through.gather(-1, bin_in_group) - inner.gather(-1, bin_in_group)
    return boundary, before_bin


class BinMembers(NamedTuple):
    """The tokens of one bin per row, in row-major (token id) order: ``row``, ``slot`` (their
    place in the row's padded list ``[R, width]``), ``flat`` (index into the row-major ``[R, V]``
    data), ``counts`` ``[R]`` and ``width`` (the longest list, at least 1)."""
    row: torch.Tensor
    slot: torch.Tensor
    flat: torch.Tensor
    counts: torch.Tensor
    width: int

    def padded(self, data: torch.Tensor, fill: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[R, width]``: each row's members' values of ``data`` ``[R, V]`` in id order, then ``fill``."""
        rows = self.counts.shape[0]
        values = data.reshape(-1).index_select(0, self.flat)
        dtype = dtype or data.dtype
        out = torch.full((rows, self.width), fill, dtype=dtype, device=data.device)
        return out.index_put_((self.row, self.slot), values.to(dtype))


def bin_members(bins16: torch.Tensor, boundary: torch.Tensor, work: dict | None = None) -> BinMembers:
    """The tokens whose bin is ``boundary`` (``[R, 1]``) in each row of ``bins16``."""
    rows, vocab = bins16.shape
    in_bin = buffer(work, "in_bin", bins16, torch.bool)
    boundary16 = boundary.to(torch.int16)
    in_bin = torch.eq(bins16, boundary16, out=in_bin) if in_bin is not None else bins16 == boundary16
    row, col = _sparse_nonzero(in_bin)
    counts = torch.bincount(row, minlength=rows)
    width = max(int(counts.max()), 1)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(row.shape[0], device=bins16.device) - starts.index_select(0, row)
    return BinMembers(row, slot, row * vocab + col, counts, width)


def _sparse_nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask.nonzero(as_tuple=True)`` (row-major order) for a sparse ``[R, V]`` bool mask: the
    nonzero 8-byte words first, then the bytes of those words (several times faster on CPU)."""
    rows, vocab = mask.shape
    if vocab % 8 or not mask.is_contiguous():
        return mask.nonzero(as_tuple=True)
    word_row, word = mask.view(torch.int64).nonzero(as_tuple=True)
    hit, byte = mask.view(rows, vocab // 8, 8)[word_row, word].nonzero(as_tuple=True)
    return word_row.index_select(0, hit), word.index_select(0, hit) * 8 + byte
