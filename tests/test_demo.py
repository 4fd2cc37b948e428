"""`kasmina demo` end to end on a shortened run: outputs exist and agree, and --resume
after a crash (newest checkpoints lost, one damaged) finishes in the same state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kasmina.checkpoint import CheckpointManager
from kasmina.cli import main
from kasmina.controller import ControllerConfig
from kasmina.demo import LAYER_ID, DemoConfig, DemoError, run_demo

EPOCHS = 24


def short_config(out: Path, name: str = "short") -> DemoConfig:
    # Germinate at the first epoch without a 50% improvement: seeds start almost at once.
    controller = ControllerConfig(plateau_patience=1, plateau_min_delta=0.5, max_active=2)
    return DemoConfig(epochs=EPOCHS, seeds=4, out=out, name=name, policy_fraction=0.5, controller=controller)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = run_demo(short_config(out), progress=False)
    return out, result


def test_outputs_exist_and_agree(finished):
    out, result = finished
    run = out / "short"
    assert result.completed and result.run_dir == run
    records = [json.loads(line) for line in (run / "telemetry.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    for record in records:
        assert set(record["lifecycle"]) == {
            "state_distribution",
            "transition_rate",
            "checkpoint_count",
            "grafting_progress",
            "error_rates",
        }
        assert sum(record["lifecycle"]["state_distribution"].values()) == 4
        assert len(record["seed_states"]) == 4 and len(record["alpha"]) == 4
    # The last record's states are the final states; every life's path is a walk of accepted decisions.
    final = records[-1]["lifecycle"]["state_distribution"]
    assert {k: v for k, v in final.items() if v} == result.final_states
    accepted = {(d["epoch"], d["seed"], d["to_state"]) for r in records for d in r["decisions"]}
    assert result.lives, "the short run germinates seeds"
    for life in result.lives:
        assert life.path[0] == (life.germinated_epoch, "GERMINATED")
        for epoch, state in life.path:
            assert (epoch, life.seed, state) in accepted
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert 0.5 < result.baseline_test_accuracy <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == EPOCHS

    from PIL import Image

    with Image.open(run / "lifecycle.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 500

    manager = CheckpointManager(run / "checkpoints")
    newest = manager.list_checkpoints(LAYER_ID, limit=1)[0]
    assert manager.verify(newest.checkpoint_id).kind == "layer"


def test_cli_lists_and_verifies_the_demo_checkpoints(finished, capsys):
    out, _ = finished
    folder = str(out / "short" / "checkpoints")
    assert main(["ckpt", "ls", folder]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert listed[0].startswith("checkpoint_id") and len(listed) >= 2
    assert all(LAYER_ID + "_layer_" in line for line in listed[1:])
    assert main(["ckpt", "verify", folder]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(finished, tmp_path):
    out, result = finished
    crashed = tmp_path / "short"
    shutil.copytree(out / "short", crashed)
    sidecars = sorted(
        (crashed / "checkpoints").glob("*/*.json"), key=lambda p: tuple(int(x) for x in p.stem.split("_")[-2:]), reverse=True
    )
    for sidecar in sidecars[:5]:  # the last five epochs' checkpoints never made it to disk
        sidecar.unlink()
        sidecar.with_suffix(".safetensors").unlink()
    payload = sidecars[5].with_suffix(".safetensors")  # and the newest one left is damaged
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF
    payload.write_bytes(bytes(data))

    resumed = run_demo(DemoConfig.for_resume(crashed), progress=False, resume=True)
    assert resumed.resumed_from_epoch == EPOCHS - 6
    assert (crashed / "telemetry.jsonl").read_text() == (out / "short" / "telemetry.jsonl").read_text()
    assert resumed.test_accuracy == result.test_accuracy and resumed.test_loss == result.test_loss
    assert [(life.seed, life.path) for life in resumed.lives] == [(life.seed, life.path) for life in result.lives]

    def last_layer_state(folder: Path) -> dict[str, torch.Tensor]:
        m = CheckpointManager(folder / "checkpoints")
        checkpoint = m.restore_checkpoint(m.list_checkpoints(LAYER_ID, limit=1)[0].checkpoint_id)
        return {**checkpoint["state"], **checkpoint["blueprints"], **checkpoint["metadata"]["layer"]}

    original, again = last_layer_state(out / "short"), last_layer_state(crashed)
    assert original.keys() == again.keys()
    for key in original:
        torch.testing.assert_close(original[key], again[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_user_errors(tmp_path, finished, capsys):
    out, _ = finished
    with pytest.raises(DemoError, match="already exists"):
        run_demo(short_config(out), progress=False)
    (tmp_path / "digits-e24-s4-r0").mkdir()
    (tmp_path / "digits-e24-s4-r0" / "x").touch()
    assert DemoConfig(epochs=24, out=tmp_path).name == "digits-e24-s4-r0-2"  # the default name never clashes
    with pytest.raises(DemoError, match=r"no config\.json"):
        DemoConfig.for_resume(tmp_path)
    with pytest.raises(DemoError, match="--seeds must be between 1 and the hidden width 8"):
        DemoConfig(seeds=9)
    assert main(["demo", "--seeds", "9", "--out", str(tmp_path)]) == 2
    assert "hidden width" in capsys.readouterr().err
    assert main(["demo", "--resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err
    if not torch.cuda.is_available():
        assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--device", "meta", "--out", str(tmp_path / "meta")]) == 2
    assert "trains on cpu or cuda" in capsys.readouterr().err and not (tmp_path / "meta").exists()


def test_tensorboard_events_are_written(tmp_path):
    from kasmina.telemetry import tensorboard_available

    config = DemoConfig(epochs=2, seeds=2, out=tmp_path, name="tb", tensorboard=True)
    if not tensorboard_available():
        with pytest.raises(DemoError, match="pip install tensorboard"):
            run_demo(config, progress=False)
        return
    run_demo(config, progress=False)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb" / "tensorboard").iterdir())
