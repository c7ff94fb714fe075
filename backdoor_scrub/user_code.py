"""Objects named `pkg.module:name` on the command line (--arch factories, --trigger-fn), never from metadata."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

from backdoor_scrub.errors import usage_error

OBJECT_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def import_object(spec: str, option: str) -> tuple[object, ModuleType]:
    """The object `spec` names and its module; a usage error naming `option` when it cannot be imported."""
    if not OBJECT_NAME.match(spec):
        raise usage_error(f"{option} {spec!r}: use pkg.module:name")
    module_name, object_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, object_name), module
    except (ImportError, AttributeError) as exc:
        raise usage_error(f"{option} {spec}: cannot import ({exc})") from exc


def module_sha256(module: ModuleType) -> str | None:
    """The sha256 of the module's source file, for provenance (None when it has no file)."""
    try:
        path = inspect.getsourcefile(module)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except (OSError, TypeError):
        return None
