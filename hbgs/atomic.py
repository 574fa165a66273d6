"""Files written whole or not at all: what a run leaves (models, state, summaries, histories,
charts, caches) goes through a temp file in the same folder, flushed to disk, then ``os.replace``
over the target, so a reader or a resumed run sees the old file or the new one, never half of one,
and a failed write leaves no temp file behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """A file object to write ``path``'s new content to; it replaces ``path`` when the block ends
    without an error. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary file, not mkstemp's private one
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def copy_atomically(source: str | os.PathLike, target: str | os.PathLike) -> None:
    with atomic_file(target) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)
