"""The commands: each reads its arguments, runs the library and prints for people."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from frmap.engine.cli.inputs import (
    dataset,
    halves,
    labels_from_paths,
    load_files,
    load_model,
    response_engine,
    score_paths,
)
from frmap.engine.data.files import write_json

DEFAULT_OUT = Path("frmap-out")
DEMO_ATTACKED = 200  # test digits attacked by `frmap demo`: keeps the whole study under 10 min
BENCHMARKS = ("entropy", "responses", "attacks", "detectors")


def _print_stats(stats: list) -> None:
    print(f"{'attack':10} {'inputs':>6} {'attacked':>8} {'success':>8} {'true conf':>9} "
          f"{'new conf':>8}")
    for s in stats:
        print(f"{s.attack:10} {s.inputs:6d} {s.attacked:8d} {s.success_rate:8.3f} "
              f"{s.true_confidence:9.3f} {s.adv_confidence:8.3f}")


def cmd_demo(args: argparse.Namespace) -> int:
    from frmap.engine.data.digits import load_digits_split
    from frmap.engine.evaluation.study import StudyConfig
    from frmap.engine.models.digits import load_digits_model

    model = load_digits_model()
    cal, test = load_digits_split("calibration"), load_digits_split("test")
    config = StudyConfig(attack_limit=40 if args.quick else DEMO_ATTACKED, seed=0)
    return _report_study(model, (cal.images, cal.labels), (test.images, test.labels),
                         Path(args.out), config)


def _report_study(model, calibration, test, out: Path, config) -> int:
    from frmap.engine.evaluation.metrics import table
    from frmap.engine.evaluation.study import MIN_ADVERSARIALS, run_study

    report = run_study(model, calibration, test, out, config, progress=True)
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from frmap.engine.attacks import ATTACKS
    from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS, IMAGENET_SQUEEZERS
    from frmap.engine.evaluation.adaptive import AdaptiveConfig
    from frmap.engine.evaluation.comparison import (
        ComparisonConfig,
        compare_detectors,
        comparison_table,
    )
    from frmap.engine.evaluation.study import StudyConfig

    model = load_model(args)
    config = StudyConfig(
        attacks=tuple(args.attacks.split(",")) if args.attacks else tuple(ATTACKS),
        footprints=tuple(args.footprints.split(",")) if args.footprints else StudyConfig.footprints,
        rule=args.rule, target=args.target, preprocess=model.preprocess,
        attack_limit=args.limit, batch_size=args.batch_size, seed=args.seed,
    )
    comparison = ComparisonConfig(
        detectors=tuple(args.detectors.split(",")), attacks=config.attacks, rule=args.rule,
        target=args.target, preprocess=model.preprocess,
        squeeze=DIGITS_SQUEEZERS if model.name == "digits" else IMAGENET_SQUEEZERS,
        attack_limit=args.limit,
        train_limit=args.limit, batch_size=args.batch_size, seed=args.seed,
        adaptive=None if args.adaptive is None else AdaptiveConfig(epsilon=args.adaptive),
    )
    test = dataset(model, args.data, "test", args.labels)
    if args.calibration is not None or args.data is None:
        calibration = dataset(model, args.calibration, "calibration", args.labels)
    else:
        calibration, test = halves(test)
    if comparison.detectors == ("entropy",):
        return _report_study(model.raw, calibration, test, Path(args.out), config)
    if args.train is None and model.name != "digits":
        raise ValueError(f"--train is needed to compare detectors on model {model.name}")
    train = dataset(model, args.train, "train", args.labels)
    _report_study(model.raw, calibration, test, Path(args.out), config)
    report = compare_detectors(model.raw, train=train, calibration=calibration, test=test,
                               out_dir=args.out, config=comparison, progress=True)
    print(f"\nDetector comparison (AUC / detection rate at FPR 5%; {comparison.footprint} entropy;"
          f" combined: logistic regression on {len(report.images['combiner'])} train images):")
    print(comparison_table([*report.results, *report.per_layer, *report.unseen]))
    if report.best_layer:
        print("\nbest single layer (mean AUC over the measured attacks): " + ", ".join(
            f"{name} {layer}" for name, layer in report.best_layer.items()))
    print(f"\nwrote {args.out}/: " + ", ".join(Path(f).name for f in report.files.values()))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from frmap.engine.attacks.sets import attack_stats, generate

    model = load_model(args)
    images, labels = dataset(model, args.data, "test", args.labels)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    result = generate(args.attack, model.net, images, labels, args.out, seed=args.seed,
                      progress=True)
    _print_stats([attack_stats(result)])
    print(f"wrote {args.out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from frmap.engine.data.footprints import parse_footprint
    from frmap.engine.detectors import EntropyDetector
    from frmap.engine.models import model_identity
    from frmap.engine.models.predict import predict

    model = load_model(args)
    detector = EntropyDetector.load(args.detector) if args.detector else None
    if detector is not None:
        detector.check_model(model_identity(model.raw))
        args.rule, args.target, footprint_name = detector.rule, detector.target, detector.footprint
    else:
        footprint_name = args.footprint
    footprint = parse_footprint(footprint_name)
    engine = response_engine(model, args)
    failed = 0

    def flush(batch: list[Path]) -> None:
        nonlocal failed
        good, tensors = load_files(batch, model.spec)
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
                "flagged": None if detector is None else bool(detector.flag([score])[0]),
            }), flush=True)

    batch: list[Path] = []
    for path in score_paths(args):
        batch.append(path)
        if len(batch) == args.batch_size:
            flush(batch)
            batch = []
    flush(batch)
    if failed:
        print(f"frmap score: {failed} file(s) skipped", file=sys.stderr)
    return 1 if failed else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from frmap.engine.data.footprints import parse_footprint
    from frmap.engine.detectors import EntropyDetector
    from frmap.engine.models import model_identity
    from frmap.engine.models.predict import predict

    model = load_model(args)
    images, labels = dataset(model, args.data, "calibration", args.labels)
    images = images[predict(model.net, images)[0] == labels]
    scores = response_engine(model, args).scores(images, parse_footprint(args.footprint)).numpy()
    detector = EntropyDetector.fit(scores, fpr=args.fpr, footprint=args.footprint, rule=args.rule,
                                   target=args.target, model=model_identity(model.raw))
    detector.save(args.out)
    t = detector.threshold
    print(json.dumps({"detector": args.out, "threshold": t.value, "fpr": t.fpr,
                      "achieved_fpr": t.achieved_fpr, "clean_images": t.n_clean}))
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from frmap.engine.attacks import make_attack, run_attack
    from frmap.engine.data.footprints import parse_footprint
    from frmap.engine.evaluation.figures import trace_figure
    from frmap.engine.evaluation.study import trace_panels
    from frmap.engine.models.predict import predict

    model = load_model(args)
    paths, tensors = load_files([Path(args.image)], model.spec)
    if not tensors:
        return 1
    image = tensors[0]
    label = labels_from_paths(paths) if args.labels == "auto" else None
    label = label if label is not None else predict(model.net, image[None])[0]
    result = run_attack(make_attack(args.attack), model.net, image[None], label, seed=args.seed)
    adversarials = {args.attack: result.adversarial[0]} if bool(result.success[0]) else {}
    if not adversarials:
        print(f"frmap visualize: {args.attack} did not fool the model on {args.image}; "
              "drawing the clean image alone", file=sys.stderr)
    panels = trace_panels(response_engine(model, args), model.net, image, adversarials,
                           parse_footprint(args.footprint))
    print(f"wrote {trace_figure(panels, Path(args.out))}")
    return 0


def cmd_train_digits(args: argparse.Namespace) -> int:
    from frmap.engine.models.digits import CHECKPOINT, train_and_save

    report = train_and_save(args.out or CHECKPOINT, seed=args.seed, epochs=args.epochs,
                            threads=args.threads, progress=True)
    print(json.dumps(asdict(report)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    bench = importlib.import_module(f"frmap.bench.{args.target}")
    result = bench.run(quick=args.quick)
    print(bench.table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
