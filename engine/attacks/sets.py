"""Resumable generation of adversarial sets, their loading and their Table-1 statistics.

`generate` attacks the inputs shard by shard (`shard_size` consecutive inputs each) and writes
one `shard-NNNNN.npz` per shard plus `manifest.json` into a directory. Every file is written to
a temporary name and renamed into place (atomic on POSIX), and each shard's randomness comes
from `(seed, shard number)` alone, so a run killed at any point and started again skips the
finished shards, recomputes the rest and ends with the same set as an uninterrupted run, byte
for byte (the archives carry no time stamps).

`generate` attacks the missing shards in this process, or hands them to an executor (a Ray Data
job in `frmap.engine.jobs`) that runs `attack_shard` on each elsewhere and gives back the
shard files' bytes in any order; the set is the same.

Safeguards (the shard store of `frmap.engine.data.shards`, shared with the score jobs): the
manifest records each finished shard's SHA-256, so a truncated or corrupt shard is recomputed by
`generate` and refused by `load_adversarial_set`; every shard records the attack, model and seed
that made it, checked on load; `generate` holds an exclusive lock on the directory
(`.frmap.lock`) while it writes, so a second run on the same directory fails at once; and it
only ever removes files frmap wrote itself (temporary files named `.frmap-*.tmp`): a non-empty
directory that holds no set is refused, not cleaned.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.attacks.base import Attack, check_inputs, run_attack
from frmap.engine.attacks.registry import make_attack
from frmap.engine.data.shards import ShardStore, checksums, read_manifest, sha256
from frmap.engine.models.runtime import tensors_digest

_FORMAT = "frmap.adversarial-set/1"
_NOUN = "adversarial set"
# What each shard records of the run that made it (checked against the manifest on load).
_MADE_BY = ("attack", "model_sha256", "seed")
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


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An `.npz` archive as `np.savez` writes it, without time stamps (same arrays, same bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


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


@dataclass(frozen=True)
class AttackShard:
    """One shard of a set to attack: all `attack_shard` needs, wherever it runs.

    Attributes:
        number: the shard's number; start: the position of its first input.
        images, labels: its inputs (`[n, C, H, W]` in [0, 1], `[n]`).
        seed: its seed, derived from the set's seed and `number` alone.
        made_by: the attack, model and seed its file records (JSON).
    """

    number: int
    start: int
    images: torch.Tensor
    labels: torch.Tensor
    seed: int
    made_by: str


# Attacks the shards it is given, yielding (shard number, shard file bytes) in any order.
ShardExecutor = Callable[[Attack, list[AttackShard]], Iterable[tuple[int, bytes]]]


def attack_shard(attack: Attack, model: nn.Module, shard: AttackShard,
                 progress: bool = False) -> bytes:
    """The shard file of `shard` (an `.npz` archive; the same inputs give the same bytes)."""
    result = run_attack(attack, model, shard.images, shard.labels, seed=shard.seed,
                        progress=progress)
    ok = result.success
    return _npz_bytes({
        "index": (torch.arange(len(shard.images)) + shard.start)[ok].numpy(),
        "adversarial": result.adversarial[ok].numpy(),
        "label": shard.labels.long()[ok].numpy(),
        "adv_label": result.adv_labels[ok].numpy(),
        "true_confidence": result.true_confidence[ok].numpy(),
        "adv_confidence": result.adv_confidence[ok].numpy(),
        "epsilon": result.epsilon[ok].numpy(),
        "attacked": np.int64(result.attacked.sum()),
        "made_by": np.array(shard.made_by),
    })


def _made_by(identity: dict) -> str:
    return json.dumps({k: identity[k] for k in _MADE_BY})


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
    executor: ShardExecutor | None = None,
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
        executor: Attacks the missing shards elsewhere (default: here, one after another).

    Returns:
        The set, as `load_adversarial_set(out_dir)` returns it.

    Raises:
        ValueError: Bad inputs; `out_dir` holds a set made with another attack, config, seed,
            shard size, inputs or model, or files but no set; or another run is writing there.
    """
    attack = make_attack(attack) if isinstance(attack, str) else attack
    check_inputs(model, images, labels)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    identity = _identity(attack, model, images, labels, shard_size, seed)
    store = _store(Path(out_dir), identity)
    with store.writing() as finished:
        made_by = _made_by(identity)
        todo = [AttackShard(k, k * shard_size, images[k * shard_size:(k + 1) * shard_size],
                            labels[k * shard_size:(k + 1) * shard_size],
                            _shard_seed(seed, k), made_by)
                for k in range(store.shards) if not finished[k]]
        if executor is None:
            done = ((s.number, attack_shard(attack, model, s, progress)) for s in todo)
        else:
            done = executor(attack, todo)
        with tqdm(total=store.shards, initial=sum(finished), desc=attack.name, unit="shard",
                  disable=not progress) as bar:
            for k, data in done:
                store.write(k, data)
                bar.update()
        store.complete()
    return load_adversarial_set(out_dir)


def _store(out: Path, identity: dict) -> ShardStore:
    return ShardStore(out, identity, suffix=".npz", noun=_NOUN, short="set")


def load_adversarial_set(out_dir: str | Path) -> AdversarialSet:
    """Load a complete set written by `generate`, in input order.

    Raises:
        FileNotFoundError: No manifest in `out_dir`.
        ValueError: The set is incomplete (run `generate` again to finish it), or a shard is
            missing, corrupt, malformed or made by another attack, model or seed.
    """
    out = Path(out_dir)
    manifest = read_manifest(out, _FORMAT, _NOUN)
    if manifest is None:
        raise FileNotFoundError(f"no adversarial set in {out} (manifest.json missing)")
    if manifest.get("complete") is not True:
        raise ValueError(f"{out}: the set is incomplete; run generate again to finish it")
    shards = manifest.get("shards")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 0:
        raise ValueError(f"{out / 'manifest.json'}: field 'shards' must be a count, got "
                         f"{shards!r}")
    sums = checksums(manifest, shards)
    made_by = {k: manifest.get(k) for k in _MADE_BY}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    attacked = 0
    for k in range(shards):
        path = _store(out, manifest).path(k)
        if sums[k] is None or sha256(path) != sums[k]:
            raise ValueError(f"{path}: missing, truncated or corrupt shard (its SHA-256 is not "
                             "the manifest's); run generate again to recompute it")
        try:
            with np.load(path, allow_pickle=False) as shard:
                recorded = json.loads(str(shard["made_by"]))
                for name in _ARRAYS:
                    parts[name].append(shard[name])
                attacked += int(shard["attacked"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: malformed shard ({err})") from None
        if recorded != made_by:
            raise ValueError(f"{path}: made by {recorded}, but the set is {made_by}; run "
                             "generate again in an empty directory")
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
