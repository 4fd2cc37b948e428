"""Per-epoch-boundary synchronisation cost of the distributed lifecycle protocol.

Two gloo ranks on CPU (``kasmina.distributed_launch.launch``). At N seeds one epoch
boundary is: all-reduce the per-seed metrics that feed guards (the (N, 4) float32
``metrics`` buffer, mean) → the controller's batch of 64 mixed commands broadcast as one
tensor → every rank applies it to its ``ExtendedStateTensor``. Reference: a bare
``all_reduce`` of a float32 tensor of the same total bytes (metrics + command message)
on the same process group, timed in the same run. Ratio = boundary time / reference
time (1.0 = the protocol costs no more than moving its bytes once).

``python -m benchmarks.bench_distributed [--quick] [--out DIR]``
"""

from __future__ import annotations

import sys

import torch

try:
    from ._harness import Report, Stats, interleaved, parse_args
except ImportError:  # run as a script
    from _harness import Report, Stats, interleaved, parse_args  # type: ignore[no-redef]

from kasmina._generated.lifecycle_tables import ExtendedLifecycle
from kasmina.distributed import (
    _FIXED_COLUMNS,
    _HEADER_WORDS,
    _NUM_FIELDS,
    CommandBatch,
    LifecycleSync,
    SeedCommand,
    apply_commands,
)
from kasmina.distributed_launch import launch
from kasmina.state import ExtendedStateTensor

COMMANDS_PER_BOUNDARY = 64
SIZES = (1_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 100_000)


def _commands(num_seeds: int) -> CommandBatch:
    """A realistic mix: germinations, guarded moves (some pass, some stale), culls."""
    gen = torch.Generator().manual_seed(0)
    seeds = torch.randperm(num_seeds, generator=gen)[:COMMANDS_PER_BOUNDARY].tolist()
    d = ExtendedLifecycle
    cmds = []
    for i, s in enumerate(seeds):
        if i % 4 == 0:
            cmds.append(SeedCommand.germinate(s, blueprint_id=1, init_seed=i))
        elif i % 4 == 1:
            cmds.append(SeedCommand.transition(s, d.TRAINING, d.GRAFTING, {"reconstruction_loss": 0.005}))
        elif i % 4 == 2:
            cmds.append(SeedCommand.transition(s, d.EVALUATING, d.CULLED, {"performance_delta": -0.1}))
        else:
            cmds.append(SeedCommand.cancel(s, d.GERMINATED))
    return CommandBatch.from_commands(cmds)


def _measure(sync: LifecycleSync, n: int, repeats: int) -> dict[str, Stats | int]:
    state = ExtendedStateTensor(n)
    state.metrics.uniform_()
    batch = _commands(n) if sync.is_controller else None
    message_bytes = (_HEADER_WORDS + sync.capacity * (_FIXED_COLUMNS + _NUM_FIELDS)) * 4  # the broadcast's int32 words
    ref_tensor = torch.empty((state.metrics.numel() * 4 + message_bytes) // 4, dtype=torch.float32).uniform_()

    def boundary() -> None:
        sync.reduce_metrics({"metrics": state.metrics}, inplace=True)
        apply_commands(state, sync.broadcast_commands(batch))

    def reduce_only() -> None:
        sync.reduce_metrics({"metrics": state.metrics}, inplace=True)

    def broadcast_only() -> None:
        apply_commands(state, sync.broadcast_commands(batch))

    def bare() -> None:
        torch.distributed.all_reduce(ref_tensor)

    stats: dict[str, Stats | int] = dict(
        interleaved({"bare": bare, "boundary": boundary, "reduce": reduce_only, "commands": broadcast_only}, repeats)
    )
    stats["bytes"] = ref_tensor.numel() * 4
    return stats


def _rank(rank: int, sizes: tuple[int, ...], repeats: int) -> dict[int, dict[str, Stats | int]] | None:
    sync = LifecycleSync()
    out = {n: _measure(sync, n, max(5, repeats // 2) if n >= 1_000_000 else 2 * repeats) for n in sizes}
    return out if rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args("Kasmina distributed epoch-boundary synchronisation benchmark", argv)
    if args.device != "cpu":
        print("bench_distributed: runs 2 gloo ranks on CPU; --device is ignored", file=sys.stderr)
    report = Report("distributed", "Distributed epoch boundary (2 gloo ranks, CPU)", args)
    sizes = QUICK_SIZES if args.quick else SIZES
    results = launch(_rank, 2, (sizes, args.repeats), timeout_s=120, deadline_s=900)[0]
    for n in sizes:
        r = results[n]
        bare, boundary = r["bare"], r["boundary"]
        report.add(
            f"{n:,} seeds",
            bytes=r["bytes"],
            bare_all_reduce=bare,
            boundary=boundary,
            ratio=boundary.median / bare.median,
            metric_reduce=r["reduce"],
            command_bcast_apply=r["commands"],
            spread=boundary.spread,
        )
    report.note(
        f"boundary = all_reduce (in place) of the (N, 4) float32 metrics + one broadcast of {COMMANDS_PER_BOUNDARY} commands "
        "(padded 256-command message) + apply_commands on the ExtendedStateTensor; ratio = boundary / bare all_reduce "
        "of the same bytes on the same gloo group."
    )
    report.note("Shared 2-core machine with other jobs running: absolute times are noisy, ratios less so.")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
