"""Expressions: the grammar, positions in syntax errors, and recipes that pin inputs."""

from __future__ import annotations

import json

import pytest
import torch

import composer
from composer import ExpressionError
from tests.tiny import random_road, tiny_model


@pytest.fixture(scope="module")
def named():
    model = tiny_model()
    return {"alice/math@v2": random_road(model, seed=1), "alice/code": random_road(model, seed=2),
            "bob/toxic-v2": random_road(model, seed=3)}


def resolver(named):
    def resolve(name):
        if name not in named:
            raise LookupError(f"no adapter named {name!r}")
        a = named[name]
        return composer.RoadAdapter(a.variant, a.group_size, a.theta, a.alpha, a.config,
                                    source=f"{name.split('@')[0]}@deadbeef")
    return resolve


def test_linear_expression_is_one_weighted_merge(named):
    r = composer.evaluate("0.7*alice/math@v2 + 0.7*alice/code - 0.3*bob/toxic-v2", resolve=resolver(named))
    ref = composer.merge([named["alice/math@v2"], named["alice/code"], named["bob/toxic-v2"]], [0.7, 0.7, -0.3])
    for m in ref.theta:
        assert torch.equal(r.theta[m], ref.theta[m]) and torch.equal(r.alpha[m], ref.alpha[m])
    rec = r.recipe.to_dict()
    assert rec["expression"] == "0.7*alice/math@v2 + 0.7*alice/code - 0.3*bob/toxic-v2"
    assert rec["weights"] == [0.7, 0.7, -0.3] and rec["method"] == "task_arithmetic" and rec["exact"]
    assert [i["ref"] for i in rec["inputs"]] == ["alice/math@deadbeef", "alice/code@deadbeef", "bob/toxic-v2@deadbeef"]
    json.dumps(rec)


def test_calls_and_nesting(named):
    res = resolver(named)
    a, b = res("alice/math@v2"), res("alice/code")
    got = composer.evaluate("interp(alice/math@v2, alice/code, 0.25)", resolve=res)
    exp = composer.interpolate(a, b, 0.25)
    assert all(torch.equal(got.theta[m], exp.theta[m]) for m in a.theta)
    assert got.recipe.params == {"t": 0.25}
    got = composer.evaluate("merge(ties, 0.6*alice/math@v2, 0.4*alice/code, density=0.5)", resolve=res)
    exp = composer.merge([a, b], [0.6, 0.4], method="ties", density=0.5)
    assert all(torch.equal(got.theta[m], exp.theta[m]) for m in a.theta)
    got = composer.evaluate("0.5*(alice/math@v2 + alice/code) - -alice/code", resolve=res)
    exp = composer.merge([a, b, b], [0.5, 0.5, 1.0])
    assert all(torch.allclose(got.theta[m], exp.theta[m]) for m in a.theta)
    got = composer.evaluate("compose(alice/math@v2, `alice/code`)", resolve=res)
    assert got.recipe.method == "compose"
    assert composer.evaluate("alice/code", resolve=res).recipe is None  # a bare name is the adapter itself


def test_folder_names_resolve_by_default(tmp_path, named):
    composer.save(named["alice/code"], tmp_path / "code")
    r = composer.evaluate(f"2*{tmp_path / 'code'}")
    assert r.recipe.inputs[0]["ref"] == str(tmp_path / "code")


@pytest.mark.parametrize("text,pos", [
    ("0.7*a + * b", 8), ("a +", 3), ("a $ b", 2), ("interp(a, b)", 11), ("merge(avg, a, b)", 6),
    ("(a + b", 6), ("", 0), ("a * b", 4), ("`a", 0),
])
def test_syntax_errors_carry_position(text, pos):
    with pytest.raises(ExpressionError) as e:
        composer.parse(text)
    assert e.value.position == pos
    assert "^" in str(e.value) or not text


def test_unknown_name_points_at_it(named):
    with pytest.raises(ExpressionError, match="Cannot resolve 'nobody/x'") as e:
        composer.evaluate("alice/code + nobody/x", resolve=resolver(named))
    assert e.value.position == 13


@pytest.mark.parametrize("text,mapping,expected", [
    ("0.5*alice/math@v2 + bob/code", {"alice/math@v2": "alice/math@1a2b"}, "0.5*alice/math@1a2b + bob/code"),
    ("a/x - 0.3*a/x", {"a/x": "a/x@v1"}, "a/x@v1 - 0.3*a/x@v1"),  # every occurrence
    ("merge(ties, `my dir/x`, b/y, density=0.5)", {"my dir/x": "c/z", "b/y": "two words"},
     "merge(ties, c/z, `two words`, density=0.5)"),  # backquotes off and on as the new name needs
    ("interp( a/x ,b/y,0.25 )", {"b/y": "b/y@v3"}, "interp( a/x ,b/y@v3,0.25 )"),  # the rest as written
])
def test_rename_replaces_names_and_keeps_the_rest(text, mapping, expected):
    from composer.expr import leaves, names, rename

    assert rename(text, mapping) == expected
    assert names(composer.parse(expected)) == list(dict.fromkeys(mapping.get(n, n) for n in
                                                                 names(composer.parse(text))))
    assert [n.pos for n in leaves(composer.parse(text))] == sorted(n.pos for n in leaves(composer.parse(text)))
