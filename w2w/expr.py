"""A small, safe expression language for model arithmetic (`w2wreg mix "EXPR"`).

    alice + 0.8*beard        0.5*alice + 0.5*bob        lerp(alice, bob, 0.3)
    -(alice - bob)/2 + carol slerp(alice, bob, 0.5)     'my model' * 2

Grammar (a hand-written tokenizer and recursive-descent parser; nothing is ever handed to eval,
exec or the ast module, so the text can only name models and combine them):

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := '-' unary | primary
    primary := NUMBER | NAME | QUOTED | IDENT '(' expr (',' expr)* ')' | '(' expr ')'

- A bare name is `[A-Za-z_][A-Za-z0-9_.]*` (ASCII). Anything else must be quoted, 'my model' or
  "my-model", where a backslash makes the next character literal ('it\\'s'). So `alice-bob` is
  alice minus bob, and `2alice` is an error. Every name is passed as-is to the caller's lookup,
  which decides whether it is a model or a direction (`__class__` is just a name).
- Numbers: 2, 0.8, .5, 1e-3. A leading '-' is the unary minus.
- An identifier directly followed by '(' is a function call: lerp(a, b, t) = (1-t)*a + t*b, and
  slerp(a, b, t), which interpolates along the great circle between a and b with the angle taken
  between their directions and the weights applied to the vectors themselves (as mergekit does);
  it falls back to lerp when a or b is zero or they are (anti)parallel, where that circle is
  undefined. a and b must be models, t a number; t outside [0, 1] extrapolates. A function name
  not followed by '(' is an ordinary name ('lerp' quoted never calls).

Values are models (1-D float vectors from the lookup) or numbers (Python floats). Numbers only
scale models: model*model, anything/model and model+number are errors, and so is an expression
whose value is a number. All of these, and division by zero, are caught by `parse`, before any
model is loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from w2w.errors import ExpressionError

FUNCTIONS = {"lerp": ("a", "b", "t"), "slerp": ("a", "b", "t")}
# Recursion guards: parentheses, signs and calls nested in the text, and operations chained in
# the tree. Far beyond any hand-written mix, and well inside Python's recursion limit.
_MAX_NESTING = 100
_MAX_DEPTH = 400
# sin(angle) below which slerp's weights are ill-conditioned and lerp is as good.
_PARALLEL_SIN = 1e-6


# --- tree ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """Base of the expression tree. `col` (0-based, -1 if unknown) and `src` locate errors; they
    take no part in equality, so hand-built trees compare equal to parsed ones."""

    col: int = field(default=-1, compare=False, repr=False, kw_only=True)
    src: str = field(default="", compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Num(Node):
    value: float


@dataclass(frozen=True)
class Name(Node):
    name: str


@dataclass(frozen=True)
class BinOp(Node):
    """`left op right` with op one of + - * /; `col` is the operator's."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Neg(Node):
    operand: Node


@dataclass(frozen=True)
class Call(Node):
    func: str
    args: tuple[Node, ...]


def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, BinOp):
        return (node.left, node.right)
    if isinstance(node, Neg):
        return (node.operand,)
    if isinstance(node, Call):
        return node.args
    return ()


def _start(node: Node) -> int:
    """Column where `node`'s text begins (its leftmost leaf; parentheses are not kept)."""
    while isinstance(node, BinOp):
        node = node.left
    return node.col


def _err(node: Node, problem: str, col: int | None = None) -> ExpressionError:
    col = node.col if col is None else col
    return ExpressionError(problem, node.src, col if col >= 0 else None)


# --- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    kind: str  # num, ident, quoted, op, end
    value: str
    col: int
    end: int


_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<num>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)"
    r"|(?P<op>[-+*/(),])"
)


def _tokenize(text: str) -> list[_Tok]:
    toks, i = [], 0
    while i < len(text):
        if text[i] in "'\"":
            toks.append(_quoted(text, i))
            i = toks[-1].end
            continue
        m = _TOKEN.match(text, i)
        if m is None:
            raise ExpressionError(f"unexpected character {text[i]!r}", text, i)
        if m.lastgroup != "ws":
            toks.append(_Tok(m.lastgroup, m.group(), i, m.end()))
        i = m.end()
    toks.append(_Tok("end", "", len(text), len(text)))
    return toks


def _quoted(text: str, start: int) -> _Tok:
    quote, chars, i = text[start], [], start + 1
    while i < len(text) and text[i] != quote:
        if text[i] == "\\":
            i += 1
            if i == len(text):
                break
        chars.append(text[i])
        i += 1
    if i >= len(text):
        raise ExpressionError(f"unterminated quoted name: this {quote} is never closed", text, start)
    if not chars:
        raise ExpressionError("empty quoted name", text, start)
    return _Tok("quoted", "".join(chars), start, i + 1)


# --- parser --------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i, self.nesting = text, _tokenize(text), 0, 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def at(self, *ops: str) -> bool:
        tok = self.peek()
        return tok.kind == "op" and tok.value in ops

    def error(self, tok: _Tok, problem: str) -> ExpressionError:
        return ExpressionError(problem, self.text, tok.col)

    def show(self, tok: _Tok) -> str:
        return repr(self.text[tok.col : tok.end])

    def nest(self, tok: _Tok) -> None:
        self.nesting += 1
        if self.nesting > _MAX_NESTING:
            raise self.error(tok, f"nested too deeply (over {_MAX_NESTING} parentheses, signs and calls)")

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise ExpressionError("empty expression", self.text, 0)
        node = self.expr()
        tok = self.peek()
        if tok.kind == "end":
            return node
        if tok.value == ")":
            raise self.error(tok, "unmatched ')'")
        raise self.error(tok, f"unexpected {self.show(tok)} after a complete expression; expected + - * / or the end")

    def expr(self) -> Node:
        node = self.term()
        while self.at("+", "-"):
            tok = self.take()
            node = BinOp(tok.value, node, self.term(), col=tok.col, src=self.text)
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.at("*", "/"):
            tok = self.take()
            node = BinOp(tok.value, node, self.unary(), col=tok.col, src=self.text)
        return node

    def unary(self) -> Node:
        if not self.at("-"):
            return self.primary()
        tok = self.take()
        self.nest(tok)
        node = Neg(self.unary(), col=tok.col, src=self.text)
        self.nesting -= 1
        return node

    def primary(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            value = float(tok.value)
            if not math.isfinite(value):
                raise self.error(tok, f"number {tok.value} is too large")
            return Num(value, col=tok.col, src=self.text)
        if tok.kind == "quoted" or (tok.kind == "ident" and not self.at("(")):
            return Name(tok.value, col=tok.col, src=self.text)
        if tok.kind == "ident":
            return self.call(tok)
        if tok.value == "(":
            self.nest(tok)
            node = self.expr()
            if not self.at(")"):
                raise self.error(self.peek(), f"expected ')' to close the '(' at column {tok.col + 1}")
            self.take()
            self.nesting -= 1
            return node
        if tok.kind == "end":
            raise self.error(tok, "the expression ends early; expected a name, a number or '('")
        raise self.error(tok, "expected a name, a number or '('")

    def call(self, name: _Tok) -> Node:
        self.nest(self.take())  # the '('
        args = []
        if not self.at(")"):
            args.append(self.expr())
            while self.at(","):
                self.take()
                args.append(self.expr())
        if not self.at(")"):
            raise self.error(self.peek(), f"expected ',' or ')' in the arguments of {name.value}")
        self.take()
        self.nesting -= 1
        return Call(name.value, tuple(args), col=name.col, src=self.text)


def parse(text: str) -> Node:
    """Parse and type-check `text`; raises ExpressionError (with `.column`) on any mistake."""
    node = _Parser(text).parse()
    stack = [(node, 1)]  # iterative, because this guards the recursive passes below
    while stack:
        n, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _err(n, f"too many chained operations (over {_MAX_DEPTH}); mix in several steps")
        stack.extend((c, depth + 1) for c in _children(n))
    _check(node)
    return node


# --- type check ----------------------------------------------------------------------------------


def _check(node: Node) -> None:
    """Raise ExpressionError unless `node` is a well-typed expression whose value is a model."""
    if _kind(node) is not None:
        raise _err(node, "the expression is a number, not a model; name at least one model or direction", _start(node))


def _kind(node: Node) -> float | None:
    """Type-check `node`: None if its value is a model, else the number it folds to."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Name):
        return None
    if isinstance(node, Neg):
        v = _kind(node.operand)
        return None if v is None else -v
    if isinstance(node, BinOp):
        return _kind_binop(node, _kind(node.left), _kind(node.right))
    if isinstance(node, Call):
        params = FUNCTIONS.get(node.func)
        if params is None:
            raise _err(node, f"unknown function {node.func!r}; known functions: {', '.join(FUNCTIONS)}")
        if len(node.args) != len(params):
            raise _err(node, f"{node.func} takes {len(params)} arguments ({', '.join(params)}), got {len(node.args)}")
        a, b, t = node.args
        for arg, which in ((a, "first"), (b, "second")):
            if _kind(arg) is not None:
                raise _err(arg, f"the {which} argument of {node.func} must be a model, not a number", _start(arg))
        if _kind(t) is None:
            raise _err(t, f"t, the third argument of {node.func}, must be a number, not a model", _start(t))
        return None
    raise TypeError(f"not an expression node: {node!r}")


def _kind_binop(node: BinOp, left: float | None, right: float | None) -> float | None:
    op = node.op
    if op in ("+", "-"):
        if (left is None) != (right is None):
            verb = "add" if op == "+" else "subtract"
            raise _err(node, f"cannot {verb} a model and a number; numbers can only scale models, as in 0.5*alice")
    elif op == "*":
        if left is None and right is None:
            raise _err(node, "cannot multiply two models; scale one by a number")
    elif op == "/":
        if right is None:
            what = "a number" if left is not None else "a model"
            raise _err(node, f"cannot divide {what} by a model; divide by a number")
        if right == 0:
            raise _err(node.right, "division by zero", _start(node.right))
    else:
        raise _err(node, f"unknown operator {op!r}")
    if left is None or right is None:
        return None
    value = _OPS[op](left, right)
    if not math.isfinite(value):
        raise _err(node, "number too large")
    return value


_OPS: dict[str, Callable] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


# --- queries -------------------------------------------------------------------------------------


def _name_nodes(node: Node) -> Iterator[Name]:
    """Name nodes in source order (a pre-order walk, left to right)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Name):
            yield n
        stack.extend(reversed(_children(n)))


def names(node: Node) -> list[str]:
    """The names `node` uses, in order of first appearance, without duplicates."""
    return list(dict.fromkeys(n.name for n in _name_nodes(node)))


def linear_terms(node: Node) -> dict[str, float] | None:
    """Coefficient of each name if `node` is a linear combination of names, else None (slerp).

    Names whose terms cancel keep a 0.0 coefficient: lineage still records that they were used.
    """
    _check(node)
    terms = _linear(node)
    assert isinstance(terms, dict) or terms is None  # a model-valued node never folds to a number
    return terms


_Linear = float | dict[str, float] | None


def _linear(node: Node) -> _Linear:
    """A number, a {name: coefficient} model, or None once non-linear. Assumes a checked tree."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Name):
        return {node.name: 1.0}
    if isinstance(node, Neg):
        return _scale(_linear(node.operand), -1.0)
    if isinstance(node, BinOp):
        left, right = _linear(node.left), _linear(node.right)
        if left is None or right is None:
            return None
        if isinstance(left, float) and isinstance(right, float):
            return _OPS[node.op](left, right)
        if node.op in ("+", "-"):
            return _combine(left, 1.0, right, 1.0 if node.op == "+" else -1.0)
        if node.op == "*":
            return _scale(right, left) if isinstance(left, float) else _scale(left, right)
        return {k: v / right for k, v in left.items()}  # "/": the divisor is a number
    assert isinstance(node, Call)
    if node.func == "slerp":
        return None
    a, b, t = (_linear(arg) for arg in node.args)
    if a is None or b is None:
        return None
    return _combine(a, 1.0 - t, b, t)


def _scale(x: _Linear, s: float) -> _Linear:
    if x is None or isinstance(x, float):
        return None if x is None else x * s
    return {k: v * s for k, v in x.items()}


def _combine(x: dict[str, float], sx: float, y: dict[str, float], sy: float) -> dict[str, float]:
    out = {k: sx * v for k, v in x.items()}
    for k, v in y.items():
        out[k] = out[k] + sy * v if k in out else sy * v
    return out


# --- evaluation ----------------------------------------------------------------------------------


def evaluate(node: Node, lookup: Callable[[str], np.ndarray]) -> np.ndarray:
    """The model `node` describes. `lookup` is called once per distinct name, in order of first
    appearance, and its errors (KeyError for an unknown name, ...) propagate untouched. All
    vectors must be 1-D of one length; the result keeps their float dtype and is never one of them.
    """
    _check(node)
    vecs: dict[str, np.ndarray] = {}
    first: Name | None = None
    for n in _name_nodes(node):
        if n.name in vecs:
            continue
        v = np.asarray(lookup(n.name))
        if v.ndim != 1 or v.dtype.kind not in "fiub":
            raise _err(n, f"{n.name!r} is not a 1-D vector of numbers (got a {v.ndim}-D {v.dtype} array)")
        if first is not None and v.shape != vecs[first.name].shape:
            raise _err(
                n,
                f"{n.name!r} has {v.size} values but {first.name!r} has {vecs[first.name].size}; "
                "models from different weight spaces cannot be mixed",
            )
        vecs[n.name] = v if v.dtype.kind == "f" else v.astype(np.float64)
        first = first or n
    out = _eval(node, vecs)
    if any(out is v for v in vecs.values()):  # "alice" alone: don't hand back the caller's array
        out = out.copy()
    return out


def _eval(node: Node, vecs: dict[str, np.ndarray]) -> float | np.ndarray:
    """Compute a checked tree; numbers stay Python floats."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Name):
        return vecs[node.name]
    if isinstance(node, Neg):
        return -_eval(node.operand, vecs)
    if isinstance(node, BinOp):
        return _OPS[node.op](_eval(node.left, vecs), _eval(node.right, vecs))
    assert isinstance(node, Call)
    a, b, t = (_eval(arg, vecs) for arg in node.args)
    return _slerp(a, b, t) if node.func == "slerp" else (1.0 - t) * a + t * b


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na == 0.0 or nb == 0.0:
        return (1.0 - t) * a + t * b
    ua, ub = a64 / na, b64 / nb
    # The angle via atan2 stays accurate near 0 and pi, where arccos(dot) loses half its digits.
    omega = 2.0 * math.atan2(float(np.linalg.norm(ua - ub)), float(np.linalg.norm(ua + ub)))
    s = math.sin(omega)
    if s < _PARALLEL_SIN:
        return (1.0 - t) * a + t * b
    return (math.sin((1.0 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b
