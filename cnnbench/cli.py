"""The `cnnbench` command. It parses, calls, and turns bad input into one-line errors.

Exit status: 0 success; 1 some trials failed (out of memory, say); 2 bad input (spec,
setting, data, tracking URI, results folder);
130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def _settings_epilog() -> str:
    from cnnbench.config.spec import setting_docs

    lines = ["training settings (--set key=value; yaml-style values: 0.01, 64, true, null, relu):"]
    for name, default, doc in setting_docs():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"  {name:<16} {shown:<8} {doc}")
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser, *, sets: bool = True) -> None:
    if sets:
        p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="sets",
                       help="override a training setting (repeatable); unknown keys and wrong types are errors")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder holding the data sets in torchvision's layout (default: $CNNBENCH_DATA, else "
                        "./data, where torchvision downloads them when missing)")


def _tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="run state never committed: epoch checkpoints, locks, Optuna storage "
                        "(default: $CNNBENCH_HOME, else ./.cnnbench)")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="cnnbench", formatter_class=raw,
        description="Controlled hyperparameter studies of convolutional networks, tracked in MLflow.",
        epilog="Run `cnnbench COMMAND --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="train one trial", formatter_class=raw, epilog=_settings_epilog(),
                       description="Train one trial with the default settings (document 003's LeNet-5 run) "
                                   "changed by --set, and record it in MLflow.")
    _common(p)
    _tracking(p)
    _state(p)
    p.add_argument("--experiment", default="cnnbench-run", help="MLflow experiment name (default: cnnbench-run)")
    p.add_argument("--no-track", action="store_true", help="do not record the trial in MLflow")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last epoch checkpoint of an interrupted run of the same settings "
                        "(default: start afresh)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("study", help="run a study spec (studies/*.yaml)", formatter_class=raw,
                       epilog=_settings_epilog(),
                       description="Run every trial of a study spec, skipping those already finished in the "
                                   "tracking store, and write results/<study>/ (summary.csv, table.md, curves.png). "
                                   "The same command resumes an interrupted study; processes here (--workers) or on "
                                   "other machines (the same --storage) share its trials, each trained once.")
    p.add_argument("spec", help="the study's YAML file, e.g. studies/lr.yaml")
    _common(p)
    p.add_argument("--seeds", metavar="S[,S...]", default=None, help="seeds to repeat over, replacing the spec's")
    p.add_argument("--results-dir", metavar="DIR", default="results", help="where results/<study>/ goes (default: results)")
    _tracking(p)
    _state(p)
    fuse = p.add_mutually_exclusive_group()
    fuse.add_argument("--fuse", dest="fuse", action="store_true", default=None,
                      help="train compatible trials fused (one wide model, vmap where the model does not "
                           "widen) in groups of up to --max-fuse; default on CUDA/MPS")
    fuse.add_argument("--no-fuse", dest="fuse", action="store_false",
                      help="train every trial alone (default on the CPU: wide groups, one per worker, only "
                           "for models that widen)")
    p.add_argument("--max-fuse", type=int, default=16, metavar="K", help="largest fused group (default: 16)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="trials trained at once in N worker processes (default: one per core on the CPU, each "
                        "with one thread; 1 on CUDA/MPS)")
    p.add_argument("--storage", metavar="URL", default=None,
                   help="Optuna storage that holds the study's trials: sqlite:///PATH, or "
                        "postgresql://USER:PASSWORD@HOST:PORT/DB to share them with other machines "
                        "(default: sqlite:///<state dir>/optuna/<study>.db)")
    p.add_argument("--no-final", action="store_true",
                   help="only train runs; leave writing the results to the process that ends the study")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("models", help="list the registered architectures",
                       description="List the model registry: name, parameters on MNIST, source.")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("evaluate", help="re-test a saved checkpoint",
                       description="Load a checkpoint written by a trial (last.pt, best.pt, epoch_NNN.pt or the "
                                   "MLflow artifact) and measure its loss and accuracy on the test set.")
    p.add_argument("checkpoint", help="path of the .pt file")
    _common(p, sets=False)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--test-batch-size", type=int, default=1024, help="evaluation batch size (default: 1024)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="time cnnbench's loop against the naive loop", formatter_class=raw,
                       description="Time, in one process on one device: the naive loop (torchvision MNIST, "
                                   "ToTensor+Normalize, a shuffled DataLoader, .to(device) and loss.item() every "
                                   "step), cnnbench's loop one trial at a time, and K fused trials for K = 1, 2, "
                                   "4, 5, 8, ... until throughput stops rising. Prints model-images/s, ratios to "
                                   "the naive loop and the learning-rate study's projected time; writes "
                                   "results/bench/ (bench.csv, bench.md, throughput.png).")
    _common(p, sets=False)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--model", default="lenet5", help="registry name (default: lenet5)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement (default: 200)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement; the median is shown (default: 3)")
    p.add_argument("--max-k", type=int, default=None, help="largest K tried (default: 64 on CUDA, 16 elsewhere)")
    p.add_argument("--options", action="store_true",
                   help="also time channels_last, bf16 autocast, torch.compile and (CUDA) CUDA graphs, fused")
    p.add_argument("--lr-study", action="store_true",
                   help="also train the learning-rate study's 5 trials for real, naive vs cnnbench (slow)")
    p.add_argument("--epochs", type=int, default=10, help="epochs for --lr-study (default: 10)")
    p.add_argument("--sweep", action="store_true",
                   help="instead: time one Optuna sweep of LeNet-5 (TPE, sampler seed 0, fixed epochs, no pruning) "
                        "through the real sweep worker, one trial at a time and --fuse-k at a time; writes "
                        "RESULTS_DIR/bench/sweep.md (sweep-cuda.md, sweep-mps.md)")
    p.add_argument("--fuse-k", type=int, default=None, metavar="K",
                   help="with --sweep: trials trained fused (default: 16 on CUDA and MPS, 8 on the CPU)")
    p.add_argument("--sweep-trials", type=int, default=32, metavar="N", help="with --sweep: trials (default: 32)")
    p.add_argument("--sweep-epochs", type=int, default=3, metavar="E", help="with --sweep: epochs per trial (default: 3)")
    p.add_argument("--sweep-train-subset", type=int, default=None, metavar="N",
                   help="with --sweep: training images per epoch (default: all 50,000 left after the 10,000 "
                        "validation images)")
    p.add_argument("--engines", action="store_true",
                   help="only compare the fused engines: wide against vmap, K = 1, 2, 4, ... --max-k "
                        "(default 64), writes RESULTS_DIR/bench/engines_<device>.csv")
    p.add_argument("--results-dir", default="results", help="writes RESULTS_DIR/bench/ (default: results)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="run an Optuna sweep over a spec's search space", formatter_class=raw,
                       epilog=_settings_epilog(),
                       description="Find the best settings over a spec's search block with Optuna: every trial is "
                                   "scored on a validation split (never the test set), recorded as a child of the "
                                   "sweep's MLflow run, and may be pruned. The same command resumes an interrupted "
                                   "sweep; workers on other machines join it with the same --storage. At the end the "
                                   "best trial is re-run over sweep.final_seeds and tested once, and "
                                   "results/<sweep>/ is written (trials.csv, best.yaml, final.md, plots).")
    p.add_argument("spec", help="the sweep's YAML file, e.g. studies/sweep-lenet.yaml")
    _common(p)
    p.add_argument("--n-trials", type=int, default=None, metavar="N",
                   help="finished (complete + pruned) trials the sweep must reach in all, across restarts and "
                        "workers (default: the spec's sweep.n_trials)")
    p.add_argument("--storage", metavar="URL", default=None,
                   help="Optuna storage: sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB for workers on "
                        "many machines (default: sqlite:///<state dir>/optuna/<sweep>.db)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes on this machine, one per GPU where there are GPUs (default: 1)")
    p.add_argument("--sampler-seed", type=int, default=None, metavar="S",
                   help="seed of the sampler, for a reproducible single-worker sweep (default: random)")
    p.add_argument("--fuse-k", type=int, default=None, metavar="K",
                   help="trials each worker asks for at once and trains fused (K models in one vmapped step) where "
                        "they share architecture, batch size, epochs and data; each is still its own trial, reported, "
                        "pruned and recorded alone. 1 trains one trial at a time (default: 16 on CUDA and MPS, "
                        "1 on the CPU)")
    p.add_argument("--results-dir", metavar="DIR", default="results", help="where results/<sweep>/ goes (default: results)")
    _tracking(p)
    _state(p)
    p.add_argument("--no-final", action="store_true",
                   help="only train trials; leave the final re-run and the results to another worker")
    p.add_argument("--print-storage", action="store_true",
                   help="print the sweep's default storage URL and exit (make dashboard uses it)")
    p.set_defaults(func=cmd_sweep)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="run the notebooks for every study and sweep in results/; HTML beside them",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Execute notebooks/analysis.ipynb headless (papermill) for every study folder in "
                                   "the results folder whose study has runs in the tracking store, "
                                   "notebooks/sweep.ipynb for every sweep folder and notebooks/models.ipynb once; "
                                   "write results/<name>/report.html, results/models.html and results/index.html.")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these studies or sweeps (default: every folder)")
    p.add_argument("--results-dir", metavar="DIR", default="results", help="the results folder (default: results)")
    _tracking(p)
    p.add_argument("--timeout", type=int, default=600, metavar="S", help="seconds one notebook cell may run (default: 600)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui-screenshot", help="save the MLflow UI's comparison view of a study as a PNG",
                       description="Open the MLflow UI in headless Chromium (/usr/bin/chromium) on the comparison view "
                                   "of a study's trials and save it. An http tracking URI is used as it is; otherwise "
                                   "an mlflow server is started on loopback over the local store for the screenshot.")
    p.add_argument("--study", default="lr", help="the study (MLflow experiment) to show (default: lr)")
    p.add_argument("--out", metavar="PNG", default="results/mlflow-compare.png",
                   help="where the comparison view goes (default: results/mlflow-compare.png)")
    p.add_argument("--charts", metavar="PNG", default=None,
                   help="also save the chart view of train/loss, runs grouped by the scientific hyperparameter")
    _tracking(p)
    p.set_defaults(func=cmd_ui_screenshot)


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="does execution B of a study reproduce execution A within seed noise?",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Match two executions of the same study (fp32 against bf16, CPU against GPU, two "
                                   "torch versions, two commits) trial by trial on the varied settings and the seed, "
                                   "and per trial config give the paired difference B - A over the seeds with its "
                                   "95% interval, a Holm-corrected p-value and a verdict (identical, within seed "
                                   "noise, differs, untested). Writes OUT/compare-NAME/compare.md and compare.csv.",
                       epilog="examples:\n"
                              "  cnnbench compare results/lr /tmp/bf16/results/lr --labels fp32,bf16\n"
                              "  cnnbench compare 3f2c...e1 9ab0...77     # two MLflow study runs (32-hex ids)")
    p.add_argument("a", metavar="A", help="the reference execution: a results/<study>/ folder holding summary.csv, "
                                          "or the MLflow run id of a study run (its results/summary.csv artifact)")
    p.add_argument("b", metavar="B", help="the execution to check against A, in the same forms")
    p.add_argument("--labels", metavar="A,B", default=None,
                   help="what the tables call A and B, e.g. fp32,bf16 (default: the folder names, or the first 8 "
                        "characters of the run ids)")
    p.add_argument("--name", default=None,
                   help="the output folder is OUT/compare-NAME (default: from the labels, e.g. lr-fp32-bf16, or "
                        "from the folder names)")
    p.add_argument("--out", metavar="DIR", default="results", help="where compare-NAME/ goes (default: results)")
    _tracking(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from cnnbench.report.compare import load_execution, write_compare
    from cnnbench.config.spec import ConfigError

    labels: list[str | None] = [None, None]
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
            raise ConfigError(f"--labels: expected two different labels separated by a comma, got {args.labels!r}")
    a = load_execution(args.a, label=labels[0], tracking_uri=args.tracking_uri)
    b = load_execution(args.b, label=labels[1], tracking_uri=args.tracking_uri)
    md, csv, _ = write_compare(a, b, args.out, name=args.name, command=_command(args))
    print(md.read_text())
    print(f"wrote {md} and {csv}")
    return 0


# extra subcommands register themselves here (summary, sweep, bench, report, compare)
_EXTRA_COMMANDS: list[Callable[[Any], None]] = [_add_report, _add_compare]


def cmd_report(args: argparse.Namespace) -> int:
    from cnnbench.tools.notebooks import build_reports

    if args.timeout < 1:
        from cnnbench.config.spec import ConfigError

        raise ConfigError(f"--timeout: must be >= 1, got {args.timeout}")
    outcome = build_reports(Path(args.results_dir), names=args.names or None, tracking_uri=args.tracking_uri,
                            timeout=args.timeout)
    for line in outcome.skipped:
        print(f"skipped {line}")
    for job in outcome.written:
        print(f"{job.html}  ({job.notebook}, {job.kind} {job.name})")
    for job, reason in outcome.failed:
        print(f"cnnbench: {job.notebook} for {job.kind} {job.name} failed at {reason}", file=sys.stderr)
    print(f"{len(outcome.written)} report(s) written, {len(outcome.failed)} failed; index: {outcome.index}")
    return EXIT_FAILED if outcome.failed else 0


def cmd_ui_screenshot(args: argparse.Namespace) -> int:
    from cnnbench.report.analysis import NoRuns
    from cnnbench.track.writer import check_reachable, quiet_mlflow, tracking_uri
    from cnnbench.tools.ui import UIError, screenshot

    quiet_mlflow()
    uri = tracking_uri(args.tracking_uri)
    check_reachable(uri)
    try:
        paths = screenshot(args.study, args.out, tracking_uri=uri, charts=args.charts)
    except (UIError, NoRuns) as err:
        print(f"cnnbench: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_INPUT
    print(f"{paths[0]}: the MLflow comparison view of study {args.study}")
    if args.charts:
        print(f"{paths[1]}: the chart view of its train/loss, grouped by value")
    return 0


def _overrides(sets: list[str]) -> dict[str, Any]:
    from cnnbench.config.spec import parse_overrides

    return parse_overrides(sets)


def cmd_run(args: argparse.Namespace) -> int:
    from cnnbench.config.spec import TrialConfig
    from cnnbench.data.tensors import data_dir, load_arrays
    from cnnbench.util.paths import state_dir
    from cnnbench.train.loop import FINISHED, Recorder, run_trial
    from cnnbench.train.device import resolve_device

    config = TrialConfig.from_dict(_overrides(args.sets), where="--set")
    resolve_device(config.device)
    load_arrays(config.dataset, data_dir(args.data_dir))
    recorder: Recorder = Recorder()
    if not args.no_track:
        from cnnbench.track.writer import Tracker, check_reachable, quiet_mlflow, run_name, tracking_uri

        quiet_mlflow()
        uri = tracking_uri(args.tracking_uri)
        check_reachable(uri)
        tracker = Tracker(args.experiment, uri)
        recorder = tracker.recorder(config, parent="", name=run_name(config, ("model", "lr", "batch_size")),
                                    tags={})
    ckpt = state_dir(args.state_dir) / "checkpoints" / "run" / config.key()
    if not args.resume:
        shutil.rmtree(ckpt, ignore_errors=True)
    result = run_trial(config, data_root=args.data_dir, recorder=recorder, checkpoint_dir=ckpt)
    _print_history(result)
    if getattr(recorder, "run_id", None):
        print(f"MLflow run {recorder.run_id} in experiment {args.experiment!r}")
    return 0 if result.status == FINISHED else EXIT_FAILED


def _print_history(result) -> None:
    from cnnbench.track.schema import EPOCH, TEST_ACC, TEST_LOSS, TRAIN_EPOCH_LOSS

    print(f"{'epoch':>5} {'train loss':>10} {'test loss':>9} {'test acc':>8}")
    for r in result.history:
        print(f"{r[EPOCH]:>5} {r[TRAIN_EPOCH_LOSS]:>10.4f} {r.get(TEST_LOSS, float('nan')):>9.4f} "
              f"{r.get(TEST_ACC, float('nan')):>7.2f}%")
    print(f"status {result.status}{': ' + result.reason if result.reason else ''}; "
          f"{result.train_seconds:.1f} s training, {result.images_per_second:,.0f} images/s on {result.device}")


def cmd_study(args: argparse.Namespace) -> int:
    from cnnbench.config.spec import ConfigError, load_spec
    from cnnbench.run.study import run_study

    spec = load_spec(args.spec)
    if not spec.scientific:
        raise ConfigError(f"{args.spec}: no scientific block; a spec with only a search block is run by `cnnbench sweep`")
    seeds = None
    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise ConfigError(f"--seeds: expected integers separated by commas, got {args.seeds!r}") from None
        if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds: expected distinct integers >= 0, got {args.seeds!r}")
    spec = spec.with_overrides(_overrides(args.sets), seeds)
    if args.max_fuse < 1:
        raise ConfigError(f"--max-fuse: must be >= 1, got {args.max_fuse}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    command = _command(args)
    outcome = run_study(spec, data_root=args.data_dir, results_root=args.results_dir, tracking=args.tracking_uri,
                        state=args.state_dir, storage=args.storage, fuse=args.fuse, workers=args.workers,
                        max_fuse=args.max_fuse, command=command, final=not args.no_final)
    if outcome is None:  # another process writes the results
        return 0
    print(Path(outcome.files[1]).read_text())
    print(f"{outcome.trained} run(s) trained, {outcome.skipped} already finished; results in "
          f"{Path(outcome.files[0]).parent}/, MLflow parent run {outcome.parent_run_id}")
    if outcome.failed:
        for row in outcome.failed:
            print(f"trial {row.index} ({row.result.status}): {row.result.reason}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cnnbench.config.spec import ConfigError, load_spec

    spec = load_spec(args.spec)
    if args.print_storage:
        from cnnbench.util.paths import state_dir
        from cnnbench.track.stores import default_url

        print(args.storage or default_url(spec.name, state_dir(args.state_dir)))
        return 0
    from cnnbench.run.sweep import run_sweep
    from cnnbench.config.space import with_overrides

    spec = with_overrides(spec, _overrides(args.sets))
    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError(f"--n-trials: must be >= 1, got {args.n_trials}")
    if args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    if args.fuse_k is not None and args.fuse_k < 1:
        raise ConfigError(f"--fuse-k: must be >= 1, got {args.fuse_k}")
    # recorded in MLflow and results/: database passwords stay out
    command = _command(args)
    sweep, report, outcome = run_sweep(
        spec, workers=args.workers, final=not args.no_final, storage=args.storage,
        tracking=args.tracking_uri, state=args.state_dir, results_root=args.results_dir, n_trials=args.n_trials,
        sampler_seed=args.sampler_seed, data_root=args.data_dir, command=command, fuse_k=args.fuse_k)
    if outcome is not None:
        print(Path(outcome.files[2]).read_text())
        print(f"results in {sweep.out_dir}/, MLflow parent run {sweep.parent} in experiment {spec.name!r}, "
              f"Optuna study {spec.name!r} in {_masked(sweep.url)}")
    if report.stopped:
        print(f"cnnbench: sweep {spec.name}: {report.stopped}; run the same command to go on", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _masked(url: str) -> str:
    from cnnbench.util.text import masked

    return masked(url)


def _command(args: argparse.Namespace) -> str:
    """The command as typed, for MLflow and results/, with database passwords hidden."""
    return "cnnbench " + " ".join(shlex.quote(_masked_arg(a)) for a in args.argv)


def _masked_arg(arg: str) -> str:
    """A command-line word with any database password in it hidden (URL or --flag=URL)."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    return f"{flag}{eq}{_masked(value)}" if "://" in value else arg


def cmd_models(args: argparse.Namespace) -> int:
    from cnnbench.models import get_model, list_models, model_entry

    print(f"{'name':<14} {'parameters':>12}  source")
    for name in list_models():
        n = sum(p.numel() for p in get_model(name).parameters())
        print(f"{name:<14} {n:>12,}  {model_entry(name).source}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnbench.config.spec import ConfigError, TrialConfig
    from cnnbench.train.loop import evaluate_checkpoint, load_checkpoint

    path = Path(args.checkpoint)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        payload = load_checkpoint(path)
    except Exception as err:
        raise ConfigError(f"{path}: cannot read checkpoint ({' '.join(str(err).split())[:200]})") from None
    config = TrialConfig.from_dict(payload["config"], where=str(path))
    loss, acc, n = evaluate_checkpoint(payload, device=args.device, data_root=args.data_dir,
                                       test_batch_size=args.test_batch_size)
    print(f"{path}: epoch {payload['epoch']} of {config.model} (lr={config.lr:g}, seed={config.seed}): "
          f"test loss {loss:.4f}, test accuracy {acc:.2f}% on {n} images")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cnnbench.tools.bench import run_bench, time_lr_study, time_sweep
    from cnnbench.config.spec import ConfigError
    from cnnbench.models import list_models
    from cnnbench.train.device import resolve_device

    def given(value: int | None, default: int) -> int:  # 0 is given, and refused below
        return default if value is None else value

    for name, value, low in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 20),
                             ("--repeats", args.repeats, 1), ("--epochs", args.epochs, 1),
                             ("--max-k", args.max_k or 1, 1), ("--fuse-k", given(args.fuse_k, 1), 1),
                             ("--sweep-trials", args.sweep_trials, 1), ("--sweep-epochs", args.sweep_epochs, 1),
                             ("--sweep-train-subset", given(args.sweep_train_subset, 64), 64)):
        if value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")
    if args.sweep:
        resolve_device(args.device)
        summary = time_sweep(data_root=args.data_dir, device=args.device, n_trials=args.sweep_trials,
                             epochs=args.sweep_epochs, fuse_k=args.fuse_k, train_subset=args.sweep_train_subset,
                             out_dir=Path(args.results_dir) / "bench")
        print(f"wrote {summary['file']}")
        return 0
    if args.model not in list_models():
        raise ConfigError(f"--model: unknown value {args.model!r}; known: {', '.join(list_models())}")
    resolve_device(args.device)
    out = Path(args.results_dir) / "bench"
    if args.engines:
        return _bench_engines(args, out)
    run_bench(data_root=args.data_dir, device=args.device, model=args.model, batch_size=args.batch_size,
              steps=args.steps, repeats=args.repeats, max_k=args.max_k, options=args.options, out_dir=out)
    if args.lr_study:
        time_lr_study(data_root=args.data_dir, device=args.device, epochs=args.epochs, out_dir=out)
    print(f"wrote {out}/bench.csv, bench.md, throughput.png" + (", lr_study.md" if args.lr_study else ""))
    return 0


def _bench_engines(args: argparse.Namespace, out: Path) -> int:
    """`cnnbench bench --engines`: the wide engine against vmap (bench.wide_vs_vmap)."""
    from cnnbench.tools.bench import wide_vs_vmap, write_engine_rows

    ks = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= (args.max_k or 64))
    rows = wide_vs_vmap(args.device, ks, args.steps, args.repeats, model=args.model, batch_size=args.batch_size,
                        data_root=args.data_dir)
    print(f"wrote {write_engine_rows(rows, out)}")
    return 0


def _add_summary(sub: Any) -> None:
    p = sub.add_parser("summary", help="per-layer shapes, parameters, MACs and memory of a model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""\
                           Per layer: output shape, own parameters, multiply-accumulates (MACs = FLOPs / 2,
                           counted by torch.utils.flop_counter: convolutions and matrix products) and the
                           activation memory of one image (new output values, input included, forward only),
                           then totals, as document 004's VGG16 table. --documents checks the documents'
                           hand counts against these counts and says where their arithmetic is off."""),
                       epilog="examples:\n  cnnbench summary lenet5\n  cnnbench summary vgg16 --classes 1000\n"
                              "  cnnbench summary alexnet_paper --input 1x28x28   # as trained on MNIST: resized\n"
                              "  cnnbench summary --documents\n"
                              "  cnnbench summary --all --documents --results-dir results")
    p.add_argument("model", nargs="?", help="a registered model (see `cnnbench models`)")
    p.add_argument("--input", metavar="CxHxW", default=None,
                   help="input of one image, e.g. 1x28x28 or 3x224x224 (default: the model's natural input: "
                        "the native size of the ImageNet architectures, else 1x28x28)")
    p.add_argument("--classes", type=int, default=10, metavar="N",
                   help="outputs of the last layer (default: 10; 1000 for the published ImageNet heads)")
    p.add_argument("--format", choices=("table", "markdown", "csv"), default="table", help="default: table")
    p.add_argument("--all", action="store_true", help="every registered model")
    p.add_argument("--documents", action="store_true",
                   help="the documents' hand counts beside ours, and where their arithmetic is off")
    p.add_argument("--results-dir", metavar="DIR", default=None,
                   help="write markdown under DIR/summary/ (<model>.md, models.csv, documents.md) instead of printing")
    p.set_defaults(func=cmd_summary)


_EXTRA_COMMANDS.append(_add_summary)


def _add_gpu_check(sub: Any) -> None:
    p = sub.add_parser("gpu-check", help="every GPU measurement in one command (tests, bench, studies)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""\
                           On a CUDA machine, in one command that writes everything into one folder: the CUDA
                           tests (pytest -m cuda); `cnnbench bench --options` (naive loop, one trial, fused K
                           until throughput stops rising, each speed option on and off), the test pass per test
                           batch size and a torch.profiler profile; the lr, batch and activation studies end to
                           end (3 seeds, all of MNIST, 10 epochs, MLflow on a SQLite file in the folder), the lr
                           study again in bf16 and in TF32, then the other document studies while the budget
                           lasts. --dry-run runs the same path on the CPU at toy sizes."""),
                       epilog="examples:\n  cnnbench gpu-check --out results/gpu\n  cnnbench gpu-check --dry-run --out /tmp/gpu")
    p.add_argument("--out", metavar="DIR", default="results/gpu",
                   help="folder for everything the check writes (default: results/gpu)")
    p.add_argument("--dry-run", action="store_true", help="the same path on the CPU, at toy sizes (under two minutes)")
    p.add_argument("--budget", type=float, default=480.0, metavar="SECONDS",
                   help="time for the whole check; the later studies are skipped when it runs out (default: 480)")
    p.add_argument("--parts", default="tests,bench,studies", metavar="LIST",
                   help="which parts to run, comma-separated: tests, bench (with every option, the test pass per "
                        "batch size, a profile), kbench (the K sweep alone, short), studies (default: "
                        "tests,bench,studies)")
    p.add_argument("--studies", default=None, metavar="LIST",
                   help="studies to run, comma-separated, each NAME or NAME:KEY=VALUE (a variant, in its own "
                        "results-KEY-VALUE/ folder), e.g. lr,lr:amp=bf16 (default: lr, batch, activation, lr in bf16 "
                        "and in TF32, then the other document studies and models-imagenet for one epoch)")
    _common(p, sets=False)
    p.set_defaults(func=cmd_gpu_check)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from cnnbench.config.spec import ConfigError
    from cnnbench.tools.gpu_check import run_gpu_check

    if args.budget <= 0:
        raise ConfigError(f"--budget: must be > 0, got {args.budget:g}")
    from cnnbench.tools.gpu_check import PARTS

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"--parts: unknown part {unknown[0] if unknown else '(none)'!r}; known: {', '.join(PARTS)}")
    studies = tuple(s.strip() for s in args.studies.split(",") if s.strip()) if args.studies else None
    for entry in studies or ():
        name = entry.partition(":")[0]
        spec_file = Path(__file__).resolve().parents[1] / "studies" / f"{name}.yaml"
        if not spec_file.is_file():
            raise ConfigError(f"--studies: no study {name!r} (no {spec_file})")
    steps = run_gpu_check(Path(args.out), dry_run=args.dry_run, data_root=args.data_dir, budget=args.budget,
                          parts=parts, studies=studies)
    return EXIT_FAILED if any(s.status == "failed" for s in steps) else 0


_EXTRA_COMMANDS.append(_add_gpu_check)


def _input_shape(text: str | None) -> tuple[int, int, int] | None:
    from cnnbench.config.spec import ConfigError

    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ConfigError(f"--input: expected CxHxW with positive sizes, such as 1x28x28 or 3x224x224; got {text!r}")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def cmd_summary(args: argparse.Namespace) -> int:
    from cnnbench.config.spec import ConfigError
    from cnnbench.models import list_models

    if args.model and args.all:
        raise ConfigError("summary: give a MODEL or --all, not both")
    if not (args.model or args.all or args.documents):
        raise ConfigError("summary: give a MODEL (one of " + ", ".join(list_models()) + "), --all or --documents")
    if args.model and args.model not in list_models():
        raise ConfigError(f"summary: unknown model {args.model!r}; known: {', '.join(list_models())}")
    if args.classes < 1:
        raise ConfigError(f"--classes: must be >= 1, got {args.classes}")
    shape = _input_shape(args.input)

    from cnnbench.models import summary

    summaries = []
    for name in list_models() if args.all else [args.model] if args.model else []:
        try:
            summaries.append(summary.summarize(name, shape, num_classes=args.classes))
        except (ValueError, RuntimeError) as err:
            if shape is None:
                raise  # the model's own input failing is a bug, not bad input
            raise ConfigError(f"summary: {name} cannot take input {args.input}: {_one_line(err)}") from None
    counts = None
    if args.documents:
        from cnnbench.tools import summary_documents as sd

        counts = sd.Counts()
        verdicts = sd.check(counts)

    if args.results_dir is None:
        parts = [summary.render_csv(summaries)] if args.format == "csv" and summaries else \
            [summary.render(s, args.format) for s in summaries]
        if counts is not None:
            parts.append(sd.render(verdicts, counts, "csv" if args.format == "csv" else "markdown"))
        print("\n".join(parts), end="")
        return 0

    from cnnbench.util import fileio

    out = Path(args.results_dir) / "summary"
    fileio.check_writable(out)
    written = []
    for s in summaries:
        fileio.write_text(out / f"{s.model}.md", summary.render(s, "markdown"))
        written.append(out / f"{s.model}.md")
    if len(summaries) > 1:
        fileio.write_text(out / "models.csv", summary.costs_csv(summaries))
        written.append(out / "models.csv")
    if counts is not None:
        fileio.write_text(out / "documents.md", sd.render(verdicts, counts, "markdown"))
        written.append(out / "documents.md")
    print("wrote " + ", ".join(map(str, written)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from cnnbench.errors import ConfigError, DataError, DeviceError, TrackingError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    bad_input = (ConfigError, DataError, DeviceError, TrackingError, PermissionError)
    from cnnbench.util import interrupt

    previous = None
    try:
        previous = interrupt.install()  # Ctrl-C works even where the parent ignored SIGINT
        return args.func(args)
    except bad_input as err:
        print(f"cnnbench: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("\ncnnbench: interrupted; finished trials are saved, run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def entry() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())


if __name__ == "__main__":
    entry()
