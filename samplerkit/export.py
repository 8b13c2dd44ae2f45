"""Export a run config as llama.cpp command-line flags, and read such flags back.

What: :func:`export_llamacpp` turns a resolved :class:`~samplerkit.config.RunConfig` into the
flags of ``llama-cli`` / ``llama-server`` (``--samplers "penalties;dry;...;temperature"`` in the
pipeline's order, each sampler's values, ``--seed``, ``-n``); :func:`import_llamacpp` turns such
flags back into a config mapping (llama.cpp's defaults for what they leave out).

Why exact or nothing: a user who moves a pipeline to llama.cpp must get the same distribution.
Whatever llama.cpp cannot express with the same semantics (a step it has no sampler for, a
second instance of a step, penalties that are not adjacent, samplerkit-only options such as
``include_prompt: false``) is collected, each with its position and reason, into ONE
:class:`~samplerkit.errors.ConfigError`; nothing is dropped silently (a step at its neutral
value, which changes no logit, is left out with a note saying so). Random draws never match
bitwise (different generators), so a seed only makes llama.cpp's run reproducible.

llama.cpp facts relied on (``common/arg.cpp``, ``common/sampling.cpp``, ``src/llama-sampling.cpp``):
its chain is ``logit_bias`` (always first) then ``--samplers`` in order then ``dist``; the
penalties (repeat, frequency, presence) are one sampler over the last ``--repeat-last-n`` tokens
of prompt + generated (``-1``: the whole context); ``--temp 0`` keeps only the top logit;
``--mirostat`` ignores ``--samplers`` (its chain is ``temp`` then mirostat, with m = 100).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from samplerkit.config import RunConfig, StepSpec
from samplerkit.errors import ConfigError, ConfigIssue, short_repr

#: llama.cpp's default ``--samplers`` (common_params_sampling::samplers).
DEFAULT_CHAIN = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")

#: samplerkit step -> llama.cpp sampler name (``--samplers``).
CHAIN_NAMES = {
    "repetition_penalty": "penalties", "frequency_penalty": "penalties", "presence_penalty": "penalties",
    "dry": "dry", "top_n_sigma": "top_n_sigma", "top_k": "top_k", "typical_p": "typ_p", "top_p": "top_p",
    "min_p": "min_p", "xtc": "xtc", "temperature": "temperature", "dynamic_temperature": "temperature",
}
_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")
#: Steps that never change the argmax (so greedy may move past them).
_ARGMAX_INVARIANT = {"top_k", "top_p", "min_p", "top_n_sigma", "temperature", "dynamic_temperature"}
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
        self.penalties: dict[str, StepSpec] = {}

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
    """llama.cpp flags equivalent to ``config``; :class:`ConfigError` lists everything inexpressible."""
    b = _Builder(config)
    mirostat = config.sampler.name in ("mirostat", "mirostat_v2")
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
        elif chain_name is None:
            left_out = b.inexpressible(spec, _NO_SAMPLER.get(name, f"llama.cpp has no {name!r} sampler"))
        elif mirostat and name != "temperature":
            left_out = b.inexpressible(spec, "llama.cpp ignores --samplers under --mirostat (its chain is "
                                             "temperature -> mirostat): only a temperature step may precede it")
        elif chain_name == "penalties":
            left_out = _add_penalty(b, spec, previous)
        elif chain_name in b.chain_owner:
            first = b.chain_owner[chain_name]
            left_out = b.inexpressible(spec, f"llama.cpp's {chain_name!r} sampler already comes from "
                                             f"{first.location or first.name}; llama.cpp has one value per flag, "
                                             "so a step cannot appear twice")
        else:
            b.chain_owner[chain_name] = spec
            b.chain.append(chain_name)
            _STEP_FLAGS[name](b, spec)
        if not left_out:                         # a neutral step left out does not break adjacency
            previous = name
    if b.penalties:
        _penalty_flags(b)
    _sampler(b)
    _generation(b)
    if b.issues:
        raise ConfigError(sorted(b.issues, key=_position), "llama.cpp export")
    args: list[str] = []
    for flag, value in b.flags.items():
        args += [flag] if value == "" else [flag, value]
    for bias in b.bias:
        args += ["--logit-bias", bias]
    return LlamaCppExport(args, b.notes)


def _position(issue: ConfigIssue) -> tuple[int, int]:
    """Pipeline issues by step index, then the sampler's, then generation options'."""
    match = re.match(r"pipeline\[(\d+)\]", issue.location)
    if match:
        return (0, int(match.group(1)))
    return (1 if issue.location.startswith("sampler") else 2, 0)


# -- steps --------------------------------------------------------------------------------

def _add_penalty(b: _Builder, spec: StepSpec, previous: str | None) -> bool:
    """Place a penalty step in llama.cpp's one ``penalties`` sampler; True when left out."""
    if spec.name in b.penalties:
        first = b.penalties[spec.name]
        return b.inexpressible(spec, f"second {spec.name} (first at {first.location}); llama.cpp has one "
                                     "penalties sampler")
    if b.penalties and previous not in _PENALTIES:
        return b.inexpressible(spec, "not adjacent to the other penalty steps; llama.cpp applies repetition, "
                                     "frequency and presence penalties together as one `penalties` sampler")
    if not b.penalties:
        b.chain.append("penalties")
        for flag in ("--repeat-penalty", "--repeat-last-n", "--frequency-penalty", "--presence-penalty"):
            b.flags[flag] = "?"                  # filled by _penalty_flags, here for the output order
    b.penalties[spec.name] = spec
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


def _penalty_flags(b: _Builder) -> None:
    rep = b.penalties.get("repetition_penalty")
    last_n = rep.params.last_n if rep is not None else 64
    if rep is not None and any(n in b.penalties for n in ("frequency_penalty", "presence_penalty")):
        names = list(b.penalties)
        if names.index("repetition_penalty") != 0 and rep.params.repetition_penalty != 1.0:
            b.issue(rep, "llama.cpp's penalties sampler applies the repetition penalty first: put it before "
                         "frequency_penalty and presence_penalty")
    b.flags["--repeat-penalty"] = num(rep.params.repetition_penalty if rep else 1.0)
    b.flags["--repeat-last-n"] = "-1" if last_n == 0 else str(last_n)
    for name, flag in (("frequency_penalty", "--frequency-penalty"), ("presence_penalty", "--presence-penalty")):
        spec = b.penalties.get(name)
        b.flags[flag] = num(getattr(spec.params, name) if spec else 0.0)


def _dry(b: _Builder, spec: StepSpec) -> None:
    p = spec.params
    b.flags["--dry-multiplier"] = num(p.multiplier)
    b.flags["--dry-base"] = num(p.base)
    b.flags["--dry-allowed-length"] = str(p.allowed_length)
    b.flags["--dry-penalty-last-n"] = "-1" if p.penalty_last_n == 0 else str(p.penalty_last_n)
    if p.multiplier == 0.0:
        return                                   # off: breakers do not matter
    if p.sequence_breakers:
        b.issue(spec, "sequence_breakers are token ids; llama.cpp takes strings (--dry-sequence-breaker) and "
                      "matches them differently: export without breakers or pass the strings yourself")
    else:
        b.flags["--dry-sequence-breaker"] = "none"   # llama.cpp's default is ["\n", ":", "\"", "*"]


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


# -- sampler, generation, model -------------------------------------------------------------

def _seed(b: _Builder, seed: int | None) -> None:
    if seed is None:
        return
    if seed > _SEED_MAX:
        b.issue("sampler.seed", f"llama.cpp seeds are 32-bit (at most {_SEED_MAX}; {_SEED_MAX + 1} means random)")
    else:
        b.flags["--seed"] = str(seed)


def _sampler(b: _Builder) -> None:
    spec = b.config.sampler
    where = f"sampler {spec.name}"
    if spec.name == "categorical":
        _seed(b, spec.params.seed)
    elif spec.name == "greedy":
        _greedy(b)
    elif spec.name in ("mirostat", "mirostat_v2"):
        if spec.name == "mirostat" and spec.params.m != 100:
            b.issue(f"{where}.m", "llama.cpp's mirostat uses m = 100")
        b.flags.setdefault("--temp", "1")
        b.flags["--mirostat"] = "1" if spec.name == "mirostat" else "2"
        b.flags["--mirostat-lr"] = num(spec.params.eta)
        b.flags["--mirostat-ent"] = num(spec.params.tau)
        _seed(b, spec.params.seed)
        b.chain.clear()                          # --samplers is ignored under --mirostat
    else:
        b.issue(where, "llama.cpp has no such sampler (its samplers: dist, greedy via --temp 0, mirostat 1/2)")
    if b.chain:
        b.flags = {"--samplers": ";".join(b.chain), **b.flags}


def _greedy(b: _Builder) -> None:
    """samplerkit's argmax is llama.cpp's ``--temp 0`` (keep the top logit; dist then picks it)."""
    owner = b.chain_owner.get("temperature")
    if owner is None:
        b.chain.append("temperature")
    else:
        steps = list(b.config.processors)
        later = [s for s in steps[steps.index(owner) + 1:] 
                 if s.name in CHAIN_NAMES and s.name not in _ARGMAX_INVARIANT and not s.params.is_neutral()]
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
    "--dry-allowed-length": "2", "--dry-penalty-last-n": "-1", "--top-nsigma": "-1", "--top-k": "40",
    "--typical": "1", "--top-p": "0.95", "--min-p": "0.05", "--xtc-probability": "0", "--xtc-threshold": "0.1",
    "--temp": "0.8", "--dynatemp-range": "0", "--dynatemp-exp": "1", "--mirostat": "0", "--mirostat-lr": "0.1",
    "--mirostat-ent": "5", "--seed": "-1", "-n": "-1", "-m": "", "--dry-sequence-breaker": "",
}
_SWITCHES = {"--ignore-eos"}
#: Other spellings llama.cpp accepts (common/arg.cpp), read as the one export writes.
_ALIASES = {"--top-n-sigma": "--top-nsigma", "--temperature": "--temp", "--typical-p": "--typical", "-s": "--seed",
            "-l": "--logit-bias", "--n-predict": "-n", "--predict": "-n", "--model": "-m"}


def import_llamacpp(args: Sequence[str] | str) -> dict[str, Any]:
    """A config mapping for llama.cpp flags (a string is split like a shell); the inverse of
    :func:`export_llamacpp` for what it emits. Unknown flags are a :class:`ConfigError`.

    >>> import_llamacpp("--samplers 'top_k;temperature' --top-k 5 --temp 0.7")["pipeline"]
    [{'top_k': {'top_k': 5}}, {'temperature': {'temperature': 0.7}}]
    """
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
                token, sign, amount = _split_bias(argv[i])
                bias[token] = float(amount) * (-1 if sign == "-" else 1)
            else:
                values[flag] = argv[i]
        else:
            issues.append(ConfigIssue(flag, "not a llama.cpp sampling flag samplerkit reads"))
        i += 1
    if issues:
        raise ConfigError(issues, "llama.cpp flags")
    f = {k: float(v) if k not in ("--samplers", "-m", "--dry-sequence-breaker") else v for k, v in values.items()}
    pipeline: list[dict[str, Any]] = [{"logit_bias": {"bias": bias}}] if bias else []
    sampler: dict[str, Any] = {"name": "categorical"}
    if f["--seed"] >= 0 and f["--seed"] <= _SEED_MAX:
        sampler["seed"] = int(f["--seed"])
    if f["--mirostat"]:
        pipeline.append({"temperature": {"temperature": f["--temp"]}})
        name = "mirostat" if f["--mirostat"] == 1 else "mirostat_v2"
        sampler = {**sampler, "name": name, "tau": f["--mirostat-ent"], "eta": f["--mirostat-lr"]}
    else:
        for chain_name in f["--samplers"].split(";"):
            pipeline += _import_step(chain_name.strip(), f, issues)
    generation: dict[str, Any] = {"ignore_eos": "--ignore-eos" in switches}
    if f["-n"] >= 0:
        generation["max_new_tokens"] = int(f["-n"])
    if issues:
        raise ConfigError(issues, "llama.cpp flags")
    out: dict[str, Any] = {"pipeline": pipeline, "sampler": sampler, "generation": generation}
    if f["-m"]:
        out["backend"] = {"name": "llama", "model": f["-m"]}
    return out


def _split_bias(text: str) -> tuple[int, str, str]:
    for pos, ch in enumerate(text):
        if ch in "+-" and pos > 0:
            return int(text[:pos]), ch, text[pos + 1:]
    raise ConfigError(ConfigIssue("--logit-bias", f"expected TOKEN+BIAS or TOKEN-BIAS, got {short_repr(text)}"))


def _last_n(value: float) -> int:
    return 0 if value < 0 else int(value)


def _import_step(name: str, f: Mapping[str, Any], issues: list[ConfigIssue]) -> list[dict[str, Any]]:
    if name == "penalties":
        off = f["--repeat-last-n"] == 0
        for flag in ("--frequency-penalty", "--presence-penalty"):
            if f[flag] != 0 and not off:
                issues.append(ConfigIssue(flag, "llama.cpp counts prompt + generated tokens in a window; "
                                                "samplerkit's counts generated tokens only"))
        return [{"repetition_penalty": {"repetition_penalty": 1.0 if off else f["--repeat-penalty"],
                                        "last_n": 64 if off else _last_n(f["--repeat-last-n"])}},
                {"frequency_penalty": f["--frequency-penalty"]}, {"presence_penalty": f["--presence-penalty"]}]
    if name == "dry":
        if f["--dry-multiplier"] > 0 and f["--dry-sequence-breaker"] != "none":
            issues.append(ConfigIssue("--dry-sequence-breaker", "llama.cpp's string breakers have no samplerkit "
                                                                "equivalent (token ids); use 'none'"))
        return [{"dry": {"multiplier": f["--dry-multiplier"], "base": f["--dry-base"],
                         "allowed_length": int(f["--dry-allowed-length"]),
                         "penalty_last_n": _last_n(f["--dry-penalty-last-n"])}}]
    if name == "temperature":
        if f["--dynatemp-range"] > 0:
            t, d = f["--temp"], f["--dynatemp-range"]
            return [{"dynamic_temperature": {"low": max(0.0, t - d), "high": t + d, "exponent": f["--dynatemp-exp"]}}]
        return [{"temperature": {"temperature": max(0.0, f["--temp"])}}]
    simple = {"top_n_sigma": ("top_n_sigma", "--top-nsigma"), "top_k": ("top_k", "--top-k"),
              "typ_p": ("typical_p", "--typical"), "top_p": ("top_p", "--top-p"), "min_p": ("min_p", "--min-p")}
    if name in simple:
        step, flag = simple[name]
        value = f[flag]
        value = int(value) if step == "top_k" else (max(0.0, value) if step == "top_n_sigma" else value)
        return [{step: {step: value}}]
    if name == "xtc":
        return [{"xtc": {"threshold": f["--xtc-threshold"], "probability": f["--xtc-probability"]}}]
    issues.append(ConfigIssue("--samplers", f"{name!r}: not a llama.cpp sampler samplerkit maps "
                                            f"(known: {', '.join(DEFAULT_CHAIN)})"))
    return []


__all__ = ["DEFAULT_CHAIN", "LLAMACPP_DEFAULTS", "LlamaCppExport", "export_llamacpp", "import_llamacpp"]
