"""Blueprint kinds, the registry and batched evaluation."""

from __future__ import annotations

import pytest
import torch

from kasmina.blueprints import (
    DEFAULT_BLUEPRINTS,
    BlueprintRegistry,
    LowRankBlueprint,
    MLPBlueprint,
    ResidualLinearBlueprint,
    SeedBlueprint,
    evaluate_group,
)


def test_default_registry_names_and_ids() -> None:
    assert DEFAULT_BLUEPRINTS.names == {"mlp": 1, "low_rank": 2, "residual_linear": 3}
    assert DEFAULT_BLUEPRINTS.resolve("low_rank") == 2 and DEFAULT_BLUEPRINTS.resolve(3) == 3
    assert isinstance(DEFAULT_BLUEPRINTS["mlp"], MLPBlueprint) and isinstance(DEFAULT_BLUEPRINTS[1], MLPBlueprint)


@pytest.mark.parametrize("key", ["conv", 0, 7, True])
def test_unknown_blueprint_is_named(key) -> None:
    with pytest.raises(KeyError, match="unknown blueprint"):
        DEFAULT_BLUEPRINTS.resolve(key)


def test_registry_refuses_duplicates_and_bad_ids() -> None:
    reg = BlueprintRegistry({5: MLPBlueprint()})
    with pytest.raises(ValueError, match="already registered"):
        reg.register(5, LowRankBlueprint())
    with pytest.raises(ValueError, match="named 'mlp'"):
        reg.register(6, MLPBlueprint(hidden_ratio=1.0))
    with pytest.raises(ValueError, match="blueprint id -1"):
        reg.register(-1, LowRankBlueprint())
    with pytest.raises(ValueError, match="hidden_ratio=0"):
        MLPBlueprint(hidden_ratio=0)
    with pytest.raises(ValueError, match="rank=0"):
        LowRankBlueprint(rank=0)


@pytest.mark.parametrize("kind", [LowRankBlueprint(), ResidualLinearBlueprint()])
def test_residual_kinds_start_as_the_identity(kind) -> None:
    bp = SeedBlueprint(kind, 1, 6)
    x = torch.randn(5, 6)
    torch.testing.assert_close(bp(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("kind", [MLPBlueprint(), LowRankBlueprint(rank=2), ResidualLinearBlueprint()])
def test_group_evaluation_equals_each_seed_alone(kind) -> None:
    torch.manual_seed(0)
    seeds = [SeedBlueprint(kind, 1, 5) for _ in range(4)]
    with torch.no_grad():
        for bp in seeds:  # make the residual kinds non-trivial
            for p in bp.parameters():
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 7, 5)
    names = [n for n, _ in seeds[0].named_parameters()]
    out, finite = evaluate_group(kind, {n: [getattr(bp, n) for bp in seeds] for n in names}, x)
    assert finite.all()
    expected = torch.stack([bp(x[k]) for k, bp in enumerate(seeds)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # Each seed's gradient reaches only its own parameters.
    out[2].sum().backward()
    for k, bp in enumerate(seeds):
        grads = [p.grad for p in bp.parameters()]
        assert all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads) == (k == 2)


def test_non_finite_parameters_are_evaluated_as_zero_and_flagged() -> None:
    kind = MLPBlueprint()
    seeds = [SeedBlueprint(kind, 1, 3) for _ in range(2)]
    with torch.no_grad():
        seeds[1].w2[0, 0] = float("nan")
    x = torch.randn(2, 4, 3, requires_grad=True)
    out, finite = evaluate_group(kind, {n: [getattr(s, n) for s in seeds] for n in ("w1", "b1", "w2", "b2")}, x)
    assert finite.tolist() == [True, False]
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].eq(0).all()


def test_mlp_shapes_and_flops() -> None:
    kind = MLPBlueprint(hidden_ratio=1.5)
    params = kind.init(4)
    assert params["w1"].shape == (4, 6) and params["w2"].shape == (6, 4)
    assert kind.flops_per_row(4) == 4 * 4 * 6
    assert LowRankBlueprint(rank=8).init(3)["a"].shape == (3, 3)
