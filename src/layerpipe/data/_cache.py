"""Where generated datasets are cached, and an atomic .npz writer."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """cache_dir, else $LAYERPIPE_CACHE, else ~/.cache/layerpipe."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LAYERPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerpipe"


def read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays stored at `path`, or None if it is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:  # a truncated or foreign file: regenerate rather than fail
        log.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` via a temporary file and os.replace, so that a reader never
    sees a half-written file; a cache that cannot be written only costs a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as exc:
        log.warning("cannot write cache %s (%s); continuing without it", path, exc)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        log.debug("cached %s", path)
    except OSError as exc:
        log.warning("cannot write cache %s (%s); continuing without it", path, exc)
        try:
            os.unlink(tmp)
        except OSError:
            pass
