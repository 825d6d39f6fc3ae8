"""The `frmap` command line: argument parsing and printing for people; nothing below it prints.

Every command exits 0 only on success. Errors name the file or argument at fault and go to
standard error; machine-readable output (JSON) goes to standard output or to files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .io import write_json

DEFAULT_OUT = Path("frmap-out")
DEMO_ATTACKED = 200  # test digits attacked by `frmap demo`: keeps the whole study under 10 min
_LABEL_IN_NAME = re.compile(r"_(\d+)$")


@dataclass(frozen=True)
class _Model:
    """A loaded classifier with how its inputs are read and preprocessed."""

    name: str
    net: nn.Module            # takes [N, C, H, W] images in [0, 1]
    raw: nn.Module            # what the response engine wraps (`preprocess` applies on top)
    preprocess: str | None
    spec: object              # frmap.engine.images.ImageSpec


def _load_model(args: argparse.Namespace) -> _Model:
    from .images import DIGITS, IMAGENET
    from .models import Normalized, load_vgg

    if args.model == "digits":
        from .digits import CHECKPOINT, load_digits_model

        model = load_digits_model(args.weights or CHECKPOINT)
        return _Model("digits", model, model, None, DIGITS)
    model = load_vgg(args.model, args.weights, seed=args.seed)
    return _Model(args.model, Normalized(model), model, "imagenet", IMAGENET)


def _model_args(p: argparse.ArgumentParser) -> None:
    from .models import VGG_ARCHS

    p.add_argument("--model", default="digits", choices=("digits", *VGG_ARCHS),
                   help="classifier (default: the embedded digits CNN)")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help="torchvision weights name or a state-dict file (.pt/.pth/.safetensors); "
                        "VGG without it: random weights from --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and attacks")
    p.add_argument("--batch-size", type=int, default=32, help="images per pass (default 32)")
    p.add_argument("--labels", default="auto", choices=("auto", "predicted"),
                   help="true classes of --data images: from file/folder names where present "
                        "(auto), or the model's own predictions (predicted)")


def _engine(model: _Model, args: argparse.Namespace):
    from .responses import ResponseEngine

    return ResponseEngine(model.raw, rule=getattr(args, "rule", "guided"),
                          target=getattr(args, "target", "conv_max"),
                          batch_size=args.batch_size, preprocess=model.preprocess)


def _load_files(paths: list[Path], spec: object) -> tuple[list[Path], list[torch.Tensor]]:
    """Load what loads; report each bad file on stderr and skip it."""
    from .images import ImageFileError, load_image

    good, tensors = [], []
    for path in paths:
        try:
            tensors.append(load_image(path, spec))
            good.append(path)
        except ImageFileError as err:
            print(f"frmap: skipped {err}", file=sys.stderr)
    return good, tensors


def _labels_from_paths(paths: list[Path]) -> torch.Tensor | None:
    """Class labels from `name_<label>.ext` or from a parent folder named by a class index."""
    labels = []
    for path in paths:
        m = _LABEL_IN_NAME.search(path.stem)
        if m:
            labels.append(int(m.group(1)))
        elif path.parent.name.isdigit():
            labels.append(int(path.parent.name))
        else:
            return None
    return torch.tensor(labels)


def _dataset(model: _Model, folder: str | None, split: str,
             labels_from: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from an image folder, or the digits split `split` by default.

    Labels come from file names (`name_<label>.png`) or class-index folders; where there are
    none, or with `labels_from="predicted"`, the model's own predictions stand in for them
    (every image then counts as correctly classified).
    """
    from .images import expand_paths
    from .predict import predict

    if folder is None:
        if model.name != "digits":
            raise ValueError(f"--data is needed for model {model.name}")
        from .digits import load_digits_split

        s = load_digits_split(split)
        return s.images, s.labels
    paths, tensors = _load_files(list(expand_paths([folder])), model.spec)
    if not tensors:
        raise ValueError(f"{folder}: no usable image")
    images = torch.stack(tensors)
    labels = _labels_from_paths(paths) if labels_from == "auto" else None
    return images, labels if labels is not None else predict(model.net, images)[0]


def _print_stats(stats: list) -> None:
    print(f"{'attack':10} {'inputs':>6} {'attacked':>8} {'success':>8} {'true conf':>9} "
          f"{'new conf':>8}")
    for s in stats:
        print(f"{s.attack:10} {s.inputs:6d} {s.attacked:8d} {s.success_rate:8.3f} "
              f"{s.true_confidence:9.3f} {s.adv_confidence:8.3f}")


# --- commands ------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .digits import load_digits_model, load_digits_split
    from .study import StudyConfig

    model = load_digits_model()
    cal, test = load_digits_split("calibration"), load_digits_split("test")
    config = StudyConfig(attack_limit=40 if args.quick else DEMO_ATTACKED, seed=0)
    return _report_study(model, (cal.images, cal.labels), (test.images, test.labels),
                         Path(args.out), config)


def _report_study(model, calibration, test, out: Path, config) -> int:
    from .evaluation import table
    from .study import MIN_ADVERSARIALS, run_study

    report = run_study(model, calibration, test, out, config)
    print("\nAttacks (only successful adversarials are kept):")
    _print_stats(report.attacks)
    print("\nDetection (thresholds from the clean calibration images, metrics on held-out "
          "clean test images and the adversarials):")
    print(table(report.results))
    print("\nfootprint study, mean AUC over the attacks with at least "
          f"{MIN_ADVERSARIALS} adversarials: " + ", ".join(
        f"{k} {v:.3f}" for k, v in report.footprint_auc.items()) + f" -> {report.footprint}")
    print(f"\nwrote {out}/: " + ", ".join(Path(f).name for f in report.files.values()))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .comparison import ComparisonConfig, compare_detectors, comparison_table
    from .squeeze import DIGITS, IMAGENET
    from .study import ATTACK_ORDER, StudyConfig

    model = _load_model(args)
    config = StudyConfig(
        attacks=tuple(args.attacks.split(",")) if args.attacks else ATTACK_ORDER,
        footprints=tuple(args.footprints.split(",")) if args.footprints else StudyConfig.footprints,
        rule=args.rule, target=args.target, preprocess=model.preprocess,
        attack_limit=args.limit, batch_size=args.batch_size, seed=args.seed,
    )
    comparison = ComparisonConfig(
        detectors=tuple(args.detectors.split(",")), attacks=config.attacks, rule=args.rule,
        target=args.target, preprocess=model.preprocess,
        squeeze=DIGITS if model.name == "digits" else IMAGENET, attack_limit=args.limit,
        train_limit=args.limit, batch_size=args.batch_size, seed=args.seed,
    )
    test = _dataset(model, args.data, "test", args.labels)
    if args.calibration is not None or args.data is None:
        calibration = _dataset(model, args.calibration, "calibration", args.labels)
    else:
        calibration, test = _halves(test)
    if comparison.detectors == ("entropy",):
        return _report_study(model.raw, calibration, test, Path(args.out), config)
    if args.train is None and model.name != "digits":
        raise ValueError(f"--train is needed to compare detectors on model {model.name}")
    train = _dataset(model, args.train, "train", args.labels)
    _report_study(model.raw, calibration, test, Path(args.out), config)
    report = compare_detectors(model.raw, train=train, calibration=calibration, test=test,
                               out_dir=args.out, config=comparison)
    print(f"\nDetector comparison (AUC / detection rate at FPR 5%; {comparison.footprint} entropy;"
          f" combined: logistic regression on {len(report.images['combiner'])} train images):")
    print(comparison_table([*report.results, *report.per_layer, *report.unseen]))
    print(f"\nwrote {args.out}/: " + ", ".join(Path(f).name for f in report.files.values()))
    return 0


def _halves(data: tuple[torch.Tensor, torch.Tensor]):
    """Alternate images into (calibration, test) when only one folder is given."""
    images, labels = data
    if len(images) < 2:
        raise ValueError("need at least two images to calibrate on one half and test on the other")
    return (images[0::2], labels[0::2]), (images[1::2], labels[1::2])


def _cmd_attack(args: argparse.Namespace) -> int:
    from .adversarial_sets import attack_stats, generate

    model = _load_model(args)
    images, labels = _dataset(model, args.data, "test", args.labels)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    result = generate(args.attack, model.net, images, labels, args.out, seed=args.seed)
    _print_stats([attack_stats(result)])
    print(f"wrote {args.out}")
    return 0


def _score_paths(args: argparse.Namespace) -> Iterator[Path]:
    from .images import expand_paths

    inputs = list(args.paths)
    if not inputs or inputs == ["-"]:
        inputs = (line.strip() for line in sys.stdin if line.strip())
    yield from expand_paths(inputs)


def _cmd_score(args: argparse.Namespace) -> int:
    from .detector import EntropyDetector, model_identity
    from .footprints import parse_footprint
    from .predict import predict

    model = _load_model(args)
    detector = EntropyDetector.load(args.detector) if args.detector else None
    if detector is not None:
        detector.check_model(model_identity(model.raw))
        args.rule, args.target, footprint_name = detector.rule, detector.target, detector.footprint
    else:
        footprint_name = args.footprint
    footprint = parse_footprint(footprint_name)
    engine = _engine(model, args)
    failed = 0

    def flush(batch: list[Path]) -> None:
        nonlocal failed
        good, tensors = _load_files(batch, model.spec)
        failed += len(batch) - len(good)
        if not tensors:
            return
        images = torch.stack(tensors)
        predicted, probs = predict(model.net, images)
        scores = engine.scores(images, footprint)
        for i, path in enumerate(good):
            score = float(scores[i])
            print(json.dumps({
                "path": str(path), "prediction": int(predicted[i]),
                "confidence": round(float(probs[i, predicted[i]]), 6), "score": score,
                "flagged": None if detector is None else bool(detector.predict([score])[0]),
            }), flush=True)

    batch: list[Path] = []
    for path in _score_paths(args):
        batch.append(path)
        if len(batch) == args.batch_size:
            flush(batch)
            batch = []
    flush(batch)
    if failed:
        print(f"frmap score: {failed} file(s) skipped", file=sys.stderr)
    return 1 if failed else 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .detector import EntropyDetector, model_identity
    from .footprints import parse_footprint
    from .predict import predict

    model = _load_model(args)
    images, labels = _dataset(model, args.data, "calibration", args.labels)
    images = images[predict(model.net, images)[0] == labels]
    scores = _engine(model, args).scores(images, parse_footprint(args.footprint)).numpy()
    detector = EntropyDetector.fit(scores, fpr=args.fpr, footprint=args.footprint, rule=args.rule,
                                   target=args.target, model=model_identity(model.raw))
    detector.save(args.out)
    print(json.dumps({"detector": args.out, "threshold": detector.threshold,
                      "fpr": detector.fpr, "achieved_fpr": detector.achieved_fpr,
                      "clean_images": detector.n_clean}))
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from .attacks import make_attack, run_attack
    from .figures import trace_figure
    from .footprints import parse_footprint
    from .predict import predict
    from .study import _trace_panels

    model = _load_model(args)
    paths, tensors = _load_files([Path(args.image)], model.spec)
    if not tensors:
        return 1
    image = tensors[0]
    label = _labels_from_paths(paths) if args.labels == "auto" else None
    label = label if label is not None else predict(model.net, image[None])[0]
    result = run_attack(make_attack(args.attack), model.net, image[None], label, seed=args.seed)
    adversarials = {args.attack: result.adversarial[0]} if bool(result.success[0]) else {}
    if not adversarials:
        print(f"frmap visualize: {args.attack} did not fool the model on {args.image}; "
              "drawing the clean image alone", file=sys.stderr)
    panels = _trace_panels(_engine(model, args), model.net, image, adversarials,
                           parse_footprint(args.footprint))
    print(f"wrote {trace_figure(panels, Path(args.out))}")
    return 0


def _cmd_train_digits(args: argparse.Namespace) -> int:
    from .digits import CHECKPOINT, train_and_save

    report = train_and_save(args.out or CHECKPOINT, seed=args.seed, epochs=args.epochs,
                            threads=args.threads)
    print(json.dumps(asdict(report)))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    bench = importlib.import_module(f"frmap.engine.bench_{args.target}")
    result = bench.run(quick=args.quick)
    print(bench.table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


# --- parser --------------------------------------------------------------------------------


def _rule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", default="guided", choices=("guided", "deconvnet", "gradient"))
    p.add_argument("--target", default="conv_max", choices=("conv_max", "logit"))


def build_parser() -> argparse.ArgumentParser:
    from .footprints import STUDY

    parser = argparse.ArgumentParser(prog="frmap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole detection study on the embedded digits default")
    p.add_argument("--quick", action="store_true",
                   help=f"attack 40 test digits instead of {DEMO_ATTACKED} (a smoke run)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default frmap-out)")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("evaluate", help="attack, score, calibrate and report on a model and data")
    _model_args(p)
    _rule_args(p)
    p.add_argument("--data", help="test image folder (default: the digits test split)")
    p.add_argument("--calibration", help="clean calibration folder (default: half of --data)")
    p.add_argument("--attacks", help="comma-separated attacks (default: all five)")
    p.add_argument("--footprints", help=f"comma-separated footprints (default: {','.join(STUDY)})")
    p.add_argument("--limit", type=int,
                   help="attack at most this many test images (and as many train images)")
    p.add_argument("--detectors", default="entropy",
                   help="comma-separated detectors to compare: entropy, knn, distance-lstm, "
                        "distance-mlp, squeeze (default: entropy, the study alone)")
    p.add_argument("--train", help="training image folder of the activation-space detectors "
                                   "(default: the digits train split)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default frmap-out)")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("attack", help="craft a resumable adversarial set")
    _model_args(p)
    p.add_argument("--attack", required=True,
                   choices=("fgsm", "gradient", "one_pixel", "deepfool", "boundary"))
    p.add_argument("--data", help="image folder (default: the digits test split)")
    p.add_argument("--limit", type=int, help="attack at most this many images")
    p.add_argument("--out", required=True, help="folder of the set (resumes what is there)")
    p.set_defaults(run=_cmd_attack)

    p = sub.add_parser("score", help="score image files; one JSON line per image")
    _model_args(p)
    _rule_args(p)
    p.add_argument("paths", nargs="*", help="files or folders; none or '-': paths on stdin")
    p.add_argument("--detector", help="detector file from `frmap calibrate` (adds 'flagged')")
    p.add_argument("--footprint", default="square3", help="entropy window without a detector")
    p.set_defaults(run=_cmd_score)

    p = sub.add_parser("calibrate", help="fit a detector threshold on clean images")
    _model_args(p)
    _rule_args(p)
    p.add_argument("--data", help="clean image folder (default: the digits calibration split)")
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate (default 0.05)")
    p.add_argument("--footprint", default="square3", help="entropy window (default square3)")
    p.add_argument("--out", required=True, help="detector file to write (JSON)")
    p.set_defaults(run=_cmd_calibrate)

    p = sub.add_parser("visualize", help="image / feature response / entropy, clean vs attacked")
    _model_args(p)
    _rule_args(p)
    p.add_argument("image", help="an image file")
    p.add_argument("--attack", default="fgsm",
                   choices=("fgsm", "gradient", "one_pixel", "deepfool", "boundary"))
    p.add_argument("--footprint", default="square3")
    p.add_argument("--out", default="trace.png", help="PNG to write (default trace.png)")
    p.set_defaults(run=_cmd_visualize)

    p = sub.add_parser("train-digits", help="train the embedded digits CNN (reproducible)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="checkpoint to write (default: the shipped one)")
    p.set_defaults(run=_cmd_train_digits)

    p = sub.add_parser("bench", help="measure the kernels, the engine, attacks and detectors")
    p.add_argument("target", choices=("entropy", "responses", "attacks", "detectors"))
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.set_defaults(run=_cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
