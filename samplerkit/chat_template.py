"""Chat templates from model files, rendered with bounded resources.

A chat template is Jinja code shipped inside a model file (GGUF ``tokenizer.chat_template``,
``tokenizer_config.json``), so it is untrusted input. It runs in Jinja's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute escapes, no mutation of
the messages), as transformers does, and additionally within explicit budgets, because the
sandbox alone bounds neither memory (``{{ 'hello ' * 200000000 }}``) nor time (nested
``range(100000)`` loops):

* **size**: every operation that can build a large value is checked *before* it runs against
  :data:`MAX_OUTPUT_CHARS`: ``*`` (``str``/``list`` repetition), ``+`` and ``~``
  (concatenation), ``%`` formatting, ``**`` (huge integers), and the filters that pad or
  expand (``center``, ``indent``, ``wordwrap``, ``replace``, ``format``, ``join``); the
  rendered output is streamed and cut off at the same cap;
* **work**: ``range()`` draws from one per-render budget of :data:`MAX_LOOP_ITEMS` items (so
  nesting cannot multiply it), and a trace function counts the template's executed lines
  (at most :data:`MAX_LINES`) and checks a wall-clock deadline (:data:`MAX_SECONDS`).

Every failure (a syntax error, ``raise_exception(...)``, an undefined variable used in an
operation, a sandbox violation, a budget exceeded) is a :class:`~samplerkit.errors.GenerationError`
naming what went wrong; nothing from the template escapes as a traceback.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from samplerkit.errors import GenerationError, short_repr

#: Longest rendered prompt, and longest string or list any template operation may build.
MAX_OUTPUT_CHARS = 4_000_000
#: Total items all ``range()`` calls of one render may produce.
MAX_LOOP_ITEMS = 1_000_000
#: Template source lines one render may execute (each loop iteration counts its lines).
MAX_LINES = 5_000_000
#: Wall-clock limit of one render (compile included).
MAX_SECONDS = 10.0
#: Largest template source accepted.
MAX_TEMPLATE_CHARS = 1_000_000

#: Roles a message may have (OpenAI's chat roles; templates decide how to render each).
ROLES = ("system", "user", "assistant", "tool", "developer")


class _Budget(Exception):
    """Internal: a resource budget was exceeded (turned into a GenerationError)."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_size(n: int, what: str) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise _Budget(f"{what} would build {n:,} items (the limit is {MAX_OUTPUT_CHARS:,})")


_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _checked_percent(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        widths = [int(w) for m in _FORMAT_WIDTH.finditer(left) for w in m.groups() if w and w != "*"]
        if any(w > MAX_OUTPUT_CHARS for w in widths) or "*" in "".join(
                "".join(g for g in m.groups() if g) for m in _FORMAT_WIDTH.finditer(left)):
            raise _Budget("a '%' format with a '*' width or a width above the size limit")
        _check_size(len(left) + sum(widths) + _size(right), "'%' formatting")
    return left % right


def _checked_mul(left: Any, right: Any) -> Any:
    for seq, count in ((left, right), (right, left)):
        if _size(seq) and isinstance(count, int):
            _check_size(_size(seq) * max(count, 0), "'*' repetition")
    return left * right


def _checked_add(left: Any, right: Any) -> Any:
    if _size(left) or _size(right):
        _check_size(_size(left) + _size(right), "'+' concatenation")
    return left + right


def _checked_pow(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        _check_size(int(right * max(abs(left).bit_length(), 1) / 3.32), "'**' (digits of the result)")
    return left ** right


class _Render:
    """The budgets of one render: the range() items left, the lines left, the deadline."""

    def __init__(self) -> None:
        self.items = MAX_LOOP_ITEMS
        self.lines = MAX_LINES
        self.deadline = time.monotonic() + MAX_SECONDS

    def take_items(self, n: int) -> None:
        self.items -= n
        if self.items < 0:
            raise _Budget(f"its range() loops would run more than {MAX_LOOP_ITEMS:,} iterations in all")

    def tracer(self, frame, event, arg):
        # Only frames of compiled template code are traced line by line; the rest run untraced.
        if event == "call":
            return self._local if frame.f_code.co_filename == "<template>" else None
        return None

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines -= 1
            if self.lines < 0:
                raise _Budget(f"it executed more than {MAX_LINES:,} template lines")
            if self.lines % 1024 == 0 and time.monotonic() > self.deadline:
                raise _Budget(f"it ran longer than {MAX_SECONDS:g} s")
        return self._local


_local = threading.local()      # the render in progress on this thread (trace functions are per thread too)


def _budget() -> _Render:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _Render()


def _environment():
    from jinja2 import filters
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    class BoundedCodeGenerator(CodeGenerator):
        # ``a ~ b`` compiles to str_join((a, b)), which no sandbox hook sees: route it
        # through the environment so its size is checked like '+'.
        def visit_Concat(self, node, frame):
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    def bounded_range(*args: int) -> range:
        rng = safe_range(*args)
        _budget().take_items(len(rng))
        return rng

    def bounded_center(value, width=80):
        _check_size(max(int(width), len(str(value))), "the 'center' filter")
        return filters.do_center(value, width)

    def bounded_indent(s, width=4, first=False, blank=False):
        n = len(width) if isinstance(width, str) else int(width)
        _check_size(len(str(s)) * (n + 1) + n, "the 'indent' filter")
        return filters.do_indent(s, width, first, blank)

    def bounded_replace(eval_ctx, s, old, new, count=None):
        s, old, new = str(s), str(old), str(new)
        hits = (len(s) + 1) if old == "" else s.count(old)
        if count is not None:
            hits = min(hits, int(count))
        _check_size(len(s) + hits * max(len(new) - len(old), 0), "the 'replace' filter")
        return filters.do_replace(eval_ctx, s, old, new, count)

    def bounded_format(value, *args, **kwargs):
        result = _checked_percent(str(value), kwargs or args)
        return result

    def bounded_join(eval_ctx, value, d="", attribute=None):
        items = list(value)
        _check_size(sum(len(str(x)) for x in items) + len(str(d)) * len(items), "the 'join' filter")
        return filters.do_join(eval_ctx, items, d, attribute)

    def bounded_wordwrap(environment, s, width=79, **kw):
        _check_size(2 * len(str(s)), "the 'wordwrap' filter")
        return filters.do_wordwrap(environment, s, width, **kw)

    from jinja2.utils import pass_environment, pass_eval_context

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "+", "%", "**"})

        def __init__(self, **kw):
            super().__init__(**kw)
            self.binop_table.update({"*": _checked_mul, "+": _checked_add, "%": _checked_percent,
                                     "**": _checked_pow})

        def bounded_concat(self, parts):
            parts = [str(p) for p in parts]
            _check_size(sum(map(len, parts)), "'~' concatenation")
            return "".join(parts)

        def call_binop(self, context, operator, left, right):
            return self.binop_table[operator](left, right)

        def wrap_str_format(self, value):
            # str.format / format_map: refuse nested or oversized field widths ('{:>999999999}').
            fmt = super().wrap_str_format(value)
            if fmt is None:
                return None
            text = value.__self__
            specs = re.findall(r"\{[^{}]*:([^{}]*)\}", text)
            if re.search(r"\{[^{}]*\{", text) or any(int(d) > MAX_OUTPUT_CHARS for spec in specs
                                                      for d in re.findall(r"\d+", spec)):
                raise _Budget("a str.format call with a nested or oversized field width")
            return fmt

    def raise_exception(message: str):
        raise TemplateError(message)

    # Same options as transformers: trim_blocks/lstrip_blocks, and the helpers templates call.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = bounded_range
    env.filters.update({"center": bounded_center, "indent": bounded_indent,
                        "replace": pass_eval_context(bounded_replace), "format": bounded_format,
                        "join": pass_eval_context(bounded_join), "wordwrap": pass_environment(bounded_wordwrap)})
    return env


def check_messages(messages: Any, where: str = "prompt") -> list[dict[str, Any]]:
    """A validated copy of a chat conversation: a non-empty list of ``{"role", "content"}`` mappings.

    ``role`` is one of :data:`ROLES`; ``content`` is a string (extra keys, such as ``name`` or
    ``tool_calls``, are passed through to the template). Raises :class:`GenerationError` naming
    ``where`` and the message index otherwise.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise GenerationError(f"{where}: a chat conversation is a non-empty list of messages "
                              f"({{'role': ..., 'content': ...}}), got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise GenerationError(f"{where} message {j}: must be a mapping with 'role' and 'content', "
                                  f"got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise GenerationError(f"{where} message {j}: role must be one of {', '.join(ROLES)}, got {short_repr(role)}")
        if not isinstance(content, str):
            raise GenerationError(f"{where} message {j}: content must be a string, got {type(content).__name__}")
        out.append(dict(m))
    return out


class ChatTemplate:
    """A compiled chat template; :meth:`render` turns a conversation into prompt text.

    The variables are those of transformers' ``apply_chat_template``: ``messages``,
    ``add_generation_prompt``, ``bos_token``, ``eos_token`` (plus ``raise_exception`` and
    ``strftime_now``). Compiling and rendering run within the budgets of this module.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        if not isinstance(source, str):
            raise GenerationError(f"the model's chat template is not text (got {type(source).__name__})")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise GenerationError(f"the model's chat template has {len(source):,} characters "
                                  f"(the limit is {MAX_TEMPLATE_CHARS:,}); the model file looks corrupt")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Compiling folds constants (calling filters), so it runs within the budgets too.
        self._template = self._guarded(lambda: _environment().from_string(source), "does not compile")

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        messages = check_messages(messages)

        def run() -> str:
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token):
                size += len(chunk)
                _check_size(size, "the rendered prompt")
                out.append(chunk)
            return "".join(out)

        return self._guarded(run, "failed")

    @staticmethod
    def _guarded(fn, failed: str):
        from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

        state = _Render()
        stack = _local.__dict__.setdefault("stack", [])
        stack.append(state)
        previous = sys.gettrace()
        sys.settrace(state.tracer)
        try:
            return fn()
        except _Budget as e:
            raise GenerationError(f"the model's chat template was stopped: {e}; the template in the model file "
                                  "is broken or hostile") from None
        except SecurityError as e:
            raise GenerationError(f"the model's chat template did something the sandbox forbids: {e}") from None
        except TemplateSyntaxError as e:
            raise GenerationError(f"the model's chat template {failed}: syntax error on line {e.lineno}: "
                                  f"{e.message}") from None
        except TemplateError as e:      # raise_exception(...), UndefinedError, ...
            raise GenerationError(f"the model's chat template {failed}: {type(e).__name__}: {e}") from None
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError,
                MemoryError) as e:
            raise GenerationError(f"the model's chat template {failed}: {type(e).__name__}: {str(e)[:200]}") from None
        finally:
            sys.settrace(previous)
            stack.pop()


__all__ = ["MAX_LINES", "MAX_LOOP_ITEMS", "MAX_OUTPUT_CHARS", "MAX_SECONDS", "ROLES", "ChatTemplate",
           "check_messages"]
