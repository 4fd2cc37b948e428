"""Multi-process lifecycle synchronisation (kasmina.distributed*).

Wire-format and single-process tests run in the pytest process; the multi-process
tests spawn 2 gloo ranks on CPU through ``kasmina.distributed_launch.launch`` (bounded:
process-group timeout, grace period and deadline; every process is gone when it
returns) with the rank bodies in ``tests/_distributed_workers.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from kasmina._generated.lifecycle_tables import CONTEXT_FIELDS, ExtendedLifecycle, Reason, StateColumn
from kasmina.checkpoint import CheckpointManager
from kasmina.controller import ControllerConfig, SeedController
from kasmina.distributed import (
    CommandBatch,
    CommandKind,
    DistributedSyncError,
    LifecycleSync,
    SeedCommand,
    apply_commands,
    tensor_digest,
)
from kasmina.distributed_launch import LaunchError, launch
from kasmina.distributed_layer import CommandRecorder, apply_layer_commands, restore_layer_checkpoint, save_layer_checkpoint
from kasmina.layer import ChunkedKasminaLayer
from kasmina.state import ExtendedStateTensor

D = ExtendedLifecycle


def _workers():
    """The rank bodies (tests/_distributed_workers.py), importable by the ranks too."""
    import _distributed_workers

    return _distributed_workers


def _mixed_commands() -> list[SeedCommand]:
    return [
        SeedCommand.germinate(0, blueprint_id=2, strategy="momentum", init_seed=2**31 - 1),
        SeedCommand.transition(1, D.TRAINING, D.GRAFTING, {"reconstruction_loss": 0.005}),
        SeedCommand.transition(2, D.EVALUATING, D.CULLED, {"performance_delta": -0.2, "error_rate": float("nan")}),
        SeedCommand.cancel(3, D.GERMINATED),
        SeedCommand.rollback(4, D.GRAFTING),
        SeedCommand.recycle(5, D.CULLED),
    ]


# ---- wire format ------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 4, 6, 64])
def test_encode_decode_round_trip_is_bitwise(capacity: int) -> None:
    batch = CommandBatch.from_commands(_mixed_commands())
    message, rest = batch.encode(sequence=7, capacity=capacity)
    assert message.dtype == torch.int32 and message.numel() == 8 + capacity * (9 + len(CONTEXT_FIELDS))
    assert (rest is None) == (len(batch) <= capacity)
    assert CommandBatch.overflow_words(message) == (0 if rest is None else rest.numel())
    decoded = CommandBatch.decode(message, rest, sequence=7)
    for name in ("kinds", "seed_ids", "from_states", "to_states", "blueprint_ids", "strategies", "init_seeds", "calls", "fields"):
        assert torch.equal(getattr(decoded, name), getattr(batch, name)), name
    # The float context travels as its bit pattern: NaN (not supplied) and every value exact.
    assert torch.equal(decoded.context.view(torch.int32), batch.context.view(torch.int32))
    assert repr(decoded.to_commands()) == repr(batch.to_commands())  # repr: NaN == NaN
    # A field given as NaN is carried as given (the fields bitmask), an absent one stays absent.
    assert set(decoded.to_commands()[2].context) == {"performance_delta", "error_rate"}


def test_commands_fill_targets_and_context_from_the_spec() -> None:
    cmds = _mixed_commands()
    assert [c.kind for c in cmds] == [
        CommandKind.GERMINATE,
        CommandKind.TRANSITION,
        CommandKind.TRANSITION,
        CommandKind.CANCEL,
        CommandKind.ROLLBACK,
        CommandKind.RECYCLE,
    ]
    assert [c.to_state for c in cmds[3:]] == [D.CANCELLED, D.ROLLED_BACK, D.DORMANT]
    batch = CommandBatch.from_commands(cmds)
    row = batch.context[2]
    assert row[CONTEXT_FIELDS.index("performance_delta")].item() == pytest.approx(-0.2)
    assert math.isnan(row[CONTEXT_FIELDS.index("error_rate")].item())
    assert math.isnan(row[CONTEXT_FIELDS.index("reconstruction_loss")].item())
    assert batch.strategies[0].item() == 2 and batch.blueprint_ids[0].item() == 2
    assert batch.init_seeds[0].item() == 2**31 - 1
    torch.manual_seed(5)
    drawn = SeedCommand.germinate(1, 1).init_seed
    torch.manual_seed(5)
    assert SeedCommand.germinate(1, 1).init_seed == drawn  # drawn from the controller's torch RNG


def test_decode_rejects_foreign_stale_and_truncated_messages() -> None:
    batch = CommandBatch.from_commands(_mixed_commands())
    message, rest = batch.encode(sequence=3, capacity=2)
    with pytest.raises(DistributedSyncError, match=r"out of step.*boundary 3.*at 4"):
        CommandBatch.decode(message, rest, sequence=4)
    foreign = message.clone()
    foreign[0] = 12345
    with pytest.raises(DistributedSyncError, match="not Kasmina wire format"):
        CommandBatch.decode(foreign, rest, sequence=3)
    other_spec = message.clone()
    other_spec[2] += 1
    with pytest.raises(DistributedSyncError, match="same kasmina build"):
        CommandBatch.decode(other_spec, rest, sequence=3)
    with pytest.raises(DistributedSyncError, match="overflow rows announced"):
        CommandBatch.decode(message, None, sequence=3)


def test_bad_commands_are_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match="to_state=11"):
        SeedCommand.transition(0, 0, 11)
    with pytest.raises(ValueError, match="seed_id=-1"):
        SeedCommand.transition(-1, 0, 1)
    with pytest.raises(ValueError, match="unknown context field"):
        SeedCommand.transition(0, 2, 3, {"recon": 0.0})
    with pytest.raises(ValueError, match="unknown grafting strategy 'zigzag'"):
        SeedCommand.germinate(0, 1, "zigzag")
    with pytest.raises(ValueError, match="init_seed=-3"):
        SeedCommand.germinate(0, 1, init_seed=-3)
    with pytest.raises(ValueError, match="blueprint_id=-1"):
        SeedCommand.germinate(0, -1)
    with pytest.raises(TypeError, match="not a SeedCommand"):
        CommandBatch.from_commands([("germinate", 0)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="context must be"):
        CommandBatch(*[torch.zeros(1, dtype=torch.int32)] * 9, context=torch.zeros(1, 2))


# ---- applying a batch ---------------------------------------------------------------------


def test_apply_commands_is_one_batched_judgement_and_records_blueprints() -> None:
    state = ExtendedStateTensor(6)
    before = {k: v.clone() for k, v in state.state_dict().items()}
    batch = CommandBatch.from_commands(
        [
            SeedCommand.germinate(0, blueprint_id=1, strategy="adaptive"),
            SeedCommand.germinate(1, blueprint_id=2),
            SeedCommand.germinate(1, blueprint_id=2),  # duplicate: both rejected
            SeedCommand.transition(2, D.TRAINING, D.GRAFTING),  # stale: seed 2 is DORMANT
            SeedCommand.germinate(9, blueprint_id=0),  # no such seed
        ]
    )
    codes = apply_commands(state, batch)
    dup = Reason.DUPLICATE_IN_BATCH
    assert codes.tolist() == [Reason.OK, dup, dup, Reason.STALE_FROM_STATE, Reason.UNKNOWN_SEED]
    assert state.state[0, StateColumn.LIFECYCLE_STATE] == D.GERMINATED
    assert state.state[0, StateColumn.BLUEPRINT_ID] == 1
    assert state.state[0, StateColumn.GRAFTING_STRATEGY] == 3
    # Rejected commands changed nothing: rows 1.. are as before.
    after = state.state_dict()
    for key in before:
        assert tensor_digest(after[key][1:]) == tensor_digest(before[key][1:]), key
    assert len(apply_commands(state, CommandBatch.empty())) == 0


def test_concatenated_batches_keep_their_calls_apart() -> None:
    layer = ChunkedKasminaLayer(nn.Linear(4, 8), 4)
    reports = [
        CommandBatch.from_commands([SeedCommand.report(seed, 0, {field: 0.2})])
        for seed, field in ((0, "performance_delta"), (1, "error_rate"))
    ]
    germinate = CommandBatch.from_commands([SeedCommand.germinate(2, blueprint_id=1)])
    batch = CommandBatch.concat([*reports, germinate])
    assert batch.calls.tolist() == [0, 1, 2]
    apply_layer_commands(layer, batch)
    assert layer.measured_context(0)["performance_delta"] == pytest.approx(0.2)
    assert layer.measured_context(1)["error_rate"] == pytest.approx(0.2)
    assert layer.state.lifecycle_state(2) == D.GERMINATED
    grouped = CommandBatch.build(CommandKind.TRANSITION, torch.tensor([0, 1]), D.DORMANT, D.GERMINATED, call=7)
    assert CommandBatch.concat([grouped, grouped]).calls.tolist() == [0, 0, 1, 1]  # a call stays one call


# ---- single process: the same code path, identity collectives ---------------------------


def test_single_process_sync_is_the_identity() -> None:
    sync = LifecycleSync()
    assert not sync.distributed and sync.is_controller and sync.world_size == 1
    metrics = {"loss": torch.tensor([0.5, float("nan")]), "errors": torch.tensor(3)}
    reduced = sync.reduce_metrics(metrics, {"loss": "mean", "errors": "sum"})
    assert torch.equal(reduced["errors"], metrics["errors"])
    assert torch.allclose(reduced["loss"], metrics["loss"], equal_nan=True)
    batch = sync.broadcast_commands(_mixed_commands())
    assert len(batch) == 6 and sync.sequence == 1
    sync.check_consistency({"x": torch.ones(2)})
    sync.barrier()
    with pytest.raises(ValueError, match="unknown reduction"):
        sync.reduce_metrics(metrics, "median")
    with pytest.raises(TypeError, match=r"'errors': a mean of torch\.int64 values would be truncated"):
        sync.reduce_metrics(metrics)
    with pytest.raises(ValueError, match="unknown metric"):
        sync.reduce_metrics(metrics, {"accuracy": "max"})
    with pytest.raises(ValueError, match="capacity=0"):
        LifecycleSync(capacity=0)


def test_tensor_digest_sees_every_bit() -> None:
    x = torch.randn(100)
    y = x.clone()
    assert tensor_digest(x) == tensor_digest(y)
    y.view(torch.int32)[37] ^= 1
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(x) != tensor_digest(x.reshape(10, 10))
    assert tensor_digest(torch.zeros(4, dtype=torch.int32)) != tensor_digest(torch.zeros(4, dtype=torch.float32))
    assert tensor_digest(torch.tensor(3)) != tensor_digest(torch.tensor(4))  # 0-dim (e.g. num_batches_tracked)


# ---- two gloo ranks -------------------------------------------------------------------------
# Ranks are forked (no torch re-import: seconds instead of tens of seconds on a loaded
# machine) with one thread each; the launcher bounds every job and leaves no process.

FAST = {"start_method": "fork", "threads_per_rank": 1}


@pytest.fixture
def one_thread():
    """Same thread count as the ranks, so matmuls round the same way (bitwise comparison)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_ranks_stay_identical_and_checkpoints_cross_world_sizes(tmp_path, one_thread) -> None:
    w = _workers()
    # Epoch 0 in this process (world size 1): germinate seeds 1-3, checkpoint.
    manager = CheckpointManager(tmp_path, durable=False)
    layer = w.build_layer()
    w.run_epochs(layer, LifecycleSync(), range(0, 1), replicated=True, trace=w.Trace(), check=True)
    save_layer_checkpoint(layer, manager, LifecycleSync(), metadata={"epoch": 1})
    source = w.digests(layer)

    # 1 -> 2: both ranks restore it; epochs 1-4 on rank-specific batches, checkpoint
    # (2 -> 1), epochs 5-8 on replicated batches. Every boundary ends with
    # check_consistency (bitwise digests of the layer's whole state_dict on every rank).
    r0, r1 = launch(w.two_rank_run, 2, (str(tmp_path), 1, 5, 9), timeout_s=20, deadline_s=150, **FAST)
    assert r0["world"] == 2
    assert r0["restored"] == source == r1["restored"]
    assert r0["at_split"] == r1["at_split"] and r0["final"] == r1["final"]
    assert r0["checkpoint_id"] == r1["checkpoint_id"]
    trace = r0["trace"]
    assert trace.states == r1["trace"].states and trace.alphas == r1["trace"].alphas and trace.codes == r1["trace"].codes
    # Sharded data really made the ranks' own measurements differ (epochs 1-4), replicated
    # data did not (5-8): the equality above is the protocol's work, not a coincidence.
    local = [a != b for a, b in zip(trace.local, r1["trace"].local, strict=True)]
    assert all(local[:4]) and not any(local[4:])
    visited = {s for row in trace.states for s in row}
    assert {D.TRAINING, D.GRAFTING, D.STABILIZATION, D.EVALUATING, D.FINE_TUNING, D.FOSSILIZED} <= visited
    assert {D.CULLED, D.ROLLED_BACK} <= visited
    assert trace.states[-1] == [D.DORMANT, D.FOSSILIZED, D.DORMANT, D.DORMANT]  # culled/rolled back seeds recycled
    assert any(0 < a < 1 for row in trace.alphas for a in row)  # a grafting ramp in progress
    assert any(Reason.MIN_EPOCHS in row for row in trace.codes)  # the real lifecycle judged every command
    # One broadcast per boundary; two only when the batch overflows the capacity (2).
    assert trace.broadcasts == [1 if len(c) <= 2 else 2 for c in trace.codes] and 2 in trace.broadcasts
    assert trace.rebuilds >= 3  # DDP rebuilt as blueprints unfroze, froze and were freed

    # 2 -> 1: restore the 2-rank checkpoint here and continue: bitwise the 2-rank result.
    resumed = w.build_layer()
    meta = restore_layer_checkpoint(resumed, manager, r0["checkpoint_id"])
    assert meta["world_size"] == 2 and meta["epoch"] == 5
    assert w.digests(resumed) == r0["at_split"]
    w.run_epochs(resumed, LifecycleSync(), range(5, 9), replicated=True, trace=w.Trace(), check=True)
    assert w.digests(resumed) == r0["final"]


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_lost_rank_fails_the_others_with_a_clear_error(mode: str) -> None:
    w = _workers()
    with pytest.raises(LaunchError) as info:
        launch(w.failing_run, 2, (mode,), timeout_s=4, failure_grace_s=3, deadline_s=60, **FAST)
    rank0, rank1 = info.value.outcomes
    assert rank0.exitcode == 1
    assert "DistributedSyncError" in rank0.error and "epoch boundary 1" in rank0.error
    assert "a peer rank died, hung past the process-group timeout" in rank0.error
    if mode == "die":
        assert rank1.exitcode == 17 and rank1.error == "exited without reporting"
    else:
        assert rank1.exitcode in (-15, -9) and "killed" in rank1.error
    assert "rank 0: exit code 1: DistributedSyncError" in str(info.value)


def test_collectives_reduce_metrics_and_detect_divergence_across_two_ranks() -> None:
    w = _workers()
    r0, r1 = launch(w.collectives_probe, 2, **FAST)
    assert (r0["world"], r1["world"]) == ((0, 2), (1, 2))
    assert repr(r0["reduced"]) == repr(r1["reduced"])  # identical on both ranks (NaN included)
    got = r0["reduced"]
    assert got["mean"][:2] == [0.5, 2.0] and math.isnan(got["mean"][2])  # a NaN on any rank stays NaN
    assert got["sum"] == [3] and r0["dtypes"]["sum"] == "torch.int32"
    assert got["max"] == [1.0, 0.0] and got["min"] == [0.0, -1.0]
    assert r0["inplace_is_same_tensor"] and r0["direct"] == r1["direct"] == [5.0] * 4
    assert r0["flags"] == r1["flags"] == [True, False]
    for r in (r0, r1):
        assert "ranks [1] disagree with rank 0 on 1 tensor(s): differs" in r["divergence"]


def test_a_checkpoint_through_a_subgroup_without_rank_0(tmp_path) -> None:
    ranks = launch(_workers().subgroup_checkpoint, 3, (str(tmp_path),), **FAST)
    assert ranks[0] == "not in the group"
    assert ranks[1] == ranks[2] and ranks[1].startswith("layer")  # rank 1 saved, rank 2 heard the id
    assert CheckpointManager(tmp_path).verify(ranks[1]).kind == "layer"


def test_launch_rejects_bad_arguments() -> None:
    w = _workers()
    with pytest.raises(ValueError, match="nproc=0"):
        launch(w.collectives_probe, 0)
    with pytest.raises(ValueError, match="backend='mpi'"):
        launch(w.collectives_probe, 1, backend="mpi")
    with pytest.raises(ValueError, match="start_method='thread'"):
        launch(w.collectives_probe, 1, start_method="thread")


def test_a_recorder_lets_the_layer_refuse_seeds_it_does_not_have() -> None:
    layer = ChunkedKasminaLayer(nn.Linear(4, 8), 4)
    with CommandRecorder(layer) as recorder:
        results = [layer.cancel(99), layer.germinate(-1, "mlp"), layer.germinate(99, "mlp")]
        assert layer.germinate(1, "mlp").success
    assert [r.success for r in results] == [False] * 3
    assert all("does not exist" in r.reason for r in results)
    assert recorder.batch().seed_ids.tolist() == [1]  # refusals are not replayed


def test_a_recorded_controller_replays_bitwise_on_a_twin_layer() -> None:
    """controlled_step's mechanism in one process: the SeedController acts on layer A
    inside a CommandRecorder; the recording applied to an identical layer B leaves B
    bitwise equal to A (germinations with their RNG, batched requests, reports)."""
    w = _workers()
    a, b = w.build_layer(), w.build_layer()
    controller = SeedController(a, ControllerConfig(plateau_patience=1, max_active=3))
    seen = set()
    for epoch in range(8):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(epoch))
        for layer in (a, b):
            layer.train()
            (layer(x).square().mean() + layer.auxiliary_loss()).backward()
            layer.step_epoch()
        with CommandRecorder(a) as recorder:
            decisions = controller.step(epoch, 1.0, torch.zeros(10, dtype=torch.long))
        batch = recorder.batch()
        seen |= set(batch.kinds.tolist())
        codes = apply_layer_commands(b, batch)
        assert w.digests(a) == w.digests(b), f"epoch {epoch}"
        accepted = [d for d in decisions if d.accepted]
        assert int((codes == Reason.OK).sum()) >= len(accepted) - sum(d.to_state == "GERMINATED" for d in accepted)
        torch.manual_seed(epoch)  # the replay must not depend on the global RNG
    assert {CommandKind.GERMINATE, CommandKind.REQUEST, CommandKind.REPORT} <= seen
    # Outside the recorder the layer's own methods are back.
    assert "process_lifecycle_command" not in a.__dict__ and "request_transitions" not in a.lifecycle.__dict__


def test_demo_runs_on_two_ranks(tmp_path) -> None:
    """``kasmina demo --nproc 2``'s engine, shortened: the SeedController on rank 0,
    its actions replayed on rank 1, layers checked bitwise-identical every epoch."""
    from kasmina.demo import DemoConfig
    from kasmina.demo_distributed import run_demo_distributed

    config = DemoConfig(
        epochs=4,
        seeds=4,
        out=tmp_path,
        name="two",
        controller=ControllerConfig(plateau_patience=1, plateau_min_delta=0.9, max_active=4),
    )
    result = run_demo_distributed(config, 2, progress=False, start_method="fork", deadline_s=150)
    run = tmp_path / "two"
    assert result.completed and result.lives  # seeds germinated (on rank 0, replayed on rank 1)
    records = [json.loads(line) for line in (run / "telemetry.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3] and {r["world_size"] for r in records} == {2}
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert (run / "lifecycle.png").stat().st_size > 0 and any((run / "checkpoints" / "active").iterdir())
