"""Atomic outputs: everything is written under a temporary name and renamed into place at the end.

An interrupted or failed run leaves at most a ``.lowbit-tmp-*`` sibling, never an output that looks
complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lowbit.errors import OutputExistsError


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``; fail early, before any work is done."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it or choose another -o")
    if not path.parent.exists():
        raise OutputExistsError(f"the folder {path.parent} does not exist; create it first")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, path: Path) -> None:
    # mkstemp/mkdtemp create 0600/0700 entries: give the output the permissions a plain open() would.
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.lowbit-old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it becomes ``path``."""
    check_output(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.lowbit-tmp-", dir=path.parent))
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it is renamed to ``path``."""
    check_output(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.lowbit-tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
