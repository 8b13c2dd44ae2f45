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

The hash is SplitMix64's finaliser on int64 tensors (wrapping multiplication; logical
shifts emulated with masks). Uniforms keep 24 bits (float32 resolution): ``u = (h + 1/2) 2^-24``.
"""

from __future__ import annotations

import torch

from samplerkit.ops import _triton

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 value with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_TOKEN_STRIDE = _signed(0xD1B54A32D192ED03)


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
    u = (_shift_right(h, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def uniform(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """One float64 uniform in ``[0, 1)`` per row key (53 bits), from an independent ``stream``."""
    h = _mix(keys + _signed(stream * 0x632BE59BD9B4E019))
    return _shift_right(h, 11).to(torch.float64) * (1.0 / (1 << 53))


def race_candidates(values: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Gumbel-max race among candidates ``(values, ids)`` ``[B, K]``; returns token ids ``[B]``.

    Each token's noise depends on its id only, so the winner is the token the race over the
    whole vocabulary would pick when every non-candidate is ``-inf``.
    """
    if _triton.available(values) and values.shape[-1] <= 1024:
        return _triton.race_candidates(values, ids.expand_as(values), keys)
    winner = (values + gumbel_noise(keys, ids)).argmax(dim=-1, keepdim=True)
    return ids.gather(-1, winner).squeeze(-1)


# Dense sampling looks at this many top candidates first.
DENSE_CANDIDATES = 64
_TAIL_BRANCH_STREAM = 1
_TAIL_DRAW_STREAM = 2


def race_sample(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)`` exactly, reading the vocabulary O(1) times.

    Two levels, each exact: with ``C`` the top ``K = 64`` logits of a row and ``q`` the
    probability mass outside them, the row draws from the tail with probability ``q`` and from
    ``C`` otherwise. Within ``C`` it runs the Gumbel-max race; within the tail it inverts the
    CDF in float64 (one cumulative sum, no sort). Then ``P(i) = (1 - q) p_i / (1 - q) = p_i`` for
    ``i`` in ``C`` and ``q p_j / q = p_j`` in the tail. After a truncation (every finite logit
    among the candidates) ``q = 0`` and only ``K`` noises are drawn. Small vocabularies run the
    race over every token.

    >>> x = torch.tensor([[0.0, float('-inf'), 1.0]])
    >>> keys = row_keys(torch.tensor([7]), torch.tensor([0]))
    >>> int(race_sample(x, keys)) in (0, 2)
    True
    """
    vocab = logits.shape[-1]
    if vocab <= 4 * DENSE_CANDIDATES:
        return race_candidates(logits, torch.arange(vocab, device=logits.device).expand_as(logits), keys)
    values, ids = logits.topk(DENSE_CANDIDATES, dim=-1)
    log_norm = torch.logsumexp(logits, dim=-1)
    return _two_level(values, ids, keys, log_norm, lambda rows: logits.index_select(0, rows).scatter(
        -1, ids.index_select(0, rows), float("-inf")))


def race_sample_candidates(values: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """:func:`race_sample` on a candidate list sorted descending (all else ``-inf``): the same
    token as on the dense row, except when the 64th-largest logit is tied."""
    if values.shape[-1] <= DENSE_CANDIDATES or vocab_size <= 4 * DENSE_CANDIDATES:
        return race_candidates(values, ids, keys)
    head_v, head_i = values[:, :DENSE_CANDIDATES], ids[:, :DENSE_CANDIDATES]
    rest_v, rest_i = values[:, DENSE_CANDIDATES:], ids[:, DENSE_CANDIDATES:]
    log_norm = torch.logsumexp(values, dim=-1)

    def tail(rows: torch.Tensor) -> torch.Tensor:
        # The dense tail in vocabulary order, restricted to its only finite entries.
        order = rest_i.index_select(0, rows).argsort(dim=-1)
        return rest_v.index_select(0, rows).gather(-1, order), rest_i.index_select(0, rows).gather(-1, order)

    return _two_level(head_v, head_i, keys, log_norm, tail)


def _two_level(values, ids, keys, log_norm, tail_of):
    tokens = race_candidates(values, ids, keys)
    has_tail = values[:, -1] > float("-inf")
    if not bool(has_tail.any()):
        return tokens
    tail_mass = (-torch.expm1(torch.logsumexp(values, dim=-1) - log_norm)).double().clamp(min=0.0)   # negate, then clamp
    use_tail = has_tail & (uniform(keys, _TAIL_BRANCH_STREAM) < tail_mass)
    if not bool(use_tail.any()):
        return tokens
    rows = use_tail.nonzero().squeeze(-1)
    tail = tail_of(rows)
    tail_values, tail_ids = tail if isinstance(tail, tuple) else (tail, None)
    probs = (tail_values.double() - log_norm.index_select(0, rows).double().unsqueeze(-1)).exp()
    cdf = probs.cumsum(dim=-1)
    target = uniform(keys.index_select(0, rows), _TAIL_DRAW_STREAM) * cdf[:, -1]
    position = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
    drawn = position.squeeze(-1) if tail_ids is None else tail_ids.gather(-1, position).squeeze(-1)
    return tokens.index_copy(0, rows, drawn)
