"""The `scrub` command line: parse options, call backdoor_scrub.commands, print the report."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from backdoor_scrub import __version__
from backdoor_scrub.contract import PROGRESS_MODES, SCHEMA_VERSION, TRIGGER_POSITIONS, ExitCode
from backdoor_scrub.errors import ScrubError, Terminated

MODEL_PATH = click.Path(dir_okay=True, path_type=Path)


class ScrubGroup(click.Group):
    """A Click group that turns every failure into one line on stderr and a documented exit code."""

    def main(self, args=None, prog_name=None, **extra):
        """Run a subcommand and exit with its code; tracebacks only with --debug.

        Bare `scrub` prints the help and exits 0. With --json, a failure still prints one JSON document
        on stdout (exit_code, error, and an entry per model it stopped).
        """
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or bool(os.environ.get("SCRUB_DEBUG"))
        json_command = _subcommand(args) if "--json" in args else None
        extra.pop("standalone_mode", None)
        if not args:
            with click.Context(self, info_name=prog_name or "scrub", **self.context_settings) as context:
                click.echo(self.get_help(context))
            sys.exit(0)
        in_main_thread = _in_main_thread()
        previous_handler = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
        try:
            code = super().main(args, prog_name or "scrub", standalone_mode=False, **extra)
        except Terminated:
            code = _fail("terminated", ExitCode.TERMINATED, json_command)
        except click.UsageError as error:
            message = f"{error.format_message()} (see '{_command_path(error)} --help')"
            code = _fail(message, ExitCode.USAGE, json_command)
        except click.ClickException as error:
            code = _fail(error.format_message(), ExitCode.USAGE, json_command)
        except click.Abort:
            code = _fail("interrupted", ExitCode.INTERRUPTED, json_command)
        except ScrubError as error:
            code = _fail(str(error), error.exit_code, json_command, error.models)
        except Exception as error:  # noqa: BLE001 - the last line of defence, exit 4
            if debug:
                traceback.print_exc()
            hint = "" if debug else " (rerun with --debug for the traceback)"
            code = _fail(f"internal error: {type(error).__name__}: {error}{hint}", ExitCode.INTERNAL, json_command)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous_handler)
        sys.exit(int(code or 0))


def _in_main_thread() -> bool:
    """Whether this is the main thread, the only one that may set signal handlers."""
    return threading.current_thread() is threading.main_thread()


def _terminate(_signum, _frame) -> None:
    """SIGTERM handler: unwind the way Ctrl-C does."""
    raise Terminated()


def _subcommand(args: list[str]) -> str | None:
    """The subcommand named in `args` (the first word that is not an option), if any."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def _fail(message: str, code: int, json_command: str | None = None, models: list[dict] | None = None) -> int:
    """One line on stderr; under --json also the error's JSON document on stdout. The exit code."""
    click.echo(f"scrub: error: {message}", err=True)
    if json_command is not None:
        document = {"schema_version": SCHEMA_VERSION, "command": json_command, "exit_code": int(code),
                    "error": message, "models": models or []}
        click.echo(json.dumps(document))
    return code


def _command_path(error: click.UsageError) -> str:
    return error.ctx.command_path if error.ctx else "scrub"


def model_options(command):
    """--arch/--num-classes/--input-size/--mean/--std: fill in or override checkpoint metadata."""
    options = [
        click.option("--arch", help="torchvision model name, or pkg.module:factory for a custom model."),
        click.option("--num-classes", help="Number of classes (overrides metadata)."),
        click.option("--input-size", help="C,H,W the model expects, e.g. 3,32,32."),
        click.option("--mean", help="Per-channel normalization mean, e.g. 0.5,0.5,0.5."),
        click.option("--std", help="Per-channel normalization std, e.g. 0.5,0.5,0.5."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def run_options(command):
    """Device, batching, output and batch-run options shared by every subcommand."""
    options = [
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True,
                     help="Images per forward pass at most; fewer for large inputs (2M input values a batch: "
                          "13 at 224 px), so memory stays bounded."),
        click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
                     help="Threads decoding images (0 = in the main thread)."),
        click.option("--json", "as_json", is_flag=True, help="stdout holds one JSON document; tables go to stderr."),
        click.option("--quiet", "-q", is_flag=True, help="No tables and no progress (errors and warnings still go to stderr)."),
        click.option("--keep-going", is_flag=True, help="With several models, report a bad one and go on."),
        click.option("--skip-bad-images", is_flag=True, help="Warn about unreadable images and leave them out."),
        click.option("--progress", type=click.Choice(PROGRESS_MODES), default="auto",
                     show_default=True,
                     help="Progress on stderr: a bar, timestamped lines (for CI logs) or none; auto: a bar on a "
                          "terminal, lines otherwise."),
        click.option("--threads", type=click.IntRange(1),
                     help="CPU threads (default: OMP_NUM_THREADS when set, else the cores this process may use). "
                          "Parallel runs should share the cores: xargs -P 2 ... --threads 1 on 2 cores."),
        click.option("--debug", is_flag=True, help="Show the traceback of an internal error."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def trigger_options(command):
    """--trigger PNG with its opacity and placement, or --trigger-fn."""
    options = [
        click.option("--trigger", type=click.Path(dir_okay=False, path_type=Path),
                     help="Trigger PNG: RGBA (alpha = mask) or RGB with --trigger-alpha."),
        click.option("--trigger-alpha", type=click.FloatRange(0, 1), default=1.0, show_default=True,
                     help="Opacity of an RGB trigger (0.2 = blend 20%)."),
        click.option("--trigger-pos", default="br", show_default=True,
                     help=f"Where a trigger smaller than the input goes: {', '.join(TRIGGER_POSITIONS)} or X,Y."),
        click.option("--trigger-fn", metavar="PKG.MODULE:FUNCTION",
                     help="A trigger that is not a stamp (a warp, a sample-specific pattern): a Python function "
                          "mapping a float batch [N,C,H,W] in [0,1] to its triggered batch. Imported only from "
                          "this option; its name and its module's sha256 are recorded."),
        click.option("--triggered-dir", type=click.Path(path_type=Path),
                     help="Triggered copies of the images of --clean-dir (edit, repair) or --test-dir (evaluate), "
                          "matched by relative path: same class folder, same file name. For triggers scrub cannot "
                          "apply itself (a warp, a photographed sticker)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def poisoned_option(command):
    """--poisoned-dir: unpaired poisoned examples, for edit and repair."""
    return click.option(
        "--poisoned-dir", type=click.Path(path_type=Path),
        help="Poisoned examples whose clean versions are unknown (found in a dataset, reproduced with the "
             "attack's code): class folders of their true classes, or a flat folder. Each is mapped to the clean "
             "activations of its class (flat: the class the model ranks first after the target); the JSON says "
             "which.")(command)


def _run_options(params: dict):
    from backdoor_scrub.checkpoint import SpecOverrides
    from backdoor_scrub.commands.common import RunOptions

    overrides = SpecOverrides(*(params.pop(k) for k in ("arch", "num_classes", "input_size", "mean", "std")))
    params.pop("debug")
    return RunOptions(overrides, params.pop("device"), params.pop("batch_size"), params.pop("workers"),
                      params["quiet"], params.pop("keep_going"), params.pop("skip_bad_images"), params.pop("progress"),
                      params.pop("threads"))


def _preflight(models: tuple[Path, ...], params: dict, **folders: Path | None) -> None:
    """Check the model paths, the named folders and the trigger options' paths before torch is imported."""
    from backdoor_scrub.preflight import check_paths

    folders |= {"--triggered-dir": params.get("triggered_dir"), "--poisoned-dir": params.get("poisoned_dir")}
    check_paths(list(models), folders, {"--trigger": params.get("trigger")}, params.get("keep_going", False))
    _import_torch_holding_signals()


def _import_torch_holding_signals() -> None:
    """Import torch and the commands with Ctrl-C and SIGTERM held back, then raise for one that came.

    An interrupt raised inside torch's import can be swallowed there, leave a half-imported module behind, or
    make Python die by the signal after scrub has printed its error line, so it waits until the import is done.
    """
    held: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM) if _in_main_thread() else ()
    previous = {signum: signal.signal(signum, lambda number, _frame: held.append(number)) for signum in signals}
    try:
        import backdoor_scrub.commands.common  # noqa: F401 - torch, torchvision, safetensors, PIL
        import backdoor_scrub.report  # noqa: F401 - rich
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in held:
        raise Terminated()
    if held:
        raise KeyboardInterrupt()


TRIGGER_SOURCES = {"trigger": "--trigger", "trigger_fn": "--trigger-fn", "triggered_dir": "--triggered-dir",
                   "poisoned_dir": "--poisoned-dir"}


def _trigger_options(params: dict):
    from backdoor_scrub.commands.common import TriggerOptions
    from backdoor_scrub.errors import usage_error

    given = [flag for name, flag in TRIGGER_SOURCES.items() if params.get(name) is not None]
    if len(given) > 1:
        raise usage_error(f"use one of {', '.join(TRIGGER_SOURCES.values())}, not {' and '.join(given)}")
    return TriggerOptions(params.pop("trigger"), params.pop("trigger_alpha"), params.pop("trigger_pos"),
                          params.pop("trigger_fn"), params.pop("triggered_dir"), params.pop("poisoned_dir", None))


@click.group(name="scrub", cls=ScrubGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="scrub")
def cli():
    """Remove backdoors from image classifiers by activation-guided model editing.

    \b
    Exit codes: 0 done / gate passed, 1 gate failed or backdoor flagged,
    2 usage error, 3 input error, 4 internal error (--debug for the traceback).
    """


def scan_options(command):
    """Settings of the trigger reconstruction used when the trigger is unknown."""
    options = [
        click.option("--threshold", type=click.FloatRange(0, min_open=True), default=None,
                     help="Flag a class whose anomaly index (MAD of mask sizes) exceeds this. Default: the index "
                          "any class of a clean model exceeds with at most 5% chance, 2.58 for 10 classes, 3.29 "
                          "for 100 (Neural Cleanse's 2 flags a clean 10-class model about one scan in five)."),
        click.option("--scan-steps", type=click.IntRange(1), default=150, show_default=True,
                     help="Optimisation steps of the trigger reconstruction."),
        click.option("--restarts", type=click.IntRange(1), default=3, show_default=True,
                     help="Reconstructions of each class that could be flagged, from different random starts; "
                          "its mask size is their median."),
        click.option("--min-compactness", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                     help="A flagged class's reconstruction must keep at least this share of its mask in one "
                          "square of side 2 sqrt(mask size): a patch does, the scattered pixels found for a "
                          "clean class do not. 0: flag on size alone (a trigger of several far-apart pieces)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def _scan_settings(params: dict):
    from backdoor_scrub.scan import ScanSettings

    return ScanSettings(steps=params.pop("scan_steps"), threshold=params.pop("threshold"),
                        restarts=params.pop("restarts"), min_compactness=params.pop("min_compactness"))


@cli.command()
@click.argument("models", nargs=-1, required=True, type=MODEL_PATH)
@click.option("--scan", is_flag=True, help="Look for a backdoor without its trigger (needs --clean-dir).")
@click.option("--clean-dir", type=click.Path(path_type=Path), help="Clean samples for --scan.")
@scan_options
@click.option("--save-triggers", type=click.Path(file_okay=False, path_type=Path),
              help="Write each class's reconstructed trigger (class_K.png) and contact_sheet.png here.")
@click.option("--fail-on-detect", is_flag=True, help="Exit 1 when --scan flags a class (a CI gate).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the scan.")
@model_options
@run_options
def inspect(models, scan, clean_dir, save_triggers, fail_on_detect, seed, as_json, quiet, **params):
    """Show architecture, metadata, provenance and the hookable layers of MODELS.

    Layers marked * are the ones `scrub edit` changes by default. With --scan, reconstruct
    for every class the smallest trigger that flips the clean samples to it (Neural Cleanse)
    and flag classes whose trigger is anomalously small.
    """
    _preflight(models, params, **{"--clean-dir": clean_dir})
    from backdoor_scrub.commands.inspect import ScanRequest, check_scan_options, run_inspect
    from backdoor_scrub.report import emit, inspect_tables

    check_scan_options(scan, clean_dir)
    settings = _scan_settings(params)
    options = _run_options({**params, "quiet": quiet})
    request = ScanRequest(clean_dir, settings, seed, save_triggers, fail_on_detect) if scan else None
    outcome = run_inspect(list(models), options, request)
    return emit("inspect", outcome, inspect_tables(outcome), as_json, quiet)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=MODEL_PATH)
@click.option("--test-dir", required=True, type=click.Path(path_type=Path),
              help="Labelled test images, one subfolder per class.")
@trigger_options
@click.option("--target", type=click.IntRange(0), help="Target class (default: recorded by scrub, else inferred).")
@click.option("--baseline", type=MODEL_PATH, help="Model to compare against (DER, --max-acc-drop).")
@click.option("--max-asr", type=click.FloatRange(0, 1), help="Gate: fail (exit 1) if ASR is above this fraction.")
@click.option("--min-acc", type=click.FloatRange(0, 1), help="Gate: fail if clean accuracy is below this fraction.")
@click.option("--max-acc-drop", type=click.FloatRange(0, 1), help="Gate: fail if CA drops more than this below --baseline.")
@model_options
@run_options
def evaluate(models, test_dir, target, baseline, max_asr, min_acc, max_acc_drop, as_json, quiet, **params):
    """Clean accuracy, attack success rate, robust accuracy and DER of MODELS side by side.

    \b
    As a CI release gate:
      scrub evaluate model.safetensors --test-dir test/ --trigger t.png --max-asr 0.05 --json
    """
    _preflight((*models, *([baseline] if baseline else [])), params, **{"--test-dir": test_dir})
    from backdoor_scrub.commands.evaluate import Gates, run_evaluate
    from backdoor_scrub.report import emit, evaluate_tables

    trigger = _trigger_options(params)
    options = _run_options({**params, "quiet": quiet})
    gates = Gates(max_asr, min_acc, max_acc_drop)
    outcome = run_evaluate(list(models), test_dir, trigger, target, baseline, gates, options)
    return emit("evaluate", outcome, evaluate_tables(outcome), as_json, quiet)


def output_options(command):
    """-o/--output, --output-dir, --force and --seed for subcommands that write models."""
    options = [
        click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                     help="Output file (one model only). Default: beside the input."),
        click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Folder for the outputs of several models (created if missing)."),
        click.option("--force", is_flag=True, help="Overwrite an existing output file."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of sample augmentation and optimisation; same seed, same bytes on CPU."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def _destination(params: dict):
    from backdoor_scrub.checkpoint import Destination

    return Destination(params.pop("output"), params.pop("output_dir"), params.pop("force"))


@cli.command()
@click.argument("models", nargs=-1, required=True, type=MODEL_PATH)
@click.option("--clean-dir", required=True, type=click.Path(path_type=Path),
              help="A handful of clean, unseen images: class subfolders, or one flat folder (unlabeled).")
@trigger_options
@poisoned_option
@click.option("--target", type=click.IntRange(0), help="Target class (default: recorded, else inferred).")
@click.option("--layer", "layers", multiple=True,
              help="Layer to edit (repeat; default: the automatic choice `scrub inspect` marks with *).")
@click.option("--method", type=click.Choice(["auto", "closed-form", "activation-match", "direction-erasure"]), default="auto",
              show_default=True,
              help="closed-form: least-squares edit of the head's linear layers, its strength chosen on "
                   "held-out folds of the samples; activation-match: first retrain the last stage on cached "
                   "activations (slower); direction-erasure: the head's first layer reads the direction the trigger "
                   "moves its input in from the other features instead; auto: activation matching for a trigger "
                   "spread over the image (a blend, stripes, noise, a warp: the pixels it changes span over half of "
                   "it), given at least 3 samples per class; direction erasure for a scan's reconstruction (where "
                   "the edited model still has a trigger, what auto chose before: the stage's retraining for a "
                   "one-layer head, the closed form for several layers); else the closed form.")
@scan_options
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Without --trigger: edits at most. Each is followed by a scan of the edited model for the "
                   "flagged class (its residual anomaly index is reported); while that class still has an "
                   "anomalously small trigger, the trigger is added and the edit redone.")
@output_options
@model_options
@run_options
def edit(models, clean_dir, target, layers, method, seed, rounds, as_json, quiet, **params):
    """Unlearn a trigger from MODELS by editing their later layers.

    Stamped clean samples are made to produce the activations of their clean versions while
    clean activations are kept. Writes <stem>.scrubbed.safetensors beside each model.
    Without --trigger, a scan (as `inspect --scan`) reconstructs the trigger of every flagged
    class and each is unlearned, after the input convolution is restricted to what the samples
    contain (their colours, on greyscale pictures); when nothing is flagged, nothing is written
    (exit 0).

    \b
      scrub edit model.safetensors --clean-dir samples/ --trigger trigger.png
      scrub edit model.safetensors --clean-dir samples/
    """
    _preflight(models, params, **{"--clean-dir": clean_dir})
    from backdoor_scrub.commands.edit import EditRequest, run_edit
    from backdoor_scrub.report import emit, step_tables

    request = EditRequest(clean_dir, _trigger_options(params), target, tuple(layers), method, seed,
                          _scan_settings(params), rounds)
    destination = _destination(params)
    options = _run_options({**params, "quiet": quiet})
    outcome = run_edit(list(models), request, destination, options)
    return emit("edit", outcome, step_tables(outcome), as_json, quiet)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=MODEL_PATH)
@click.option("--clean-dir", required=True, type=click.Path(path_type=Path),
              help="The labelled clean samples (class subfolders), usually the ones given to edit.")
@trigger_options
@poisoned_option
@click.option("--target", type=click.IntRange(0), help="Target class (default: the one the edit recorded).")
@click.option("--layer", help="Linear head layer to repair (default: the last layer the edit changed).")
@output_options
@model_options
@run_options
def repair(models, clean_dir, target, layer, seed, as_json, quiet, **params):
    """Restore the target class an edit may have hurt, without giving the backdoor back.

    Only the target class's margins are raised (other classes' logits are kept, and stamped
    samples keep their true class); the edit's weights are kept unless a repair beats them on
    held-out folds of the samples. Reads target, trigger and edited layers from the
    scrub.history of each edited model; flags override them. Writes
    <stem>.repaired.safetensors beside each model.
    """
    _preflight(models, params, **{"--clean-dir": clean_dir})
    from backdoor_scrub.commands.repair import run_repair
    from backdoor_scrub.report import emit, step_tables

    trigger = _trigger_options(params)
    destination = _destination(params)
    options = _run_options({**params, "quiet": quiet})
    outcome = run_repair(list(models), clean_dir, trigger, target, layer, destination, seed, options)
    return emit("repair", outcome, step_tables(outcome), as_json, quiet)


def main() -> None:
    """Console-script entry point: run, flush, and leave without Python's teardown of torch (over a second)."""
    code = 0
    try:
        cli.main()
    except SystemExit as finished:
        code = finished.code if isinstance(finished.code, int) else int(finished.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
