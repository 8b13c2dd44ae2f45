"""Hostile model files and model-cache damage (issue 14, item 13): every case ends in a clean
error naming the file, or in the model loading from its file; never a traceback, never a run on
damaged weights, never the intact model blamed for the cache's damage."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams, cache, default_model
from samplerkit.errors import SamplerkitError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAMPLERKIT_QUIET", "1")


def _tiny_tools():
    """The GGUF writer of tests/backends/conftest.py (conftests cannot be imported by name)."""
    spec = importlib.util.spec_from_file_location("_backend_conftest", Path(__file__).parents[1] / "backends" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model():
    transformers = pytest.importorskip("transformers", reason="builds the tiny model")
    from samplerkit.testing.tiny_models import TINY_LLAMA

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY_LLAMA, bos_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


@pytest.fixture
def hf_dir(tmp_path, tiny_model):
    from samplerkit.testing.tiny_models import train_byte_level_bpe

    model, _ = tiny_model
    path = tmp_path / "model"
    model.save_pretrained(path)
    train_byte_level_bpe().save(str(path / "tokenizer.json"))
    LlamaBackend(LlamaParams(model=str(path)))           # the intact directory loads
    return path


@pytest.fixture
def tiny_gguf(tmp_path, tiny_model):
    from samplerkit.testing.tiny_models import train_byte_level_bpe

    model, cfg = tiny_model
    return _tiny_tools().write_gguf(tmp_path / "tiny.gguf", model, cfg, matrix_type="Q4_1",
                                    tokenizer=train_byte_level_bpe())


def cli_error(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run([sys.executable, "-m", "samplerkit.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


BAD_CONFIGS = {
    "invalid JSON": (b'{"vocab_size": 300,', "invalid JSON at line 1"),
    "a list": (b"[1, 2, 3]", "expected a JSON object, got a list"),
    "missing keys": (b'{"model_type": "llama", "vocab_size": 300}', "missing required keys hidden_size"),
    "not UTF-8": ('{"model_type": "llama", "name": "caf\u00e9"}'.encode("latin-1"), "not UTF-8"),
    "UTF-16": ('{"model_type": "llama"}'.encode("utf-16"), "not UTF-8"),
    "a wrong type": (None, "hidden_size must be a positive integer, got 'wide'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_json_is_a_clean_error_naming_the_file(hf_dir, case):
    content, message = BAD_CONFIGS[case]
    config = hf_dir / "config.json"
    if content is None:
        content = json.dumps({**json.loads(config.read_text()), "hidden_size": "wide"}).encode()
    config.write_bytes(content)
    with pytest.raises(SamplerkitError, match="config.json: ") as err:
        LlamaBackend(LlamaParams(model=str(hf_dir)))
    assert message in str(err.value) and str(config) in str(err.value)


def test_a_bad_config_json_through_the_cli_exits_2_without_a_traceback(hf_dir):
    (hf_dir / "config.json").write_bytes(b"[]")
    proc = cli_error("generate", "--set", "backend=llama", "--model", str(hf_dir), "--max-new-tokens", "2", "hi")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "expected a JSON object" in proc.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_a_corrupt_safetensors_file_is_a_clean_error_naming_it(hf_dir, damage):
    (weights,) = hf_dir.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(SamplerkitError, match="not a readable safetensors file") as err:
        LlamaBackend(LlamaParams(model=str(hf_dir)))
    assert str(weights) in str(err.value)


# -- the model cache ----------------------------------------------------------------------------------

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SAMPLERKIT_CACHE", str(d))
    return d


def logits(backend) -> torch.Tensor:
    return backend.prefill([[5, 6, 7], [9]]).last


def the_entry(cache_dir) -> Path:
    (entry,) = (cache_dir / "models").glob("*.safetensors")
    return entry


def test_corrupted_weight_bytes_in_an_entry_are_detected_and_rebuilt(cache_dir, tiny_gguf):
    want = logits(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    entry = the_entry(cache_dir)
    data = bytearray(entry.read_bytes())
    for at in range(len(data) - 4000, len(data) - 3000, 7):   # weight bytes near the end (not the header)
        data[at] ^= 0x5A
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"ignoring unreadable model cache .*weights are damaged.*model file itself is not affected"):
        got = logits(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    assert torch.equal(got, want)
    with warnings.catch_warnings():                           # rebuilt: the next start reads it cleanly
        warnings.simplefilter("error")
        assert torch.equal(logits(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True))), want)


def test_an_unreadable_entry_in_an_unwritable_directory_loads_the_model_file(cache_dir, tiny_gguf, monkeypatch):
    want = logits(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    entry = the_entry(cache_dir)
    entry.write_bytes(b"\x00" * 64)
    folder = entry.parent
    folder.chmod(0o555)
    try:
        if os.geteuid() == 0:   # root ignores the mode: make removing and writing fail as they would
            def refuse(self, *a, **k):
                raise PermissionError(13, "Permission denied", str(self))
            monkeypatch.setattr(pathlib.Path, "unlink", refuse)
            monkeypatch.setattr(cache, "_write_atomic", lambda path, write: refuse(path))
        with pytest.warns(UserWarning, match="cannot be removed .*loads from its file"):
            got = logits(LlamaBackend(LlamaParams(model=str(tiny_gguf), cache=True)))
    finally:
        folder.chmod(0o755)
    assert torch.equal(got, want)


def test_a_wrong_digest_record_does_not_blame_the_intact_default_model(cache_dir):
    try:
        path = default_model.find_default_model()
    except Exception as e:  # noqa: BLE001 - any reason means: skip and say why
        pytest.skip(f"default model unavailable ({e})")
    where, memo = default_model._where(path)
    memo.write_text(json.dumps({**where, "sha256": "0" * 64}))     # a damaged record, same path/size/mtime
    assert default_model.find_default_model() == path               # no "is corrupt" error
    assert json.loads(memo.read_text())["sha256"] == default_model.SHA256   # and the record is repaired


def test_a_really_corrupt_default_model_is_still_named(cache_dir, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(SamplerkitError, match="is corrupt"):
        default_model.verify_sha256(fake, default_model.SHA256)


def test_cache_writes_never_follow_a_planted_symlink(tmp_path, monkeypatch):
    """Someone who can write to the cache directory plants symlinks at every temporary name a
    writer could predict (``.NAME.PID.tmp``, the pattern used before): the cache entry and the
    digest record are still written, and the symlinks' targets are untouched."""
    monkeypatch.setenv("SAMPLERKIT_CACHE", str(tmp_path / "cache"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    _, memo = default_model._where(model)
    memo.parent.mkdir(parents=True)
    os.symlink(victim, memo.with_name(f".{memo.name}.{os.getpid()}.tmp"))
    target = tmp_path / "cache" / "entry.safetensors"
    os.symlink(victim, target.with_name(f".{target.name}.{os.getpid()}.tmp"))

    default_model._remember(model, "ab" * 32)
    cache._write_atomic(target, lambda tmp: tmp.write_bytes(b"entry"))

    assert victim.read_text() == "precious"
    assert json.loads(memo.read_text())["sha256"] == "ab" * 32
    assert target.read_bytes() == b"entry"
    leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
    assert leftovers == []
