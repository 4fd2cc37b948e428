"""ExtendedTelemetry: the seed document's five metrics, and the JSONL / TensorBoard writers."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from kasmina import ExtendedLifecycle as L
from kasmina.state import ExtendedStateTensor
from kasmina.telemetry import ExtendedTelemetry, JsonlWriter, TensorBoardWriter, tensorboard_available

KEYS = {"state_distribution", "transition_rate", "checkpoint_count", "grafting_progress", "error_rates"}


def walk(state: ExtendedStateTensor, ids: list[int], path: list[L]) -> None:
    for src, dst in itertools.pairwise(path):
        codes = state.apply_transitions(ids, [src] * len(ids), [dst] * len(ids))
        assert codes.tolist() == [0] * len(ids)


def test_a_rewound_history_never_makes_the_rate_negative():
    state = ExtendedStateTensor(3)
    telemetry = ExtendedTelemetry(state)
    walk(state, [0], [L.DORMANT, L.GERMINATED])
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    walk(state, [0], [L.GERMINATED, L.CANCELLED, L.DORMANT])
    assert telemetry.collect_lifecycle_metrics()["transition_rate"] == 3
    state.load_state_dict(saved)  # seed 0 back to one transition
    walk(state, [1], [L.DORMANT, L.GERMINATED])
    assert telemetry.collect_lifecycle_metrics()["transition_rate"] == 1


def test_metrics_of_a_bare_state_tensor():
    state = ExtendedStateTensor(10)
    telemetry = ExtendedTelemetry(state)
    first = telemetry.collect_lifecycle_metrics(epoch=0)  # covers epoch 0
    assert set(first) == KEYS
    assert first["state_distribution"]["DORMANT"] == 10
    assert sum(first["state_distribution"].values()) == 10
    assert first["transition_rate"] == 0
    assert first["checkpoint_count"] == 0
    assert first["grafting_progress"]["seeds_grafting"] == 0
    assert math.isnan(first["grafting_progress"]["mean_alpha"])
    assert first["error_rates"]["total_errors"] == 0

    walk(state, [0, 1, 2], [L.DORMANT, L.GERMINATED, L.TRAINING])  # 6 transitions
    walk(state, [3], [L.DORMANT, L.GERMINATED, L.CANCELLED])  # 2 transitions
    state.increment_error_count([0, 0, 3])
    second = telemetry.collect_lifecycle_metrics(epoch=4)
    dist = second["state_distribution"]
    assert (dist["DORMANT"], dist["TRAINING"], dist["CANCELLED"]) == (6, 3, 1)
    assert second["transition_rate"] == pytest.approx(8 / 4)
    errors = second["error_rates"]
    assert errors["total_errors"] == 3 and errors["seeds_with_errors"] == 2
    assert errors["fraction_with_errors"] == pytest.approx(0.2)
    assert errors["errors_by_state"]["TRAINING"] == 2 and errors["errors_by_state"]["CANCELLED"] == 1
    assert sum(errors["errors_by_state"].values()) == 3
    assert telemetry.collect_lifecycle_metrics()["transition_rate"] == 0  # nothing since the last call
    with pytest.raises(ValueError, match="does not advance"):
        telemetry.collect_lifecycle_metrics(epoch=4)


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="ChunkedKasminaLayer or an ExtendedStateTensor"):
        ExtendedTelemetry(object())


def test_jsonl_writer_round_trip(tmp_path):
    path = tmp_path / "deep" / "t.jsonl"
    with JsonlWriter(path, mode="w") as writer:
        writer.write({"epoch": 1, "alpha": float("nan"), "nested": {"x": [1.5, float("inf")]}})
        writer.write({"epoch": 2, "np": np.float32(0.5), "t": torch.tensor(3), "nan32": np.float32("nan")})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"epoch": 1, "alpha": None, "nested": {"x": [1.5, None]}},
        {"epoch": 2, "np": 0.5, "t": 3, "nan32": None},  # NumPy and 0-dim tensor scalars as numbers
    ]
    with pytest.raises(ValueError, match="closed"):
        writer.write({})
    with pytest.raises(ValueError, match="mode"):
        JsonlWriter(path, mode="r")


def test_the_lifecycle_plot_takes_records_read_back_from_jsonl(tmp_path):
    pytest.importorskip("matplotlib")
    from kasmina.demo_report import plot_lifecycle

    records = [
        {"epoch": e, "seed_states": [0, 1], "train_loss": 1.0, "val_loss": v, "val_accuracy": 0.5, "decisions": d}
        for e, v, d in ((0, 1.0, []), (1, math.nan, [{"to_state": "CULLED"}]), (2, 0.9, [{"to_state": "GERMINATED"}]))
    ]
    with JsonlWriter(tmp_path / "r.jsonl", mode="w") as writer:
        for record in records:
            writer.write(record)
    back = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert back[1]["val_loss"] is None
    plot_lifecycle(back, tmp_path / "lifecycle.png", 2)
    assert (tmp_path / "lifecycle.png").stat().st_size > 0


def test_tensorboard_writer_needs_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setattr("kasmina.telemetry.tensorboard_available", lambda: False)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardWriter(tmp_path)


@pytest.mark.skipif(not tensorboard_available(), reason="the optional tensorboard package is not installed")
def test_tensorboard_writer_writes_events(tmp_path):
    writer = TensorBoardWriter(tmp_path)
    writer.write({"state_distribution": {"DORMANT": 3}, "transition_rate": 0.5, "label": "x"}, step=1)
    writer.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_metrics_of_a_layer_read_its_alpha_and_checkpoints(tmp_path):
    import torch
    from torch import nn

    from kasmina import CheckpointManager, LifecyclePolicy
    from kasmina.layer import ChunkedKasminaLayer

    policy = LifecyclePolicy.default().with_overrides(min_epochs={"TRAINING": 0, "GRAFTING": 4})
    manager = CheckpointManager(tmp_path, durable=False)
    layer = ChunkedKasminaLayer(nn.Linear(4, 6), 3, policy=policy, checkpoint_manager=manager)
    telemetry = ExtendedTelemetry(layer)
    for seed in (0, 1):
        assert layer.germinate(seed, "mlp").success
        assert layer.transition(seed, "GERMINATED", "TRAINING").success
        assert layer.transition(seed, "TRAINING", "GRAFTING", {"reconstruction_loss": 0.0}).success
    layer.step_epoch()
    layer.step_epoch()
    layer.rollback(1)
    manager.save_layer_state("layer", layer.state)
    metrics = telemetry.collect_lifecycle_metrics(epoch=2)
    progress = metrics["grafting_progress"]
    assert progress["seeds_grafting"] == 1 and progress["seeds_fully_grafted"] == 0
    assert progress["mean_alpha"] == pytest.approx(float(layer.get_alpha()[0])) == pytest.approx(0.5)
    assert metrics["checkpoint_count"] == manager.get_checkpoint_count() >= 1
    assert metrics["state_distribution"]["ROLLED_BACK"] == 1
    assert metrics["transition_rate"] == pytest.approx(7 / 3)  # epochs 0, 1 and 2
    assert torch.isfinite(torch.tensor(progress["max_alpha"]))
