"""Fixtures for the llama backend tests: a tiny random Llama saved in HF format, GGUF writers."""

from __future__ import annotations

import os

import pytest
import torch

from samplerkit.testing.tiny_models import TINY_LLAMA as TINY
from samplerkit.testing.tiny_models import TOKENIZER_TEXT as TEXT
from samplerkit.testing.tiny_models import train_byte_level_bpe

# Nothing in these tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SAMPLERKIT_QUIET", "1")





@pytest.fixture(scope="session")
def hf_llama():
    """(HF model, config) of a tiny random Llama; norms are randomized too so they are tested."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model, cfg


@pytest.fixture(scope="session")
def hf_dir(hf_llama, tmp_path_factory):
    """The tiny model saved as an HF directory (config.json, safetensors, tokenizer.json)."""
    model, _ = hf_llama
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    train_byte_level_bpe().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, '
        '"chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}'
        '{% if add_generation_prompt %}<|assistant|>{% endif %}"}')
    return path


def write_gguf(path, model, cfg, *, matrix_type: str = "F32", arch: str = "llama",
               tokenizer=None, raw_override: dict | None = None):
    """Write ``model`` as a llama GGUF the way llama.cpp's converter does: Q/K rows permuted to
    the interleaved rotary layout, 2-D matrices stored as ``matrix_type`` (F32/Q8_0), norms F32.

    ``raw_override``: {gguf tensor name: (bytes array, GGMLQuantizationType)} to store instead.
    """
    import gguf
    import numpy as np

    from samplerkit.builtins.backends.llama.config import permute_for_interleaved_rope

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(TINY["rope_theta"])  # HF 5 keeps it in rope_parameters
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if tokenizer is not None:
        import json
        spec = json.loads(tokenizer.to_str())
        vocab = tokenizer.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        types = [3 if t in ("<s>", "</s>") else 1 for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    qtype = getattr(gguf.GGMLQuantizationType, matrix_type)
    for key, t in model.state_dict().items():
        base = key[: -len(".weight")]
        if base in names:
            name = names[base]
        else:
            _, _, i, rest = base.split(".", 3)
            name = f"blk.{i}.{layer[rest]}"
        arr = t.detach().float().numpy()
        if name.endswith("attn_q"):
            arr = permute_for_interleaved_rope(arr, cfg.num_attention_heads)
        elif name.endswith("attn_k"):
            arr = permute_for_interleaved_rope(arr, cfg.num_key_value_heads)
        name += ".weight"
        if raw_override and name in raw_override:
            raw, rtype = raw_override[name]
            w.add_tensor(name, raw, raw_dtype=rtype)
        elif arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_tools():
    """Helpers for tests (test modules cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(write_gguf=write_gguf, train_byte_level_bpe=train_byte_level_bpe, TEXT=TEXT)
