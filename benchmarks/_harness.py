"""Shared timing for every benchmark in `benchmarks/`.

Figures are ratios against a reference measured in the same run, because absolute
times on a shared machine say little. Typical use::

    args = parse_args("blend benchmark")
    report = Report("blend", "Chunked blend", args)
    ref = measure(lambda: x.clone(), device=args.device)
    op = measure(lambda: blend(x, y, a, 16), device=args.device)
    report.add("4096x1024 S=16", op=op, reference=ref, ratio=ref.median / op.median)
    report.finish()

``finish`` prints a Markdown table and writes ``<out>/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path("bench_results")


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the timed repeats."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p10(self) -> float:
        return _quantile(self.samples, 0.10)

    @property
    def p90(self) -> float:
        return _quantile(self.samples, 0.90)

    @property
    def p99(self) -> float:
        return _quantile(self.samples, 0.99)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the measurement was."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else math.inf

    def rate(self, items: float) -> float:
        """Items per second at the median."""
        return items / self.median

    def to_json(self) -> dict[str, float]:
        return {
            "median_s": self.median,
            "p10_s": self.p10,
            "p90_s": self.p90,
            "p99_s": self.p99,
            "min_s": self.min,
            "spread": self.spread,
            "repeats": len(self.samples),
        }


def _quantile(samples: tuple[float, ...], q: float) -> float:
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _sync(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], Any],
    *,
    device: str | torch.device | None = None,
    warmup: int = 3,
    repeats: int = 20,
    inner: int = 1,
    min_seconds: float = 0.0,
) -> Stats:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` samples of ``inner`` calls
    each (seconds per call). Keeps sampling until ``min_seconds`` of samples exist.
    CUDA work is synchronised around each sample."""
    for _ in range(warmup):
        fn()
    _sync(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    samples: list[float] = []
    total = 0.0
    try:
        while len(samples) < repeats or total < min_seconds:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            elapsed = (time.perf_counter() - start) / inner
            samples.append(elapsed)
            total += elapsed * inner
    finally:
        if gc_was_enabled:
            gc.enable()
    return Stats(tuple(samples))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, Stats]:
    """Time several functions in rotation: ``warmup`` untimed rounds, then ``repeats``
    rounds of one timed call of each (seconds per call), so slow phases of a shared
    machine (load bursts, disk write-back) hit all of them alike. Every call of a round
    runs in the same order, so functions holding collectives stay in step across ranks.
    No CUDA synchronisation: for host-side work (files, collectives, bookkeeping)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Stats(tuple(values)) for name, values in samples.items()}


def copy_rate(nbytes: int, *, device: str | torch.device = "cpu", repeats: int = 20) -> tuple[float, Stats]:
    """Bytes per second moved by a ``clone`` of ``nbytes`` (read + write counted), the
    memory-traffic reference. Returns (rate, stats of one clone)."""
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device).uniform_()
    stats = measure(src.clone, device=device, repeats=repeats)
    return 2 * src.numel() * 4 / stats.median, stats


@dataclass
class Report:
    """Rows of one benchmark, printed as Markdown and saved as JSON."""

    name: str
    title: str
    args: argparse.Namespace
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, case: str, **columns: Any) -> None:
        """One row: ``case`` plus columns; Stats values become their median."""
        self.rows.append({"case": case, **columns})
        print(f"  {case}: " + ", ".join(f"{k}={_cell(v)}" for k, v in columns.items()), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def markdown(self) -> str:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        lines = [
            f"### {self.title}",
            "",
            f"_{environment_line(self.args.device)}_",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in self.rows]
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def finish(self) -> Path:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = self.markdown()
        print()
        print(text)
        (out / f"{self.name}.md").write_text(text)
        payload = {
            "name": self.name,
            "title": self.title,
            "environment": environment(self.args.device),
            "rows": [{k: _jsonable(v) for k, v in row.items()} for row in self.rows],
            "notes": self.notes,
        }
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stats):
        return value.to_json()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _cell(value: Any) -> str:
    if isinstance(value, Stats):
        return format_seconds(value.median)
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_seconds(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import kasmina

        info["kasmina_backend"] = kasmina.backend_description()
    except ImportError:
        pass
    return info


def environment_line(device: str) -> str:
    env = environment(device)
    where = env.get("gpu", f"{env['machine']} CPU, {env['cpu_threads']} threads")
    return f"torch {env['torch']}, {where}, kasmina backend: {env.get('kasmina_backend', 'n/a')}"


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The options every benchmark takes: --device, --quick, --out, --repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats, for a smoke run")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON and Markdown results")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    return args
