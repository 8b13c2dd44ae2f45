"""Seeded steps: per-row random streams that follow their rows, as a documented API.

A stochastic step (a sampler, or a processor that flips coins like ``xtc``) gives each row of
the batch its own *counter-based* random stream (:mod:`samplerkit.ops.random`): every random
number is a pure function of ``(row seed, step counter, token id or stream id)``. Hence a
seeded row draws the same tokens alone, in any batch and at any position, and nothing needs a
``torch.Generator`` per row or a host sync.

What a step gets from this module:

- :class:`SeedParams`: the standard ``seed: int | None`` parameter (``null`` draws a seed from
  torch's global generator when the batch is formed, so ``torch.manual_seed`` still makes a run
  reproducible);
- :class:`RowStreams`: the ``[B]`` seeds of a batch and the streams derived from them. With
  ``n = ctx.num_generated`` (the row's step counter) the row key is
  ``k = row_keys(seed, n)``, and

  - :meth:`RowStreams.race` draws token ``i`` with probability ``softmax(x)_i`` (the
    exponential race, ``argmax_i (x_i + G(k, i))``);
  - :meth:`RowStreams.gumbel` is the race's noise ``G(k, i)`` itself, for a custom race;
  - :meth:`RowStreams.uniform` is one uniform in ``[0, 1)`` per row from an independent
    stream ``s``: ``U(k, s)``, for coins and thresholds;

- :class:`Seeded`: the mixin that marks a step as owning ``self.streams``. When the decode loop
  drops finished rows or fans a prompt out to ``n`` samples, the pipeline builds the step anew
  for the new rows and calls :meth:`Seeded.follow_rows`, so an *unseeded* row keeps the seed
  drawn for it when the batch was formed (its stream continues instead of restarting);
- :class:`SeededSampler`: a :class:`~samplerkit.steps.Sampler` with all of the above; its default
  :meth:`~SeededSampler.sample` draws from ``softmax(logits)``.

Stream ids a plugin may use with :meth:`RowStreams.uniform`: any value of :func:`stream_id`
(``stream_id("myplugin.coin")``, a 63-bit hash of a name namespaced by your plugin), never one in
:data:`RESERVED_STREAMS`. The token race itself uses the row key and stream 3; do not reuse them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from pydantic import Field

from samplerkit.context import StepContext
from samplerkit.errors import short_repr
from samplerkit.ops.random import gumbel_noise, race_sample, row_keys, uniform
from samplerkit.params import StepParams
from samplerkit.steps import Sampler

__all__ = ["RESERVED_STREAMS", "RowStreams", "SeedParams", "Seeded", "SeededSampler", "stream_id"]

#: Stream ids taken by samplerkit itself (id -> what draws from it). ``0`` would repeat the race
#: noise of token 0; ``3`` is the block stage of the race (:func:`samplerkit.ops.race_sample`);
#: ``0x787463`` (ASCII ``xtc``) is the ``xtc`` coin.
RESERVED_STREAMS: dict[int, str] = {0: "the race noise of token 0", 3: "the block stage of the token race",
                                    0x787463: "the xtc coin"}

#: Seeds are drawn in ``[0, 2**62)``; user seeds may be anything in ``[0, 2**63)``.
_RANDOM_SEED_BOUND = 2**62


def stream_id(name: str) -> int:
    """A stream id for :meth:`RowStreams.uniform` from a name namespaced by its plugin.

    ``stream_id(name) = BLAKE2b-64(name) mod 2**63``, never a reserved id: stable across
    processes and versions (unlike ``hash``), and two plugins that namespace their names never
    share a stream.

    >>> stream_id("toy.coin") == stream_id("toy.coin") != stream_id("toy.other")
    True
    """
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"stream_id needs a name namespaced by your plugin, like 'myplugin.coin'; got {short_repr(name)}")
    value = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") % 2**63
    if value in RESERVED_STREAMS:     # pragma: no cover - 3 values out of 2**63
        raise ValueError(f"stream_id({name!r}) hits a reserved stream; pick another name")
    return value


def _draw_seeds(n: int) -> torch.Tensor:
    """``n`` seeds in ``[0, 2**62)`` from torch's global generator (CPU int64), in one call: the
    same numbers as ``n`` calls drawing one each."""
    return torch.randint(0, _RANDOM_SEED_BOUND, (n,), dtype=torch.int64)


class SeedParams(StepParams):
    """The standard seed parameter. Subclass it to add your own fields."""

    seed: int | None = Field(None, ge=0, lt=2**63,
                             description="random seed of the row's stream; null draws one at random")


class RowStreams:
    """The per-row seeds of a batch, ``[B]`` int64, and the counter-based streams they key.

    Build it with :meth:`for_rows`; re-index it with :meth:`select` (``[keep]`` rows, repeats
    allowed), which is what :meth:`Seeded.follow_rows` does.
    """

    __slots__ = ("seeds", "drawn")

    def __init__(self, seeds: torch.Tensor, drawn: tuple[int, ...] = ()):
        if seeds.dtype != torch.int64 or seeds.dim() != 1:
            raise ValueError(f"RowStreams needs [B] int64 seeds, got {tuple(seeds.shape)} {seeds.dtype}")
        self.seeds = seeds
        #: The rows whose seed was drawn from torch's global generator (no seed given), in the
        #: order they were drawn: what :meth:`redrawn` draws again.
        self.drawn = drawn

    @classmethod
    def for_rows(cls, rows: Sequence[StepParams], device: torch.device | str = "cpu", *,
                 draw_for: Sequence[bool] | None = None) -> RowStreams:
        """Seeds from each row's ``seed`` field; a ``None`` seed is drawn from torch's global
        generator (only for the rows where ``draw_for`` is true, default all: a step whose
        neutral rows never draw should not consume the global generator for them)."""
        seeds = [getattr(row, "seed", None) for row in rows]
        drawn = tuple(i for i, seed in enumerate(seeds) if seed is None and (draw_for is None or draw_for[i]))
        values = [0 if seed is None else seed for seed in seeds]
        for i, seed in zip(drawn, _draw_seeds(len(drawn)).tolist()):
            values[i] = seed
        return cls(torch.tensor(values, dtype=torch.int64, device=device), drawn)

    def redrawn(self) -> RowStreams:
        """These streams with new seeds for the rows in :attr:`drawn`, drawn from torch's global
        generator exactly as :meth:`for_rows` would draw them now (the same generator calls)."""
        if not self.drawn:
            return self
        fresh = _draw_seeds(len(self.drawn)).to(self.seeds.device)
        if len(self.drawn) == self.seeds.shape[0]:           # every row drew (no seeds given)
            return RowStreams(fresh, self.drawn)
        index = torch.tensor(self.drawn, dtype=torch.int64, device=self.seeds.device)
        return RowStreams(self.seeds.index_copy(0, index, fresh), self.drawn)

    def select(self, index: torch.Tensor | Sequence[int]) -> RowStreams:
        """The streams of rows ``index`` (``[B']`` int64, repeats duplicate a row's stream)."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.seeds.device)
        return RowStreams(self.seeds.index_select(0, index))

    def keys(self, ctx: StepContext) -> torch.Tensor:
        """Row keys ``[B]`` int64 for this step: ``row_keys(seed, ctx.num_generated)``."""
        return row_keys(self.seeds, ctx.num_generated)

    def race(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Token ids ``[B]``: token ``i`` with probability ``softmax(logits)_i``, exactly
        (``-inf`` never wins). Batch- and position-independent for a given seed and counter."""
        return race_sample(logits, self.keys(ctx))

    def gumbel(self, ctx: StepContext, token_ids: torch.Tensor) -> torch.Tensor:
        """The race noise ``G(k, i)`` (standard Gumbel) for ``token_ids`` ``[V]`` or ``[B, K]``."""
        return gumbel_noise(self.keys(ctx), token_ids)

    def uniform(self, ctx: StepContext, stream: int) -> torch.Tensor:
        """One float64 uniform in ``[0, 1)`` per row from stream ``stream`` (use
        :func:`stream_id`), independent of the token race and of other streams."""
        if stream in RESERVED_STREAMS:
            raise ValueError(f"stream {stream} is reserved for {RESERVED_STREAMS[stream]}; use stream_id('yourplugin.name')")
        return uniform(self.keys(ctx), stream)


class Seeded:
    """Mixin for a step (processor or sampler) that owns per-row random streams.

    Set ``self.streams`` (a :class:`RowStreams`) in ``__init__``. The pipeline keeps each row's
    stream when the batch changes: it builds the step for the new rows, then calls
    ``new.follow_rows(old, keep)``.
    """

    streams: RowStreams

    def reseed(self) -> None:
        """Draw new seeds for the rows that drew theirs when the step was built (no seed given),
        as building the step again now would: the same calls to torch's global generator. The
        one-shot ``Pipeline.sample`` reuses a step built by an earlier call this way instead of
        building it again. Override it if the step keeps more than ``self.streams`` that
        depends on those seeds."""
        self.streams = self.streams.redrawn()

    def follow_rows(self, previous: Seeded, keep: torch.Tensor) -> None:
        """Take over ``previous``'s streams for rows ``keep`` (``[B']`` int64 indices into the
        old batch). Override only to carry more per-row random state."""
        self.streams = previous.streams.select(keep)


class SeededSampler(Seeded, Sampler):
    """A stochastic sampler with one counter-based stream per row (see the module docs).

    Subclasses declare ``Params`` deriving from :class:`SeedParams` and usually override
    :meth:`sample`, drawing with ``self.streams.race(...)`` / ``.uniform(...)``. The default
    draws from ``softmax(logits)``, as ``categorical`` does.

    >>> import torch
    >>> s = SeededSampler([SeedParams(seed=1), SeedParams(seed=1)])
    >>> ids = s.sample(torch.zeros(2, 10), StepContext(2))
    >>> bool(ids[0] == ids[1])          # same seed, same counter: same draw
    True
    """

    stochastic = True
    Params = SeedParams

    def __init__(self, rows: Sequence[StepParams], device: torch.device | str = "cpu"):
        super().__init__(rows, device)
        self.streams = RowStreams.for_rows(self.rows, self.device)

    def sample(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.streams.race(logits, ctx)
