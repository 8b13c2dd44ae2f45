"""Load a Hugging Face-format Llama directory: ``config.json``, ``*.safetensors``, tokenizer.

Q/K projections are permuted from HF's half-split rotary layout to the interleaved layout
:mod:`.model` computes in (the same permutation llama.cpp's converter applies).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from samplerkit.builtins.backends.llama.config import (
    LlamaConfig,
    permute_for_interleaved_rope,
)
from samplerkit.builtins.backends.llama.tokenizer import (
    HFTokenizer,
    Tokenizer,
    load_sentencepiece_file,
)
from samplerkit.errors import ModelNotFoundError, SamplerkitError

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "wq", "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv", "self_attn.o_proj": "wo", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up", "mlp.down_proj": "w_down",
}


def read_config(directory: Path) -> tuple[LlamaConfig, dict]:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    raw = _read_json(path)
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise SamplerkitError(f"{path}: model_type {raw.get('model_type')!r} is not supported by the llama "
                              "backend (only 'llama')")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise SamplerkitError(f"{path}: attention/MLP biases are not supported by the llama backend")
    if raw.get("hidden_act", "silu") != "silu":
        raise SamplerkitError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    rope_params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope_params, dict):
        raise SamplerkitError(f"{path}: rope_scaling must be a JSON object, got {type(rope_params).__name__}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise SamplerkitError(f"{path}: missing required key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)} (a Llama config.json has {', '.join(_REQUIRED)})")

    def count(key: str, default=None) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SamplerkitError(f"{path}: {key} must be a positive integer, got {_short(value)}")
        return value

    def number(key: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise SamplerkitError(f"{path}: {key} must be a positive number, got {_short(value)}")
        return float(value)

    n_heads = count("num_attention_heads")
    hidden = count("hidden_size")
    config = LlamaConfig(
        vocab_size=count("vocab_size"),
        hidden_size=hidden,
        intermediate_size=count("intermediate_size"),
        num_layers=count("num_hidden_layers"),
        num_heads=n_heads,
        num_kv_heads=count("num_key_value_heads") if raw.get("num_key_value_heads") is not None else n_heads,
        rope_theta=number("rope_theta", rope_params.get("rope_theta") or raw.get("rope_theta", 10000.0)),
        rms_norm_eps=number("rms_norm_eps", raw.get("rms_norm_eps", 1e-6)),
        max_position=count("max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        head_dim=count("head_dim") if raw.get("head_dim") is not None else hidden // n_heads,
    )
    if config.num_heads % config.num_kv_heads:
        raise SamplerkitError(f"{path}: num_attention_heads {config.num_heads} is not a multiple of "
                              f"num_key_value_heads {config.num_kv_heads}")
    return config, rope_params


#: config.json keys without which the model's shape is unknown.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def llama3_freq_factors(config: LlamaConfig, rope: dict) -> torch.Tensor:
    """Per-frequency divisors equivalent to HF's ``llama3`` rope scaling (``inv_freq / factors``)."""
    from samplerkit.builtins.backends.llama.model import rope_inv_freq

    inv_freq = rope_inv_freq(config)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    scaled = torch.where(medium, smoothed, scaled)
    return inv_freq / scaled


def read_weights(directory: Path, config: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{directory}: no *.safetensors weights (pytorch .bin files are not supported)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors = _read_safetensors(f, safe_open)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError...
            raise SamplerkitError(f"{f}: not a readable safetensors file ({type(e).__name__}: {_short(str(e), 200)}); "
                                  "re-download or re-convert the model") from e
        for key, w in tensors:
            name = _canonical_name(key)
            if name is None:
                continue
            w = w.to(dtype)
            if name.endswith(".wq"):
                w = permute_for_interleaved_rope(w, config.num_heads)
            elif name.endswith(".wk"):
                w = permute_for_interleaved_rope(w, config.num_kv_heads)
            out[name] = w
    if "lm_head" in out and config.tie_word_embeddings:
        del out["lm_head"]
    missing = [n for n in ("embed", "norm", "layers.0.wq") if n not in out]
    if missing:
        raise SamplerkitError(f"{directory}: weights missing from the safetensors files: {', '.join(missing)}")
    return out


def _read_safetensors(path: Path, safe_open) -> list[tuple[str, torch.Tensor]]:
    """Every (key, tensor) of one safetensors file, read eagerly so that a damaged file fails here."""
    with safe_open(str(path), framework="pt") as sf:
        return [(key, sf.get_tensor(key)) for key in sf.keys()]


def _canonical_name(key: str) -> str | None:
    if not key.endswith(".weight"):
        return None
    key = key[: -len(".weight")]
    if key.startswith("model."):
        key = key[len("model."):]
    if key == "embed_tokens":
        return "embed"
    if key in ("norm", "lm_head"):
        return key
    parts = key.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def read_tokenizer(directory: Path) -> Tokenizer:
    """``tokenizer.json`` through HF tokenizers, else ``tokenizer.model`` through sentencepiece;
    chat template and special tokens from ``tokenizer_config.json``, EOS ids also from
    ``generation_config.json`` (instruct models list several there)."""
    cfg = _read_json(directory / "tokenizer_config.json")
    gen = _read_json(directory / "generation_config.json")
    model_cfg = _read_json(directory / "config.json")
    template = cfg.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def token_text(v) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    bos_text, eos_text = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
    eos_ids = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])

    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTok

        tok = HFTok.from_file(str(directory / "tokenizer.json"))
        bos_id = tok.token_to_id(bos_text) if bos_text else model_cfg.get("bos_token_id")
        if eos_text and tok.token_to_id(eos_text) is not None:
            eos_ids = sorted({*eos_ids, tok.token_to_id(eos_text)})
        # A tokenizer.json with a post-processor adds BOS itself; otherwise follow add_bos_token.
        has_post = tok.post_processor is not None and "TemplateProcessing" in type(tok.post_processor).__name__
        return HFTokenizer(tok, uses_post_processor=has_post, bos_id=bos_id, eos_ids=eos_ids,
                           add_bos=bool(cfg.get("add_bos_token", False)), chat_template=template,
                           bos_token=bos_text or "", eos_token=eos_text or "")
    if (directory / "tokenizer.model").is_file():
        return load_sentencepiece_file(directory / "tokenizer.model", eos_ids=eos_ids or None,
                                       add_bos=bool(cfg.get("add_bos_token", True)), chat_template=template)
    raise ModelNotFoundError(f"{directory}: no tokenizer.json or tokenizer.model")


def _read_json(path: Path) -> dict:
    """A JSON object file of the model directory ({} when absent); any other content is a clean
    error naming the file."""
    if not path.is_file():
        return {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SamplerkitError(f"{path}: not UTF-8 text (byte {e.start}); a model's JSON files must be UTF-8") from e
    except OSError as e:
        raise SamplerkitError(f"{path}: cannot be read ({e.strerror})") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SamplerkitError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except RecursionError as e:
        raise SamplerkitError(f"{path}: JSON nested too deeply") from e
    if not isinstance(value, dict):
        raise SamplerkitError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def load_hf_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32
                ) -> tuple[LlamaConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """Config, canonical weights and tokenizer (None when the directory has none) of an HF directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelNotFoundError(f"model directory not found: {directory}")
    config, rope = read_config(directory)
    weights = read_weights(directory, config, dtype)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "llama3":
        weights["rope_freqs"] = llama3_freq_factors(config, rope)
    elif rope_type != "default":
        raise SamplerkitError(f"{directory}: rope scaling {rope_type!r} is not supported by the llama backend")
    has_tokenizer = any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    return config, weights, read_tokenizer(directory) if has_tokenizer else None
