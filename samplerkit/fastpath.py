"""The internal fast-path layer of the built-in steps (not part of the plugin contract).

The public :class:`~samplerkit.steps.Processor` is ``apply`` plus declared properties; the
public :class:`~samplerkit.steps.Sampler` is ``sample``. The built-ins derive from the classes
here instead, which add optional forms the pipeline may use in place of a dense ``[B, V]``
pass: a short sorted candidate list ``(values, ids)`` after a truncation, a truncation's
per-row threshold (:class:`~samplerkit.ops.truncation.Cut`) handed to the sampler, writing
into a pipeline-owned buffer, and deferring monotone steps (temperature) past a rank-based
selection. Every fast form must give exactly what the dense form gives.

:class:`~samplerkit.pipeline.BoundPipeline` decides once, when it is bound, which steps are
fast-path steps (``isinstance``); it never asks a plain ``Processor`` or ``Sampler`` for any
of these methods. :class:`MaskProcessor` and :class:`ThresholdProcessor` (public: the short way
to write a truncation) derive from :class:`FastPathProcessor`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from samplerkit.context import StepContext
from samplerkit.ops.candidates import NEG_INF
from samplerkit.ops.truncation import cut_below, remove_unkept
from samplerkit.steps import Processor, Sampler


class FastPathProcessor(Processor):
    """A processor with the optional fast forms the pipeline may call instead of :meth:`apply`.

    Every default declines (returns ``None``) or falls back to :meth:`apply`, so a subclass
    overrides only the forms it has."""

    #: The step keeps nothing from one call to the next but scratch workspaces (``_work``),
    #: and building it depends only on its rows and the device (a seeded step's streams: on the
    #: rows' seeds). The one-shot ``Pipeline.sample``/``process`` may then reuse an instance
    #: built for the same rows and seeds instead of building it again. A subclass that carries
    #: state from call to call sets ``reusable = False``.
    reusable: ClassVar[bool] = True

    #: Whether :meth:`apply` may write into its input (then the pipeline copies the caller's
    #: first, or calls :meth:`apply_into`). A step that always returns a new tensor sets
    #: ``inplace = False`` and saves the pipeline that copy. (A plain ``Processor`` is always
    #: treated as in place.)
    inplace: ClassVar[bool] = True

    #: True when, for this batch, the step is an elementwise map that never reverses the order
    #: of two logits and equals :meth:`apply_candidates` on any subset (temperature without
    #: greedy rows). The pipeline may then defer it past a rank-based selection.
    monotone: bool = False

    def apply_into(self, logits: torch.Tensor, out: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """:meth:`apply` writing into ``out``, a pipeline-owned buffer shaped like ``logits``
        (the pipeline calls this when ``logits`` is the caller's). The default copies then
        applies in place; an elementwise step overrides it to save that pass."""
        return self.apply(out.copy_(logits), ctx)

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


class MaskProcessor(FastPathProcessor):
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


class FastPathSampler(Sampler):
    """A sampler with the optional fast forms the pipeline may call instead of :meth:`sample`."""

    #: The step keeps nothing from one call to the next but scratch workspaces (``_work``),
    #: and building it depends only on its rows and the device (a seeded step's streams: on the
    #: rows' seeds). The one-shot ``Pipeline.sample``/``process`` may then reuse an instance
    #: built for the same rows and seeds instead of building it again. A subclass that carries
    #: state from call to call sets ``reusable = False``.
    reusable: ClassVar[bool] = True

    #: Whether :meth:`sample_cut` honours ``cut.source`` (:class:`samplerkit.ops.truncation.Cut`);
    #: only such samplers are handed a truncation followed by monotone steps as a cut.
    cut_source: ClassVar[bool] = False

    def sample_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Sample from a candidate list (see :meth:`FastPathProcessor.select_candidates`); ``None``
        makes the pipeline densify and call :meth:`sample`. Must draw the same token."""
        return None

    def sample_cut(self, logits: torch.Tensor, cut, ctx: StepContext) -> torch.Tensor | None:
        """Sample from ``logits`` truncated by ``cut`` (see :meth:`FastPathProcessor.select_cut`)
        without the truncated logits being written; ``None`` makes the pipeline apply the cut and
        call :meth:`sample`. Must draw the same token."""
        return None
