"""Fuzzing YAML configs through ``samplerkit validate`` (issue 14): random nested structures,
random step names and parameters, random scalars, shared nodes (which YAML writes as anchors
and aliases), and damaged text. Whatever the document, the command either accepts it (exit 0)
or prints a clean error (exit 2): never another exception, and each example in bounded time."""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samplerkit.cli import main
from samplerkit.config import GenerationConfig
from samplerkit.presets import list_presets
from samplerkit.registry import default_registry

REGISTRY = default_registry()
PROCESSORS = REGISTRY.names("processor")
SAMPLERS = REGISTRY.names("sampler")
FIELDS = sorted({f for kind in ("processor", "sampler", "backend") for e in REGISTRY.entries(kind)
                 for f in e.cls.Params.model_fields})
STEP_NAMES = [*PROCESSORS, *SAMPLERS, "top_q", "gredy", "", "Top_P"]
SECTIONS = ["backend", "pipeline", "sampler", "generation", "plugins", "on_invalid", "preset", "pipelin"]
TEXT = st.text(max_size=12)

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT, st.sampled_from(STEP_NAMES), st.sampled_from(["cpu", "cuda:0", "potato", "bigram", "llama"]),
)


def nested(leaves):
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), TEXT, st.integers(-5, 5)), inner, max_size=4)),
        max_leaves=12)


values = nested(scalars)
params = st.dictionaries(st.one_of(st.sampled_from(FIELDS), TEXT), values, max_size=4)
pipeline_entry = st.one_of(
    st.sampled_from(STEP_NAMES),
    st.builds(lambda name, p: {name: p}, st.sampled_from(STEP_NAMES), st.one_of(params, scalars)),
    values,
)
named_section = st.one_of(
    st.sampled_from([*SAMPLERS, "bigram", "llama", "top_p"]),
    st.builds(lambda name, p: {"name": name, **p}, st.one_of(st.sampled_from([*SAMPLERS, "bigram"]), values), params),
    values,
)
generation = st.dictionaries(st.sampled_from([*GenerationConfig.model_fields, "stopp"]), values, max_size=4)
plugins = st.one_of(st.fixed_dictionaries({"block": st.lists(st.one_of(
    st.sampled_from(["samplerkit.builtins.shaping", "samplerkit.builtins.shapin"]), values), max_size=3)}), values)
document = st.fixed_dictionaries({}, optional={
    "backend": st.one_of(st.just("bigram"), named_section),
    "pipeline": st.one_of(st.lists(pipeline_entry, max_size=5), values),
    "sampler": named_section,
    "generation": st.one_of(generation, values),
    "plugins": plugins,
    "on_invalid": st.one_of(st.sampled_from(["raise", "mark_invalid", "fallback_greedy"]), values),
    "preset": st.one_of(st.sampled_from([*list_presets(), "lama_cpp"]), values),
    "pipelin": values,
})


@st.composite
def yaml_documents(draw) -> str:
    """A document as YAML text: a drawn structure, some of its nodes shared (dumped as
    ``&id001`` / ``*id001``), sometimes damaged by an insertion or a cut."""
    doc = draw(document)
    if doc and draw(st.booleans()):
        # Share one section's value under another key: yaml.safe_dump writes an anchor and an alias.
        source, target = draw(st.sampled_from(sorted(doc))), draw(st.sampled_from(SECTIONS))
        shared = doc[source]
        doc[target] = [shared, shared] if draw(st.booleans()) else shared
    try:
        text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.sampled_from([None, True, False])))
    except yaml.YAMLError:
        text = str(doc)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["", ":", "- ", "&a ", "*a", "[", "{", "\t", "\n  ", "'", "%"])) + \
            text[at + draw(st.integers(0, 3)):]
    return text


_DIR = Path(tempfile.mkdtemp(prefix="samplerkit-fuzz-"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(yaml_documents())
def test_validate_gives_only_clean_errors(text):
    path = _DIR / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])           # any exception but a clean error propagates
    elapsed = time.perf_counter() - start
    assert code in (0, 2), (code, err.getvalue())
    if code == 2:
        message = err.getvalue()
        assert message.startswith("samplerkit validate: error: ") and "Traceback" not in message
        assert len(message) < 20_000
    # Generous: one validation takes milliseconds (the registry is rebuilt for each).
    assert elapsed < 5.0, f"validate took {elapsed:.1f} s on:\n{text[:2000]}"

