"""`python -m codegen [--spec PATH] [--out DIR] [--check]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .generate import check, write
from .spec_loader import DEFAULT_SPEC_PATH, SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codegen",
        description="Generate the lifecycle tables (Python, C++/CUDA header, docs) from the spec.",
    )
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC_PATH, help="spec file (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_SPEC_PATH.parent.parent, help="repository root to write into (default: %(default)s)"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale file")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check:
        stale = check(spec, args.out)
        for path in stale:
            print(f"stale: {path} (run `python -m codegen` and commit the result)", file=sys.stderr)
        if not stale:
            print("generated files are up to date")
        return 1 if stale else 0
    for path in write(spec, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
