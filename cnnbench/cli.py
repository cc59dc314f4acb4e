"""The `cnnbench` command: it parses, calls the Python API (`cnnbench.api`), prints, and
turns bad input into one-line errors.

Exit status: 0 success; 1 ran but could not finish (some trials failed, out of memory
say; no space left; workers that kept dying); 2 bad input, refused before anything was
created (spec, setting, data, tracking URI, results folder, a damaged store); 130, 143,
129: stopped by Ctrl-C, SIGTERM, SIGHUP (run the same command to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

from cnnbench import __version__
from cnnbench.config.spec import parse_overrides  # light: no torch, --help stays quick
from cnnbench.config.trial import settings_help
from cnnbench.errors import ConfigError, DataError, DeviceError, StorageError, TrackingError, Unfinished
from cnnbench.util import exiting, interrupt
from cnnbench.util.text import masked

EXIT_FAILED, EXIT_INPUT = 1, 2
DATA = ("--data-dir", dict(metavar="DIR", help="data sets in torchvision's layout (default: $CNNBENCH_DATA, else "
                           "./data, where torchvision downloads them)"))
SETS = ("--set", dict(metavar="KEY=VALUE", action="append", default=[], dest="sets",
                      help="override a training setting (repeatable; see below)"))
TRACKING = ("--tracking-uri", dict(metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                   "sqlite:///mlflow.db)"))
STATE = ("--state-dir", dict(metavar="DIR", help="checkpoints, Optuna storage (default: $CNNBENCH_HOME, else .cnnbench)"))
DEVICE = ("--device", dict(default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)"))
MODEL_PATH = ("--model-path", dict(metavar="DIR", action="append", default=None,
                                   help="a folder to import `model: module:Class` from (repeatable; a spec's own "
                                   "folder is searched too)"))
STORAGE = ("--storage", dict(metavar="URL", help="Optuna storage of the trials, shared by workers on many machines: "
                             "sqlite:///PATH or postgresql://... (default: SQLite in the state folder)"))


def opt(flags: str, default: Any = None, text: str = "", kind: type | None = None, **kw: Any) -> tuple:
    """A value option as data (the default shown in its help)."""
    shown = f" (default: {default})" if default is not None else ""
    return flags, dict(type=kind, default=default, help=text + shown, **kw)


def flag(flags: str, text: str) -> tuple:
    return flags, dict(action="store_true", help=text)


def command(sub: Any, name: str, run: Any, summary: str, description: str, options: list, epilog: str = "") -> None:
    """One subcommand, its options as data."""
    p = sub.add_parser(name, help=summary, description=textwrap.fill(description, 100), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for flags, kwargs in options:
        if flags == "--fuse":  # --fuse / --no-fuse: one setting with three states (None: per device)
            group = p.add_mutually_exclusive_group()
            group.add_argument("--fuse", dest="fuse", action="store_true", default=None, help=kwargs["help"])
            group.add_argument("--no-fuse", dest="fuse", action="store_false", help=kwargs["no"])
        else:
            p.add_argument(flags, **kwargs)
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnbench", description="Controlled hyperparameter studies of convolutional "
                                     "networks, tracked in MLflow.", epilog="`cnnbench COMMAND --help`: its options.")
    parser.add_argument("--version", action="version", version=f"cnnbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    settings = settings_help()
    for name, run, summary, description, options, *epilog in COMMANDS:
        command(sub, name, run, summary, description, options, settings if epilog else "")
    return parser


def cmd_run(args: argparse.Namespace, api: Any) -> int:
    result = api.run_trial(data_root=args.data_dir, tracking=args.tracking_uri, experiment=args.experiment,
                           track=not args.no_track, state=args.state_dir, resume=args.resume,
                           model_path=args.model_path, **parse_overrides(args.sets))
    print(api.history_text(result))
    if result.run_id:
        print(f"MLflow run {result.run_id} in experiment {args.experiment!r}")
    return 0 if result.status == "finished" else EXIT_FAILED


def cmd_study(args: argparse.Namespace, api: Any) -> int:
    """One study, or several one after another in this process (one start-up for all, the
    workers kept); every spec is checked before the first trains. Exit status: the worst of them."""
    paths = [args.spec, *args.more_specs]
    specs = [api.load_spec(path, overrides=parse_overrides(args.sets), seeds=args.seeds, model_path=args.model_path)
             for path in paths]
    executor = executor_of(args, api)
    status = 0
    with api.workers_kept() if len(paths) > 1 else contextlib.nullcontext():  # one start-up of the workers
        for path, spec in zip(paths, specs):
            outcome = api.run_study(spec, data_root=args.data_dir, results_root=args.results_dir,
                                    tracking=args.tracking_uri, state=args.state_dir, storage=args.storage,
                                    fuse=args.fuse, workers=args.workers, max_fuse=args.max_fuse,
                                    command=typed(args, path, paths), final=not args.no_final,
                                    share_cores=args.share_cores, executor=executor,
                                    checkpoint_uri=args.checkpoint_uri, timings=args.timings, fast=args.fast)
            status = max(status, show_study(outcome, api))
    return status


def show_study(outcome: Any, api: Any) -> int:
    """A study's table and where its results are; its exit status."""
    if outcome is None:  # another process writes the results
        return 0
    if isinstance(outcome, api.Submitted):  # --no-wait: the job, and how to follow it
        print(outcome.text())
        return 0
    print(Path(outcome.files[1]).read_text())
    print(f"{outcome.trained} run(s) trained, {outcome.skipped} already finished; results in "
          f"{Path(outcome.files[0]).parent}/, MLflow parent run {outcome.parent_run_id}")
    if outcome.timings:
        print(outcome.timings)
    for row in outcome.failed:
        print(f"trial {row.index} ({row.result.status}): {row.result.reason}", file=sys.stderr)
    return EXIT_FAILED if outcome.failed else 0


def executor_of(args: argparse.Namespace, api: Any) -> Any:
    """The executor's settings from --executor and its options (an option of another
    executor is bad input)."""
    given = {"ray": ("ray_address",), "slurm": ("slurm_partition", "slurm_time", "slurm_args", "no_wait")}
    for name, options in given.items():
        for option in options:
            if args.executor != name and getattr(args, option) not in (None, [], False):
                raise ConfigError(f"--{option.replace('_', '-').rstrip('s')}: only with --executor {name}")
    if args.executor == "ray":
        return api.Ray(address=args.ray_address or "auto", gpus_per_worker=args.gpus_per_worker,
                       cpus_per_worker=args.cpus_per_worker)
    if args.executor == "slurm":
        return api.Slurm(partition=args.slurm_partition, time=args.slurm_time or 60,
                         gpus_per_worker=None if args.gpus_per_worker is None else int(args.gpus_per_worker),
                         cpus_per_worker=int(args.cpus_per_worker or 1), sbatch=tuple(args.slurm_args),
                         wait=not args.no_wait)
    if args.gpus_per_worker is not None or args.cpus_per_worker is not None:
        raise ConfigError("--gpus-per-worker/--cpus-per-worker: only with --executor ray or slurm")
    return api.Local()


def cmd_worker(args: argparse.Namespace, api: Any) -> int:
    spec = api.load_spec(args.spec, overrides=parse_overrides(args.sets), seeds=args.seeds)
    return api.run_worker(spec, storage=args.storage, tracking=args.tracking_uri, state=args.state_dir,
                          data_root=args.data_dir, results_root=args.results_dir, max_fuse=args.max_fuse,
                          threads=args.threads, checkpoint_uri=args.checkpoint_uri, final=args.final,
                          command=typed(args))


def cmd_sweep(args: argparse.Namespace, api: Any) -> int:
    spec = api.load_spec(args.spec, overrides=parse_overrides(args.sets), model_path=args.model_path)
    if args.print_storage:
        print(args.storage or api.sweep_storage_url(spec, args.state_dir))
        return 0
    sweep, report, outcome = api.run_sweep(
        spec, workers=args.workers, final=not args.no_final, storage=args.storage, tracking=args.tracking_uri,
        state=args.state_dir, results_root=args.results_dir, n_trials=args.n_trials, sampler_seed=args.sampler_seed,
        data_root=args.data_dir, command=typed(args), fuse_k=args.fuse_k, share_cores=args.share_cores,
        executor=executor_of(args, api), checkpoint_uri=args.checkpoint_uri, timings=args.timings)
    if isinstance(outcome, api.Submitted):  # --no-wait: the job, and how to follow it
        print(outcome.text())
    elif outcome is not None:
        print(Path(outcome.files[2]).read_text())
        print(f"results in {sweep.out_dir}/, MLflow parent run {sweep.parent} in experiment {spec.name!r}, "
              f"Optuna study {spec.name!r} in {masked(sweep.url)}")
        if outcome.timings:
            print(outcome.timings)
    if report.stopped:
        print(f"cnnbench: sweep {spec.name}: {report.stopped}; run the same command to go on", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_tool(args: argparse.Namespace, api: Any) -> int:
    """models, evaluate, bench, summary, compare, report, ui-screenshot, gpu-check: the API's
    `command` with the command's options returns the text to show and the exit status."""
    options = {k: v for k, v in vars(args).items() if k not in ("run", "argv", "command", "sets")}
    text, status = api.command(args.command, **options, typed=typed(args))
    if text:
        print(text, end="" if text.endswith("\n") else "\n")
    return status


def typed(args: argparse.Namespace, spec: str | None = None, specs: list[str] | None = None) -> str:
    """The command as typed, for MLflow and results/, with database passwords hidden; of a
    study among several (`specs`), the command that runs `spec` alone."""
    def hide(arg: str) -> str:
        name, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        return f"{name}{eq}{masked(value)}" if "://" in value else arg

    others = set(specs or []) - {spec}
    return "cnnbench " + " ".join(shlex.quote(hide(a)) for a in args.argv if a not in others)


# ----------------------------------------------------------------------------------------
# the commands, as data: (name, handler, summary, description, options[, True: the settings epilog])

WORKERS = "workers: processes here (one GPU each where there are GPUs), or on --executor's cluster"
CHECKPOINT_URI = opt("--checkpoint-uri", None, "a folder or fsspec URL every node reaches, where each epoch's resume "
                     "checkpoint follows a trial (default with ray/slurm: the trial's MLflow run artifacts)",
                     metavar="URI")
EXECUTOR = [
    opt("--executor", "local", "where the workers run: local (processes here), ray (tasks on a Ray cluster), slurm "
        "(array tasks through submitit); ray and slurm need stores every node reaches (postgresql:// --storage, an "
        "http:// MLflow server)", choices=("local", "ray", "slurm")),
    opt("--ray-address", None, "the Ray cluster: auto (the one this machine belongs to, else a local Ray), "
        "HOST:PORT or ray://HOST:PORT (default: auto)", metavar="ADDR"),
    opt("--gpus-per-worker", None, "GPUs each Ray or Slurm worker asks for (default: 1 where the cluster has "
        "GPUs)", float, metavar="G"),
    opt("--cpus-per-worker", None, "CPUs each Ray or Slurm worker asks for (default: 1)", float, metavar="C"),
    opt("--slurm-partition", None, "the Slurm partition (default: the cluster's)", metavar="P"),
    opt("--slurm-time", None, "minutes each Slurm task may run (default: 60)", int, metavar="MIN"),
    ("--slurm-arg", dict(metavar="KEY=VALUE", action="append", default=[], dest="slurm_args",
                         help="an extra sbatch parameter, e.g. account=lab (repeatable)")),
    flag("--no-wait", "with slurm: submit the array and print its job id and how to follow it, instead of "
         "watching it here; the task that ends the study writes the results"),
    CHECKPOINT_URI]
SHARE = flag("--share-cores", "on the CPU, a worker that runs out of trials gives its core to the workers still "
             "training: faster when groups end unevenly, but those trials' numbers then depend on when it ended "
             "(rounding, not maths; MLflow tag threads=1-2), so a rerun no longer repeats them bit for bit")
RUN = ("run", cmd_run, "train one trial", "Train one trial with the default settings (document 003's "
        "LeNet-5 run) changed by --set, and record it in MLflow.", [
            SETS, DATA, MODEL_PATH, TRACKING, STATE, opt("--experiment", "cnnbench-run", "MLflow experiment"),
            flag("--no-track", "do not record the trial in MLflow"),
            flag("--resume", "go on from the last epoch checkpoint of the same settings")], True)
TIMINGS = flag("--timings", "at the end, where the wall time went (phases: start-up, session, training, "
               "bookkeeping, results), also as metrics timings/... on the parent run; or CNNBENCH_TIMINGS=1")
STUDY = ("study", cmd_study, "run study specs (studies/*.yaml)", "Train every trial of a study spec (those "
        "finished in the tracking store are read back) and write results/<study>/. The same command resumes it; "
        "processes here (--workers) or elsewhere (the same --storage) share its trials, each trained once, "
        "under one MLflow parent run. Several specs run one after another in this process, each its own parent "
        "run and results (every spec is checked first), the worker processes kept from one to the next where "
        "they would start the same way.", [
            ("spec", dict(help="the study's YAML file, e.g. studies/lr.yaml")),
            ("more_specs", dict(nargs="*", metavar="SPEC", help="more studies, run after it in this process and its "
                                                                  "workers")),
            SETS, DATA, MODEL_PATH,
            opt("--seeds", None, "seeds to repeat over, replacing the spec's", metavar="S[,S...]"),
            opt("--results-dir", "results", "where results/<study>/ goes", metavar="DIR"), TRACKING, STATE, STORAGE,
            ("--fuse", dict(help="train compatible trials fused, up to --max-fuse (default on CUDA/MPS)",
                            no="train every trial alone (default on the CPU: wide groups, for models that widen)")),
            opt("--max-fuse", 16, "largest fused group", int, metavar="K"),
            opt("--workers", None, WORKERS + " (default: one per core on the CPU, 1 on CUDA/MPS)", int, metavar="N"),
            SHARE, TIMINGS, *EXECUTOR,
            flag("--fast", "the CPU's fast profile: bf16 autocast (amp=bf16) in this machine's calibrated layout "
                 "(its grouped convolutions kept in fp32 where the calibration measured that faster), on CPUs with "
                 "bf16 matrix units (AMX, AVX-512-BF16; calibrated first where not yet); other trials than fp32's, "
                 "their results in RESULTS_DIR/fast/STUDY/, so the fp32 results stay"),
            flag("--no-final", "only train; the process that ends the study writes the results")], True)
SWEEP = ("sweep", cmd_sweep, "run an Optuna sweep over a spec's search space", "Find the best settings over a "
        "spec's search block with Optuna, each trial scored on a validation split (never the test set) and maybe "
        "pruned. The same command resumes it; workers elsewhere join with the same --storage. At the end the best "
        "trial is trained over sweep.final_seeds, tested once, and results/<sweep>/ written.", [
            ("spec", dict(help="the sweep's YAML file, e.g. studies/sweep-lenet.yaml")), SETS, DATA, MODEL_PATH,
            opt("--n-trials", None, "finished trials to reach (default: the spec's)", int, metavar="N"), STORAGE,
            opt("--workers", 1, WORKERS, int, metavar="N"), SHARE,
            opt("--sampler-seed", None, "seed of the sampler (default: random)", int, metavar="S"),
            opt("--fuse-k", None, "trials each worker takes at once and trains fused, each still its own trial "
                "(default: 16 on CUDA and MPS, 1 on the CPU)", int, metavar="K"),
            opt("--results-dir", "results", "where results/<sweep>/ goes", metavar="DIR"), TRACKING, STATE, TIMINGS,
            flag("--no-final", "only train trials; another worker writes the results"), *EXECUTOR,
            flag("--print-storage", "print the sweep's default storage URL and exit")], True)
WORKER = ("worker", cmd_worker, "join a study or sweep as one more worker", "Join the study or sweep of a spec "
          "(with its --set values and seeds) in --storage, claim and train its trials until nothing is left, and exit "
          "0. Start it any number of times, on any machine, in any order (the first creates the study); SIGKILL it at "
          "any moment and its trials are recovered (by heartbeat). What every executor runs; a Kubernetes Job's pods "
          "run it too (deploy/k8s/).", [
              ("spec", dict(help="the study's or sweep's YAML file")), SETS, DATA,
              opt("--seeds", None, "a study's seeds, replacing the spec's (as the study was started)", metavar="S[,S...]"),
              STORAGE, TRACKING, STATE,
              opt("--max-fuse", None, "trials claimed and trained at once (default: 16 on CUDA and MPS, 4 on the CPU)",
                  int, metavar="K"),
              opt("--threads", None, "CPU threads (default: every usable core)", int, metavar="N"), CHECKPOINT_URI,
              opt("--results-dir", "results", "where results/<name>/ goes, with --final", metavar="DIR"),
              flag("--final", "the worker that ends the study writes its results and closes its parent run")], True)
MODELS = ("models", cmd_tool, "list the registered architectures", "The registry: name, parameters, source.", [])
EVALUATE = ("evaluate", cmd_tool, "re-test a saved checkpoint", "Measure a checkpoint's loss and accuracy on "
        "the test set (last.pt, best.pt, epoch_NNN.pt, or the MLflow artifact).", [
            ("checkpoint", dict(help="path of the .pt file")), DATA, DEVICE, MODEL_PATH,
            opt("--test-batch-size", 1024, "evaluation batch size", int)])
BENCH = ("bench", cmd_tool, "time cnnbench's loop against the naive loop", "Time on one device: the naive "
        "loop (a DataLoader, .to(device), loss.item() each step), cnnbench's loop, and K fused trials for K = 1, "
        "2, 4, ... until throughput stops rising; model-images/s and ratios in results/bench/.", [
            DATA, DEVICE, opt("--model", "lenet5", "registry name"), opt("--batch-size", 64, "batch size", int),
            opt("--steps", 200, "timed steps per measurement", int),
            opt("--repeats", 3, "repeats per measurement (the median is shown)", int),
            opt("--max-k", None, "largest K (default: 64 on CUDA, 16 elsewhere)", int),
            flag("--options", "also time channels_last, TF32, bf16, compile, CUDA graphs, one at a time"),
            flag("--lr-study", "also train the lr study's trials for real, naive vs cnnbench"),
            opt("--epochs", 10, "epochs for --lr-study", int),
            flag("--sweep", "instead: time an Optuna sweep one trial at a time and --fuse-k at a time"),
            opt("--fuse-k", None, "with --sweep: trials fused (default: 16 on CUDA and MPS, 8 on the CPU)", int),
            opt("--sweep-trials", 32, "with --sweep: trials", int), opt("--sweep-epochs", 3, "with --sweep: epochs", int),
            opt("--sweep-train-subset", None, "with --sweep: images per epoch (default: all)", int, metavar="N"),
            flag("--engines", "only the fused engines, wide against vmap, K = 1, 2, 4, ... --max-k; kept in the "
                 "state folder, where the choice of engine on a GPU follows them"),
            flag("--overhead", "instead: a study's bookkeeping with almost no training (the lr study, 64 images), "
                 "fitted per process, trial and trial-epoch, with the writes in the background and in the training "
                 "thread (CNNBENCH_SYNC_BOOKKEEPING=1); --repeats runs per shape"),
            opt("--baseline", None, "with --overhead: also time this other cnnbench checkout (the code before, say)",
                metavar="DIR"),
            flag("--executors", "instead: the tiny 3-seed lr study with 2 workers as local processes and as Ray "
                 "tasks on a 2-node Ray cluster on this machine (where only loopback may be used, run it under "
                 ".ci/ray-netns); results/bench/executors.md"),
            flag("--calibrate", "instead: the CPU layout fastest here (workers x threads, engine and K, "
                 "channels-last, conv path; bf16 where the CPU has matrix units), measured once and cached in the "
                 "state folder per CPU, torch and core count; CPU studies use it. Cached: printed, not measured. "
                 "Measured: results/bench/calibration-<cpu kind>.md"),
            flag("--recalibrate", "--calibrate, measured again even where cached"),
            flag("--profile", "instead: where a wide LeNet-5 step's time goes on one CPU thread (K = 3 and 8), "
                 "by op, and its page faults with and without the freed memory kept; then the 3-seed study's first "
                 "8 trials as one group and seed by seed (results/bench/profile-cpu-<cpu kind>.md)"),
            STATE, opt("--results-dir", "results", "writes RESULTS_DIR/bench/", metavar="DIR")])
SUMMARY = ("summary", cmd_tool, "per-layer shapes, parameters, MACs and memory of a model", "Per layer: output "
        "shape, parameters, multiply-accumulates (MACs = FLOPs / 2) and activation memory of one image, then "
        "totals; --documents checks the documents' hand counts against them.", [
            ("model", dict(nargs="?", help="a registered model (see `cnnbench models`) or your own, module:Class")),
            MODEL_PATH,
            opt("--input", None, "one image, e.g. 1x28x28 (default: the model's own)", metavar="CxHxW"),
            opt("--classes", 10, "outputs of the last layer", int, metavar="N"),
            opt("--format", "table", "output", choices=("table", "markdown", "csv")),
            flag("--all", "every registered model"), flag("--documents", "the documents' counts beside ours"),
            opt("--results-dir", None, "write markdown under DIR/summary/ instead of printing", metavar="DIR")])
COMPARE = ("compare", cmd_tool, "does execution B of a study reproduce execution A?", "Per trial config: the "
        "paired difference B - A over the seeds, its 95% interval, a Holm-corrected p-value and a verdict; in "
        "OUT/compare-NAME/compare.md and compare.csv.", [
            ("a", dict(metavar="A", help="the reference: a results/<study>/ folder, or a study run's MLflow id")),
            ("b", dict(metavar="B", help="the execution checked against A, in the same forms")),
            opt("--labels", None, "names of A and B, e.g. fp32,bf16", metavar="A,B"),
            opt("--name", None, "the output folder is OUT/compare-NAME (default: from the labels)"),
            opt("--out", "results", "where compare-NAME/ goes", metavar="DIR"), TRACKING])
REPORT = ("report", cmd_tool, "the notebooks as HTML for the studies and sweeps in results/", "Execute "
        "notebooks/analysis.ipynb for every study folder with runs in the tracking store, sweep.ipynb for every "
        "sweep, models.ipynb once; HTML beside them, results/index.html. Needs cnnbench[report].", [
            ("names", dict(nargs="*", metavar="NAME", help="only these studies or sweeps (default: all)")),
            opt("--results-dir", "results", "the results folder", metavar="DIR"), TRACKING,
            opt("--timeout", 600, "seconds one notebook cell may run", int, metavar="S")])
UI_SCREENSHOT = ("ui-screenshot", cmd_tool, "the MLflow UI's view of a study as PNG files", "Open the MLflow UI in "
        "headless Chromium on a study's comparison view and save it. Needs cnnbench[ui].", [
            opt("--study", "lr", "the study (MLflow experiment)"),
            opt("--out", "results/mlflow-compare.png", "the comparison view's file", metavar="PNG"),
            opt("--charts", None, "also the chart view of train/loss by value", metavar="PNG"), TRACKING])
GPU_CHECK = ("gpu-check", cmd_tool, "every GPU measurement in one command", "On a CUDA machine, into one folder: "
        "the CUDA tests, the conv2 micro-benchmark, the engine sweep, the document studies timed and compared "
        "with their CPU results, and `bench --sweep`, while the budget lasts. --dry-run takes the same path on the "
        "CPU at toy sizes.", [
            opt("--out", "results/gpu", "folder for everything it writes", metavar="DIR"),
            flag("--dry-run", "the same path on the CPU, at toy sizes"),
            opt("--budget", 480.0, "seconds in all; later studies are skipped past it", float),
            opt("--parts", "tests,conv,engines,studies,sweep",
                "comma-separated: tests, conv, engines, bench, kbench, studies, sweep", metavar="LIST"),
            opt("--studies", None, "comma-separated NAME or NAME:KEY=VALUE (default: the documents')",
                metavar="LIST"), DATA])
COMMANDS = [RUN, STUDY, SWEEP, WORKER, MODELS, EVALUATE, BENCH, SUMMARY, COMPARE, REPORT, UI_SCREENSHOT, GPU_CHECK]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    try:
        previous = interrupt.install()  # stop requests work even where the parent ignored SIGINT
        from cnnbench import api  # torch, MLflow, Optuna: imported once a command runs, not for --help

        return args.run(args, api)
    except (ConfigError, DataError, DeviceError, TrackingError, PermissionError) as err:
        print(f"cnnbench: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_INPUT
    except (StorageError, Unfinished) as err:  # ran, stopped cleanly, could not finish
        print(f"cnnbench: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: 130, 143, 129
        why = "interrupted" if interrupt.signal_of(err) == signal.SIGINT else f"stopped by {err}"
        print(f"\ncnnbench: {why}; finished trials are saved, run the same command to resume", file=sys.stderr)
        return interrupt.exit_status(err)
    finally:
        interrupt.restore(previous)


def entry() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    exiting.exit(main())  # sys.exit without Python's teardown of torch and MLflow (seconds)
