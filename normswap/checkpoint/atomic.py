"""Writing a file all at once or not at all: every file normswap writes goes through :func:`atomic_write`.

The content is written to a temporary file beside the target (``.<name>.<random>.normswap-tmp``), flushed to disk
(fsync) and renamed to the target, so a reader sees either the old state or the whole new file. Whatever exception
stops the write, the temporary file is removed: an error, a full disk, Ctrl-C's ``KeyboardInterrupt``. An existing
target is replaced only when asked (``overwrite``).

A write installs no signal handler and works from any thread: a library call leaves the process's signal handling
as it is. SIGTERM becomes an exception only where the program asks for it: :func:`interruptible` turns it into
:class:`Terminated` (a ``KeyboardInterrupt``, so the same cleanup runs) within its block, which the ``normswap``
command wraps around everything it does. Otherwise only a signal that ends the process without an exception
(SIGKILL, an unhandled SIGTERM) or a power cut can leave one ``*.normswap-tmp`` file behind, never a partial file
under the target's name.

Example::

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> atomic_write(target, lambda tmp: tmp.write_text("hello")).read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..errors import OutputError, byte_size, spelled

__all__ = ["TEMPORARY_SUFFIX", "Terminated", "atomic_write", "check_output", "interruptible"]

PathLike = Union[str, "os.PathLike[str]"]

TEMPORARY_SUFFIX = ".normswap-tmp"
"""How the temporary file of an unfinished write ends (only SIGKILL or a power cut can leave one behind)."""

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's ``KeyboardInterrupt`` so that the same cleanup runs for both."""


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within this block (main thread only, and only where SIGTERM has its default action), SIGTERM raises
    :class:`Terminated`; a second SIGTERM during the cleanup is ignored, then the old handling is restored.

    For programs, around their whole run (the ``normswap`` command uses it): normswap's functions never install it
    themselves."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_output(path: PathLike, *, overwrite: bool = False) -> Path:
    """``path`` if a file can be written there, else :class:`OutputError` saying why (checked before long work).

    >>> check_output("/nonexistent/model.safetensors")
    Traceback (most recent call last):
    ...
    normswap.errors.OutputError: cannot write /nonexistent/model.safetensors: the folder /nonexistent does not exist
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"cannot write {path}: the folder {folder} {reason}")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    if path.exists() and not overwrite:
        raise _exists(path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no write permission in the folder {folder}")
    return path


def _exists(path: Path) -> OutputError:
    return OutputError(f"{path} already exists: pass {spelled('overwrite=True', '--force')} to replace it")


def _check_space(path: Path, size: Optional[int]) -> None:
    if size is None:
        return
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise OutputError(f"not enough space to write {path}: it needs {byte_size(size)}, the disk has "
                          f"{byte_size(free)} free")


def _create_temporary(path: Path) -> Path:
    """A new empty file beside ``path`` (same folder, so the final rename is atomic), mode as for a new file."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except PermissionError:
            raise OutputError(f"cannot write {path}: no write permission in the folder {path.parent}") from None
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        os.close(fd)
        return temporary


def _publish(temporary: Path, path: Path, overwrite: bool) -> None:
    """Give the finished temporary file its final name; never replaces an existing file unless ``overwrite``."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError:
        if path.exists():
            raise _exists(path) from None
        os.replace(temporary, path)
        return
    temporary.unlink()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                 size: Optional[int] = None) -> Path:
    """Write a file all at once or not at all; returns its path.

    ``write(temporary_path)`` writes the content to a temporary file in the target folder; the file is then flushed
    to disk (fsync) and renamed to ``path``. On any exception, Ctrl-C included (and SIGTERM within
    :func:`interruptible`), the temporary file is removed and ``path`` is untouched. ``size``, the expected size in
    bytes, is checked against the free space first. No signal handler is installed: any thread may call this.

    Raises:
        OutputError: ``path`` exists (and not ``overwrite``), its folder is missing or not writable, or the disk is
            full (the message says how much space was needed and how much was free).
    """
    path = check_output(path, overwrite=overwrite)
    _check_space(path, size)
    temporary = _create_temporary(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        _publish(temporary, path, overwrite)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        if exc.errno in _NO_SPACE:
            needed = f"it needs {byte_size(size)}, " if size is not None else ""
            raise OutputError(f"the disk is full: cannot write {path} ({needed}"
                              f"{byte_size(shutil.disk_usage(path.parent).free)} free)") from None
        if exc.strerror is None:
            raise
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path
