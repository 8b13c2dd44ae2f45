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


def race_sample(logits: torch.Tensor, keys: torch.Tensor, candidate_limit: int | None = None) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)`` by the Gumbel-max race.

    Only finite logits can win. When every row has at most ``candidate_limit`` finite logits
    (a truncation ran before), noise is computed for the candidates only; the result is the
    same token as the full computation, because a token's noise depends only on its id.

    >>> x = torch.tensor([[0.0, float('-inf'), 1.0]])
    >>> keys = row_keys(torch.tensor([7]), torch.tensor([0]))
    >>> int(race_sample(x, keys)) in (0, 2)
    True
    """
    vocab = logits.shape[-1]
    if candidate_limit is not None and candidate_limit < vocab // 4:
        values, ids = logits.topk(max(candidate_limit, 1), dim=-1)
        winner = (values + gumbel_noise(keys, ids)).argmax(dim=-1, keepdim=True)
        return ids.gather(-1, winner).squeeze(-1)
    ids = torch.arange(vocab, device=logits.device)
    return (logits + gumbel_noise(keys, ids)).argmax(dim=-1)
