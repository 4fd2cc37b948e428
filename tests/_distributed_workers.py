"""Rank bodies and the shared training driver of tests/test_distributed.py.

A spawned rank imports this module by name (pytest puts tests/ on ``sys.path`` and the
spawn start method hands ``sys.path`` to the children), so it holds no test functions.

The model is a ``ChunkedKasminaLayer`` on ``Linear(8, 16)`` with 4 seeds regressing a
fixed random target; with SGD (no momentum) everything trainable and every piece of
optimiser-free state lives in the layer, so a layer checkpoint is a full resume point.
The controller follows a fixed plan per seed, but every move is judged by the real
lifecycle (minimum epochs, guards on the synced measured reconstruction loss, alpha
continuity); seed 0 stays DORMANT.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kasmina._generated.lifecycle_tables import ExtendedLifecycle, StateColumn
from kasmina.checkpoint import CheckpointManager
from kasmina.distributed import CommandBatch, LifecycleSync, SeedCommand, tensor_digest
from kasmina.distributed_layer import (
    KasminaDDP,
    apply_layer_commands,
    restore_layer_checkpoint,
    save_layer_checkpoint,
    sync_layer_measurements,
)
from kasmina.layer import ChunkedKasminaLayer
from kasmina.policy import LifecyclePolicy

S = ExtendedLifecycle
STEPS = 3
BATCH = 16
LAYER_ID = "dist"
POLICY = LifecyclePolicy.default().with_overrides(
    min_epochs={
        "TRAINING": 2,
        "GRAFTING": 2,
        "STABILIZATION": 1,
        "EVALUATING": 1,
        "FINE_TUNING": 1,
        "CULLED": 1,
        "ROLLED_BACK": 1,
    },
    params={"reconstruction_threshold": 10.0},
)
# Per seed: blueprint kind, and the move the controller asks for in each state.
PLANS: dict[int, tuple[str, dict[int, tuple[str, int, dict[str, float]]]]] = {
    1: (
        "mlp",
        {
            S.GERMINATED: ("transition", S.TRAINING, {}),
            S.TRAINING: ("transition", S.GRAFTING, {}),
            S.GRAFTING: ("transition", S.STABILIZATION, {}),
            S.STABILIZATION: ("transition", S.EVALUATING, {}),
            S.EVALUATING: ("transition", S.FINE_TUNING, {"performance_delta": 0.1, "stability_score": 0.9}),
            S.FINE_TUNING: ("transition", S.FOSSILIZED, {"total_improvement": 0.05, "final_stability": 0.99}),
        },
    ),
    2: (
        "low_rank",
        {
            S.GERMINATED: ("transition", S.TRAINING, {}),
            S.TRAINING: ("transition", S.GRAFTING, {}),
            S.GRAFTING: ("transition", S.STABILIZATION, {}),
            S.STABILIZATION: ("transition", S.EVALUATING, {}),
            S.EVALUATING: ("transition", S.CULLED, {"performance_delta": -0.2}),
            S.CULLED: ("recycle", S.DORMANT, {}),
        },
    ),
    3: (
        "residual_linear",
        {
            S.GERMINATED: ("transition", S.TRAINING, {}),
            S.TRAINING: ("transition", S.GRAFTING, {}),
            S.GRAFTING: ("rollback", S.ROLLED_BACK, {}),
            S.ROLLED_BACK: ("recycle", S.DORMANT, {}),
        },
    ),
}


def controller(layer: ChunkedKasminaLayer, epoch: int) -> list[SeedCommand]:
    """The commands of one epoch boundary (runs on the controller's rank only)."""
    states = layer.state.state[:, StateColumn.LIFECYCLE_STATE].tolist()
    cmds = []
    for seed, (kind, plan) in PLANS.items():
        state = states[seed]
        if state == S.DORMANT and epoch == 0:
            cmds.append(SeedCommand.germinate(seed, layer.blueprint_registry.resolve(kind), "linear"))
        elif state in plan:
            how, target, context = plan[state]
            if how == "transition":
                cmds.append(SeedCommand.transition(seed, state, target, context))
            else:
                cmds.append(getattr(SeedCommand, how)(seed, state))
    return cmds


def build_layer() -> ChunkedKasminaLayer:
    torch.manual_seed(0)
    return ChunkedKasminaLayer(nn.Linear(8, 16), 4, layer_id=LAYER_ID, policy=POLICY)


def batch(epoch: int, step: int, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``shard``'s batch (shard -1: the batch every rank sees, replicated)."""
    target = torch.randn(8, 16, generator=torch.Generator().manual_seed(123))
    x = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(1000 * epoch + 10 * step + shard + 1))
    return x, torch.tanh(x @ target)


@dataclass
class Trace:
    """What happened, per epoch boundary (returned to pytest)."""

    states: list[list[int]] = field(default_factory=list)
    alphas: list[list[float]] = field(default_factory=list)
    codes: list[list[int]] = field(default_factory=list)
    broadcasts: list[int] = field(default_factory=list)
    local: list[int] = field(default_factory=list)
    rebuilds: int = 0


class _CountingBroadcast:
    """Counts ``dist.broadcast`` calls (to prove one collective per boundary)."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = dist.broadcast

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


def run_epochs(
    layer: ChunkedKasminaLayer, sync: LifecycleSync, epochs: range, replicated: bool, trace: Trace, check: bool
) -> None:
    """Train ``epochs`` with the full epoch-boundary protocol of kasmina.distributed_layer."""
    ddp = KasminaDDP(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    ddp.refresh(opt)
    counter = _CountingBroadcast()
    for epoch in epochs:
        for step in range(STEPS):
            x, y = batch(epoch, step, -1 if replicated else sync.rank)
            loss = nn.functional.mse_loss(ddp(x), y) + layer.auxiliary_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        trace.local.append(tensor_digest(torch.cat([layer._recon_sum, layer.chunk_mean, layer.chunk_var])))
        sync_layer_measurements(layer, sync)
        layer.step_epoch()
        cmds = controller(layer, epoch) if sync.is_controller else None
        dist.broadcast, before = counter, counter.calls  # type: ignore[assignment]
        try:
            commands: CommandBatch = sync.broadcast_commands(cmds)
        finally:
            dist.broadcast = counter.real
        results = apply_layer_commands(layer, commands)
        if check:
            sync.check_consistency(layer, what=f"layer after epoch {epoch}")
        ddp.refresh(opt)
        trace.broadcasts.append(counter.calls - before)
        trace.states.append(layer.state.state[:, StateColumn.LIFECYCLE_STATE].tolist())
        trace.alphas.append(layer.get_alpha().tolist())
        trace.codes.append(results.tolist())
    trace.rebuilds += ddp.rebuilds


def digests(layer: nn.Module) -> dict[str, int]:
    return {k: tensor_digest(v) for k, v in layer.state_dict().items()}


def two_rank_run(rank: int, ckpt_dir: str, first_epoch: int, split_epoch: int, last_epoch: int) -> dict[str, Any]:
    """Restore the 1-process checkpoint (1 -> 2), train sharded to ``split_epoch``, save
    a checkpoint (2 -> 1), train on replicated batches to ``last_epoch``."""
    sync = LifecycleSync(capacity=2)  # 3 germinations at once exercise the overflow message
    manager = CheckpointManager(ckpt_dir, durable=False)
    layer = build_layer()
    restore_layer_checkpoint(layer, manager, sync=sync)
    restored = digests(layer)
    trace = Trace()
    run_epochs(layer, sync, range(first_epoch, split_epoch), replicated=False, trace=trace, check=True)
    checkpoint_id = save_layer_checkpoint(layer, manager, sync, metadata={"epoch": split_epoch})
    at_split = digests(layer)
    run_epochs(layer, sync, range(split_epoch, last_epoch), replicated=True, trace=trace, check=True)
    return {
        "restored": restored,
        "at_split": at_split,
        "final": digests(layer),
        "checkpoint_id": checkpoint_id,
        "trace": trace,
        "world": dist.get_world_size(),
    }


def failing_run(rank: int, mode: str) -> None:
    """Train with the protocol; rank 1 dies (or hangs) before the second boundary."""
    sync = LifecycleSync()
    layer = build_layer()
    ddp = KasminaDDP(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for epoch in range(4):
        for step in range(STEPS):
            x, y = batch(epoch, step, rank)
            loss = nn.functional.mse_loss(ddp(x), y) + layer.auxiliary_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 1 and epoch == 1:
            # Let rank 0 finish reading this epoch's last gradients and reach the boundary.
            time.sleep(0.5)
            if mode == "die":
                os._exit(17)
            time.sleep(60)  # hang: the launcher's grace period ends it
        sync_layer_measurements(layer, sync)
        layer.step_epoch()
        apply_layer_commands(layer, sync.broadcast_commands(controller(layer, epoch) if sync.is_controller else None))
        ddp.refresh(opt)


def collectives_probe(rank: int) -> dict[str, Any]:
    """LifecycleSync's collectives on rank-specific inputs (returned for pytest)."""
    from kasmina.distributed import RankDivergenceError

    sync = LifecycleSync()
    r = float(rank)
    reduced = sync.reduce_metrics(
        {
            "mean": torch.tensor([r, 2.0, float("nan")]),
            "sum": torch.tensor([1 + rank], dtype=torch.int32),
            "max": torch.tensor([r, -r]),
            "min": torch.tensor([r, -r]),
        },
        {"mean": "mean", "sum": "sum", "max": "max", "min": "min"},
    )
    direct = torch.full((4,), 10.0 * rank)
    same = sync.reduce_metrics({"m": direct}, inplace=True)["m"]
    flags = torch.tensor([rank == 1, False])
    sync.reduce_metrics({"f": flags, "c": torch.tensor([rank])}, {"f": "max", "c": "sum"}, inplace=True)
    try:
        sync.check_consistency({"same": torch.ones(3), "differs": torch.tensor([rank])})
        divergence = ""
    except RankDivergenceError as exc:
        divergence = str(exc)
    return {
        "reduced": {k: v.tolist() for k, v in reduced.items()},
        "dtypes": {k: str(v.dtype) for k, v in reduced.items()},
        "inplace_is_same_tensor": same is direct,
        "direct": direct.tolist(),
        "flags": flags.tolist(),
        "divergence": divergence,
        "world": (rank, dist.get_world_size()),
    }


def subgroup_checkpoint(rank: int, ckpt_dir: str) -> str:
    """A whole-layer checkpoint saved through a LifecycleSync on a group without global
    rank 0, with a BatchNorm in the host (a 0-dim buffer for check_consistency)."""
    group = dist.new_group([1, 2])
    if rank == 0:
        return "not in the group"
    sync = LifecycleSync(group=group, controller_rank=1)
    torch.manual_seed(0)
    layer = ChunkedKasminaLayer(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), 4, out_features=8)
    sync.check_consistency(layer)
    return save_layer_checkpoint(layer, CheckpointManager(ckpt_dir), sync)
