"""Files that are never half-written: write to a temporary file beside the target, then rename.

Temporary files are named `.frmap-<target name>.<random>.tmp` (`TEMP_PREFIX`), so that frmap can
tell its own leftovers from a user's files and never removes anything else. Written files get
the mode a plain `open` would give them (0666 less the umask).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".frmap-"
TEMP_SUFFIX = ".tmp"


def is_temporary(path: Path) -> bool:
    """True for a temporary file of `atomic_write_bytes` (a leftover of a killed writer)."""
    return path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (readers see the old file or the new one, never part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX,
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: object) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
