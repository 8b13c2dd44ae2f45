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

    Implement :meth:`apply`; the pipeline hands it a tensor the pipeline owns, never the
    caller's, so it may modify ``logits`` in place and return it. Removed tokens become
    ``-inf``; every row must keep at least one finite logit; neutral rows must come out
    unchanged. This is the whole public contract: the pipeline calls nothing else on a
    processor. (The built-ins' candidate-list and cut fast paths live in
    :mod:`samplerkit.fastpath`, an internal layer.)
    """

    #: True when, on rows without NaN or ``+inf``, the step never writes NaN or ``+inf``
    #: (whatever its validated parameters and however large the finite logits). The pipeline
    #: checks the output of every other step, so that a NaN a step writes makes the row invalid
    #: even when a later step removes that token; declaring it saves that read pass.
    #: :func:`samplerkit.testing.check_processor` tests the claim at extreme values.
    keeps_finite: ClassVar[bool] = False

    # What the step does to the distribution, declared so that tools reason about a pipeline
    # without a list of built-in names (``samplerkit lint``, docs/lint.md). A wrong claim makes
    # lint give wrong advice; it never changes what the pipeline computes.
    #: True when the step only removes tokens (writes ``-inf``), choosing them from the row's
    #: own logits (their values or ranks: top_k, top_p, min_p), and never changes a kept logit.
    truncates: ClassVar[bool] = False
    #: For a truncation: the kept set is the same when the row's logits are first divided by a
    #: positive number (top_k, which reads ranks only; top_n_sigma), so its place relative to a
    #: :attr:`rescales` step does not matter.
    scale_invariant: ClassVar[bool] = False
    #: True when the step divides each row's logits by a positive number (temperature): a
    #: truncation that reads probabilities (top_p, min_p) keeps another set before than after it.
    rescales: ClassVar[bool] = False
    #: True when the step removes tokens by identity (a list, a grammar, the history) whatever
    #: their probability: after a truncation it may remove every token the truncation kept.
    constrains: ClassVar[bool] = False
    #: True when the step restricts each row to a language whose sentences end (a grammar,
    #: a JSON schema): EOS is allowed only where the text is complete. In ``segments:`` such a
    #: step's EOS closes its segment, and the step may be written as a segment key.
    completes: ClassVar[bool] = False
    #: True when the step reads the backend's token strings (``ctx.token_vocabulary``), as a
    #: grammar does: it runs only where the backend provides them (see ``Backend.token_vocabulary``).
    needs_vocabulary: ClassVar[bool] = False
    #: Whether the step draws at random (xtc's coin).
    stochastic: ClassVar[bool] = False

    @classmethod
    def kept_at_most(cls, params: StepParams) -> int | None:
        """The most tokens a row keeps after this step with ``params`` (``top_k``: ``k``), or
        ``None`` when there is no such bound."""
        return None

    @classmethod
    def keeps_all_of(cls, params: StepParams) -> int:
        """A row with at most this many finite logits keeps all of them through this step with
        ``params``. Default: 1 for a :attr:`truncates` step (every row keeps a token), else 0."""
        return 1 if cls.truncates else 0

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


class Sampler(Step):
    """Selects one token per row: ``[B, V]`` float32 logits in, ``[B]`` int64 ids out.

    Samplers always run (they have no neutral state). ``seeds`` (one optional int per row)
    make a row's draws reproducible independently of the rest of the batch. The pipeline calls
    only :meth:`sample` (the built-ins' fast paths are in :mod:`samplerkit.fastpath`).
    """

    #: Whether this sampler draws at random (the pipeline passes seeds only to those).
    stochastic: ClassVar[bool] = False
    #: True when :meth:`sample` returns each row's argmax (the lowest id among ties): the
    #: pipeline then skips processors that are all ``argmax_invariant`` before it.
    picks_argmax: ClassVar[bool] = False

    def sample(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


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
