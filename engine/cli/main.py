"""The `frmap` command line: argument parsing and printing for people; nothing below it prints.

Every command exits 0 only on success. Errors name the file or argument at fault and go to
standard error; machine-readable output (JSON) goes to standard output or to files.
"""

from __future__ import annotations

import argparse
import sys

from frmap.engine.cli import commands
from frmap.engine.cli.commands import DEFAULT_OUT, DEMO_ATTACKED
from frmap.engine.cli.inputs import add_model_args


def _rule_args(p: argparse.ArgumentParser) -> None:
    from frmap.engine.responses import TARGETS
    from frmap.kernels import RULES

    p.add_argument("--rule", default="guided", choices=RULES)
    p.add_argument("--target", default="conv_max", choices=TARGETS)


def build_parser() -> argparse.ArgumentParser:
    from frmap.engine.attacks import ATTACKS
    from frmap.engine.data.footprints import STUDY
    from frmap.engine.evaluation.comparison import DETECTORS

    parser = argparse.ArgumentParser(prog="frmap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole detection study on the embedded digits default")
    p.add_argument("--quick", action="store_true",
                   help=f"attack 40 test digits instead of {DEMO_ATTACKED} (a smoke run)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default frmap-out)")
    p.set_defaults(run=commands.cmd_demo)

    p = sub.add_parser("evaluate", help="attack, score, calibrate and report on a model and data")
    add_model_args(p)
    _rule_args(p)
    p.add_argument("--data", help="test image folder (default: the digits test split)")
    p.add_argument("--calibration", help="clean calibration folder (default: half of --data)")
    p.add_argument("--attacks", help=f"comma-separated attacks (default: all: {','.join(ATTACKS)})")
    p.add_argument("--footprints", help=f"comma-separated footprints (default: {','.join(STUDY)})")
    p.add_argument("--limit", type=int,
                   help="attack at most this many test images (and as many train images)")
    p.add_argument("--detectors", default="entropy",
                   help=f"comma-separated detectors to compare: {', '.join(DETECTORS)} "
                        "(default: entropy, the study alone)")
    p.add_argument("--train", help="training image folder of the activation-space detectors "
                                   "(default: the digits train split)")
    p.add_argument("--adaptive", type=float, metavar="EPSILON",
                   help="also attack each differentiable detector adaptively (PGD within this "
                        "Linf epsilon on the classifier's margin plus the detector's score)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default frmap-out)")
    p.set_defaults(run=commands.cmd_evaluate)

    p = sub.add_parser("attack", help="craft a resumable adversarial set")
    add_model_args(p)
    p.add_argument("--attack", required=True,
                   choices=tuple(ATTACKS))
    p.add_argument("--data", help="image folder (default: the digits test split)")
    p.add_argument("--limit", type=int, help="attack at most this many images")
    p.add_argument("--out", required=True, help="folder of the set (resumes what is there)")
    p.set_defaults(run=commands.cmd_attack)

    p = sub.add_parser("score", help="score image files; one JSON line per image")
    add_model_args(p)
    _rule_args(p)
    p.add_argument("paths", nargs="*", help="files or folders; none or '-': paths on stdin")
    p.add_argument("--detector", help="detector file from `frmap calibrate` (adds 'flagged')")
    p.add_argument("--footprint", default="square3", help="entropy window without a detector")
    p.set_defaults(run=commands.cmd_score)

    p = sub.add_parser("calibrate", help="fit a detector threshold on clean images")
    add_model_args(p)
    _rule_args(p)
    p.add_argument("--data", help="clean image folder (default: the digits calibration split)")
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate (default 0.05)")
    p.add_argument("--footprint", default="square3", help="entropy window (default square3)")
    p.add_argument("--out", required=True, help="detector file to write (frmap.detector/2, .npz)")
    p.set_defaults(run=commands.cmd_calibrate)

    p = sub.add_parser("visualize", help="image / feature response / entropy, clean vs attacked")
    add_model_args(p)
    _rule_args(p)
    p.add_argument("image", help="an image file")
    p.add_argument("--attack", default="fgsm",
                   choices=tuple(ATTACKS))
    p.add_argument("--footprint", default="square3")
    p.add_argument("--out", default="trace.png", help="PNG to write (default trace.png)")
    p.set_defaults(run=commands.cmd_visualize)

    p = sub.add_parser("train-digits", help="train the embedded digits CNN (reproducible)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="checkpoint to write (default: the shipped one)")
    p.set_defaults(run=commands.cmd_train_digits)

    p = sub.add_parser("bench", help="measure the kernels, the engine, attacks and detectors")
    p.add_argument("target", choices=commands.BENCHMARKS)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.set_defaults(run=commands.cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"frmap {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"frmap {args.command}: interrupted", file=sys.stderr)
        return 130

