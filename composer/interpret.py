"""The interpreter of the expression grammar (:mod:`composer.expr` parses and writes; this evaluates): each
name resolved once, each node mapped to an operation of :mod:`composer.ops`, the recipe pinned to the inputs.

Not called ``evaluate.py``: a submodule of that name would replace the function ``composer.evaluate`` on the
package as soon as it is imported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import ops
from .adapters import Adapter
from .errors import ComposerError, ExpressionError, InvalidArgumentError, NotComposableError
from .expr import Linear, Name, Node, Sides, names, parse
from .parts import Parts, combine, load_any, refusal
from .text import shown


def evaluate(expression: str, resolve: Callable[[str], Adapter] | None = None) -> Adapter | Parts:
    """Evaluate an expression over named adapters.

    Args:
        expression: e.g. ``"0.7*a + 0.3*b - c"``, ``"interp(a, b, 0.25)"``, ``"merge(ties, a, b, density=0.5)"``,
            or sides joined by ``;`` (``"a + b ; c"``: parts served together on one row).
        resolve: maps a name to an adapter, or to a recipe of parts (default: :func:`composer.load_any` of a
            folder path). Each name is resolved once. The adapter's ``source`` pins it in the recipe.

    Returns:
        The resulting adapter, whose recipe holds ``expression`` and each input's name and pinned ref; for sides
        joined by ``;``, a :class:`composer.Parts` of each side's result (each side's recipe its own text and
        inputs, the whole recipe the whole expression, method ``"parts"``).

    Raises:
        ExpressionError: syntax errors (with position), names that cannot be resolved, and a recipe of parts named
            inside arithmetic (it is served as it is).
        IncompatibleAdaptersError, NotComposableError: from the arithmetic, or sides the engine does not serve
            together on one row (:func:`composer.parts.check`).
    """
    tree = parse(expression)
    resolver = resolve or load_any
    cache: dict[str, Adapter] = {}

    def leaf(n: Name) -> Adapter:
        if n.name not in cache:
            try:
                a = resolver(n.name)
            except (ComposerError, LookupError, OSError, ValueError) as e:
                if isinstance(e, ExpressionError):
                    raise
                hint = _subtraction_hint(n.name, resolver)
                raise ExpressionError(f"Cannot resolve '{shown(n.name)}': {hint}{e}", expression=expression,
                                      position=n.pos) from e
            cache[n.name] = replace(a, source=a.source or n.name)
        return cache[n.name]

    def operand(n: Node) -> Adapter:
        """``n``'s value where one adapter is needed: a recipe of parts named here is refused at its name."""
        value = ev(n)
        if isinstance(value, Parts):
            raise ExpressionError(str(refusal(value)), expression=expression, position=getattr(n, "pos", None))
        return value

    def ev(n: Node) -> Adapter:
        if isinstance(n, Name):
            return leaf(n)
        if isinstance(n, Linear):
            operands = [operand(c) for _, c in n.terms]
            weights = [w for w, _ in n.terms]
            if len(operands) == 1:
                w = weights[0]
                return ops.negate(operands[0]) if w == -1.0 else ops.scale(operands[0], w)
            return ops.linear(operands, weights)
        p = dict(n.params)
        if n.fn == "interp":
            return ops.interpolate(operand(n.args[0]), operand(n.args[1]), float(p["t"]))
        if n.fn == "compose":
            return ops.compose(operand(n.args[0]), operand(n.args[1]))
        if n.fn == "compress":
            return ops.compress(operand(n.args[0]), rank=int(p["rank"]))
        method = str(p.pop("method"))
        try:
            return ops.merge([operand(c) for c in n.args], list(n.weights), method=method, **p)
        except ExpressionError:
            raise
        except InvalidArgumentError as e:
            raise ExpressionError(str(e), expression=expression, position=n.pos) from e

    def pinned(result: Any, text: str, node: Node) -> Any:
        if result.recipe is None:
            return result  # a bare name: the adapter itself
        inputs = tuple({"name": nm, "ref": cache[nm].source or nm} for nm in names(node))
        return replace(result, recipe=replace(result.recipe, expression=text.strip(), inputs=inputs))

    if isinstance(tree, Sides):
        texts = [expression[a:b].strip() for a, b in tree.spans]
        values = [pinned(ev(side), text, side) for side, text in zip(tree.sides, texts)]
        try:
            result = combine(values, [f"'{shown(t)}'" for t in texts], expression=expression.strip())
        except NotComposableError as e:
            raise NotComposableError(f"Cannot serve these sides together on one row: {e}") from e
        return pinned(result, expression, tree)
    return pinned(ev(tree), expression, tree)


def _subtraction_hint(name: str, resolve: Callable[[str], Any]) -> str:
    """For ``a/x-b/y``, a name that does not resolve while ``a/x`` and ``b/y`` do: the subtraction it likely
    meant (a ``-`` with no spaces around it is part of a name, as ids may hold one)."""
    for i, c in enumerate(name):
        if c != "-" or i == 0:
            continue
        left, right = name[:i], name[i + 1:]
        try:
            resolve(left)
            resolve(right)
        except (ComposerError, LookupError, OSError, ValueError):
            continue
        return (f"did you mean '{shown(left)} - {shown(right)}'? A '-' with no spaces around it is part of "
                "the name; put spaces around it to subtract. ")
    return ""
