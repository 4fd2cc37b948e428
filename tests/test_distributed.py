"""Multi-process lifecycle synchronisation (kasmina.distributed*).

Wire-format and single-process tests run in the pytest process; the multi-process
tests spawn 2 gloo ranks on CPU through ``kasmina.distributed_launch.launch`` (bounded:
process-group timeout, grace period and deadline; every process is gone when it
returns) with the rank bodies in ``tests/_distributed_workers.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from kasmina._generated.lifecycle_tables import CONTEXT_FIELDS, ExtendedLifecycle, Reason, StateColumn
from kasmina.distributed import (
    CommandBatch,
    CommandKind,
    DistributedSyncError,
    LifecycleCommand,
    LifecycleSync,
    apply_commands,
    tensor_digest,
)
from kasmina.state import ExtendedStateTensor

D = ExtendedLifecycle


def _mixed_commands() -> list[LifecycleCommand]:
    return [
        LifecycleCommand.germinate(0, blueprint_id=2, strategy="momentum", init_seed=2**31 - 1),
        LifecycleCommand.transition(1, D.TRAINING, D.GRAFTING, {"reconstruction_loss": 0.005}),
        LifecycleCommand.transition(2, D.EVALUATING, D.CULLED, {"performance_delta": -0.2, "error_rate": float("nan")}),
        LifecycleCommand.cancel(3, D.GERMINATED),
        LifecycleCommand.rollback(4, D.GRAFTING),
        LifecycleCommand.recycle(5, D.CULLED),
    ]


# ---- wire format ------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 4, 6, 64])
def test_encode_decode_round_trip_is_bitwise(capacity: int) -> None:
    batch = CommandBatch.from_commands(_mixed_commands())
    message, rest = batch.encode(sequence=7, capacity=capacity)
    assert message.dtype == torch.int32 and message.numel() == 8 + capacity * (7 + len(CONTEXT_FIELDS))
    assert (rest is None) == (len(batch) <= capacity)
    assert CommandBatch.overflow_words(message) == (0 if rest is None else rest.numel())
    decoded = CommandBatch.decode(message, rest, sequence=7)
    for name in ("kinds", "seed_ids", "from_states", "to_states", "blueprint_ids", "strategies", "init_seeds"):
        assert torch.equal(getattr(decoded, name), getattr(batch, name)), name
    # The float context travels as its bit pattern: NaN (not supplied) and every value exact.
    assert torch.equal(decoded.context.view(torch.int32), batch.context.view(torch.int32))
    assert decoded.to_commands() == batch.to_commands()


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
    drawn = LifecycleCommand.germinate(1, 1).init_seed
    torch.manual_seed(5)
    assert LifecycleCommand.germinate(1, 1).init_seed == drawn  # drawn from the controller's torch RNG


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
        LifecycleCommand.transition(0, 0, 11)
    with pytest.raises(ValueError, match="seed_id=-1"):
        LifecycleCommand.transition(-1, 0, 1)
    with pytest.raises(ValueError, match="unknown context field"):
        LifecycleCommand.transition(0, 2, 3, {"recon": 0.0})
    with pytest.raises(ValueError, match="unknown grafting strategy 'zigzag'"):
        LifecycleCommand.germinate(0, 1, "zigzag")
    with pytest.raises(ValueError, match="init_seed=-3"):
        LifecycleCommand.germinate(0, 1, init_seed=-3)
    with pytest.raises(ValueError, match="blueprint_id=-1"):
        LifecycleCommand.germinate(0, -1)
    with pytest.raises(TypeError, match="not a LifecycleCommand"):
        CommandBatch.from_commands([("germinate", 0)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="context must be"):
        CommandBatch(*[torch.zeros(1, dtype=torch.int32)] * 7, context=torch.zeros(1, 2))


# ---- applying a batch ---------------------------------------------------------------------


def test_apply_commands_is_one_batched_judgement_and_records_blueprints() -> None:
    state = ExtendedStateTensor(6)
    before = {k: v.clone() for k, v in state.state_dict().items()}
    batch = CommandBatch.from_commands(
        [
            LifecycleCommand.germinate(0, blueprint_id=1, strategy="adaptive"),
            LifecycleCommand.germinate(1, blueprint_id=2),
            LifecycleCommand.germinate(1, blueprint_id=2),  # duplicate: both rejected
            LifecycleCommand.transition(2, D.TRAINING, D.GRAFTING),  # stale: seed 2 is DORMANT
            LifecycleCommand.germinate(9, blueprint_id=0),  # no such seed
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
