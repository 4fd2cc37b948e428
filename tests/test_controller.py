"""SeedController: measured contexts, batched decisions, lives; scaled_policy; ablate_chunks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from kasmina import ExtendedLifecycle as L
from kasmina import FeatureFlagError, FeatureFlags, LifecyclePolicy
from kasmina._generated.lifecycle_tables import STATE_KINDS, STATE_MIN_EPOCHS
from kasmina.controller import ControllerConfig, SeedController, ablate_chunks, scaled_policy
from kasmina.layer import ChunkedKasminaLayer

FAST = LifecyclePolicy.default().with_overrides(
    min_epochs={
        "TRAINING": 1,
        "GRAFTING": 2,
        "STABILIZATION": 1,
        "EVALUATING": 1,
        "FINE_TUNING": 1,
        "CULLED": 1,
        "ROLLED_BACK": 1,
    }
)
PREDICTIONS = torch.arange(20) % 10


def make(num_seeds: int = 2, **config) -> tuple[ChunkedKasminaLayer, SeedController]:
    torch.manual_seed(0)
    layer = ChunkedKasminaLayer(nn.Linear(4, 4), num_seeds, policy=FAST)
    defaults = {"plateau_patience": 1, "max_active": 1}
    return layer, SeedController(layer, ControllerConfig(**{**defaults, **config}))


def run(layer, controller, epochs, *, val_loss=1.0, without=1.1, recon=0.001, start=0):
    """Drive ``epochs`` epochs: ``val_loss``/``without`` may be callables of the epoch."""
    decisions = []
    for epoch in range(start, start + epochs):
        layer.step_epoch()
        if recon is not None:
            layer.report_metrics(list(range(layer.num_seeds)), reconstruction_loss=recon)
        loss = val_loss(epoch) if callable(val_loss) else val_loss
        abl = without(epoch) if callable(without) else without
        decisions += controller.step(epoch, loss, PREDICTIONS, lambda ids, a=abl: torch.full((len(ids),), float(a)))
    return decisions


def path_states(life) -> list[str]:
    return [state for _, state in life.path]


def test_happy_path_to_fossilized_with_measured_context():
    layer, controller = make()
    decisions = run(layer, controller, 14)
    life = controller.lives[0]
    assert path_states(life)[:7] == [
        "GERMINATED",
        "TRAINING",
        "GRAFTING",
        "STABILIZATION",
        "EVALUATING",
        "FINE_TUNING",
        "FOSSILIZED",
    ]
    assert life.outcome != "GERMINATED" and life.blueprint == "mlp"
    assert life.last_delta == pytest.approx((1.1 - 1.0) / 1.1, rel=1e-6)
    # GRAFTING ended only once the ramp reached alpha 1, and every accepted move is in a life.
    graft_end = next(d for d in decisions if d.accepted and d.to_state == "STABILIZATION")
    assert graft_end.why == "grafting ramp complete"
    assert float(layer.get_alpha()[life.seed]) == 1.0
    assert layer.state.lifecycle_state(life.seed) == L.FOSSILIZED
    assert controller.stability == 1.0


def test_unconverged_training_is_culled_then_recycled():
    layer, controller = make(training_budget=2.0)
    decisions = run(layer, controller, 6, recon=None)  # reconstruction never measured: the guard cannot pass
    first = controller.lives[0]
    assert path_states(first) == ["GERMINATED", "TRAINING", "CULLED"]
    assert any(d.to_state == "GRAFTING" and d.reason == "GUARD_FAILED" for d in decisions)
    assert first.ended_epoch is not None
    recycle = [d for d in decisions if d.accepted and d.to_state == "DORMANT"]
    assert recycle and recycle[0].seed == first.seed
    assert len(controller.lives) >= 2  # the freed slot germinated again


def test_clearly_negative_evaluation_is_culled():
    layer, controller = make()
    run(layer, controller, 10, without=0.9)  # the network is better without the seed
    life = controller.lives[0]
    assert path_states(life)[-1] == "CULLED" and "EVALUATING" in path_states(life)
    assert life.last_delta == pytest.approx((0.9 - 1.0) / 0.9, rel=1e-6)


def test_no_benefit_is_rolled_back_after_the_evaluation_budget():
    layer, controller = make(evaluation_budget=3.0)
    decisions = run(layer, controller, 12, without=1.0)  # delta exactly 0: neither promoted nor culled
    life = controller.lives[0]
    assert path_states(life)[-1] == "ROLLED_BACK" and path_states(life)[-2] == "EVALUATING"
    refused = [d for d in decisions if d.to_state == "CULLED" and not d.accepted]
    assert refused and all(d.reason == "GUARD_FAILED" for d in refused)
    assert any("no measurable benefit" in d.why for d in decisions if d.accepted)


def _seed_zero_in(layer: ChunkedKasminaLayer, last: str) -> None:
    """Drive seed 0 by hand along the happy path up to ``last``."""
    def ok(result) -> None:
        assert result.success, result.reason

    ok(layer.germinate(0, "mlp"))
    ok(layer.transition(0, "GERMINATED", "TRAINING"))
    layer.step_epoch()
    ok(layer.transition(0, "TRAINING", "GRAFTING", {"reconstruction_loss": 0.0}))
    while float(layer.get_alpha()[0]) < 1.0:
        layer.step_epoch()
    path = ["GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING"]
    context = {"performance_delta": 0.5, "stability_score": 1.0}
    for source, target in itertools.pairwise(path[: path.index(last) + 1]):
        layer.step_epoch()
        ok(layer.transition(0, source, target, context))


def _unstable_steps(layer, controller, epochs: int) -> list:
    """Epochs in which the seed helps (delta +1/6) but half the predictions flip each
    epoch (stability 0): every guard that wants stability refuses."""
    decisions = []
    for epoch in range(epochs):
        layer.step_epoch()
        predictions = PREDICTIONS if epoch % 2 == 0 else PREDICTIONS.flip(0)
        decisions += controller.step(epoch, 1.0, predictions, lambda ids: torch.full((len(ids),), 1.2))
    return [d for d in decisions if d.seed == 0]


@pytest.mark.parametrize(
    ("state", "refused", "fallback"), [("EVALUATING", "FINE_TUNING", "ROLLED_BACK"), ("FINE_TUNING", "FOSSILIZED", "CULLED")]
)
def test_a_request_refused_past_the_budget_leaves_the_state(state, refused, fallback):
    layer, controller = make(evaluation_budget=2.0)
    _seed_zero_in(layer, state)
    decisions = _unstable_steps(layer, controller, 4)
    asked = [d for d in decisions if d.from_state == state and d.to_state == refused]
    assert asked and not any(d.accepted for d in asked) and all(d.reason == "GUARD_FAILED" for d in asked)
    left = [d for d in decisions if d.from_state == state and d.accepted]
    assert [d.to_state for d in left] == [fallback]
    assert f"{refused} refused: GUARD_FAILED" in left[0].why
    assert layer.state.lifecycle_state(0) != getattr(L, state)


def test_loss_spike_rolls_grafted_seed_back():
    layer, controller = make()
    run(layer, controller, 4)
    seed = controller.lives[0].seed
    assert layer.state.lifecycle_state(seed) in (L.GRAFTING, L.STABILIZATION, L.EVALUATING)
    decisions = run(layer, controller, 1, val_loss=2.0, start=4)
    assert next((d.seed, d.to_state) for d in decisions if d.accepted) == (seed, "ROLLED_BACK")
    assert "unstable" in decisions[0].why
    assert layer.state.lifecycle_state(seed) == L.ROLLED_BACK


def test_moves_made_by_others_are_recorded_and_germination_respects_max_active():
    layer, controller = make(num_seeds=3, max_active=2)
    run(layer, controller, 4, recon=None)  # seeds stay in TRAINING (its budget is 2 epochs)
    assert controller.active_count() == 2  # one germination per plateau epoch, capped at max_active
    assert len(controller.lives) == 2
    seed = controller.lives[0].seed
    assert layer.rollback(seed).success is False  # TRAINING has no edge to ROLLED_BACK
    assert layer.cancel(seed).success  # a move the controller did not make
    run(layer, controller, 1, start=4)
    assert controller.lives[0].outcome == "CANCELLED"


def test_state_dict_round_trip_continues_identically():
    layer, controller = make()
    run(layer, controller, 5)
    twin = SeedController(layer, controller.config)
    twin.load_state_dict(controller.state_dict())
    assert [vars(a) for a in twin.lives] == [vars(b) for b in controller.lives]
    assert twin.best_loss == controller.best_loss and twin.plateau == controller.plateau
    assert torch.equal(twin.germ_loss.nan_to_num(-1), controller.germ_loss.nan_to_num(-1))


def test_config_and_flags_are_validated():
    layer, _ = make()
    with pytest.raises(ValueError, match="plateau_patience"):
        ControllerConfig(plateau_patience=0)
    with pytest.raises(ValueError, match="training_budget"):
        ControllerConfig(training_budget=0.5)
    with pytest.raises(ValueError, match="rollback_loss_ratio"):
        ControllerConfig(rollback_loss_ratio=1.0)
    with pytest.raises(KeyError):
        SeedController(layer, ControllerConfig(blueprints=("no_such_kind",)))
    with pytest.raises(FeatureFlagError, match="adaptive_grafting=false"):
        SeedController(layer, ControllerConfig(strategy="adaptive"), flags=FeatureFlags(adaptive_grafting=False))
    SeedController(layer, ControllerConfig(strategy="adaptive"), flags=FeatureFlags())
    _, controller = make()
    with pytest.raises(ValueError, match="val_loss must be finite"):
        controller.step(0, math.nan, PREDICTIONS)


def test_scaled_policy():
    policy = scaled_policy(120, 0.3)
    active = [s for s, kind in enumerate(STATE_KINDS) if kind == "active"]
    assert sum(policy.min_epochs[s] for s in active) == pytest.approx(36, abs=3)
    for s, default in enumerate(STATE_MIN_EPOCHS):
        assert (policy.min_epochs[s] == 0) == (default == 0)
    assert policy.params == LifecyclePolicy.default().params
    tiny = scaled_policy(2, 0.1)
    assert all(m in (0, 1) for m in tiny.min_epochs)
    with pytest.raises(ValueError, match="total_epochs"):
        scaled_policy(0)
    with pytest.raises(ValueError, match="fraction"):
        scaled_policy(10, 1.5)


def test_ablate_chunks_replaces_exactly_one_chunk():
    layer = ChunkedKasminaLayer(nn.Linear(3, 5), 2)  # chunks of 3 and 2 features
    output = torch.arange(10.0).view(2, 5)
    base = -torch.ones(2, 5)
    copies = ablate_chunks(layer, output, base, torch.tensor([1, 0]))
    assert copies.shape == (2, 2, 5)
    assert torch.equal(copies[0], torch.tensor([[0.0, 1, 2, -1, -1], [5, 6, 7, -1, -1]]))
    assert torch.equal(copies[1], torch.tensor([[-1.0, -1, -1, 3, 4], [-1, -1, -1, 8, 9]]))
