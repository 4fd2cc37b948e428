"""Whole-layer and single-seed checkpoints of an ExtendedStateTensor, and the
LifecycleManager integration (a high checkpoint after each committed transition)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch

from kasmina import ExtendedLifecycle, ExtendedStateTensor, LifecycleManager
from kasmina._generated.lifecycle_tables import HISTORY_LENGTH, NUM_STATES, StateColumn
from kasmina.checkpoint import CheckpointManager, CheckpointNotFoundError, CheckpointRecovery, CheckpointWriteError

CKPT = int(StateColumn.CHECKPOINT_ID)
ERRORS = int(StateColumn.ERROR_COUNT)


def _random_state(num_seeds: int, seed: int = 0) -> ExtendedStateTensor:
    gen = torch.Generator().manual_seed(seed)
    state = ExtendedStateTensor(num_seeds)
    state.state.copy_(torch.randint(0, 1000, state.state.shape, generator=gen, dtype=torch.int32))
    for column in (StateColumn.LIFECYCLE_STATE, StateColumn.PARENT_STATE):
        state.state[:, column] = torch.randint(0, NUM_STATES, (num_seeds,), generator=gen, dtype=torch.int32)
    state.history.copy_(torch.randint(0, NUM_STATES, state.history.shape, generator=gen, dtype=torch.int32))
    state.history_count.copy_(torch.randint(0, 3 * HISTORY_LENGTH, (num_seeds,), generator=gen, dtype=torch.int32))
    state.metrics.copy_(torch.randn(state.metrics.shape, generator=gen))
    state.metrics[::7, 2] = float("nan")
    return state


def _assert_same(a: ExtendedStateTensor, b: ExtendedStateTensor) -> None:
    for name in ("state", "history", "history_count", "metrics"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.cpu(), y.cpu()) or torch.allclose(x.cpu(), y.cpu(), equal_nan=True, rtol=0, atol=0), name


# ---- whole layer -------------------------------------------------------------------------
def test_layer_state_round_trip_new_and_in_place(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    state = _random_state(5000)
    blueprints = {"seed3.0.weight": torch.randn(8, 8), "seed3.0.bias": torch.randn(8)}
    checkpoint_id = manager.save_layer_state("enc", state, blueprints, metadata={"epoch": 7})
    assert checkpoint_id.startswith("enc_layer_")
    restored, bps = manager.restore_layer_state("enc")
    assert isinstance(restored, ExtendedStateTensor) and restored.num_seeds == 5000
    _assert_same(restored, state)
    assert bps.keys() == blueprints.keys() and all(torch.equal(bps[k], blueprints[k]) for k in blueprints)
    target = ExtendedStateTensor(5000)
    same, _ = manager.restore_layer_state("enc", checkpoint_id, state=target)
    assert same is target
    _assert_same(target, state)
    info = manager.list_checkpoints(layer_id="enc")[0]
    assert (info.kind, info.seed_id, info.lifecycle_state) == ("layer", None, None)


def test_layer_restore_errors_leave_the_target_untouched(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="whole-layer"):
        manager.restore_layer_state("enc")
    checkpoint_id = manager.save_layer_state("enc", _random_state(10))
    seed_ckpt = manager.save_checkpoint("enc", 0, {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="not a whole-layer checkpoint"):
        manager.restore_layer_state("enc", seed_ckpt)
    with pytest.raises(ValueError, match="not a whole-layer checkpoint of layer 'dec'"):
        manager.restore_layer_state("dec", checkpoint_id)
    wrong_size = ExtendedStateTensor(11)
    before = {k: v.clone() for k, v in wrong_size.state_dict().items()}
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        manager.restore_layer_state("enc", checkpoint_id, state=wrong_size)
    assert all(torch.equal(before[k], v) or k == "metrics" for k, v in wrong_size.state_dict().items())
    with pytest.raises(TypeError, match="ExtendedStateTensor"):
        manager.save_layer_state("enc", torch.zeros(3))
    with pytest.raises(TypeError, match="blueprints"):
        manager.save_layer_state("enc", _random_state(2), {"w": [1.0]})


def test_layer_recovery_skips_a_damaged_layer_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    good_state = _random_state(100, seed=1)
    good = manager.save_layer_state("enc", good_state)
    bad = manager.save_layer_state("enc", _random_state(100, seed=2))
    payload = manager.active_dir / f"{bad}.safetensors"
    data = bytearray(payload.read_bytes())
    data[-2] ^= 0x10  # one flipped bit
    payload.write_bytes(bytes(data))
    result = CheckpointRecovery(manager).recover_layer_state("enc")
    assert result.checkpoint_id == good and [s.checkpoint_id for s in result.skipped] == [bad]
    restored, _ = manager.restore_layer_state("enc", result.checkpoint_id)
    _assert_same(restored, good_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_restore_on_cuda_keeps_values(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    state = _random_state(1000)
    restored, _ = manager.restore_layer_state("enc", manager.save_layer_state("enc", state.to("cuda")), target_device="cuda")
    assert restored.device.type == "cuda"
    _assert_same(restored, state)


# ---- one seed ----------------------------------------------------------------------------
def test_seed_state_round_trip_and_checkpoint_number(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    state = _random_state(8)
    original = {name: getattr(state, name)[5].clone() for name in ("state", "history", "history_count", "metrics")}
    info = manager.save_seed_state("enc", state, 5, {"w": torch.ones(2)})
    assert info.priority == "high" and info.number == 1 and int(state.state[5, CKPT]) == 1
    loaded = manager.restore_checkpoint(info.checkpoint_id)
    assert loaded["state_data"]["row"][CKPT] == 1  # the saved row already names its checkpoint
    assert loaded["lifecycle_state"] == int(original["state"][StateColumn.LIFECYCLE_STATE])
    other = ExtendedStateTensor(8)
    manager.restore_seed_state(info.checkpoint_id, other)  # into the checkpoint's own seed
    expected_row = original["state"].clone()
    expected_row[CKPT] = 1
    assert torch.equal(other.state[5], expected_row)
    assert torch.equal(other.history[5], original["history"]) and torch.equal(other.history_count[5], original["history_count"])
    assert torch.allclose(other.metrics[5], original["metrics"], equal_nan=True)
    assert torch.equal(other.state[4], ExtendedStateTensor(8).state[4])  # other seeds untouched
    manager.restore_seed_state(info.checkpoint_id, other, seed_id=0)
    assert torch.equal(other.state[0], expected_row)
    with pytest.raises(IndexError, match="seed 8"):
        manager.save_seed_state("enc", state, 8)
    with pytest.raises(ValueError, match="no seed row"):
        manager.restore_seed_state(manager.save_checkpoint("enc", 1, {"x": 1}), other)


class _HeldCommits:
    """Wraps a manager's _commit so that each save waits, after copying its row, until
    the test releases it: saves of one seed can then finish in any order."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.entered = [threading.Event() for _ in range(2)]
        self.release = [threading.Event() for _ in range(2)]
        self.calls = 0
        commit = manager._commit

        def held(*args):
            call = self.calls
            self.calls += 1
            self.entered[call].set()
            assert self.release[call].wait(30)
            return commit(*args)

        manager._commit = held


@pytest.mark.parametrize("finish_first", [0, 1])
def test_checkpoint_id_names_the_save_of_the_newest_row(tmp_path: Path, finish_first: int) -> None:
    manager = CheckpointManager(tmp_path, durable=False)
    state = ExtendedStateTensor(1)
    lifecycle = LifecycleManager(state, checkpoint_manager=manager, layer_id="L")
    held = _HeldCommits(manager)
    results = {}
    moves = [("DORMANT", "GERMINATED"), ("GERMINATED", "CANCELLED")]
    threads = []
    for i, (source, target) in enumerate(moves):

        def request(i: int = i, source: str = source, target: str = target) -> None:
            results[i] = lifecycle.request_transition(0, source, target)

        threads.append(threading.Thread(target=request))
        threads[i].start()
        assert held.entered[i].wait(30)  # transition i committed and its row copied
    for i in (finish_first, 1 - finish_first):
        held.release[i].set()
        threads[i].join()
    assert all(results[i].success for i in (0, 1))
    number = int(state.state[0, CKPT])
    newest = manager.get_checkpoint_by_number("L", 0, number)
    assert newest.checkpoint_id == results[1].checkpoint_id
    assert manager.restore_checkpoint(newest.checkpoint_id)["lifecycle_state"] == int(ExtendedLifecycle.CANCELLED)


def test_a_restore_during_a_save_keeps_the_restored_checkpoint_id(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, durable=False)
    state = ExtendedStateTensor(1)
    first = manager.save_seed_state("L", state, 0)
    held = _HeldCommits(manager)
    saving = threading.Thread(target=manager.save_seed_state, args=("L", state, 0))
    saving.start()
    assert held.entered[0].wait(30)
    manager.restore_seed_state(first.checkpoint_id, state)  # CHECKPOINT_ID back to 1, as restored
    held.release[0].set()
    saving.join()
    assert int(state.state[0, CKPT]) == first.number == 1


# ---- LifecycleManager integration --------------------------------------------------------
def test_transition_saves_a_high_checkpoint_and_stores_its_number(tmp_path: Path) -> None:
    checkpoints = CheckpointManager(tmp_path)
    seen: list[int] = []
    lifecycle = LifecycleManager(
        ExtendedStateTensor(4),
        checkpoint_manager=checkpoints,
        layer_id="enc",
        blueprint_state=lambda s: {"w": torch.full((3,), s)},
    )
    lifecycle.register_transition_callback(
        "DORMANT", "GERMINATED", lambda s, a, b, c: seen.append(int(lifecycle.state.state[s, CKPT]))
    )
    first = lifecycle.request_transition(2, "DORMANT", "GERMINATED")
    second = lifecycle.request_transition(2, "GERMINATED", "TRAINING")
    assert first.success and second.success and first.checkpoint_error is None
    numbers = [checkpoints.verify(r.checkpoint_id).number for r in (first, second)]
    assert numbers == [1, 2] and int(lifecycle.state.state[2, CKPT]) == 2 and seen == [1]
    saved = checkpoints.restore_checkpoint(second.checkpoint_id)
    assert saved["priority"] == "high" and saved["lifecycle_state"] == int(ExtendedLifecycle.TRAINING)
    assert torch.equal(saved["state_data"]["row"], lifecycle.state.state[2])
    assert torch.equal(saved["blueprint_state"]["w"], torch.full((3,), 2))
    assert lifecycle.state.get_transition_history(2) == [(0, 1), (1, 2)]
    assert saved["state_data"]["history_count"] == 2
    # the integer id maps back to the checkpoint, in this process and in a new manager
    reopened = CheckpointManager(tmp_path)
    assert reopened.get_checkpoint_by_number("enc", 2, int(lifecycle.state.state[2, CKPT])).checkpoint_id == second.checkpoint_id
    refused = lifecycle.request_transition(2, "DORMANT", "GERMINATED")  # stale: no checkpoint
    assert not refused.success and refused.checkpoint_id is None
    assert checkpoints.get_checkpoint_count() == 2


def test_a_failed_save_keeps_the_transition_and_counts_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = CheckpointManager(tmp_path)
    lifecycle = LifecycleManager(ExtendedStateTensor(4), checkpoint_manager=checkpoints, layer_id="enc")
    assert lifecycle.request_transition(1, "DORMANT", "GERMINATED").success

    def disk_full(*args: object, **kwargs: object) -> None:
        raise CheckpointWriteError("cannot save: no space left on device", 28)

    monkeypatch.setattr(CheckpointManager, "_commit", disk_full)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = lifecycle.request_transition(1, "GERMINATED", "TRAINING")
    assert result.success and result.checkpoint_id is None
    assert "no space left on device" in result.checkpoint_error and "seed 1" in result.checkpoint_error
    row = lifecycle.state.state[1]
    assert int(row[StateColumn.LIFECYCLE_STATE]) == int(ExtendedLifecycle.TRAINING)
    assert int(row[ERRORS]) == 1 and int(row[CKPT]) == 1  # still the previous checkpoint's number
    assert int(lifecycle.state.state[0, ERRORS]) == 0


def test_checkpoint_manager_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="CheckpointManager"):
        LifecycleManager(ExtendedStateTensor(2), checkpoint_manager=object())
    with pytest.raises(ValueError, match="layer_id"):
        LifecycleManager(ExtendedStateTensor(2), checkpoint_manager=CheckpointManager(tmp_path), layer_id="../x")
    plain = LifecycleManager(ExtendedStateTensor(2))
    result = plain.request_transition(0, "DORMANT", "GERMINATED")
    assert result.success and result.checkpoint_id is None and result.checkpoint_error is None
