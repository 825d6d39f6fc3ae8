"""A resumable folder of shards: numbered files of one job, each written once, atomically.

The folder holds `shard-NNNNN<suffix>` files and `manifest.json`: the job's identity (what
decides the shards' content: inputs, model, settings; with a "format" and the number of
"shards"), whether the job is complete and each finished shard's SHA-256. A writer holds an
exclusive lock on the folder (`.frmap.lock`, with `filelock`), so a second run on the same
folder fails at once; a rerun of the same job keeps the shards whose checksum holds and
recomputes the rest; a folder of another job, or of files frmap did not write, is refused, never
cleaned (frmap only removes its own temporary files, `.frmap-*.tmp`). Used by the adversarial
sets (`frmap.engine.attacks.sets`) and the score jobs (`frmap.engine.jobs.score`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from frmap.engine.data.files import atomic_write_bytes, is_temporary, write_json
from frmap.kernels.errors import FrmapError

MANIFEST = "manifest.json"
LOCK = ".frmap.lock"


def read_manifest(folder: Path, format: str, noun: str) -> dict | None:
    """The manifest in `folder`, None where there is none.

    Raises:
        ValueError: the manifest is not a JSON object of `format` (`noun` names the job kind).
    """
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable {noun} manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != format:
        raise ValueError(f"{path}: not a manifest of {noun}s (format {format} expected)")
    return manifest


def checksums(manifest: dict, shards: int) -> list[str | None]:
    """The manifest's SHA-256 of each of `shards` shards (None: not finished)."""
    sums = manifest.get("shard_sha256")
    if isinstance(sums, list) and len(sums) == shards:
        return [s if isinstance(s, str) else None for s in sums]
    return [None] * shards


def sha256(path: Path) -> str | None:
    """The file's SHA-256, None where it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ShardStore:
    """The shard folder of one job (see the module docstring).

    Args:
        folder: the folder; created if missing.
        identity: the job's identity, with "format" and "shards" (how many).
        suffix: the shard files' suffix (".npz", ".jsonl").
        noun, short: what the folder holds, for messages ("adversarial set", "set").
    """

    def __init__(self, folder: Path, identity: dict, *, suffix: str, noun: str,
                 short: str) -> None:
        self.folder, self.identity, self.suffix = Path(folder), identity, suffix
        self.noun, self.short = noun, short
        self.shards: int = identity["shards"]
        self._sums: list[str | None] = [None] * self.shards

    def path(self, k: int) -> Path:
        return self.folder / f"shard-{k:05d}{self.suffix}"

    @contextmanager
    def writing(self) -> Iterator[list[bool]]:
        """Claim the folder for this job while the block runs; yields which shards are already
        finished (their checksums hold).

        Raises:
            ValueError: the folder holds another job, or files but no job of this kind; or
                another run is writing it.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / MANIFEST).exists():
            self._refuse_foreign()  # before the lock file is made in it
        try:
            with FileLock(self.folder / LOCK, timeout=0):
                yield self._claim()
        except Timeout:
            raise ValueError(f"{self.folder}: another frmap run is writing this {self.short} "
                             f"(it holds {LOCK}); wait for it to finish or use another "
                             "directory") from None

    def _refuse_foreign(self) -> None:
        foreign = sorted(p.name for p in self.folder.iterdir()
                         if not (is_temporary(p) or p.name == LOCK))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(f"{self.folder} is not empty and holds no {self.noun} (no "
                             f"{MANIFEST}; it holds {shown}); use an empty or new directory")

    def _claim(self) -> list[bool]:
        previous = read_manifest(self.folder, self.identity["format"], self.noun)
        if previous is not None:
            changed = sorted(k for k in self.identity if previous.get(k) != self.identity[k])
            if changed:
                raise ValueError(f"{self.folder} holds another {self.noun} (differs in "
                                 f"{', '.join(changed)}); use an empty directory")
            sums = checksums(previous, self.shards)
        else:
            self._refuse_foreign()
            sums = [None] * self.shards
        for stray in self.folder.iterdir():
            if is_temporary(stray):
                stray.unlink()
        self._sums = [s if s is not None and sha256(self.path(k)) == s else None
                      for k, s in enumerate(sums)]
        self._write_manifest(False)
        return [s is not None for s in self._sums]

    def write(self, k: int, data: bytes) -> None:
        """Shard `k`'s file, atomically, and its checksum in the manifest."""
        atomic_write_bytes(self.path(k), data)
        self._sums[k] = hashlib.sha256(data).hexdigest()
        self._write_manifest(False)

    def complete(self) -> None:
        """Mark the job complete.

        Raises:
            FrmapError: shards are missing.
        """
        missing = [k for k, s in enumerate(self._sums) if s is None]
        if missing:
            raise FrmapError(f"{self.folder}: shards {missing} were not written; run again")
        self._write_manifest(True)

    def read(self, k: int) -> bytes:
        """Shard `k`'s bytes, checked against its checksum.

        Raises:
            ValueError: the shard is missing or its bytes are not the ones written.
        """
        path = self.path(k)
        data = path.read_bytes() if path.exists() else b""
        if self._sums[k] is None or hashlib.sha256(data).hexdigest() != self._sums[k]:
            raise ValueError(f"{path}: missing, truncated or corrupt shard (its SHA-256 is not "
                             "the manifest's); run again to recompute it")
        return data

    def _write_manifest(self, complete: bool) -> None:
        write_json(self.folder / MANIFEST,
                   {**self.identity, "complete": complete, "shard_sha256": self._sums})
