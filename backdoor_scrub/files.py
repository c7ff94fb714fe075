"""Atomic file writes: a hidden temporary file, fsynced, given the mode the umask allows, then put in place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from backdoor_scrub.errors import ScrubError, input_error


def write_atomically(path: Path, write: Callable[[BinaryIO], None], overwrite: bool) -> None:
    """Call `write` on a temporary file beside `path`, then hard-link it (never clobbers) or rename it there.

    `path` never holds a partial file, and the temporary file is removed on any exception (only a
    process killed outright can leave a hidden `.NAME.*.tmp` behind). The file gets mode 0666 less
    the umask, as open() would give it (mkstemp alone gives 0600). A failed write (a full disk, a
    read-only or missing folder, a refused permission) is an input error: `PATH: cannot write (reason)`.
    """
    temp_name = None
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
        if overwrite:
            os.replace(temp_name, path)
        else:
            os.link(temp_name, path)
    except FileExistsError:
        raise input_error(f"{path}: already exists (use --force to overwrite)") from None
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    finally:
        if temp_name is not None and os.path.exists(temp_name):
            os.unlink(temp_name)


def make_folder(folder: Path) -> None:
    """Create `folder` (and its parents) if missing; failing that, the input error `FOLDER: cannot write (reason)`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(folder, exc) from exc


def _cannot_write(path: Path, exc: OSError) -> ScrubError:
    return input_error(f"{path}: cannot write ({exc.strerror or exc})")


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
