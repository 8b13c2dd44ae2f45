"""Hostile chat templates (issue 14 item 9): a template ships inside a model file, so it is
untrusted. Rendering must stay sandboxed, bounded in memory and time, and every failure must be
a clean GenerationError (exit 2 from the CLI, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samplerkit import GenerationError
from samplerkit.chat_template import MAX_OUTPUT_CHARS, ChatTemplate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# (template, words the message must contain)
HOSTILE = [
    ("{{ 'hello ' * 200000000 }}", "'*' repetition"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "range() loops"),
    ("{% for x in 'a' * 3000000 %}{% for y in 'a' * 3000000 %}{% endfor %}{% endfor %}", "template lines"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ undefined_thing.attr }}", "UndefinedError"),
    ("{% for %}", "syntax error"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox forbids"),
    ("{{ messages.append(1) }}", "sandbox forbids"),
    ("{{ 'a' | center(1000000000) }}", "'center' filter"),
    ("{{ 'x' | indent(1000000000) }}", "'indent' filter"),
    ("{{ 'ab' | replace('a', 'x' * 3000000) * 2 }}", "repetition"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "'~' concatenation"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "'+' concatenation"),
    ("{{ '%01000000000d' % 1 }}", "'%' format"),
    ("{{ '{:>1000000000}'.format(1) }}", "str.format"),
    ("{{ 10 ** 100000000 }}", "'**'"),
    ("{{ (messages | list) * 100000000 }}", "repetition"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% for i in range(3000) %}{{ 'y' * 3000 }}{% endfor %}", "rendered prompt"),
]


def test_a_normal_template_renders_every_turn():
    text = ChatTemplate(CHATML).render(MESSAGES)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("template", "words"), HOSTILE, ids=[t[:40] for t, _ in HOSTILE])
def test_hostile_template_is_a_clean_bounded_error(template, words):
    start = time.monotonic()
    with pytest.raises(GenerationError, match="chat template") as info:
        ChatTemplate(template).render(MESSAGES)
    assert words in str(info.value)
    assert time.monotonic() - start < 30          # bounded (the budgets stop each within seconds)
    assert info.value.__cause__ is None and info.value.__suppress_context__   # no jinja traceback chained


def test_the_size_cap_is_the_documented_one():
    ok = ChatTemplate("{{ 'a' * " + str(MAX_OUTPUT_CHARS) + " }}").render(MESSAGES)
    assert len(ok) == MAX_OUTPUT_CHARS
    with pytest.raises(GenerationError, match="repetition"):
        ChatTemplate("{{ 'a' * " + str(MAX_OUTPUT_CHARS + 1) + " }}").render(MESSAGES)


def test_trace_function_of_the_caller_is_restored():
    seen = []

    def tracer(frame, event, arg):
        seen.append(event)
        return None

    sys.settrace(tracer)
    try:
        ChatTemplate(CHATML).render(MESSAGES)
        after = sys.gettrace()
    finally:
        sys.settrace(None)
    assert after is tracer


@pytest.mark.parametrize(("messages", "words"), [
    ([], "non-empty list"),
    ([{"role": "wizard", "content": "x"}], "role must be one of"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    (["hi"], "must be a mapping"),
])
def test_bad_messages_are_named(messages, words):
    with pytest.raises(GenerationError, match=words):
        ChatTemplate(CHATML).render(messages)


# -- through the llama backend and the real CLI ------------------------------------------------

def _tiny_hf_dir(path, chat_template):
    """A tiny random Llama in HF format (config.json, safetensors, tokenizer) with this template."""
    from safetensors.torch import save_file

    from samplerkit.testing.tiny_models import TINY_LLAMA, train_byte_level_bpe

    cfg = dict(TINY_LLAMA, architectures=["LlamaForCausalLM"], model_type="llama", bos_token_id=0, eos_token_id=1)
    h, inter, v, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_key_value_heads"]
    head = h // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return 0.05 * torch.randn(*shape, generator=g)

    tensors = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": torch.ones(h), "lm_head.weight": w(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                        p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv * head, h),
                        p + "self_attn.v_proj.weight": w(kv * head, h), p + "self_attn.o_proj.weight": w(h, h),
                        p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                        p + "mlp.down_proj.weight": w(h, inter)})
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"))
    train_byte_level_bpe().save(str(path / "tokenizer.json"))
    tok_cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return path


ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    env = {**os.environ, "SAMPLERKIT_QUIET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("SAMPLERKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "samplerkit.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize(("template", "words"), [
    ("{{ 'hello ' * 200000000 }}", "'*' repetition"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "range() loops"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ ''.__class__.__mro__ }}", "sandbox forbids"),
    (None, "has no chat template"),
])
def test_cli_chat_with_a_hostile_or_missing_template_exits_2(tmp_path, template, words):
    model = _tiny_hf_dir(tmp_path / "model", template)
    proc = _cli("generate", "--model", str(model), "--chat", "--set", "sampler=greedy", "--max-new-tokens", "2", "Hi")
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_library_chat_on_the_llama_backend_renders_the_conversation(tmp_path):
    from samplerkit import Generator

    model = _tiny_hf_dir(tmp_path / "model", "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    gen = Generator({"backend": {"name": "llama", "model": str(model)}, "pipeline": [], "sampler": "greedy",
                     "generation": {"max_new_tokens": 2}})
    out = gen.generate([MESSAGES], chat=True)[0]
    rendered = "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>Hello.</s><|user|>Bye</s><|assistant|>"
    assert out.prompt == rendered and out.messages == MESSAGES
    assert out.prompt_token_ids == gen.backend.tokenize(rendered)
