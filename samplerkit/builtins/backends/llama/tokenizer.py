"""Tokenizers for Llama-family models, built on well-kept libraries (not hand-written).

* Byte-level BPE (GPT-2 style; SmolLM2, Llama 3, Qwen): HF ``tokenizers``, either from a
  ``tokenizer.json`` or assembled from the vocabulary and merges a GGUF file embeds.
* SentencePiece (Llama 1/2, Mistral): the ``sentencepiece`` library, either from a ``.model`` file
  or from a model proto assembled from a GGUF ``llama`` vocabulary (pieces, scores, types).

Chat templates are rendered with jinja2 in a sandbox, as transformers does, within size and
time budgets (:mod:`samplerkit.chat_template`).
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

# GGUF token types (llama.cpp ``llama_token_type``) -- numerically the same as sentencepiece's
# ``ModelProto.SentencePiece.Type``, which lets the GGUF -> sentencepiece conversion copy them.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre`` (from llama.cpp ``llama-vocab.cpp``).
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_INDIVIDUAL_DIGITS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


class Tokenizer:
    """What the backend needs from a tokenizer; subclasses wrap one library."""

    def __init__(self, *, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool,
                 chat_template: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.bos_id = bos_id
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids to text; control tokens (BOS, EOS, chat markers) are not rendered."""
        raise NotImplementedError

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Text to ids. Special-token text (``<|im_start|>``) maps to its id. ``add_special`` adds
        BOS when the model expects one and the text does not already start with it (a chat
        template may render it)."""
        ids = self._encode(text)
        if add_special and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def token_vocabulary(self, vocab_size: int):
        """The :class:`~samplerkit.backend.TokenVocabulary` of this tokenizer for a model with
        ``vocab_size`` logits (constrained decoding reads it)."""
        raise NotImplementedError

    def apply_chat_template(self, messages: str | Sequence[Mapping[str, Any]]) -> str:
        """Render the model's own chat template for a conversation (a list of ``{"role",
        "content"}`` messages; a string is one user turn), ready for the assistant's reply.
        Rendering is sandboxed and bounded (see :mod:`samplerkit.chat_template`); a model
        without a template raises NotImplementedError."""
        if not self.chat_template:
            raise NotImplementedError("this model has no chat template")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self._compiled_template.render(messages, add_generation_prompt=True)

    @cached_property
    def _compiled_template(self):
        from samplerkit.chat_template import ChatTemplate

        return ChatTemplate(self.chat_template, bos_token=self.bos_token, eos_token=self.eos_token)


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (byte-level BPE or anything a tokenizer.json describes).

    ``uses_post_processor``: the tokenizer.json adds BOS itself (its TemplateProcessing), so
    :meth:`encode` passes ``add_special_tokens`` through instead of inserting BOS.
    """

    def __init__(self, tok, *, uses_post_processor: bool = False, **kw: Any):
        super().__init__(**kw)
        self.tok = tok
        self.uses_post_processor = uses_post_processor

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        if self.uses_post_processor:
            return self.tok.encode(text, add_special_tokens=add_special).ids
        return super().encode(text, add_special=add_special)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_vocabulary(self, vocab_size: int):
        from samplerkit.backend import TokenVocabulary

        # The engine reads the tokenizer's own JSON: byte-level, metaspace and added tokens
        # come out exactly as the tokenizer defines them.
        return TokenVocabulary(vocab_size=vocab_size, eos_token_ids=tuple(sorted(self.eos_ids)),
                               hf_tokenizer_json=self.tok.to_str(), bos_token_id=self.bos_id)


class SentencePieceTokenizer(Tokenizer):
    """A ``sentencepiece.SentencePieceProcessor``; control-token text in the input (``</s>``,
    ``[INST]`` when user-defined) maps to its id because we split on it before encoding."""

    def __init__(self, sp, **kw: Any):
        super().__init__(**kw)
        self.sp = sp
        n = sp.get_piece_size()
        self._specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) and sp.id_to_piece(i)}

    def _encode(self, text: str) -> list[int]:
        if not self._specials or not any(s in text for s in self._specials):
            return self.sp.encode(text)
        import re
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for part in re.split(pattern, text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # sentencepiece drops control ids (BOS/EOS) when decoding.
        return self.sp.decode([int(i) for i in ids])

    def token_vocabulary(self, vocab_size: int):
        """Each piece as bytes: ``▁`` is a space, ``<0xAB>`` byte pieces are that byte, control and
        unknown pieces are no text (special)."""
        from samplerkit.backend import TokenVocabulary

        sp = self.sp
        tokens: list[bytes] = []
        special: list[int] = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                tokens.append(b"")
                special.append(i)
            elif sp.is_byte(i):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("▁", " ").encode("utf-8"))
        verbatim = self._verbatim_processor()
        return TokenVocabulary(vocab_size=vocab_size, eos_token_ids=tuple(sorted(self.eos_ids)), tokens=tokens,
                               special_token_ids=tuple(special), bos_token_id=self.bos_id,
                               encode=lambda data: verbatim.encode(data.decode("utf-8", errors="replace")))

    def _verbatim_processor(self):
        """A copy of the model that encodes text as exactly its bytes, for the engine (which
        tokenizes text a grammar forces in the middle of an output, so ``encode(t)`` must spell
        ``t``): no dummy-prefix space (``"cat"`` is not ``"▁cat"``), no whitespace folding and no
        normalization (an empty precompiled charsmap is the identity).

        Protobuf merges a message field that occurs twice and keeps the last value of a scalar,
        so appending a ``normalizer_spec`` (ModelProto field 3) with ``precompiled_charsmap=2``,
        ``add_dummy_prefix=3`` and ``remove_extra_whitespaces=4`` overrides just those three."""
        import sentencepiece

        override = _field_bytes(2, b"") + _field_varint(3, False) + _field_varint(4, False)
        proto = self.sp.serialized_model_proto() + _field_bytes(3, override)
        return sentencepiece.SentencePieceProcessor(model_proto=proto)


def load_sentencepiece_file(path: str, *, eos_ids: Sequence[int] | None = None,
                            add_bos: bool = True, chat_template: str | None = None) -> SentencePieceTokenizer:
    """A tokenizer from a sentencepiece ``.model`` file; BOS/EOS from the model itself."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = list(eos_ids) if eos_ids is not None else ([sp.eos_id()] if sp.eos_id() >= 0 else [])
    return SentencePieceTokenizer(sp, bos_id=bos, eos_ids=eos, add_bos=add_bos, chat_template=chat_template,
                                  bos_token=sp.id_to_piece(bos) if bos is not None else "",
                                  eos_token=sp.id_to_piece(eos[0]) if eos else "")


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None,
                   pre: str = "gpt2"):
    """A ``tokenizers.Tokenizer`` for a GGUF ``gpt2`` vocabulary: BPE over bytes mapped to
    printable characters (GPT-2's ByteLevel), with the pre-tokenizer llama.cpp uses for ``pre``."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTok(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _INDIVIDUAL_DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "qwen2"):
        regex = _LLAMA3_REGEX if pre == "llama-bpe" else _QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in ("gpt2", "default", "mpt", "olmo", "jais"):
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known here; using GPT-2's", stacklevel=3)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    if token_types is not None:
        specials = [AddedToken(tokens[i], special=t == TOKEN_CONTROL, normalized=False)
                    for i, t in enumerate(token_types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        tok.add_tokens(specials)
    return tok


# -- GGUF "llama" vocabulary -> sentencepiece model proto ------------------------------------
# sentencepiece ships its proto schema only through the protobuf package (not a dependency
# here), so we write the handful of ModelProto fields we need in protobuf wire format directly.

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are sign-extended to 64 bits
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(int(value))


def _field_bytes(num: int, value: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _field_float(num: int, value: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", value)


def sentencepiece_proto(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int], *,
                        unk_id: int, bos_id: int, eos_id: int, pad_id: int = -1,
                        add_dummy_prefix: bool = True) -> bytes:
    """Serialized ``sentencepiece.ModelProto`` of a BPE model with these pieces (Llama's tokenizer
    is BPE with byte fallback and no normalization, which is what GGUF ``llama`` vocabularies hold).

    Field numbers from sentencepiece_model.proto: ModelProto{pieces=1, trainer_spec=2,
    normalizer_spec=3}; SentencePiece{piece=1, score=2, type=3}; TrainerSpec{model_type=3,
    vocab_size=4, byte_fallback=35, unk_id=40, bos_id=41, eos_id=42, pad_id=43};
    NormalizerSpec{name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}.
    """
    out = bytearray()
    for piece, score, ttype in zip(tokens, scores, token_types, strict=True):
        msg = _field_bytes(1, piece.encode("utf-8")) + _field_float(2, float(score)) + _field_varint(3, int(ttype))
        out += _field_bytes(1, msg)
    byte_fallback = any(t == TOKEN_BYTE for t in token_types)
    trainer = (_field_varint(3, 2) + _field_varint(4, len(tokens)) + _field_varint(35, byte_fallback)
               + _field_varint(40, unk_id) + _field_varint(41, bos_id) + _field_varint(42, eos_id)
               + _field_varint(43, pad_id))
    normalizer = (_field_bytes(1, b"identity") + _field_varint(3, add_dummy_prefix)
                  + _field_varint(4, False) + _field_varint(5, True))
    out += _field_bytes(2, trainer) + _field_bytes(3, normalizer)
    return bytes(out)


def sentencepiece_from_vocab(tokens, scores, token_types, *, unk_id: int, bos_id: int | None,
                             eos_ids: Sequence[int], add_bos: bool, add_dummy_prefix: bool,
                             chat_template: str | None = None) -> SentencePieceTokenizer:
    """A :class:`SentencePieceTokenizer` from a GGUF ``llama`` vocabulary."""
    import sentencepiece

    proto = sentencepiece_proto(tokens, scores, token_types, unk_id=unk_id,
                                bos_id=-1 if bos_id is None else bos_id,
                                eos_id=eos_ids[0] if eos_ids else -1, add_dummy_prefix=add_dummy_prefix)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    return SentencePieceTokenizer(sp, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                                  chat_template=chat_template,
                                  bos_token=tokens[bos_id] if bos_id is not None else "",
                                  eos_token=tokens[eos_ids[0]] if eos_ids else "")
