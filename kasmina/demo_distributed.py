"""``kasmina demo --nproc N``: the demo under ``torch.distributed`` (gloo, CPU).

The same run as :mod:`kasmina.demo` — same data, host, controller, policy and
outputs — on ``N`` processes started the way ``torchrun`` would
(:func:`kasmina.distributed_launch.launch`). Every global batch is split across the
ranks and the model trains under :class:`~kasmina.KasminaDDP`; each epoch boundary runs
the protocol of :mod:`kasmina.distributed_layer`:

1. the ranks' layer measurements are all-reduced and ``layer.step_epoch()`` runs on
   every rank;
2. the :class:`~kasmina.controller.SeedController` runs on rank 0 only, inside a
   :class:`~kasmina.distributed_layer.CommandRecorder`; what it did to the layer is
   broadcast as one command tensor and replayed on the other ranks
   (:func:`~kasmina.distributed_layer.controlled_step`);
3. DDP is rebuilt when germination, freezing or recycling changed the trainable
   parameters, and every rank proves it holds a bitwise-identical layer
   (``LifecycleSync.check_consistency``).

Rank 0 writes the outputs (``telemetry.jsonl``, ``lifecycle.png``, ``summary.json``,
one checkpoint per epoch); its checkpoints resume in one process with ``kasmina demo
--resume`` (2 ranks → 1). The baseline is trained in one process, as in the demo.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .checkpoint import CheckpointManager
from .controller import SeedController, scaled_policy
from .demo import (
    DemoConfig,
    DemoError,
    DemoResult,
    RunLog,
    ablation_losses,
    banner,
    batch_indices,
    build_models,
    evaluate,
    load_digits_split,
)
from .distributed import LifecycleSync
from .distributed_launch import launch
from .distributed_layer import KasminaDDP, controlled_step, sync_layer_measurements
from .layer import ChunkedKasminaLayer
from .telemetry import ExtendedTelemetry, JsonlWriter

__all__ = ["run_demo_distributed"]


def run_demo_distributed(
    config: DemoConfig,
    nproc: int,
    progress: bool = True,
    start_method: str = "spawn",
    timeout_s: float = 120.0,
    deadline_s: float = 3600.0,
) -> DemoResult:
    """Run the demo on ``nproc`` gloo ranks on CPU; returns rank 0's result. A rank
    waiting longer than ``timeout_s`` for the others fails the run; the whole run is
    stopped after ``deadline_s``."""
    if nproc < 2:
        raise DemoError(f"--nproc {nproc}: a distributed run needs at least 2 processes")
    if getattr(config, "tensorboard", False):
        raise DemoError("--tensorboard is not available with --nproc; telemetry.jsonl is written as usual")
    if torch.device(config.device).type != "cpu":
        raise DemoError(f"--nproc runs gloo ranks on CPU; --device {config.device} is not supported with it")
    run_dir = config.run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DemoError(f"{run_dir} already exists; pick another --name or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    results = launch(
        _rank_main,
        nproc,
        (config, progress),
        timeout_s=timeout_s,
        deadline_s=deadline_s,
        start_method=start_method,
        threads_per_rank=1,
    )
    return results[0]


def _rank_main(rank: int, config: DemoConfig, progress: bool) -> DemoResult | None:
    from tqdm import tqdm

    started = time.perf_counter()
    world = dist.get_world_size()
    device = torch.device(config.device)
    run_dir = config.run_dir
    train, val, test = load_digits_split(device)
    epochs = int(config.epochs)
    policy = scaled_policy(epochs, config.policy_fraction)
    model, baseline = build_models(config, policy)
    layer: ChunkedKasminaLayer = model.hidden  # type: ignore[assignment]
    controller = SeedController(layer, config.controller)
    sync = LifecycleSync()
    ddp = KasminaDDP(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ablate = ablation_losses(model, val)
    lead = rank == 0
    if lead:
        (run_dir / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
        manager = CheckpointManager(run_dir / "checkpoints", max_checkpoints_per_seed=3)
        telemetry = ExtendedTelemetry(layer)
        writer = JsonlWriter(run_dir / "telemetry.jsonl", mode="w")
        print(banner(config, policy, f" on {world} gloo ranks"), flush=True)
    bar = tqdm(range(epochs), desc="grow", unit="ep", disable=not (progress and lead), dynamic_ncols=True)
    log = RunLog(model, controller, manager, telemetry, writer, bar, extra={"world_size": world}) if lead else None
    for epoch in bar:
        train_metrics = _train_epoch(ddp, model, layer, optimizer, train, config, epoch, sync)
        sync_layer_measurements(layer, sync)
        layer.step_epoch()
        val_loss, val_acc, predictions = evaluate(model, val)  # every rank: the same numbers
        decisions = controlled_step(layer, sync, lambda: controller.step(epoch, val_loss, predictions, ablate))  # noqa: B023
        ddp.refresh(optimizer, lr=config.blueprint_lr)
        sync.check_consistency(layer, what=f"the seeded layer after epoch {epoch}")
        if log is not None:
            log.epoch(epoch, train_metrics, (val_loss, val_acc), optimizer, decisions)
    bar.close()
    if log is None:
        return None
    writer.close()
    result = log.finish(config, baseline, train, test, started)
    print(f"ranks held bitwise-identical layers after each of the {epochs} epochs (check_consistency)", flush=True)
    return result


def _train_epoch(
    ddp: KasminaDDP,
    model: torch.nn.Module,
    layer: ChunkedKasminaLayer,
    optimizer: torch.optim.Optimizer,
    data: Any,
    config: DemoConfig,
    epoch: int,
    sync: LifecycleSync,
) -> tuple[float, float]:
    """The demo's epoch with every global batch split across the ranks; returns the
    global (mean task loss, accuracy)."""
    model.train()
    total_loss = torch.zeros(())
    correct = torch.zeros(())
    for idx in batch_indices(len(data.y), config.batch_size, config.seed, epoch, data.x.device):
        shard = idx[sync.rank :: sync.world_size]
        logits = ddp(data.x[shard])
        loss = F.cross_entropy(logits, data.y[shard])
        optimizer.zero_grad(set_to_none=True)
        (loss + layer.auxiliary_loss()).backward()
        optimizer.step()
        total_loss += loss.detach() * len(shard)
        correct += (logits.argmax(1) == data.y[shard]).sum()
    sums = sync.reduce_metrics({"loss": total_loss, "correct": correct}, "sum")
    n = len(data.y)
    return float(sums["loss"]) / n, float(sums["correct"]) / n


def result_summary(result: DemoResult) -> dict[str, Any]:
    """The result as plain values (for tests and logs)."""
    return asdict(result)
