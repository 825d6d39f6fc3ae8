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

Safeguards: the manifest records each finished shard's SHA-256, so a truncated or corrupt shard
is recomputed by `generate` and refused by `load_adversarial_set`; every shard records the
attack, model and seed that made it, checked on load; `generate` holds an exclusive lock on the
directory (`.frmap.lock`, with `filelock`) while it writes, so a second run on the same directory
fails at once; and it only ever removes files frmap wrote itself (temporary files named
`.frmap-*.tmp`): a non-empty directory that holds no set is refused, not cleaned.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn
from tqdm.auto import tqdm

from frmap.engine.attacks.base import Attack, check_inputs, run_attack
from frmap.engine.attacks.registry import make_attack
from frmap.engine.data.files import atomic_write_bytes, is_temporary, write_json
from frmap.engine.models.runtime import tensors_digest

_FORMAT = "frmap.adversarial-set/1"
_MANIFEST = "manifest.json"
_LOCK = ".frmap.lock"
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


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _read_manifest(out: Path) -> dict | None:
    """The manifest of the set in `out`, None where there is none.

    Raises:
        ValueError: the manifest is not a JSON object of this format.
    """
    path = out / _MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable adversarial set manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an adversarial set manifest (format {_FORMAT} expected)")
    return manifest


def _checksums(manifest: dict, shards: int) -> list[str | None]:
    sums = manifest.get("shard_sha256")
    if isinstance(sums, list) and len(sums) == shards:
        return [s if isinstance(s, str) else None for s in sums]
    return [None] * shards


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = _identity(attack, model, images, labels, shard_size, seed)
    if not (out / _MANIFEST).exists():
        _refuse_foreign(out)  # before the lock file is made in it
    try:
        with FileLock(out / _LOCK, timeout=0):
            _generate_locked(attack, model, images, labels, out, identity, progress, executor)
    except Timeout:
        raise ValueError(f"{out}: another frmap run is writing this set (it holds {_LOCK}); "
                         "wait for it to finish or use another directory") from None
    return load_adversarial_set(out)


def _refuse_foreign(out: Path) -> None:
    """Raise ValueError where `out` holds files (no set) that frmap did not write."""
    foreign = sorted(p.name for p in out.iterdir() if not (is_temporary(p) or p.name == _LOCK))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(f"{out} is not empty and holds no adversarial set (no {_MANIFEST}; "
                         f"it holds {shown}); use an empty or new directory")


def _generate_locked(attack: Attack, model: nn.Module, images: torch.Tensor,
                     labels: torch.Tensor, out: Path, identity: dict, progress: bool,
                     executor: ShardExecutor | None) -> None:
    shards, shard_size = identity["shards"], identity["shard_size"]
    previous = _read_manifest(out)
    if previous is not None:
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        if changed:
            raise ValueError(
                f"{out} holds another adversarial set (differs in {', '.join(changed)}); "
                "use an empty directory"
            )
        checksums = _checksums(previous, shards)
    else:
        _refuse_foreign(out)
        checksums = [None] * shards
    for stray in out.iterdir():
        if is_temporary(stray):
            stray.unlink()
    manifest_path = out / _MANIFEST
    checksums = [c if c is not None and _sha256(_shard_path(out, k)) == c else None
                 for k, c in enumerate(checksums)]
    valid = [c is not None for c in checksums]
    write_json(manifest_path, {**identity, "complete": False, "shard_sha256": checksums})
    made_by = _made_by(identity)
    todo = [AttackShard(k, k * shard_size, images[k * shard_size:(k + 1) * shard_size],
                        labels[k * shard_size:(k + 1) * shard_size],
                        _shard_seed(identity["seed"], k), made_by)
            for k in range(shards) if not valid[k]]
    if executor is None:
        done = ((s.number, attack_shard(attack, model, s, progress)) for s in todo)
    else:
        done = executor(attack, todo)
    with tqdm(total=shards, initial=sum(valid), desc=attack.name, unit="shard",
              disable=not progress) as bar:
        for k, data in done:
            atomic_write_bytes(_shard_path(out, k), data)
            checksums[k] = hashlib.sha256(data).hexdigest()
            write_json(manifest_path, {**identity, "complete": False, "shard_sha256": checksums})
            bar.update()
    missing = [k for k, c in enumerate(checksums) if c is None]
    if missing:
        raise RuntimeError(f"{out}: shards {missing} were not attacked; run generate again")
    write_json(manifest_path, {**identity, "complete": True, "shard_sha256": checksums})


def load_adversarial_set(out_dir: str | Path) -> AdversarialSet:
    """Load a complete set written by `generate`, in input order.

    Raises:
        FileNotFoundError: No manifest in `out_dir`.
        ValueError: The set is incomplete (run `generate` again to finish it), or a shard is
            missing, corrupt, malformed or made by another attack, model or seed.
    """
    out = Path(out_dir)
    manifest = _read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no adversarial set in {out} ({_MANIFEST} missing)")
    if manifest.get("complete") is not True:
        raise ValueError(f"{out}: the set is incomplete; run generate again to finish it")
    shards = manifest.get("shards")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 0:
        raise ValueError(f"{out / _MANIFEST}: field 'shards' must be a count, got {shards!r}")
    checksums = _checksums(manifest, shards)
    made_by = {k: manifest.get(k) for k in _MADE_BY}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    attacked = 0
    for k in range(shards):
        path = _shard_path(out, k)
        if checksums[k] is None or _sha256(path) != checksums[k]:
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
