"""Counter-based randomness and the exponential race.

Sampling from ``softmax(x)`` by the exponential race: with ``E_i ~ Exp(1)`` independent,
``argmax_i p_i / E_i`` is distributed exactly as ``p``. In log space that is the Gumbel-max
trick, ``argmax_i (x_i + G_i)`` with ``G_i = -log E_i``, so no softmax and no normalisation
are needed, and ``-inf`` logits can never win.

The noise is a pure function of ``(row key, token id)``, where the row key mixes the row's
seed with its step counter. Hence:

- a seeded row's tokens do not depend on the batch it runs in, nor on its position there;
- the noise of a token does not depend on which other tokens survived truncation, so a fast
  path that only looks at candidates draws *the same token* as the full-vocabulary path;
- there is no ``torch.multinomial`` and no host synchronisation.

Over a large vocabulary one race over every token would hash every token; :func:`race_sample`
races among blocks of tokens first (by their probability mass), then among the tokens of the
winning block: the same distribution, ``O(V / 256 + 256)`` hashes per row.

The hash is SplitMix64's finaliser on int64 tensors (wrapping multiplication; logical
shifts emulated with masks). Uniforms keep 24 bits (float32 resolution): ``u = (h + 1/2) 2^-24``.
"""

from __future__ import annotations

import torch

from samplerkit.ops import _triton
from samplerkit.ops.histogram import CHUNK_ELEMENTS
from samplerkit.ops.sync import sync_free
from samplerkit.ops.truncation import block_maxima, cut_below, exp_weights, safe_top

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 value with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_TOKEN_STRIDE = _signed(0xD1B54A32D192ED03)
#: The largest float32 below 1 (``1 - 2^-24``): the most a 24-bit uniform may be.
_U_MAX = 1.0 - 2.0 ** -24


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser: a bijection of 64-bit words with full avalanche."""
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def row_keys(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Per-row stream keys ``[B]`` int64 from seeds and step counters (both ``[B]`` int64)."""
    if _triton.available(seeds):
        return _triton.row_keys(seeds, counters)
    return _mix(_mix(seeds.to(torch.int64) * _GOLDEN + 1) + counters.to(torch.int64) * _GOLDEN)


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``G = -log(-log U)`` for each (row key, token id).

    ``keys``: ``[B]`` int64; ``token_ids``: ``[V]`` or ``[B, K]`` int64. Returns float32 of the
    broadcast shape ``[B, V]`` / ``[B, K]``.
    """
    if token_ids.dim() == 1:
        token_ids = token_ids.unsqueeze(0)
    h = _mix(keys.unsqueeze(-1) + token_ids * _TOKEN_STRIDE)
    # The top 24-bit value, (2^24 - 1/2) 2^-24, rounds to 1.0 in float32, and -log(-log 1) = +inf:
    # a removed token (-inf) would then score NaN and win argmax. Clamp to the float32 below 1.
    u = ((_shift_right(h, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp_(max=_U_MAX)
    return -torch.log(-torch.log(u))


def uniform(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """One float64 uniform in ``[0, 1)`` per row key (53 bits), from an independent ``stream``."""
    return _shift_right(_stream_keys(keys, stream), 11).to(torch.float64) * (1.0 / (1 << 53))


def race_candidates(values: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Gumbel-max race among candidates ``(values, ids)`` ``[B, K]``; returns token ids ``[B]``.

    Each token's noise depends on its id only, so the winner is the token the race over the
    whole vocabulary would pick when every non-candidate is ``-inf``.
    """
    if _triton.available(values) and values.shape[-1] <= _triton.CANDIDATES_MAX:
        return _triton.race_candidates(values, ids.expand_as(values), keys)
    winner = (values + gumbel_noise(keys, ids)).argmax(dim=-1, keepdim=True)
    return ids.gather(-1, winner).squeeze(-1)


#: Tokens per block of the two-stage race: ids ``[b * RACE_BLOCK, (b + 1) * RACE_BLOCK)``.
RACE_BLOCK = 256
# The block race draws from its own stream, independent of the token noise.
_BLOCK_STREAM = 3
# Candidate lists up to this long find their block masses by a K x K comparison, not a scatter.
_PAIRWISE_MAX = 64


def _stream_salt(stream: int) -> int:
    """The 64-bit constant added to row keys for ``stream`` (unsigned)."""
    return (stream * 0x632BE59BD9B4E019) & _MASK64


def _stream_keys(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """Row keys of an independent stream: mixing with a stream constant decorrelates them."""
    return _mix(keys + _signed(_stream_salt(stream)))


def race_sample(logits: torch.Tensor, keys: torch.Tensor, workspace: torch.Tensor | None = None, *,
                threshold: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                mask_workspace: torch.Tensor | None = None, row_max: torch.Tensor | None = None,
                source: torch.Tensor | None = None, block_max: torch.Tensor | None = None,
                value_block_max: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)`` exactly, reading the vocabulary O(1) times.

    The two-stage race. Token ids are cut into blocks of ``RACE_BLOCK`` consecutive ids; with
    ``w_i = exp(x_i - max x)`` and ``S_b = sum_{i in b} w_i``:

    1. the block ``b* = argmax_b (log S_b + G'_b)`` (Gumbel-max over block masses, noise from an
       independent stream), so ``P(b) = S_b / S``;
    2. the token ``argmax_{i in b*} (x_i + G_i)`` (the Gumbel-max race inside the block), so
       ``P(i | b) = w_i / S_b``.

    Hence ``P(i) = w_i / S = softmax(x)_i`` exactly. (Weights are floored at ``exp(-87)``, see
    :func:`samplerkit.ops.truncation.exp_weights`: a block of tokens that far below the maximum,
    ``-inf`` ones included, weighs at most ``256 exp(-87)`` against at least 1 for the top block,
    a log-gap of 81 that the Gumbel noise of 24-bit uniforms (range 20.2) cannot bridge, so such a
    block is never chosen and ``-inf`` never wins; the change to any probability is below 1e-32.)
    Dense cost: one max, one ``exp``, one blocked sum over ``[B, V]``, then ``O(V / RACE_BLOCK +
    RACE_BLOCK)`` hashes per row: no sort, no ``topk``, no float64 pass, no host sync. A vocabulary
    of at most one block is a single race over every token. ``workspace`` (``[B, V]`` float32)
    holds the weights instead of a fresh allocation.

    With a ``threshold`` (a truncation ``x >= threshold`` the sampler applies itself, reusing the
    truncation's ``weights``), stage 1 needs each block's kept mass. On CPU the winning block is
    usually certified from 16 blocks' kept masses (:func:`_race_kept_blocks_lazily`), not from a
    pass that masks every weight; the same block either way. ``source`` (see
    :class:`samplerkit.ops.truncation.Cut`): the threshold compares ``source``, not ``logits``.
    Without ``weights``, rows whose cut is shallow are first decided from block maxima and kept
    counts (:func:`_race_kept_blocks_by_maxima`; ``block_max`` and ``value_block_max``: the
    maxima when the truncation has them, see ``Cut``), without weighing the vocabulary.

    >>> x = torch.tensor([[0.0, float('-inf'), 1.0]])
    >>> keys = row_keys(torch.tensor([7]), torch.tensor([0]))
    >>> int(race_sample(x, keys)) in (0, 2)
    True
    """
    vocab = logits.shape[-1]
    compared = logits if source is None else source      # what the threshold applies to
    if vocab <= RACE_BLOCK:
        if threshold is not None:
            logits = cut_below(logits, threshold, source=source)
        return race_candidates(logits, torch.arange(vocab, device=logits.device).expand_as(logits), keys)
    if workspace is not None and (workspace.shape != logits.shape or workspace.device != logits.device):
        workspace = None
    block_keys = _stream_keys(keys, _BLOCK_STREAM)
    if threshold is None:
        block = _race_blocks(exp_weights(logits, safe_top(logits), out=workspace), block_keys)
    else:
        block, undecided = None, None
        if weights is None and logits.device.type == "cpu" and not sync_free(logits):
            # Most rows are decided from block maxima (and kept counts): no weight of the
            # whole vocabulary, no exp over [B, V]. The rest take the weights below.
            top = safe_top(logits, row_max)
            block, undecided = _race_kept_blocks_by_maxima(
                logits, compared, threshold, top, block_keys, mask_workspace,
                compared_max=block_max, value_max=value_block_max if source is not None else block_max)
            if block is not None and undecided is not None and 2 * int(undecided.sum()) > undecided.shape[0]:
                block = None                         # mostly undecided: the full computation
            if block is not None and undecided is not None:
                rows = undecided.nonzero().squeeze(-1)
                sub = logits.index_select(0, rows)
                block = block.index_copy(0, rows, _race_kept_blocks_from_weights(
                    sub if source is None else source.index_select(0, rows),
                    exp_weights(sub, top.index_select(0, rows)), threshold.index_select(0, rows),
                    block_keys.index_select(0, rows)))
            elif block is None:
                weights = exp_weights(logits, top, out=mask_workspace)
        if block is None:
            if weights is None:
                weights = exp_weights(logits, safe_top(logits, row_max), out=mask_workspace)
            block = _race_kept_blocks_from_weights(compared, weights, threshold, block_keys, workspace,
                                                   lazy=not sync_free(logits))
    ids, inside = _block_tokens(block, vocab)
    values = logits.gather(-1, ids).masked_fill_(~inside, float("-inf"))
    if threshold is not None:
        removed = (values if source is None else source.gather(-1, ids)) < threshold
        values = values.masked_fill_(removed, float("-inf"))
    return race_candidates(values, ids, keys)


def _race_kept_blocks(logits: torch.Tensor, weights: torch.Tensor, threshold: torch.Tensor,
                      block_keys: torch.Tensor, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 of the race over the tokens with ``x >= threshold``: ``[B, 1]`` block ids, from
    every block's kept mass (a masking pass and a blocked sum over ``[B, V]``)."""
    # A float comparison result: writing a bool mask is several times slower on CPU.
    kept = torch.ge(logits, threshold, out=workspace) if workspace is not None else (logits >= threshold).float()
    return _race_blocks(kept.mul_(weights), block_keys)


def _race_kept_blocks_from_weights(compared: torch.Tensor, weights: torch.Tensor, threshold: torch.Tensor,
                                   block_keys: torch.Tensor, workspace: torch.Tensor | None = None, *,
                                   lazy: bool = True) -> torch.Tensor:
    """Stage 1 over the tokens with ``compared >= threshold`` given every token's weight: the
    lazy certification from full block masses (:func:`_race_kept_blocks_lazily`, ``lazy``), the
    masking pass for the rows it leaves undecided."""
    block, undecided = _race_kept_blocks_lazily(compared, weights, threshold, block_keys) if lazy else (None, None)
    if block is None:
        return _race_kept_blocks(compared, weights, threshold, block_keys, workspace)
    if undecided is not None:
        rows = undecided.nonzero().squeeze(-1)
        block = block.index_copy(0, rows, _race_kept_blocks(
            compared.index_select(0, rows), weights.index_select(0, rows), threshold.index_select(0, rows),
            block_keys.index_select(0, rows)))
    return block


def _race_blocks(weights: torch.Tensor, block_keys: torch.Tensor) -> torch.Tensor:
    """Stage 1: ``[B, 1]`` block ids, ``argmax_b (log S_b + G'_b)`` over every block of ``weights``."""
    return race_candidates(_block_masses(weights).log(), _block_ids(weights), block_keys).unsqueeze(-1)


def _block_tokens(blocks: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of ``blocks`` ``[B, n]``, ``[B, n * RACE_BLOCK]`` (a short last block's
    missing ids clamped to ``vocab - 1``), and which of them are real tokens."""
    ids = (blocks.unsqueeze(-1) * RACE_BLOCK + torch.arange(RACE_BLOCK, device=blocks.device)).flatten(1)
    inside = ids < vocab
    return ids.clamp_(max=vocab - 1), inside


def _block_masses(weights: torch.Tensor) -> torch.Tensor:
    """``S_b``: the sum of each block of ``RACE_BLOCK`` consecutive weights, ``[B, ceil(V / RACE_BLOCK)]``."""
    vocab = weights.shape[-1]
    full = vocab // RACE_BLOCK
    if full == 0:           # one short block (the last column chunk of _kept_counts can be one)
        return weights.sum(-1, keepdim=True)
    mass = weights[:, :full * RACE_BLOCK].view(-1, full, RACE_BLOCK).sum(-1)
    if full * RACE_BLOCK < vocab:
        mass = torch.cat([mass, weights[:, full * RACE_BLOCK:].sum(-1, keepdim=True)], dim=-1)
    return mass


def _block_ids(weights: torch.Tensor) -> torch.Tensor:
    """Block ids ``[B, ceil(V / RACE_BLOCK)]`` matching :func:`_block_masses`."""
    n_blocks = (weights.shape[-1] + RACE_BLOCK - 1) // RACE_BLOCK
    return torch.arange(n_blocks, device=weights.device).expand(weights.shape[0], n_blocks)


#: Blocks whose kept mass the lazy block race computes before it tries to certify the winner.
_LAZY_BLOCKS = 16
# Below this many logits a masking pass costs less than the lazy race's dozen small ops.
_LAZY_MIN_ELEMENTS = 1 << 19
# A float32 sum of 256 nonnegative terms is within 255 * 2^-24 < 2^-16 of the exact sum, in
# any order: scaling a block's full mass by 1 + 2^-12 makes it an upper bound of any float32
# sum of a subset of its weights (and keeps log's last-bit errors far inside the margin).
_UPPER_SLACK = 1.0 + 2.0 ** -12


def _race_kept_blocks_lazily(logits: torch.Tensor, weights: torch.Tensor, threshold: torch.Tensor,
                             block_keys: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`_race_kept_blocks` without a pass that masks every weight: ``[B, 1]`` block ids
    and the ``[B]`` rows left undecided (``None`` when every row is decided); ``(None, None)``
    when every row is undecided.

    The winner is ``argmax_b (log S'_b + G_b)`` with ``S'_b`` the block's kept mass. Its full
    mass ``S_b >= S'_b`` (one blocked sum) bounds each score from above: ``U_b = log(S_b (1 +
    2^-12)) + G_b``. The kept masses of the 16 blocks with the highest bounds are computed
    exactly; when the best of them beats the 17th bound strictly, no other block can win, and
    the winner is the block the full computation picks (ties: the lowest block id, as
    ``argmax``; the sums have the same shape and order, except a short last block's). On a
    flat row, where most of a block's mass is kept, that is nearly always so; the rows where it
    is not are left to the full computation. CPU only: the check is a host sync.
    """
    rows, vocab = logits.shape
    n_blocks = (vocab + RACE_BLOCK - 1) // RACE_BLOCK
    if n_blocks <= _LAZY_BLOCKS or rows * vocab < _LAZY_MIN_ELEMENTS:
        return None, None
    noise = gumbel_noise(block_keys, torch.arange(n_blocks, device=logits.device))
    upper = (_block_masses(weights) * _UPPER_SLACK).log_().add_(noise)
    bound, order = upper.topk(_LAZY_BLOCKS + 1, dim=-1)
    chosen = order[:, :_LAZY_BLOCKS]
    ids, inside = _block_tokens(chosen, vocab)
    kept = (logits.gather(-1, ids) >= threshold) & inside
    mass = (weights.gather(-1, ids) * kept).view(rows, _LAZY_BLOCKS, RACE_BLOCK).sum(-1)
    score = mass.log_().add_(noise.gather(-1, chosen))
    best = score.amax(-1, keepdim=True)
    block = torch.where(score == best, chosen, n_blocks).amin(-1, keepdim=True)
    undecided = (best <= bound[:, _LAZY_BLOCKS:]).squeeze(-1)
    n_undecided = int(undecided.sum())
    if n_undecided == rows:
        return None, None
    return block, (undecided if n_undecided else None)


# Certification margin on log scores: covers last-bit differences between these sums of
# recomputed weights and the masking pass's (a float32 sum of 256 terms is within 2^-16 of
# exact) and log's rounding, so a certified winner is the full computation's winner.
_CERTIFY_MARGIN = 2.0 ** -10
# Cuts at most this many nats below the row maximum are bounded from block maxima and counts.
_SHALLOW = 6.0
# Blocks computed exactly from the block maxima alone: a peaked row's kept tokens lie in a few
# dozen blocks at most, and then every block that could win is computed.
_BY_MAXIMA_BLOCKS = 32


def _race_kept_blocks_by_maxima(logits: torch.Tensor, compared: torch.Tensor, threshold: torch.Tensor,
                                top: torch.Tensor, block_keys: torch.Tensor,
                                workspace: torch.Tensor | None = None, *,
                                compared_max: torch.Tensor | None = None, value_max: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stage 1 of the race over the tokens with ``compared >= threshold`` without weighing the
    whole vocabulary: ``[B, 1]`` block ids and the ``[B]`` rows left undecided (``None`` when
    every row is decided); ``(None, None)`` when no row is decided. CPU only (host checks).

    With ``m_b`` the block's largest logit (of ``logits``, whose weights ``w = exp_weights(x,
    top)`` the race uses) and ``n_b`` its number of kept tokens, the block's kept mass is at most
    ``n_b w(m_b)``: every kept token weighs at most the block maximum's weight. The winner is
    then certified as in :func:`_race_kept_blocks_lazily` from these bounds: the exact kept
    masses of the ``k`` blocks with the highest bounds ``log(n_b w(m_b) (1 + 2^-12)) + G_b``
    (weights recomputed for their tokens only: ``exp_weights`` is elementwise), and the best of
    them must beat the ``k + 1``-th bound and the second best by a margin. First with
    ``n_b = 256`` on blocks whose maximum of ``compared`` reaches the threshold and ``k = 32``
    (one blocked max per tensor: a peaked row has a few dozen such blocks at most, all computed
    exactly), then, if rows are left, with the counts and ``k = 16`` (a compare and a blocked
    sum: tight on flat rows, whose kept tokens are a few per block). A block without a kept token has bound 0 and never wins, as
    in the full computation. Rows neither decides are left to the full computation.

    Both bounds are loose when a row keeps tokens far below its maximum (a deep cut, such as
    ``top_p``'s on a flat row: a block's kept tokens then weigh far less than its heaviest);
    unless the caller has the block maxima (``compared_max``: of ``compared``, ``value_max``: of
    ``logits``), they are computed only when most rows cut at most ``_SHALLOW`` nats below the
    row maximum (``min_p``: ``-log min_p``), and the counts only for such rows.
    """
    rows, vocab = logits.shape
    n_blocks = (vocab + RACE_BLOCK - 1) // RACE_BLOCK
    if n_blocks <= _LAZY_BLOCKS or rows * vocab < _LAZY_MIN_ELEMENTS:
        return None, None
    if compared_max is None:
        if compared is not logits or 2 * int(((top - threshold) <= _SHALLOW).sum()) < rows:
            return None, None
        compared_max = block_maxima(compared, RACE_BLOCK)
    if value_max is None:
        value_max = compared_max if compared is logits else block_maxima(logits, RACE_BLOCK)
    # How deep each row cuts below its maximum, on the compared values.
    shallow = (compared_max.amax(-1, keepdim=True) - threshold) <= _SHALLOW
    noise = gumbel_noise(block_keys, torch.arange(n_blocks, device=logits.device))
    # The most one kept token of the block weighs, with the slack of _race_kept_blocks_lazily.
    heaviest = exp_weights(value_max, top).mul_(_UPPER_SLACK)
    live = (compared_max >= threshold).to(heaviest.dtype)
    block, decided = _certify_blocks(logits, compared, threshold, top, noise, heaviest * (live * RACE_BLOCK),
                                     exact=_BY_MAXIMA_BLOCKS)
    if bool(decided.all()):
        return block, None
    if not bool((shallow.squeeze(-1) & ~decided).any()):
        return (block, ~decided) if bool(decided.any()) else (None, None)
    # The counts for every row: cheaper than copying the undecided rows out.
    counts = _kept_counts(compared, threshold, workspace)
    by_counts, decided_now = _certify_blocks(logits, compared, threshold, top, noise, heaviest * counts)
    block = torch.where(decided.unsqueeze(-1), block, by_counts)
    decided = decided | decided_now
    if bool(decided.all()):
        return block, None
    if not bool(decided.any()):
        return None, None
    return block, ~decided


def _kept_counts(compared: torch.Tensor, threshold: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    """Each block's number of tokens with ``compared >= threshold``, ``[B, ceil(V / RACE_BLOCK)]``
    float32 (exact: at most 256). One column chunk at a time: the 0/1 floats of a chunk are
    summed while in cache instead of going through memory (``workspace``, ``[B, V]`` float32 or
    ``None``, lends its storage for the chunk)."""
    rows, vocab = compared.shape
    width = max(RACE_BLOCK, CHUNK_ELEMENTS // rows // RACE_BLOCK * RACE_BLOCK)
    if workspace is None or workspace.numel() < rows * min(width, vocab):
        workspace = torch.empty(rows * min(width, vocab), dtype=torch.float32, device=compared.device)
    storage = workspace.view(-1)
    counts = torch.empty(rows, (vocab + RACE_BLOCK - 1) // RACE_BLOCK, dtype=torch.float32, device=compared.device)
    for start in range(0, vocab, width):
        stop = min(vocab, start + width)
        chunk = torch.ge(compared[:, start:stop], threshold, out=storage[:rows * (stop - start)].view(rows, stop - start))
        counts[:, start // RACE_BLOCK:(stop + RACE_BLOCK - 1) // RACE_BLOCK] = _block_masses(chunk)
    return counts


def _certify_blocks(logits: torch.Tensor, compared: torch.Tensor, threshold: torch.Tensor, top: torch.Tensor,
                    noise: torch.Tensor, upper: torch.Tensor, exact: int = _LAZY_BLOCKS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The block race from upper bounds ``upper`` ``[B, n]`` of every block's kept mass (0: no
    kept token), computing the kept mass of the ``exact`` blocks with the highest bounds:
    ``[B, 1]`` block ids and ``[B]`` bool, the rows where the winner is certain (see
    :func:`_race_kept_blocks_by_maxima`)."""
    rows, vocab = logits.shape
    exact = min(exact, upper.shape[-1] - 1)
    bound, order = upper.log().add_(noise).topk(exact + 1, dim=-1)
    chosen = order[:, :exact]
    ids, inside = _block_tokens(chosen, vocab)
    kept = (compared.gather(-1, ids) >= threshold) & inside
    mass = (exp_weights(logits.gather(-1, ids), top) * kept).view(rows, exact, RACE_BLOCK).sum(-1)
    score = mass.log_().add_(noise.gather(-1, chosen))
    first_two, at = score.topk(2, dim=-1)
    best = first_two[:, :1]
    decided = (best > bound[:, exact:] + _CERTIFY_MARGIN) & (best > first_two[:, 1:] + _CERTIFY_MARGIN)
    return chosen.gather(-1, at[:, :1]), decided.squeeze(-1)


def race_sample_candidates(values: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """:func:`race_sample` on a candidate list (``[B, K]`` values and token ids; every other
    token ``-inf``): the same two stages with the same noise, so the same token as on the dense
    row (block masses are summed in another order, which can only matter at float32 rounding)."""
    if vocab_size <= RACE_BLOCK:
        return race_candidates(values, ids, keys)
    if _triton.available(values) and values.shape[-1] <= _PAIRWISE_MAX:
        return _triton.race_blocks_candidates(values, ids, keys, _stream_salt(_BLOCK_STREAM), RACE_BLOCK)
    # Block masses are float64 sums rounded once to float32: the same float32 whatever the
    # order of the sum (the Triton kernel sums in another order), short of a float64 rounding
    # landing on a float32 rounding boundary.
    weights = exp_weights(values, safe_top(values)).double()
    block = torch.div(ids, RACE_BLOCK, rounding_mode="floor")
    if values.shape[-1] <= _PAIRWISE_MAX:
        same = block.unsqueeze(-1) == block.unsqueeze(-2)                      # [B, K, K]
        mass = (weights.unsqueeze(-2) * same).sum(-1).float()
    else:
        n_blocks = (vocab_size + RACE_BLOCK - 1) // RACE_BLOCK
        totals = torch.zeros(values.shape[0], n_blocks, dtype=weights.dtype, device=values.device)
        mass = totals.scatter_add_(-1, block, weights).gather(-1, block).float()
    chosen = race_candidates(mass.log(), block, _stream_keys(keys, _BLOCK_STREAM)).unsqueeze(-1)
    return race_candidates(values.masked_fill(block != chosen, float("-inf")), ids, keys)
