"""Atomic file writes: every file the project writes lands whole or not at all."""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator:
    """A temporary file beside `path`, fsynced and moved onto it only when the block succeeds.

    On any error (or interruption) the temporary file is removed and `path` keeps its old contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename is atomic; one name per process and thread; mode 666 less the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj, indent: int | None = None) -> None:
    """json.dump through atomic_write."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)
