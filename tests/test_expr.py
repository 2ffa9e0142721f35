"""The model-arithmetic expression language: parsing, type rules, evaluation, lineage coefficients."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from w2w.errors import ExpressionError, UnknownModelError, W2WError
from w2w.expr import BinOp, Call, Name, Neg, Num, evaluate, linear_terms, names, parse

# Tolerances: everything is float64 (u = 2^-53 = 1.1e-16) on values of size <= ~10, a handful of operations deep
# (elementwise, or dot products/norms of D = 16 terms in slerp): a few ulps, ~1e-15. 1e-12 is 1000x that and still
# far below any real mistake (a wrong coefficient shows at ~1e-2). The hypothesis test below explains its 1e-9.
D = 16
_rng = np.random.default_rng(0)
VECS = {k: _rng.standard_normal(D) for k in ["alice", "bob", "carol", "beard", "my model", "a", "b", "c", "d"]}


def run(text: str, vecs: dict[str, np.ndarray] = VECS) -> np.ndarray:
    return evaluate(parse(text), vecs.__getitem__)


# --- examples ------------------------------------------------------------------------------------

A, B, C = VECS["alice"], VECS["bob"], VECS["carol"]

EXAMPLES = [
    ("alice + 0.8*beard", A + 0.8 * VECS["beard"]),
    ("0.5*alice + 0.5*bob", 0.5 * A + 0.5 * B),
    ("lerp(alice, bob, 0.3)", 0.7 * A + 0.3 * B),
    ("alice - bob + carol", A - B + C),
    ("-(alice - bob)/2 + carol", -(A - B) / 2 + C),
    ("'my model' * 2", VECS["my model"] * 2),
    ('"my model"/4', VECS["my model"] / 4),
    ("alice - bob - carol", A - B - C),  # left-associative
    ("alice - 2*bob/4", A - 0.5 * B),  # * and / bind tighter than -
    ("2*-alice", -2 * A),
    ("--alice", A),
    ("1e-3*alice + .5*bob", 1e-3 * A + 0.5 * B),
    ("(1 - 0.25) * alice", 0.75 * A),
    ("lerp(alice, bob + carol, 1/4)", 0.75 * A + 0.25 * (B + C)),
    ("\talice\n+\nbob ", A + B),
]


@pytest.mark.parametrize(("text", "expected"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_examples_evaluate(text, expected):
    got = run(text)
    assert got.shape == (D,)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_slerp_example_is_on_the_great_circle():
    got = run("slerp(alice, bob, 0.5)")
    # Equal weights at t = 0.5, so the result is a positive multiple of alice + bob.
    direction = (A + B) / np.linalg.norm(A + B)
    np.testing.assert_allclose(got / np.linalg.norm(got), direction, atol=1e-12)


def test_parse_builds_the_tree():
    assert parse("alice + 0.8*beard") == BinOp("+", Name("alice"), BinOp("*", Num(0.8), Name("beard")))
    assert parse("-(a - b)/2") == BinOp("/", Neg(BinOp("-", Name("a"), Name("b"))), Num(2.0))
    assert parse("lerp(a, b, 0.3)") == Call("lerp", (Name("a"), Name("b"), Num(0.3)))
    tree = parse("alice + 0.8*beard")
    assert (tree.col, tree.left.col, tree.right.col, tree.right.left.col) == (6, 0, 11, 8)


def test_name_syntax():
    assert parse("alice.v2_final") == Name("alice.v2_final")
    assert parse("_x9") == Name("_x9")
    assert parse("'my model'") == Name("my model")
    assert parse('"my-model"') == Name("my-model")
    assert parse(r"'it\'s'") == Name("it's")
    assert parse(r'"back\\slash"') == Name("back\\slash")
    assert parse("'2x'") == Name("2x")
    # Without quotes a '-' is subtraction, and a bare function name is an ordinary name.
    assert parse("alice-bob") == BinOp("-", Name("alice"), Name("bob"))
    assert parse("lerp + slerp") == BinOp("+", Name("lerp"), Name("slerp"))
    assert parse("'lerp'") == Name("lerp")


def test_names_in_order_of_first_appearance():
    assert names(parse("carol + lerp(alice, carol - bob, 0.5) + alice")) == ["carol", "alice", "bob"]
    assert names(parse("slerp('x y', \"x y\", 0.1)")) == ["x y"]


# --- linear terms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("alice - bob + 0.5*(alice+carol)", {"alice": 1.5, "bob": -1.0, "carol": 0.5}),
        ("alice + 0.8*beard", {"alice": 1.0, "beard": 0.8}),
        ("lerp(alice, bob, 0.3)", {"alice": 0.7, "bob": 0.3}),
        ("-(alice - bob)/2 + carol", {"alice": -0.5, "bob": 0.5, "carol": 1.0}),
        ("'my model' * 2", {"my model": 2.0}),
        ("alice - alice", {"alice": 0.0}),  # cancelled, but still recorded as used
        ("(2 - 0.5) * lerp(a, b*3, 1/3) / 2", {"a": 0.5, "b": 0.75}),
    ],
)
def test_linear_terms(text, terms):
    got = linear_terms(parse(text))
    assert list(got) == list(terms)  # order of first appearance
    for k, v in terms.items():  # Python floats (IEEE double everywhere), <= 4 operations on values <= 1.5: <= 7e-16
        assert got[k] == pytest.approx(v, abs=1e-15)


@pytest.mark.parametrize("text", ["slerp(alice, bob, 0.5)", "alice + 0.1*slerp(a, b, 0.2)"])
def test_linear_terms_none_with_slerp(text):
    assert linear_terms(parse(text)) is None


# --- slerp ---------------------------------------------------------------------------------------


def test_slerp_orthogonal_unit_vectors_midpoint():
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    got = run("slerp(e1, e2, 0.5)", {"e1": e1, "e2": e2})
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-12)
    assert got @ e1 == pytest.approx(got @ e2, abs=1e-12)
    assert got @ e1 == pytest.approx(math.cos(math.pi / 4), abs=1e-12)


def test_slerp_constant_angular_speed():
    e1, e2 = np.eye(3)[0] * 3, np.eye(3)[1] * 3  # equal norms: the result stays on the sphere
    for t in (0.1, 0.3, 0.9, 1.5):
        got = run(f"slerp(e1, e2, {t})", {"e1": e1, "e2": e2})
        assert np.linalg.norm(got) == pytest.approx(3.0, abs=1e-12)
        assert math.atan2(got[1], got[0]) == pytest.approx(t * math.pi / 2, abs=1e-12)


def test_slerp_endpoints_are_the_inputs():
    vecs = {"a": A, "b": 2.5 * B}
    np.testing.assert_allclose(run("slerp(a, b, 0)", vecs), A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run("slerp(a, b, 1)", vecs), 2.5 * B, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("b", "t", "expected"),
    [
        (2 * A, 0.5, 1.5 * A),  # parallel
        (-A, 0.25, 0.5 * A),  # antiparallel
        (np.zeros(D), 0.25, 0.75 * A),  # zero vector
    ],
    ids=["parallel", "antiparallel", "zero"],
)
def test_slerp_falls_back_to_lerp(b, t, expected):
    np.testing.assert_allclose(run(f"slerp(a, b, {t})", {"a": A, "b": b}), expected, rtol=1e-12, atol=1e-12)


# --- errors --------------------------------------------------------------------------------------

ERRORS = [
    ("alice + * bob", 8, "expected a name, a number or '('"),
    ("", 0, "empty expression"),
    ("   ", 0, "empty expression"),
    ("alice * bob", 6, "cannot multiply two models; scale one by a number"),
    ("alice * (bob + carol)", 6, "cannot multiply two models"),
    ("alice / bob", 6, "cannot divide a model by a model"),
    ("2 / alice", 2, "cannot divide a number by a model"),
    ("alice + 2", 6, "cannot add a model and a number"),
    ("2 - alice", 2, "cannot subtract a model and a number"),
    ("2 * 3", 0, "the expression is a number, not a model"),
    ("-(1 + 2)", 0, "the expression is a number, not a model"),
    ("alice / 0", 8, "division by zero"),
    ("alice / (1 - 1)", 9, "division by zero"),
    ("foo(alice)", 0, "unknown function 'foo'; known functions: lerp, slerp"),
    ("alice + lerpp(a, b, 0.5)", 8, "unknown function 'lerpp'"),
    ("lerp(alice, bob)", 0, "lerp takes 3 arguments (a, b, t), got 2"),
    ("slerp()", 0, "slerp takes 3 arguments"),
    ("lerp(a, b, 0.1, 0.2)", 0, "got 4"),
    ("slerp(alice, bob, carol)", 18, "t, the third argument of slerp, must be a number"),
    ("lerp(alice, bob, 0.5*carol)", 17, "must be a number, not a model"),
    ("lerp(2, bob, 0.5)", 5, "the first argument of lerp must be a model"),
    ("lerp(a, 1+1, 0.5)", 8, "the second argument of lerp must be a model"),
    ("alice bob", 6, "unexpected 'bob' after a complete expression"),
    ("alice 0.5", 6, "unexpected '0.5'"),
    ("2alice", 1, "unexpected 'alice'"),
    ("(alice + bob", 12, "expected ')' to close the '(' at column 1"),
    ("((alice)", 8, "expected ')' to close the '(' at column 1"),
    ("alice + bob)", 11, "unmatched ')'"),
    ("alice +", 7, "ends early"),
    ("lerp(alice, bob, 0.5", 20, "expected ',' or ')' in the arguments of lerp"),
    ("lerp(alice bob)", 11, "expected ',' or ')'"),
    ("()", 1, "expected a name, a number or '('"),
    ("'my model", 0, "unterminated quoted name"),
    ('alice + "bob\\"', 8, "unterminated quoted name"),
    ("alice + ''", 8, "empty quoted name"),
    ("alice $ bob", 6, "unexpected character '$'"),
    ("alice ** 2", 7, "expected a name, a number or '('"),
    ("alice^2", 5, "unexpected character '^'"),
    ("1e999 * alice", 0, "too large"),
    ("1e200 * 1e200 * alice", 6, "number too large"),
    ("+alice", 0, "expected a name, a number or '('"),
    ("'lerp'(a, b, 0.5)", 6, "unexpected '('"),
]


@pytest.mark.parametrize(("text", "col", "fragment"), ERRORS, ids=[t or "<empty>" for t, _, _ in ERRORS])
def test_errors_point_at_the_column(text, col, fragment):
    with pytest.raises(ExpressionError) as info:
        parse(text)
    err = info.value
    assert isinstance(err, W2WError) and isinstance(err, ValueError)
    assert err.column == col and err.expression == text
    msg = str(err)
    assert fragment in msg
    assert msg.startswith(f"bad expression at column {col + 1}: ")
    if text:
        *_, shown, caret = msg.split("\n")
        assert shown == "  " + text.replace("\t", " ")
        assert caret == "  " + " " * col + "^"


def test_caret_message_matches_the_documented_form():
    with pytest.raises(ExpressionError) as info:
        parse("alice + * bob")
    assert str(info.value) == (
        "bad expression at column 9: expected a name, a number or '('\n  alice + * bob\n          ^"
    )


def test_caret_stays_aligned_across_tabs_and_newlines():
    with pytest.raises(ExpressionError) as info:
        parse("alice\t*\nbob")
    _, shown, caret = str(info.value).split("\n")
    assert shown == "  alice * bob" and caret.index("^") == shown.index("*")


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(ExpressionError, match="nested too deeply"):
        parse("(" * 5000 + "alice" + ")" * 5000)
    with pytest.raises(ExpressionError, match="nested too deeply"):
        parse("-" * 5000 + "alice")
    with pytest.raises(ExpressionError, match="too many chained operations"):
        parse(" + ".join(["alice"] * 5000))
    # A long but reasonable chain still works, recursively evaluated.
    text = " + ".join(f"{i}*a" for i in range(300))
    # 300 same-signed terms summed in float64: <= 300 u = 3.3e-14 relative, in any order
    np.testing.assert_allclose(run(text), sum(range(300)) * VECS["a"], rtol=1e-12)
    assert linear_terms(parse(text)) == {"a": float(sum(range(300)))}


# --- safety --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('x')",
        "__import__(os)",
        "alice.__class__()",
        "().__class__",
        "lambda: 0",
        "alice; import os",
        "[alice]",
        "alice if bob else carol",
        "f'{alice}'",
        "alice[0]",
        "open('/etc/passwd')",
        "eval('1')",
    ],
)
def test_python_code_does_not_parse(text):
    with pytest.raises(ExpressionError):
        parse(text)


def test_dunder_names_are_just_names(monkeypatch):
    asked = []

    def lookup(name):
        asked.append(name)
        return VECS["a"]

    # Nothing may reach eval/exec/compile while parsing or evaluating.
    for fn in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(builtins, fn, lambda *a, **k: pytest.fail("reached " + repr(a)))
    got = evaluate(parse("__class__ + 2*alice.__dict__ - '__import__(\"os\")'"), lookup)
    monkeypatch.undo()
    assert asked == ["__class__", "alice.__dict__", '__import__("os")']
    np.testing.assert_allclose(got, 2 * VECS["a"])


# --- evaluation ----------------------------------------------------------------------------------


def test_lookup_errors_propagate_untouched():
    boom = KeyError("nobody")
    with pytest.raises(KeyError) as info:
        evaluate(parse("alice + nobody"), lambda n: VECS[n] if n == "alice" else (_ for _ in ()).throw(boom))
    assert info.value is boom

    def registry_lookup(name):
        raise UnknownModelError(name)

    with pytest.raises(UnknownModelError):
        evaluate(parse("alice"), registry_lookup)


def test_lookup_called_once_per_name_in_order():
    asked = []

    def lookup(name):
        asked.append(name)
        return VECS[name]

    got = evaluate(parse("bob - alice + 0.5*(bob + lerp(alice, carol, 0.5))"), lookup)
    assert asked == ["bob", "alice", "carol"]
    np.testing.assert_allclose(got, B - A + 0.5 * (B + 0.5 * A + 0.5 * C), rtol=1e-12)


def test_shapes_must_agree():
    vecs = {"alice": np.ones(4), "bob": np.ones(5), "m": np.ones((2, 2))}
    with pytest.raises(ExpressionError) as info:
        run("alice + 0.5*bob", vecs)
    assert info.value.column == 12 and "'bob' has 5 values but 'alice' has 4" in str(info.value)
    assert str(info.value).endswith("\n  alice + 0.5*bob\n              ^")
    with pytest.raises(ExpressionError, match="not a 1-D vector"):
        run("alice + m", vecs)


def test_dtype_is_kept_and_result_is_a_fresh_array():
    vecs = {"a": np.arange(4, dtype=np.float32), "b": np.ones(4, dtype=np.float32), "i": np.arange(4)}
    assert run("a + 0.5*b", vecs).dtype == np.float32
    assert run("slerp(a, b, 0.5)", vecs).dtype == np.float32
    assert run("i * 2", vecs).dtype == np.float64
    out = run("((a))", vecs)
    out[:] = 99
    np.testing.assert_array_equal(vecs["a"], np.arange(4))


def test_hand_built_trees_are_type_checked():
    with pytest.raises(ExpressionError) as info:
        evaluate(BinOp("*", Name("a"), Name("b")), VECS.__getitem__)
    assert info.value.column is None and str(info.value) == (
        "bad expression: cannot multiply two models; scale one by a number"
    )
    with pytest.raises(ExpressionError, match="is a number"):
        linear_terms(Num(2.0))
    np.testing.assert_allclose(evaluate(Neg(Name("a")), VECS.__getitem__), -VECS["a"])


# --- property: evaluation agrees with the linear terms -------------------------------------------

SCALES = st.floats(-4, 4, allow_nan=False)
DIVISORS = st.floats(0.25, 4).flatmap(lambda x: st.sampled_from([x, -x]))
TS = st.floats(-0.5, 1.5)
SP = st.sampled_from(["", " "])


def _num(x: float) -> str:
    return f"({x!r})"


def _lin(depth: int) -> st.SearchStrategy[tuple[str, dict[str, float]]]:
    """(text, expected coefficients) of random linear expressions over names a..d."""
    leaf = st.sampled_from("abcd").map(lambda n: (n, {n: 1.0}))
    if depth == 0:
        return leaf
    sub = _lin(depth - 1)

    def comb(x, sx, y, sy):
        out = {k: sx * v for k, v in x.items()}
        for k, v in y.items():
            out[k] = out.get(k, 0.0) + sy * v
        return out

    return st.one_of(
        leaf,
        st.tuples(sub, sub, st.sampled_from("+-"), SP).map(
            lambda a: (
                f"({a[0][0]}){a[3]}{a[2]}{a[3]}({a[1][0]})",
                comb(a[0][1], 1.0, a[1][1], 1.0 if a[2] == "+" else -1.0),
            )
        ),
        st.tuples(SCALES, sub, st.booleans()).map(
            lambda a: (f"{_num(a[0])}*({a[1][0]})" if a[2] else f"({a[1][0]})*{_num(a[0])}", comb(a[1][1], a[0], {}, 0))
        ),
        st.tuples(sub, DIVISORS).map(lambda a: (f"({a[0][0]})/{_num(a[1])}", comb(a[0][1], 1 / a[1], {}, 0))),
        sub.map(lambda a: (f"-({a[0]})", comb(a[1], -1.0, {}, 0))),
        st.tuples(sub, sub, TS, SP).map(
            lambda a: (f"lerp({a[0][0]},{a[3]}{a[1][0]},{a[3]}{a[2]!r})", comb(a[0][1], 1 - a[2], a[1][1], a[2]))
        ),
    )


@settings(max_examples=300, deadline=None)
@given(_lin(4))
def test_evaluate_matches_linear_terms(case):
    text, expected = case
    node = parse(text)
    terms = linear_terms(node)
    assert terms is not None and list(terms) == names(node) and set(terms) == set(expected)
    # depth 4, and each level at most multiplies the sum of |coefficients| by 4 (|scale| and 1/|divisor| <= 4; + and
    # lerp, |weights| <= 1.5, by 2 and 3): <= 4^4 = 256, so with |v| <= ~4 every intermediate is below ~1e3 and ~30
    # float64 operations err by <= 30 u 1e3 ~ 3e-12 absolute: 1e-9 holds whatever the cancellation
    for k, v in expected.items():
        assert terms[k] == pytest.approx(v, rel=1e-9, abs=1e-9)
    combined = sum(c * VECS[k] for k, c in terms.items())
    np.testing.assert_allclose(evaluate(node, VECS.__getitem__), combined, rtol=1e-9, atol=1e-9)
