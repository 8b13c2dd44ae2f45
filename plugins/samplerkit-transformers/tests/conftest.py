"""Fixtures: a tiny random Llama and a byte-level BPE tokenizer trained here, saved as a local
Hugging Face directory (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

# Nothing in these tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SAMPLERKIT_QUIET", "1")

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "Sphinx of black quartz, judge my vow! 12345 67890 -- it's what we'd've done.\n") * 20
EOS_ID = 1
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer():
    """A GPT-2 style byte-level BPE trained on TEXT, with <s> and </s> specials (ids 0 and 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (weights scaled up so its distributions are not flat)."""
    import json

    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, bos_token_id=0, eos_token_id=EOS_ID)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    _tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    return path


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The saved model loaded back by transformers itself: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


@pytest.fixture(scope="session")
def backend(model_dir):
    from samplerkit_transformers import TransformersBackend, TransformersParams

    return TransformersBackend(TransformersParams(model=str(model_dir)))
