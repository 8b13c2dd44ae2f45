"""Fixtures: a tiny random Llama and a byte-level BPE tokenizer trained here, saved as a local
Hugging Face directory (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

from samplerkit.testing.tiny_models import TINY_LLAMA as TINY
from samplerkit.testing.tiny_models import train_byte_level_bpe as _tokenizer

# Nothing in these tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SAMPLERKIT_QUIET", "1")

EOS_ID = 1
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


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
