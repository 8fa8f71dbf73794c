"""The chat template sandbox: a model repository's Jinja template is untrusted code.

It runs in jinja2's immutable sandbox with transformers' settings (trim_blocks, lstrip_blocks,
loopcontrols, raise_exception, strftime_now); any reach for an unsafe attribute (`__class__`,
`__globals__`, ...) is an error, not an empty string. A render also has limits, so a hostile template
cannot hang or exhaust the process: a time budget (checked on every loop step, attribute lookup, call
and output piece), a cap on the characters it outputs, and a cap on any string or list it builds with
`*`, `+` or `~` or by a filter. Every failure, whatever its kind, is a one-line ChatTemplateError.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

TIME_BUDGET_S = 2.0  # a render of 10,000 messages takes 0.05 s
MAX_CHARS = 16 * 2**20  # far past any context window, far below what would strain memory
MAX_EXPONENT = 4096  # `**` with integers: 2 ** 4096 has 1,234 digits


class ChatTemplateError(ValueError):
    """The chat template could not be rendered (missing, refused by the sandbox, or raised an error)."""


class _Limits(threading.local):
    deadline: float | None = None
    budget: float = TIME_BUDGET_S
    max_chars: int = MAX_CHARS


_limits = _Limits()


def _tick() -> None:
    if _limits.deadline is not None and time.monotonic() > _limits.deadline:
        raise ChatTemplateError(f"chat template: rendering took over its {_limits.budget:g} s budget")


def _sized(value: Any) -> Any:
    """`value`, refused when it is a string or list past the size cap."""
    if isinstance(value, (str, list, tuple)) and len(value) > _limits.max_chars:
        raise ChatTemplateError(
            f"chat template: built a {type(value).__name__} of {len(value):,} items, over the cap of "
            f"{_limits.max_chars:,}"
        )
    return value


def _check_args(args: Iterable[Any]) -> None:
    """Integers that would size an allocation (`center(10**10)`, `indent(10**9)`) are refused up front."""
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _limits.max_chars:
            raise ChatTemplateError(f"chat template: argument {a} is over the cap of {_limits.max_chars:,}")


def _guard_binop(op: str, left: Any, right: Any) -> None:
    seq, num = (str, list, tuple), (int, float)
    if op == "*":
        for a, b in ((left, right), (right, left)):
            if isinstance(a, seq) and isinstance(b, int) and len(a) * max(b, 0) > _limits.max_chars:
                raise ChatTemplateError(
                    f"chat template: {type(a).__name__} * {b} would exceed the cap of {_limits.max_chars:,}"
                )
    elif op == "+" and isinstance(left, seq) and isinstance(right, seq):
        if len(left) + len(right) > _limits.max_chars:
            raise ChatTemplateError(f"chat template: a concatenation over the cap of {_limits.max_chars:,}")
    elif op == "**" and isinstance(left, num) and isinstance(right, int) and abs(right) > MAX_EXPONENT:
        if isinstance(left, int) and abs(left) > 1:
            raise ChatTemplateError(f"chat template: the exponent {right} is over {MAX_EXPONENT}")


class _Guards(NodeTransformer):
    """Route every loop's iterable and every `~` concatenation through the environment's checks."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("guarded_iter"), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        parts = nodes.List(list(node.nodes))
        return nodes.Call(nodes.EnvironmentAttribute("guarded_concat"), [parts], [], None, None)


class _CodeGenerator(CodeGenerator):
    def visit_Template(self, node, frame=None):
        return super().visit_Template(_Guards().visit(node), frame)


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(["*", "+", "**"])

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja2 would return an Undefined that prints as ""; a template probing internals is refused
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        _tick()
        _check_args((*args, *kwargs.values()))
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _guard_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    @staticmethod
    def guarded_iter(iterable: Any) -> Iterator[Any]:
        for i, item in enumerate(iterable):
            if i % 256 == 0:
                _tick()
            yield item

    @staticmethod
    def guarded_concat(parts: list[Any]) -> str:
        texts = [str(p) for p in parts]
        if sum(map(len, texts)) > _limits.max_chars:
            raise ChatTemplateError(
                f"chat template: a `~` concatenation over the cap of {_limits.max_chars:,}"
            )
        return "".join(texts)


def _guarded_filter(fn):
    def run(*args, **kwargs):
        _tick()
        _check_args((*args[1:], *kwargs.values()))
        return _sized(fn(*args, **kwargs))

    run.__dict__.update(getattr(fn, "__dict__", {}))  # keeps jinja's pass_context / pass_environment marks
    run.__name__ = getattr(fn, "__name__", "filter")
    return run


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def compile_chat_template(source: str) -> jinja2.Template:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guarded_filter(f) for name, f in env.filters.items()}
    del env.globals["lipsum"]  # lipsum(n=10**6) is one uninterruptible call building gigabytes
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
    except Exception as e:  # RecursionError on deep nesting, MemoryError, ...: the source is untrusted
        raise ChatTemplateError(f"chat template: cannot compile ({_one_line(e)})") from None


def render_chat_template(
    template: jinja2.Template, budget_s: float = TIME_BUDGET_S, max_chars: int = MAX_CHARS, **variables: Any
) -> str:
    """The template's output, within `budget_s` seconds and `max_chars` characters; else ChatTemplateError."""
    _limits.deadline, _limits.budget, _limits.max_chars = time.monotonic() + budget_s, budget_s, max_chars
    try:
        pieces, size = [], 0
        for piece in template.generate(**variables):
            _tick()
            size += len(piece)
            if size > max_chars:
                raise ChatTemplateError(
                    f"chat template: the output is over the cap of {max_chars:,} characters"
                )
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    except (
        Exception
    ) as e:  # OverflowError, RecursionError, MemoryError, TypeError...: one line, whatever it is
        raise ChatTemplateError(f"chat template failed ({_one_line(e)})") from None
    finally:
        _limits.deadline = None
