"""Rich tables and the JSON document on stdout; tables move to stderr when stdout holds JSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from backdoor_scrub.commands.common import Outcome
from backdoor_scrub.contract import SCHEMA_VERSION

METRIC_ROWS = (
    ("clean accuracy", "clean_accuracy"),
    ("attack success rate", "attack_success_rate"),
    ("  its floor: target, no trigger", "clean_target_rate"),
    ("robust accuracy", "robust_accuracy"),
    ("target-class accuracy", "target_class_accuracy"),
)
UNBOUNDED_WIDTH = 10_000  # columns: rich sizes a table to its content, so no line gets this wide
RECONSTRUCTED_ROWS = (
    ("reconstructed-trigger ASR", "reconstructed_trigger_asr"),
    ("reconstructed-trigger RA", "reconstructed_trigger_robust_accuracy"),
)


def emit(command: str, outcome: Outcome, tables: list[Table], as_json: bool, quiet: bool) -> int:
    """Print tables (stdout, or stderr under --json) and, with --json, the JSON document; the exit code."""
    if not quiet:
        console = table_console(stderr=as_json)
        for table in tables:
            console.print(table)
    if as_json:
        click.echo(json.dumps(json_document(command, outcome), default=_json_default))
    return int(outcome.exit_code)


def table_console(stderr: bool) -> Console:
    """A console for tables: a terminal's width; else COLUMNS when set, or as wide as the tables need
    (a CI log gets whole cells, never a name split over two lines)."""
    console = Console(stderr=stderr, soft_wrap=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console.width = UNBOUNDED_WIDTH
    return console


def json_document(command: str, outcome: Outcome) -> dict:
    """The contract JSON: schema_version, command, exit_code and one entry per model."""
    models = [_finite(model.entry) for model in outcome.models]
    return {"schema_version": SCHEMA_VERSION, "command": command, "exit_code": int(outcome.exit_code),
            "models": models, **_finite(outcome.extra)}


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal, or a dash."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def inspect_tables(outcome: Outcome) -> list[Table]:
    """A summary and a layer table per inspected model, and the scan when there was one."""
    return _per_model(outcome, _inspect_tables)


def _inspect_tables(entry: dict) -> list[Table]:
    summary = Table(title=entry["path"], show_header=False)
    for label, value in (
        ("arch", entry["arch"]), ("classes", _classes(entry)),
        ("input size", "x".join(map(str, entry["input_size"]))),
        ("mean / std", f"{entry['mean']} / {entry['std']}"),
        ("parameters", f"{entry['parameters']:,}"), ("sha256", entry["sha256"][:16] + "…"),
        ("history", _history(entry["history"])),
        ("edited by default", ", ".join(entry["default_edit"]["closed-form"]) or "- (no linear head layer)"),
        ("with activation-match", ", ".join(entry["default_edit"]["activation-match"]) or "-"),
        ("input convolution", f"{entry['input_convolution']} (also edited when held-out folds favour it; a given "
                              "trigger only)" if entry["input_convolution"] else "- (none reads the image itself)"),
    ):
        summary.add_row(label, value)
    closed_form, matched = set(entry["default_edit"]["closed-form"]), set(entry["default_edit"]["activation-match"])
    layers = Table(title="hookable layers (* = edited by default, + = also with --method activation-match)")
    for column in ("name", "type", "output shape", "parameters", "editable"):
        layers.add_column(column, justify="right" if column == "parameters" else "left", overflow="fold")
    for layer in entry["layers"]:
        shape = "x".join(map(str, layer["output_shape"])) if layer["output_shape"] else "-"
        name = layer["name"] + (" *" if layer["name"] in closed_form else " +" if layer["name"] in matched else "")
        layers.add_row(name, layer["type"], shape, f"{layer['parameters']:,}", "yes" if layer["editable"] else "")
    return [summary, layers] + ([scan_table(entry["scan"], entry.get("classes"))] if "scan" in entry else [])


def scan_table(scan: dict, class_names: list[str] | None) -> Table:
    """One row per class: size, success and compactness of its reconstructed trigger, anomaly index, flag."""
    flagged = ", ".join(map(str, scan["flagged"])) or "none"
    table = Table(title=f"trigger reconstruction ({scan['seconds']:.0f} s): flagged {flagged} "
                        f"(anomaly index over {scan['threshold']:.2f})")
    for column in ("class", "mask L1", "reconstruction ASR", "anomaly index", "compactness", "flagged"):
        table.add_column(column, justify="left" if column in ("class", "flagged") else "right")
    for row in scan["classes"]:
        name = f"{row['class']} {class_names[row['class']]}" if class_names else str(row["class"])
        table.add_row(name, f"{row['mask_l1']:.1f}", percent(row["reconstruction_asr"]),
                      f"{row['anomaly_index']:.2f}", f"{row['compactness']:.2f}", "FLAGGED" if row["flagged"] else "")
    return table


def evaluate_tables(outcome: Outcome) -> list[Table]:
    """One table with the models side by side (baseline first) and a row per metric and class."""
    columns = ([("baseline", {**outcome.extra["baseline"], "status": "ok"})] if "baseline" in outcome.extra else [])
    columns += [(m.entry["path"], m.entry) for m in outcome.models]
    columns = list(zip(_short_names([name for name, _ in columns]), [entry for _, entry in columns]))
    table = Table(title="evaluation")
    table.add_column("metric")
    for name, _ in columns:
        table.add_column(name, justify="right", overflow="fold")
    rows = [("status", lambda e: e["status"] if e["status"] == "ok" else e.get("error", e["status"]))]
    rows += [("target", _target)]
    rows += [(label, lambda e, key=key: percent(e.get(key))) for label, key in METRIC_ROWS]
    rows += [("images (attacked)", _image_counts)]
    rows += [("DER", lambda e: percent(e.get("der"))), ("gate", _gate)]
    ok = [entry for _, entry in columns if entry["status"] == "ok"]
    classes = max((len(entry["per_class_accuracy"]) for entry in ok), default=0)
    names = next((entry["classes"] for entry in ok if entry.get("classes")), None)
    for index in range(classes):
        label = f"  acc {index}" + (f" {names[index]}" if names and index < len(names) else "")
        rows.append((label, lambda e, i=index: f"{percent(_at(e.get('per_class_accuracy'), i))} "
                                               f"of {_at(e.get('per_class_images'), i)}"))
    for label, cell in rows:
        table.add_row(label, *(cell(entry) if entry["status"] == "ok" or label == "status" else "" for _, entry in columns))
    return [table]


def _short_names(paths: list[str]) -> list[str]:
    """File names when they tell the models apart, else the paths as given."""
    names = [Path(path).name for path in paths]
    return names if len(set(names)) == len(names) else paths


def step_tables(outcome: Outcome) -> list[Table]:
    """A before/after table on the clean samples for each edited or repaired model (and its scan)."""
    return _per_model(outcome, _step_tables)


def _step_tables(entry: dict) -> list[Table]:
    tables = [scan_table(entry["scan"], None)] if "scan" in entry else []
    tables += [_message_table(entry["input"], f"class {declined['class']} not edited: {declined['reason']}")
               for declined in entry.get("declined", [])]
    if entry["output"] is None:
        return tables + [_message_table(entry["input"], entry["message"])]
    return tables + [_before_after(entry, step) for step in entry.get("edits", [entry])]


def _per_model(outcome: Outcome, render) -> list[Table]:
    """The tables `render` makes for each model that was processed, an error table for the others."""
    return [table for model in outcome.models
            for table in (render(model.entry) if model.entry["status"] == "ok" else [_error_table(model.entry)])]


def _before_after(entry: dict, step: dict) -> Table:
    title = (f"{entry['input']} -> {entry['output']}\n{step['step']} ({step['method']}: "
             f"{', '.join(step['layers'])}), target {_target(step)}, {entry['seconds']:.1f} s")
    if "poisoned_dir" in step["trigger"]:
        title += f"\n{step['trigger']['count']} poisoned examples mapped to {step['trigger']['values']}"
    if "input_span" in step:
        span = step["input_span"]
        title += (f"\n{span['layer']} restricted to the samples' span ({span['clean_span_dimensions']} of "
                  f"{span['receptive_field_dimensions']} directions)")
    table = Table(title=title)
    attacked = step["before"].get("attacked_images")
    measured = f"on the {step['before'].get('images')} samples" + ("" if attacked is None else f" ({attacked} attacked)")
    for column in (f"{measured}, in-sample", "before", "after", "change"):
        table.add_column(column, justify="left" if column.startswith("on") else "right")
    for label, key in METRIC_ROWS + RECONSTRUCTED_ROWS:
        if key not in step["before"]:
            continue
        before, after = step["before"].get(key), step["after"].get(key)
        change = "-" if before is None or after is None else f"{100 * (after - before):+.1f} pt"
        table.add_row(label, percent(before), percent(after), change)
    if step.get("calibration"):
        table.caption = _calibration_caption(step["calibration"])
    return table


def _calibration_caption(calibration: dict) -> str:
    """What the self-calibration chose and what it measured on the held-out folds."""
    parts = []
    if "input_layer" in calibration:
        first = calibration["input_layer"]
        chosen = first["chosen"]
        left = f"left as is ({first['reason']})" if "reason" in first else "left as is"
        parts.append(f"{first['layer']} " + (left if chosen is None else
                                             f"edited (lam {chosen['lam']:g}, mu {chosen['mu']:g})"))
    if "stage" in calibration:
        stage = calibration["stage"]
        parts.append(f"stage retrained {stage['steps']} steps (the samples' flips left: "
                     f"{percent(stage['residual_flip_rate'])})")
    if "declined_method" in calibration:
        declined = calibration["declined_method"]
        held = declined["held_out"]
        parts.append(f"{declined['method']} declined ({declined['reason']}; its held-out flips "
                     f"{held['flips']}/{held['victims']}, accuracy {percent(held['accuracy'])})")
    if "chosen" not in calibration:
        return "; ".join(parts)
    chosen = ", ".join(f"{key} {'none' if value is None else f'{value:g}'}" for key, value in calibration["chosen"].items())
    held = calibration["held_out"]
    parts.append(f"{len(calibration['candidates'])} candidates: {chosen}")
    return (f"chosen on {calibration['folds']} held-out folds of the samples: {'; '.join(parts)}; held-out flips "
            f"{held['flips']}/{held['victims']}, changed predictions {held['changed']}/{held['images']}, "
            f"accuracy {percent(held['accuracy'])}")


def _target(entry: dict) -> str:
    return "-" if entry.get("target") is None else f"{entry['target']} ({entry.get('target_source') or 'given'})"


def _image_counts(entry: dict) -> str:
    """How many clean images the accuracies come from, and how many triggered ones the ASR."""
    attacked, skipped = entry.get("attacked_images"), (entry.get("skipped_images") or {}).get("count")
    return (f"{entry.get('images')}" + ("" if attacked is None else f" ({attacked})")
            + (f", {skipped} unreadable skipped" if skipped else ""))


def _gate(entry: dict) -> str:
    gate = entry.get("gate")
    if not gate:
        return "-"
    return "passed" if gate["passed"] else "FAILED: " + "; ".join(gate["failures"])


def _at(values: list | None, index: int):
    return values[index] if values and index < len(values) else None


def _classes(entry: dict) -> str:
    names = entry.get("classes")
    return f"{entry['num_classes']}" + (f" ({', '.join(names)})" if names else "")


def _history(history: list[dict]) -> str:
    if not history:
        return "none (never edited by scrub)"
    return "; ".join(f"{h.get('step')} {h.get('method', '')} target {h.get('target')}" for h in history)


def _error_table(entry: dict) -> Table:
    return _message_table(entry["path"], entry["error"], "error")


def _message_table(title: str, message: str, label: str = "result") -> Table:
    table = Table(title=title, show_header=False)
    table.add_row(label, message)
    return table


def _finite(value):
    """NaN (e.g. accuracy of an empty class) becomes null in JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    return str(value)
