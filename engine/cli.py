"""The `frmap` command line: argument parsing and printing for people, nothing below it does."""

from __future__ import annotations

import argparse
import sys

from .io import write_json


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure the kernels and the engine")
    targets = bench.add_subparsers(dest="target", required=True)
    entropy = targets.add_parser("entropy", help="local entropy: skimage vs cpu vs triton")
    entropy.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    entropy.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    entropy.set_defaults(run=_bench_entropy)


def _bench_entropy(args: argparse.Namespace) -> int:
    from . import bench_entropy

    result = bench_entropy.run(quick=args.quick)
    print(bench_entropy.table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frmap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"frmap {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
