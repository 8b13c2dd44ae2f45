"""Conformance of ``samplerkit export llamacpp``: llama.cpp's own sampler chain and samplerkit on the same logits.

For each config of :data:`CASES` (every step export can emit, alone, and chains), export it,
build the chain ``llama-cli`` builds from those flags through llama-cpp-python's low-level C API
(:class:`LlamaChain`), and compare (:func:`differences`): the tokens left after the chain and
their probabilities, and 3,000 seeded draws per engine under a two-sample chi-square test at
alpha 1e-6. Both directions are asserted: a chain export emits conforms, and a chain it refuses
(with ``_export(check_conformance=False)`` giving the flags it would have written) really differs.

The llama.cpp side. No model is loaded: llama.cpp's samplers work on a
``llama_token_data_array`` (``{id, logit, p}`` per candidate), which this module fills from a
logit row itself. The chain is ``common_sampler_init``'s (``common/sampling.cpp``):
``logit_bias`` first, then each ``--samplers`` entry with that flag's value, then ``dist``; under
``--mirostat`` it is ``temp`` then the mirostat sampler, ``--samplers`` ignored. As
``common/arg.cpp`` does, a negative ``--repeat-last-n`` / ``--dry-penalty-last-n`` is an error
(:class:`LlamaCliRejects`); ``0`` switches the penalty off. The prompt's tokens are accepted into
the chain first, as llama-cli does, so the penalties and DRY see the same history as samplerkit's
``prompt_ids``. Samplers that need a vocabulary object: ``dry`` uses it only to tokenize string
sequence breakers, so with ``--dry-sequence-breaker none`` (the only breakers export emits) it
gets none; ``infill``, ``grammar`` and ``adaptive_p`` are not compared (export never emits them).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

import samplerkit
from samplerkit.config import RunConfig, resolve
from samplerkit.context import StepContext
from samplerkit.errors import ConfigError
from samplerkit.export import _export, export_llamacpp
from samplerkit.pipeline import Pipeline

# CI installs it (.ci/run); the signatures used below are llama-cpp-python 0.3.36's.
llama_cpp = pytest.importorskip("llama_cpp", reason="the conformance suite runs llama.cpp's own samplers through "
                                                     "llama-cpp-python: pip install llama-cpp-python==0.3.36")

#: llama.cpp's names in ``--samplers`` (common_sampler_types_from_names: the canonical names, their
#: kebab-case and no-underscore forms, "nucleus", "temp", "typ"; case-insensitive; others are skipped).
_CANONICAL = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
_NAMES = {**{n: n for n in _CANONICAL},
          **{a: n for n in _CANONICAL if "_" in n for a in (n.replace("_", "-"), n.replace("_", ""))},
          "nucleus": "top_p", "temp": "temperature", "typ": "typ_p"}

#: common_params_sampling's defaults, for flags an argv leaves out.
DEFAULTS = {"--samplers": "penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature",
            "--repeat-penalty": "1", "--repeat-last-n": "64", "--frequency-penalty": "0", "--presence-penalty": "0",
            "--dry-multiplier": "0", "--dry-base": "1.75", "--dry-allowed-length": "2", "--dry-penalty-last-n": "64",
            "--dry-sequence-breaker": "default", "--top-nsigma": "-1", "--top-k": "40", "--typical": "1",
            "--top-p": "0.95", "--min-p": "0.05", "--xtc-probability": "0", "--xtc-threshold": "0.1", "--temp": "0.8",
            "--dynatemp-range": "0", "--dynatemp-exp": "1", "--mirostat": "0", "--mirostat-lr": "0.1",
            "--mirostat-ent": "5", "--seed": "-1"}
_SWITCHES = {"--ignore-eos"}


class LlamaCliRejects(ValueError):
    """A flag value llama-cli refuses at start-up (common/arg.cpp)."""


def _window(num: dict[str, float], flag: str) -> int:
    if num[flag] < 0:
        raise LlamaCliRejects(f"error: invalid {flag[2:]} = {int(num[flag])}")
    return int(num[flag])


def parse_flags(args: Sequence[str]) -> tuple[dict[str, str], list[tuple[int, float]]]:
    """``(flag -> value with llama.cpp's defaults filled in, logit biases)`` of an argv."""
    values, bias, i = dict(DEFAULTS), [], 0
    while i < len(args):
        flag = args[i]
        if flag in _SWITCHES:
            i += 1
            continue
        value = args[i + 1]
        if flag == "--logit-bias":
            pos = max(value.rfind("+"), value.rfind("-"))
            bias.append((int(value[:pos]), float(value[pos:])))
        else:
            values[flag] = value
        i += 2
    return values, bias


class LlamaChain:
    """One llama.cpp sampler chain built from llama-cli flags; ``dist`` only when ``sample`` is True."""

    def __init__(self, args: Sequence[str], n_vocab: int, *, sample: bool, seed: int = 0):
        f, bias = parse_flags(args)
        self.n_vocab = n_vocab
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._keep: list = []                        # ctypes buffers the samplers point into

        def add(sampler) -> None:
            assert sampler, "llama.cpp returned no sampler"
            llama_cpp.llama_sampler_chain_add(self.chain, sampler)

        biases = (llama_cpp.llama_logit_bias * max(len(bias), 1))(*[llama_cpp.llama_logit_bias(t, b) for t, b in bias])
        self._keep.append(biases)
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), biases))
        num = {k: float(v) for k, v in f.items() if k not in ("--samplers", "--dry-sequence-breaker")}
        temp = max(num["--temp"], 0.0)              # common/arg.cpp clamps --temp at 0
        mirostat = int(num["--mirostat"])
        if mirostat == 0:
            for raw in f["--samplers"].split(";"):
                if raw.lower() in _NAMES:
                    add(self._sampler(_NAMES[raw.lower()], num, f, temp, seed))
            if sample:
                add(llama_cpp.llama_sampler_init_dist(seed))
        else:
            add(llama_cpp.llama_sampler_init_temp(temp))
            if mirostat == 1:
                add(llama_cpp.llama_sampler_init_mirostat(n_vocab, seed, num["--mirostat-ent"], num["--mirostat-lr"], 100))
            else:
                add(llama_cpp.llama_sampler_init_mirostat_v2(seed, num["--mirostat-ent"], num["--mirostat-lr"]))

    def _sampler(self, name: str, num: dict[str, float], f: dict[str, str], temp: float, seed: int):
        min_keep = 0                                  # common_params_sampling::min_keep
        if name == "penalties":
            return llama_cpp.llama_sampler_init_penalties(self.n_vocab, _window(num, "--repeat-last-n"),
                                                          num["--repeat-penalty"], num["--frequency-penalty"],
                                                          num["--presence-penalty"])
        if name == "dry":
            if f["--dry-sequence-breaker"] != "none" and num["--dry-multiplier"] != 0:
                raise NotImplementedError("string sequence breakers need a vocabulary")
            return llama_cpp.llama_sampler_init_dry(None, num["--dry-multiplier"], num["--dry-base"],
                                                    int(num["--dry-allowed-length"]),
                                                    _window(num, "--dry-penalty-last-n"), None, 0)
        if name == "top_n_sigma":
            return llama_cpp.llama_sampler_init_top_n_sigma(num["--top-nsigma"])
        if name == "top_k":
            return llama_cpp.llama_sampler_init_top_k(int(num["--top-k"]))
        if name == "typ_p":
            return llama_cpp.llama_sampler_init_typical(num["--typical"], min_keep)
        if name == "top_p":
            return llama_cpp.llama_sampler_init_top_p(num["--top-p"], min_keep)
        if name == "min_p":
            return llama_cpp.llama_sampler_init_min_p(num["--min-p"], min_keep)
        if name == "xtc":
            return llama_cpp.llama_sampler_init_xtc(num["--xtc-probability"], num["--xtc-threshold"], min_keep, seed)
        assert name == "temperature"
        return llama_cpp.llama_sampler_init_temp_ext(temp, num["--dynatemp-range"], num["--dynatemp-exp"])

    def accept(self, tokens: Sequence[int]) -> None:
        """Feed history (llama-cli accepts the prompt's tokens into the chain before generating)."""
        for t in tokens:
            llama_cpp.llama_sampler_accept(self.chain, int(t))

    @staticmethod
    def _array(logits: torch.Tensor):
        """A fresh ``llama_token_data_array`` of one row (``{id, logit, p = 0}`` per token, unsorted)."""
        n = logits.numel()
        packed = np.zeros(n, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])   # llama_token_data's layout
        packed["id"] = np.arange(n)
        packed["logit"] = logits.to(torch.float32).numpy()
        buf = (llama_cpp.llama_token_data * n)()
        assert ctypes.sizeof(buf) == packed.nbytes
        ctypes.memmove(buf, packed.ctypes.data, packed.nbytes)
        arr = llama_cpp.llama_token_data_array(ctypes.cast(buf, ctypes.POINTER(llama_cpp.llama_token_data)), n, -1, False)
        return buf, arr

    def kept(self, logits: torch.Tensor) -> dict[int, float]:
        """Apply the chain (no ``dist``) to one row: ``{token id: logit}`` of the candidates left with a finite logit."""
        _buf, arr = self._array(logits)
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        out = {}
        for i in range(arr.size):
            d = arr.data[i]
            if d.logit != float("-inf"):
                out[d.id] = d.logit
        return out

    def draws(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` tokens drawn by the chain (with ``dist``) on the same row, one seeded stream."""
        buf, arr = self._array(logits)
        template = (llama_cpp.llama_token_data * logits.numel())()
        ctypes.memmove(template, buf, ctypes.sizeof(buf))
        out = torch.empty(n, dtype=torch.int64)
        for k in range(n):
            ctypes.memmove(buf, template, ctypes.sizeof(buf))
            arr.data = ctypes.cast(buf, ctypes.POINTER(llama_cpp.llama_token_data))
            arr.size, arr.selected, arr.sorted = logits.numel(), -1, False
            llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
            out[k] = arr.data[arr.selected].id
        return out

    def __del__(self):
        chain, self.chain = getattr(self, "chain", None), None
        if chain:
            llama_cpp.llama_sampler_free(chain)


# -- the suite: samplerkit against that chain --------------------------------------------------

REGISTRY = samplerkit.default_registry()
V = 256
N = 3000                  # seeded draws per engine and case
ALPHA = 1e-6
#: The prompt both engines have seen (repeats, so penalties and DRY have something to act on).
HISTORY = [5, 9, 17, 5, 9, 17, 33, 5, 9, 2, 71, 5, 9]


def _rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    gaussian = torch.randn(V, generator=g) * 2.5                           # spread like a model's logits
    zipf = -1.2 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))   # a peaked, long-tailed row
    zipf = (zipf + 0.05 * torch.randn(V, generator=g))[torch.randperm(V, generator=g)] * 3
    return [gaussian, zipf]


ROWS = _rows()


def chi2_sf(stat: float, df: int) -> float:
    """P(X > stat) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, stat/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def homogeneity_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the two-sample chi-square test that draws ``a`` and ``b`` (equal sizes) come from
    one distribution: ``sum (O - E)^2 / E`` over both samples, ``E`` = the pooled count / 2; cells
    with ``E < 5`` are pooled into one (the test's validity condition); ``df`` = cells - 1."""
    ca = torch.bincount(a, minlength=V).double()
    cb = torch.bincount(b, minlength=V).double()
    expected = (ca + cb) / 2
    small = (expected < 5) & (expected > 0)
    big = expected >= 5
    cells_a = torch.cat([ca[big], ca[small].sum().reshape(1)])
    cells_b = torch.cat([cb[big], cb[small].sum().reshape(1)])
    cells_e = torch.cat([expected[big], expected[small].sum().reshape(1)])
    keep = cells_e > 0
    cells_a, cells_b, cells_e = cells_a[keep], cells_b[keep], cells_e[keep]
    if cells_e.numel() < 2:
        return 1.0
    stat = float((((cells_a - cells_e) ** 2 + (cells_b - cells_e) ** 2) / cells_e).sum())
    return chi2_sf(stat, cells_e.numel() - 1)


def config_of(pipeline, sampler: object = None) -> RunConfig:
    return resolve({"pipeline": pipeline, "sampler": sampler or {"name": "categorical", "seed": 1}}, REGISTRY)


def flags_for(config: RunConfig) -> list[str]:
    """The flags export gives; for a config it refuses on conformance grounds, the flags it would give."""
    return _export(config, check_conformance=False).args


def samplerkit_kept(config: RunConfig, row: torch.Tensor) -> dict[int, float]:
    pipe = Pipeline.from_config(config)
    ctx = StepContext(1, V, prompt_ids=[HISTORY], uses=pipe.uses)
    out = pipe.bind(1).process(row.unsqueeze(0), ctx)[0]
    return {i: float(out[i]) for i in torch.nonzero(torch.isfinite(out)).flatten().tolist()}


def samplerkit_draws(config: RunConfig, row: torch.Tensor, n: int = N, *, random_steps: bool = False) -> torch.Tensor:
    """``n`` independent draws, one seeded row each. A chain without random steps gives every row
    the same processed logits, so it runs once and only the sampler runs ``n`` times;
    ``random_steps`` (xtc's coin, mirostat's truncation) runs the whole pipeline on ``n`` rows
    (unseeded steps such as xtc get per-row seeds from torch's generator, seeded here)."""
    torch.manual_seed(0)
    seeds = list(range(1, n + 1)) if "seed" in config.sampler.cls.Params.model_fields else None
    if random_steps:
        pipe = Pipeline.from_config(config)
        ctx = StepContext(n, V, prompt_ids=[HISTORY] * n, uses=pipe.uses)
        return pipe.bind(n, seeds=seeds).sample(row.expand(n, -1).contiguous(), ctx)
    processed = torch.full((V,), float("-inf"))
    for i, x in samplerkit_kept(config, row).items():
        processed[i] = x
    sampler = Pipeline([], config.sampler)
    return sampler.bind(n, seeds=seeds).sample(processed.expand(n, -1).contiguous(), StepContext(n, V))


def llama_kept(args: list[str], row: torch.Tensor) -> dict[int, float]:
    chain = LlamaChain(args, V, sample=False)
    chain.accept(HISTORY)
    return chain.kept(row)


def llama_draws(args: list[str], row: torch.Tensor, n: int = N, *, fresh: bool = False) -> torch.Tensor:
    """``n`` draws from one seeded chain; ``fresh``: one new chain per draw (seed = draw index),
    for stateful samplers (mirostat's ``mu``) whose first step is compared."""
    if not fresh:
        chain = LlamaChain(args, V, sample=True, seed=12345)
        chain.accept(HISTORY)
        return chain.draws(row, n)
    out = []
    for k in range(n):
        chain = LlamaChain(args, V, sample=True, seed=k)
        chain.accept(HISTORY)
        out.append(chain.draws(row, 1))
    return torch.cat(out)


def softmax_of(kept: dict[int, float]) -> dict[int, float]:
    top = max(kept.values())
    w = {i: math.exp(x - top) for i, x in kept.items()}
    total = sum(w.values())
    return {i: v / total for i, v in w.items()}


def differences(config: RunConfig, *, stochastic_kept: bool = False, fresh: bool = False) -> list[str]:
    """What differs between samplerkit and llama.cpp on the suite's rows (empty: they conform).

    Kept set: the tokens with a finite logit after the whole chain without ``dist`` (llama.cpp's
    array after ``llama_sampler_apply``; samplerkit's processed logits), and their probabilities
    (softmax over them, to 1e-4). Skipped where the chain itself is random (xtc below
    probability 1, mirostat). Draws: ``N`` seeded draws from each engine pass the two-sample
    chi-square test at ``ALPHA``, and llama.cpp draws nothing outside samplerkit's kept set."""
    args = flags_for(config)
    greedy = config.sampler.name == "greedy"
    try:
        LlamaChain(args, V, sample=False)
    except LlamaCliRejects as exc:
        return [f"llama-cli rejects these flags: {exc}"]
    found = []
    for r, row in enumerate(ROWS):
        if not stochastic_kept:
            ours = samplerkit_kept(config, row)
            theirs = llama_kept(args, row)
            if greedy:                      # samplerkit's argmax of its processed logits vs llama.cpp's --temp 0
                ours = {max(ours, key=lambda i: (ours[i], -i)): 0.0}
            if set(ours) != set(theirs):
                found.append(f"row {r}: kept sets differ: only samplerkit {sorted(set(ours) - set(theirs))}, "
                             f"only llama.cpp {sorted(set(theirs) - set(ours))}")
                continue
            p, q = softmax_of(ours), softmax_of(theirs)
            worst = max(abs(p[i] - q[i]) for i in p)
            if worst > 1e-4:
                found.append(f"row {r}: probabilities differ by up to {worst:.2e}")
                continue
        if greedy:
            continue
        ours_d = samplerkit_draws(config, row, random_steps=stochastic_kept)
        theirs_d = llama_draws(args, row, fresh=fresh)
        if not stochastic_kept:
            outside = (~torch.isin(theirs_d, torch.tensor(sorted(samplerkit_kept(config, row))))).sum()
            if outside:
                found.append(f"row {r}: llama.cpp drew {int(outside)} of {N} tokens outside samplerkit's kept set")
        p_value = homogeneity_p(ours_d, theirs_d)
        if p_value < ALPHA:
            found.append(f"row {r}: draws differ (chi-square p = {p_value:.1e})")
    return found


MIRO = {"pipeline": [{"temperature": 0.8}]}
#: (id, pipeline, sampler or None for seeded categorical): every step export can emit, alone,
#: then chains (llama.cpp's default order, other orders, repeats, the chains of issue 13).
CASES = [
    ("logit_bias", [{"logit_bias": {"bias": {3: -2.5, 10: 4.0, 17: -100.0}}}], None),
    ("repetition_penalty", [{"repetition_penalty": {"repetition_penalty": 1.3, "last_n": 8}}], None),
    ("repetition_penalty_whole_context", [{"repetition_penalty": {"repetition_penalty": 1.5, "last_n": 0}}], None),
    ("dry", [{"dry": {"multiplier": 0.8, "base": 1.75, "allowed_length": 2, "penalty_last_n": 64}}], None),
    ("dry_whole_context", [{"dry": {"multiplier": 0.8, "base": 1.75, "allowed_length": 2}}], None),
    ("dry_window", [{"dry": {"multiplier": 1.5, "base": 2.0, "allowed_length": 1, "penalty_last_n": 6}}], None),
    ("top_n_sigma", [{"top_n_sigma": 1.5}], None),
    ("top_k", [{"top_k": 20}], None),
    ("typical_p", [{"typical_p": 0.8}], None),
    ("top_p", [{"top_p": 0.8}], None),
    ("min_p", [{"min_p": 0.1}], None),
    ("xtc_always", [{"xtc": {"threshold": 0.05, "probability": 1.0}}], None),
    ("temperature", [{"temperature": 0.7}], None),
    ("temperature_zero", [{"temperature": 0.0}], None),
    ("dynamic_temperature", [{"dynamic_temperature": {"low": 0.5, "high": 1.5, "exponent": 2.0}}], None),
    ("greedy", [{"top_k": 40}], "greedy"),
    ("greedy_after_top_n_sigma_dynamic_temperature", [{"top_n_sigma": 1.5},
                                                      {"dynamic_temperature": {"low": 0.5, "high": 1.5}}], "greedy"),
    ("llama_cpp_default_chain", [{"repetition_penalty": {"repetition_penalty": 1.1, "last_n": 64}},
                                 {"frequency_penalty": 0.0}, {"presence_penalty": 0.0},
                                 {"dry": {"multiplier": 0.5, "penalty_last_n": 64}}, {"top_n_sigma": 0.0},
                                 {"top_k": 40},
                                 {"typical_p": 1.0}, {"top_p": 0.95}, {"min_p": 0.05},
                                 {"xtc": {"probability": 1.0, "threshold": 0.1}}, {"temperature": 0.8}], None),
    ("top_k_top_p_min_p_temperature", [{"top_k": 40}, {"top_p": 0.9}, {"min_p": 0.05}, {"temperature": 0.7}], None),
    ("temperature_first", [{"temperature": 1.3}, {"min_p": 0.1}, {"top_p": 0.9}], None),
    ("top_k_then_typical", [{"top_k": 30}, {"typical_p": 0.8}, {"temperature": 1.2}], None),
    ("typical_then_top_n_sigma", [{"typical_p": 0.8}, {"top_n_sigma": 1.0}, {"temperature": 1.2}], None),
    ("top_n_sigma_then_top_p", [{"top_n_sigma": 1.5}, {"top_p": 0.8}, {"temperature": 1.2}], None),
    ("top_n_sigma_typical_temperature", [{"top_n_sigma": 1.5}, {"typical_p": 0.8}, {"temperature": 1.2}], None),
    ("top_n_sigma_then_dynamic_temperature", [{"top_n_sigma": 1.5},
                                              {"dynamic_temperature": {"low": 0.5, "high": 1.5}}], None),
    ("top_k_then_dynamic_temperature", [{"top_k": 20}, {"dynamic_temperature": {"low": 0.5, "high": 1.5}}], None),
    ("repeated_top_k", [{"top_k": 20}, {"temperature": 0.7}, {"top_k": 20}], None),
    ("repeated_penalties", [{"repetition_penalty": {"repetition_penalty": 1.3, "last_n": 8}}, {"top_k": 50},
                            {"repetition_penalty": {"repetition_penalty": 1.3, "last_n": 8}}], None),
    ("top_n_sigma_min_p_typical", [{"top_n_sigma": 1.5}, {"min_p": 0.01}, {"typical_p": 0.8}], None),
    ("temperature_zero_then_typical", [{"temperature": 0.0}, {"typical_p": 0.8}], None),
    ("xtc_half", [{"xtc": {"threshold": 0.05, "probability": 0.5}}], None),
    ("xtc_then_typical", [{"xtc": {"threshold": 0.05, "probability": 1.0}}, {"typical_p": 0.9}], None),
    ("mirostat", MIRO["pipeline"], {"name": "mirostat", "tau": 3.0, "eta": 0.1}),
    ("mirostat_v2", MIRO["pipeline"], {"name": "mirostat_v2", "tau": 3.0, "eta": 0.1}),
]
#: Cases whose chain is itself random per draw: compared by their draws only.
STOCHASTIC = {"mirostat", "mirostat_v2", "xtc_half"}
FRESH = {"mirostat", "mirostat_v2"}            # stateful: compare the first step, a new chain per draw


@pytest.mark.parametrize("name, pipeline, sampler", CASES, ids=[c[0] for c in CASES])
def test_export_emits_exactly_the_chains_llama_cpp_runs_the_same(name, pipeline, sampler):
    """Both directions: what export emits conforms; what it refuses really differs in llama.cpp."""
    config = config_of(pipeline, sampler)
    found = differences(config, stochastic_kept=name in STOCHASTIC, fresh=name in FRESH)
    try:
        export_llamacpp(config)
    except ConfigError as exc:
        assert found, f"{name}: export refuses a chain llama.cpp runs the same: {exc}"
        return
    assert not found, f"{name}: export emits {flags_for(config)} but llama.cpp differs: {found}"
