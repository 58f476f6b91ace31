"""Atomic file and folder writes: a partially written artifact never appears under its final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qexport.errors import QExportError


class OutputExists(QExportError, FileExistsError):
    """The output path already exists and overwriting was not asked for."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExists(f"{str(p)!r} already exists; pass overwrite/--force to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def replace_folder(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing ``out`` is replaced only with ``force``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    if out.exists():
        if not force:
            raise OutputExists(f"{str(out)!r} already exists; pass force=True / --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
