"""`python -m benchmarks [--device cpu|cuda] [--quick] [--out DIR]`: run every benchmark
and gather their Markdown tables into ``<out>/BENCHMARKS.md``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ._harness import parse_args

BENCHMARKS = ("bench_lifecycle", "bench_blend", "bench_checkpoint", "bench_layer", "bench_distributed")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args("Run every Kasmina benchmark", argv)
    sections = []
    for name in BENCHMARKS:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            continue
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        module.main(argv)
        sections.append(Path(args.out) / f"{name.removeprefix('bench_')}.md")
    out = Path(args.out) / "BENCHMARKS.md"
    out.write_text("\n".join(p.read_text() for p in sections if p.exists()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
