"""Checks of the paths given on the command line, before torch is imported: a typo fails in well under a second."""

from __future__ import annotations

from pathlib import Path

from backdoor_scrub.errors import input_error


def check_paths(
    models: list[Path], folders: dict[str, Path | None], files: dict[str, Path | None], keep_going: bool = False
) -> None:
    """Models exist (files, or hub folders), each named folder is a folder and each named file a file.

    With `keep_going` a missing model is left to the per-model loop, which reports it and goes on.
    An error carries one JSON entry per model that it stops.
    """
    missing = [path for path in models if not path.exists()]
    if missing and not keep_going:
        raise input_error(f"{missing[0]}: cannot read (No such file or directory)").stopping(models)
    for option, folder in folders.items():
        if folder is not None and not folder.is_dir():
            raise input_error(f"{folder}: not a folder ({option})").stopping(models)
    for option, file in files.items():
        if file is not None and not file.is_file():
            reason = "a folder" if file.is_dir() else "no such file"
            raise input_error(f"{file}: cannot read the trigger ({reason}; {option})").stopping(models)

