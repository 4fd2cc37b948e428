"""The ``kasmina`` command line.

::

    kasmina demo [--epochs N] [--seeds S] [--device D] [--seed K] [--out DIR] [--name NAME] [--resume RUN] [--nproc N]
    kasmina spec validate [FILE]
    kasmina spec diagram [--format mermaid|dot] [--spec FILE]
    kasmina ckpt ls|verify|migrate DIR
    kasmina bench [--quick] [--device D] [--out DIR]
    kasmina info

Exit codes: 0 success, 1 the command ran and found a failure (invalid spec, corrupt
checkpoint, failing benchmark), 2 bad usage or user error (printed as one line, no
traceback).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UserError(Exception):
    """A mistake of the user's (bad path, bad value): one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


# ---- demo -----------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, DemoError, run_demo

    try:
        if args.resume is not None:
            config = DemoConfig.for_resume(Path(args.resume), device=args.device)
        else:
            config = DemoConfig(
                epochs=args.epochs,
                seeds=args.seeds,
                device=args.device,
                seed=args.seed,
                out=Path(args.out),
                name=args.name,
                tensorboard=args.tensorboard,
            )
        if args.nproc > 1:
            if args.resume is not None:
                raise DemoError("--resume continues in one process; drop --nproc (a 2-rank run's checkpoints resume there)")
            from .demo_distributed import run_demo_distributed

            result = run_demo_distributed(config, args.nproc, progress=not args.no_progress)
        else:
            result = run_demo(config, progress=not args.no_progress, resume=args.resume is not None)
    except DemoError as exc:
        raise UserError(str(exc)) from exc
    return EXIT_OK if result.completed else EXIT_FAILURE


# ---- spec -----------------------------------------------------------------------------
def _load_spec(path: str | None) -> Any:
    from codegen.spec_loader import SpecError, load_spec

    if path is not None and not Path(path).is_file():
        raise UserError(f"spec file {path} does not exist")
    try:
        return load_spec(path), None
    except SpecError as exc:
        return None, exc.errors


def _cmd_spec_validate(args: argparse.Namespace) -> int:
    spec, errors = _load_spec(args.file)
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        print(f"{len(errors)} error(s)", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{args.file or spec.path}: valid ({len(spec.states)} states, {len(spec.transitions)} transitions, "
        f"{len(spec.params)} params, sha256 {spec.sha256[:16]})"
    )
    return EXIT_OK


def _cmd_spec_diagram(args: argparse.Namespace) -> int:
    from codegen.emit_docs import dot, mermaid

    spec, errors = _load_spec(args.spec)
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(mermaid(spec) if args.format == "mermaid" else dot(spec))
    return EXIT_OK


# ---- ckpt -----------------------------------------------------------------------------
def _checkpoint_manager(directory: str) -> Any:
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"checkpoint folder {directory} does not exist")
    if not (path / "active").is_dir():
        raise UserError(f"{directory} is not a checkpoint folder (it has no active/ subfolder)")
    from .checkpoint import CheckpointManager

    return CheckpointManager(path)


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def _cmd_ckpt_ls(args: argparse.Namespace) -> int:
    manager = _checkpoint_manager(args.dir)
    records = manager.list_checkpoints(layer_id=args.layer, seed_id=args.seed_id, limit=args.limit)
    columns = ("checkpoint_id", "layer_id", "seed_id", "priority", "lifecycle_state", "timestamp")
    print("\t".join(columns))
    for record in records:
        print("\t".join(str(_field(record, c)) for c in columns))
    print(f"{len(records)} checkpoint(s)", file=sys.stderr)
    return EXIT_OK


def _cmd_ckpt_verify(args: argparse.Namespace) -> int:
    manager = _checkpoint_manager(args.dir)
    ids = args.ids or [_field(r, "checkpoint_id") for r in manager.list_checkpoints(limit=None)]
    bad = 0
    for checkpoint_id in ids:
        try:
            manager.verify(checkpoint_id)
        except Exception as exc:  # a corrupt checkpoint: report it and go on
            bad += 1
            print(f"FAIL {checkpoint_id}: {exc}")
        else:
            print(f"ok   {checkpoint_id}")
    print(f"{len(ids) - bad} ok, {bad} failed", file=sys.stderr)
    return EXIT_FAILURE if bad else EXIT_OK


def _cmd_ckpt_migrate(args: argparse.Namespace) -> int:
    manager = _checkpoint_manager(args.dir)
    v1_files = sorted((Path(args.dir) / "active").glob("*.pt"))
    failed = 0
    for path in v1_files:
        try:
            new_id = manager.migrate(path)
        except Exception as exc:  # refuse one file, keep migrating the others
            failed += 1
            print(f"FAIL {path.name}: {exc}")
        else:
            print(f"migrated {path.name} -> {new_id}")
    print(f"{len(v1_files) - failed} migrated, {failed} failed", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


# ---- bench ----------------------------------------------------------------------------
def _source_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise UserError(f"kasmina bench needs a source checkout (no benchmarks/ next to {root / 'kasmina'})")
    return root


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _source_root()
    command = [sys.executable, "-m", "benchmarks", "--device", args.device, "--out", str(Path(args.out).resolve())]
    if args.quick:
        command.append("--quick")
    completed = subprocess.run(command, cwd=root, check=False)
    if completed.returncode == EXIT_USAGE:
        return EXIT_USAGE
    if completed.returncode != 0:
        print(f"kasmina bench: the benchmarks failed (exit code {completed.returncode})", file=sys.stderr)
        return EXIT_FAILURE
    print(f"tables: {Path(args.out) / 'BENCHMARKS.md'}")
    return EXIT_OK


# ---- info -----------------------------------------------------------------------------
def info() -> dict[str, Any]:
    """What ``kasmina info`` prints: version, backend, CUDA build, spec hash, the cache size
    by which CPU blend calls decide to stream their outputs past the cache, and the CPU
    output cache's limit."""
    import torch

    from . import SPEC_SHA256, __version__, backend, backend_description
    from ._extension import HAS_CUDA_KERNELS, HAS_EXTENSION

    return {
        "version": __version__,
        "backend": backend(),
        "backend_description": backend_description(),
        "cuda_kernels_built": bool(HAS_CUDA_KERNELS),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "spec_sha256": SPEC_SHA256,
        "blend_stream_cache_bytes": torch.ops.kasmina.blend_stream_cache_bytes() if HAS_EXTENSION else None,
        "cpu_output_cache_limit": torch.ops.kasmina.cpu_output_cache_limit() if HAS_EXTENSION else None,
        "blend_avx2_rows": torch.ops.kasmina.blend_avx2_rows() if HAS_EXTENSION else None,
    }


def _cmd_info(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"kasmina {data['version']}")
    print(f"backend:       {data['backend_description']}")
    print(f"CUDA kernels:  {'built' if data['cuda_kernels_built'] else 'not built (CPU build)'}")
    print(f"torch:         {data['torch']} (CUDA {data['torch_cuda'] or 'none'}, device available: {data['cuda_available']})")
    print(f"spec sha256:   {data['spec_sha256']}")
    if data["blend_stream_cache_bytes"] is not None:
        size = data["blend_stream_cache_bytes"] / 2**20
        print(f"blend streams: outputs of CPU calls moving over {size:.0f} MiB, or whose memory was last written "
              f"over {size / 2:.0f} MiB of blend traffic ago (KASMINA_STREAM_MIN_BYTES)")
    limit = data["cpu_output_cache_limit"]
    if limit is not None:
        kept = f"up to {limit / 2**20:.0f} MiB" if limit else "off"
        print(f"blend outputs: freed CPU blocks of 1 MiB or more kept for reuse: {kept} (KASMINA_CPU_OUTPUT_CACHE_BYTES)")
    if data["blend_avx2_rows"] is not None:
        loops = "AVX2 row loops" if data["blend_avx2_rows"] else "portable loops"
        print(f"blend loops:   float32/float64 on CPU take the {loops} (KASMINA_CPU_AVX2_ROWS)")
    return EXIT_OK


# ---- parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The full ``kasmina`` argument parser."""
    parser = _Parser(prog="kasmina", description="Morphogenetic training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    demo = sub.add_parser("demo", help="grow a too-narrow MLP on scikit-learn's digits", description=_demo_description())
    demo.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: 120)")
    demo.add_argument("--seeds", type=_positive_int, default=None, help="seeds in the hidden layer (default: 4)")
    demo.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    demo.add_argument("--seed", type=_int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--out", default="runs", help="folder for runs (default: %(default)s)")
    demo.add_argument("--name", default=None, help="run name (default: derived from the options)")
    demo.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue runs/<name> from its newest good checkpoint, with the run's own settings (only --device may differ)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to <run>/tensorboard")
    demo.add_argument(
        "--nproc", type=_positive_int, default=1, help="processes (gloo ranks on CPU, DDP, torchrun-style) (default: %(default)s)"
    )
    demo.set_defaults(func=_cmd_demo)

    spec = sub.add_parser("spec", help="validate or draw the lifecycle spec", description="Validate or draw the lifecycle spec.")
    spec_sub = spec.add_subparsers(dest="spec_command", metavar="ACTION", parser_class=_Parser, required=True)
    validate = spec_sub.add_parser(
        "validate", help="check a spec file", description="Check a lifecycle spec; print every error (exit 1 if any)."
    )
    validate.add_argument("file", nargs="?", default=None, help="spec file (default: the package's spec/lifecycle.yaml)")
    validate.set_defaults(func=_cmd_spec_validate)
    diagram = spec_sub.add_parser("diagram", help="print the state diagram", description="Print the lifecycle state diagram.")
    diagram.add_argument("--format", choices=("mermaid", "dot"), default="mermaid", help="(default: %(default)s)")
    diagram.add_argument("--spec", default=None, help="spec file (default: the package's spec/lifecycle.yaml)")
    diagram.set_defaults(func=_cmd_spec_diagram)

    ckpt = sub.add_parser("ckpt", help="inspect checkpoint folders", description="Inspect a checkpoint folder.")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", metavar="ACTION", parser_class=_Parser, required=True)
    ls = ckpt_sub.add_parser("ls", help="list checkpoints, newest first", description="List checkpoints, newest first.")
    ls.add_argument("dir", help="checkpoint folder (the one holding active/)")
    ls.add_argument("--layer", default=None, help="only this layer id")
    ls.add_argument("--seed-id", type=_int, default=None, help="only this seed")
    ls.add_argument("--limit", type=_positive_int, default=100, help="at most this many (default: %(default)s)")
    ls.set_defaults(func=_cmd_ckpt_ls)
    verify = ckpt_sub.add_parser(
        "verify", help="check checksums", description="Verify every checkpoint (or the given ids); exit 1 if any is corrupt."
    )
    verify.add_argument("dir", help="checkpoint folder")
    verify.add_argument("ids", nargs="*", help="checkpoint ids (default: all)")
    verify.set_defaults(func=_cmd_ckpt_verify)
    migrate = ckpt_sub.add_parser(
        "migrate",
        help="rewrite v1 files as v2",
        description="Rewrite every v1 (.pt) checkpoint in DIR/active as v2, keeping a .bak.",
    )
    migrate.add_argument("dir", help="checkpoint folder")
    migrate.set_defaults(func=_cmd_ckpt_migrate)

    bench = sub.add_parser(
        "bench", help="run the benchmarks", description="Run benchmarks/ and gather their tables into OUT/BENCHMARKS.md."
    )
    bench.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    bench.add_argument("--out", default="bench_results", help="results folder (default: %(default)s)")
    bench.set_defaults(func=_cmd_bench)

    info_parser = sub.add_parser("info", help="version, backend, CUDA build, spec hash", description="Show the installation.")
    info_parser.add_argument("--json", action="store_true", help="machine-readable output")
    info_parser.set_defaults(func=_cmd_info)
    return parser


def _demo_description() -> str:
    return (
        "Train a deliberately narrow MLP on scikit-learn's digits with a ChunkedKasminaLayer on its hidden "
        "layer; a SeedController germinates, grafts, evaluates, fossilizes or culls seeds. Writes "
        "<out>/<name>/telemetry.jsonl, lifecycle.png and checkpoints, and compares test accuracy with "
        "the same host trained without seeds."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UserError as exc:
        print(f"kasmina: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kasmina: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
