"""The embedded default's classifier: `DigitsCNN`, a small VGG-style CNN for the 32x32 digits.

`DigitsCNN` has conv3x3 + `nn.ReLU` blocks with max-pooling in `features` and a two-layer
`classifier`, laid out like torchvision's VGG so the response engine can swap its ReLU modules
and walk its layers in reverse. It is trained on the digits' train split
(`frmap.engine.data.digits`); the trained checkpoint ships as `digits_cnn.safetensors` beside
this module, with a JSON sidecar (`digits_cnn.json`) holding the training report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.data.digits import DigitsSplit, load_digits_split
from frmap.engine.models.predict import predict
from frmap.engine.models.runtime import torch_settings
from frmap.engine.models.vgg import load_weights

NUM_CLASSES = 10
CHECKPOINT = Path(__file__).parent / "digits_cnn.safetensors"
EPOCHS = 20


@dataclass(frozen=True)
class DigitsTrainReport:
    """How a `DigitsCNN` checkpoint was trained and how well it classifies."""

    seed: int
    epochs: int
    batch_size: int
    lr: float
    threads: int
    train_accuracy: float
    calibration_accuracy: float
    test_accuracy: float
    seconds: float
    parameters: int
    torch_version: str


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for `[N, 1, 32, 32]` inputs in [0, 1] returning 10 logits.

    `features`: (conv3x3-ReLU) x2 -> maxpool -> (conv3x3-ReLU) x2 -> maxpool -> conv3x3-ReLU
    -> maxpool, 16/16/32/32/64 channels, 32 -> 4 pixels; `classifier`: Linear(1024, 64) -> ReLU
    -> Linear(64, 10). Only `nn.ReLU` modules, no functional activations.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for width in (16, 16, "M", 32, 32, "M", 64, "M"):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 4 * 4, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def accuracy(model: nn.Module, split: DigitsSplit) -> float:
    """Share of the split's images that `model` classifies correctly."""
    labels, _ = predict(model, split.images)
    return float((labels == split.labels).double().mean())


def train_digits(
    seed: int = 0,
    epochs: int = EPOCHS,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    threads: int = 2,
    progress: bool = False,
) -> tuple[DigitsCNN, DigitsTrainReport]:
    """Train a `DigitsCNN` on the train split, reproducibly.

    Adam with a one-cycle learning-rate schedule on the cross-entropy; initialisation and batch
    order come from `seed`; deterministic algorithms and `threads` intra-op threads are in force
    while training (the caller's settings and global RNG state are restored afterwards). The
    same seed, epochs and threads on the same machine give bitwise the same weights.

    Args:
        seed: Seeds the weights and the batch order.
        epochs: Passes over the train split.
        batch_size: Images per optimisation step.
        lr: Peak learning rate.
        threads: `torch.set_num_threads` while training.
        progress: Show a tqdm bar over the epochs.

    Returns:
        The trained model (eval mode) and its report.
    """
    if epochs < 1 or batch_size < 1 or threads < 1:
        raise ValueError(
            f"epochs, batch_size and threads must be >= 1, got {epochs}, {batch_size}, {threads}"
        )
    train = load_digits_split("train")
    start = time.perf_counter()
    with torch_settings(threads, deterministic=True), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
        order = torch.Generator().manual_seed(seed)
        steps = epochs * -(-len(train.labels) // batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        model.train()
        for _ in tqdm(range(epochs), desc="train digits", unit="epoch", disable=not progress):
            for batch in torch.randperm(len(train.labels), generator=order).split(batch_size):
                loss = F.cross_entropy(model(train.images[batch]), train.labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        seconds = time.perf_counter() - start
        report = DigitsTrainReport(
            seed=seed,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            threads=threads,
            train_accuracy=accuracy(model, train),
            calibration_accuracy=accuracy(model, load_digits_split("calibration")),
            test_accuracy=accuracy(model, load_digits_split("test")),
            seconds=round(seconds, 2),
            parameters=sum(p.numel() for p in model.parameters()),
            torch_version=torch.__version__,
        )
    return model, report


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(model: DigitsCNN, report: DigitsTrainReport, path: str | Path) -> None:
    """Write the weights as safetensors at `path` and the report as JSON beside it (`.json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "frmap.DigitsCNN"})
    _sidecar(path).write_text(json.dumps(asdict(report), indent=2) + "\n")


def load_digits_model(path: str | Path = CHECKPOINT) -> DigitsCNN:
    """Load a `DigitsCNN` (by default the one shipped with frmap) in eval mode.

    Raises:
        FileNotFoundError: There is no file at `path`.
        ValueError: The file is not a `DigitsCNN` checkpoint (missing, unexpected or misshapen
            tensors, or not safetensors at all).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no digits checkpoint at {path}")
    return load_weights(DigitsCNN(), path).eval()


def load_report(path: str | Path = CHECKPOINT) -> DigitsTrainReport:
    """Read the JSON training report beside the checkpoint at `path`."""
    sidecar = _sidecar(Path(path))
    try:
        return DigitsTrainReport(**json.loads(sidecar.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{sidecar}: not a digits training report ({err})") from err


def train_and_save(
    path: str | Path = CHECKPOINT,
    seed: int = 0,
    epochs: int = EPOCHS,
    threads: int = 2,
    progress: bool = False,
) -> DigitsTrainReport:
    """Train with `train_digits` and save the checkpoint and its report (`frmap train-digits`)."""
    model, report = train_digits(seed, epochs, threads=threads, progress=progress)
    save_checkpoint(model, report, path)
    return report
