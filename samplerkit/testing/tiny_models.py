"""A tiny Llama configuration and a byte-level BPE tokenizer trained on the spot, for tests
that need a real model directory without downloading anything (core, plugins and third-party
backends alike). Needs ``tokenizers`` (a core dependency); building the model needs transformers.
"""

from __future__ import annotations

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
