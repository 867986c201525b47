"""The expression language shared by Python, the CLI and the app.

Grammar::

    mix     := expr (";" expr)*                         parts applied together on one row (composer.parts):
                                                        each side is its own expression, e.g. ``lora ; road ; prompt``
    expr    := term (("+" | "-") term)*
    term    := "-" term | NUMBER "*" term | factor ("*" NUMBER)?
    factor  := NAME | "(" expr ")" | call
    call    := "interp" "(" expr "," expr "," NUMBER ")"
             | "compose" "(" expr "," expr ")"
             | "compress" "(" expr "," NUMBER ")"        LoRA only: truncated SVD to that rank
             | "merge" "(" METHOD ("," expr)+ ("," KEY "=" NUMBER)* ")"
                 KEY: a parameter METHOD declares in composer.METHODS (density; seed for DARE)
    NAME    := a run of letters, digits and ``_ . / @ : ~ -`` not starting with "-",
               or any text in backquotes (`my folder/with spaces`)

Examples: ``0.7*alice/math@v2 + 0.7*alice/code - 0.3*bob/toxic``, ``interp(a, b, 0.25)``,
``merge(ties, 0.6*a, 0.4*b, density=0.5)``, ``compress(a + b, 8)``, ``0.5*a/lora + 0.5*b/lora ; c/road``.
Because names may contain ``-``, write ``a - b`` (with spaces) to subtract.

A sum of terms becomes one task-arithmetic merge, so its recipe lists one weight per input. ``;`` joins whole
expressions only (never inside parentheses or a call): each side is evaluated on its own and the sides are served
together, as the engine serves a LoRA, a RoAd adapter and a prompt vector on one row.

This module also owns the *writer*: :func:`format_name`, :func:`format_number`, :func:`format_sum`,
:func:`format_interp`, :func:`format_merge` and :func:`format_parts` produce text that :func:`parse` reads back
to the same tree. Recipes (:mod:`composer.ops`) and the app's mixer both write expressions with them;
:func:`rename` replaces names in a text and keeps the rest as written (the API pins ``alice/math@v2`` to its
commit with it).

Work is bounded before anything is loaded (:mod:`composer.limits`): the text's length, the number of adapter
names, the nesting of parentheses, calls and signs; numbers must be finite.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import limits
from .errors import ExpressionError, LimitExceededError
from .merge_methods import METHODS

FUNCTIONS = ("interp", "compose", "merge", "compress")

_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_./@:~\-]")
_NAME = re.compile(r"[A-Za-z0-9_./@:~][A-Za-z0-9_./@:~\-]*")


@dataclass(frozen=True)
class Tok:
    kind: str  # "num", "name", "op", "end"
    text: str
    pos: int


def _tokenize(s: str) -> list[Tok]:
    toks: list[Tok] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c.isspace():
            i += 1
            continue
        if c in "+-*(),=;":
            toks.append(Tok("op", c, i))
            i += 1
            continue
        if c == "`":
            j = s.find("`", i + 1)
            if j < 0:
                raise ExpressionError("Unclosed backquote", expression=s, position=i)
            if j == i + 1:
                raise ExpressionError("Empty name in backquotes", expression=s, position=i)
            toks.append(Tok("name", s[i + 1:j], i))
            i = j + 1
            continue
        m = _NUMBER.match(s, i)
        if m and not (m.end() < len(s) and _NAME_CHARS.match(s[m.end()]) and s[m.end()] != "-"):
            if not math.isfinite(float(m.group(0))):
                raise ExpressionError(f"The number {m.group(0)!r} is too large (it overflows to infinity)",
                                      expression=s, position=i)
            toks.append(Tok("num", m.group(0), i))
            i = m.end()
            continue
        m = _NAME.match(s, i)
        if m:
            toks.append(Tok("name", m.group(0), i))
            i = m.end()
            continue
        raise ExpressionError(f"Unexpected character {c!r} at position {i}", expression=s, position=i)
    toks.append(Tok("end", "", len(s)))
    return toks


# AST nodes
@dataclass(frozen=True)
class Name:
    name: str
    pos: int


@dataclass(frozen=True)
class Linear:
    terms: tuple[tuple[float, Node], ...]  # (weight, node)


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple[Node, ...]
    weights: tuple[float, ...]
    params: tuple[tuple[str, float], ...]
    pos: int


@dataclass(frozen=True)
class Sides:
    """``a ; b ; c``: whole expressions served together as parts of one row. ``spans`` are each side's
    ``(start, end)`` in the text, so a side's recipe can quote it as written."""

    sides: tuple[Node, ...]
    spans: tuple[tuple[int, int], ...]


Node = Name | Linear | Call | Sides


_KEYWORDS = frozenset((*FUNCTIONS, "density", "seed", *METHODS))


def _limit(text: str, name: str, value: int, what: str, position: int | None = None) -> None:
    try:
        limits.check(name, value, what)
    except LimitExceededError as e:
        raise ExpressionError(str(e), expression=text if len(text) <= 200 else "", position=position) from e


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        _limit(text, "expression_chars", len(text), "The expression's length")
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.max_depth = int(limits.get("expression_depth"))
        n = sum(1 for t in self.toks if t.kind == "name" and t.text not in _KEYWORDS)
        _limit(text, "expression_terms", n, "The number of adapter names in the expression")

    @contextlib.contextmanager
    def nested(self) -> Iterator[None]:
        """One level of parentheses, call or sign; refused past the depth limit instead of recursing on."""
        self.depth += 1
        if self.depth > self.max_depth:
            _limit(self.text, "expression_depth", self.depth, "The nesting of the expression",
                   position=self.peek().pos)
        try:
            yield
        finally:
            self.depth -= 1

    def peek(self) -> Tok:
        return self.toks[self.i]

    def take(self) -> Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def error(self, msg: str, tok: Tok | None = None) -> ExpressionError:
        tok = tok or self.peek()
        where = "the end" if tok.kind == "end" else f"position {tok.pos} ({tok.text!r})"
        return ExpressionError(f"{msg} at {where}", expression=self.text, position=tok.pos)

    def expect(self, text: str) -> Tok:
        t = self.peek()
        if t.kind == "op" and t.text == ";" and text != ";":
            raise self.error(f"Expected '{text}' (';' separates the parts of a mix only at the top level, between "
                             "whole expressions: 'a + b ; c')")
        if t.kind != "op" or t.text != text:
            raise self.error(f"Expected '{text}'")
        return self.take()

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.error("Empty expression: expected an adapter name")
        sides, spans = [], []
        while True:
            start = self.peek()
            if start.kind == "end" or (start.kind == "op" and start.text == ";"):
                raise self.error("Expected an expression on each side of ';'")
            sides.append(self.expr())
            spans.append((start.pos, self.peek().pos))
            if not (self.peek().kind == "op" and self.peek().text == ";"):
                break
            self.take()
        if self.peek().kind != "end":
            raise self.error("Unexpected token")
        return sides[0] if len(sides) == 1 else Sides(tuple(sides), tuple(spans))

    def expr(self) -> Node:
        terms = list(_terms(self.term()))
        while self.peek().kind == "op" and self.peek().text in "+-":
            sign = -1.0 if self.take().text == "-" else 1.0
            terms += [(sign * w, n) for w, n in _terms(self.term())]
        return _linear(terms)

    def term(self) -> Node:
        t = self.peek()
        if t.kind == "op" and t.text == "-":
            self.take()
            with self.nested():
                return _linear([(-w, n) for w, n in _terms(self.term())])
        if t.kind == "num":
            self.take()
            w = float(t.text)
            self.expect("*")
            with self.nested():
                return _linear([(w * v, n) for v, n in _terms(self.term())])
        node = self.factor()
        if self.peek().kind == "op" and self.peek().text == "*":
            self.take()
            num = self.peek()
            if num.kind != "num":
                raise self.error("Expected a number after '*'")
            self.take()
            node = _linear([(float(num.text) * v, n) for v, n in _terms(node)])
        return node

    def factor(self) -> Node:
        t = self.peek()
        if t.kind == "op" and t.text == "(":
            self.take()
            with self.nested():
                node = self.expr()
            self.expect(")")
            return node
        if t.kind == "name":
            self.take()
            nxt = self.peek()
            if nxt.kind == "op" and nxt.text == "(" and t.text in FUNCTIONS:
                with self.nested():
                    return self.call(t)
            return Name(t.text, t.pos)
        raise self.error("Expected an adapter name, a number or '('")

    def call(self, fn: Tok) -> Node:
        self.expect("(")
        args: list[Node] = []
        weights: list[float] = []
        params: list[tuple[str, float]] = []
        if fn.text == "merge":
            m = self.peek()
            if m.kind != "name" or m.text not in METHODS:
                raise self.error(f"Expected a merge method ({', '.join(METHODS)})")
            self.take()
            params.append(("method", m.text))  # type: ignore[arg-type]
            while self.peek().kind == "op" and self.peek().text == ",":
                self.take()
                key = self.peek()
                if key.kind == "name" and self.toks[self.i + 1].text == "=":
                    method = METHODS[str(params[0][1])]
                    if method.param(key.text) is None:
                        takes = " or ".join(f"{p.name}=" for p in method.params)
                        raise self.error(f"Unknown parameter for {method.name}"
                                         f" ({f'use {takes}' if takes else 'it takes none'})", key)
                    self.take()
                    self.take()
                    num = self.peek()
                    if num.kind != "num":
                        raise self.error(f"Expected a number for {key.text}")
                    self.take()
                    params.append((key.text, float(num.text)))
                    continue
                if len(params) > 1:
                    raise self.error("Adapters must come before the method's parameters (density=, seed=)")
                node = self.expr()
                w, n = (_terms(node)[0] if isinstance(node, Linear) and len(node.terms) == 1 else (1.0, node))
                args.append(n)
                weights.append(w)
            if not args:
                raise self.error("merge() needs at least one adapter")
        elif fn.text == "compress":
            args.append(self.expr())
            self.expect(",")
            num = self.peek()
            if num.kind != "num" or not float(num.text).is_integer() or float(num.text) < 1:
                raise self.error("Expected the rank to compress to (a whole number of at least 1)")
            self.take()
            params.append(("rank", int(float(num.text))))
        else:
            args.append(self.expr())
            self.expect(",")
            args.append(self.expr())
            if fn.text == "interp":
                self.expect(",")
                neg = 1.0
                if self.peek().text == "-":
                    self.take()
                    neg = -1.0
                num = self.peek()
                if num.kind != "num":
                    raise self.error("Expected the interpolation parameter t (a number)")
                self.take()
                params.append(("t", neg * float(num.text)))
        self.expect(")")
        return Call(fn.text, tuple(args), tuple(weights), tuple(params), fn.pos)


def _terms(node: Node) -> list[tuple[float, Node]]:
    return list(node.terms) if isinstance(node, Linear) else [(1.0, node)]


def _linear(terms: list[tuple[float, Node]]) -> Node:
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return Linear(tuple(terms))


def parse(text: str) -> Node:
    """Parse ``text`` into an AST; raises :class:`ExpressionError` with the position of a syntax error."""
    if not isinstance(text, str):
        raise ExpressionError(f"An expression must be a string, got {type(text).__name__}")
    return _Parser(text).parse()


def leaves(node: Node) -> list[Name]:
    """Every occurrence of a name in an expression, in the order of the text (a name written twice is here
    twice; :func:`names` lists each once). Each has its ``pos`` in the text, for carets."""
    out: dict[int, Name] = {}

    def walk(n: Node) -> None:
        if isinstance(n, Name):
            out.setdefault(n.pos, n)
        elif isinstance(n, Linear):
            for _, c in n.terms:
                walk(c)
        elif isinstance(n, Sides):
            for c in n.sides:
                walk(c)
        else:
            for c in n.args:
                walk(c)

    walk(node)
    return [out[p] for p in sorted(out)]


def names(node: Node) -> list[str]:
    """The adapter names an expression refers to, in order of first appearance."""
    return list(dict.fromkeys(n.name for n in leaves(node)))


def rename(text: str, mapping: Mapping[str, str]) -> str:
    """``text`` with each adapter name replaced by ``mapping[name]`` (names not in it stay), everything else
    (spacing, numbers, calls) as written: e.g. ``0.5*alice/math@v2`` pinned to ``0.5*alice/math@1a2b3c4d5e6f``.

    Raises:
        ExpressionError: ``text`` does not parse, or a new name cannot be written (:func:`format_name`).
    """
    out, last = [], 0
    for leaf in leaves(parse(text)):
        if leaf.name not in mapping:
            continue
        width = len(leaf.name) + 2 if text[leaf.pos] == "`" else len(leaf.name)
        out += [text[last:leaf.pos], format_name(mapping[leaf.name])]
        last = leaf.pos + width
    return "".join(out) + text[last:]


# ------------------------------------------------------------------------------------------------ writer


def format_name(name: str) -> str:
    """``name`` as the parser reads it back: bare when it tokenizes as one name, else in backquotes.

    Raises:
        ExpressionError: the name holds a backquote (or is empty), which no expression can carry.
    """
    if not name or "`" in name:
        raise ExpressionError(f"The adapter name {name!r} cannot be written in an expression "
                              f"({'it is empty' if not name else 'it holds a backquote'}); rename it.")
    try:
        toks = _tokenize(name)
    except ExpressionError:
        toks = []
    if len(toks) == 2 and toks[0].kind == "name" and toks[0].text == name and name not in FUNCTIONS:
        return name
    return f"`{name}`"


_PINNED = re.compile(r"@([0-9a-f]{40})(?![0-9A-Za-z_])")


def short_shas(text: str, keep: int = 10) -> str:
    """``text`` with every pinned commit (``name@<40 hex digits>``) cut to its first ``keep`` digits, for display:
    the store resolves a unique prefix of four or more digits to the same commit, so the short form reads back to
    the same version (recipes keep the full sha)."""
    return _PINNED.sub(lambda m: "@" + m.group(1)[:keep], text)


def format_number(x: float) -> str:
    """The shortest text that reads back as the same float (``0.5``, ``2``, ``1e-05``)."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _term(weight: float, operand: str) -> str:
    mag = abs(float(weight))
    return operand if mag == 1.0 else f"{format_number(mag)}*{operand}"


def format_sum(terms: Sequence[tuple[float, str]]) -> str:
    """``w₁·x₁ + w₂·x₂ − …`` from ``(weight, operand)`` pairs; operands are already written (names through
    :func:`format_name`, sub-expressions in parentheses). Example: ``0.7*a/x + b/y - 0.3*c/z``."""
    out = []
    for i, (w, operand) in enumerate(terms):
        body = _term(w, operand)
        if i == 0:
            out.append(f"-{body}" if w < 0 else body)
        else:
            out.append(f" - {body}" if w < 0 else f" + {body}")
    return "".join(out)


def format_interp(a: str, b: str, t: float) -> str:
    """``interp(a, b, t)`` from written operands."""
    return f"interp({a}, {b}, {format_number(t)})"


def format_compress(a: str, rank: int) -> str:
    """``compress(a, rank)`` from a written operand."""
    return f"compress({a}, {int(rank)})"


def format_parts(sides: Sequence[str]) -> str:
    """``a ; b ; c`` from written expressions (each a whole expression): parts served together on one row."""
    return " ; ".join(sides)


def format_merge(method: str, terms: Sequence[tuple[float, str]], params: Mapping[str, Any] | None = None) -> str:
    """``merge(method, w₁*x₁, w₂*x₂, key=value, ...)`` from ``(weight, operand)`` pairs and the parameters."""
    args = [format_sum([(w, x)]) for w, x in terms]
    args += [f"{k}={format_number(v)}" for k, v in (params or {}).items()]
    return f"merge({method}, {', '.join(args)})"
