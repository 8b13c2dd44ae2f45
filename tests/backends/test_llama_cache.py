"""The load cache (cache.py): a second start reads one prepared file instead of the GGUF, and
gives exactly the model and tokenizer the first start built."""

from __future__ import annotations

import warnings

import pytest
import torch

from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams, gguf_loader
from samplerkit.builtins.backends.llama.quant import int4_kernel_available


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SAMPLERKIT_CACHE", str(d))
    return d


@pytest.fixture
def tiny_gguf(tmp_path, hf_llama, tiny_tools):
    model, cfg = hf_llama
    return tiny_tools.write_gguf(tmp_path / "tiny.gguf", model, cfg, matrix_type="Q4_1",
                                 tokenizer=tiny_tools.train_byte_level_bpe())


def outputs(backend) -> list[torch.Tensor]:
    out = [backend.prefill([[5, 6, 7], [9]]).last]
    for s in range(3):
        out.append(backend.step(torch.tensor([s + 1, s + 2])))
    return out


def entries(cache_dir):
    return sorted((cache_dir / "models").glob("*.safetensors"))


def forbid_source_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the GGUF file was parsed although a cache entry exists")
    monkeypatch.setattr(gguf_loader, "load_gguf", fail)


@pytest.mark.parametrize("weights", ["auto", "dequantize"])
def test_second_start_equals_the_first_without_reading_the_gguf(cache_dir, tiny_gguf, monkeypatch, weights):
    first = LlamaBackend(LlamaParams(model=str(tiny_gguf), weights=weights, cache=True))
    assert len(entries(cache_dir)) == 1
    forbid_source_loading(monkeypatch)
    second = LlamaBackend(LlamaParams(model=str(tiny_gguf), weights=weights, cache=True))
    assert second.model.packed == first.model.packed
    for a, b in zip(outputs(first), outputs(second), strict=True):
        assert torch.equal(a, b)
    text = "Sphinx 1234 <s>fox</s> it's"
    assert second.tokenize(text) == first.tokenize(text)
    assert second.detokenize(first.tokenize(text)) == first.detokenize(first.tokenize(text))
    assert second.eos_token_ids == first.eos_token_ids
    assert second.config == first.config


def test_options_get_their_own_entries_and_cache_false_writes_none(cache_dir, tiny_gguf):
    LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=False))
    LlamaBackend(LlamaParams(model=str(tiny_gguf), weights="dequantize"))   # default: packed forms only
    assert entries(cache_dir) == []
    LlamaBackend(LlamaParams(model=str(tiny_gguf)))
    LlamaBackend(LlamaParams(model=str(tiny_gguf), weights="dequantize", cache=True))
    LlamaBackend(LlamaParams(model=str(tiny_gguf), weights="dequantize", dtype="bfloat16", cache=True))
    assert len(entries(cache_dir)) == (3 if int4_kernel_available() else 2)


def test_a_changed_file_is_not_served_from_the_old_entry(cache_dir, tmp_path, hf_llama, tiny_tools, tiny_gguf):
    old = outputs(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    model, cfg = hf_llama
    changed = type(model)(cfg).eval()
    changed.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})
    tiny_tools.write_gguf(tiny_gguf, changed, cfg, matrix_type="Q4_1", tokenizer=tiny_tools.train_byte_level_bpe())
    new = outputs(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    fresh = outputs(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=False)))
    assert not torch.equal(old[0], new[0])
    assert all(torch.equal(a, b) for a, b in zip(new, fresh, strict=True))
    assert len(entries(cache_dir)) == 2


def test_a_damaged_entry_is_rebuilt(cache_dir, tiny_gguf):
    want = outputs(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    (entry,) = entries(cache_dir)
    entry.write_bytes(entry.read_bytes()[:1000])            # a crash mid-write, a full disk...
    with pytest.warns(UserWarning, match="ignoring unreadable model cache"):
        got = outputs(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert entries(cache_dir)[0].stat().st_size > 1000       # rewritten whole


def test_an_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch, tiny_gguf):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("SAMPLERKIT_CACHE", str(blocker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True))
    assert any("could not write the model cache" in str(w.message) for w in caught)
    assert backend.prefill([[1, 2]]).last.shape == (1, 300)
