"""Exit codes and the one exception type for expected failures."""

from __future__ import annotations

from backdoor_scrub.contract import ExitCode


class ScrubError(Exception):
    """An expected failure: printed as one line, exits with `exit_code`."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.INPUT):
        super().__init__(message)
        self.exit_code = exit_code
        self.models: list[dict] = []  # JSON entries of the models processed or stopped when it was raised

    def stopping(self, paths: list) -> ScrubError:
        """The error, its JSON entries saying it stopped every model of `paths`."""
        self.models = [error_entry(path, self) for path in paths]
        return self


def error_entry(path, error: ScrubError) -> dict:
    """The JSON entry of a model that `error` stopped."""
    return {"path": str(path), "status": "error", "error": str(error)}


def input_error(message: str) -> ScrubError:
    """An unreadable or inconsistent input file or folder (exit 3)."""
    return ScrubError(message, ExitCode.INPUT)


def usage_error(message: str) -> ScrubError:
    """A wrong combination of command-line options (exit 2)."""
    return ScrubError(message, ExitCode.USAGE)


class Terminated(BaseException):
    """SIGTERM arrived (CI runners and `timeout` send it): unwinds like Ctrl-C, so temporary files are removed.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """
