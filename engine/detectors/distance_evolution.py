"""Feature-distance-space evolution (Carrara et al., ECCV 2018 Workshops).

For each of L layers and C classes, a reference point from the training set: the class
centroid, or its medoid (the member with the smallest sum of Euclidean distances to the other
members). An image becomes a sequence over the layers of C-vectors, its Euclidean distances or
cosine similarities to the layer's references; a small network reads the sequence and returns
a logit, higher = more adversarial:

- "lstm": unidirectional LSTM (hidden 100) over the layers, last output -> linear -> logit;
- "mlp": the flattened L*C sequence -> 100 -> ReLU -> dropout 0.5 -> logit.

Before the network, each layer's values are standardised with the mean and standard deviation
of that layer over the training sequences (layers differ in scale by orders of magnitude;
`standardise=False` feeds the raw values). With `predicted_first` (the default; the paper keeps
the class order), each C-vector is rolled so that it starts at the image's predicted class
(entry j: class (predicted + j) mod C), so the sequence means the same whatever the class: on the
digits it raised the networks' mean test AUC from 0.60 / 0.58 (LSTM / MLP) to 0.73 / 0.79
(`frmap probe-evolution`).
Training: binary cross-entropy, Adam, batches drawn with replacement so that clean and
adversarial examples weigh half each and every attack weighs the same, and the epoch whose
weights give the best mean over attacks of the validation AUC is kept. The learning rate is
halved when that mean has not risen for `lr_patience` epochs, and training stops when it has
not risen for `patience` epochs (or after `epochs`). The networks learn from `Examples`
(`frmap.engine.detectors.examples`), whose splits never put versions of one image on both sides.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.detectors.base import Detector
from frmap.engine.detectors.examples import Examples
from frmap.engine.detectors.features import Features
from frmap.engine.detectors.file_fields import FileFields
from frmap.engine.detectors.screen_pass import ScreenPass
from frmap.engine.detectors.threshold import Threshold
from frmap.engine.models.runtime import torch_settings

REFERENCES = ("medoid", "centroid")
EMBEDDINGS = ("cosine", "euclidean")
NETWORKS = ("lstm", "mlp")
# The largest hidden size a detector file may ask for (its network is built before its weights
# are checked).
MAX_HIDDEN = 4096


def class_references(
    x: np.ndarray, labels: np.ndarray, num_classes: int, kind: str = "medoid"
) -> np.ndarray:
    """One reference point per class: `[N, D]` features, `[N]` labels -> `[C, D]` float64.

    "centroid": the mean of the class's features; "medoid": the class member with the smallest
    sum of Euclidean distances to the class's members (the first one on ties).

    Raises:
        ValueError: unknown kind, or a class without members.
    """
    if kind not in REFERENCES:
        raise ValueError(f"unknown reference {kind!r}; expected one of {REFERENCES}")
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)
    empty = [c for c in range(num_classes) if not (labels == c).any()]
    if empty:
        raise ValueError(f"classes {empty} have no training samples")
    out = np.empty((num_classes, x.shape[1]))
    for c in range(num_classes):
        members = x[labels == c]
        if kind == "centroid":
            out[c] = members.mean(0)
        else:
            out[c] = members[cdist(members, members).sum(1).argmin()]
    return out


def embed(x: np.ndarray, references: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """`[N, D]` features, `[C, D]` references -> `[N, C]` float64 Euclidean distances or cosine
    similarities (a zero vector has similarity 0 to everything)."""
    if kind not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {kind!r}; expected one of {EMBEDDINGS}")
    x = np.asarray(x, dtype=np.float64)
    if kind == "euclidean":
        return cdist(x, references)

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    return unit(x) @ unit(references).T


@dataclass(frozen=True)
class EvolutionConfig:
    """How the detector embeds the layers and which network it trains how.

    Attributes:
        layers: the feature layers, in forward order (`Features.layers` keys).
        reference: "medoid" or "centroid".
        embedding: "cosine" (similarities) or "euclidean" (distances).
        network: "lstm" or "mlp".
        standardise: standardise each layer's values over the training sequences.
        predicted_first: roll each C-vector to start at the predicted class (files without
            the setting keep the class order they were trained on).
        epochs: at most this many passes of `len(train)` balanced draws; the best epoch by
            validation is kept.
        patience: stop after this many epochs without a better validation AUC.
        lr_patience: halve the learning rate after this many epochs without a better one.
        seed: seeds the weights, the dropout and the draws.
    """

    layers: tuple[str, ...]
    reference: str = "medoid"
    embedding: str = "cosine"
    network: str = "lstm"
    standardise: bool = True
    predicted_first: bool = True
    hidden: int = 100
    epochs: int = 300
    batch_size: int = 128
    lr: float = 3e-4
    patience: int = 30
    lr_patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        for value, allowed in ((self.reference, REFERENCES), (self.embedding, EMBEDDINGS),
                               (self.network, NETWORKS)):
            if value not in allowed:
                raise ValueError(f"unknown option {value!r}; expected one of {allowed}")
        if not self.layers or min(self.hidden, self.epochs, self.batch_size, self.patience,
                                  self.lr_patience) < 1:
            raise ValueError("need at least one layer, and hidden, epochs, batch_size, "
                             "patience, lr_patience >= 1")


@dataclass(frozen=True)
class EvolutionTrainReport:
    """How training went.

    Attributes:
        best_epoch: the kept epoch (1-based).
        validation_auc: per attack, the validation AUC of the kept epoch.
        history: per epoch trained, the mean over attacks of the validation AUC (shorter
            than `epochs` where training stopped early).
    """

    best_epoch: int
    validation_auc: dict[str, float]
    history: tuple[float, ...]


class _LastStep(nn.Module):
    """LSTM over the layers; its output at the last layer -> linear -> logit."""

    def __init__(self, classes: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(classes, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(x)[0][:, -1]).squeeze(1)


def _network(config: EvolutionConfig, classes: int) -> nn.Module:
    if config.network == "lstm":
        return _LastStep(classes, config.hidden)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(len(config.layers) * classes, config.hidden), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(config.hidden, 1), nn.Flatten(0),
    )


@dataclass(frozen=True, eq=False)
class DistanceEvolutionDetector(Detector):
    """A trained distance-space evolution detector (build it with `fit`).

    Attributes:
        references: layer -> `[C, D]` the class reference points.
        mean, std: `[L]` per-layer standardisation of the embedded sequences.
        state: the network's weights (`state_dict` as numpy arrays).
        model: the `model_identity` of the CNN the features come from.
    """

    kind = "distance-evolution"
    config: EvolutionConfig
    model: str
    references: dict[str, np.ndarray]
    mean: np.ndarray
    std: np.ndarray
    state: dict[str, np.ndarray]
    report: EvolutionTrainReport
    threshold: Threshold | None = None
    _net: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if list(self.references) != list(self.config.layers):
            raise ValueError("references must be given for exactly the configured layers")
        net = _network(self.config, self.classes)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in self.state.items()})
        object.__setattr__(self, "_net", net.eval())

    @property
    def layers(self) -> tuple[str, ...]:
        return self.config.layers

    @property
    def classes(self) -> int:
        """C, the number of classes."""
        return len(next(iter(self.references.values())))

    @classmethod
    def fit(
        cls,
        reference: Features,
        labels: np.ndarray,
        train: Examples,
        validation: Examples,
        config: EvolutionConfig,
        *,
        model: str = "",
        progress: bool = False,
    ) -> DistanceEvolutionDetector:
        """Choose the references and train the network, deterministically for a given seed.

        Args:
            reference: Clean training-set features the references come from; C is the
                number of its logits.
            labels: `[N]` the classes of `reference`'s images.
            train, validation: Clean and adversarial examples (disjoint source images).
            config: What to build and how to train it.
            model: The `model_identity` of the CNN.
            progress: Show a tqdm bar over the epochs.

        The same seed, data and thread count give bitwise the same weights (deterministic
        algorithms are in force while training; the caller's RNG state is left untouched).
        """
        classes = reference.logits.shape[1]
        references = {
            layer: class_references(reference.layer(layer), labels, classes, config.reference)
            for layer in config.layers
        }
        raw = _sequences(train.features, references, config)
        mean, std = np.zeros(len(config.layers)), np.ones(len(config.layers))
        if config.standardise:
            mean, std = raw.mean((0, 2)), np.maximum(raw.std((0, 2)), 1e-12)
        seq = _standardise(raw, mean, std)
        val = _standardise(
            _sequences(validation.features, references, config), mean, std
        )
        state, report = _train(config, classes, seq, train, val, validation, progress)
        return cls(config, model, references, mean, std, state, report)

    def sequences(self, features: Features) -> np.ndarray:
        """`[N, L, C]` float32, the standardised sequences the network reads."""
        raw = _sequences(features, self.references, self.config)
        return _standardise(raw, self.mean, self.std)

    @torch.no_grad()
    def score(self, p: ScreenPass, batch_size: int = 4096) -> np.ndarray:
        """`[N]` float64, the network's logits: higher = more adversarial."""
        features = p.features
        return np.concatenate([
            _logits(self._net, self.sequences(features.take(slice(i, i + batch_size))))
            for i in range(0, len(features), batch_size)
        ])

    def _settings(self) -> dict:
        return {"config": asdict(self.config), "report": asdict(self.report)}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "std": self.std,
                **{f"reference:{k}": v for k, v in self.references.items()},
                **{f"net:{k}": v for k, v in self.state.items()}}

    @classmethod
    def _from_file(cls, meta, arrays, *, model, threshold):
        f = FileFields(meta, arrays)
        c, r = f.section("config"), f.section("report")
        config = EvolutionConfig(
            layers=c.texts("layers"), reference=c.text("reference", REFERENCES),
            embedding=c.text("embedding", EMBEDDINGS), network=c.text("network", NETWORKS),
            standardise=c.is_null("standardise") or c.boolean("standardise"),
            predicted_first=not c.is_null("predicted_first") and c.boolean("predicted_first"),
            hidden=c.integer("hidden", 1, MAX_HIDDEN), epochs=c.integer("epochs", 1),
            batch_size=c.integer("batch_size", 1), lr=c.number("lr", 0.0), seed=c.integer("seed"))
        auc = r.section("validation_auc")
        report = EvolutionTrainReport(r.integer("best_epoch", 1),
                                      {k: auc.number(k, 0.0, 1.0) for k in auc.meta},
                                      r.numbers("history"))
        layers = len(config.layers)
        references = {k: f.array(f"reference:{k}", (None, None)) for k in config.layers}
        if len({len(v) for v in references.values()}) != 1:
            raise ValueError("the 'reference:' arrays must have one row per class, all alike")
        std = f.array("std", (layers,))
        if not (std > 0).all():
            raise ValueError("array 'std' must be positive")
        state = {k[4:]: f.array(k, (None,) * arrays[k].ndim) for k in arrays
                 if k.startswith("net:")}
        return cls(config=config, model=model, references=references,
                   mean=f.array("mean", (layers,)), std=std, state=state, report=report,
                   threshold=threshold)

def _sequences(features: Features, references: Mapping[str, np.ndarray],
               config: EvolutionConfig) -> np.ndarray:
    """`[N, L, C]` the embedded layers, rolled to the predicted class where configured."""
    seq = np.stack([embed(features.layer(k), r, config.embedding)
                    for k, r in references.items()], 1)
    if not config.predicted_first:
        return seq
    classes = seq.shape[2]
    index = (features.predictions[:, None] + np.arange(classes)) % classes
    return np.take_along_axis(seq, index[:, None, :], 2)


def _standardise(raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((raw - mean[:, None]) / std[:, None]).astype(np.float32)


def _logits(net: nn.Module, seq: np.ndarray) -> np.ndarray:
    return net(torch.from_numpy(seq)).double().numpy()


def _balanced_weights(examples: Examples) -> torch.Tensor:
    """Draw weights: clean and adversarial half each, every attack the same share."""
    if examples.adversarial.all() or not examples.adversarial.any():
        raise ValueError("training needs clean and adversarial examples")
    weights = np.zeros(len(examples))
    clean = ~examples.adversarial
    weights[clean] = 0.5 / clean.sum()
    for attack in examples.attacks:
        rows = examples.attack == attack
        weights[rows] = 0.5 / (len(examples.attacks) * rows.sum())
    return torch.from_numpy(weights)


def _validation_auc(
    net: nn.Module, seq: np.ndarray, validation: Examples
) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        scores = _logits(net, seq)
    clean = scores[~validation.adversarial]
    return {a: float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(adv))],
                                   np.r_[clean, adv]))
            for a in validation.attacks for adv in [scores[validation.attack == a]]}


def _train(
    config: EvolutionConfig,
    classes: int,
    seq: np.ndarray,
    train: Examples,
    val: np.ndarray,
    validation: Examples,
    progress: bool,
) -> tuple[dict[str, np.ndarray], EvolutionTrainReport]:
    if not validation.attacks or validation.adversarial.all():
        raise ValueError("validation needs clean and adversarial examples")
    weights = _balanced_weights(train)
    x = torch.from_numpy(seq)
    y = torch.from_numpy(train.adversarial.astype(np.float32))
    with torch_settings(deterministic=True), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        draws = torch.Generator().manual_seed(config.seed)
        net = _network(config, classes)
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.5, patience=config.lr_patience, threshold=0.0)
        history, best = [], None
        for epoch in tqdm(range(1, config.epochs + 1), desc=f"train {config.network}",
                          unit="epoch", disable=not progress):
            net.train()
            order = torch.multinomial(weights, len(train), replacement=True, generator=draws)
            for batch in order.split(config.batch_size):
                loss = F.binary_cross_entropy_with_logits(net(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            aucs = _validation_auc(net, val, validation)
            history.append(float(np.mean(list(aucs.values()))))
            if best is None or history[-1] > history[best[0] - 1]:
                best = (epoch, aucs, copy.deepcopy(net.state_dict()))
            if epoch - best[0] >= config.patience:
                break
            schedule.step(history[-1])
    epoch, aucs, state = best
    report = EvolutionTrainReport(epoch, aucs, tuple(history))
    return {k: v.numpy() for k, v in state.items()}, report
