"""Export a run config as llama.cpp command-line flags, and read such flags back.

What: :func:`export_llamacpp` turns a resolved :class:`~samplerkit.config.RunConfig` into the
flags of ``llama-cli`` / ``llama-server`` (``--samplers "penalties;dry;...;temperature"`` in the
pipeline's order, each sampler's values, ``--seed``, ``-n``); :func:`import_llamacpp` turns such
flags back into a config mapping (llama.cpp's defaults for what they leave out).

Why exact or nothing: a user who moves a pipeline to llama.cpp must get the same distribution.
Whatever llama.cpp cannot express with the same semantics (a step it has no sampler for, a
second instance of a step with other values, penalties that are not adjacent, samplerkit-only
options such as ``include_prompt: false``, and the placements tests/conformance shows llama.cpp
runs differently, see :func:`_conformance`) is collected, each with its position and reason,
into ONE :class:`~samplerkit.errors.ConfigError`; nothing is dropped silently (a step at its
neutral value, which changes no logit, is left out with a note saying so). What is emitted is
checked by tests/conformance: llama.cpp's own sampler chain (llama-cpp-python's C API) and
samplerkit on the same logits keep the same tokens with the same probabilities, and their seeded
draws pass a chi-square test. Random draws never match bitwise (different generators), so a
seed only makes llama.cpp's run reproducible.

Samplers: ``categorical`` is ``dist``, ``greedy`` is ``--temp 0``; any other sampler exports when
its class declares a :class:`LlamaCppSampler` as ``llamacpp`` (samplerkit-mirostat does).

llama.cpp facts relied on (``common/arg.cpp``, ``common/sampling.cpp``, ``src/llama-sampling.cpp``):
its chain is ``logit_bias`` (always first) then ``--samplers`` in order then ``dist``; the
penalties (repeat, frequency, presence) are one sampler over the last ``--repeat-last-n`` tokens
of prompt + generated (``0``: off; ``-1``, once the whole context, is now rejected, as for
``--dry-penalty-last-n``); ``--temp 0`` keeps only the top logit;
``--mirostat`` ignores ``--samplers`` (its chain is ``temp`` then mirostat, with m = 100); a
sampler named twice in ``--samplers`` runs twice with the same flag values.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from samplerkit.config import RunConfig, StepSpec, resolve
from samplerkit.errors import ConfigError, ConfigIssue, short_repr
from samplerkit.registry import Registry, default_registry

#: llama.cpp's default ``--samplers`` (common_params_sampling::samplers).
DEFAULT_CHAIN = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")

#: samplerkit step -> llama.cpp sampler name (``--samplers``).
CHAIN_NAMES = {
    "repetition_penalty": "penalties", "frequency_penalty": "penalties", "presence_penalty": "penalties",
    "dry": "dry", "top_n_sigma": "top_n_sigma", "top_k": "top_k", "typical_p": "typ_p", "top_p": "top_p",
    "min_p": "min_p", "xtc": "xtc", "temperature": "temperature", "dynamic_temperature": "temperature",
}
_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")
_NO_SAMPLER = {
    "min_tokens": "llama.cpp has no minimum-length sampler",
    "bad_words": "llama.cpp has no banned-sequence sampler",
    "no_repeat_ngram": "llama.cpp has no n-gram ban (dry is its soft equivalent)",
    "allowed_tokens": "llama.cpp has no allow-list sampler (a grammar is the nearest)",
    "tfs": "llama.cpp removed tail-free sampling (Dec 2024)",
}
_SEED_MAX = 0xFFFFFFFE  # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"


@dataclass
class LlamaCppExport:
    """The flags (one argv list) and notes on semantics that differ without changing the result."""

    args: list[str]
    notes: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        """The flags, shell-quoted, ready to append to ``llama-cli`` or ``llama-server``."""
        return shlex.join(self.args)


@dataclass(frozen=True)
class LlamaCppSampler:
    """How a sampler maps to llama.cpp's flags: set it as the ``llamacpp`` class attribute of a
    :class:`~samplerkit.Sampler` and ``samplerkit export llamacpp`` (and :func:`import_llamacpp`)
    handle it without knowing its name. samplerkit-mirostat's, for example::

        llamacpp = LlamaCppSampler(flags={"--mirostat": "2"},
                                   params={"eta": "--mirostat-lr", "tau": "--mirostat-ent", "seed": "--seed"},
                                   replaces_chain=True)

    ``flags``: flags written as given (and, on import, the flags that select this sampler).
    ``params``: parameter name -> the flag that carries its value (``--seed`` as a seed).
    ``fixed``: parameters llama.cpp hard-codes (parameter -> its value); another value is refused.
    ``replaces_chain``: llama.cpp ignores ``--samplers`` under ``flags`` and runs ``temp`` then
    this sampler, so only a temperature step may precede it.
    """

    flags: Mapping[str, str]
    params: Mapping[str, str] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    replaces_chain: bool = False


def num(value: float | int) -> str:
    """``1.0`` -> ``1``, ``0.95`` -> ``0.95``: the shortest text that reads back the same float."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _Builder:
    def __init__(self, config: RunConfig):
        self.config = config
        self.chain: list[str] = []
        self.flags: dict[str, str] = {}          # insertion order = output order
        self.bias: list[str] = []
        self.issues: list[ConfigIssue] = []
        self.notes: list[str] = []
        self.chain_owner: dict[str, StepSpec] = {}
        self.owner_flags: dict[str, dict[str, str]] = {}     # the flags each chain sampler's first step set
        self.chain_steps: list[StepSpec] = []                # the step behind each b.chain entry
        self.penalty_groups: list[dict[str, StepSpec]] = []  # adjacent penalty steps, one `penalties` each
        self.check = True                                    # refuse what tests/conformance shows differs
        self.constraint: StepSpec | None = None              # the step exported as --json-schema / --grammar

    def issue(self, spec: StepSpec | str, message: str) -> None:
        where = spec if isinstance(spec, str) else spec.location or spec.name
        self.issues.append(ConfigIssue(where, message))

    def inexpressible(self, spec: StepSpec, message: str) -> bool:
        """A step llama.cpp cannot place: an error, unless the step is at its neutral value (it
        changes no logit), which is left out with a note. True when it was left out."""
        if spec.params.is_neutral():
            self.notes.append(f"{spec.location or spec.name}: left out, it is neutral (changes nothing); {message}")
            return True
        self.issue(spec, message)
        return False


def export_llamacpp(config: RunConfig) -> LlamaCppExport:
    """llama.cpp flags equivalent to ``config``; :class:`ConfigError` lists everything inexpressible,
    including the chains that tests/conformance shows llama.cpp runs differently (see :func:`_conformance`)."""
    return _export(config)


def _export(config: RunConfig, *, check_conformance: bool = True) -> LlamaCppExport:
    """:func:`export_llamacpp`; ``check_conformance=False`` gives the flags of a chain that llama.cpp
    would run differently too (the conformance suite uses it to show each refusal is real)."""
    b = _Builder(config)
    b.check = check_conformance
    native = _native_sampler(config.sampler)
    _model_flag(b)
    previous: str | None = None
    for index, spec in enumerate(config.processors):
        name, left_out = spec.name, False
        chain_name = CHAIN_NAMES.get(name)
        if name == "logit_bias":
            if index == 0:
                b.bias += [f"{tok}{'+' if v >= 0 else '-'}{num(abs(v))}" for tok, v in spec.params.bias.items()]
            else:
                left_out = b.inexpressible(spec, "llama.cpp applies logit_bias before every other sampler: "
                                                 "make it the first step")
        elif getattr(spec.cls, "needs_vocabulary", False):
            left_out = _constraint(b, spec, index)
        elif chain_name is None:
            left_out = b.inexpressible(spec, _NO_SAMPLER.get(name, f"llama.cpp has no {name!r} sampler"))
        elif native is not None and native.replaces_chain and name != "temperature":
            left_out = b.inexpressible(spec, f"llama.cpp ignores --samplers under {_flag_text(native.flags)} (its "
                                             f"chain is temperature -> {config.sampler.name}): only a temperature "
                                             "step may precede it")
        elif chain_name == "penalties":
            left_out = _add_penalty(b, spec, previous)
        elif chain_name in b.chain_owner:
            left_out = _repeat(b, spec, chain_name)
        else:
            b.chain_owner[chain_name] = spec
            b.chain.append(chain_name)
            b.chain_steps.append(spec)
            before = dict(b.flags)
            _STEP_FLAGS[name](b, spec)
            b.owner_flags[chain_name] = {k: v for k, v in b.flags.items() if before.get(k) != v}
        if not left_out:                         # a neutral step left out does not break adjacency
            previous = name
    if b.constraint is not None:
        _constraint_chain(b)
    if b.penalty_groups:
        _penalty_flags(b)
    if check_conformance:
        _conformance(b)
    _sampler(b, native)
    _generation(b)
    if config.segments:            # never dropped in silence: llama.cpp samples one chain throughout
        b.issue("segments", "llama.cpp samples every token with one chain; it has no per-segment pipelines "
                            "(docs/segments.md): export a config without segments")
    if b.issues:
        raise ConfigError(sorted(b.issues, key=_position), "llama.cpp export")
    args: list[str] = []
    for flag, value in b.flags.items():
        args += [flag] if flag in _SWITCHES else [flag, value]
    for bias in b.bias:
        args += ["--logit-bias", bias]
    return LlamaCppExport(args, b.notes)


#: llama.cpp samplers that change each logit on its own (no token removed): with only these (and
#: a plain temperature) in its chain, llama.cpp's sample-then-check grammar draws exactly from the
#: constraint applied first (see _constraint_chain).
_ELEMENTWISE_CHAIN = {"penalties", "dry"}


def _constraint(b: _Builder, spec: StepSpec, index: int) -> bool:
    """A constrained step as llama.cpp's ``--json-schema`` or ``--grammar`` (GBNF); True when left out."""
    if spec.params.is_neutral():
        return b.inexpressible(spec, "no rows are constrained, so llama.cpp needs no grammar")
    if b.constraint is not None:
        b.issue(spec, f"llama.cpp takes one grammar; {b.constraint.location or b.constraint.name} is exported already")
        return False
    before = [s for s in b.config.processors[:index] if s.name != "logit_bias" and not s.params.is_neutral()
              and CHAIN_NAMES.get(s.name) not in _ELEMENTWISE_CHAIN and s.name != "temperature"]
    if before:
        b.issue(spec, f"llama.cpp applies its grammar to the model's logits, before {before[0].name}: make "
                      f"{spec.name} the first step (after logit_bias)")
        return False
    params = spec.params
    if spec.name in ("json_schema", "json_object"):
        b.flags["--json-schema"] = json.dumps(params.source(), separators=(",", ":"))
        b.notes.append(f"{spec.location or spec.name}: llama.cpp converts the schema with its own json-schema-to-grammar: "
                       "the same JSON values, but its whitespace rules and unsupported keywords may differ from llguidance's")
    elif spec.name == "grammar" and params.gbnf is not None:
        b.flags["--grammar"] = params.gbnf
    elif spec.name == "choice":
        b.flags["--grammar"] = "root ::= " + " | ".join(json.dumps(o) for o in params.options)
    else:
        what = "a Lark grammar" if spec.name == "grammar" else f"a {spec.name} constraint"
        b.issue(spec, f"llama.cpp reads GBNF grammars and JSON schemas; {what} has no exact GBNF form here "
                      "(use grammar: {gbnf: ...} or json_schema)")
        return False
    b.constraint = spec
    return False


def _constraint_chain(b: _Builder) -> None:
    """llama.cpp samples from its chain, then checks the token against the grammar and only when it
    breaks it resamples with the grammar applied first: ``P(t) = q_t + q(invalid) q'_t`` for ``t``
    valid. When the chain changes each logit on its own (penalties, dry, temperature), ``q'`` is
    ``q`` renormalised over the valid tokens ``A`` and ``P(t) = q_t / q(A)``, exactly the constraint
    applied first; a step that removes tokens (top_k, top_p, ...) decides its cut without the
    grammar, and the two distributions differ."""
    for spec in b.chain_steps:
        chain_name = CHAIN_NAMES.get(spec.name)
        if chain_name in _ELEMENTWISE_CHAIN or spec.name == "temperature":
            continue
        b.issue(b.constraint, f"llama.cpp applies the grammar after its sampler chain (resampling only when the "
                              f"drawn token breaks it), so with {spec.location or spec.name} in the chain its "
                              f"distribution differs from {b.constraint.name} applied first; export without "
                              f"{spec.name}, or run the constraint in samplerkit")
        return


def _position(issue: ConfigIssue) -> tuple[int, int]:
    """Pipeline issues by step index, then the sampler's, then generation options'."""
    match = re.match(r"pipeline\[(\d+)\]", issue.location)
    if match:
        return (0, int(match.group(1)))
    return (1 if issue.location.startswith("sampler") else 2, 0)


# -- steps --------------------------------------------------------------------------------

def _add_penalty(b: _Builder, spec: StepSpec, previous: str | None) -> bool:
    """Place a penalty step in a ``penalties`` sampler; True when left out.

    Adjacent penalty steps (one of each at most) form one group, one ``penalties`` entry in
    ``--samplers``; a later group is another ``penalties`` entry, which llama.cpp runs with the
    same flag values, so :func:`_penalty_flags` accepts it only with the same values."""
    group = b.penalty_groups[-1] if b.penalty_groups else None
    if group is None or previous not in _PENALTIES or spec.name in group:
        group = {}
        b.penalty_groups.append(group)
        b.chain.append("penalties")
        b.chain_steps.append(spec)
        for flag in ("--repeat-penalty", "--repeat-last-n", "--frequency-penalty", "--presence-penalty"):
            b.flags.setdefault(flag, "?")        # filled by _penalty_flags, here for the output order
    group[spec.name] = spec
    p = spec.params
    if spec.name == "repetition_penalty":
        if not p.include_prompt and p.repetition_penalty != 1.0:
            b.issue(spec, "include_prompt: false has no llama.cpp equivalent (its window always covers the prompt)")
    else:
        value = getattr(p, spec.name)
        if value != 0.0:
            b.issue(spec, "samplerkit counts generated tokens only (as vLLM); llama.cpp counts the last "
                          "--repeat-last-n tokens of prompt + generated")
    return False


def _penalty_values(group: Mapping[str, StepSpec]) -> tuple[float, int | None, float, float]:
    """What one group does in llama.cpp's terms: (repeat penalty, its window or None when off, frequency, presence)."""
    rep = group.get("repetition_penalty")
    value = rep.params.repetition_penalty if rep else 1.0
    window = (rep.params.last_n if rep else 64) if value != 1.0 else None
    freq, pres = (getattr(group[n].params, n) if n in group else 0.0 for n in ("frequency_penalty", "presence_penalty"))
    return value, window, freq, pres


def _penalty_flags(b: _Builder) -> None:
    first = b.penalty_groups[0]
    reference = _penalty_values(first)
    dropped: list[int] = []
    for g, group in enumerate(b.penalty_groups[1:], start=1):
        if _penalty_values(group) == reference:
            continue
        head = next(iter(group.values()))
        if all(spec.params.is_neutral() for spec in group.values()):
            dropped.append(g)
            for spec in group.values():
                b.notes.append(f"{spec.location or spec.name}: left out, it is neutral (changes nothing)")
            continue
        b.issue(head, f"not adjacent to the other penalty steps ({next(iter(first.values())).location}) and "
                      "with other values: llama.cpp applies repetition, frequency and presence penalties together "
                      "as one `penalties` sampler, with one set of values wherever --samplers names it")
    if dropped:
        heads = {id(next(iter(b.penalty_groups[g].values()))) for g in dropped}
        kept = [(c, s) for c, s in zip(b.chain, b.chain_steps) if not (c == "penalties" and id(s) in heads)]
        b.chain, b.chain_steps = [c for c, _ in kept], [s for _, s in kept]
    for group in b.penalty_groups:
        rep = group.get("repetition_penalty")
        if rep is not None and len(group) > 1 and list(group).index("repetition_penalty") != 0 \
                and rep.params.repetition_penalty != 1.0:
            b.issue(rep, "llama.cpp's penalties sampler applies the repetition penalty first: put it before "
                         "frequency_penalty and presence_penalty")
    value, window, freq, pres = reference
    rep = first.get("repetition_penalty")
    last_n = rep.params.last_n if rep is not None else 64
    b.flags["--repeat-penalty"] = num(value)
    whole = last_n == 0 and value != 1.0
    if whole and b.check:
        b.issue(rep, _WHOLE_CONTEXT.format(flag="--repeat-last-n"))
    # 0 here: off (the group is neutral); -1 (unchecked only): what llama.cpp once read as the whole context.
    b.flags["--repeat-last-n"] = "-1" if whole else str(last_n)
    b.flags["--frequency-penalty"] = num(freq)
    b.flags["--presence-penalty"] = num(pres)


def _repeat(b: _Builder, spec: StepSpec, chain_name: str) -> bool:
    """A second step for a sampler already in the chain: llama.cpp runs it again with the same flag
    values (``--samplers top_k;temperature;top_k``), so it exports when its values are the same."""
    first = b.chain_owner[chain_name]
    saved, b.flags = b.flags, {}
    _STEP_FLAGS[spec.name](b, spec)
    mine, b.flags = b.flags, saved
    theirs = b.owner_flags[chain_name]
    keys = list(dict.fromkeys([*theirs, *mine]))
    clash = [k for k in keys if mine.get(k, _IMPLIED.get(k)) != theirs.get(k, _IMPLIED.get(k))]
    if clash:
        return b.inexpressible(spec, f"llama.cpp's {chain_name!r} sampler already comes from "
                                     f"{first.location or first.name} with "
                                     f"{_flag_text({k: theirs.get(k, _IMPLIED.get(k)) for k in clash})}; llama.cpp "
                                     f"has one value per flag, so a second {chain_name!r} needs the same values "
                                     f"(this step: {_flag_text({k: mine.get(k, _IMPLIED.get(k)) for k in clash})})")
    b.chain.append(chain_name)
    b.chain_steps.append(spec)
    return False


#: The value llama.cpp uses for a flag a step does not set (a plain temperature is temp_ext with range 0).
_IMPLIED = {"--dynatemp-range": "0", "--dynatemp-exp": "1"}


def _flag_text(flags: Mapping[str, str | None]) -> str:
    return " ".join(f"{k} {v}" for k, v in flags.items())


def _dry(b: _Builder, spec: StepSpec) -> None:
    p = spec.params
    b.flags["--dry-multiplier"] = num(p.multiplier)
    b.flags["--dry-base"] = num(p.base)
    b.flags["--dry-allowed-length"] = str(p.allowed_length)
    # Off (multiplier 0), the window does not matter: 0, llama.cpp's other "off", which imports back as it is.
    b.flags["--dry-penalty-last-n"] = "0" if p.multiplier == 0.0 else str(p.penalty_last_n)
    if p.multiplier == 0.0:
        return                                   # off: window and breakers do not matter
    if p.penalty_last_n == 0:
        if b.check:
            b.issue(spec, _WHOLE_CONTEXT.format(flag="--dry-penalty-last-n"))
        b.flags["--dry-penalty-last-n"] = "-1"
    if p.sequence_breakers:
        b.issue(spec, "sequence_breakers are token ids; llama.cpp takes strings (--dry-sequence-breaker) and "
                      "matches them differently: export without breakers or pass the strings yourself")
    else:
        b.flags["--dry-sequence-breaker"] = "none"   # llama.cpp's default is ["\n", ":", "\"", "*"]


#: samplerkit's window 0 is the whole context; llama.cpp (llama-cpp-python 0.3.36's) has no such value.
_WHOLE_CONTEXT = ("a window of 0 is the whole context in samplerkit, but llama.cpp's {flag} is a window >= 0 "
                  "where 0 switches the penalty off (-1, once 'whole context', is rejected): set a window as long "
                  "as your context (e.g. 4096), which penalises the same tokens")


def _min_keep(b: _Builder, spec: StepSpec, value: int) -> None:
    if value > 1:
        b.issue(spec, "llama.cpp's min_keep is one value shared by top_p, min_p, typical and xtc, not a "
                      "per-step option: only 1 exports")


def _typical(b: _Builder, spec: StepSpec) -> None:
    _min_keep(b, spec, spec.params.min_tokens_to_keep)
    b.flags["--typical"] = num(spec.params.typical_p)


def _xtc(b: _Builder, spec: StepSpec) -> None:
    b.flags["--xtc-probability"] = num(spec.params.probability)
    b.flags["--xtc-threshold"] = num(spec.params.threshold)
    if spec.params.probability > 0:
        b.notes.append(f"{spec.location}: llama.cpp's xtc draws from the --seed generator, not from xtc.seed; "
                       "the coin flips differ from samplerkit's")


def _temperature(b: _Builder, spec: StepSpec) -> None:
    b.flags["--temp"] = num(spec.params.temperature)


def _dynatemp(b: _Builder, spec: StepSpec) -> None:
    p = spec.params
    temp, delta = (p.low + p.high) / 2, (p.high - p.low) / 2
    b.flags["--temp"] = num(temp)
    b.flags["--dynatemp-range"] = num(delta)
    b.flags["--dynatemp-exp"] = num(p.exponent)


def _simple(flag: str, attr: str, off: str | None = None):
    def emit(b: _Builder, spec: StepSpec) -> None:
        value = getattr(spec.params, attr)
        b.flags[flag] = off if off is not None and value == 0 else num(value)
    return emit


_STEP_FLAGS = {
    "dry": _dry, "top_n_sigma": _simple("--top-nsigma", "top_n_sigma", off="-1"), "top_k": _simple("--top-k", "top_k"),
    "typical_p": _typical, "top_p": _simple("--top-p", "top_p"), "min_p": _simple("--min-p", "min_p"), "xtc": _xtc,
    "temperature": _temperature, "dynamic_temperature": _dynatemp,
}


# -- conformance -------------------------------------------------------------------------

def _conformance(b: _Builder) -> None:
    """Refuse the placements that tests/conformance shows llama.cpp runs differently.

    The cause, in llama.cpp's ``src/llama-sampler.cpp``: ``top_n_sigma`` sets the logits of the
    tokens it removes to ``-inf`` but leaves them in the candidate array, where
    top_k/top_p/min_p/typical/xtc shrink it. Two later samplers read every entry:

    * ``typical`` computes the entropy as ``sum -p_i log p_i`` over the array, and for a removed
      token ``-0 * log 0 = NaN``: the entropy, every ``|-log p_i - H|`` score and so the
      typicality order it cuts at ``typical_p`` are NaN / arbitrary (issue 13's 562 draws
      outside the kept set for ``top_n_sigma 1.5 -> typical_p 0.8``);
    * ``temp-ext`` (dynamic temperature) normalises the entropy by ``log(array size)``,
      counting the removed tokens, where samplerkit counts the finite logits.

    A min_p or top_p (below 1) in between removes the ``-inf`` entries (min_p keeps
    ``logit >= max + log(min_p)``; top_p stops once the mass reaches ``p``), so the chain conforms.
    (``--temp 0`` leaves ``-inf`` entries too, but only one token has a probability then, and the
    suite shows typical and dynamic temperature keep it: it conforms.) The windows: samplerkit's
    ``last_n: 0`` (whole context) has no llama.cpp value (``-1`` is rejected by llama-cli).
    """
    masked: StepSpec | None = None               # the step whose -inf entries are still in the array
    for chain_name, spec in zip(b.chain, b.chain_steps):
        p = spec.params
        if chain_name == "top_n_sigma" and not p.is_neutral():
            masked = spec
        elif chain_name in ("top_p", "min_p") and not p.is_neutral():
            masked = None
        elif masked is not None and (
                (chain_name == "typ_p" and not p.is_neutral())
                or (spec.name == "dynamic_temperature" and p.low != p.high
                    and b.config.sampler.name != "greedy")):     # greedy: --temp 0 replaces it
            what = ("llama.cpp's typical sampler computes the entropy over them as sum -p log p, and "
                    "-0 * log 0 = NaN makes its typicality order arbitrary" if chain_name == "typ_p" else
                    "llama.cpp's dynamic temperature normalises the entropy by log(candidates) counting them, "
                    "samplerkit by log(finite logits)")
            b.issue(spec, f"after {masked.location or masked.name}: llama.cpp's {masked.name} leaves the tokens it "
                          f"removes in its candidate list at -inf, and {what} (tests/conformance); put this step "
                          f"before {masked.name}, or a top_p or min_p step between them")


# -- sampler, generation, model -------------------------------------------------------------

def _seed(b: _Builder, seed: int | None) -> None:
    if seed is None:
        return
    if seed > _SEED_MAX:
        b.issue("sampler.seed", f"llama.cpp seeds are 32-bit (at most {_SEED_MAX}; {_SEED_MAX + 1} means random)")
    else:
        b.flags["--seed"] = str(seed)


def _native_sampler(spec: StepSpec) -> LlamaCppSampler | None:
    return _native_sampler_cls(spec.cls)


def _sampler(b: _Builder, native: LlamaCppSampler | None) -> None:
    spec = b.config.sampler
    where = f"sampler {spec.name}"
    if spec.name == "categorical":
        _seed(b, spec.params.seed)
    elif spec.name == "greedy":
        _greedy(b)
    elif native is not None:
        for param, required in native.fixed.items():
            if getattr(spec.params, param) != required:
                b.issue(f"{where}.{param}", f"llama.cpp's {spec.name} uses {param} = {required}")
        if native.replaces_chain:
            b.flags.setdefault("--temp", "1")
            b.chain.clear()                      # llama.cpp ignores --samplers under these flags
        b.flags.update(native.flags)
        for param, flag in native.params.items():
            value = getattr(spec.params, param)
            if flag == "--seed":
                _seed(b, value)
            else:
                b.flags[flag] = num(value)
    else:
        b.issue(where, "llama.cpp has no such sampler (its samplers: dist, greedy via --temp 0, and those whose "
                       "class declares a `llamacpp` mapping, e.g. samplerkit-mirostat's)")
    if native is None or not native.replaces_chain:
        # Always written, empty too: without it llama.cpp runs its default chain with its defaults.
        model = {"-m": b.flags.pop("-m")} if "-m" in b.flags else {}
        b.flags = {**model, "--samplers": ";".join(b.chain), **b.flags}


def _greedy(b: _Builder) -> None:
    """samplerkit's argmax is llama.cpp's ``--temp 0`` (keep the top logit; dist then picks it)."""
    owner = b.chain_owner.get("temperature")
    if owner is None:
        b.chain.append("temperature")
    else:
        steps = list(b.config.processors)
        later = [s for s in steps[steps.index(owner) + 1:]
                 if s.name in CHAIN_NAMES and not s.cls.argmax_invariant and not s.params.is_neutral()]
        for s in later:
            b.issue(s, f"with the greedy sampler llama.cpp takes the argmax at its temperature sampler "
                       f"({owner.location}); this step after it can change the argmax")
        b.flags.pop("--dynatemp-range", None)
        b.flags.pop("--dynatemp-exp", None)
    b.flags["--temp"] = "0"
    b.notes.append("greedy: llama.cpp's --temp 0 keeps the first maximum in its candidate order; samplerkit the "
                   "lowest token id (they differ only on exact ties)")


def _generation(b: _Builder) -> None:
    g = b.config.generation
    b.flags["-n"] = str(g.max_new_tokens)
    if g.ignore_eos:
        b.flags["--ignore-eos"] = ""
    unsupported = {"stop": bool(g.stop), "stop_token_ids": bool(g.stop_token_ids), "n": g.n > 1,
                   "logprobs": g.logprobs is not None, "echo": g.echo, "chat": g.chat}
    for key, bad in unsupported.items():
        if bad:
            b.issue(f"generation.{key}", "no llama-cli sampling flag expresses it; remove it to export")


def _model_flag(b: _Builder) -> None:
    model = getattr(b.config.backend.params, "model", None)
    if isinstance(model, str) and model.endswith(".gguf"):
        b.flags["-m"] = model


# -- import ------------------------------------------------------------------------------------

#: llama.cpp defaults (common_params_sampling) for the flags :func:`import_llamacpp` reads.
LLAMACPP_DEFAULTS: dict[str, str] = {
    "--samplers": ";".join(DEFAULT_CHAIN), "--repeat-penalty": "1", "--repeat-last-n": "64",
    "--frequency-penalty": "0", "--presence-penalty": "0", "--dry-multiplier": "0", "--dry-base": "1.75",
    "--dry-allowed-length": "2", "--dry-penalty-last-n": "64", "--top-nsigma": "-1", "--top-k": "40",
    "--typical": "1", "--top-p": "0.95", "--min-p": "0.05", "--xtc-probability": "0", "--xtc-threshold": "0.1",
    "--temp": "0.8", "--dynatemp-range": "0", "--dynatemp-exp": "1", "--mirostat": "0", "--mirostat-lr": "0.1",
    "--mirostat-ent": "5", "--seed": "-1", "-n": "-1", "-m": "", "--dry-sequence-breaker": "",
}
_SWITCHES = {"--ignore-eos"}
#: Other spellings llama.cpp accepts (common/arg.cpp), read as the one export writes.
_ALIASES = {"--top-n-sigma": "--top-nsigma", "--temperature": "--temp", "--typical-p": "--typical", "-s": "--seed",
            "-l": "--logit-bias", "--n-predict": "-n", "--predict": "-n", "--model": "-m"}


def import_llamacpp(args: Sequence[str] | str, registry: Registry | None = None) -> dict[str, Any]:
    """A config mapping for llama.cpp flags (a string is split like a shell); the inverse of
    :func:`export_llamacpp`: whatever it returns exports back to flags that import to the same
    config. Flags samplerkit cannot represent exactly (unknown flags, values outside what a step
    accepts, chains llama.cpp runs differently) are one :class:`ConfigError` naming each flag.
    llama.cpp's "off" values map to the step's neutral value (``--top-k 0``, ``--top-p 1``,
    ``--dry-penalty-last-n 0`` ...). ``registry`` (default: the installed plugins) supplies the
    samplers that declare a ``llamacpp`` mapping (``--mirostat``).

    >>> import_llamacpp("--samplers 'top_k;temperature' --top-k 5 --temp 0.7")["pipeline"]
    [{'top_k': {'top_k': 5}}, {'temperature': {'temperature': 0.7}}]
    """
    registry = registry if registry is not None else default_registry()
    argv = shlex.split(args) if isinstance(args, str) else list(args)
    values, issues, bias = dict(LLAMACPP_DEFAULTS), [], {}
    switches: set[str] = set()
    i = 0
    while i < len(argv):
        flag = _ALIASES.get(argv[i], argv[i])
        if flag in _SWITCHES:
            switches.add(flag)
        elif flag in values or flag == "--logit-bias":
            if i + 1 >= len(argv):
                issues.append(ConfigIssue(flag, "needs a value"))
                break
            i += 1
            if flag == "--logit-bias":
                parsed = _split_bias(argv[i], issues)
                if parsed is not None:
                    bias[parsed[0]] = parsed[1]
            else:
                values[flag] = argv[i]
        else:
            issues.append(ConfigIssue(flag, "not a llama.cpp sampling flag samplerkit reads"))
        i += 1
    f: dict[str, Any] = {}
    for key, text in values.items():
        if key in _TEXT_FLAGS:
            f[key] = text
            continue
        try:
            f[key] = float(text)
        except ValueError:
            issues.append(ConfigIssue(key, f"expected a number, got {short_repr(text)}"))
            continue
        if not math.isfinite(f[key]):
            issues.append(ConfigIssue(key, f"expected a finite number, got {short_repr(text)}"))
    if issues:
        raise ConfigError(issues, "llama.cpp flags")
    # An empty entry is no sampler (llama.cpp skips names it does not know, "" among them).
    chain = [_SAMPLER_ALIASES.get(n.lower(), n.lower()) for n in f["--samplers"].split(";") if n]
    _check_ranges(f, {"temperature", "mirostat"} if f["--mirostat"] else {*chain, "mirostat"}, issues)
    pipeline: list[dict[str, Any]] = [{"logit_bias": {"bias": bias}}] if bias else []
    sampler: dict[str, Any] = {"name": "categorical"}
    seed = int(f["--seed"]) if 0 <= f["--seed"] <= _SEED_MAX else None
    if seed is not None:
        sampler["seed"] = seed
    if f["--mirostat"]:
        pipeline.append({"temperature": {"temperature": max(0.0, f["--temp"])}})
        sampler = _import_native(f, seed, registry, issues)
    else:
        for chain_name in chain:
            pipeline += _import_step(chain_name, f, issues)
    generation: dict[str, Any] = {"ignore_eos": "--ignore-eos" in switches}
    if f["-n"] >= 0:
        generation["max_new_tokens"] = int(f["-n"])
    if issues:
        raise ConfigError(issues, "llama.cpp flags")
    out: dict[str, Any] = {"pipeline": pipeline, "sampler": sampler, "generation": generation}
    if f["-m"]:
        out["backend"] = {"name": "llama", "model": f["-m"]}
    try:                                         # exactly what export accepts, so the round trip holds
        _export(resolve(out, registry))
    except ConfigError as exc:
        raise ConfigError(exc.issues, "llama.cpp flags: the pipeline they import to (pipeline[i] is its i-th "
                                      "step: the --logit-bias, then the --samplers in order, `penalties` as three "
                                      "steps) cannot be exported back exactly") from None
    return out


_TEXT_FLAGS = ("--samplers", "-m", "--dry-sequence-breaker")


def _check_ranges(f: Mapping[str, Any], used: set[str], issues: list[ConfigIssue]) -> None:
    """Values of the samplers in ``used`` (canonical --samplers names) that llama.cpp accepts but no
    samplerkit parameter means (llama.cpp's "off" values are mapped instead, in :func:`_import_step`)."""
    def bad(name: str, flag: str, ok: bool, why: str) -> None:
        if name in used and not ok:
            issues.append(ConfigIssue(flag, f"{num(f[flag])}: {why}"))
    dry_on = f["--dry-multiplier"] != 0 and f["--dry-penalty-last-n"] != 0
    bad("top_p", "--top-p", f["--top-p"] > 0, "llama.cpp keeps only the top token at top_p <= 0; samplerkit's "
                                              "top_p is in (0, 1]: use --top-k 1")
    bad("min_p", "--min-p", f["--min-p"] <= 1, "samplerkit's min_p is at most 1 (llama.cpp then keeps the top "
                                               "token only: use --top-k 1)")
    bad("typ_p", "--typical", f["--typical"] > 0, "samplerkit's typical_p is in (0, 1]")
    bad("xtc", "--xtc-threshold", 0 < f["--xtc-threshold"] <= 1 or f["--xtc-probability"] <= 0,
        "samplerkit's xtc threshold is in (0, 1] (above 0.5 nothing is removed, in both)")
    bad("temperature", "--dynatemp-exp", f["--dynatemp-exp"] >= 0 or f["--dynatemp-range"] <= 0,
        "samplerkit's dynamic_temperature exponent is >= 0")
    bad("penalties", "--repeat-last-n", f["--repeat-last-n"] >= 0 and f["--repeat-last-n"].is_integer(),
        "an integer >= 0 (0: off; llama.cpp rejects -1)")
    bad("penalties", "--repeat-penalty", f["--repeat-penalty"] > 0 or f["--repeat-last-n"] == 0,
        "samplerkit's repetition_penalty is > 0")
    bad("dry", "--dry-penalty-last-n", f["--dry-penalty-last-n"] >= 0 and f["--dry-penalty-last-n"].is_integer(),
        "an integer >= 0 (0: off; llama.cpp rejects -1)")
    bad("dry", "--dry-multiplier", f["--dry-multiplier"] >= 0, "samplerkit's dry multiplier is >= 0")
    bad("dry", "--dry-base", f["--dry-base"] >= 1 or not dry_on,
        "llama.cpp switches DRY off for a base below 1; samplerkit's base is >= 1: remove --dry-multiplier")
    bad("dry", "--dry-allowed-length", (f["--dry-allowed-length"] >= 1 and f["--dry-allowed-length"].is_integer())
        or not dry_on, "samplerkit's dry allowed_length is an integer >= 1")
    bad("top_k", "--top-k", f["--top-k"].is_integer(), "an integer")
    bad("mirostat", "--mirostat", f["--mirostat"] in (0, 1, 2), "0 (off), 1 or 2")


def _import_native(f: Mapping[str, Any], seed: int | None, registry: Registry,
                   issues: list[ConfigIssue]) -> dict[str, Any]:
    """The registered sampler whose ``llamacpp`` mapping has these flags (``--mirostat N``)."""
    for entry in registry.entries("sampler"):
        native = _native_sampler_cls(entry.cls)
        if native is None or not all(_ALIASES.get(k, k) in f and num(f[_ALIASES.get(k, k)]) == v
                                     for k, v in native.flags.items()):
            continue
        sampler: dict[str, Any] = {"name": entry.name, **native.fixed}
        for param, flag in native.params.items():
            if flag == "--seed":
                if seed is not None:
                    sampler[param] = seed
            else:
                sampler[param] = f[flag]
        return sampler
    issues.append(ConfigIssue("--mirostat", f"{num(f['--mirostat'])}: no installed sampler declares llama.cpp's "
                                            f"mirostat {num(f['--mirostat'])} (pip install samplerkit-mirostat)"))
    return {"name": "categorical"}


def _native_sampler_cls(cls: type) -> LlamaCppSampler | None:
    native = getattr(cls, "llamacpp", None)
    return native if isinstance(native, LlamaCppSampler) else None


def _split_bias(text: str, issues: list[ConfigIssue]) -> tuple[int, float] | None:
    """``TOKEN+BIAS`` / ``TOKEN-BIAS`` (common/arg.cpp's ``%d%c%f``)."""
    for pos, ch in enumerate(text):
        if ch in "+-" and pos > 0:
            try:
                token, amount = int(text[:pos]), float(text[pos + 1:]) * (-1 if ch == "-" else 1)
            except ValueError:
                break
            if token < 0 or not -100 <= amount <= 100:
                issues.append(ConfigIssue("--logit-bias", f"{short_repr(text)}: samplerkit takes a token id >= 0 and a bias "
                                                          "in [-100, 100] (llama.cpp's -inf bans are not "
                                                          "supported)"))
                return None
            return token, amount
    issues.append(ConfigIssue("--logit-bias", f"expected TOKEN+BIAS or TOKEN-BIAS, got {short_repr(text)}"))
    return None


#: llama.cpp's other spellings of --samplers entries (common_sampler_types_from_names, which also
#: ignores case): kebab-case and no-underscore forms of each name, and three more.
_SAMPLER_ALIASES = {
    **{alias: name for name in DEFAULT_CHAIN if "_" in name
       for alias in (name.replace("_", "-"), name.replace("_", ""))},
    "nucleus": "top_p", "temp": "temperature", "typ": "typ_p",
}


def _import_step(name: str, f: Mapping[str, Any], issues: list[ConfigIssue]) -> list[dict[str, Any]]:
    if name == "penalties":
        off = f["--repeat-last-n"] == 0
        for flag in ("--frequency-penalty", "--presence-penalty"):
            if f[flag] != 0 and not off:
                issues.append(ConfigIssue(flag, "llama.cpp counts prompt + generated tokens in a window; "
                                                "samplerkit's counts generated tokens only"))
        return [{"repetition_penalty": {"repetition_penalty": 1.0 if off else f["--repeat-penalty"],
                                        "last_n": int(f["--repeat-last-n"])}},
                {"frequency_penalty": 0.0 if off else f["--frequency-penalty"]},
                {"presence_penalty": 0.0 if off else f["--presence-penalty"]}]
    if name == "dry":
        # llama.cpp switches DRY off for multiplier 0, base < 1 or --dry-penalty-last-n 0.
        off = f["--dry-multiplier"] == 0 or f["--dry-base"] < 1 or f["--dry-penalty-last-n"] == 0
        if not off and f["--dry-sequence-breaker"] != "none":
            issues.append(ConfigIssue("--dry-sequence-breaker", "llama.cpp's string breakers have no samplerkit "
                                                                "equivalent (token ids); use 'none'"))
        return [{"dry": {"multiplier": 0.0 if off else f["--dry-multiplier"],
                         "base": max(1.0, f["--dry-base"]),
                         "allowed_length": max(1, int(f["--dry-allowed-length"])),
                         "penalty_last_n": 0 if off else int(f["--dry-penalty-last-n"])}}]
    if name == "temperature":
        if f["--dynatemp-range"] > 0:
            t, d = f["--temp"], f["--dynatemp-range"]
            return [{"dynamic_temperature": {"low": max(0.0, t - d), "high": t + d, "exponent": f["--dynatemp-exp"]}}]
        return [{"temperature": {"temperature": max(0.0, f["--temp"])}}]
    # llama.cpp's "off" values: top_k <= 0, top_n_sigma <= 0, top_p / typical >= 1, min_p <= 0.
    simple = {"top_n_sigma": ("top_n_sigma", "--top-nsigma", lambda v: max(0.0, v)),
              "top_k": ("top_k", "--top-k", lambda v: max(0, int(v))),
              "typ_p": ("typical_p", "--typical", lambda v: min(1.0, v)),
              "top_p": ("top_p", "--top-p", lambda v: min(1.0, v)),
              "min_p": ("min_p", "--min-p", lambda v: max(0.0, v))}
    if name in simple:
        step, flag, convert = simple[name]
        return [{step: {step: convert(f[flag])}}]
    if name == "xtc":
        return [{"xtc": {"threshold": f["--xtc-threshold"],
                         "probability": min(1.0, max(0.0, f["--xtc-probability"]))}}]
    issues.append(ConfigIssue("--samplers", f"{name!r}: not a llama.cpp sampler samplerkit maps "
                                            f"(known: {', '.join(DEFAULT_CHAIN)})"))
    return []


__all__ = ["DEFAULT_CHAIN", "LLAMACPP_DEFAULTS", "LlamaCppExport", "LlamaCppSampler", "export_llamacpp",
           "import_llamacpp"]
