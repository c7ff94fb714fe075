"""Killing or interrupting `scrub edit` from a second process never leaves a partial output."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_scrub


def edit_command(demo, output):
    return [sys.executable, "-m", "backdoor_scrub", "edit", str(demo / "model.safetensors"),
            "--clean-dir", str(demo / "clean"), "--trigger", str(demo / "trigger.png"), "-o", str(output), "-q"]


def test_sigkill_at_any_moment_leaves_nothing_or_the_complete_file(demo, tmp_path):
    reference = tmp_path / "reference.safetensors"
    assert run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean",
                     "--trigger", demo / "trigger.png", "-o", reference, "-q").exit_code == 0
    original = (demo / "model.safetensors").read_bytes()
    output = tmp_path / "out" / "model.scrubbed.safetensors"
    output.parent.mkdir()
    outcomes = []
    for delay in (0.3, 1.0, 2.0, 3.0, 4.0, 6.0):
        process = subprocess.Popen(edit_command(demo, output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert (demo / "model.safetensors").read_bytes() == original
        if output.exists():
            assert output.read_bytes() == reference.read_bytes()
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        for leftover in output.parent.iterdir():
            assert leftover == output or leftover.name.startswith(".model.scrubbed.safetensors."), leftover
            leftover.unlink()
    assert "absent" in outcomes


@pytest.mark.parametrize("sent, code, message", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("delay", [0.6, 1.4, 2.5])  # while torch is imported, and during the edit
def test_ctrl_c_and_sigterm_exit_with_one_line_and_no_output(demo, tmp_path, sent, code, message, delay):
    output = tmp_path / "out" / "model.scrubbed.safetensors"
    output.parent.mkdir()
    process = subprocess.Popen(edit_command(demo, output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:  # finished before the signal arrived on a fast machine
        assert output.exists()
        return
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"scrub: error: {message}"
    assert "Traceback" not in stderr
    assert list(output.parent.iterdir()) == []


def test_two_processes_writing_the_same_output_leave_one_complete_file(demo, tmp_path):
    reference = tmp_path / "reference.safetensors"
    assert run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean",
                     "--trigger", demo / "trigger.png", "-o", reference, "-q").exit_code == 0
    output = tmp_path / "out" / "model.scrubbed.safetensors"
    output.parent.mkdir()
    for extra in ([], ["--force"]):
        processes = [subprocess.Popen(edit_command(demo, output) + extra, stderr=subprocess.PIPE, text=True)
                     for _ in range(2)]
        codes = sorted(process.wait(timeout=300) for process in processes)
        assert codes == ([0, 0] if extra else [0, 3]), codes
        assert output.read_bytes() == reference.read_bytes()
        assert [p.name for p in output.parent.iterdir()] == [output.name]
