"""Small JAX-free helpers every layer shares: atomic file writes and progress bars."""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from typing import Any


def file_mode() -> int:
    """0o666 less the process umask: the mode open() would have given a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = False
                 ) -> pathlib.Path:
    """Write `data` to `path` via a temp file in the same directory and a rename, so a reader
    sees the old file or the new one, never a torn one. The file gets the mode open() would
    have given it (mkstemp's 0600 would survive the rename); `fsync` flushes it to disk first.
    Text is written as UTF-8."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


class NoBar:
    """What `progress` returns when no bar is shown: the same calls, doing nothing."""

    def update(self, _: int = 1) -> None:
        pass

    def set_description(self, _: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress(total: int, *, unit: str, desc: str | None = None, quiet: bool = False) -> Any:
    """A tqdm bar (`tqdm.auto`: a widget in notebooks) over `total` units on stderr, gone when
    done; a no-op bar with `quiet`, or when stderr is neither a terminal nor a notebook's.
    Usable as a context manager."""
    if quiet or not (sys.stderr.isatty() or "ipykernel" in sys.modules):
        return NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
