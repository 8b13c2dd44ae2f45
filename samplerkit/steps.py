"""Base classes for pipeline steps: :class:`Processor` (logits -> logits) and
:class:`Sampler` (logits -> token ids).

A step instance is built for one *batch composition*: it receives one validated
``Params`` per row and packs every numeric field into a ``[B]`` tensor once (``self.p``), so
the per-token hot path does no Python work per row. Host-side flags (``any_active``) let the
pipeline skip a step whose rows are all neutral without touching the device.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from types import SimpleNamespace
from typing import ClassVar

import torch

from samplerkit.context import StepContext
from samplerkit.ops.candidates import NEG_INF
from samplerkit.ops.truncation import cut_below, remove_unkept
from samplerkit.params import NoParams, StepParams
from samplerkit.spec import StepSpec


class Step:
    """Shared machinery of processors and samplers: parameters packed per row."""

    #: Key of this step in YAML and in the registry (snake_case).
    name: ClassVar[str]
    #: The parameters, declared once; every default is the step's neutral value.
    Params: ClassVar[type[StepParams]] = NoParams
    #: History the decode loop must keep for this step: any of ``{"generated", "counts"}``.
    uses: ClassVar[frozenset[str]] = frozenset()
    #: True when the step never changes which token has the highest logit (lets a greedy
    #: pipeline skip it, as vLLM's ``is_argmax_invariant``).
    argmax_invariant: ClassVar[bool] = False

    def __init__(self, rows: Sequence[StepParams], device: torch.device | str = "cpu"):
        if not rows:
            raise ValueError(f"{type(self).__name__} needs parameters for at least one row")
        self.rows: tuple[StepParams, ...] = tuple(rows)
        self.device = torch.device(device)
        # Rows usually share one params object: ask each distinct object once.
        neutral_by_id: dict[int, bool] = {}
        neutral = [neutral_by_id.setdefault(id(row), row.is_neutral()) if id(row) not in neutral_by_id
                   else neutral_by_id[id(row)] for row in self.rows]
        #: Host-side flags, computed once per batch composition.
        self.any_active: bool = not all(neutral)
        self.all_active: bool = not any(neutral)
        #: ``[B]`` bool: rows this step changes.
        self.active = torch.tensor([not n for n in neutral], dtype=torch.bool, device=self.device)
        #: Numeric parameters packed as ``[B]`` tensors: ``self.p.top_p`` and so on.
        self.p = SimpleNamespace(**_pack_numeric_fields(self.rows, self.device))

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @classmethod
    def for_batch(cls, params: StepParams, batch_size: int, device: torch.device | str = "cpu"):
        """The step with the same parameters on every row."""
        return cls([params] * batch_size, device)

    @classmethod
    def spec(cls, **params):
        """A validated step for building pipelines in Python: ``Temperature.spec(temperature=0.7)``."""
        return StepSpec(cls, cls.Params(**params), "", cls.__module__)


class Processor(Step):
    """Transforms logits: ``[B, V]`` float32 in, ``[B, V]`` float32 out.

    Implement :meth:`apply`. With ``inplace = True`` (the default) it may modify ``logits``
    in place and return it: the pipeline then hands it a tensor the pipeline owns, never the
    caller's. A step that always returns a new tensor sets ``inplace = False`` and saves the
    pipeline that copy. Removed tokens become ``-inf``; every row must keep at least one
    finite logit; neutral rows must come out unchanged.
    """

    #: Whether :meth:`apply` may write into its input (then the pipeline copies the caller's).
    inplace: ClassVar[bool] = True
    #: True when, on rows without NaN or ``+inf``, the step never writes NaN or ``+inf``
    #: (whatever its validated parameters and however large the finite logits). The pipeline
    #: checks the output of every other step, so that a NaN a step writes makes the row invalid
    #: even when a later step removes that token; declaring it saves that read pass.
    #: :func:`samplerkit.testing.check_processor` tests the claim at extreme values.
    keeps_finite: ClassVar[bool] = False

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def apply_into(self, logits: torch.Tensor, out: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """:meth:`apply` writing into ``out``, a pipeline-owned buffer shaped like ``logits``
        (the pipeline calls this when ``logits`` is the caller's). The default copies then
        applies in place; an elementwise step overrides it to save that pass."""
        return self.apply(out.copy_(logits), ctx)

    # -- optional fast path on candidate lists (see samplerkit.ops.candidates) -----------
    def select_candidates(self, logits: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Apply this step to dense logits and return the survivors as ``(values, ids)``
        (``[B, K]``, values sorted descending, ``-inf`` in unused slots), or ``None`` to use
        :meth:`apply` instead. A threshold step whose survivors do not fit may return its
        :class:`~samplerkit.ops.truncation.Cut` instead (the pipeline applies it to these very
        logits, or hands it to the sampler), so work done here is not repeated. Must equal
        :meth:`apply` exactly."""
        return None

    def apply_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Apply this step to a candidate list (every other token is ``-inf``); return the new
        values, still sorted descending, or ``None`` if the step needs dense logits."""
        return None

    def select_cut(self, logits: torch.Tensor, ctx: StepContext):
        """This step as a per-row threshold, a :class:`samplerkit.ops.truncation.Cut` (the step
        keeps ``x >= threshold`` and sets the rest to ``-inf``), or ``None``. The pipeline may
        then hand the threshold to the sampler instead of writing the truncated ``[B, V]`` logits
        (last processor, while sampling). Must equal :meth:`apply` exactly."""
        return None

    #: True when, for this batch, the step is an elementwise map that never reverses the order
    #: of two logits and equals :meth:`apply_candidates` on any subset (temperature without
    #: greedy rows). The pipeline may then defer it past a rank-based selection.
    monotone: bool = False

    def select_candidates_after(self, logits: torch.Tensor, ctx: StepContext, transform,
                                divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`select_candidates` on logits that deferred monotone steps have not yet
        transformed; ``transform(values, ids)`` applies them to selected values. ``divisor``:
        when the deferred steps are exactly one :meth:`fused_divisor` step, its ``[B, 1]``
        divisor, so a kernel can fuse ``x / divisor`` instead of calling ``transform``. Only a
        selection that depends on ranks alone (top_k) can do this; ``None`` makes the pipeline
        apply the deferred steps densely first."""
        return None

    def fused_divisor(self) -> torch.Tensor | None:
        """For a :attr:`monotone` step that is exactly ``x / divisor`` per row, saturated at the
        float32 range (temperature): the ``[B, 1]`` divisor, which the pipeline hands to a
        following :meth:`select_candidates_after`; ``None`` otherwise."""
        return None


class MaskProcessor(Processor):
    """A truncation written as a kept-token mask: implement :meth:`keep` (dense ``[B, V]``) and,
    for the candidate-list fast path, optionally :meth:`keep_candidates`. Neutral rows are
    left unchanged and removed tokens become ``-inf``; the base class does both."""

    argmax_invariant = True
    # Removal only: every output value is an input value or -inf.
    keeps_finite = True

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._work: dict = {}      # [B, V] buffers reused from step to step

    def keep(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def keep_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """The kept mask ``[B, K]`` of a candidate list, or ``None`` to need dense logits."""
        return None

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self._remove(logits, self.keep(logits, ctx))

    def apply_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        keep = self.keep_candidates(values, ids, ctx)
        return None if keep is None else self._remove(values, keep)

    def _remove(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if not self.all_active:
            keep = keep | ~self.active.unsqueeze(-1)
        return remove_unkept(x, keep, self._work)


class ThresholdProcessor(MaskProcessor):
    """A truncation that keeps ``x >= threshold`` per row: implement :meth:`threshold`
    (``[B, 1]``). The base class derives the mask, writes the cut with
    :func:`samplerkit.ops.truncation.cut_below` (arithmetic, no bool mask; in place or into the
    pipeline's buffer) and gives neutral rows the threshold ``-inf``. Override :meth:`select_cut`
    to hand the sampler the threshold (it usually has the row maximum at hand)."""

    def threshold(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _for_rows(self, threshold: torch.Tensor) -> torch.Tensor:
        """``threshold`` with neutral rows set to ``-inf`` (they keep everything)."""
        if self.all_active:
            return threshold
        return threshold.masked_fill(~self.active.unsqueeze(-1), NEG_INF)

    def keep(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return logits >= self._for_rows(self.threshold(logits))

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return cut_below(logits, self._for_rows(self.threshold(logits)), out=logits, work=self._work)

    def apply_into(self, logits: torch.Tensor, out: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return cut_below(logits, self._for_rows(self.threshold(logits)), out=out)   # no separate copy


class Sampler(Step):
    """Selects one token per row: ``[B, V]`` float32 logits in, ``[B]`` int64 ids out.

    Samplers always run (they have no neutral state). ``seeds`` (one optional int per row)
    make a row's draws reproducible independently of the rest of the batch.
    """

    #: Whether this sampler draws at random (the pipeline passes seeds only to those).
    stochastic: ClassVar[bool] = False
    #: True when :meth:`sample` returns each row's argmax (the lowest id among ties): the
    #: pipeline then skips processors that are all ``argmax_invariant`` before it.
    picks_argmax: ClassVar[bool] = False
    #: Whether :meth:`sample_cut` honours ``cut.source`` (:class:`samplerkit.ops.truncation.Cut`);
    #: only such samplers are handed a truncation followed by monotone steps as a cut.
    cut_source: ClassVar[bool] = False

    def sample(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def sample_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Sample from a candidate list (see :meth:`Processor.select_candidates`); ``None``
        makes the pipeline densify and call :meth:`sample`. Must draw the same token."""
        return None

    def sample_cut(self, logits: torch.Tensor, cut, ctx: StepContext) -> torch.Tensor | None:
        """Sample from ``logits`` truncated by ``cut`` (see :meth:`Processor.select_cut`) without
        the truncated logits being written; ``None`` makes the pipeline apply the cut and call
        :meth:`sample`. Must draw the same token."""
        return None


def _pack_numeric_fields(rows: Sequence[StepParams], device: torch.device) -> dict[str, torch.Tensor]:
    """Pack each bool/int/float field into a ``[B]`` tensor (bool, int64 or float32).

    An optional number (``float | None``, ``int | None``) is packed too: rows that gave ``None``
    hold NaN (floats) or 0 (ints, bools: False) there, and ``<field>_given`` (``[B]`` bool) says
    which rows gave a number, so a step can treat ``None`` as "off" per row without Python work
    per token. Fields of other types (lists, strings) are not packed.
    """
    packed: dict[str, torch.Tensor] = {}
    for name, field in type(rows[0]).model_fields.items():
        values = [getattr(row, name) for row in rows]
        numbers = [v for v in values if v is not None]
        kind = _numeric_kind(numbers, field.annotation)
        if kind is None:
            continue
        fill = {torch.bool: False, torch.int64: 0, torch.float32: float("nan")}[kind]
        packed[name] = torch.tensor([fill if v is None else v for v in values], dtype=kind, device=device)
        if _is_optional(field.annotation):
            packed[f"{name}_given"] = torch.tensor([v is not None for v in values], dtype=torch.bool, device=device)
    return packed


def _numeric_kind(numbers: list, annotation) -> torch.dtype | None:
    """The tensor dtype of a field from its non-None values (or, when every row gave None, from
    its declared type); None for fields that are not numbers."""
    if numbers:
        if all(isinstance(v, bool) for v in numbers):
            return torch.bool
        if all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
            return torch.int64
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            return torch.float32
        return None
    declared = set(typing.get_args(annotation)) - {type(None)}
    for python_type, dtype in ((bool, torch.bool), (int, torch.int64), (float, torch.float32)):
        if declared == {python_type}:
            return dtype
    return None


def _is_optional(annotation) -> bool:
    """``X | None`` / ``Optional[X]``."""
    return type(None) in typing.get_args(annotation)
