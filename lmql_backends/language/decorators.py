"""Variable decorators: ``"[@fn VAR]"``, ``"[@a @b VAR]"``, ``"[@prefix('P: ') VAR]"`` (as LMQL).

A plain function is a post-processing decorator: called with the finished value (one
parameter) or with ``(value, prompt_value, context)``; it returns the new value (the prompt
gets ``str(value)``), a ``(value, prompt_value)`` tuple, or None (no change). ``@pre``
functions run before the variable is generated: returning anything but the variable they are
given fixes the value and skips generation. ``@streaming`` functions (and `LMQLDecorator.stream`)
are called, as in LMQL, with the variable's text so far while it is generated: with argmax and
``sample``, after every token the decoder accepts (so a chunk of k tokens gives k calls), then
once with the finished value before ``post``. Under ``beam`` (many partial values at once) and
for a value that is not generated (a ``@pre`` decorator's, a nested query's) only that last call
happens. Classes implementing `LMQLDecorator` hook every stage. Several decorators: ``pre`` runs
left to right, ``post`` and ``stream`` right to left (a stream function's non-None return value
is what the next one sees, as in LMQL).

Inside a query, ``lmql.decorators.pre`` / ``lmql.decorators.streaming`` name these markers.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from ..errors import InvalidRequestError


@dataclasses.dataclass
class ProgramState:
    """What a decorator sees of the running query (LMQL's ``context`` argument)."""

    prompt: str
    variables: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.variables.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.variables[name]


class LMQLDecorator:
    """Base class of a decorator hooking several stages; each method's default changes nothing."""

    def pre(self, variable, context: ProgramState):
        return variable

    def stream(self, value, context: ProgramState):
        return value

    def post(self, value, prompt_value: str, context: ProgramState):
        return value, prompt_value


class _FunctionDecorator(LMQLDecorator):
    """A plain function: post-processing only."""

    def __init__(self, function: Callable):
        self.function = function
        self.arity = parameter_count(function)

    def post(self, value, prompt_value, context):
        result = self.function(value) if self.arity == 1 else self.function(value, prompt_value, context)
        if result is None:
            return value, prompt_value
        return result if isinstance(result, tuple) else (result, str(result))


class _PreDecorator(LMQLDecorator):
    def __init__(self, function: Callable):
        self.function = function

    def pre(self, variable, context):
        return self.function(variable, context)


class _StreamingDecorator(LMQLDecorator):
    def __init__(self, function: Callable):
        self.function = function
        self.arity = parameter_count(function)

    def stream(self, value, context):
        result = self.function(value) if self.arity == 1 else self.function(value, context)
        return value if result is None else result


class MessageDecorator(LMQLDecorator):
    """LMQL's ``@message`` (``from lmql.lib.chat import message``): marks a user-facing chat message.

    LMQL hands a marked variable to a chat output writer (its chat server streams it to the
    user) and leaves the value as it is; lmql-backends has no output writers, so the value and
    the prompt are unchanged, as in LMQL when no chat output writer is attached.
    """


message = MessageDecorator()


def pre(function: Callable) -> LMQLDecorator:
    """Mark `function(variable, context)` as a pre-processing decorator."""
    return _PreDecorator(function)


def streaming(function: Callable) -> LMQLDecorator:
    """Mark `function(value, context)` as a streaming decorator."""
    return _StreamingDecorator(function)


def parameter_count(function: Callable) -> int:
    try:
        return len(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return 1


def as_decorator(value: Any, source: str) -> LMQLDecorator:
    if isinstance(value, LMQLDecorator):
        return value
    if callable(value):
        return _FunctionDecorator(value)
    raise InvalidRequestError(f"the decorator @{source} is {value!r}, not a function or an LMQLDecorator")


@dataclasses.dataclass
class DecoratorChain:
    """The decorators of one hole, in the order written."""

    decorators: tuple[LMQLDecorator, ...]

    def pre(self, variable, context: ProgramState) -> tuple[Any, str] | None:
        """A fixed (value, prompt_value), or None to generate the variable."""
        for decorator in self.decorators:
            result = decorator.pre(variable, context)
            if result is not variable:
                return result if isinstance(result, tuple) else (result, str(result))
        return None

    @property
    def has_stream(self) -> bool:
        """Whether a decorator has a streaming stage (the others' `stream` change nothing)."""
        return any(type(d).stream is not LMQLDecorator.stream for d in self.decorators)

    def stream(self, value: Any, context: ProgramState) -> Any:
        for decorator in reversed(self.decorators):
            result = decorator.stream(value, context)
            value = value if result is None else result
        return value

    def post(self, value: Any, prompt_value: str, context: ProgramState) -> tuple[Any, str]:
        self.stream(value, context)
        for decorator in reversed(self.decorators):
            value, prompt_value = decorator.post(value, prompt_value, context)
        return value, str(prompt_value)
