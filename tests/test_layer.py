"""ChunkedKasminaLayer: lifecycle walks, alpha continuity, isolation, faults, persistence."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from kasmina._generated.lifecycle_tables import (
    EDGES,
    STATE_BLUEPRINT_RUNS,
    STATE_NAMES,
    ExtendedLifecycle,
    Reason,
    StateColumn,
)
from kasmina._reference import chunk_widths
from kasmina.checkpoint import CheckpointManager
from kasmina.grafting import GraftingConfig
from kasmina.layer import ChunkedKasminaLayer, ChunkLayout, LifecycleCommand
from kasmina.policy import LifecyclePolicy

S = ExtendedLifecycle
POLICY = LifecyclePolicy.default().with_overrides(
    min_epochs={
        "TRAINING": 2,
        "GRAFTING": 3,
        "STABILIZATION": 1,
        "EVALUATING": 1,
        "FINE_TUNING": 1,
        "CULLED": 2,
        "ROLLED_BACK": 2,
    }
)
# Metrics that let every guarded forward move pass.
GOOD = {"performance_delta": 0.1, "stability_score": 0.9, "total_improvement": 0.05, "final_stability": 0.99}


def make_layer(num_seeds: int = 4, in_features: int = 6, out_features: int = 10, **kwargs) -> ChunkedKasminaLayer:
    torch.manual_seed(0)
    return ChunkedKasminaLayer(nn.Linear(in_features, out_features), num_seeds, policy=POLICY, **kwargs)


def train_step(layer: ChunkedKasminaLayer, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    layer.train()
    loss = layer(x).square().mean() + layer.auxiliary_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()


def eval_out(layer: ChunkedKasminaLayer, x: torch.Tensor) -> torch.Tensor:
    layer.eval()
    with torch.no_grad():
        return layer(x)


def ok(result) -> None:
    assert result.success, result.reason


def advance(layer: ChunkedKasminaLayer, seed: int, target: S, x: torch.Tensor) -> None:
    """Drive ``seed`` forward along the main path until it is in ``target``. Residual
    blueprints reconstruct exactly, so TRAINING passes its guard on the loss the layer
    measures after one forward; other kinds are told a converged loss."""
    path = [S.DORMANT, S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    for _ in range(100):
        if (current := layer.state.lifecycle_state(seed)) == target:
            return
        nxt = path[path.index(current) + 1]
        if current == S.DORMANT:
            ok(layer.germinate(seed, "residual_linear"))
            continue
        if current == S.TRAINING:
            layer.train()
            layer(x)
        layer.report_metrics(seed, **GOOD)
        if current == S.TRAINING and layer.blueprint(seed).kind.name != "residual_linear":
            layer.report_metrics(seed, reconstruction_loss=0.0)
        for _ in range(20):
            if (result := layer.transition(seed, current, nxt)).success:
                break
            assert result.code in (Reason.MIN_EPOCHS, Reason.GUARD_FAILED), result.reason
            layer.step_epoch()
    raise AssertionError(f"seed {seed} did not reach {target.name}")


# ---- layout and construction --------------------------------------------------------


@pytest.mark.parametrize(("dim", "n"), [(10, 4), (12, 4), (7, 7), (1024, 64), (1000, 64)])
def test_layout_matches_the_blend_chunks(dim, n) -> None:
    layout = ChunkLayout(dim, n)
    widths = chunk_widths(dim, n)
    assert [layout.width(c) for c in range(n)] == widths
    assert [layout.start(c) for c in range(n)] == [sum(widths[:c]) for c in range(n)]
    assert sum(count * w for w, _, count, _ in layout.regions) == dim


def test_construction_errors_are_named() -> None:
    with pytest.raises(ValueError, match="num_seeds=11"):
        ChunkedKasminaLayer(nn.Linear(3, 10), 11)
    with pytest.raises(ValueError, match="out_features="):
        ChunkedKasminaLayer(nn.ReLU(), 2)
    with pytest.raises(ValueError, match="unknown grafting strategy"):
        ChunkedKasminaLayer(nn.Linear(3, 4), 2, strategy_configs={"nope": None})
    assert ChunkedKasminaLayer(nn.ReLU(), 2, out_features=4)(torch.randn(3, 4)).shape == (3, 4)


def test_all_dormant_layer_is_the_host() -> None:
    layer = make_layer()
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    assert layer.auxiliary_loss().item() == 0.0


def test_dormant_telemetry_is_the_running_chunk_mean_and_variance() -> None:
    layer = make_layer(telemetry_momentum=0.5)
    advance(layer, 1, S.GERMINATED, torch.randn(2, 6))
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    layer.train()
    layer(x1)
    layer(x2)
    h1, h2 = layer.base_layer(x1).detach(), layer.base_layer(x2).detach()
    for seed in (0, 2, 3):
        start, width = layer.layout.start(seed), layer.layout.width(seed)
        c1, c2 = h1[:, start : start + width], h2[:, start : start + width]
        mean = 0.5 * c1.mean() + 0.5 * c2.mean()
        var = 0.5 * c1.var(unbiased=False) + 0.5 * c2.var(unbiased=False)
        assert layer.chunk_mean[seed].item() == pytest.approx(mean.item(), abs=1e-5)
        assert layer.chunk_var[seed].item() == pytest.approx(var.item(), abs=1e-5)
    assert math.isnan(layer.chunk_mean[1].item())  # not idle: no telemetry


def test_an_empty_batch_leaves_telemetry_and_reconstruction_alone() -> None:
    layer = make_layer()
    advance(layer, 1, S.TRAINING, torch.randn(2, 6))
    layer.train()
    layer(torch.randn(8, 6))
    mean, var, count = layer.chunk_mean.clone(), layer.chunk_var.clone(), layer._recon_count.clone()
    out = layer(torch.randn(0, 6))
    assert out.shape == (0, 10)
    assert not torch.isnan(mean[[0, 2, 3]]).any()  # the idle seeds have statistics to keep
    torch.testing.assert_close(layer.chunk_mean, mean, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(layer.chunk_var, var, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(layer._recon_count, count)


# ---- lifecycle walks ----------------------------------------------------------------


def test_full_walk_to_fossilized_with_real_training() -> None:
    torch.manual_seed(1)
    layer = ChunkedKasminaLayer(nn.Linear(6, 8), 4, policy=POLICY)
    x = torch.randn(64, 6)
    target = torch.randn(64, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)

    def epoch() -> None:
        for _ in range(15):
            layer.train()
            loss = (layer(x) - target).square().mean() + layer.auxiliary_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        layer.step_epoch()

    ok(layer.germinate(2, "mlp", "linear"))
    assert layer.sync_optimizer(opt) == 4
    ok(layer.transition(2, "GERMINATED", "TRAINING"))
    epochs = 0
    while not layer.transition(2, "TRAINING", "GRAFTING").success:
        epoch()
        epochs += 1
        assert epochs < 40, layer.measured_context(2)
    # The guard passed on the reconstruction loss the layer measured.
    assert layer.reconstruction_loss[2] <= 0.01 and layer.state.metrics[2, 0] == layer.reconstruction_loss[2]
    alphas = []
    while not layer.transition(2, "GRAFTING", "STABILIZATION").success:
        epoch()
        alphas.append(layer.alpha[2].item())
    assert alphas == pytest.approx([1 / 3, 2 / 3, 1.0])
    for src, dst in [("STABILIZATION", "EVALUATING"), ("EVALUATING", "FINE_TUNING"), ("FINE_TUNING", "FOSSILIZED")]:
        epoch()
        layer.report_metrics(2, **GOOD)
        ok(layer.transition(2, src, dst))
    history = layer.state.get_transition_history(2)
    assert [STATE_NAMES[b] for _, b in history] == [
        "GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING", "FOSSILIZED",
    ]  # fmt: skip
    assert layer.alpha[2] == 1.0 and all(not p.requires_grad for p in layer.blueprint(2).parameters())


def test_guard_refusal_names_the_missing_metric() -> None:
    layer = make_layer()
    advance(layer, 0, S.EVALUATING, torch.randn(4, 6))
    layer.step_epoch()
    layer.report_metrics(0, performance_delta=float("nan"))
    result = layer.transition(0, "EVALUATING", "FINE_TUNING")
    assert not result.success and result.code == Reason.GUARD_FAILED and "performance_delta" in result.reason


@pytest.mark.parametrize(
    ("start", "retire", "command"),
    [
        (S.GERMINATED, S.CANCELLED, "cancel"),
        (S.TRAINING, S.CANCELLED, "cancel"),
        (S.TRAINING, S.CULLED, None),
        (S.GRAFTING, S.ROLLED_BACK, "rollback"),
        (S.FINE_TUNING, S.ROLLED_BACK, "rollback"),
        (S.EVALUATING, S.CULLED, None),
    ],
)
def test_walk_to_each_retired_state_and_back_through_recycle(start, retire, command) -> None:
    layer = make_layer()
    x = torch.randn(4, 6)
    advance(layer, 3, start, x)
    if command is not None:
        ok(layer.process_lifecycle_command({"type": command, "seed_id": 3}))
    else:
        if start == S.EVALUATING:
            layer.report_metrics(3, performance_delta=-0.5)
        while not (result := layer.transition(3, start, retire)).success:
            assert result.code == Reason.MIN_EPOCHS, result.reason
            layer.step_epoch()
    assert layer.state.lifecycle_state(3) == retire
    assert layer.alpha[3] == 0 and layer.blueprint(3) is not None
    torch.testing.assert_close(eval_out(layer, x), layer.base_layer(x), rtol=0, atol=0)
    embargo = POLICY.min_epochs[retire]
    for _ in range(embargo):
        result = layer.recycle(3)
        assert not result.success and result.code == Reason.MIN_EPOCHS
        layer.step_epoch()
    ok(layer.recycle(3))
    assert layer.state.lifecycle_state(3) == S.DORMANT
    assert layer.blueprint(3) is None and layer.state.state[3, StateColumn.BLUEPRINT_ID] == -1
    # The slot is usable again.
    advance(layer, 3, S.GRAFTING, x)


def test_commands_refuse_with_reasons_and_bad_commands_raise() -> None:
    layer = make_layer()
    result = layer.transition(1, "DORMANT", "TRAINING")
    assert result.code == Reason.INVALID_EDGE and "DORMANT -> TRAINING" in result.reason
    assert layer.recycle(1).code == Reason.INVALID_EDGE
    assert layer.germinate(9, "mlp").code == Reason.UNKNOWN_SEED
    ok(layer.germinate(1, "low_rank", "momentum"))
    assert layer.germinate(1, "mlp").code == Reason.STALE_FROM_STATE
    assert layer.state.state[1, StateColumn.BLUEPRINT_ID] == 2
    assert layer.state.state[1, StateColumn.GRAFTING_STRATEGY] == 2
    with pytest.raises(KeyError, match="unknown blueprint 'conv'"):
        layer.germinate(0, "conv")
    with pytest.raises(KeyError, match="unknown grafting strategy"):
        layer.germinate(0, "mlp", "fast")
    with pytest.raises(ValueError, match="unknown lifecycle command"):
        layer.process_lifecycle_command({"type": "explode", "seed_id": 0})
    with pytest.raises(ValueError, match="unknown metric"):
        layer.report_metrics(0, accuracy=1.0)
    assert layer.state.lifecycle_state(0) == S.DORMANT and layer.blueprint(0) is None


# ---- alpha continuity ---------------------------------------------------------------


def test_output_never_jumps_across_any_edge() -> None:
    layer = make_layer(num_seeds=5)
    x = torch.randn(16, 6)
    taken: set[tuple[int, int]] = set()

    def move(seed: int, dst: S) -> None:
        """Request current -> dst until it passes; the output right before and right
        after the committed move must be identical whenever the blueprint keeps running."""
        src = layer.state.lifecycle_state(seed)
        for _ in range(50):
            before = eval_out(layer, x)
            result = layer.transition(seed, src, dst)
            if result.success:
                break
            assert result.code in (Reason.MIN_EPOCHS, Reason.GUARD_FAILED), result.reason
            layer.step_epoch()
        assert result.success, result.reason
        if STATE_BLUEPRINT_RUNS[dst]:
            torch.testing.assert_close(eval_out(layer, x), before, rtol=0, atol=0, msg=f"{src.name} -> {dst.name}")
        taken.add((int(src), int(dst)))

    main = [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    ends = {
        0: (S.FOSSILIZED, None),
        1: (S.GRAFTING, S.ROLLED_BACK),
        2: (S.EVALUATING, S.CULLED),
        3: (S.TRAINING, S.CANCELLED),
        4: (S.STABILIZATION, S.ROLLED_BACK),
    }
    for seed, (last, retire) in ends.items():
        ok(layer.germinate(seed, "residual_linear"))
        move(seed, S.TRAINING)
        layer.train()
        layer(x)  # measures a zero reconstruction loss
        layer.report_metrics(seed, **GOOD)
        for nxt in main[1 : main.index(last) + 1]:
            move(seed, nxt)
            if nxt == S.GRAFTING:
                with torch.no_grad():  # a blueprint far from the identity makes jumps visible
                    for p in layer.blueprint(seed).parameters():
                        p.add_(0.5)
                # Inside GRAFTING alpha moves by one ramp step (1/3) per epoch.
                with torch.no_grad():
                    base = layer.base_layer(x)
                    full = torch.zeros_like(base)
                    chunk = slice(layer.layout.start(seed), layer.layout.start(seed) + layer.layout.width(seed))
                    full[:, chunk] = (layer.blueprint(seed)(base[:, chunk]) - base[:, chunk]).abs()
                assert full.max() > 0.1
                while layer.alpha[seed] < 1:
                    before = eval_out(layer, x)
                    layer.step_epoch()
                    assert ((eval_out(layer, x) - before).abs() <= full / 3 + 1e-5).all()
                if retire == S.ROLLED_BACK and last == S.GRAFTING:
                    break
        if retire == S.CULLED:
            layer.report_metrics(seed, performance_delta=-1.0)
        if retire is not None:
            move(seed, retire)
            start, width = layer.layout.start(seed), layer.layout.width(seed)
            chunk = slice(start, start + width)
            torch.testing.assert_close(eval_out(layer, x)[:, chunk], layer.base_layer(x)[:, chunk], rtol=0, atol=0)
    for seed in (1, 2, 3, 4):
        move(seed, S.DORMANT)
    # Every edge into a state where the blueprint runs was checked, and retiring edges from each depth.
    assert {(a, b) for a, b in EDGES if STATE_BLUEPRINT_RUNS[b]} <= taken
    assert {(int(S.GRAFTING), int(S.ROLLED_BACK)), (int(S.EVALUATING), int(S.CULLED))} <= taken


def _halfway_grafted() -> tuple[ChunkedKasminaLayer, torch.Tensor]:
    """A layer whose seed 0 is halfway up a 6-epoch linear ramp (alpha 0.5), and an input."""
    layer = make_layer(strategy_configs={"linear": GraftingConfig(ramp_epochs=6)})
    x = torch.randn(4, 6)
    advance(layer, 0, S.GRAFTING, x)
    for _ in range(3):
        layer.step_epoch()
    return layer, x


def test_grafting_cannot_end_before_alpha_reaches_one() -> None:
    layer, _ = _halfway_grafted()
    result = layer.transition(0, "GRAFTING", "STABILIZATION")
    assert not result.success and "alpha from 0.5 to 1" in result.reason
    assert layer.state.lifecycle_state(0) == S.GRAFTING
    for _ in range(3):
        layer.step_epoch()
    ok(layer.transition(0, "GRAFTING", "STABILIZATION"))


def test_a_batch_cannot_end_grafting_before_alpha_reaches_one_either() -> None:
    layer, x = _halfway_grafted()
    before = eval_out(layer, x)
    codes = layer.lifecycle.request_transitions([0, 2], [S.GRAFTING, S.DORMANT], [S.STABILIZATION, S.GERMINATED])
    assert codes.tolist() == [Reason.GUARD_FAILED, Reason.OK]  # the other request of the batch still goes through
    assert layer.state.lifecycle_state(0) == S.GRAFTING and layer.alpha[0] == 0.5
    torch.testing.assert_close(eval_out(layer, x), before, rtol=0, atol=0)
    twice = layer.lifecycle.request_transitions([0, 0], S.GRAFTING, S.STABILIZATION)
    assert twice.tolist() == [Reason.DUPLICATE_IN_BATCH] * 2
    for _ in range(3):
        layer.step_epoch()
    assert layer.lifecycle.request_transitions([0], S.GRAFTING, S.STABILIZATION).tolist() == [Reason.OK]


# ---- gradients and freezing ---------------------------------------------------------


def _host_grads(layer: ChunkedKasminaLayer, x: torch.Tensor) -> list[torch.Tensor]:
    layer.train()
    layer.zero_grad(set_to_none=True)
    (layer(x).sin().sum() + layer.auxiliary_loss()).backward()
    return [p.grad.clone() for p in layer.base_layer.parameters()]


@pytest.mark.parametrize("with_grafting_neighbour", [False, True])
def test_host_gradients_are_bitwise_identical_with_a_training_seed(with_grafting_neighbour) -> None:
    x = torch.randn(32, 6)
    plain = make_layer()
    training = make_layer()
    for layer in (plain, training):
        if with_grafting_neighbour:
            advance(layer, 0, S.GRAFTING, x)
            layer.step_epoch()
    advance(training, 2, S.TRAINING, x)
    with torch.no_grad():
        for p in training.blueprint(2).parameters():
            p.normal_()
    for a, b in zip(_host_grads(plain, x), _host_grads(training, x), strict=True):
        assert torch.equal(a, b)
    assert training.auxiliary_loss().item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in training.blueprint(2).parameters())


def test_frozen_states_keep_their_parameters_under_adam_with_weight_decay() -> None:
    layer = make_layer(num_seeds=5)
    x = torch.randn(16, 6)
    states = [S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING]
    for seed, state in enumerate(states):
        advance(layer, seed, state, x)
    with torch.no_grad():
        for seed in range(5):
            for p in layer.blueprint(seed).parameters():
                p.normal_(0, 0.1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.1)
    snapshot = {seed: [p.detach().clone() for p in layer.blueprint(seed).parameters()] for seed in range(5)}
    for _ in range(3):
        train_step(layer, x, opt)
    for seed, state in enumerate(states):
        changed = any(not torch.equal(a, p) for a, p in zip(snapshot[seed], layer.blueprint(seed).parameters(), strict=True))
        assert changed == (state in (S.TRAINING, S.FINE_TUNING)), state.name
    # Leaving FINE_TUNING freezes again.
    layer.report_metrics(4, **GOOD)
    layer.step_epoch()
    ok(layer.transition(4, "FINE_TUNING", "FOSSILIZED"))
    frozen = [p.detach().clone() for p in layer.blueprint(4).parameters()]
    train_step(layer, x, opt)
    assert all(torch.equal(a, p) for a, p in zip(frozen, layer.blueprint(4).parameters(), strict=True))


# ---- faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "retired"), [(S.GRAFTING, S.ROLLED_BACK), (S.FINE_TUNING, S.ROLLED_BACK), (S.TRAINING, S.CANCELLED)]
)
def test_nan_blueprint_is_contained_and_retired(state, retired) -> None:
    layer = make_layer()
    x = torch.randn(8, 6)
    advance(layer, 1, state, x)
    if state == S.GRAFTING:
        layer.step_epoch()
    with torch.no_grad():
        layer.blueprint(1).w[0, 0] = float("nan")
    layer.train()
    layer.zero_grad()
    out = layer(x)
    assert torch.isfinite(out).all()
    start, width = layer.layout.start(1), layer.layout.width(1)
    base = layer.base_layer(x)
    torch.testing.assert_close(out[:, start : start + width], base[:, start : start + width], rtol=0, atol=0)
    (out.sum() + layer.auxiliary_loss()).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.base_layer.parameters())
    assert torch.isfinite(layer.auxiliary_loss())
    assert layer.get_alpha()[1] == 0
    report = layer.step_epoch()
    assert report.faulted == {1: retired.name}
    assert layer.state.lifecycle_state(1) == retired and layer.state.state[1, StateColumn.ERROR_COUNT] == 1


def test_a_non_finite_input_faults_no_blueprint() -> None:
    layer = make_layer()
    x = torch.randn(8, 6)
    advance(layer, 1, S.GRAFTING, x)
    layer.step_epoch()
    bad = x.clone()
    bad[0, 0] = float("nan")  # one corrupt sample: the host's output is NaN there, the blueprint is fine
    with torch.no_grad():
        layer(bad)
    assert not layer.fault.any()
    assert layer.step_epoch().faulted == {} and layer.state.lifecycle_state(1) == S.GRAFTING


def test_load_state_dict_drops_the_epochs_measurements() -> None:
    source, target = make_layer(), make_layer()
    x = torch.randn(8, 6)
    for layer in (source, target):
        advance(layer, 1, S.TRAINING, x)
    target.train()
    target(x * 100)  # a large reconstruction error, measured but not yet closed by step_epoch
    assert target._recon_count[1] == 1
    target.load_state_dict(source.state_dict())
    assert target._recon_count.sum() == 0 and target.auxiliary_loss() == 0
    assert target.measured_context(1) == source.measured_context(1)


def test_strategy_abort_rolls_back() -> None:
    layer = make_layer()
    advance(layer, 2, S.GRAFTING, torch.randn(4, 6))
    layer.step_epoch()
    layer.report_metrics(2, error_rate=0.7)
    report = layer.step_epoch()
    assert report.aborted == {2: "ROLLED_BACK"} and layer.alpha[2] == 0
    assert report.alphas[2] == 0.0  # the alpha the seed has after the abort, not the strategy's proposal


# ---- optimizer hook -----------------------------------------------------------------


def test_new_parameters_and_sync_optimizer_follow_allocation() -> None:
    layer = make_layer()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    ok(layer.germinate(0, "mlp"))
    new = layer.new_parameters()
    assert {id(p) for p in new} == {id(p) for p in layer.blueprint(0).parameters()}
    assert layer.new_parameters() == []
    ok(layer.germinate(1, "low_rank"))
    assert layer.sync_optimizer(opt, lr=1e-2) == 6  # mlp (4) and low_rank (2) parameters
    assert opt.param_groups[-1]["lr"] == 1e-2
    ok(layer.cancel(1))
    ok(layer.recycle(1))
    assert layer.sync_optimizer(opt) == 0
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in layer.parameters()}


# ---- persistence, devices, compile ---------------------------------------------------


def test_state_dict_round_trip_mid_grafting_continues_the_same_ramp() -> None:
    x = torch.randn(8, 6)
    a = make_layer()
    advance(a, 0, S.GRAFTING, x)
    advance(a, 2, S.TRAINING, x)
    ok(a.germinate(1, "mlp", "drift_controlled"))
    advance(a, 1, S.GRAFTING, x)
    a.step_epoch()
    saved = a.state_dict()
    b = make_layer()
    b.load_state_dict(saved)
    assert b.blueprint(1).kind_id == 1 and b.blueprint(3) is None
    torch.testing.assert_close(eval_out(b, x), eval_out(a, x), rtol=0, atol=0)
    for _ in range(3):
        ra, rb = a.step_epoch(), b.step_epoch()
        assert ra.alphas == rb.alphas
        torch.testing.assert_close(eval_out(b, x), eval_out(a, x), rtol=0, atol=0)
    assert b.alpha[0] == 1.0
    assert b.state.get_transition_history(1) == a.state.get_transition_history(1)


def test_load_state_dict_frees_blueprints_the_saved_layer_lacks() -> None:
    x = torch.randn(4, 6)
    empty = make_layer().state_dict()
    layer = make_layer()
    advance(layer, 2, S.TRAINING, x)
    layer.load_state_dict(empty)
    assert layer.blueprint(2) is None and layer.state.lifecycle_state(2) == S.DORMANT
    torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_to_cuda_keeps_everything() -> None:
    x = torch.randn(8, 6)
    layer = make_layer()
    advance(layer, 0, S.GRAFTING, x)
    layer.step_epoch()
    expected = eval_out(layer, x)
    layer = layer.to("cuda")
    assert layer.state.lifecycle_state(0) == S.GRAFTING and layer.alpha.device.type == "cuda"
    torch.testing.assert_close(eval_out(layer, x.cuda()).cpu(), expected)
    layer.step_epoch()
    assert layer.alpha[0].item() == pytest.approx(2 / 3)


def test_to_dtype_and_device_keeps_lifecycle_state() -> None:
    layer = make_layer()
    advance(layer, 0, S.GRAFTING, torch.randn(4, 6))
    layer.step_epoch()
    before = layer.state.state.clone()
    layer = layer.to("cpu").double()
    assert torch.equal(layer.state.state, before)
    out = layer(torch.randn(3, 6, dtype=torch.float64))
    assert out.dtype == torch.float64 and layer.alpha[0].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_training_seed_reconstructs_in_the_layers_dtype(dtype) -> None:
    layer = make_layer()
    advance(layer, 0, S.TRAINING, torch.randn(4, 6))
    layer = layer.to(dtype).train()
    out = layer(torch.randn(8, 6, dtype=dtype))
    assert out.dtype == dtype and layer._aux is not None
    layer.step_epoch()
    assert math.isfinite(layer.measured_context(0)["reconstruction_loss"])
    assert all(p.dtype == dtype for p in layer.blueprint(0).parameters())
    layer.germinate(1, "mlp")
    assert all(p.dtype == dtype for p in layer.blueprint(1).parameters())  # allocated in the layer's dtype
    twin = make_layer().to(dtype)
    twin.load_state_dict(layer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(twin.blueprint(1).parameters(), layer.blueprint(1).parameters(), strict=True))
    layer.report_metrics(0, stability_score=0.95)  # kept in float32, the type guards compare in
    assert layer.reported.dtype == torch.float32 and layer.measured_context(0)["stability_score"] == pytest.approx(0.95)
    assert all(getattr(layer, name).dtype == torch.float32 for name in ("chunk_mean", "reconstruction_loss", "_recon_sum"))


def test_torch_compile_matches_eager_for_a_fixed_set_of_seeds() -> None:
    layer = make_layer()
    x = torch.randn(8, 6)
    advance(layer, 0, S.GRAFTING, x)
    advance(layer, 1, S.TRAINING, x)
    ok(layer.germinate(3, "mlp"))
    advance(layer, 3, S.GRAFTING, x)
    layer.step_epoch()
    layer.train()
    expected = layer(x)
    expected_aux = layer.auxiliary_loss()
    compiled = torch.compile(layer)
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(layer.auxiliary_loss(), expected_aux)
    layer.step_epoch()  # alpha changes; same seeds: no recompile needed, values follow
    torch.testing.assert_close(compiled(x), layer(x))


def test_deepcopy_is_an_independent_working_layer() -> None:
    x = torch.randn(4, 6)
    layer = make_layer()
    advance(layer, 0, S.GRAFTING, x)
    layer.step_epoch()
    layer.train()
    layer(x)
    twin = copy.deepcopy(layer)
    assert twin.lifecycle.state is twin.state and twin.state is not layer.state
    torch.testing.assert_close(eval_out(twin, x), eval_out(layer, x), rtol=0, atol=0)
    ok(twin.rollback(0))
    assert twin.alpha[0] == 0 and layer.state.lifecycle_state(0) == S.GRAFTING and layer.alpha[0] > 0
    assert twin.blueprint(0) is not layer.blueprint(0)


def test_a_layer_with_a_checkpoint_manager_copies_and_pickles(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, durable=False)
    layer = make_layer(checkpoint_manager=manager)
    twin = copy.deepcopy(layer)
    assert twin.lifecycle.checkpoint_manager is manager  # copies share the folder's manager
    revived = pickle.loads(pickle.dumps(layer))
    again = revived.lifecycle.checkpoint_manager
    assert again is not manager and again.checkpoint_dir == manager.checkpoint_dir and not again.durable
    for copied in (twin, revived):
        result = copied.germinate(1, "mlp")
        assert result.success and result.checkpoint_id is not None


def test_dict_commands() -> None:
    layer = make_layer()
    ok(layer.process_lifecycle_command({"type": "germinate", "seed_id": 0, "blueprint_id": 3, "strategy": "adaptive"}))
    ok(layer.process_lifecycle_command(LifecycleCommand("transition", 0, from_state="GERMINATED", to_state="TRAINING")))
    result = layer.process_lifecycle_command(
        {
            "type": "transition",
            "seed_id": 0,
            "from_state": "TRAINING",
            "to_state": "GRAFTING",
            "context": {"reconstruction_loss": 0.5},
        }
    )
    assert result.code == Reason.MIN_EPOCHS


def test_transitions_checkpoint_under_the_layer_id_with_blueprint_weights(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, durable=False)
    layer = ChunkedKasminaLayer(nn.Linear(6, 8), 4, layer_id="encoder.fc1", policy=POLICY, checkpoint_manager=manager)
    ok(layer.germinate(1, "residual_linear", "linear"))
    ok(layer.transition(1, "GERMINATED", "TRAINING"))
    latest = manager.get_latest_checkpoint("encoder.fc1", 1)
    assert latest is not None and latest.lifecycle_state == ExtendedLifecycle.TRAINING
    restored = manager.restore_checkpoint(latest.checkpoint_id)
    expected = layer.blueprint(1).state_dict()
    assert set(restored["blueprint_state"]) == set(expected)
    for name, value in expected.items():
        assert torch.equal(restored["blueprint_state"][name], value)
    assert int(layer.state.state[1, StateColumn.CHECKPOINT_ID]) == latest.number


def test_a_transition_checkpoint_holds_the_seed_as_the_transition_left_it(tmp_path) -> None:
    """The layer allocates or frees the blueprint before the checkpoint is written."""
    manager = CheckpointManager(tmp_path, durable=False)
    layer = ChunkedKasminaLayer(nn.Linear(6, 8), 4, policy=POLICY, checkpoint_manager=manager)
    germinated = layer.germinate(2, "mlp")
    saved = manager.restore_checkpoint(germinated.checkpoint_id)
    assert saved["state_data"]["row"][StateColumn.BLUEPRINT_ID] == layer.blueprint_registry.resolve("mlp")
    assert set(saved["blueprint_state"]) == set(layer.blueprint(2).state_dict())
    ok(layer.cancel(2))
    for _ in range(POLICY.min_epochs_of("CANCELLED")):
        layer.step_epoch()
    recycled = layer.recycle(2)
    assert recycled.success
    saved = manager.restore_checkpoint(recycled.checkpoint_id)
    assert saved["state_data"]["row"][StateColumn.BLUEPRINT_ID] == -1 and saved["blueprint_state"] is None
