"""`python -m benchmarks.bench_layer [--device cpu|cuda] [--quick]`: the cost of a
ChunkedKasminaLayer around a host layer, and of the grafting strategies.

Host ``Linear(1024, 1024)``, batch 256, S = 64 seeds (chunks of 16 features), one
forward + backward per call, as a ratio to the bare host layer measured in the same run:

- ``all dormant``: every seed DORMANT (telemetry on, training mode); target <= 1.05x;
- ``8 active`` / ``64 active``: seeds in FINE_TUNING (alpha 1, learning from the task
  loss) with ``mlp`` blueprints (16 -> 32 -> 16), all evaluated in one batched call.
  ``bp_flops`` is the blueprints' forward FLOPs as a fraction of the host's: the cost
  should follow it, not the seed count. ``x_loop`` is the speed-up over the same
  computation written as a Python loop over the active seeds (slice, blueprint, blend,
  ``torch.cat``).

Then ``compute_alpha`` for 100K seeds in one call (linear and adaptive), in seeds/s and
as a multiple of the seed document's 2K/s (target >= 1000x).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

import torch
from torch import nn

from benchmarks._harness import Report, Stats, measure, parse_args
from kasmina import ChunkedKasminaLayer, LifecyclePolicy
from kasmina._generated.lifecycle_tables import NUM_STATES
from kasmina.grafting import GraftingConfig, GraftingContext, create_strategy

DIM, BATCH, SEEDS = 1024, 256, 64
STRATEGY_SEEDS = 100_000
SEED_DOCUMENT_RATE = 2_000.0  # alpha computations per second claimed by the seed document
PATH = ("GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING")
GOOD = {"performance_delta": 0.1, "stability_score": 0.9, "reconstruction_loss": 0.0}


def make_layer(active: int, device: torch.device) -> ChunkedKasminaLayer:
    """A layer whose first ``active`` seeds are in FINE_TUNING with mlp blueprints."""
    torch.manual_seed(0)
    policy = LifecyclePolicy.default().with_overrides(min_epochs=dict.fromkeys(range(NUM_STATES), 0))
    layer = ChunkedKasminaLayer(nn.Linear(DIM, DIM), SEEDS, policy=policy).to(device)
    for seed in range(active):
        assert layer.germinate(seed, "mlp").success
        layer.report_metrics(seed, **GOOD)
        for src, dst in itertools.pairwise(PATH):
            if dst == "STABILIZATION":
                layer.step_epoch()  # the one-epoch ramp brings alpha to 1
            result = layer.transition(seed, src, dst)
            assert result.success, result.reason
    return layer.train()


def loop_reference(layer: ChunkedKasminaLayer, active: int):
    """The layer's computation as a Python loop over the active seeds."""
    blueprints = [layer.blueprint(s) for s in range(active)]
    starts = [layer.layout.start(s) for s in range(SEEDS)] + [DIM]

    def forward(x: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer(x)
        pieces = []
        for s in range(SEEDS):
            chunk = base[:, starts[s] : starts[s + 1]]
            if s < active:
                chunk = chunk + layer.alpha[s] * (blueprints[s](chunk) - chunk)
            pieces.append(chunk)
        return torch.cat(pieces, dim=1)

    return forward


def fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        fn(x).backward(grad)

    return run


def interleaved(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int) -> dict[str, Stats]:
    """Time every function in short alternating bursts (3 calls each, ``rounds`` times),
    so a load change on the shared machine hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        measure(fn, device=device, warmup=3, repeats=1)
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += measure(fn, device=device, warmup=0, repeats=3).samples
    return {name: Stats(tuple(values)) for name, values in samples.items()}


def bench_layer(report: Report, device: torch.device, repeats: int) -> None:
    x = torch.randn(BATCH, DIM, device=device)
    grad = torch.randn(BATCH, DIM, device=device)
    host_flops = 2 * BATCH * DIM * DIM
    for case, active in (("all dormant", 0), ("8 active", 8), ("64 active", 64)):
        layer = make_layer(active, device)
        fns = {"host": fwd_bwd(layer.base_layer, x, grad), "layer": fwd_bwd(layer, x, grad)}
        if active:
            fns["loop"] = fwd_bwd(loop_reference(layer, active), x, grad)
        stats = interleaved(fns, device, repeats)
        host, ours = stats["host"], stats["layer"]
        row = {"host": host, "layer": ours, "ratio_to_host": ours.median / host.median}
        if active:
            kind = layer.blueprint(0).kind
            row["bp_flops"] = active * BATCH * kind.flops_per_row(DIM // SEEDS) / host_flops
            row["x_loop"] = stats["loop"].median / ours.median
        report.add(f"Linear({DIM},{DIM}) b{BATCH} S={SEEDS}: {case}", **row)


def bench_strategies(report: Report, device: torch.device, repeats: int) -> None:
    n = STRATEGY_SEEDS
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(n, generator=gen).to(device)
    epochs = torch.randint(0, 50, (n,), generator=gen).float().to(device)
    alpha = (epochs / 50).clamp(max=1)
    delta = (torch.randn(n, generator=gen) * 0.02).to(device)
    for name in ("linear", "adaptive"):
        strategy = create_strategy(name, n, GraftingConfig(ramp_epochs=50) if name == "linear" else None, device=device)
        ctx = GraftingContext(ids, epochs, alpha, performance_delta=delta)
        stats = measure(lambda s=strategy, c=ctx: s.compute_alpha(c), device=device, repeats=repeats, warmup=3)
        rate = stats.rate(n)
        report.add(f"compute_alpha {name}, {n} seeds", time=stats, seeds_per_s=rate, x_seed_doc=rate / SEED_DOCUMENT_RATE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args("ChunkedKasminaLayer and grafting strategy benchmark", argv)
    device = torch.device(args.device)
    report = Report("layer", "ChunkedKasminaLayer overhead and grafting strategies", args)
    bench_layer(report, device, args.repeats)
    bench_strategies(report, device, args.repeats)
    report.note("ratio_to_host: forward+backward time / the bare host layer's (target <= 1.05 all dormant).")
    report.note("bp_flops: blueprint forward FLOPs / host forward FLOPs; x_loop: speed-up over a per-seed Python loop.")
    report.note("x_seed_doc: seeds/s / the seed document's 2K alpha computations per second (target >= 1000).")
    report.note("Shared, noisy machine: compare ratios within one run, not absolute times.")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
