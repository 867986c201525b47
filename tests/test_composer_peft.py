"""composer against PEFT itself: saved folders load in PEFT, and the exact operations match PEFT's outputs."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.road.layer import _get_delta_weight

import composer
from tests.helpers import no_key_warnings
from tests.tiny import IDS, peft_logits, random_prompt, random_road, tiny_model


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_saved_folder_loads_in_peft_and_round_trips_bit_for_bit(tmp_path, variant):
    a = random_road(tiny_model(), variant, seed=1)
    composer.save(a, tmp_path / "a")
    b = composer.load(tmp_path / "a")
    assert b.variant == a.variant and b.group_size == a.group_size
    for m in a.theta:
        assert torch.equal(a.theta[m], b.theta[m]) and torch.equal(a.alpha[m], b.alpha[m])
    # PEFT loads it with no key warnings, and from_peft reads back the same numbers
    base = tiny_model()
    with no_key_warnings():
        pm = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    c = composer.from_peft(pm)
    assert set(c.theta) == set(a.theta)
    for m in a.theta:
        assert torch.equal(c.theta[m], a.theta[m]) and torch.equal(c.alpha[m], a.alpha[m])
    # saving twice gives identical bytes
    composer.save(b, tmp_path / "b")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_road1_add_equals_peft_stacking(tmp_path):
    model = tiny_model()
    a, b = random_road(model, "road_1", seed=1), random_road(model, "road_1", seed=2)
    composer.save(a, tmp_path / "a")
    composer.save(b, tmp_path / "b")
    s = composer.add(a, b)
    assert s.recipe.exact and s.recipe.method == "task_arithmetic"
    composer.save(s, tmp_path / "sum")
    stacked = peft_logits([tmp_path / "a", tmp_path / "b"])
    summed = peft_logits([tmp_path / "sum"])
    only_a = peft_logits([tmp_path / "a"])
    assert (stacked - only_a).abs().max() > 1e-3  # b changes the output, so the check below means something
    torch.testing.assert_close(summed, stacked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["add", "compose"])
def test_road_adapters_of_different_modules_add_as_peft_stacks_them(tmp_path, op):
    """A module only one adapter adapts is the identity in the other: add equals PEFT stacking both."""
    model = tiny_model()
    a = random_road(model, "road_1", seed=1, targets=("q_proj", "v_proj"))
    b = random_road(model, "road_1", seed=2, targets=("v_proj", "up_proj"))
    composer.save(a, tmp_path / "a")
    composer.save(b, tmp_path / "b")
    s = getattr(composer, op)(a, b)
    assert s.recipe.exact and set(s.theta) == set(a.theta) | set(b.theta)
    assert s.config["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    composer.save(s, tmp_path / "sum")
    stacked = peft_logits([tmp_path / "a", tmp_path / "b"])
    assert (stacked - peft_logits([tmp_path / "a"])).abs().max() > 1e-3
    torch.testing.assert_close(peft_logits([tmp_path / "sum"]), stacked, atol=1e-5, rtol=1e-5)
    # and the other way round: b's modules first
    torch.testing.assert_close(peft_logits([tmp_path / "sum"]), peft_logits([tmp_path / "b", tmp_path / "a"]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("va,vb", [("road_2", "road_2"), ("road_4", "road_4"), ("road_1", "road_2"),
                                   ("road_2", "road_1"), ("road_4", "road_2")])
def test_compose_is_the_exact_block_product_per_peft(tmp_path, va, vb):
    model = tiny_model()
    a, b = random_road(model, va, seed=3, scale=0.6), random_road(model, vb, seed=4, scale=0.6)
    c = composer.compose(a, b)
    assert c.variant == "road_4" and c.recipe.exact
    g = a.group_size
    for m in a.theta:
        # PEFT's own dense matrices (independent of composer's block code): R_c == R_b @ R_a
        ra = _get_delta_weight(a.variant, g, a.theta[m].double(), a.alpha[m].double())
        rb = _get_delta_weight(b.variant, g, b.theta[m].double(), b.alpha[m].double())
        rc = _get_delta_weight(c.variant, g, c.theta[m].double(), c.alpha[m].double())
        torch.testing.assert_close(rc, rb @ ra, atol=2e-6, rtol=1e-5)
    # and through PEFT end to end: composed == a then b stacked
    composer.save(a, tmp_path / "a")
    composer.save(b, tmp_path / "b")
    composer.save(c, tmp_path / "c")
    if va == vb:  # PEFT stacks adapters of one config type in one model only when variants agree
        torch.testing.assert_close(peft_logits([tmp_path / "c"]), peft_logits([tmp_path / "a", tmp_path / "b"]),
                                   atol=1e-5, rtol=1e-5)


def test_compose_matches_hand_built_2x2_blocks():
    """Independent check with explicit per-pair 2x2 matrices built from the paper's formulas."""
    import math

    model = tiny_model()
    a, b = random_road(model, "road_2", seed=5, scale=0.8), random_road(model, "road_2", seed=6, scale=0.8)
    c = composer.compose(a, b)
    g = a.group_size
    m = next(iter(a.theta))

    def block(adapter, grp, j):
        th, al = adapter.theta[m].tolist(), adapter.alpha[m].tolist()
        i1, i2 = grp * g + j, grp * g + j + g // 2  # element j pairs with j + g/2 in its group
        if adapter.variant == "road_2":
            return [[al[i1] * math.cos(th[i1]), -al[i1] * math.sin(th[i1])],
                    [al[i2] * math.sin(th[i2]), al[i2] * math.cos(th[i2])]]
        # road_4: theta/alpha laid out per group as [first-column g values, second-column g values]
        f = lambda i: al[(i // g) * 2 * g + i % g] * math.cos(th[(i // g) * 2 * g + i % g])  # noqa: E731
        s = lambda i: al[(i // g) * 2 * g + g + i % g] * math.sin(th[(i // g) * 2 * g + g + i % g])  # noqa: E731
        return [[f(i1), -s(i1)], [s(i2), f(i2)]]

    width = a.width(m)
    for grp in range(width // g):
        for j in range(g // 2):
            A, B, C = block(a, grp, j), block(b, grp, j), block(c, grp, j)
            BA = [[sum(B[r][k] * A[k][col] for k in range(2)) for col in range(2)] for r in range(2)]
            for r in range(2):
                for col in range(2):
                    assert abs(C[r][col] - BA[r][col]) < 1e-5


def test_composed_prompt_vector_loads_in_peft_as_init_plus_weighted_tau(tmp_path):
    p1, p2 = random_prompt(seed=1), random_prompt(seed=2)
    mix = composer.merge([p1, p2], [0.7, -0.4])
    composer.save(mix, tmp_path / "mix")
    base = tiny_model()
    with no_key_warnings():
        pm = PeftModel.from_pretrained(base, str(tmp_path / "mix"))
    loaded = pm.get_prompt_embedding_to_save("default")
    expected = p1.init + 0.7 * p1.vector - 0.4 * p2.vector
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=1e-6)
    back = composer.load(tmp_path / "mix")
    assert torch.equal(back.init, mix.init) and torch.equal(back.vector, mix.vector)
    assert torch.equal(back.prompt, mix.prompt)
    assert back.recipe.weights == (0.7, -0.4)


def test_init_road_starts_from_composition_and_trains():
    model = tiny_model()
    a, b = random_road(model, "road_1", seed=1), random_road(model, "road_1", seed=2)
    start = composer.add(a, b)
    pm = composer.init(tiny_model(), start)
    got = composer.from_peft(pm)
    for m in start.theta:
        assert torch.equal(got.theta[m], start.theta[m]) and torch.equal(got.alpha[m], start.alpha[m])
    params = [p for p in pm.parameters() if p.requires_grad]
    assert params and all("road_" in n for n, p in pm.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.1)
    loss = pm(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    after = composer.from_peft(pm)
    assert any(not torch.equal(after.theta[m], start.theta[m]) for m in start.theta)


def test_init_prompt_from_expression_trains_and_keeps_origin(tmp_path):
    p1, p2 = random_prompt(seed=1), random_prompt(seed=2)
    composer.save(p1, tmp_path / "p1")
    composer.save(p2, tmp_path / "p2")
    pm = composer.init(tiny_model(), f"{tmp_path / 'p1'} + {tmp_path / 'p2'}")
    w = pm.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(w.detach(), p1.init + p1.vector + p2.vector)
    assert w.requires_grad
    opt = torch.optim.SGD([w], lr=0.5)
    pm(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    trained = composer.from_peft(pm)
    assert torch.equal(trained.init, p1.init)  # τ stays relative to the origin P0
    assert not torch.allclose(trained.prompt, p1.init + p1.vector + p2.vector)
