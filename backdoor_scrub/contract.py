"""Contracts other programs rely on, defined once: exit codes, JSON schema version, metadata keys."""

from enum import IntEnum

SCHEMA_VERSION = 2

KEY_ARCH, KEY_NUM_CLASSES, KEY_INPUT_SIZE = "arch", "num_classes", "input_size"
KEY_MEAN, KEY_STD, KEY_CLASSES = "mean", "std", "classes"
KEY_VERSION, KEY_SOURCE_SHA, KEY_HISTORY = "scrub.version", "scrub.source_sha256", "scrub.history"

TRIGGER_POSITIONS = ("br", "bl", "tr", "tl", "center")
PROGRESS_MODES = ("auto", "bar", "lines", "none")


class ExitCode(IntEnum):
    """Process exit codes (README's table)."""

    OK = 0
    GATE_FAILED = 1
    USAGE = 2
    INPUT = 3
    INTERNAL = 4
    INTERRUPTED = 130
    TERMINATED = 143
