"""Resumable generation of adversarial sets, their loading and their Table-1 statistics.

`generate` attacks the inputs shard by shard (`shard_size` consecutive inputs each) and writes
one `shard-NNNNN.npz` per shard plus `manifest.json` into a directory. Every file is written to
a temporary name and renamed into place (atomic on POSIX), and each shard's randomness comes
from `(seed, shard number)` alone, so a run killed at any point and started again skips the
finished shards, recomputes the rest and ends with the same set as an uninterrupted run. One
directory holds one set; two runs must not write into it at the same time.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.attacks.base import Attack, check_inputs, run_attack
from frmap.engine.attacks.registry import make_attack
from frmap.engine.data.files import atomic_write_bytes, write_json
from frmap.engine.models.runtime import tensors_digest

_FORMAT = "frmap.adversarial-set/1"
_MANIFEST = "manifest.json"
_ARRAYS = (
    "index",
    "adversarial",
    "label",
    "adv_label",
    "true_confidence",
    "adv_confidence",
    "epsilon",
)


@dataclass(frozen=True)
class AdversarialSet:
    """The successful adversarials of one attack, in input order.

    Attributes:
        attack: The attack's name.
        index: `[M]` int64, position of each adversarial's clean image in the inputs.
        images: `[M, C, H, W]` float32 adversarial images in [0, 1].
        labels: `[M]` int64 true classes.
        adv_labels: `[M]` int64 classes the model now predicts.
        true_confidence: `[M]` float32 probability of the true class after the attack.
        adv_confidence: `[M]` float32 probability of the new class.
        epsilon: `[M]` float64 perturbation size in the attack's norm (see `AttackResult`).
        inputs: Number of clean images given.
        attacked: Number of them the model classified correctly, all of which were attacked.
    """

    attack: str
    index: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    adv_labels: torch.Tensor
    true_confidence: torch.Tensor
    adv_confidence: torch.Tensor
    epsilon: torch.Tensor
    inputs: int
    attacked: int


@dataclass(frozen=True)
class AttackStats:
    """The paper's Table 1 columns for one attack (NaN means where nothing succeeded)."""

    attack: str
    inputs: int
    attacked: int
    succeeded: int
    success_rate: float
    true_confidence: float
    adv_confidence: float


def attack_stats(adversarial: AdversarialSet) -> AttackStats:
    """Count attacked, success rate, mean true-class and mean new-class confidence after."""
    succeeded = len(adversarial.index)
    return AttackStats(
        attack=adversarial.attack,
        inputs=adversarial.inputs,
        attacked=adversarial.attacked,
        succeeded=succeeded,
        success_rate=succeeded / adversarial.attacked if adversarial.attacked else math.nan,
        true_confidence=float(adversarial.true_confidence.double().mean())
        if succeeded
        else math.nan,
        adv_confidence=float(adversarial.adv_confidence.double().mean()) if succeeded else math.nan,
    )


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard-{shard:05d}.npz"


def _shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def _identity(
    attack: Attack,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    shard_size: int,
    seed: int,
) -> dict:
    return {
        "format": _FORMAT,
        "attack": attack.name,
        "config": json.loads(json.dumps(asdict(attack))),
        "seed": seed,
        "shard_size": shard_size,
        "inputs": len(images),
        "shards": -(-len(images) // shard_size),
        "image_shape": list(images.shape[1:]),
        "inputs_sha256": tensors_digest([("images", images.float()), ("labels", labels.long())]),
        "model_sha256": tensors_digest(model.state_dict().items()),
    }


def _attack_shard(
    attack: Attack,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    seed: int,
    progress: bool,
) -> dict[str, np.ndarray]:
    result = run_attack(attack, model, images, labels, seed=seed, progress=progress)
    ok = result.success
    return {
        "index": (torch.arange(len(images)) + start)[ok].numpy(),
        "adversarial": result.adversarial[ok].numpy(),
        "label": labels.long()[ok].numpy(),
        "adv_label": result.adv_labels[ok].numpy(),
        "true_confidence": result.true_confidence[ok].numpy(),
        "adv_confidence": result.adv_confidence[ok].numpy(),
        "epsilon": result.epsilon[ok].numpy(),
        "attacked": np.int64(result.attacked.sum()),
    }


def generate(
    attack: Attack | str,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | Path,
    *,
    shard_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> AdversarialSet:
    """Attack `images` shard by shard into `out_dir`, resuming whatever a previous run finished.

    Args:
        attack: An attack config or the name of one (default settings).
        model: Classifier of `[N, C, H, W]` images in [0, 1] (see `run_attack`).
        images: `[N, C, H, W]` floating point in [0, 1].
        labels: `[N]` integer true classes.
        out_dir: Directory of the set; created if missing.
        shard_size: Consecutive inputs per shard (and per attack batch).
        seed: Base seed; shard `k` runs with a seed derived from `(seed, k)`.
        progress: Show progress bars.

    Returns:
        The set, as `load_adversarial_set(out_dir)` returns it.

    Raises:
        ValueError: Bad inputs, or `out_dir` holds a set made with another attack, config, seed,
            shard size, inputs or model, or shards without a manifest.
    """
    attack = make_attack(attack) if isinstance(attack, str) else attack
    check_inputs(model, images, labels)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = _identity(attack, model, images, labels, shard_size, seed)
    manifest_path = out / _MANIFEST
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        if changed:
            raise ValueError(
                f"{out} holds another adversarial set (differs in {', '.join(changed)}); "
                "use an empty directory"
            )
    elif any(out.glob("shard-*.npz")):
        raise ValueError(f"{out} holds shards but no {_MANIFEST}; use an empty directory")
    else:
        write_json(manifest_path, {**identity, "complete": False})
    for stray in out.glob(".*.tmp"):
        stray.unlink()
    shards = identity["shards"]
    done = sum(_shard_path(out, k).exists() for k in range(shards))
    with tqdm(
        total=shards, initial=done, desc=attack.name, unit="shard", disable=not progress
    ) as bar:
        for k in range(shards):
            path = _shard_path(out, k)
            if path.exists():
                continue
            start = k * shard_size
            part = slice(start, start + shard_size)
            arrays = _attack_shard(
                attack, model, images[part], labels[part], start, _shard_seed(seed, k), progress
            )
            _write_shard(path, arrays)
            bar.update()
    write_json(manifest_path, {**identity, "complete": True})
    return load_adversarial_set(out)


def load_adversarial_set(out_dir: str | Path) -> AdversarialSet:
    """Load a complete set written by `generate`, in input order.

    Raises:
        FileNotFoundError: No manifest in `out_dir`.
        ValueError: The set is incomplete (run `generate` again to finish it) or a shard is
            missing or malformed.
    """
    out = Path(out_dir)
    manifest_path = out / _MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no adversarial set in {out} ({_MANIFEST} missing)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{manifest_path}: not an adversarial set manifest")
    if not manifest["complete"]:
        raise ValueError(f"{out}: the set is incomplete; run generate again to finish it")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    attacked = 0
    for k in range(manifest["shards"]):
        path = _shard_path(out, k)
        try:
            with np.load(path) as shard:
                for name in _ARRAYS:
                    parts[name].append(shard[name])
                attacked += int(shard["attacked"])
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: missing or malformed shard ({err})") from err
    arrays = {name: torch.from_numpy(np.concatenate(parts[name])) for name in _ARRAYS}
    return AdversarialSet(
        attack=manifest["attack"],
        index=arrays["index"],
        images=arrays["adversarial"],
        labels=arrays["label"],
        adv_labels=arrays["adv_label"],
        true_confidence=arrays["true_confidence"],
        adv_confidence=arrays["adv_confidence"],
        epsilon=arrays["epsilon"],
        inputs=manifest["inputs"],
        attacked=attacked,
    )
