"""Faults of the machine: a write that fails (full disk, read-only, permission), the umask (issue 14)."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from tests.conftest import run_scrub


def edit(demo, output, *extra):
    return run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--trigger",
                     demo / "trigger.png", "-o", output, "-q", *extra)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_write_is_an_input_error_with_json_and_leaves_nothing(demo, tmp_path, monkeypatch, code):
    def fail(_fd):  # a full disk, a read-only file system, a refused permission (root is never refused one)
        raise OSError(code, os.strerror(code))

    output = tmp_path / "out" / "model.safetensors"
    output.parent.mkdir()
    monkeypatch.setattr("os.fsync", fail)
    result = edit(demo, output, "--json")
    assert result.exit_code == 3
    assert result.stderr.strip() == f"scrub: error: {output}: cannot write ({os.strerror(code)})"
    document = json.loads(result.stdout)
    assert document["exit_code"] == 3 and os.strerror(code) in document["error"]
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_the_umask_allows(demo, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert edit(demo, tmp_path / "model.safetensors").exit_code == 0
        scan = run_scrub("inspect", demo / "model.safetensors", "--scan", "--clean-dir", demo / "clean",
                         "--scan-steps", "5", "--restarts", "1", "--save-triggers", tmp_path / "triggers", "-q")
        assert scan.exit_code in (0, 1), scan.stderr
    finally:
        os.umask(previous)
    written = [tmp_path / "model.safetensors", tmp_path / "triggers" / "class_0.png",
               tmp_path / "triggers" / "contact_sheet.png"]
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [mode] * 3


def test_an_output_dir_that_cannot_be_made_is_an_input_error(demo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--trigger",
                       demo / "trigger.png", "--output-dir", blocker / "out", "-q")
    assert result.exit_code == 3
    assert result.stderr.strip() == f"scrub: error: {blocker / 'out'}: cannot write (Not a directory)"
