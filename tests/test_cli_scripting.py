"""`scrub` in CI logs and shell scripts: JSON on every exit, whole table cells, progress lines, fast path errors (issue 12)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_scrub

PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d scrub: .+ \(\d+ s\)$")


def test_bare_scrub_prints_the_help_and_succeeds():
    result = run_scrub()
    assert result.exit_code == 0 and "Commands:" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("command", ["evaluate", "edit", "repair", "inspect"])
def test_a_missing_model_under_json_is_one_json_document_with_the_error(tmp_path, command):
    missing = tmp_path / "missing.safetensors"
    folder = {"evaluate": ["--test-dir", tmp_path], "inspect": []}.get(command, ["--clean-dir", tmp_path])
    result = run_scrub(command, missing, *folder, "--json")
    assert result.exit_code == 3 and result.stderr.startswith("scrub: error:")
    document = json.loads(result.stdout)
    assert document["exit_code"] == 3 and document["command"] == command
    assert document["models"] == [{"path": str(missing), "status": "error", "error": document["error"]}]


def test_an_error_while_processing_lists_the_models_done_and_the_one_that_failed(demo, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = run_scrub("evaluate", demo / "model.safetensors", bad, "--test-dir", demo / "test", "--json")
    document = json.loads(result.stdout)
    assert result.exit_code == 3 == document["exit_code"]
    assert [m["status"] for m in document["models"]] == ["ok", "error"]
    assert document["models"][1]["path"] == str(bad) and str(bad) in document["error"]


def test_a_usage_error_after_parsing_is_a_json_document_with_exit_code_2(demo):
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--trigger",
                       demo / "trigger.png", "--trigger-fn", "tests.trigger_functions:demo_stamp", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit_code"] == 2


def test_a_wrong_path_fails_before_torch_is_imported(tmp_path):
    probe = ("import sys\nfrom backdoor_scrub.cli import cli\n"
             "try:\n    cli.main()\nfinally:\n    print('torch' in sys.modules, file=sys.stderr)")
    for arguments in (["evaluate", str(tmp_path / "missing.safetensors"), "--test-dir", str(tmp_path)],
                      ["edit", str(tmp_path), "--clean-dir", str(tmp_path / "typo")]):
        result = subprocess.run([sys.executable, "-c", probe, *arguments], capture_output=True, text=True)
        assert result.returncode == 3, result.stderr
        assert result.stderr.splitlines()[-1] == "False", result.stderr


def test_tables_keep_whole_names_without_a_terminal(demo, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    result = run_scrub("inspect", demo / "model.safetensors")
    assert result.exit_code == 0
    names = [layer["name"] for layer in json.loads(run_scrub("inspect", demo / "model.safetensors", "--json").stdout)
             ["models"][0]["layers"]]
    lines = result.stdout.splitlines()
    assert max(map(len, names)) > 30
    for name in names:
        assert any(re.search(rf"│ {re.escape(name)}[ *+]", line) for line in lines), name


def test_inspect_says_what_each_method_edits_by_default(demo):
    model = json.loads(run_scrub("inspect", demo / "model.safetensors", "--json").stdout)["models"][0]
    assert model["default_edit"]["closed-form"] == ["classifier.0", "classifier.3"]
    assert model["default_edit"]["activation-match"] == model["auto_selected"]
    table = run_scrub("inspect", demo / "model.safetensors").stdout
    assert "classifier.0 *" in table and "features.12 +" in table and "features.12 *" not in table
    assert model["input_convolution"] == "features.0.0" and "features.0.0 (also edited" in table


@pytest.mark.parametrize("mode, expect_lines", [("auto", True), ("lines", True), ("none", False)])
def test_progress_without_a_terminal_is_timestamped_lines(demo, mode, expect_lines, one_thread):
    result = run_scrub("inspect", demo / "model.safetensors", "--scan", "--clean-dir", demo / "clean",
                       "--scan-steps", "10", "--restarts", "1", "--progress", mode)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if PROGRESS_LINE.match(line)]
    if not expect_lines:
        assert lines == [], result.stderr
        return
    # the task's first and last lines; lines between come at most once a second, so a fast scan has none
    reconstruction = [line for line in lines if "reconstructing triggers" in line]
    assert " 0/10 started (" in reconstruction[0] and " 10/10 done (" in reconstruction[-1], result.stderr


def test_threads_sets_the_cpu_threads_and_defaults_to_omp_num_threads(demo, monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run_scrub("inspect", demo / "model.safetensors", "--threads", "1").exit_code == 0
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert run_scrub("inspect", demo / "model.safetensors").exit_code == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method, steps", [("closed-form", 50), ("activation-match", 350)])
def test_an_edit_reports_its_steps_in_progress_lines(demo, tmp_path, one_thread, method, steps):
    # 50 calibration fits (5 folds x 10 strengths); activation matching adds up to 6 rounds of 50 optimisation
    # steps first, and counts the rounds it did not need as done
    result = run_scrub("edit", demo / "model.safetensors", "--clean-dir", demo / "clean", "--trigger",
                       demo / "trigger.png", "--method", method, "-o", tmp_path / "out.safetensors",
                       "--progress", "lines")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if PROGRESS_LINE.match(line) and f"editing ({method})" in line]
    assert lines[0].endswith("started (0 s)") and f"{steps}/{steps} done" in lines[-1]
