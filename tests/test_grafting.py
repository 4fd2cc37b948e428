"""Grafting strategies: each formula against hand-computed values, batching, state."""

from __future__ import annotations

import math

import pytest
import torch

from kasmina._generated.lifecycle_tables import GRAFTING_STRATEGY_NAMES
from kasmina.grafting import (
    GRAFTING_STRATEGIES,
    AdaptiveConfig,
    AdaptiveGrafting,
    DriftControlledConfig,
    DriftControlledGrafting,
    GraftingConfig,
    GraftingContext,
    LinearGrafting,
    MomentumConfig,
    MomentumGrafting,
    StabilityConfig,
    StabilityGrafting,
    create_strategy,
    strategy_class,
    strategy_id,
)

NAN = float("nan")


def ctx(ids, epochs, alpha, **metrics) -> GraftingContext:
    return GraftingContext(torch.tensor(ids), torch.tensor(epochs, dtype=torch.float32), alpha, **metrics)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


# ---- registry ---------------------------------------------------------------------


def test_every_spec_strategy_is_registered_under_its_spec_id() -> None:
    assert set(GRAFTING_STRATEGIES) == set(GRAFTING_STRATEGY_NAMES)
    for index, name in enumerate(GRAFTING_STRATEGY_NAMES):
        cls = strategy_class(name)
        assert cls is strategy_class(index) is GRAFTING_STRATEGIES[name]
        assert cls.name == name and strategy_id(name) == index
        assert create_strategy(index, 4).strategy_id == index


@pytest.mark.parametrize("key", ["nope", 99, -1, True, 1.0])
def test_unknown_strategy_is_refused_with_its_name(key) -> None:
    with pytest.raises((KeyError, TypeError), match=str(key) if not isinstance(key, bool) else "True"):
        strategy_class(key)


def test_configs_default_to_the_reference_values() -> None:
    a = AdaptiveConfig()
    assert (a.ramp_epochs, a.drift_threshold, a.pause_epochs, a.momentum, a.abort_error_rate) == (50, 0.01, 10, 0.1, 0.5)
    s = StabilityConfig()
    bounds = (s.max_loss_variance, s.max_gradient_norm, s.max_accuracy_variance)
    assert (s.window, *bounds, s.revert_after) == (5, 0.1, 10.0, 0.05, 3)


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda: GraftingConfig(ramp_epochs=0), "ramp_epochs=0"),
        (lambda: DriftControlledConfig(pause_epochs=0), "pause_epochs=0"),
        (lambda: DriftControlledConfig(drift_threshold=-1.0), "drift_threshold=-1.0"),
        (lambda: MomentumConfig(momentum=1.5), "momentum=1.5"),
        (lambda: StabilityConfig(window=0), "window=0"),
        (lambda: StabilityConfig(slow_factor=0.0), "slow_factor=0.0"),
        (lambda: AdaptiveConfig(score_decay=1.0), "score_decay=1.0"),
        (lambda: GraftingConfig(ramp_epochs=True), "ramp_epochs=True"),
        (lambda: DriftControlledConfig(pause_epochs=True), "pause_epochs=True"),
        (lambda: StabilityConfig(window=True), "window=True"),
        (lambda: StabilityConfig(revert_after=True), "revert_after=True"),
        (lambda: MomentumConfig(velocity_scale=math.inf), "velocity_scale=inf"),
        (lambda: StabilityConfig(max_loss_variance=math.nan), "max_loss_variance=nan"),
        (lambda: StabilityConfig(max_gradient_norm=-1.0), "max_gradient_norm=-1.0"),
    ],
)
def test_bad_config_values_are_named(make, bad) -> None:
    with pytest.raises(ValueError, match=bad):
        make()


def test_wrong_config_type_and_bad_num_seeds_are_refused() -> None:
    with pytest.raises(TypeError, match="DriftControlledConfig"):
        DriftControlledGrafting(4, MomentumConfig())
    with pytest.raises(ValueError, match="num_seeds=0"):
        LinearGrafting(0)


# ---- context ----------------------------------------------------------------------


def test_context_refuses_repeated_seed_ids() -> None:
    with pytest.raises(ValueError, match="seed_ids must not repeat, got seed 3 twice"):
        ctx([1, 3, 2, 3], [1, 1, 1, 1], 0.0)


def test_context_broadcasts_numbers_and_rejects_bad_shapes() -> None:
    c = GraftingContext([3, 5], 4, [0.1, 0.2], performance_delta=0.5)
    assert c.epochs_in_state.tolist() == [4.0, 4.0] and c.performance_delta.tolist() == [0.5, 0.5]
    assert torch.isnan(c.metric("error_rate")).all()
    with pytest.raises(ValueError, match="current_alpha must have shape"):
        GraftingContext([3, 5], 4, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="seed_ids must be a 1-D integer"):
        GraftingContext([0.5], 4, 0.0)
    with pytest.raises(ValueError, match="watched must have shape"):
        GraftingContext([3, 5], 4, 0.0, watched=torch.zeros(3, 2))
    with pytest.raises(KeyError, match="unknown grafting metric"):
        c.metric("nonsense")


def test_out_of_range_seed_is_named_and_changes_nothing() -> None:
    s = MomentumGrafting(4)
    with pytest.raises(ValueError, match="seed id 4 is out of range"):
        s.compute_alpha(ctx([1, 4], [1, 1], 0.0, performance_delta=1.0))
    assert s.velocity.eq(0).all()
    with pytest.raises(ValueError, match="seed id -1"):
        s.reset([-1])


# ---- Linear -----------------------------------------------------------------------


def test_linear_is_epoch_over_ramp_clipped() -> None:
    s = LinearGrafting(8)
    close(s.compute_alpha(ctx([0, 1, 2, 3, 4], [0, 10, 25, 50, 60], 0.0)), [0.0, 0.2, 0.5, 1.0, 1.0])
    # A ramp's end is exactly 1.0, so GRAFTING can end at alpha 1.
    assert s.compute_alpha(ctx([0], [50], 0.0)).item() == 1.0


# ---- DriftControlled ---------------------------------------------------------------


def test_drift_pause_holds_the_current_alpha_for_pause_epochs_then_resumes_from_it() -> None:
    s = DriftControlledGrafting(2, DriftControlledConfig(ramp_epochs=10, drift_threshold=0.1, pause_epochs=3))
    steady = torch.tensor([[1.0, 0.0]])
    alpha = 0.0
    outputs = []
    watched = [steady, steady, torch.tensor([[2.0, 0.0]]), None, None, None, None]
    for epoch, w in enumerate(watched, start=1):
        alpha = s.compute_alpha(ctx([1], [epoch], [alpha], watched=w)).item()
        outputs.append(alpha)
    # epochs 1-2 ramp; epoch 3 drift = |2-1|/1 = 1 > 0.1 -> hold 0.2 for 3 epochs (3, 4, 5);
    # epoch 6 resumes one ramp step above the held alpha, not at the schedule's 0.6.
    assert outputs == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.4])
    # The EMA moved 10% towards the drifted weights at epoch 3.
    torch.testing.assert_close(s.ema[1], torch.tensor([1.1, 0.0]))


def test_drift_pause_returns_the_real_current_alpha_not_zero() -> None:
    s = DriftControlledGrafting(2, DriftControlledConfig(ramp_epochs=10, drift_threshold=0.1))
    s.compute_alpha(ctx([0, 1], [1, 1], 0.0, watched=torch.ones(2, 3)))
    out = s.compute_alpha(ctx([0, 1], [2, 2], [0.37, 0.1], watched=torch.tensor([[5.0, 5, 5], [1, 1, 1]])))
    close(out, [0.37, 0.2])  # seed 0 drifted: holds its own alpha; seed 1 ramps on
    assert s.pause_left.tolist() == [9, 0]


def test_drift_of_zero_ema_and_first_call() -> None:
    s = DriftControlledGrafting(3, DriftControlledConfig(ramp_epochs=10, drift_threshold=0.1))
    # First call: ema = w, drift 0 even for zero weights.
    close(s.compute_alpha(ctx([0, 1], [1, 1], 0.0, watched=torch.zeros(2, 2))), [0.1, 0.1])
    # Zero EMA, non-zero weights: unbounded drift -> pause; zero weights stay at drift 0.
    out = s.compute_alpha(ctx([0, 1], [2, 2], [0.1, 0.1], watched=torch.tensor([[1.0, 0.0], [0.0, 0.0]])))
    close(out, [0.1, 0.2])


def test_drift_width_is_fixed_by_the_first_call() -> None:
    s = DriftControlledGrafting(2)
    s.compute_alpha(ctx([0], [1], 0.0, watched=torch.ones(1, 4)))
    with pytest.raises(ValueError, match="width 3"):
        s.compute_alpha(ctx([0], [2], 0.0, watched=torch.ones(1, 3)))


# ---- Momentum ---------------------------------------------------------------------


def test_momentum_velocity_and_monotone_floor() -> None:
    s = MomentumGrafting(4)  # ramp 50, momentum 0.1, scale 0.01
    # v = 0.01*0.5 = 0.005 -> 10/50 + 0.005
    close(s.compute_alpha(ctx([2], [10], [0.18], performance_delta=[0.5])), [0.205])
    # v = 0.1*0.005 + 0.01*(-2) = -0.0195 -> 0.22 - 0.0195 = 0.2005 < current 0.205 -> floor
    close(s.compute_alpha(ctx([2], [11], [0.205], performance_delta=[-2.0])), [0.205])
    # v = 0.1*(-0.0195) = -0.00195 -> 0.24 - 0.00195
    close(s.compute_alpha(ctx([2], [12], [0.205], performance_delta=[0.0])), [0.23805])
    assert s.velocity[2].item() == pytest.approx(-0.00195)
    assert s.velocity[[0, 1, 3]].eq(0).all()


def test_momentum_unknown_delta_pushes_nothing() -> None:
    s = MomentumGrafting(2)
    close(s.compute_alpha(ctx([0, 1], [10, 10], 0.0, performance_delta=[NAN, 1.0])), [0.2, 0.21])
    assert not torch.isnan(s.velocity).any()


@pytest.mark.parametrize("name", ["momentum", "adaptive"])
def test_an_infinite_delta_pushes_nothing_and_alpha_stays_a_number(name) -> None:
    s = create_strategy(name, 2, (MomentumConfig if name == "momentum" else AdaptiveConfig)(ramp_epochs=5))
    alphas = []
    for epoch, delta in enumerate([math.inf, -math.inf, 0.0, 0.0, 0.0]):
        alpha = s.compute_alpha(ctx([0, 1], [epoch + 1] * 2, alphas[-1] if alphas else 0.0, performance_delta=[delta, 0.0]))
        s.on_epoch_end(ctx([0, 1], [epoch + 1] * 2, alpha, performance_delta=[delta, 0.0]))
        alphas.append(alpha)
    assert all(torch.isfinite(a).all() for a in alphas) and torch.isfinite(s.velocity).all()
    assert alphas[-1].tolist() == [1.0, 1.0]  # the ramp went on as if the delta were unknown


# ---- Adaptive ---------------------------------------------------------------------


def test_adaptive_switches_per_seed_and_scores_the_sub_strategy_used() -> None:
    s = AdaptiveGrafting(4, AdaptiveConfig(ramp_epochs=10, drift_threshold=0.1, pause_epochs=2))
    ids = [0, 1, 2, 3]
    base = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    close(s.compute_alpha(ctx(ids, [1] * 4, 0.0, watched=base, performance_delta=0.0)), [0.1] * 4)
    watched = torch.tensor([[1.07, 0.0], [1.0, 0.0], [1.0, 0.0], [1.5, 0.0]])
    c2 = ctx(ids, [2] * 4, 0.1, watched=watched, performance_delta=[0.2, 0.5, 0.005, -0.1])
    # seed 0: drift 0.07 > 0.05 -> drift-controlled, below 0.1 so it ramps: 0.2
    # seed 1: no drift, delta 0.5 > 0.01 -> momentum, v = 0.005: 0.205
    # seed 2: no drift, delta 0.005 -> linear: 0.2
    # seed 3: drift 0.5 > 0.1 -> drift-controlled pause: holds 0.1
    close(s.compute_alpha(c2), [0.2, 0.205, 0.2, 0.1])
    lin, drift, mom = (strategy_id(n) for n in ("linear", "drift_controlled", "momentum"))
    assert s.mode.tolist() == [drift, mom, lin, drift]
    s.on_epoch_end(c2)
    # scores columns: linear, drift_controlled, momentum; score = 0.9*0 + 0.1*delta
    torch.testing.assert_close(
        s.scores, torch.tensor([[0, 0.02, 0], [0, 0, 0.05], [0.0005, 0, 0], [0, -0.01, 0]]), rtol=0, atol=1e-7
    )
    # Epoch 3: seed 3 is still paused (drift mode); seed 1 drops to linear but keeps its alpha floor.
    c3 = ctx(ids, [3] * 4, [0.2, 0.205, 0.2, 0.1], performance_delta=[NAN, 0.0, 0.0, 0.0])
    close(s.compute_alpha(c3), [0.3, 0.3, 0.3, 0.1])
    assert s.mode.tolist() == [lin, lin, lin, drift]
    s.on_epoch_end(c3)
    assert s.scores[0, 1].item() == pytest.approx(0.02)  # unknown delta keeps the score
    # Epoch 4: the pause is over and seed 3 resumes one step above its held alpha.
    close(s.compute_alpha(ctx(ids, [4] * 4, 0.3, performance_delta=0.0)), [0.4, 0.4, 0.4, 0.3])


def test_adaptive_never_drops_after_a_momentum_burst() -> None:
    s = AdaptiveGrafting(1, AdaptiveConfig(ramp_epochs=10))
    close(s.compute_alpha(ctx([0], [1], 0.0, performance_delta=20.0)), [0.3])  # 0.1 + 0.2
    close(s.compute_alpha(ctx([0], [2], 0.3, performance_delta=0.0)), [0.3])  # linear 0.2 < 0.3 floor


# ---- Stability --------------------------------------------------------------------


def test_stability_half_speed_then_revert_after_three_unstable_checks() -> None:
    s = StabilityGrafting(2, StabilityConfig(ramp_epochs=10, window=2))
    ok = {"loss_variance": [0.01], "gradient_norm": [1.0], "accuracy_variance": [0.01]}
    metrics = {
        2: ok,
        4: {**ok, "loss_variance": [0.5]},
        6: {**ok, "gradient_norm": [20.0]},
        8: {**ok, "accuracy_variance": [0.1]},
        10: ok,
    }
    alpha, outputs = 0.0, []
    for epoch in range(1, 13):
        alpha = s.compute_alpha(ctx([1], [epoch], [alpha], **metrics.get(epoch, {}))).item()
        outputs.append(alpha)
    expected = [
        0.1,  # 1
        0.2,  # 2 stable check: last stable alpha 0.1 (the alpha going in)
        0.3,  # 3
        0.35,  # 4 unstable (1): half speed
        0.4,  # 5
        0.45,  # 6 unstable (2)
        0.5,  # 7
        0.1,  # 8 unstable (3 in a row): back to the last stable alpha
        0.1,  # 9 held
        0.2,  # 10 stable again: ramps on at full speed from there
        0.3,
        0.4,
    ]
    assert outputs == pytest.approx(expected)


def test_stability_without_metrics_is_linear_and_ends_at_exactly_one() -> None:
    s = StabilityGrafting(1)
    alpha = torch.zeros(1)
    for epoch in range(1, 51):
        alpha = s.compute_alpha(ctx([0], [epoch], alpha))
    assert alpha.item() == 1.0


def test_should_abort_above_half_error_rate_only() -> None:
    for name in GRAFTING_STRATEGY_NAMES:
        s = create_strategy(name, 4)
        out = s.should_abort(ctx([0, 1, 2, 3], [1] * 4, 0.0, error_rate=[0.2, 0.6, NAN, 0.5]))
        assert out.tolist() == [False, True, False, False]
        assert not s.should_abort(ctx([0], [1], 0.0)).any()


# ---- state ------------------------------------------------------------------------


def _drive(s, epochs, n, start_alpha=None):
    gen = torch.Generator().manual_seed(7)
    alpha = torch.zeros(n) if start_alpha is None else start_alpha
    outs = []
    for e in epochs:
        c = GraftingContext(
            torch.arange(n),
            torch.full((n,), float(e)),
            alpha,
            performance_delta=torch.randn(n, generator=gen) * 0.05,
            loss_variance=torch.rand(n, generator=gen) * 0.2,
            watched=1 + 0.02 * torch.randn(n, 3, generator=gen),
        )
        alpha = s.compute_alpha(c)
        s.on_epoch_end(c)
        outs.append(alpha)
    return torch.stack(outs), alpha


@pytest.mark.parametrize("name", GRAFTING_STRATEGY_NAMES)
def test_state_dict_round_trip_continues_the_same_ramp(name) -> None:
    n = 6
    a = create_strategy(name, n, strategy_class(name).config_class(ramp_epochs=12))
    _, alpha = _drive(a, range(1, 6), n)
    b = create_strategy(name, n, strategy_class(name).config_class(ramp_epochs=12))
    b.load_state_dict(a.state_dict())
    rest_a, _ = _drive(a, range(6, 15), n, alpha.clone())
    rest_b, _ = _drive(b, range(6, 15), n, alpha.clone())
    torch.testing.assert_close(rest_a, rest_b, rtol=0, atol=0)


@pytest.mark.parametrize("name", GRAFTING_STRATEGY_NAMES)
def test_reset_forgets_a_seed(name) -> None:
    n = 5
    s = create_strategy(name, n)
    fresh = create_strategy(name, n)
    _drive(s, range(1, 8), n)
    _drive(fresh, range(1, 2), n)  # fixes the watched width
    fresh.reset(range(n))
    s.reset([0, 3])
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(s.state_dict()[key][[0, 3]], value[[0, 3]], msg=f"{name}.{key}")


@pytest.mark.parametrize("name", GRAFTING_STRATEGY_NAMES)
def test_batched_call_equals_seed_by_seed_calls(name) -> None:
    n = 7
    batched = create_strategy(name, n, strategy_class(name).config_class(ramp_epochs=8))
    single = create_strategy(name, n, strategy_class(name).config_class(ramp_epochs=8))
    gen = torch.Generator().manual_seed(3)
    alpha_b = torch.zeros(n)
    alpha_s = torch.zeros(n)
    for epoch in range(1, 12):
        delta = torch.randn(n, generator=gen) * 0.05
        lv = torch.rand(n, generator=gen) * 0.2
        watched = 1 + 0.03 * torch.randn(n, 4, generator=gen)
        order = torch.randperm(n, generator=gen)
        c = GraftingContext(
            order, torch.full((n,), float(epoch)), alpha_b[order], delta[order], loss_variance=lv[order], watched=watched[order]
        )
        alpha_b[order] = batched.compute_alpha(c)
        batched.on_epoch_end(c)
        for i in range(n):
            ci = GraftingContext(
                [i], [float(epoch)], alpha_s[i : i + 1], delta[i : i + 1], loss_variance=lv[i : i + 1], watched=watched[i : i + 1]
            )
            alpha_s[i] = single.compute_alpha(ci)[0]
            single.on_epoch_end(ci)
    torch.testing.assert_close(alpha_b, alpha_s, rtol=0, atol=0)
    for key, value in batched.state_dict().items():
        torch.testing.assert_close(value, single.state_dict()[key], rtol=0, atol=0)


def test_one_call_serves_many_seeds() -> None:
    n = 100_000
    s = AdaptiveGrafting(n)
    c = GraftingContext(torch.arange(n), torch.full((n,), 5.0), torch.full((n,), 0.08), performance_delta=torch.zeros(n))
    out = s.compute_alpha(c)
    assert out.shape == (n,) and torch.allclose(out, torch.full((n,), 0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", GRAFTING_STRATEGY_NAMES)
def test_to_cuda_keeps_state_and_matches_cpu(name) -> None:
    n = 6
    cpu = create_strategy(name, n)
    _drive(cpu, range(1, 4), n)
    gpu = create_strategy(name, n)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda")
    c = GraftingContext(
        torch.arange(n), torch.full((n,), 4.0), torch.full((n,), 0.05), performance_delta=0.02, watched=torch.ones(n, 3)
    )
    gc = GraftingContext(
        c.seed_ids.cuda(), c.epochs_in_state.cuda(), c.current_alpha.cuda(), c.performance_delta.cuda(), watched=c.watched.cuda()
    )
    torch.testing.assert_close(gpu.compute_alpha(gc).cpu(), cpu.compute_alpha(c))


def test_context_on_another_device_is_refused() -> None:
    s = LinearGrafting(2).to("meta")
    with pytest.raises(ValueError, match="meta"):
        s.compute_alpha(ctx([0], [1], 0.0))
    assert math.isfinite(LinearGrafting(2).compute_alpha(ctx([0], [1], 0.0)).item())
