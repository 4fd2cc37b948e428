"""`python -m benchmarks.bench_blend [--device cpu|cuda] [--quick]`: the fused chunked blend
against the memory-traffic bound and the ways a user would write it in PyTorch.

For each shape, forward and forward+backward, the table gives the kasmina time and:

- ``bound``: the time the bytes the op must move would take at the rate of a ``clone``
  measured in the same run, divided by the kasmina time (1.0 = at the copy rate),
- ``x_eager``, ``x_lerp``, ``x_compile``: how many times faster kasmina is than the
  eager composite ``base + alpha.repeat_interleave(...) * (bp - base)``, ``torch.lerp``
  with the expanded weight, and ``torch.compile`` of the composite (all with autograd).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks._harness import Report, Stats, measure, parse_args
from kasmina import ops
from kasmina._reference import chunk_widths

Blend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    rows: int
    dim: int
    num_chunks: int
    half_off: bool = False

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.dim} S={self.num_chunks}" + (" half α=0" if self.half_off else "")


CASES = (Case(4096, 1024, 16), Case(256, 4096, 64), Case(64, 16384, 1024), Case(4096, 1024, 16, half_off=True))
QUICK_CASES = (Case(512, 1024, 16), Case(64, 4096, 64), Case(16, 16384, 1024), Case(512, 1024, 16, half_off=True))


def composite(num_chunks: int, dim: int, device: torch.device) -> Blend:
    """The eager composite a user would write."""
    repeats = torch.tensor(chunk_widths(dim, num_chunks), device=device)

    def blend(base: torch.Tensor, bp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return base + alpha.repeat_interleave(repeats, output_size=dim) * (bp - base)

    return blend


def lerp(num_chunks: int, dim: int, device: torch.device) -> Blend:
    repeats = torch.tensor(chunk_widths(dim, num_chunks), device=device)

    def blend(base: torch.Tensor, bp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return torch.lerp(base, bp, alpha.repeat_interleave(repeats, output_size=dim).expand_as(base))

    return blend


def forward_only(fn: Blend, base: torch.Tensor, bp: torch.Tensor, alpha: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            fn(base, bp, alpha)

    return step


def forward_backward(fn: Blend, leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(grad)

    return step


def interleaved(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, Stats]:
    """Median-ready samples of every step, taken in turn (one sample of each per round),
    so that load from other processes falls on all of them alike."""
    inner = {}
    for name, step in steps.items():
        warm = measure(step, device=device, warmup=2, repeats=1)
        inner[name] = max(1, int(5e-3 / max(warm.median, 1e-7)))  # about 5 ms per sample
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name] += measure(step, device=device, warmup=0, repeats=1, inner=inner[name]).samples
    return {name: Stats(tuple(values)) for name, values in samples.items()}


def run_case(case: Case, args, report: Report) -> None:
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.rows, case.dim)
    base = torch.randn(shape, device=device, generator=gen)
    bp = torch.randn(shape, device=device, generator=gen)
    grad = torch.randn(shape, device=device, generator=gen)
    alpha = torch.rand(case.num_chunks, device=device, generator=gen) * 0.9 + 0.05
    if case.half_off:
        alpha[::2] = 0.0
    active = float((alpha != 0).float().mean())

    def kasmina(b: torch.Tensor, p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return ops.chunked_blend(b, p, a, case.num_chunks)

    eager = composite(case.num_chunks, case.dim, device)
    variants: dict[str, Blend] = {
        "kasmina": kasmina,
        "eager": eager,
        "lerp": lerp(case.num_chunks, case.dim, device),
        "compile": torch.compile(eager, fullgraph=True, dynamic=False),
    }
    element = base.element_size() * base.numel()
    # Bytes the op must move: forward reads base and the active part of bp, writes out;
    # backward reads grad, base and the active part of bp, writes grad_base and grad_bp.
    needed = {"fwd": element * (2 + active), "fwd+bwd": element * (2 + active) + element * (4 + active)}

    leaves = [t.clone().requires_grad_(True) for t in (base, bp, alpha)]
    for mode in ("fwd", "fwd+bwd"):
        steps = {
            name: forward_only(fn, base, bp, alpha) if mode == "fwd" else forward_backward(fn, leaves, grad)
            for name, fn in variants.items()
        }
        steps["clone"] = base.clone  # the memory-traffic reference: moves 2 * element bytes
        times = interleaved(steps, device, args.repeats)
        k = times["kasmina"].median
        rate = 2 * element / times["clone"].median
        report.add(
            f"{case.name} {mode}",
            kasmina=times["kasmina"],
            bound=(needed[mode] / rate) / k,
            x_eager=times["eager"].median / k,
            x_lerp=times["lerp"].median / k,
            x_compile=times["compile"].median / k,
            spread=times["kasmina"].spread,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args("chunked blend benchmark", argv)
    report = Report("blend", "Chunked blend (float32)", args)
    report.note(
        "bound: time of the bytes the op must move at the rate of a same-size clone in this run, over the kasmina "
        "time (1.0 = copy speed); x_*: speed-up of kasmina over eager composite / torch.lerp / torch.compile "
        "(medians of samples taken in turn). Shared, noisy machine: compare ratios, not times."
    )
    for case in QUICK_CASES if args.quick else CASES:
        run_case(case, args, report)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
