"""GGUF chat templates rendered in Jinja's sandbox, with bounds on time, size and work.

A chat template comes with the model file, so it is untrusted code that runs on a worker. The
sandbox keeps it away from Python internals; the bounds here keep it from wedging the worker:

- time: rendering stops after CHAT_TEMPLATE_TIMEOUT. Jinja cannot be interrupted from outside,
  so the compiled template checks the clock itself: `BoundedCodeGenerator` emits a check at the
  entry of every loop body and loop filter, and every call, filter, operator and `~` checks too;
- size: no value and no output may be longer than `max_chars` (1 MiB plus twice the text of
  the messages and tools), and the values a render builds may add up to at most `WORK_FACTOR`
  times that. Operations that can multiply a size in one step ("x" * n, 10 ** n, center(n),
  replace, join, indent, wordwrap, format widths) are checked before they run, so they never
  allocate past the bound;
- the template text itself is at most MAX_TEMPLATE_CHARS, compiled once and cached.

It renders what llama-cpp-python's `Jinja2ChatFormatter` renders (same environment options,
`raise_exception`, `strftime_now`, `tojson`, bos/eos tokens, `add_generation_prompt`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from jinja2 import BaseLoader, nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.errors import BackendError, ChatTemplateError, InvalidRequest, JobCancelled

DEFAULT_TIMEOUT = 2.0             # CHAT_TEMPLATE_TIMEOUT's default
MAX_TEMPLATE_CHARS = 256 * 1024   # the largest real templates (tool-calling ones) are ~20 KB
MIN_OUTPUT_CHARS = 1 << 20
WORK_FACTOR = 64
MAX_INT_BITS = 1 << 16
_DIGITS = re.compile(r"\d+")


def _checked(*args: nodes.Expr) -> nodes.Call:
    """`environment.checked(...)` as a template node: one step of work, its value checked."""
    return nodes.Call(nodes.EnvironmentAttribute("checked"), list(args), [], None, None)


class BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, plus a budget check in every loop iteration and on `~`.

    A loop body starts with `environment.checked(None)`, and a loop's `if` filter is wrapped in
    it, so no loop runs unchecked whatever its body does (`{% if x in big_list %}`).
    """

    def visit_For(self, node: nodes.For, frame: Any) -> None:
        node.body = [nodes.ExprStmt(_checked(nodes.Const(None))), *node.body]
        if node.test is not None:
            node.test = _checked(node.test)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


@dataclass
class Budget:
    """What one render may still spend; `check` is the job's own stop check (client gone)."""

    deadline: float
    timeout: float
    max_chars: int
    work_left: int
    check: Callable[[], None]


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 8
    return 0


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with every call, filter and operator counted against the render's Budget."""

    intercepted_binops = frozenset(("+", "-", "*", "/", "//", "%", "**"))
    code_generator_class = BoundedCodeGenerator

    def __init__(self) -> None:
        super().__init__(loader=BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                         extensions=[Jinja2ChatFormatter.IgnoreGenerationTags,
                                     "jinja2.ext.loopcontrols"])
        self.globals.pop("lipsum", None)          # lipsum(n) loops n times in one call
        self.filters["tojson"] = Jinja2ChatFormatter.tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self._local = threading.local()

    @property
    def budget(self) -> Budget | None:
        return getattr(self._local, "budget", None)

    def use(self, budget: Budget | None) -> None:
        self._local.budget = budget

    def checked(self, value: Any) -> Any:
        """One step of work: stop past the deadline, or when a value outgrows the bounds."""
        budget = self.budget
        if budget is None:
            return value
        if time.monotonic() > budget.deadline:
            raise ChatTemplateError(f"the model's chat template ran longer than "
                                    f"CHAT_TEMPLATE_TIMEOUT ({budget.timeout:g} s)")
        budget.check()
        size = _size(value)
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise ChatTemplateError(f"the model's chat template made a number of more than "
                                    f"{MAX_INT_BITS} bits")
        self.limit(size, "a value")
        budget.work_left -= size
        if budget.work_left < 0:
            raise ChatTemplateError(f"the model's chat template built more than "
                                    f"{WORK_FACTOR * budget.max_chars} characters of values")
        return value

    def limit(self, size: int, what: str) -> None:
        """:raise ChatTemplateError: `size` is over the render's character bound."""
        budget = self.budget
        if budget is not None and size > budget.max_chars:
            raise ChatTemplateError(f"the model's chat template asked for {what} of {size} "
                                    f"characters, over its bound of {budget.max_chars}")

    def concat(self, parts: Iterable[str]) -> str:
        """Jinja's `"".join` for block output ({% set %}…{% endset %}, macros), bounded first."""
        parts = list(parts)
        self.limit(sum(map(len, parts)), "a block")
        return self.checked("".join(parts))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.checked(None)
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, str):
            name = "str." + getattr(__obj, "__name__", "")
            if name == "str.join" and args:
                args = ([__self.checked(item) for item in args[0]], *args[1:])
            __self.precheck(name, (receiver, *args), kwargs)
        else:
            __self.check_ints((*args, *kwargs.values()))
        return __self.checked(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.checked(None)
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(count, int) and not isinstance(seq, (int, float)):
                    self.limit(_size(seq) * max(count, 0), "a repeated value")
            if isinstance(left, int) and isinstance(right, int):
                self.check_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            self.check_bits(max(left.bit_length() - 1, 0) * min(right, MAX_INT_BITS + 1))
        elif operator == "%" and isinstance(left, str):
            self.check_format(left)
            self.check_ints(right if isinstance(right, (tuple, list)) else (right,))
        return self.checked(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Any:
        """`"{:>1000000000}".format(...)`: the widths of a format string are checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self.check_format(value.__self__)
        return wrapped

    def check_bits(self, bits: int) -> None:
        if bits > MAX_INT_BITS and self.budget is not None:
            raise ChatTemplateError(f"the model's chat template would make a number of more "
                                    f"than {MAX_INT_BITS} bits")

    def check_ints(self, values: Iterable[Any]) -> None:
        """Counts and widths given to a call (center(n), ljust(n), batch(n)…) fit the bound."""
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool):
                self.limit(abs(value), "a count or width")

    def check_format(self, fmt: str) -> None:
        """Widths and precisions in a format string ("%1000000000s") fit the bound."""
        for digits in _DIGITS.findall(fmt):
            self.limit(int(digits) if len(digits) < 20 else 10 ** 20, "a format width")

    def precheck(self, name: str, args: tuple, kwargs: dict) -> None:
        """Bound what one call of a filter or str method can make before it runs."""
        self.check_ints((*args[1:], *kwargs.values()))
        estimate = _ESTIMATES.get(name)
        if estimate is not None and args:
            try:
                size = estimate(*args, **kwargs)
            except (TypeError, ValueError, AttributeError):
                return                        # the call itself will fail with these arguments
            self.limit(size, f"the result of {name}")

    def _bounded_filter(self, name: str, filter_: Callable) -> Callable:
        skip = 1 if _PassArg.from_obj(filter_) is not None else 0

        @functools.wraps(filter_)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.checked(None)
            plain = list(args[skip:])
            if name in ("join", "sum") and plain and not isinstance(plain[0], (str, list)):
                plain[0] = [self.checked(item) for item in plain[0]]
            if name == "format" and plain:
                self.check_format(str(plain[0]))
            self.precheck(name, tuple(plain), kwargs)
            return self.checked(filter_(*args[:skip], *plain, **kwargs))

        return bounded


def _replace(s: Any, old: str = "", new: str = "", count: int = -1, *_: Any) -> int:
    s = str(s)
    hits = s.count(old) if old else len(s) + 1
    return len(s) + (min(hits, count) if count >= 0 else hits) * len(str(new))


def _join(items: Any, sep: Any = "", *_: Any, **__: Any) -> int:
    """`items|join(sep)`; `sep.join(items)` is the same with the arguments swapped."""
    items = list(items)
    return sum(len(str(item)) for item in items) + len(str(sep)) * len(items)


def _indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    s = str(s)
    return len(s) + (s.count("\n") + 1) * (len(width) if isinstance(width, str) else int(width))


def _wordwrap(s: Any, width: int = 79, break_long_words: bool = True,
              wrapstring: str | None = None, *_: Any, **__: Any) -> int:
    s = str(s)
    return len(s) + (len(s) // max(int(width), 1) + 1) * len(wrapstring or "\n")


def _expandtabs(s: str, tabsize: int = 8) -> int:
    return len(s) + s.count("\t") * int(tabsize)


def _sum(items: Any, attribute: Any = None, start: Any = 0) -> int:
    """Summing lists or strings copies them over and over: only numbers are summed here."""
    return 0 if isinstance(start, (int, float)) else 1 << 62


_ESTIMATES: dict[str, Callable[..., int]] = {
    "replace": _replace, "str.replace": _replace, "join": _join,
    "str.join": lambda sep, items, *_: _join(items, sep), "indent": _indent,
    "wordwrap": _wordwrap, "str.expandtabs": _expandtabs, "sum": _sum,
}


class ChatTemplates:
    """Renders chat templates within CHAT_TEMPLATE_TIMEOUT and the size bounds; one per app."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, cache_size: int = 32):
        self.timeout = timeout
        self._env = BoundedSandbox()
        self._compile = functools.lru_cache(maxsize=cache_size)(self._env.from_string)

    def render(self, template: str, messages: list[dict], bos_token: str, eos_token: str,
               add_generation_prompt: bool = True, check: Callable[[], None] = lambda: None,
               **variables: Any) -> str:
        """The template rendered for `messages` (and any further variables, such as tools).

        :raise ChatTemplateError: the template is broken, too big, ran over a bound, or tried
            something the sandbox forbids.
        :raise InvalidRequest: the template refused the messages (its `raise_exception`).
        Whatever `check` raises (a cancelled job) passes through as it is.
        """
        given = _text_size(messages) + _text_size(variables)
        max_chars = MIN_OUTPUT_CHARS + 2 * given
        with self._bounded(template, max_chars, check):
            return self._render(template, max_chars, dict(
                messages=messages, bos_token=bos_token, eos_token=eos_token,
                add_generation_prompt=add_generation_prompt, raise_exception=_refuse,
                strftime_now=Jinja2ChatFormatter.strftime_now, **variables))

    @contextlib.contextmanager
    def _bounded(self, template: str, max_chars: int, check: Callable[[], None]):
        """A Budget for the work inside, and every failure of the template as its error."""
        if len(template) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"the model's chat template is {len(template)} characters, "
                                    f"more than the {MAX_TEMPLATE_CHARS} this server renders")
        self._env.use(Budget(time.monotonic() + self.timeout, self.timeout, max_chars,
                             WORK_FACTOR * max_chars, check))
        try:
            yield
        except (BackendError, JobCancelled):
            raise
        except SecurityError as exc:
            raise ChatTemplateError(
                f"the model's chat template was stopped by the sandbox: {exc}") from exc
        except RecursionError as exc:
            raise ChatTemplateError("the model's chat template recursed too deeply") from exc
        except MemoryError as exc:
            raise ChatTemplateError("the model's chat template ran out of memory") from exc
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
        except Exception as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc!r}") from exc
        finally:
            self._env.use(None)

    def _render(self, template: str, max_chars: int, variables: dict) -> str:
        """Stream the output, so that it stops as soon as it passes `max_chars`."""
        pieces, length = [], 0
        for piece in self._compile(template).generate(**variables):
            length += len(piece)
            if length > max_chars:
                raise ChatTemplateError(f"the model's chat template wrote more than "
                                        f"{max_chars} characters")
            pieces.append(piece)
        return "".join(pieces)


def _text_size(value: Any) -> int:
    """The characters of the strings in `value` (messages, tools, nested as JSON is): what the
    client gave, which the output bound grows with."""
    pending, size = [value], 0
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return size


def _refuse(message: Any) -> None:
    """The templates' `raise_exception`: the template refuses these messages (400)."""
    raise InvalidRequest(f"the model's chat template refused the messages: {message}",
                         param="messages")
