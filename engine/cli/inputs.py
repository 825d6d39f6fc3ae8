"""What the commands read: the model named by the arguments, image files and data sets."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from frmap.engine.models.named import NamedModel

_LABEL_IN_NAME = re.compile(r"_(\d+)$")


def load_model(args: argparse.Namespace) -> NamedModel:
    """The classifier named by --model, --weights, --seed on --device, reading image files of
    at most --max-pixels; anything printed while loading (torch hub's download messages) goes
    to standard error, so standard output carries results only. `--precision auto` is resolved
    for the device here (`resolve_precision`), once per command; with --screener it keeps the
    file's own."""
    from dataclasses import replace

    from frmap.engine.models.named import load_model as load_named

    with contextlib.redirect_stdout(sys.stderr):
        named = load_named(args.model, args.weights, seed=args.seed, device=device(args.device))
    if getattr(args, "precision", None) == "auto" and not getattr(args, "screener", None):
        from frmap.engine.responses import resolve_precision

        args.precision = resolve_precision("auto", device(args.device))
    return replace(named, spec=replace(named.spec, max_pixels=args.max_pixels))


def device(name: str) -> torch.device:
    """--device: "auto" (CUDA where available), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device here "
                         f"({torch.cuda.device_count()} available)")
    return device


def response_engine(model: NamedModel, args: argparse.Namespace):
    from frmap.engine.responses.engine import ResponseEngine

    return ResponseEngine(model.model, rule=getattr(args, "rule", "guided"),
                          target=getattr(args, "target", "conv_max"),
                          batch_size=args.batch_size, preprocess=model.preprocess,
                          precision=args.precision)


def load_files(paths: list, spec: object) -> tuple[list[Path], list[torch.Tensor]]:
    """Load what loads; report each bad file (or bad path from `expand_paths`) on stderr and
    skip it."""
    from frmap.engine.data.images import ImageFileError, load_image

    good, tensors = [], []
    for path in paths:
        if isinstance(path, ImageFileError):
            print(f"frmap: skipped {path}", file=sys.stderr)
            continue
        try:
            tensors.append(load_image(path, spec))
            good.append(path)
        except ImageFileError as err:
            print(f"frmap: skipped {err}", file=sys.stderr)
    return good, tensors


def labels_from_paths(paths: list[Path]) -> torch.Tensor | None:
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


def dataset(model: NamedModel, folder: str | None, split: str,
             labels_from: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from an image folder, or the digits split `split` by default.

    Labels come from file names (`name_<label>.png`) or class-index folders; where there are
    none, or with `labels_from="predicted"`, the model's own predictions stand in for them
    (every image then counts as correctly classified).
    """
    from frmap.engine.data.images import expand_paths
    from frmap.engine.models.predict import predict

    if folder is None:
        if model.name != "digits":
            raise ValueError(f"--data is needed for model {model.name}")
        from frmap.engine.data.digits import load_digits_split

        s = load_digits_split(split)
        return s.images, s.labels
    paths, tensors = load_files(list(expand_paths([folder])), model.spec)
    if not tensors:
        raise ValueError(f"{folder}: no usable image")
    images = torch.stack(tensors)
    labels = labels_from_paths(paths) if labels_from == "auto" else None
    return images, labels if labels is not None else predict(model.classifier, images)[0]


def halves(data: tuple[torch.Tensor, torch.Tensor]):
    """Alternate images into (calibration, test) when only one folder is given."""
    images, labels = data
    if len(images) < 2:
        raise ValueError("need at least two images to calibrate on one half and test on the other")
    return (images[0::2], labels[0::2]), (images[1::2], labels[1::2])


def score_paths(args: argparse.Namespace) -> Iterator[object]:
    """The paths to score (`expand_paths`: files, or errors for paths that cannot be used)."""
    from frmap.engine.data.images import expand_paths

    inputs = list(args.paths)
    if not inputs or inputs == ["-"]:
        inputs = (line.strip() for line in sys.stdin if line.strip())
    yield from expand_paths(inputs)
