"""A tiny Llama configuration and a byte-level BPE tokenizer trained on the spot, for tests
that need a real model directory without downloading anything (core, plugins and third-party
backends alike), and random GGUF quantized blocks (:func:`random_gguf_blocks`) for tests of
quantized products. Needs ``tokenizers`` (a core dependency); building the model needs transformers.
"""

from __future__ import annotations

import numpy as np

#: A 2-layer GQA Llama small enough to build in milliseconds (transformers ``LlamaConfig`` kwargs).
TINY_LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)

#: The text the tokenizer is trained on (letters, digits, punctuation, a newline).
TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
                  "Sphinx of black quartz, judge my vow! 12345 67890 -- it's what we'd've done.\n") * 20


def train_byte_level_bpe(vocab_size: int = 280):
    """A GPT-2 style byte-level BPE trained on :data:`TOKENIZER_TEXT`, with ``<s>`` and ``</s>``
    as ids 0 and 1 (a ``tokenizers.Tokenizer``; ``.save(path)`` writes a tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    return tok


def save_tiny_llama(path, *, seed: int = 0):
    """Save a tiny random Llama (:data:`TINY_LLAMA`, weights scaled so its distributions are not
    flat) and the BPE tokenizer as a local Hugging Face directory at ``path`` (needs transformers).
    Both the built-in ``llama`` backend and ``samplerkit-transformers`` load it: ``model: path``."""
    import json
    from pathlib import Path

    import torch
    import transformers

    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    cfg = transformers.LlamaConfig(**TINY_LLAMA, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.08 * noise)
    model.save_pretrained(path)
    train_byte_level_bpe().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return path


#: (bytes per block, values per block, byte offsets of float16 fields) of each format.
GGUF_BLOCK_LAYOUT = {"Q4_0": (18, 32, (0,)), "Q4_1": (20, 32, (0, 2)), "Q8_0": (34, 32, (0,)), "Q4_K": (144, 256, (0, 2))}


def random_gguf_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid random GGUF blocks: random code/scale bytes, float16 fields set to finite values of
    the size real models have (so no NaN/inf bit patterns)."""
    size, per_block, halves = GGUF_BLOCK_LAYOUT[type_name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, size), dtype=np.uint8)
    for off in halves:
        vals = (rng.standard_normal(blocks.shape[0]) * 0.02).astype(np.float16)
        blocks[:, off:off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)
