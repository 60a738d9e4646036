"""The predicate language: oxy's cases, exact error columns, property tests."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oxypy import ConfigurationError, PredicateError
from oxypy.predicate import (
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_NUMBER_LENGTH,
    Func,
    Predicate,
    compile_predicate,
)


@dataclass(frozen=True)
class Ctx:
    attempt: int = 1
    status: int = 502
    network_error: bool = True
    method: str = "GET"
    ratio: float = 0.25
    flag: bool = False


BUFFER_FUNCS = {
    "IsNetworkError": Func(lambda c: c.network_error, returns=bool),
    "Attempts": Func(lambda c: c.attempt, returns=int),
    "ResponseCode": Func(lambda c: c.status, returns=int),
    "RequestMethod": Func(lambda c: c.method, returns=str),
}
CB_FUNCS = {
    "NetworkErrorRatio": Func(lambda c: c.ratio, returns=float),
    "LatencyAtQuantileMS": Func(lambda c, q: int(q) * 2, args=(float,), returns=int),
    "ResponseCodeRatio": Func(lambda c, a, b, d, e: 0.75, args=(int, int, int, int), returns=float),
    "RequestThreshold": Func(lambda c: 30, returns=int),
}
FUNCS = {**BUFFER_FUNCS, **CB_FUNCS}


@pytest.mark.parametrize(
    ("expression", "ctx", "expected"),
    [
        # oxy's own examples (oxy.md §2)
        pytest.param("IsNetworkError() && Attempts() < 2", Ctx(), True, id="oxy-retry"),
        pytest.param("IsNetworkError() && Attempts() < 2", Ctx(attempt=2), False, id="oxy-cap"),
        pytest.param(
            "(IsNetworkError() || ResponseCode() == 500) && Attempts() < 3",
            Ctx(network_error=False, status=500, attempt=2),
            True,
            id="oxy-parens",
        ),
        pytest.param(
            'RequestMethod() == "GET" && ResponseCode() == 503',
            Ctx(status=503),
            True,
            id="oxy-method",
        ),
        pytest.param("Attempts() <= 2", Ctx(attempt=2), True, id="oxy-le"),
        pytest.param("NetworkErrorRatio() > 0.5", Ctx(ratio=0.6), True, id="cb-ratio"),
        pytest.param("LatencyAtQuantileMS(50.0) > 50", Ctx(), True, id="cb-latency"),
        pytest.param("ResponseCodeRatio(500, 600, 0, 600) > 0.5", Ctx(), True, id="cb-codes"),
        pytest.param(
            "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 20",
            Ctx(ratio=0.4),
            False,
            id="cb-threshold",
        ),
        pytest.param("RequestMethod() == `POST`", Ctx(method="POST"), True, id="backquote"),
        # oxypy's additions
        pytest.param("!IsNetworkError()", Ctx(), False, id="not"),
        pytest.param("!!IsNetworkError()", Ctx(), True, id="not-not"),
        pytest.param("!(Attempts() < 2)", Ctx(), False, id="not-parens"),
        pytest.param("2 > Attempts()", Ctx(), True, id="literal-left"),
        pytest.param("500 <= ResponseCode()", Ctx(status=500), True, id="literal-left-le"),
        pytest.param("Attempts() > -1", Ctx(), True, id="negative"),
        pytest.param("NetworkErrorRatio() > 1", Ctx(ratio=1.5), True, id="float-vs-int"),
        pytest.param("LatencyAtQuantileMS(50) > 10.5", Ctx(), True, id="int-arg-to-float"),
        pytest.param("ResponseCodeRatio(500.0, 600, 0, 600) > 0.5", Ctx(), True, id="int-arg-1.0"),
        pytest.param("(Attempts()) == 1", Ctx(), True, id="paren-call"),
        pytest.param("ResponseCode() != 200 || IsNetworkError()", Ctx(), True, id="or"),
        pytest.param(
            "IsNetworkError() || Attempts() < 2 && Attempts() > 5", Ctx(), True, id="prec"
        ),
        pytest.param(
            "(IsNetworkError() || Attempts() < 2) && Attempts() > 5", Ctx(), False, id="prec2"
        ),
        pytest.param('RequestMethod() == "G\\x45T"', Ctx(), True, id="escape"),
        pytest.param("ResponseCode() == 1e3", Ctx(status=1000), True, id="exponent"),
    ],
)
def test_valid(expression: str, ctx: Ctx, expected: bool) -> None:
    pred = compile_predicate(expression, FUNCS)
    assert isinstance(pred, Predicate)
    assert pred.expression == expression
    assert pred(ctx) is expected


@pytest.mark.parametrize(
    ("expression", "column", "fragment"),
    [
        pytest.param("", 0, "empty expression", id="empty"),
        pytest.param("   ", 0, "empty expression", id="blank"),
        pytest.param("Attempts()", 0, "expected a predicate", id="bare-int"),
        pytest.param("2", 0, "expected a predicate", id="bare-literal"),
        pytest.param("Attempts() && IsNetworkError()", 0, "expected a predicate", id="and-int"),
        pytest.param("IsNetworkError() || RequestMethod()", 20, "expected a predicate", id="or-s"),
        pytest.param("Foo() > 1", 0, "unknown function 'Foo'", id="unknown"),
        pytest.param("attempts() > 1", 0, "unknown function", id="case-sensitive"),
        pytest.param("true", 0, "unknown function 'true'", id="bare-ident"),
        pytest.param("Attempts < 2", 9, "expected '(' after Attempts", id="no-parens"),
        pytest.param("Attempts(1) < 2", 9, "takes 0 argument", id="extra-arg"),
        pytest.param("LatencyAtQuantileMS() > 1", 20, "got 0", id="missing-arg"),
        pytest.param("LatencyAtQuantileMS(50, 1) > 1", 24, "takes 1", id="two-args"),
        pytest.param('LatencyAtQuantileMS("50") > 1', 20, "expects a float", id="str-arg"),
        pytest.param(
            "ResponseCodeRatio(500.5, 600, 0, 600) > 0.5", 18, "expects an int", id="frac-arg"
        ),
        pytest.param("Attempts() < ResponseCode()", 13, "function call with a", id="call-call"),
        pytest.param("1 < 2", 0, "needs a function call", id="lit-lit"),
        pytest.param("IsNetworkError() junk", 17, "after a complete expression", id="trailing"),
        pytest.param("IsNetworkError())", 16, "after a complete expression", id="extra-paren"),
        pytest.param("(IsNetworkError()", 17, "expected ')'", id="open-paren"),
        pytest.param('RequestMethod() == "GET', 19, "unterminated string", id="unterminated"),
        pytest.param("RequestMethod() == `GET", 19, "unterminated string", id="unterminated-bq"),
        pytest.param('RequestMethod() == "\\q"', 20, "invalid escape", id="bad-escape"),
        pytest.param('RequestMethod() < "GET"', 16, "only with '==' and '!='", id="str-lt"),
        pytest.param("RequestMethod() == 1", 19, "expected a string literal", id="str-int"),
        pytest.param('Attempts() == "1"', 14, "expected an int literal", id="int-str"),
        pytest.param("IsNetworkError() == 1", 0, "predicate cannot be compared", id="bool-cmp"),
        pytest.param("ResponseCode() == 0x1F6", 18, "malformed number", id="hex"),
        pytest.param("ResponseCode() == 'a'", 18, "unexpected character", id="char-literal"),
        pytest.param("Attempts() + 1 < 3", 11, "unexpected character", id="arithmetic"),
        pytest.param("a.b() > 1", 1, "unexpected character '.'", id="selector"),
        pytest.param("Attempts() < 2 < 3", 15, "cannot be chained", id="chained"),
        pytest.param("!Attempts() < 2", 12, "negated", id="not-binds-tighter"),
        pytest.param("!Attempts()", 1, "expected a predicate", id="not-int"),
        pytest.param("Attempts() < - 2 && -", 21, "a number after '-'", id="dangling-minus"),
        pytest.param("Attempts() & 1", 11, "did you mean '&&'", id="single-amp"),
        pytest.param("Attempts() = 1", 11, "did you mean '=='", id="single-eq"),
        pytest.param("IsNetworkError() &&", 19, "unexpected end", id="dangling-and"),
        pytest.param("Attempts() <", 12, "unexpected end", id="dangling-cmp"),
    ],
)
def test_invalid(expression: str, column: int, fragment: str) -> None:
    with pytest.raises(PredicateError) as info:
        compile_predicate(expression, FUNCS)
    err = info.value
    assert fragment in err.message, err.message
    assert err.position == column, str(err)
    assert err.expression == expression
    assert str(err).endswith("\n  " + expression + "\n  " + " " * column + "^")


def test_not_a_string() -> None:
    with pytest.raises(PredicateError):
        compile_predicate(42, FUNCS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"returns": list}, id="bad-return"),
        pytest.param({"returns": int, "args": (dict,)}, id="bad-arg"),
    ],
)
def test_func_types_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Func(lambda c: 1, **kwargs)


def test_func_impl_must_be_callable() -> None:
    with pytest.raises(ConfigurationError):
        Func(42, returns=int)  # type: ignore[arg-type]


def test_short_circuit() -> None:
    calls: list[str] = []

    def probe(name: str, value: bool) -> Func:
        def impl(ctx: object) -> bool:
            calls.append(name)
            return value

        return Func(impl, returns=bool)

    funcs = {"T": probe("T", True), "F": probe("F", False)}
    compile_predicate("T() || F()", funcs)(None)
    compile_predicate("F() && T()", funcs)(None)
    assert calls == ["T", "F"]


def test_call_arguments_evaluated_per_call() -> None:
    funcs = {
        "Double": Func(lambda c, x: x * 2, args=(int,), returns=int),
        "N": Func(lambda c: c, returns=int),
    }
    pred = compile_predicate("Double(N()) == 8", funcs)
    assert pred(4) is True
    assert pred(3) is False


# ----------------------------------------------------------------- properties

PROP_FUNCS = {
    "Flag": Func(lambda c: c.flag, returns=bool),
    "IsNetworkError": Func(lambda c: c.network_error, returns=bool),
    "Attempts": Func(lambda c: c.attempt, returns=int),
    "Ratio": Func(lambda c: c.ratio, returns=float),
    "RequestMethod": Func(lambda c: c.method, returns=str),
    "Plus": Func(lambda c, q: c.attempt + q, args=(float,), returns=float),
}


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    st.text(
        alphabet=st.one_of(st.sampled_from(list('AFRI()!&|=<>-."`,0123456789 ')), st.characters())
    )
)
def test_random_text_only_raises_predicate_error(text: str) -> None:
    try:
        pred = compile_predicate(text, FUNCS)
    except PredicateError as exc:
        assert 0 <= exc.position <= len(text)
        return
    assert isinstance(pred(Ctx()), bool)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from(
            [
                "IsNetworkError()",
                "Attempts()",
                "RequestMethod()",
                "LatencyAtQuantileMS(",
                "ResponseCodeRatio(",
                "&&",
                "||",
                "!",
                "(",
                ")",
                ",",
                "<",
                "==",
                "!=",
                ">=",
                "1",
                "-2",
                "0.5",
                '"GET"',
                "`x`",
                '"',
                "junk",
            ]
        ),
        max_size=12,
    )
)
def test_random_token_soup_only_raises_predicate_error(parts: list[str]) -> None:
    text = " ".join(parts)
    try:
        pred = compile_predicate(text, FUNCS)
    except PredicateError as exc:
        assert 0 <= exc.position <= len(text)
        return
    assert isinstance(pred(Ctx()), bool)


OPS = ["==", "!=", "<", "<=", ">", ">="]
FLIP = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}
NUMS = st.one_of(
    st.integers(min_value=-5, max_value=5),
    st.floats(min_value=-5, max_value=5, allow_nan=False).map(lambda f: round(f, 2)),
)
STRINGS = st.sampled_from(["GET", "POST", "", 'a"b', "back\\slash", "tab\t", "é"])


def _num_literal(value: float) -> str:
    return repr(value)


def _str_literal(value: str, backquote: bool) -> str:
    if backquote and "`" not in value:
        return f"`{value}`"
    return json.dumps(value, ensure_ascii=False)


@st.composite
def comparisons(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["int", "float", "plus", "str"]))
    flip = draw(st.booleans())
    if kind == "str":
        op = draw(st.sampled_from(["==", "!="]))
        value: Any = draw(STRINGS)
        lit = _str_literal(value, draw(st.booleans()))
        call, getter = "RequestMethod()", (lambda c: c.method)
    else:
        op = draw(st.sampled_from(OPS))
        value = draw(NUMS)
        lit = _num_literal(value)
        if kind == "int":
            call, getter = "Attempts()", (lambda c: c.attempt)
        elif kind == "float":
            call, getter = "Ratio()", (lambda c: c.ratio)
        else:
            q = draw(NUMS)
            call, getter = f"Plus({_num_literal(q)})", _plus(q)
    text = f"{lit} {FLIP[op]} {call}" if flip else f"{call} {op} {lit}"
    return text, ("cmp", getter, op, value)


def _plus(q: float) -> Callable[[Ctx], float]:
    return lambda c: c.attempt + q


def _leaf(draw: st.DrawFn) -> tuple[str, Any]:
    choice = draw(st.sampled_from(["flag", "neterr", "cmp", "cmp"]))
    if choice == "flag":
        return "Flag()", ("get", lambda c: c.flag)
    if choice == "neterr":
        return "IsNetworkError()", ("get", lambda c: c.network_error)
    return draw(comparisons())


# precedence levels: 3 atoms (calls, parens, !x), 2 comparisons, 1 &&, 0 ||
@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> tuple[str, Any, int]:
    if depth >= 4 or draw(st.integers(0, 2)) == 0:
        text, tree = _leaf(draw)
        level = 2 if tree[0] == "cmp" else 3
    else:
        kind = draw(st.sampled_from(["not", "and", "or", "paren"]))
        if kind == "not":
            sub, subtree, sublevel = draw(trees(depth + 1))
            text = "!" + (sub if sublevel == 3 else f"({sub})")
            tree, level = ("not", subtree), 3
        elif kind == "paren":
            sub, subtree, _ = draw(trees(depth + 1))
            text, tree, level = f"({sub})", subtree, 3
        else:
            need = 2 if kind == "and" else 1
            a, atree, alevel = draw(trees(depth + 1))
            b, btree, blevel = draw(trees(depth + 1))
            a = a if alevel >= need else f"({a})"
            b = b if blevel >= need else f"({b})"
            op = "&&" if kind == "and" else "||"
            text = f"{a} {op} {b}"
            tree, level = (kind, atree, btree), need - 1
    return text, tree, level


def reference(tree: Any, ctx: Ctx) -> bool:
    kind = tree[0]
    if kind == "get":
        return bool(tree[1](ctx))
    if kind == "not":
        return not reference(tree[1], ctx)
    if kind == "and":
        return reference(tree[1], ctx) and reference(tree[2], ctx)
    if kind == "or":
        return reference(tree[1], ctx) or reference(tree[2], ctx)
    _, getter, op, value = tree
    left = getter(ctx)
    return bool(
        {
            "==": left == value,
            "!=": left != value,
            "<": left < value,
            "<=": left <= value,
            ">": left > value,
            ">=": left >= value,
        }[op]
    )


CONTEXTS = st.builds(
    Ctx,
    attempt=st.integers(-6, 6),
    network_error=st.booleans(),
    method=STRINGS,
    ratio=st.floats(min_value=-6, max_value=6, allow_nan=False).map(lambda f: round(f, 2)),
    flag=st.booleans(),
)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(trees(), st.lists(CONTEXTS, min_size=1, max_size=8))
def test_valid_trees_evaluate_like_reference(tree: tuple[str, Any, int], ctxs: list[Ctx]) -> None:
    text, ref, _ = tree
    pred = compile_predicate(text, PROP_FUNCS)
    for ctx in ctxs:
        assert pred(ctx) is reference(ref, ctx), (text, ctx)


# ----------------------------------------------------------------- limits (fuzzing findings)


def _stack_depth() -> int:
    depth = 0
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


def _depth_probe(depths: list[int], value: bool = True) -> Func:
    """A bool function recording the stack depth it is called at."""

    def impl(ctx: object) -> bool:
        depths.append(_stack_depth())
        return value

    return Func(impl, returns=bool)


PAREN_198 = "(" * 198 + "IsNetworkError()" + ")" * 198
NOT_495 = "!" * 495 + "IsNetworkError()"
INT_4301 = "Attempts() < " + "9" * 4301
AND_995 = " && ".join(["IsNetworkError()"] * 995)


@pytest.mark.parametrize(
    ("expression", "column", "fragment"),
    [
        pytest.param(PAREN_198, MAX_DEPTH, "nested too deeply", id="198-parens"),
        pytest.param(NOT_495, MAX_DEPTH, "nested too deeply", id="495-nots"),
        pytest.param(INT_4301, MAX_LENGTH, "expression too long", id="4301-digit-int"),
        pytest.param(AND_995, MAX_LENGTH, "expression too long", id="995-ands"),
        pytest.param(
            "(" * MAX_DEPTH + "!(Attempts() < 2)" + ")" * MAX_DEPTH,
            MAX_DEPTH,
            "nested too deeply",
            id="parens-then-not",
        ),
        pytest.param(
            "!(" * (MAX_DEPTH // 2) + "!IsNetworkError()" + ")" * (MAX_DEPTH // 2),
            MAX_DEPTH,
            "nested too deeply",
            id="not-paren-alternating",
        ),
        pytest.param(
            "Attempts() < " + "9" * (MAX_NUMBER_LENGTH + 1),
            13,
            "number too long",
            id="65-digit-int",
        ),
        pytest.param(
            "Ratio() < 1." + "5" * MAX_NUMBER_LENGTH, 10, "number too long", id="long-float"
        ),
        pytest.param("Ratio() < 1e400", 10, "number out of range", id="float-overflow"),
        pytest.param("Ratio() > -1e309", 11, "number out of range", id="float-overflow-neg"),
        pytest.param(" " * (MAX_LENGTH + 1), MAX_LENGTH, "too long", id="long-blank"),
    ],
)
def test_oversized_expressions_raise_predicate_error(
    expression: str, column: int, fragment: str
) -> None:
    with pytest.raises(PredicateError) as info:
        compile_predicate(expression, {**FUNCS, **PROP_FUNCS})
    err = info.value
    assert fragment in err.message, err.message
    assert err.position == column
    assert err.expression == expression
    assert str(err).startswith(f"{err.message} at column {column + 1}\n")


def test_limits_are_inclusive() -> None:
    funcs = {**FUNCS, **PROP_FUNCS}
    deep = compile_predicate("(" * MAX_DEPTH + "IsNetworkError()" + ")" * MAX_DEPTH, funcs)
    assert deep(Ctx()) is True
    nots = compile_predicate("!" * MAX_DEPTH + "IsNetworkError()", funcs)
    assert nots(Ctx()) is True  # an even number of negations
    digits = "1" + "0" * (MAX_NUMBER_LENGTH - 1)
    assert compile_predicate(f"Attempts() < {digits}", funcs)(Ctx()) is True
    chain = " || ".join(["Flag()"] * ((MAX_LENGTH - 16) // 10)) + " || IsNetworkError()"
    assert len(chain) <= MAX_LENGTH
    assert compile_predicate(chain, funcs)(Ctx()) is True
    assert compile_predicate("Ratio() < 1e308", funcs)(Ctx()) is True


def test_nested_calls_as_arguments_count_toward_depth() -> None:
    funcs = {
        "Double": Func(lambda c, x: x * 2, args=(int,), returns=int),
        "N": Func(lambda c: c, returns=int),
    }
    ok = "Double(" * MAX_DEPTH + "N()" + ")" * MAX_DEPTH + " > 0"
    assert compile_predicate(ok, funcs)(1) is True
    too_deep = "Double(" * (MAX_DEPTH + 1) + "N()" + ")" * (MAX_DEPTH + 1) + " > 0"
    with pytest.raises(PredicateError) as info:
        compile_predicate(too_deep, funcs)
    assert "nested too deeply" in info.value.message
    # The outermost call is level 0; N() is the 65th call nested as an argument.
    assert info.value.position == len("Double(") * (MAX_DEPTH + 1)


@pytest.mark.parametrize("op", ["&&", "||"])
def test_long_chains_evaluate_in_a_loop_with_short_circuit(op: str) -> None:
    # The longest chain that fits in MAX_LENGTH: 819 clauses of "A()&&".
    depths: list[int] = []
    last = op == "&&"  # all but the last clause let the chain continue
    n = (MAX_LENGTH + 2) // 5
    funcs = {"A": _depth_probe(depths, value=last), "B": _depth_probe(depths, value=not last)}
    expression = op.join(["A()"] * (n - 1) + ["B()"])
    assert len(expression) <= MAX_LENGTH
    pred = compile_predicate(expression, funcs)
    base = _stack_depth()
    assert pred(None) is (not last)
    assert len(depths) == n  # every clause ran once, in order, up to the deciding one
    assert max(depths) - base <= 4, (max(depths), base)
    # Short circuit: a deciding first clause stops the chain.
    depths.clear()
    stop = op.join(["B()"] + ["A()"] * 3)
    assert compile_predicate(stop, funcs)(None) is (not last)
    assert len(depths) == 1


def test_evaluation_depth_is_bounded_by_nesting() -> None:
    depths: list[int] = []
    funcs = {"A": _depth_probe(depths), "Z": _depth_probe(depths, value=False)}
    # Maximal nesting, with a chain at every level: (Z() || (Z() || (... A())))
    expression = "(Z() || " * MAX_DEPTH + "A()" + ")" * MAX_DEPTH
    pred = compile_predicate(expression, funcs)
    base = _stack_depth()
    assert pred(None) is True
    assert len(depths) == MAX_DEPTH + 1
    assert max(depths) - base <= 2 * MAX_DEPTH + 4


# Random text built to reach the limits: deep nesting, long chains, huge numbers, unicode.
ATOMS = st.sampled_from(
    [
        "IsNetworkError()",
        "Attempts() < 3",
        "ResponseCode() == 502",
        'RequestMethod() == "GET"',
        "NetworkErrorRatio() > 0.5",
        "LatencyAtQuantileMS(50.0) > 10",
        "ResponseCodeRatio(500, 600, 0, 600) > 0.5",
        "Attempts()",
        "1",
        "",
    ]
)
NUMBER: st.SearchStrategy[str] = st.builds(
    lambda sign, digits, frac, exp: sign + digits + frac + exp,
    st.sampled_from(["", "-", "--"]),
    st.integers(1, 5000).map(lambda n: "9" * n),
    st.sampled_from(["", ".", ".5", "." + "1" * 80]),
    st.sampled_from(["", "e10", "e400", "e-400", "e99999", "E+"]),
)


@st.composite
def hostile(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["parens", "nots", "chain", "number", "calls", "unicode", "mix"]))
    atom = draw(ATOMS)
    n = draw(st.one_of(st.integers(0, 80), st.integers(0, 1500)))
    if kind == "parens":
        close = draw(st.integers(0, n + 1))
        return "(" * n + atom + ")" * close
    if kind == "nots":
        return draw(st.sampled_from(["!", "! ", "!("])) * n + atom
    if kind == "chain":
        op = draw(st.sampled_from([" && ", " || ", "&&", "||", " && !"]))
        return op.join([atom] * n)
    if kind == "number":
        call = draw(st.sampled_from(["Attempts()", "NetworkErrorRatio()"]))
        op = draw(st.sampled_from(["<", "==", ">="]))
        number: str = draw(NUMBER)
        return f"{call} {op} {number}"
    if kind == "calls":
        return "LatencyAtQuantileMS(" * n + "Attempts()" + ")" * n + " > 1"
    if kind == "unicode":
        return draw(st.text(min_size=0, max_size=200))
    parts = draw(
        st.lists(
            st.one_of(ATOMS, st.sampled_from(["(", ")", "!", "&&", "||"]), st.text(max_size=3)),
            max_size=60,
        )
    )
    text: str = " ".join(parts) * draw(st.integers(1, 100))
    return text


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(hostile())
def test_fuzz_hostile_text_compiles_or_raises_predicate_error(text: str) -> None:
    started = time.monotonic()
    try:
        pred = compile_predicate(text, FUNCS)
    except PredicateError as exc:
        assert 0 <= exc.position <= len(text)
        assert exc.expression == text
        assert len(str(exc).splitlines()[1]) <= 130  # a long expression is shown in part
    else:
        assert len(text) <= MAX_LENGTH
        for ctx in (Ctx(), Ctx(attempt=5, status=200, network_error=False, ratio=0.9)):
            assert isinstance(pred(ctx), bool)
    assert time.monotonic() - started < 1.0
