"""The `frmap` command line: argument parsing and printing for people; nothing below it prints.

Every command exits 0 only on success, 1 on bad input (a file, folder, detector or set) and 2
on bad arguments, which are checked before any work. Errors name the file, field or argument at
fault and go to standard error; machine-readable output (JSON) goes to standard output or to
files.
"""

from __future__ import annotations

import argparse
import os
import sys

from frmap.engine.cli.options import (
    ATTACKS,
    BENCH_MODELS,
    BENCHMARKS,
    DEFAULT_OUT,
    DEMO_ATTACKED,
    DETECTORS,
    STUDY,
    add_model_args,
    add_ray_args,
    add_rule_args,
    footprint_name,
    footprint_names,
    positive_int,
    rate,
)
from frmap.kernels.errors import FrmapError, out_of_memory

# What a command raises for a person to fix, printed as one line with exit status 1: ValueError
# for bad input (a file, field, folder, detector, set or setting, named in the message; the
# loaders turn a malformed file's KeyError and TypeError into it), OSError for files that cannot
# be read or written, FrmapError for what the install, machine or cluster lacks (Ray, a cluster,
# a backend) or a set left incomplete. Running out of memory is said as such. Anything else (a
# TypeError, KeyError, another RuntimeError, ...) is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, FrmapError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frmap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole detection study on the embedded digits default")
    p.add_argument("--quick", action="store_true",
                   help=f"attack 40 test digits instead of {DEMO_ATTACKED} (a smoke run)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default frmap-out)")
    p.set_defaults(run="cmd_demo")

    p = sub.add_parser("evaluate", help="attack, score, calibrate and report on a model and data")
    add_model_args(p)
    add_rule_args(p)
    p.add_argument("--data", help="test image folder (default: the digits test split)")
    p.add_argument("--calibration", help="clean calibration folder (default: half of --data)")
    p.add_argument("--attacks", help=f"comma-separated attacks (default: all: {','.join(ATTACKS)})")
    p.add_argument("--footprints", type=footprint_names,
                   help=f"comma-separated footprints (default: {','.join(STUDY)})")
    p.add_argument("--limit", type=positive_int,
                   help="attack at most this many test images (and as many train images)")
    p.add_argument("--detectors", default="entropy",
                   help=f"comma-separated detectors to compare: {', '.join(DETECTORS)} "
                        "(default: entropy, the study alone)")
    p.add_argument("--train", help="training image folder of the activation-space detectors "
                                   "(default: the digits train split)")
    p.add_argument("--adaptive", type=float, metavar="EPSILON",
                   help="also attack each differentiable detector adaptively (PGD within this "
                        "Linf epsilon on the classifier's margin plus the detector's score)")
    p.add_argument("--save-screener", metavar="FILE",
                   help="save the best detector set found (the combination or one detector), "
                        "calibrated, as a screener file for frmap score / frmap serve")
    p.add_argument("--max-cost", type=float, metavar="X",
                   help="with --save-screener: the best set among those whose screen costs at "
                        "most X forward passes of the classifier (measured; the table's cost "
                        "column)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default frmap-out)")
    add_ray_args(p, "score the study's clean and adversarial images")
    p.set_defaults(run="cmd_evaluate")

    p = sub.add_parser("probe-evolution",
                       help="distance evolution under variants (references, embedding, "
                            "standardisation, layers) beside kNN, on the comparison's sets")
    add_model_args(p)
    p.add_argument("--data", help="test image folder (default: the digits test split)")
    p.add_argument("--calibration", help="clean calibration folder (default: half of --data)")
    p.add_argument("--train", help="training image folder (default: the digits train split)")
    p.add_argument("--attacks", help=f"comma-separated attacks (default: all: {','.join(ATTACKS)})")
    p.add_argument("--limit", type=positive_int,
                   help="attack at most this many test images (and as many train images)")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="seeds of each network (default 3)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder, shared with frmap evaluate's sets (default frmap-out)")
    p.set_defaults(run="cmd_probe_evolution")

    p = sub.add_parser("attack", help="craft a resumable adversarial set")
    add_model_args(p)
    p.add_argument("--attack", required=True,
                   choices=tuple(ATTACKS))
    p.add_argument("--data", help="image folder (default: the digits test split)")
    p.add_argument("--limit", type=positive_int, help="attack at most this many images")
    p.add_argument("--shard-size", type=positive_int, default=64,
                   help="images per shard, the unit of resumption (default 64)")
    p.add_argument("--out", required=True, help="folder of the set (resumes what is there)")
    add_ray_args(p, "attack the shards")
    p.set_defaults(run="cmd_attack")

    p = sub.add_parser("score", help="score image files; one JSON line per image")
    add_model_args(p)
    add_rule_args(p)
    p.add_argument("paths", nargs="*", help="files or folders; none or '-': paths on stdin")
    p.add_argument("--screener", "--detector", dest="screener", metavar="FILE",
                   help="screener file from frmap calibrate / evaluate --save-screener (or a "
                        "detector file): its detectors' scores and 'flagged'")
    p.add_argument("--footprint", type=footprint_name,
                   help="entropy window without a screener (default square3; scores only, no "
                        "flags)")
    add_ray_args(p, "screen into --out (bad files recorded there)")
    p.add_argument("--out", metavar="FILE", help="with --ray: the results (JSON lines)")
    p.add_argument("--shard-groups", type=positive_int, default=8,
                   help="with --ray: batches per shard, the unit a rerun resumes from (default 8)")
    # a screener file fixes these: None tells that they were not given
    p.set_defaults(run="cmd_score", precision=None, rule=None, target=None)

    p = sub.add_parser(
        "serve", help="a screener behind HTTP (POST /screen, GET /healthz, GET /metrics)",
        description="Serve a screener file over HTTP with dynamic batching: in this process "
                    "(uvicorn, no Ray) by default, on Ray Serve with --address (a cluster) or "
                    "--ray (a local Ray instance). Call it with\n"
                    "  curl -X POST -H 'Content-Type: image/png' --data-binary @digit.png "
                    "http://127.0.0.1:8000/screen\n"
                    "It listens on 127.0.0.1 unless --host says otherwise; another address needs "
                    "--token-file (or --insecure). It runs until interrupted (Ctrl-C or SIGTERM).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--screener", required=True, metavar="FILE",
                   help="screener file (frmap calibrate / evaluate --save-screener / demo)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1); another than loopback needs "
                        "--token-file or --insecure")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token-file", metavar="FILE",
                   help="a file holding a bearer token: every request must send "
                        "'Authorization: Bearer <token>' (else 401)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond loopback without --token-file")
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="images per model pass at most (default 32)")
    p.add_argument("--compile", action="store_true",
                   help="compile the entropy detector's walk (torch inductor): one image's "
                        "graph while the service starts, another batch size's on its first "
                        "pass (seconds); then one image screens faster (the digits with "
                        "entropy + kNN: 2.3x the model's forward pass against 3.6x); pairs with "
                        "--max-batch 1")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a pass that is not full waits for more images (default 0: "
                        "an idle service starts at once; batches form from the images that "
                        "arrive while a pass runs)")
    p.add_argument("--max-bytes", type=positive_int, default=10 << 20,
                   help="largest request body (default 10 MiB; larger: 413)")
    p.add_argument("--max-queued", type=positive_int, default=256,
                   help="images waiting for a pass (per replica) before 503 (default 256)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a request may take, its upload included, before 504 "
                        "(default 30)")
    p.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve on a local Ray instance (Ray listens on all "
                        "interfaces, behind its token authentication); default: one process")
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="on Ray Serve: replicas of the service (default 1)")
    p.add_argument("--cpus-per-replica", type=positive_int, default=None,
                   help="CPUs (and torch threads) of the process, or of each replica on Ray "
                        "Serve (default: this machine's or the local instance's CPUs shared "
                        "among the replicas; 1 on a cluster)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs each replica takes on a cluster (default 0)")
    p.add_argument("--address", help="serve on the Ray cluster there (e.g. ray://head:10001 or "
                                     "auto)")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="with --ray: CPUs of the local Ray instance (default: all)")
    p.set_defaults(run="cmd_serve")

    p = sub.add_parser("calibrate", help="a screener calibrated on clean images alone")
    add_model_args(p)
    add_rule_args(p)
    p.add_argument("--data", help="clean image folder (default: the digits calibration split)")
    p.add_argument("--fpr", type=rate, default=0.05,
                   help="false-positive rate of the screener, in (0, 1) (default 0.05); each of k "
                        "detectors is calibrated at fpr / k and an image is flagged when any "
                        "flags it")
    p.add_argument("--detectors", default="entropy",
                   help="comma-separated: entropy, knn, squeeze (default: entropy)")
    p.add_argument("--train", help="clean training folder of the kNN detector (default: the "
                                   "digits train split)")
    p.add_argument("--footprint", default="square3", type=footprint_name,
                   help="entropy window (default square3)")
    p.add_argument("--out", required=True, help="screener file to write (frmap.screener/1)")
    p.set_defaults(run="cmd_calibrate")

    p = sub.add_parser("visualize", help="image / feature response / entropy, clean vs attacked")
    add_model_args(p)
    add_rule_args(p)
    p.add_argument("image", help="an image file")
    p.add_argument("--attack", default="fgsm",
                   choices=tuple(ATTACKS))
    p.add_argument("--footprint", default="square3", type=footprint_name)
    p.add_argument("--out", default="trace.png", help="PNG to write (default trace.png)")
    p.set_defaults(run="cmd_visualize")

    p = sub.add_parser("train-digits", help="train the embedded digits CNN (reproducible)")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", help="checkpoint to write (default: the shipped one)")
    p.set_defaults(run="cmd_train_digits")

    p = sub.add_parser("bench", help="measure the kernels, the engine, attacks and detectors")
    p.add_argument("target", choices=BENCHMARKS)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.add_argument("--model", choices=BENCH_MODELS,
                   help="responses: the network (default vgg19)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU rows (entropy, responses); without a GPU they are "
                        "skipped, saying why")
    p.set_defaults(run="cmd_bench")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and "torch" not in sys.modules:
        # OpenMP threads spin 1,000 times between torch ops before they sleep, not 300,000:
        # libgomp's own count where threads outnumber the cores, as the event loop's thread
        # makes them (on 2 cores, digits at saturation: 280 against 470 images/s).
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    try:
        from frmap.engine.cli import commands

        return getattr(commands, args.run)(args)
    except EXPECTED_ERRORS as err:
        print(f"frmap {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(f"frmap {args.command}: error: out of memory (try a smaller --batch-size)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"frmap {args.command}: interrupted", file=sys.stderr)
        return 130

