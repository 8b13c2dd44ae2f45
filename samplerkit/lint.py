"""``samplerkit lint``: warnings about pipelines that are legal but probably not what was meant.

Every rule reasons from what the steps *declare* (:class:`samplerkit.steps.Processor` and
:class:`samplerkit.steps.Sampler` class attributes: ``truncates``, ``kept_at_most()``,
``keeps_all_of()``, ``scale_invariant``, ``rescales``, ``constrains``, ``stochastic``,
``argmax_invariant``, ``picks_argmax``, ``uses``), never from a list of built-in names, so a
plugin's steps take part as soon as they declare the same properties. Each warning names the
config location (``pipeline[2] top_p``) and says in one line why it matters.
docs/lint.md shows every rule with its real output.

Two facts the rules lean on: no step brings a removed token back (``-inf`` plus or times
anything stays ``-inf``), so the number of tokens a row keeps never grows along the pipeline;
and a row with one token left is drawn as that token whatever comes after.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:      # the CLI imports this module for its arguments: torch loads only when linting
    from samplerkit.config import GenerationConfig, RunConfig
    from samplerkit.pipeline import Pipeline
    from samplerkit.spec import StepSpec

#: Every rule: its name and what it reports (docs/lint.md has an example of each).
RULES: dict[str, str] = {
    "neutral": "a step whose parameters make it do nothing",
    "repeated": "the same step twice in one pipeline",
    "no-effect": "a step after which a later step can change nothing (top_k 50 after top_k 10, "
                 "top_p after top_k 1)",
    "ignored-by-greedy": "an argmax-invariant step under a sampler that picks the argmax",
    "randomness-unused": "a random sampler drawing from rows that an earlier step cut to one token",
    "random-under-greedy": "a random processor (xtc) under a greedy sampler",
    "preset-order": "steps in another order than the engine the config's preset imitates",
    "temperature-after-truncation": "a rescaling step (temperature) after a truncation that reads "
                                    "probabilities: legal, but not transformers'/vLLM's distribution",
    "can-empty-row": "a constraint step after a truncation: it may remove every token that was kept",
    "history-not-kept": "a step that reads the generated tokens in a run that generates at most one",
}


@dataclass(frozen=True)
class LintWarning:
    """One finding: the ``rule`` (a key of :data:`RULES`), the config ``location``
    (``pipeline[2] top_p``), what is wrong and ``why`` it matters."""

    rule: str
    location: str
    message: str
    why: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message} [{self.rule}]\n    why: {self.why}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def lint_pipeline(processors: Sequence[StepSpec] | Pipeline, sampler: StepSpec | None = None, *,
                  generation: GenerationConfig | None = None, preset: str | None = None,
                  from_preset: bool = False) -> list[LintWarning]:
    """The warnings for ``processors`` (in order) followed by ``sampler`` (or a
    :class:`~samplerkit.pipeline.Pipeline`).

    ``generation``: the run's loop options, when known (the history rule reads
    ``max_new_tokens``). ``preset``: the preset the config starts from; the order rule compares
    with its pipeline. ``from_preset``: the steps are the preset's own (the config did not
    replace its ``pipeline``): neutral steps are then not reported, since presets keep them so
    that ``--set`` can turn them on.
    """
    from samplerkit.pipeline import Pipeline
    from samplerkit.spec import StepSpec

    if isinstance(processors, Pipeline):
        processors, sampler = processors.processors, processors.sampler
    if sampler is None:
        raise TypeError("lint_pipeline needs a sampler StepSpec (or a Pipeline)")
    steps = [spec if spec.location else StepSpec(spec.cls, spec.params, f"pipeline[{i}] {spec.name}", spec.plugin)
             for i, spec in enumerate(processors)]
    sampler_at = sampler.location or f"sampler {sampler.name}"
    preset_names = _preset_step_names(preset) if preset else None
    active = [not spec.params.is_neutral() for spec in steps]
    out: list[LintWarning] = []

    def warn(rule: str, location: str, message: str, why: str) -> None:
        out.append(LintWarning(rule, location, message, why))

    greedy = bool(getattr(sampler.cls, "picks_argmax", False))
    seen: dict[str, str] = {}
    bound: tuple[int, str] | None = None          # (most tokens a row keeps so far, the step that set it)
    truncation: StepSpec | None = None            # the first active truncation so far
    reads_probabilities: StepSpec | None = None   # the first whose kept set a rescaling changes
    for i, spec in enumerate(steps):
        cls = spec.cls
        if spec.name in seen:
            warn("repeated", spec.location, f"{spec.name} already runs at {seen[spec.name]}",
                 f"the two apply one after the other (a penalty compounds, a truncation keeps the smaller set): "
                 f"keep one {spec.name} with the values you mean")
        else:
            seen[spec.name] = spec.location
        if not active[i]:
            if not from_preset:
                warn("neutral", spec.location, f"does nothing with {_params(spec)}",
                     "every parameter is at its neutral value, so the step is skipped: remove it or set a value")
            continue
        if greedy and cls.argmax_invariant:
            warn("ignored-by-greedy", spec.location,
                 f"never changes which token is most likely, and the sampler {sampler.name} picks that token",
                 f"{sampler.name} draws the argmax, which this step leaves where it is, so it changes no token "
                 f"drawn: remove it, or use a random sampler (categorical)")
        elif bound is not None and bound[0] <= 1 and not cls.constrains:
            warn("no-effect", spec.location, f"can change nothing: {bound[1]} leaves at most one token per row",
                 "a row with one token left is drawn as that token whatever later steps do to its logit")
        elif bound is not None and cls.truncates and cls.keeps_all_of(spec.params) >= bound[0]:
            warn("no-effect", spec.location,
                 f"can remove nothing: {bound[1]} keeps at most {bound[0]} tokens and {spec.name} keeps every "
                 f"token of a row with at most {cls.keeps_all_of(spec.params)}",
                 f"removed tokens never come back, so at most {bound[0]} reach {spec.name}: drop it, or make it "
                 f"cut deeper than {bound[1]}")
        if greedy and getattr(cls, "stochastic", False):
            warn("random-under-greedy", spec.location, f"draws at random under the greedy sampler {sampler.name}",
                 f"greedy output is meant to be deterministic; {spec.name}'s coin makes it random and moves the "
                 f"argmax: use a random sampler (categorical) or remove {spec.name}")
        if cls.constrains and truncation is not None:
            warn("can-empty-row", spec.location, f"runs after the truncation {truncation.location}",
                 f"it may remove every token {truncation.name} kept (the row is then left unconstrained or invalid): "
                 f"put {spec.name} before the truncations")
        # (A preset that has both steps decides their order: preset-order below.)
        if cls.rescales and reads_probabilities is not None \
                and not _both_in(preset_names, reads_probabilities.name, spec.name):
            cut = reads_probabilities
            warn("temperature-after-truncation", spec.location,
                 f"rescales after {cut.location}, which chose its tokens from the distribution before {spec.name}",
                 f"legal (llama.cpp's order), but transformers and vLLM apply {spec.name} first, so "
                 f"{cut.name} keeps another set there: move {spec.name} before {cut.name} to match them")
        if preset_names is not None and not from_preset:
            for earlier in steps[:i]:
                if _same_order_in(preset_names, spec.name, earlier.name):
                    warn("preset-order", spec.location,
                         f"runs after {earlier.location}, but preset {preset} runs {spec.name} before {earlier.name}",
                         f"the preset imitates an engine's order; this order gives another distribution than that "
                         f"engine's: move {spec.name} before {earlier.name}")
                    break
        if cls.uses and generation is not None and generation.max_new_tokens <= 1:
            warn("history-not-kept", spec.location,
                 f"reads the generated tokens (uses: {', '.join(sorted(cls.uses))}), but generation.max_new_tokens "
                 f"is {generation.max_new_tokens}",
                 "the one token of each row is drawn before any is generated, so this step sees no generated history "
                 "(only the prompt, if it reads the prompt)")
        if cls.truncates and truncation is None:
            truncation = spec
        if cls.truncates and not cls.scale_invariant and reads_probabilities is None:
            reads_probabilities = spec
        most = cls.kept_at_most(spec.params)
        if most is not None and (bound is None or most < bound[0]):
            bound = (most, spec.location)
    if bound is not None and bound[0] <= 1 and getattr(sampler.cls, "stochastic", False):
        warn("randomness-unused", sampler_at, f"draws at random, but {bound[1]} leaves one token per row",
             f"every draw is that token, so the seed changes nothing: use sampler: greedy (or let "
             f"{bound[1].rsplit(' ', 1)[-1]} keep more tokens)")
    return out


def lint_config(config: RunConfig, *, document: Mapping[str, Any] | None = None) -> list[LintWarning]:
    """The warnings for a resolved config. ``document``: the mapping as written, before its
    ``preset:`` was expanded (it tells which preset the config starts from, and whether its
    pipeline is the preset's own)."""
    from samplerkit.presets import PRESET_KEY, list_presets

    preset = document.get(PRESET_KEY) if document is not None else None
    if not isinstance(preset, str) or preset not in list_presets():
        preset = None
    from_preset = preset is not None and "pipeline" not in document
    out = lint_pipeline(config.processors, config.sampler, generation=config.generation, preset=preset,
                        from_preset=from_preset)
    for seg in config.segments:          # each segment's own pipeline; its steps carry their location
        if not seg.location.endswith(".after"):      # `after:` on segment 0 runs the top-level pipeline
            out.extend(lint_pipeline(seg.processors, seg.sampler, generation=config.generation))
    return out


def _params(spec: StepSpec) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in spec.params.model_dump().items()) or "no parameters"


def _preset_step_names(name: str) -> list[str]:
    from samplerkit.presets import load_preset

    names = []
    for entry in load_preset(name).get("pipeline", []):
        names.extend([entry] if isinstance(entry, str) else list(entry) if isinstance(entry, dict) else [])
    return names


def _both_in(names: list[str] | None, a: str, b: str) -> bool:
    return bool(names) and a in names and b in names


def _same_order_in(names: list[str] | None, first: str, then: str) -> bool:
    """Whether ``names`` (a preset's steps) has ``first`` before ``then``."""
    if not names or first not in names or then not in names:
        return False
    return names.index(first) < names.index(then)


# -- the command line -------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML run config (optional with --preset)")
    parser.add_argument("--preset", metavar="NAME", help="start from a shipped preset (see `samplerkit presets`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the warnings as one JSON list")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when there is any warning")


def load_config(config_file: str | None, overrides: Sequence[str] = (), preset: str | None = None,
                ) -> tuple[dict[str, Any], RunConfig]:
    """``(document, config)`` as the CLI reads them (:func:`samplerkit.config.command_line_data`):
    the YAML file (plus ``--preset``) as written, and the config after the preset and the
    ``--set`` overrides, resolved without the plugins the document blocks."""
    from samplerkit.config import command_line_data, resolve_unblocked

    document, data = command_line_data(config_file, overrides, preset)
    return document, resolve_unblocked(data, config_file)[0]


def run(args: argparse.Namespace) -> int:
    from samplerkit.errors import SamplerkitError

    if not args.config_file and not args.preset:
        raise SamplerkitError("give a CONFIG file or --preset NAME")
    document, config = load_config(args.config_file, args.overrides, args.preset)
    warnings = lint_config(config, document=document)
    if args.json:
        print(json.dumps([w.as_dict() for w in warnings], indent=2))
    else:
        label = args.config_file or f"preset {args.preset}"
        for w in warnings:
            print(w)
        print(f"{label}: {len(warnings)} warning{'s' if len(warnings) != 1 else ''}")
    return 1 if args.strict and warnings else 0


__all__ = ["RULES", "LintWarning", "add_arguments", "lint_config", "lint_pipeline", "load_config", "run"]
