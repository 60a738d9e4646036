"""oxy's predicate language, parsed safely and compiled once into closures.

Buffer's retry condition and CircuitBreaker's trigger are small boolean
expressions over registered functions (``IsNetworkError() && Attempts() < 2``).
This module tokenizes and parses them with a recursive-descent parser (never
``eval``), type-checks every call and comparison at compile time, and returns a
:class:`Predicate` whose evaluation is a tree of plain closures.

Grammar (oxy's, plus unary ``!``, negative numbers and literals on either side)::

    expr    := and ("||" and)*
    and     := unary ("&&" unary)*
    unary   := "!" unary | compare
    compare := operand [("==" | "!=" | "<" | "<=" | ">" | ">=") operand]
    operand := "(" expr ")" | Name "(" [arg ("," arg)*] ")" | literal
    arg     := literal | call
    literal := ["-"] INT | ["-"] FLOAT | "string" | `raw string`

A comparison needs exactly one function call and one literal.  Ints and floats
compare freely; strings compare only with ``==`` and ``!=``.  A bool-returning
call may stand alone, be negated or be combined with ``&&``/``||``; any other
call must be compared.  ``&&`` and ``||`` short-circuit.

Limits, so that no expression can exhaust the stack at construction or at
request time: at most 4096 characters (``MAX_LENGTH``), at most 64 levels of
nesting (``MAX_DEPTH``: parentheses, ``!`` and calls as arguments all count),
and numeric literals of at most 64 characters (``MAX_NUMBER_LENGTH``).  A chain of
``&&`` (or ``||``) compiles into one n-ary node evaluated by a loop, so its
length costs no stack; the depth of the compiled tree is bounded by the
nesting limit.  Anything beyond a limit raises :class:`PredicateError` naming
its column.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .exceptions import ConfigurationError, PredicateError

__all__ = ["Func", "Predicate", "compile_predicate"]

#: Longest accepted expression, in characters.
MAX_LENGTH = 4096
#: Deepest accepted nesting of parentheses, ``!`` and calls used as arguments.
MAX_DEPTH = 64
#: Longest accepted numeric literal, in characters (sign excluded).
MAX_NUMBER_LENGTH = 64

_TYPES: tuple[type, ...] = (bool, int, float, str)
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string"}
_NUMERIC = (int, float)
_CMP_OPS = ("==", "!=", "<=", ">=", "<", ">")
#: ``2 > F()`` is compiled as ``F() < 2``.
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


@dataclass(frozen=True)
class Func:
    """A function the expression may call: ``impl(ctx, *args) -> returns``.

    ``args`` and ``returns`` are among ``bool``, ``int``, ``float``, ``str``.
    """

    impl: Callable[..., Any]
    args: tuple[type, ...] = ()
    returns: type = bool

    def __init__(
        self, impl: Callable[..., Any], *, args: tuple[type, ...] = (), returns: type
    ) -> None:
        if not callable(impl):
            raise ConfigurationError("Func impl must be callable")
        for t in (*args, returns):
            if t not in _TYPES:
                raise ConfigurationError(f"Func types must be bool, int, float or str, not {t!r}")
        object.__setattr__(self, "impl", impl)
        object.__setattr__(self, "args", tuple(args))
        object.__setattr__(self, "returns", returns)


class Predicate:
    """A compiled expression: ``pred(ctx) -> bool``; ``pred.expression`` is the source."""

    __slots__ = ("expression", "_fn")

    def __init__(self, expression: str, fn: Callable[[Any], Any]) -> None:
        self.expression = expression
        self._fn = fn

    def __call__(self, ctx: Any) -> bool:
        return bool(self._fn(ctx))

    def __repr__(self) -> str:
        return f"Predicate({self.expression!r})"


def compile_predicate(expression: str, funcs: Mapping[str, Func]) -> Predicate:
    """Parse, type-check and compile ``expression``; raise :class:`PredicateError`.

    :param expression: the source, at most ``MAX_LENGTH`` characters and
        ``MAX_DEPTH`` levels of nesting.
    :param funcs: the functions the expression may call, by name.
    """
    if not isinstance(expression, str):
        raise PredicateError(f"expression must be a string, not {type(expression).__name__}", "", 0)
    if len(expression) > MAX_LENGTH:
        raise PredicateError(
            f"expression too long ({len(expression)} characters, at most {MAX_LENGTH})",
            expression,
            MAX_LENGTH,
        )
    parser = _Parser(expression, funcs)
    node = parser.parse()
    return Predicate(expression, node.fn)


# --------------------------------------------------------------------------- tokens

# kinds: name, int, float, str, op ("(" ")" "," "!" "&&" "||" "-" and comparisons), end


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    pos: int
    value: Any = None


def _tokenize(src: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(src)
    while i < n:
        ch = src[i]
        if ch in " \t\r\n":
            i += 1
            continue
        start = i
        if ch.isascii() and (ch.isalpha() or ch == "_"):
            while i < n and src[i].isascii() and (src[i].isalnum() or src[i] == "_"):
                i += 1
            tokens.append(_Token("name", src[start:i], start))
            continue
        if ch.isdigit() or (ch == "." and i + 1 < n and src[i + 1].isdigit()):
            tokens.append(_number(src, start))
            i = start + len(tokens[-1].text)
            continue
        if ch == '"':
            tok = _string(src, start)
            tokens.append(tok)
            i = start + len(tok.text)
            continue
        if ch == "`":
            end = src.find("`", start + 1)
            if end < 0:
                raise PredicateError("unterminated string", src, start)
            tokens.append(_Token("str", src[start : end + 1], start, src[start + 1 : end]))
            i = end + 1
            continue
        two = src[i : i + 2]
        if two in ("&&", "||", "==", "!=", "<=", ">="):
            tokens.append(_Token("op", two, start))
            i += 2
            continue
        if ch in "()<>!,-":
            tokens.append(_Token("op", ch, start))
            i += 1
            continue
        if ch in "&|=":
            raise PredicateError(f"unexpected {ch!r} (did you mean {ch * 2!r}?)", src, start)
        raise PredicateError(f"unexpected character {ch!r}", src, start)
    tokens.append(_Token("end", "", n))
    return tokens


def _number(src: str, start: int) -> _Token:
    i, n = start, len(src)
    while i < n and src[i].isdigit():
        i += 1
    is_float = False
    if i < n and src[i] == ".":
        is_float = True
        i += 1
        while i < n and src[i].isdigit():
            i += 1
    if i < n and src[i] in "eE":
        j = i + 1
        if j < n and src[j] in "+-":
            j += 1
        if j < n and src[j].isdigit():
            is_float = True
            i = j
            while i < n and src[i].isdigit():
                i += 1
    if i < n and (src[i].isalnum() or src[i] in "_."):
        raise PredicateError("malformed number", src, start)
    text = src[start:i]
    if not text.isascii():
        raise PredicateError("malformed number", src, start)
    if len(text) > MAX_NUMBER_LENGTH:
        raise PredicateError(
            f"number too long ({len(text)} characters, at most {MAX_NUMBER_LENGTH})", src, start
        )
    if is_float:
        value = float(text)
        if math.isinf(value):
            raise PredicateError("number out of range", src, start)
        return _Token("float", text, start, value)
    return _Token("int", text, start, int(text, 10))


def _string(src: str, start: int) -> _Token:
    out: list[str] = []
    i, n = start + 1, len(src)
    while i < n:
        ch = src[i]
        if ch == '"':
            return _Token("str", src[start : i + 1], start, "".join(out))
        if ch == "\n":
            break
        if ch == "\\":
            if i + 1 >= n:
                break
            esc = src[i + 1]
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                i += 2
                continue
            width = {"x": 2, "u": 4, "U": 8}.get(esc)
            digits = src[i + 2 : i + 2 + width] if width else ""
            if (
                width
                and len(digits) == width
                and all(c in "0123456789abcdefABCDEF" for c in digits)
            ):
                code = int(digits, 16)
                if code <= 0x10FFFF:
                    out.append(chr(code))
                    i += 2 + width
                    continue
            raise PredicateError("invalid escape in string", src, i)
        out.append(ch)
        i += 1
    raise PredicateError("unterminated string", src, start)


# --------------------------------------------------------------------------- parser


@dataclass(frozen=True)
class _Node:
    type: type
    fn: Callable[[Any], Any]
    pos: int
    literal: bool = False
    value: Any = None
    #: "and"/"or" for an n-ary chain, whose operands are ``children``.
    kind: str = ""
    children: tuple[Callable[[Any], Any], ...] = ()


class _Parser:
    def __init__(self, src: str, funcs: Mapping[str, Func]) -> None:
        self.src = src
        self.funcs = funcs
        self.tokens = _tokenize(src)
        self.i = 0
        self.depth = 0

    # helpers
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def at(self, text: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == "op" and tok.text == text

    def error(self, message: str, pos: int) -> PredicateError:
        return PredicateError(message, self.src, pos)

    def unexpected(self, tok: _Token, wanted: str) -> PredicateError:
        if tok.kind == "end":
            return self.error(f"unexpected end of expression, expected {wanted}", tok.pos)
        return self.error(f"unexpected {tok.text!r}, expected {wanted}", tok.pos)

    def expect(self, text: str) -> _Token:
        if not self.at(text):
            raise self.unexpected(self.peek(), repr(text))
        return self.advance()

    def enter(self, pos: int) -> None:
        """One more level of nesting starts at ``pos``; refuse beyond MAX_DEPTH."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested too deeply (more than {MAX_DEPTH} levels)", pos)

    def leave(self) -> None:
        self.depth -= 1

    def predicate(self, node: _Node) -> _Node:
        if node.type is not bool:
            kind = "a literal" if node.literal else f"{_article(node.type)} value"
            raise self.error(f"expected a predicate, got {kind}", node.pos)
        return node

    # grammar
    def parse(self) -> _Node:
        if self.peek().kind == "end":
            raise self.error("empty expression", 0)
        node = self.predicate(self.parse_or())
        tok = self.peek()
        if tok.kind != "end":
            raise self.error(f"unexpected {tok.text!r} after a complete expression", tok.pos)
        return node

    def parse_or(self) -> _Node:
        return self.chain("||", "or", self.parse_and)

    def parse_and(self) -> _Node:
        return self.chain("&&", "and", self.parse_unary)

    def chain(self, op: str, kind: str, operand: Callable[[], _Node]) -> _Node:
        """``operand (op operand)*`` as one n-ary node: a loop, not a nest of closures."""
        first = operand()
        if not self.at(op):
            return first
        fns: list[Callable[[Any], Any]] = []
        node = first
        while True:
            self.predicate(node)
            fns.extend(node.children if node.kind == kind else (node.fn,))
            if not self.at(op):
                break
            self.advance()
            node = operand()
        combine = _any if kind == "or" else _all
        return _Node(bool, combine(tuple(fns)), first.pos, kind=kind, children=tuple(fns))

    def parse_unary(self) -> _Node:
        if self.at("!"):
            pos = self.advance().pos
            self.enter(pos)
            inner = self.predicate(self.parse_unary_operand())
            self.leave()
            return _Node(bool, _not(inner.fn), pos)
        return self.parse_compare()

    def parse_unary_operand(self) -> _Node:
        # "!" binds tighter than comparisons: "!F() < 2" is "(!F()) < 2" (an error).
        if self.at("!"):
            return self.parse_unary()
        node = self.parse_operand()
        tok = self.peek()
        if tok.kind == "op" and tok.text in _CMP_OPS:
            raise self.error(
                "cannot compare a negated predicate (use parentheses: !(a < b))", tok.pos
            )
        return node

    def parse_compare(self) -> _Node:
        left = self.parse_operand()
        tok = self.peek()
        if not (tok.kind == "op" and tok.text in _CMP_OPS):
            return left
        self.advance()
        right = self.parse_operand()
        node = self.comparison(left, tok, right)
        nxt = self.peek()
        if nxt.kind == "op" and nxt.text in _CMP_OPS:
            raise self.error("comparisons cannot be chained", nxt.pos)
        return node

    def comparison(self, left: _Node, op_tok: _Token, right: _Node) -> _Node:
        op = op_tok.text
        if left.literal and right.literal:
            raise self.error("a comparison needs a function call", left.pos)
        if not left.literal and not right.literal:
            raise self.error("cannot compare a function call with a function call", right.pos)
        call, lit = (left, right) if right.literal else (right, left)
        if not right.literal:
            op = _FLIPPED[op]
        if call.type is bool:
            raise self.error(
                "a predicate cannot be compared; use it directly or with '!'", call.pos
            )
        if call.type is str or lit.type is str:
            if call.type is not lit.type:
                want = _article(call.type)
                raise self.error(f"expected {want} literal, got {_TYPE_NAMES[lit.type]}", lit.pos)
            if op not in ("==", "!="):
                raise self.error("strings compare only with '==' and '!='", op_tok.pos)
        f, c, cmp = call.fn, lit.value, _OPERATORS[op]
        fn: Callable[[Any], Any]
        if op == "==":
            fn = lambda ctx: f(ctx) == c  # noqa: E731
        elif op == "!=":
            fn = lambda ctx: f(ctx) != c  # noqa: E731
        elif op == "<":
            fn = lambda ctx: f(ctx) < c  # noqa: E731
        elif op == "<=":
            fn = lambda ctx: f(ctx) <= c  # noqa: E731
        elif op == ">":
            fn = lambda ctx: f(ctx) > c  # noqa: E731
        else:
            fn = lambda ctx: cmp(f(ctx), c)  # noqa: E731
        return _Node(bool, fn, left.pos)

    def parse_operand(self) -> _Node:
        tok = self.peek()
        if tok.kind == "op" and tok.text == "(":
            self.advance()
            self.enter(tok.pos)
            inner = self.parse_or()
            self.expect(")")
            self.leave()
            return replace(inner, pos=tok.pos)
        if tok.kind == "name":
            return self.parse_call()
        if tok.kind in ("int", "float", "str") or self.at("-"):
            return self.parse_literal()
        raise self.unexpected(tok, "a function call, a literal or '('")

    def parse_literal(self) -> _Node:
        tok = self.advance()
        pos = tok.pos
        sign = 1
        if tok.kind == "op" and tok.text == "-":
            sign = -1
            tok = self.advance()
            if tok.kind not in ("int", "float"):
                raise self.unexpected(tok, "a number after '-'")
        if tok.kind not in ("int", "float", "str"):
            raise self.unexpected(tok, "a literal")
        value = tok.value * sign if tok.kind != "str" else tok.value
        typ = {"int": int, "float": float, "str": str}[tok.kind]
        return _Node(typ, _const(value), pos, literal=True, value=value)

    def parse_call(self) -> _Node:
        name_tok = self.advance()
        name = name_tok.text
        func = self.funcs.get(name)
        if func is None:
            known = ", ".join(sorted(self.funcs)) or "none"
            raise self.error(f"unknown function {name!r} (known: {known})", name_tok.pos)
        if not self.at("("):
            raise self.unexpected(self.peek(), f"'(' after {name}")
        self.advance()
        args: list[_Node] = []
        if not self.at(")"):
            while True:
                if len(args) == len(func.args):
                    raise self.error(
                        f"{name}() takes {len(func.args)} argument(s)", self.peek().pos
                    )
                args.append(self.parse_arg(name, func.args[len(args)]))
                if not self.at(","):
                    break
                self.advance()
        close = self.expect(")")
        if len(args) != len(func.args):
            raise self.error(
                f"{name}() takes {len(func.args)} argument(s), got {len(args)}", close.pos
            )
        return _Node(func.returns, _bind(func.impl, args), name_tok.pos)

    def parse_arg(self, name: str, want: type) -> _Node:
        tok = self.peek()
        if tok.kind == "name":
            self.enter(tok.pos)
            node = self.parse_call()
            self.leave()
        else:
            node = self.parse_literal()
        got = node.type
        if got is want or (want is float and got is int):
            if node.literal and want is float:
                value = float(node.value)
                return _Node(float, _const(value), node.pos, True, value)
            return node
        if want is int and got is float and node.literal and float(node.value).is_integer():
            value = int(node.value)
            return _Node(int, _const(value), node.pos, True, value)
        raise self.error(
            f"{name}() expects {_article(want)} argument, got {_TYPE_NAMES[got]}", node.pos
        )


def _any(fns: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    """``||`` over ``fns``, left to right, stopping at the first true one."""
    if len(fns) == 2:
        lf, rf = fns
        return lambda ctx: lf(ctx) or rf(ctx)

    def any_(ctx: Any) -> bool:
        for f in fns:
            if f(ctx):
                return True
        return False

    return any_


def _all(fns: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    """``&&`` over ``fns``, left to right, stopping at the first false one."""
    if len(fns) == 2:
        lf, rf = fns
        return lambda ctx: lf(ctx) and rf(ctx)

    def all_(ctx: Any) -> bool:
        for f in fns:
            if not f(ctx):
                return False
        return True

    return all_


def _not(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda ctx: not f(ctx)


def _const(value: Any) -> Callable[[Any], Any]:
    return lambda ctx: value


def _article(t: type) -> str:
    name = _TYPE_NAMES[t]
    return ("an " if name[0] in "aeiou" else "a ") + name


def _bind(impl: Callable[..., Any], args: list[_Node]) -> Callable[[Any], Any]:
    """Close over constant arguments so the common case is one direct call."""
    if not args:
        return impl
    if all(a.literal for a in args):
        values = tuple(a.value for a in args)
        return lambda ctx: impl(ctx, *values)
    fns = tuple(a.fn for a in args)
    return lambda ctx: impl(ctx, *(f(ctx) for f in fns))
