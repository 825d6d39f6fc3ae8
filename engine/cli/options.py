"""What the parser needs before any command runs: the argument types, the option groups and the
names they offer, with no import of torch or of the engine's modules, so that `frmap --help` and
`frmap CMD --help` answer at once. The names mirror the engine's registries
(`tests/engine/test_cli.py` holds them equal); each command imports what it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from frmap.kernels import RULES

# frmap.engine.attacks.ATTACKS, in the order the study reports them
ATTACKS = ("fgsm", "gradient", "one_pixel", "three_pixel", "five_pixel", "deepfool", "boundary",
           "pgd", "bim", "mifgsm", "cw", "lbfgs")
# frmap.engine.evaluation.comparison.DETECTORS
DETECTORS = ("entropy", "knn", "mahalanobis", "lid", "distance-lstm", "distance-mlp", "squeeze")
# frmap.engine.responses.TARGETS and PRECISIONS
TARGETS = ("conv_max", "logit")
PRECISIONS = ("float32", "bf16", "bf16-backward")
# frmap.engine.models.named.MODELS
MODELS = ("digits", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
          "vgg19_bn")
# frmap.engine.data.footprints.STUDY and frmap.engine.data.images.MAX_PIXELS
STUDY = ("square3", "square5", "disk2", "disk3", "disk5")
MAX_PIXELS = 40_000_000
# the modules of frmap.bench that `frmap bench` runs
BENCHMARKS = ("entropy", "responses", "attacks", "detectors", "screen", "serve", "scale",
              "overhead")
# frmap.bench.responses.MODELS: the networks `frmap bench responses --model` times
BENCH_MODELS = ("vgg19", "resnet18", "resnet50")
DEFAULT_OUT = Path("frmap-out")
DEMO_ATTACKED = 200  # test digits attacked by `frmap demo`: keeps the whole study under 10 min


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def rate(text: str) -> float:
    """argparse type: a rate strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def footprint_name(text: str) -> str:
    """argparse type: a footprint name `parse_footprint` accepts."""
    from frmap.engine.data.footprints import parse_footprint

    try:
        parse_footprint(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def footprint_names(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated footprint names."""
    return tuple(footprint_name(name) for name in text.split(","))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The classifier, its input files and where it runs."""
    p.add_argument("--model", default="digits", choices=MODELS,
                   help="classifier (default: the embedded digits CNN)")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help="torchvision weights name or a state-dict file (.pt/.pth/.safetensors); "
                        "VGG without it: random weights from --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and attacks")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per pass (default 32)")
    p.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS,
                   help="refuse image files of more pixels, from their header, before decoding "
                        f"(default {MAX_PIXELS})")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (CUDA where available), cpu, cuda, cuda:N")
    p.add_argument("--labels", default="auto", choices=("auto", "predicted"),
                   help="true classes of --data images: from file/folder names where present "
                        "(auto), or the model's own predictions (predicted)")


def add_rule_args(p: argparse.ArgumentParser) -> None:
    """The response engine's rule, target and precision."""
    p.add_argument("--rule", default="guided", choices=RULES)
    p.add_argument("--target", default="conv_max", choices=TARGETS)
    p.add_argument("--precision", default="float32", choices=(*PRECISIONS, "auto"),
                   help="the reverse walk's convolutions: bf16 (in bfloat16), bf16-backward "
                        "(bfloat16 in the walk back only: the forward pass stays exact), auto "
                        "(bf16-backward where the device runs bfloat16 natively, else float32; "
                        "default float32; frmap score --screener: the precision its entropy "
                        "detector was calibrated in)")


def add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    """--ray and the options of a job on Ray Data; `what` the workers do."""
    p.add_argument("--ray", action="store_true",
                   help=f"{what} on Ray Data workers (a local Ray instance, or --address), "
                        "with results equal to one process's")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="with --ray: worker actors, each loading the model once (default 1)")
    p.add_argument("--cpus-per-worker", type=positive_int, default=None,
                   help="with --ray: CPUs (and torch threads) each worker takes (default: the "
                        "local instance's CPUs shared among the workers; 1 on a cluster)")
    p.add_argument("--address", help="with --ray: a running Ray cluster, e.g. auto or "
                                     "HEAD:6379 (default: a local instance)")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="with --ray: CPUs of the local Ray instance (default: all)")
