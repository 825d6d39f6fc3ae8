"""The commands: each reads its arguments, runs the library and prints for people."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from frmap.engine.cli.cluster import cpus_each, ray_session, worker_pool
from frmap.engine.cli.inputs import (
    dataset,
    halves,
    labels_from_paths,
    load_files,
    load_model,
    response_engine,
    score_paths,
)
from frmap.engine.cli.options import DEMO_ATTACKED
from frmap.engine.data.files import write_json
from frmap.engine.models import model_device
from frmap.engine.models.named import NamedModel
from frmap.engine.models.runtime import torch_settings
from frmap.kernels.errors import FrmapError

# the detectors `frmap demo` builds its screener from: those fit in seconds on the digits
DEMO_DETECTORS = ("entropy", "knn", "squeeze")


def _print_stats(stats: list) -> None:
    print(f"{'attack':10} {'inputs':>6} {'attacked':>8} {'success':>8} {'true conf':>9} "
          f"{'new conf':>8}")
    for s in stats:
        print(f"{s.attack:10} {s.inputs:6d} {s.attacked:8d} {s.success_rate:8.3f} "
              f"{s.true_confidence:9.3f} {s.adv_confidence:8.3f}")


def cmd_demo(args: argparse.Namespace) -> int:
    from frmap.engine.attacks import PAPER_ATTACKS
    from frmap.engine.data.digits import load_digits_split
    from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS
    from frmap.engine.evaluation.comparison import (
        ComparisonConfig,
        compare_detectors,
        comparison_table,
    )
    from frmap.engine.evaluation.study import StudyConfig
    from frmap.engine.models.digits import load_digits_model

    model = load_digits_model()
    splits = {s: load_digits_split(s) for s in ("train", "calibration", "test")}
    train, cal, test = ((s.images, s.labels) for s in splits.values())
    limit = 40 if args.quick else DEMO_ATTACKED
    out = Path(args.out)
    _report_study(model, cal, test, out, StudyConfig(attack_limit=limit, seed=0))
    report = compare_detectors(
        model, train=train, calibration=cal, test=test, out_dir=out,
        config=ComparisonConfig(detectors=DEMO_DETECTORS, attacks=PAPER_ATTACKS,
                                squeeze=DIGITS_SQUEEZERS, attack_limit=limit, train_limit=limit,
                                seed=0),
        screener_path=out / "screener.frmap", progress=True)
    print(f"\nThe screener's candidates (AUC / detection rate at FPR 5%; combined: logistic "
          f"regression on {len(report.images['combiner'])} train images):")
    print(comparison_table(report.results, report.costs))
    _print_screener(report.screener, str(out / "screener.frmap"), report.screener_cost)
    return 0


def _report_study(model, calibration, test, out: Path, config, scorer=None) -> int:
    from frmap.engine.evaluation.metrics import table
    from frmap.engine.evaluation.study import MIN_ADVERSARIALS, run_study

    report = run_study(model, calibration, test, out, config, progress=True, scorer=scorer)
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
        footprints=args.footprints or StudyConfig.footprints,
        rule=args.rule, target=args.target, precision=args.precision,
        preprocess=model.preprocess, attack_limit=args.limit, batch_size=args.batch_size,
        seed=args.seed,
    )
    comparison = ComparisonConfig(
        detectors=tuple(args.detectors.split(",")), attacks=config.attacks, rule=args.rule,
        target=args.target, precision=args.precision, preprocess=model.preprocess,
        squeeze=DIGITS_SQUEEZERS if model.name == "digits" else IMAGENET_SQUEEZERS,
        attack_limit=args.limit,
        train_limit=args.limit, batch_size=args.batch_size, seed=args.seed,
        adaptive=None if args.adaptive is None else AdaptiveConfig(epsilon=args.adaptive),
        max_cost=args.max_cost,
    )
    calibration, test = _evaluation_splits(args, model)
    if args.max_cost is not None and not args.save_screener:
        raise ValueError("--max-cost chooses the saved screener's detectors: give "
                         "--save-screener FILE too")
    if comparison.detectors == ("entropy",) and not args.save_screener:
        return _study(args, model, calibration, test, config)
    train = _train_split(args, model)
    _study(args, model, calibration, test, config)
    report = compare_detectors(model.model, train=train, calibration=calibration, test=test,
                               out_dir=args.out, config=comparison,
                               screener_path=args.save_screener, progress=True)
    print(f"\nDetector comparison (AUC / detection rate at FPR 5%; {comparison.footprint} entropy;"
          f" combined: logistic regression on {len(report.images['combiner'])} train images):")
    print(comparison_table([*report.results, *report.per_layer, *report.unseen], report.costs))
    if report.best_layer:
        print("\nbest single layer (mean AUC over the measured attacks): " + ", ".join(
            f"{name} {layer}" for name, layer in report.best_layer.items()))
    print(f"\nwrote {args.out}/: " + ", ".join(Path(f).name for f in report.files.values()))
    if args.save_screener:
        _print_screener(report.screener, args.save_screener, report.screener_cost)
    return 0


def _study(args: argparse.Namespace, model: NamedModel, calibration, test, config) -> int:
    """The study of `frmap evaluate`, its scoring on Ray workers with --ray."""
    if not args.ray:
        return _report_study(model.model, calibration, test, Path(args.out), config)
    with ray_session(args):
        from frmap.engine.jobs.study import ray_footprint_scores

        scorer = ray_footprint_scores(worker_pool(args, model), config.engine, config.footprints)
        return _report_study(model.model, calibration, test, Path(args.out), config,
                             scorer=scorer)


def _print_screener(detectors: tuple[str, ...], path: str, cost: float | None) -> None:
    print(f"\nscreener: {' '.join(detectors)} ({cost:.2f} forward passes a screen) -> {path}; "
          "use it with\n"
          f"  frmap score --screener {path} IMAGES...\n"
          f"  frmap serve --screener {path}")


def _evaluation_splits(args: argparse.Namespace, model: NamedModel) -> tuple:
    """The clean (calibration, test) splits of --data / --calibration."""
    test = dataset(model, args.data, "test", args.labels)
    if args.calibration is not None or args.data is None:
        return dataset(model, args.calibration, "calibration", args.labels), test
    return halves(test)


def _train_split(args: argparse.Namespace, model: NamedModel) -> tuple:
    """The clean train split of --train (the digits' by default)."""
    if args.train is None and model.name != "digits":
        raise ValueError(f"--train is needed to compare detectors on model {model.name}")
    return dataset(model, args.train, "train", args.labels)


def cmd_probe_evolution(args: argparse.Namespace) -> int:
    from frmap.engine.attacks import ATTACKS
    from frmap.engine.evaluation.comparison import ComparisonConfig
    from frmap.engine.evaluation.evolution_probe import probe_evolution

    model = load_model(args)
    calibration, test = _evaluation_splits(args, model)
    config = ComparisonConfig(
        attacks=tuple(args.attacks.split(",")) if args.attacks else tuple(ATTACKS),
        preprocess=model.preprocess, attack_limit=args.limit, train_limit=args.limit,
        batch_size=args.batch_size, seed=args.seed)
    rows = probe_evolution(model.model, train=_train_split(args, model),
                           calibration=calibration, test=test, out_dir=args.out, config=config,
                           seeds=tuple(range(args.seeds)), progress=True)
    print(f"\nDistance evolution, mean test AUC over the measured attacks ({args.seeds} seeds: "
          "mean +- std; validation AUC and best epoch of the kept weights), kNN beside it:")
    print(f"{'variant':28} {'network':7} {'AUC':>6} {'+-':>6} {'val AUC':>7} {'epoch':>6}")
    for r in rows:
        trained = "" if r.best_epoch is None else f"{r.validation_auc:7.3f} {r.best_epoch:6.1f}"
        print(f"{r.variant:28} {r.network:7} {r.auc:6.3f} {r.spread:6.3f} {trained}")
    print(f"\nwrote {Path(args.out) / 'evolution-probe.json'}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from frmap.engine.attacks.sets import attack_stats, generate

    model = load_model(args)
    images, labels = dataset(model, args.data, "test", args.labels)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    with ray_session(args) if args.ray else contextlib.nullcontext():
        executor = None
        if args.ray:
            from frmap.engine.jobs.attack import ray_attacks

            executor = ray_attacks(worker_pool(args, model))
        result = generate(args.attack, model.classifier, images, labels, args.out,
                          seed=args.seed, shard_size=args.shard_size, progress=True,
                          executor=executor)
    _print_stats([attack_stats(result)])
    print(f"wrote {args.out}")
    return 0


def _screener(model: NamedModel, args: argparse.Namespace):
    """The screener of --screener, or an entropy-only one (no flags) from the arguments."""
    from frmap.engine.detectors import EntropyDetector
    from frmap.engine.models import model_identity
    from frmap.engine.screening import Screener

    if args.screener:
        given = [f"--{name}" for name in ("rule", "target", "footprint")
                 if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{args.screener}: a screener file fixes its detectors' settings; "
                             f"leave out {', '.join(given)}")
        screener = Screener.load(args.screener, model.model, preprocess=model.preprocess,
                                 batch_size=args.batch_size)
        own = {d.precision for d in screener.detectors.values()
               if isinstance(d, EntropyDetector)}
        if args.precision not in (None, "auto") and own - {args.precision}:
            raise ValueError(f"{args.screener}: its entropy detector was calibrated in "
                             f"{own.pop()}; --precision {args.precision} would void its "
                             "threshold (leave --precision out)")
        return screener
    detector = EntropyDetector(args.footprint or "square3", args.rule or "guided",
                               args.target or "conv_max", model_identity(model.model),
                               precision=args.precision or "float32")
    return Screener(model.model, {"entropy": detector}, preprocess=model.preprocess,
                    batch_size=args.batch_size)


def cmd_score(args: argparse.Namespace) -> int:
    model = load_model(args)
    screener = _screener(model, args)
    if args.ray:
        return _score_on_ray(args, model, screener)
    failed = 0

    def flush(batch: list[Path]) -> None:
        nonlocal failed
        good, tensors = load_files(batch, model.spec)
        failed += len(batch) - len(good)
        if not tensors:
            return
        records = screener.records(torch.stack(tensors))
        for path, record in zip(good, records, strict=True):
            print(json.dumps({"path": str(path), **record}), flush=True)

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


def _score_on_ray(args: argparse.Namespace, model: NamedModel, screener) -> int:
    import tempfile

    from frmap.engine.data.images import ImageFileError

    if not args.out:
        raise ValueError("--ray writes its results to a file: give --out results.jsonl")
    paths, bad = [], 0
    for item in score_paths(args):
        if isinstance(item, ImageFileError):
            print(f"frmap: skipped {item}", file=sys.stderr)
            bad += 1
        else:
            paths.append(item)
    with ray_session(args), tempfile.TemporaryDirectory() as tmp:
        from frmap.engine.jobs.score import ScoreJob, run_score_job

        job = ScoreJob(worker_pool(args, model), batch_size=args.batch_size,
                       shard_groups=args.shard_groups)
        report = run_score_job(
            paths, screener.save(Path(tmp) / "screener.frmap"), Path(args.out), job,
            spec=model.spec,
            on_shard=lambda done, all_: print(f"frmap score: shard {done}/{all_}",
                                              file=sys.stderr, flush=True))
    print(f"frmap score: {report.inputs} inputs, {report.failed} failed, shards computed "
          f"{len(report.computed)}, reused {len(report.reused)} -> {args.out}", file=sys.stderr)
    return 1 if report.failed or bad else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from frmap.engine.detectors.squeeze import DIGITS_SQUEEZERS, IMAGENET_SQUEEZERS
    from frmap.engine.models.predict import predict
    from frmap.engine.screening import Screener
    from frmap.engine.screening.build import clean_detectors

    names = tuple(args.detectors.split(","))
    model = load_model(args)
    images, labels = dataset(model, args.data, "calibration", args.labels)
    correct = predict(model.classifier, images)[0] == labels
    if not bool(correct.any()):
        raise ValueError(f"{args.data or 'the calibration split'}: the model classifies none of "
                         f"its {len(images)} images correctly (labels from file or folder names; "
                         "--labels predicted uses the model's own); calibration needs correctly "
                         "classified clean images")
    images = images[correct]
    train = dataset(model, args.train, "train", args.labels) if "knn" in names else None
    detectors = clean_detectors(
        names, model.model, model.classifier, train=train, footprint=args.footprint, rule=args.rule,
        target=args.target, precision=args.precision, batch_size=args.batch_size,
        squeeze=DIGITS_SQUEEZERS if model.name == "digits" else IMAGENET_SQUEEZERS)
    screener = Screener(model.model, detectors, preprocess=model.preprocess,
                        batch_size=args.batch_size).calibrate(images, args.fpr)
    screener.save(args.out)
    print(json.dumps({"screener": args.out, "decision": screener.decision, "fpr": args.fpr,
                      "clean_images": len(images),
                      "thresholds": {n: d.threshold.value for n, d in screener.detectors.items()},
                      "achieved_fpr": {n: d.threshold.achieved_fpr
                                       for n, d in screener.detectors.items()}}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from frmap.engine.screening import Screener
    from frmap.engine.serving import ServiceConfig
    from frmap.engine.serving.access import check_exposure, read_token

    check_exposure(args.host, args.token_file, args.insecure)
    token = read_token(args.token_file) if args.token_file else None
    on_ray = bool(args.ray or args.address)
    if args.replicas > 1 and not on_ray:
        raise ValueError("--replicas runs on Ray Serve: add --ray (a local Ray instance) or "
                         "--address (a cluster)")
    with torch_settings(1):  # no second team of OpenMP threads beside the service's
        model = load_model(args)
        Screener.load(args.screener, model.model, preprocess=model.preprocess)  # fail fast
    data = Path(args.screener).read_bytes()
    settings = {"model": args.model, "weights": args.weights, "seed": args.seed,
                "device": str(model_device(model.model)), "max_batch": args.max_batch,
                "max_wait_ms": args.max_wait_ms, "max_bytes": args.max_bytes,
                "max_pixels": args.max_pixels, "max_queued": args.max_queued,
                "timeout_s": args.timeout, "gpus": args.gpus_per_replica,
                "compile": args.compile}
    if on_ray:
        return _serve_on_ray(args, data, settings, token)
    import asyncio
    import os
    import signal

    from frmap.engine.serving import ScreeningApp
    from frmap.engine.serving.local import local_server

    cpus = args.cpus_per_replica or len(os.sched_getaffinity(0))
    app = ScreeningApp(data, ServiceConfig(**settings, cpus=cpus), token, named=model)
    server = local_server(app, args.host, args.port)

    async def run() -> None:
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"frmap serve: {args.screener} on http://{args.host}:{args.port} (one "
                  f"process, {cpus} torch thread(s), batches of up to {args.max_batch}"
                  f"{', bearer token required' if token else ''}); POST /screen, GET /healthz, "
                  "GET /metrics; Ctrl-C stops", flush=True)
        await serving

    # uvicorn catches SIGINT and SIGTERM while it serves, then raises them again to the
    # handlers it found: these, which let the command end with its own message and status 0
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    asyncio.run(run())  # a port it cannot listen on: uvicorn says so and exits with status 3
    print("frmap serve: stopped", flush=True)
    return 0


def _serve_on_ray(args: argparse.Namespace, data: bytes, settings: dict,
                  token: str | None) -> int:
    import signal
    import threading

    from frmap.engine.serving import ServiceConfig

    try:
        from ray import serve

        from frmap.engine.serving.cluster import ray_application
    except ImportError as err:
        raise FrmapError(f"frmap serve on Ray needs Ray Serve ({err}): pip install "
                         "'frmap[serve]'") from None
    stop = threading.Event()
    with ray_session(args):
        for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
            signal.signal(signum, lambda *_: stop.set())
        cpus = cpus_each(args, args.cpus_per_replica, args.replicas)
        config = ServiceConfig(**settings, replicas=args.replicas, cpus=cpus)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(ray_application(data, config, token), name="frmap", route_prefix="/")
            print(f"frmap serve: {args.screener} on http://{args.host}:{args.port} (Ray Serve, "
                  f"{args.replicas} replica(s) of {cpus} CPU(s), batches of up to "
                  f"{args.max_batch}); POST /screen, GET /healthz, GET /metrics; Ctrl-C stops",
                  flush=True)
            stop.wait()
        finally:
            serve.shutdown()
    print("frmap serve: stopped", flush=True)
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
    label = label if label is not None else predict(model.classifier, image[None])[0]
    result = run_attack(make_attack(args.attack), model.classifier, image[None], label,
                        seed=args.seed)
    adversarials = {args.attack: result.adversarial[0]} if bool(result.success[0]) else {}
    if not adversarials:
        print(f"frmap visualize: {args.attack} did not fool the model on {args.image}; "
              "drawing the clean image alone", file=sys.stderr)
    panels = trace_panels(response_engine(model, args), model.classifier, image, adversarials,
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
    import importlib.util

    # the rows of another device are the module `<target>_<device>`
    name = args.target if args.device == "cpu" else f"{args.target}_{args.device}"
    if importlib.util.find_spec(f"frmap.bench.{name}") is None:
        raise ValueError(f"`frmap bench {args.target}` has no --device {args.device} rows")
    bench = importlib.import_module(f"frmap.bench.{name}")
    if args.model is not None and name != "responses":
        raise ValueError(f"`frmap bench {name.replace('_', ' --device ')}` has no --model "
                         "option")
    options = {} if args.model is None else {"model": args.model}
    result = bench.run(quick=args.quick, **options)
    print(bench.table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
