"""Evaluate the Terraform expressions python-hcl2 leaves as ``"${...}"`` text.

Enough of HCL for policy documents and the locals they use: literals, string templates,
tuples and objects, references (``var.x``, ``local.x``, ``data.t.n.attr``, ``resource.n.attr``,
iterators) with ``.attr`` / ``[index]`` access, arithmetic, comparison and logical operators,
the conditional ``c ? a : b`` (only the chosen branch is evaluated), ``for`` expressions over
lists and maps (with ``if``), and common functions (``FUNCTIONS``; ``try`` and ``can`` too).
Not supported: splats, heredocs, template directives (``%{ }``) and provider functions; they
raise ``ExpressionError`` naming the expression, so nothing is rendered from a guess.

Values a test substitutes come in through ``Scope.refs``, keyed by the expression text
(``"aws_sqs_queue.work.arn"``): an exact match for the whole expression wins, and a reference
chain takes the value of its longest prefix found there. Variables not given take the
declared default; locals are evaluated from their definitions.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ExpressionError(Exception):
    """An expression could not be evaluated."""


@dataclass(frozen=True)
class Definitions:
    """What a module defines that expressions may name: its locals and declared variables."""

    locals: Mapping[str, Any] = field(default_factory=dict)
    variables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scope:
    """Everything an expression may refer to."""

    definitions: Definitions
    refs: Mapping[str, Any]
    variables: Mapping[str, Any]
    names: Mapping[str, Any] = field(default_factory=dict)  # iterators, for-expression symbols
    evaluating: tuple[str, ...] = ()

    def bind(self, **names: Any) -> Scope:
        """This scope with more local names (a dynamic block's iterator, a for symbol)."""
        return Scope(
            self.definitions, self.refs, self.variables, {**self.names, **names}, self.evaluating
        )


def evaluate_value(value: Any, scope: Scope) -> Any:
    """``value`` as python-hcl2 parsed it, every ``${...}`` evaluated, recursively."""
    if isinstance(value, dict):
        return {key: evaluate_value(item, scope) for key, item in value.items()}
    if isinstance(value, list):
        return [evaluate_value(item, scope) for item in value]
    if isinstance(value, str):
        return evaluate_template(value, scope)
    return value


def evaluate_template(text: str, scope: Scope) -> Any:
    """An HCL string template; a template that is one interpolation keeps the value's type."""
    parts = list(_template_parts(text))
    if len(parts) == 1 and parts[0][0] == "expr":
        return evaluate_expression(parts[0][1], scope)
    out = []
    for kind, piece in parts:
        if kind == "text":
            out.append(piece)
            continue
        out.append(_as_string(evaluate_expression(piece, scope), piece))
    return "".join(out)


def _as_string(value: Any, expression: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    raise ExpressionError(f"${{{expression}}} is {value!r}, not a string")


def _template_parts(text: str) -> Iterator[tuple[str, str]]:
    literal: list[str] = []
    index = 0
    while index < len(text):
        if text.startswith(("$${", "%%{"), index):
            literal.append(text[index + 1 : index + 3])  # escaped: a literal ${ or %{
            index += 3
        elif text.startswith("%{", index):
            raise ExpressionError(f"template directives are not supported: {text!r}")
        elif text.startswith("${", index):
            end = closing_brace(text, index + 2)
            if literal:
                yield "text", "".join(literal)
                literal = []
            yield "expr", text[index + 2 : end].strip()
            index = end + 1
        else:
            literal.append(text[index])
            index += 1
    if literal:
        yield "text", "".join(literal)


def closing_brace(text: str, start: int) -> int:
    """The index of the ``}`` closing a ``{`` (or ``${``) opened just before ``start``."""
    depth, index = 1, start
    while index < len(text):
        char = text[index]
        if char == '"':
            index = _string_end(text, index + 1)
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    raise ExpressionError(f"unbalanced braces in {text!r}")


def _string_end(text: str, start: int) -> int:
    """The index of the quote closing a string whose content starts at ``start``."""
    index = start
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text.startswith("${", index):
            index = closing_brace(text, index + 2) + 1
            continue
        if text[index] == '"':
            return index
        index += 1
    raise ExpressionError(f"unterminated string in {text!r}")


def evaluate_expression(expression: str, scope: Scope) -> Any:
    """One HCL expression (the text inside ``${}``)."""
    if expression in scope.refs:
        return scope.refs[expression]
    try:
        return _parse(expression)(scope)
    except ExpressionError as exc:
        if str(exc).startswith("${"):
            raise
        raise ExpressionError(f"${{{expression}}}: {exc}") from None


# -- tokens -----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_-]*)"
    r"|(?P<op>=>|==|!=|<=|>=|&&|\|\||\.\.\.|[-+*/%!<>?:=.,()\[\]{}])"
    r"|(?P<quote>\"))"
)


@dataclass(frozen=True)
class Token:
    """One token: kind (number, ident, op, string, end) and text (a string's raw content)."""

    kind: str
    text: str


def _tokens(expression: str) -> list[Token]:
    out: list[Token] = []
    index = 0
    while True:
        while index < len(expression) and expression[index].isspace():
            index += 1
        if index >= len(expression):
            out.append(Token("end", ""))
            return out
        found = _TOKEN.match(expression, index)
        if found is None:
            raise ExpressionError(f"unexpected {expression[index : index + 10]!r}")
        if found.group("quote"):
            end = _string_end(expression, found.end())
            out.append(Token("string", expression[found.end() : end]))
            index = end + 1
            continue
        kind = next(k for k in ("number", "ident", "op") if found.group(k) is not None)
        out.append(Token(kind, found.group(kind)))
        index = found.end()


# -- parser: every parse function returns a thunk taking the scope ---------------------------

Thunk = Callable[[Scope], Any]
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


@functools.lru_cache(maxsize=512)
def _parse(expression: str) -> Thunk:
    parser = _Parser(_tokens(expression))
    thunk = parser.expression()
    parser.expect("end")
    return thunk


class _Parser:
    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self, offset: int = 0) -> Token:
        return self.tokens[min(self.at + offset, len(self.tokens) - 1)]

    def take(self) -> Token:
        token = self.peek()
        self.at += 1
        return token

    def accept(self, text: str) -> bool:
        if self.peek().kind in ("op", "ident") and self.peek().text == text:
            self.at += 1
            return True
        return False

    def expect(self, text: str) -> Token:
        token = self.take()
        if (token.kind == "end" and text == "end") or token.text == text:
            return token
        raise ExpressionError(f"expected {text!r}, found {token.text or token.kind!r}")

    def expression(self) -> Thunk:
        condition = self.binary(0)
        if not self.accept("?"):
            return condition
        if_true = self.expression()
        self.expect(":")
        if_false = self.expression()
        return lambda s: if_true(s) if _truth(condition(s)) else if_false(s)

    def binary(self, level: int) -> Thunk:
        if level == len(_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek().kind == "op" and self.peek().text in _LEVELS[level]:
            operator = _LEVELS[level][self.take().text]
            right = self.binary(level + 1)
            left = _combine(operator, left, right)
        return left

    def unary(self) -> Thunk:
        if self.accept("!"):
            operand = self.unary()
            return lambda s: not _truth(operand(s))
        if self.accept("-"):
            negated = self.unary()
            return lambda s: -negated(s)
        return self.postfix(self.primary())

    def postfix(self, thunk: Thunk) -> Thunk:
        while True:
            if self.accept("."):
                step = self.take()
                if step.kind not in ("ident", "number"):
                    raise ExpressionError(f"unsupported traversal .{step.text}")
                thunk = _attribute(thunk, step.text)
            elif self.peek().text == "[" and self.peek().kind == "op":
                self.take()
                index = self.expression()
                self.expect("]")
                thunk = _index(thunk, index)
            else:
                return thunk

    def primary(self) -> Thunk:
        token = self.take()
        if token.kind == "number":
            number = (
                float(token.text)
                if "." in token.text or "e" in token.text.lower()
                else int(token.text)
            )
            return lambda _s: number
        if token.kind == "string":
            return _string(token.text)
        if token.kind == "ident":
            return self.identifier(token.text)
        if token.text == "(":
            inner = self.expression()
            self.expect(")")
            return inner
        if token.text == "[":
            return self.for_tuple() if self.peek().text == "for" else self.tuple_()
        if token.text == "{":
            return self.for_object() if self.peek().text == "for" else self.object_()
        raise ExpressionError(f"unexpected {token.text or token.kind!r}")

    def identifier(self, name: str) -> Thunk:
        if name in ("true", "false"):
            value = name == "true"
            return lambda _s: value
        if name == "null":
            return lambda _s: None
        if self.peek().text == "(" and self.peek().kind == "op":
            self.take()
            return self.call(name)
        return self.reference(name)

    def reference(self, root: str) -> Thunk:
        """A traversal: its text (for refs) and the thunk that resolves it."""
        steps: list[str] = []
        while True:
            if self.peek().text == "." and self.peek(1).kind in ("ident", "number"):
                self.take()
                steps.append(self.take().text)
            elif (
                self.peek().text == "["
                and self.peek(1).kind in ("number", "string")
                and self.peek(2).text == "]"
            ):
                self.take()
                key = self.take()
                self.take()
                steps.append(key.text if key.kind == "number" else _unescape(key.text))
            else:
                break
        return lambda s: _resolve(root, steps, s)

    def call(self, name: str) -> Thunk:
        arguments: list[Thunk] = []
        expand = False
        while not self.accept(")"):
            arguments.append(self.expression())
            expand = self.accept("...") or expand
            if not self.accept(","):
                self.expect(")")
                break
        if name in ("try", "can"):
            return _lazy_call(name, arguments)
        if name not in FUNCTIONS:
            raise ExpressionError(f"function {name}() is not supported")
        function = FUNCTIONS[name]

        def invoke(s: Scope) -> Any:
            values = [argument(s) for argument in arguments]
            if expand:
                values = values[:-1] + list(values[-1])
            return function(*values)

        return invoke

    def tuple_(self) -> Thunk:
        items: list[Thunk] = []
        while not self.accept("]"):
            items.append(self.expression())
            if not self.accept(","):
                self.expect("]")
                break
        return lambda s: [item(s) for item in items]

    def object_(self) -> Thunk:
        entries: list[tuple[Thunk, Thunk]] = []
        while not self.accept("}"):
            token = self.peek()
            if token.kind == "ident" and self.peek(1).text in ("=", ":"):
                self.take()
                key: Thunk = functools.partial(lambda text, _s: text, token.text)
            else:
                key = self.expression()
            if not (self.accept("=") or self.accept(":")):
                raise ExpressionError("expected = or : in an object")
            entries.append((key, self.expression()))
            self.accept(",")
        return lambda s: {_as_string(k(s), "object key"): v(s) for k, v in entries}

    def for_header(self) -> tuple[str | None, str, Thunk]:
        self.expect("for")
        first = self.take().text
        second = self.take().text if self.accept(",") else None
        self.expect("in")
        collection = self.expression()
        self.expect(":")
        return (first, second, collection) if second else (None, first, collection)

    def for_tuple(self) -> Thunk:
        key_name, value_name, collection = self.for_header()
        body = self.expression()
        keep = self.expression() if self.accept("if") else None
        self.expect("]")

        def run(s: Scope) -> list[Any]:
            out = []
            for inner in _iterations(collection(s), key_name, value_name, s):
                if keep is None or _truth(keep(inner)):
                    out.append(body(inner))
            return out

        return run

    def for_object(self) -> Thunk:
        key_name, value_name, collection = self.for_header()
        key = self.expression()
        self.expect("=>")
        value = self.expression()
        grouped = self.accept("...")
        keep = self.expression() if self.accept("if") else None
        self.expect("}")

        def run(s: Scope) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for inner in _iterations(collection(s), key_name, value_name, s):
                if keep is not None and not _truth(keep(inner)):
                    continue
                name = _as_string(key(inner), "for key")
                if grouped:
                    out.setdefault(name, []).append(value(inner))
                else:
                    out[name] = value(inner)
            return out

        return run


_LEVELS: list[dict[str, str]] = [
    {"||": "or"},
    {"&&": "and"},
    {"==": "eq", "!=": "ne"},
    {"<": "lt", ">": "gt", "<=": "le", ">=": "ge"},
    {"+": "add", "-": "sub"},
    {"*": "mul", "/": "div", "%": "mod"},
]
_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "gt": lambda a, b: a > b,
    "le": lambda a, b: a <= b,
    "ge": lambda a, b: a >= b,
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "mod": lambda a, b: a % b,
}


def _combine(operator: str, left: Thunk, right: Thunk) -> Thunk:
    if operator == "or":
        return lambda s: _truth(left(s)) or _truth(right(s))
    if operator == "and":
        return lambda s: _truth(left(s)) and _truth(right(s))
    function = _OPERATORS[operator]
    return lambda s: function(left(s), right(s))


def _truth(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ExpressionError(f"{value!r} is not a bool")
    return value


def _unescape(raw: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), raw)


def _string(raw: str) -> Thunk:
    text = _unescape(raw)
    if "${" not in text and "%{" not in text:
        return lambda _s: text
    return lambda s: _as_string(evaluate_template(text, s), text) if text else ""


def _attribute(thunk: Thunk, name: str) -> Thunk:
    return lambda s: _step(thunk(s), name)


def _index(thunk: Thunk, index: Thunk) -> Thunk:
    return lambda s: _step(thunk(s), index(s))


def _step(value: Any, key: Any) -> Any:
    try:
        if isinstance(value, list | tuple):
            return value[int(key)]
        return value[str(key)]
    except (KeyError, IndexError, TypeError, ValueError):
        raise ExpressionError(f"no {key!r} in {value!r}") from None


def _iterations(
    collection: Any, key_name: str | None, value_name: str, scope: Scope
) -> Iterator[Scope]:
    if isinstance(collection, dict):
        pairs: list[tuple[Any, Any]] = sorted(collection.items())  # Terraform: lexical key order
    elif isinstance(collection, list | tuple | set):
        pairs = list(enumerate(collection))
    else:
        raise ExpressionError(f"cannot iterate over {collection!r}")
    for key, value in pairs:
        names = {value_name: value}
        if key_name:
            names[key_name] = key
        yield scope.bind(**names)


def _resolve(root: str, steps: Sequence[str], scope: Scope) -> Any:
    if root in scope.names:
        return _walk(scope.names[root], steps)
    text = root
    found: tuple[int, Any] | None = (0, scope.refs[root]) if root in scope.refs else None
    for count, step in enumerate(steps, start=1):
        text += f"[{step}]" if step.isdigit() else f".{step}"
        if text in scope.refs:
            found = (count, scope.refs[text])
    if found is not None:
        return _walk(found[1], steps[found[0] :])
    if root == "var" and steps:
        return _walk(_variable(steps[0], scope), steps[1:])
    if root == "local" and steps:
        return _walk(_local(steps[0], scope), steps[1:])
    raise ExpressionError(f"no value for {text}: pass it in refs")


def _walk(value: Any, steps: Sequence[str]) -> Any:
    for step in steps:
        value = _step(value, step)
    return value


def _variable(name: str, scope: Scope) -> Any:
    if name in scope.variables:
        return scope.variables[name]
    declared = scope.definitions.variables.get(name)
    if declared is None:
        raise ExpressionError(f"var.{name} is not declared")
    if "default" not in declared:
        raise ExpressionError(f"var.{name} has no default: pass its value")
    return evaluate_value(declared["default"], scope)


def _local(name: str, scope: Scope) -> Any:
    if name not in scope.definitions.locals:
        raise ExpressionError(f"local.{name} is not defined")
    if f"local.{name}" in scope.evaluating:
        raise ExpressionError(f"local.{name} refers to itself")
    inner = Scope(
        scope.definitions,
        scope.refs,
        scope.variables,
        {},
        (*scope.evaluating, f"local.{name}"),
    )
    return evaluate_value(scope.definitions.locals[name], inner)


def _lazy_call(name: str, arguments: Sequence[Thunk]) -> Thunk:
    def attempt(s: Scope) -> Any:
        for argument in arguments:
            try:
                value = argument(s)
            except (ExpressionError, KeyError, IndexError, TypeError, ValueError):
                if name == "can":
                    return False
                continue
            return True if name == "can" else value
        if name == "can":
            return True
        raise ExpressionError("try(): every argument failed")

    return attempt


def _distinct(items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _coalesce(*values: Any) -> Any:
    for value in values:
        if value is not None and value != "":
            return value
    raise ExpressionError("coalesce(): no non-null, non-empty argument")


def _flatten(items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out += _flatten(item) if isinstance(item, list | tuple) else [item]
    return out


def _merge(*maps: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mapping in maps:
        out.update(mapping or {})
    return out


def _regex(pattern: str, text: str) -> Any:
    found = re.search(pattern, text)
    if found is None:
        raise ExpressionError(f"regex {pattern!r} does not match {text!r}")
    if found.groupdict():
        return found.groupdict()
    return list(found.groups()) if found.groups() else found.group(0)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "length": len,
    "keys": sorted,
    "values": lambda m: [m[k] for k in sorted(m)],
    "concat": lambda *lists: [item for items in lists for item in items],
    "distinct": _distinct,
    "compact": lambda items: [item for item in items if item not in ("", None)],
    "coalesce": _coalesce,
    "coalescelist": lambda *lists: next((items for items in lists if items), []),
    "merge": _merge,
    "lookup": lambda m, key, *default: m[key] if key in m or not default else default[0],
    "contains": lambda items, value: value in items,
    "flatten": _flatten,
    "toset": lambda items: sorted(_distinct(list(items)), key=str),
    "tolist": list,
    "tomap": dict,
    "tostring": lambda value: _as_string(value, "tostring"),
    "tonumber": float,
    "lower": str.lower,
    "upper": str.upper,
    "trimspace": str.strip,
    "startswith": str.startswith,
    "endswith": str.endswith,
    "join": lambda separator, items: separator.join(items),
    "split": lambda separator, text: text.split(separator),
    "replace": lambda text, old, new: text.replace(old, new),
    "element": lambda items, index: items[int(index) % len(items)],
    "alltrue": all,
    "anytrue": any,
    "sort": sorted,
    "min": min,
    "max": max,
    "jsonencode": lambda value: json.dumps(value, separators=(",", ":")),
    "regex": _regex,
    "format": lambda spec, *values: re.sub(r"%[sdv]", "{}", spec).format(*values),
}
