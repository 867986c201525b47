"""The algebra: exact identities for road_1 and prompts, honest deviations for road_2/road_4, merge methods."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.tuners.road.layer import _get_delta_weight

import composer
from composer import PromptVector, RoadAdapter
from composer.road_math import num_values

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def road_pair(draw, variant="road_1"):
    g = draw(st.sampled_from([2, 4, 8]))
    groups = draw(st.integers(1, 3))
    n_mod = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    per = num_values(variant, g * groups)  # a layer of `groups` groups

    def one(i):
        theta = {f"model.layers.{k}.mlp.up_proj": torch.randn(per, generator=gen) for k in range(n_mod)}
        alpha = {m: torch.exp(torch.randn(per, generator=gen) * 0.3) for m in theta}
        return RoadAdapter(variant, g, theta, alpha, config={"base_model_name_or_path": "m"}, source=f"x{i}")

    return one(0), one(1)


@st.composite
def prompt_pair(draw):
    n, d = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    init = torch.randn(n, d, generator=gen)
    cfg = {"num_virtual_tokens": n, "token_dim": d}
    return (PromptVector.from_parts(init, torch.randn(n, d, generator=gen), cfg, source="p"),
            PromptVector.from_parts(init, torch.randn(n, d, generator=gen), cfg, source="q"))


def assert_road_close(x: RoadAdapter, y: RoadAdapter, tol=1e-5):
    for m in x.theta:
        # compare as complex numbers / blocks so that θ and θ+2π count as equal
        bx = _get_delta_weight(x.variant, x.group_size, x.theta[m].double(), x.alpha[m].double())
        by = _get_delta_weight(y.variant, y.group_size, y.theta[m].double(), y.alpha[m].double())
        torch.testing.assert_close(bx, by, atol=tol, rtol=tol)


@SETTINGS
@given(road_pair())
def test_road1_add_is_sequential_application(pair):
    a, b = pair
    s = composer.add(a, b)
    assert s.recipe.exact and s.deviation is None
    for m in a.theta:
        ra = _get_delta_weight("road_1", a.group_size, a.theta[m].double(), a.alpha[m].double())
        rb = _get_delta_weight("road_1", a.group_size, b.theta[m].double(), b.alpha[m].double())
        rs = _get_delta_weight("road_1", a.group_size, s.theta[m].double(), s.alpha[m].double())
        torch.testing.assert_close(rs, rb @ ra, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rs, ra @ rb, atol=1e-5, rtol=1e-5)  # and they commute


@SETTINGS
@given(road_pair())
def test_road1_sub_add_negate_scale_identities(pair):
    a, b = pair
    assert_road_close(composer.sub(composer.add(a, b), b), a)
    ident = composer.add(composer.negate(a), a)
    for m in a.theta:
        torch.testing.assert_close(ident.theta[m], torch.zeros_like(a.theta[m]), atol=1e-6, rtol=0)
        torch.testing.assert_close(ident.alpha[m], torch.ones_like(a.alpha[m]), atol=1e-6, rtol=1e-6)
    assert_road_close(composer.scale(a, 2.0), composer.add(a, a))
    assert_road_close(composer.scale(a, -1.0), composer.negate(a))


@SETTINGS
@given(road_pair(), st.floats(0.01, 0.99))
def test_interpolate_endpoints_exact_and_geodesic(pair, t):
    a, b = pair
    for end, tt in ((a, 0.0), (b, 1.0)):
        r = composer.interpolate(a, b, tt)
        for m in a.theta:
            assert torch.equal(r.theta[m], end.theta[m]) and torch.equal(r.alpha[m], end.alpha[m])
    mid = composer.interpolate(a, b, t)
    for m in a.theta:
        torch.testing.assert_close(mid.theta[m], (1 - t) * a.theta[m] + t * b.theta[m], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mid.alpha[m], a.alpha[m] ** (1 - t) * b.alpha[m] ** t, atol=1e-6, rtol=1e-5)


@SETTINGS
@given(prompt_pair(), st.floats(-2, 2), st.floats(-2, 2))
def test_prompt_tau_arithmetic(pair, wa, wb):
    a, b = pair
    r = composer.merge([a, b], [wa, wb])
    torch.testing.assert_close(r.vector, wa * a.vector + wb * b.vector, atol=1e-5, rtol=1e-5)
    assert torch.equal(r.prompt, r.init + r.vector) and torch.equal(r.init, a.init)
    torch.testing.assert_close(composer.sub(composer.add(a, b), b).vector, a.vector, atol=1e-5, rtol=1e-5)
    for end, tt in ((a, 0.0), (b, 1.0)):
        e = composer.interpolate(a, b, tt)
        assert torch.equal(e.prompt, end.prompt) and torch.equal(e.vector, end.vector)


@SETTINGS
@given(road_pair("road_2"))
def test_road2_arithmetic_reports_its_deviation(pair):
    a, b = pair
    s = composer.add(a, b)
    assert not s.recipe.exact and s.deviation is not None
    exact = composer.compose(a, b)
    num = den = 0.0
    for m in a.theta:
        rs = _get_delta_weight("road_2", a.group_size, s.theta[m].double(), s.alpha[m].double())
        re = _get_delta_weight("road_4", a.group_size, exact.theta[m].double(), exact.alpha[m].double())
        num += float(((rs - re) ** 2).sum())
        den += float((re ** 2).sum())
    assert s.deviation == pytest.approx(math.sqrt(num / den), rel=1e-4, abs=1e-9)


def test_road2_deviation_is_zero_when_blocks_commute():
    # road_1 adapters written as road_2 (both rows of a pair share θ, α) commute, so add is exact again.
    from composer.road_math import promote

    gen = torch.Generator().manual_seed(0)
    def r2(seed):
        th, al = torch.randn(8, generator=gen), torch.exp(torch.randn(8, generator=gen) * 0.2)
        th2, al2 = promote("road_1", 4, th, al, "road_2")
        return RoadAdapter("road_2", 4, {"m.q_proj": th2}, {"m.q_proj": al2})
    s = composer.add(r2(0), r2(1))
    assert s.deviation < 1e-6


def test_negative_scales_are_handled_exactly():
    a = RoadAdapter("road_1", 2, {"m.q_proj": torch.tensor([0.3, -1.0])}, {"m.q_proj": torch.tensor([-2.0, 0.5])})
    b = RoadAdapter("road_1", 2, {"m.q_proj": torch.tensor([0.1, 0.2])}, {"m.q_proj": torch.tensor([1.5, -3.0])})
    assert_road_close(composer.add(a, b), composer.compose(a, b))
    zero = RoadAdapter("road_1", 2, {"m.q_proj": torch.tensor([0.3, 0.1])}, {"m.q_proj": torch.tensor([0.0, 1.0])})
    with pytest.raises(composer.InvalidValueError, match="m.q_proj.road_alpha"):
        composer.add(zero, b)


# -------------------------------------------------------------------------- merge methods, worked by hand

T1 = [1.0, -2.0, 0.5, 0.0]
T2 = [-3.0, 1.0, 0.2, 4.0]


def prompts(*vectors):
    cfg = {"num_virtual_tokens": 1, "token_dim": len(vectors[0])}
    return [PromptVector.from_parts(torch.zeros(1, len(v)), torch.tensor([v]), cfg, source=f"t{i}")
            for i, v in enumerate(vectors)]


def roads(*thetas):
    return [RoadAdapter("road_1", 2 * len(t), {"m.q_proj": torch.tensor(t)}, {"m.q_proj": torch.ones(len(t))},
                        source=f"t{i}") for i, t in enumerate(thetas)]


def test_ties_by_hand():
    # trim to density 0.5 (top-2 magnitudes): t1 -> [1, -2, 0, 0], t2 -> [-3, 0, 0, 4]
    # elect sign from the sum [-2, -2, 0, 4] -> [-, -, +, +]; keep agreeing entries: t1 [_, -2, _, _], t2 [-3, _, _, 4]
    # weighted (1, 0.5) disjoint mean: [-1.5, -2, 0, 2]
    expected = torch.tensor([-1.5, -2.0, 0.0, 2.0])
    p = composer.merge(prompts(T1, T2), [1.0, 0.5], method="ties", density=0.5)
    torch.testing.assert_close(p.vector[0], expected)
    assert p.recipe.method == "ties" and p.recipe.params == {"density": 0.5} and not p.recipe.exact
    r = composer.merge(roads(T1, T2), [1.0, 0.5], method="ties", density=0.5)
    torch.testing.assert_close(r.theta["m.q_proj"], expected)
    torch.testing.assert_close(r.alpha["m.q_proj"], torch.ones(4))  # log α = 0 everywhere stays 0


def test_dare_by_hand_with_fixed_seed():
    # disjoint supports, so every output entry is either dropped (0) or w·t/density
    a = [1.0, 0.0, -2.0, 0.0, 3.0, 0.0, 0.5, 0.0]
    b = [0.0, 4.0, 0.0, -1.0, 0.0, 2.0, 0.0, -6.0]
    w, d, seed = [0.5, 2.0], 0.5, 7
    # the drop masks: PEFT draws one Bernoulli(density) mask per task tensor, in order, from torch's RNG
    # (composer runs the merge in float64, so the masks are drawn in float64)
    torch.manual_seed(seed)
    ma = torch.bernoulli(torch.full((1, 8), d, dtype=torch.float64)).float()
    mb = torch.bernoulli(torch.full((1, 8), d, dtype=torch.float64)).float()
    expected = (w[0] * torch.tensor([a]) * ma + w[1] * torch.tensor([b]) * mb) / d
    lin = composer.merge(prompts(a, b), w, method="dare_linear", density=d, seed=seed)
    torch.testing.assert_close(lin.vector, expected)
    ties = composer.merge(prompts(a, b), w, method="dare_ties", density=d, seed=seed)
    torch.testing.assert_close(ties.vector, expected)  # no sign conflicts on disjoint supports
    again = composer.merge(prompts(a, b), w, method="dare_linear", density=d, seed=seed)
    assert torch.equal(again.vector, lin.vector)  # reproducible from its recipe
    assert lin.recipe.params == {"density": 0.5, "seed": 7}
    # dropping changes something, and at least one entry survives (the mask is not degenerate)
    assert 0 < int((lin.vector != 0).sum()) < 8


def test_merge_validates_arguments():
    ps = prompts(T1, T2)
    with pytest.raises(ValueError, match="density"):
        composer.merge(ps, method="ties")
    with pytest.raises(ValueError, match="Unknown merge method 'nope'"):
        composer.merge(ps, method="nope")
    with pytest.raises(ValueError, match="one weight per adapter"):
        composer.merge(ps, [1.0])
    with pytest.raises(composer.InvalidValueError, match="not finite"):
        composer.merge(ps, [float("nan"), 1.0])
