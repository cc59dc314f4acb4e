"""cnnbench from Python: what a notebook (and the `cnnbench` command) calls.

    import cnnbench

    spec = cnnbench.load_spec("studies/lr.yaml", overrides={"epochs": 2}, seeds=[0])
    outcome = cnnbench.run_study(spec, data_root="../shared/data")
    runs = cnnbench.load_runs("lr")                 # one row per trial x epoch, from MLflow
    cnnbench.statistics(runs)                       # mean, std, interval and verdict per value
    cnnbench.summarize("lenet5")                    # shapes, parameters, MACs per layer
    result = cnnbench.run_trial(lr=0.05, epochs=1)  # one trial, tracked in MLflow
    cnnbench.evaluate(result.final_checkpoint)      # re-test a checkpoint

Every function takes the tracking store from `tracking` (else $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db), data from `data_root` (else $CNNBENCH_DATA, else ./data) and run
state from `state` (else $CNNBENCH_HOME, else ./.cnnbench). Bad input raises
`cnnbench.errors.ConfigError` (or DataError, DeviceError, TrackingError) with a one-line
message naming the file or field.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from cnnbench.config.space import with_overrides as sweep_overrides
from cnnbench.config.spec import StudySpec, parse_seeds
from cnnbench.config.spec import load_spec as read_spec
from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError
from cnnbench.models import get_model, list_models, model_entry, register_user_model
from cnnbench.models.user import add_model_path
from cnnbench.report.tables import history_text
from cnnbench.run.final import SweepOutcome
from cnnbench.run.session import Session
from cnnbench.run.study import StudyOutcome
from cnnbench.run.study import run_study as study_runner
from cnnbench.run.sweep import run_sweep as sweep_runner
from cnnbench.run.executors.kept import keeping
from cnnbench.run.executors.settings import Local, Ray, Slurm
from cnnbench.run.executors.slurm import Submitted
from cnnbench.run.joining import join_as_worker
from cnnbench.run.workers import EXIT_GAVE_UP, EXIT_INPUT, EXIT_STORAGE, WorkerReport
from cnnbench.tools import resources
from cnnbench.track.stores import default_url, quiet_mlflow
from cnnbench.track.writer import Tracker, check_reachable, run_name, tracking_uri
from cnnbench.train import calibration
from cnnbench.train.checkpoint import load_checkpoint
from cnnbench.train.device import check_inputs, resolve_device
from cnnbench.train.loop import evaluate_checkpoint
from cnnbench.train.loop import run_trial as train_one
from cnnbench.train.result import Recorder, TrialResult
from cnnbench.util import timings
from cnnbench.util.background import writer
from cnnbench.util.paths import state_dir

# What the training commands (run, study, sweep, worker) do not use is imported by the
# function that needs it, each marked "only for ...": the reader and the notebooks' frames,
# the model summaries, the comparison of executions and the tools behind the other commands
# pull in torchvision, scipy, Playwright and nbconvert, seconds of a study's start on a
# small CPU (docs/speed.md, "Start-up").
timings.note_start()  # the start-up ends here: the first study or sweep timed shows it

__all__ = ["evaluate", "load_runs", "load_spec", "register_model", "run_study", "run_sweep", "run_trial", "run_worker",
           "statistics", "summarize", "workers_kept", "Local", "Ray", "Slurm", "Submitted",
           # the commands' tools
           "bench", "command", "compare", "gpu_check", "history_text", "models", "report", "screenshot",
           "summary_text", "sweep_storage_url"]


def register_model(name: str, *, source: str = ""):
    """Decorator: your own network under `name`, for specs, `run_study` and `run_trial`
    (`@cnnbench.register_model("small")` on a class or a function returning an nn.Module;
    it gets those of in_channels, num_classes, image_size, activation, dropout it accepts).
    Worker processes import the module that registered it; one registered in a notebook
    trains in this process (docs/your-own.md)."""
    return register_user_model(name, source=source)


def use_model_path(model_path: str | os.PathLike | Iterable[str | os.PathLike] | None) -> None:
    """`--model-path`: folders put first on the import path, for networks given as module:Class."""
    if model_path is None:
        return
    folders = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    for folder in folders:
        if not Path(folder).is_dir():
            raise ConfigError(f"--model-path: {folder} is not a folder")
    add_model_path(folders)


def load_spec(path: str | os.PathLike, *, overrides: dict[str, Any] | None = None,
              seeds: Iterable[int] | str | None = None,
              model_path: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> StudySpec:
    """A study or sweep spec (studies/*.yaml), validated, with fixed settings overridden
    (`overrides`, as `--set`) and, for a study, its seeds replaced (a list, or "0,1,2").
    A shipped study may be named (`lr`, or `studies/lr.yaml` where no such file is): an
    installed cnnbench runs the document studies too (tools/resources.py). `model_path`:
    folders to import the spec's `model: module:Class` from (besides its own folder)."""
    if isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    use_model_path(model_path)
    path = resources.spec_file(os.fspath(path))
    spec = read_spec(path)
    overrides = dict(overrides or {})
    if spec.search and not spec.scientific:  # a sweep
        if seeds is not None:
            raise ConfigError(f"{path}: seeds: a sweep repeats its best trial over sweep.final_seeds")
        return sweep_overrides(spec, overrides)
    return spec.with_overrides(overrides, tuple(seeds) if seeds is not None else None)


def run_trial(config: TrialConfig | None = None, *, data_root: str | os.PathLike | None = None,
              tracking: str | None = None, experiment: str = "runs", track: bool = True,
              state: str | os.PathLike | None = None, resume: bool = False,
              model_path: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
              **settings: Any) -> TrialResult:
    """Train one trial: `config`, or the default settings with `settings` over them
    (`run_trial(lr=0.05, epochs=2)`). Tracked as an MLflow run in `experiment` unless
    `track` is False; epoch checkpoints in the state folder (`resume` goes on from them).
    `model_path`: folders to import `model="module:Class"` from."""
    use_model_path(model_path)
    base = config.to_dict() if config is not None else {}
    config = TrialConfig.from_dict({**base, **settings}, where="settings")
    check_inputs([config], data_root)
    recorder: Recorder = Recorder()
    if track:

        quiet_mlflow()
        uri = tracking_uri(tracking)
        check_reachable(uri)
        recorder = Tracker(experiment, uri).recorder(config, parent="", tags={},
                                                     name=run_name(config, ("model", "lr", "batch_size")))
    ckpt = state_dir(state) / "checkpoints" / "run" / config.key()
    if not resume:
        shutil.rmtree(ckpt, ignore_errors=True)
    writer().choose(resolve_device(config.device).type == "cpu")  # in this thread on the CPU, as a study's worker
    result = train_one(config, data_root=data_root, recorder=recorder, checkpoint_dir=ckpt)  # returns all written
    result.run_id = getattr(recorder, "run_id", None) or ""
    return result


def run_study(spec: StudySpec | str | os.PathLike, *, data_root: str | os.PathLike | None = None,
              results_root: str | os.PathLike = "results", tracking: str | None = None,
              state: str | os.PathLike | None = None, storage: str | None = None, fuse: bool | None = None,
              workers: int | None = None, max_fuse: int = 16, command: str = "", final: bool = True,
              share_cores: bool = False, executor: str | Local | Ray | Slurm = "local",
              checkpoint_uri: str | None = None, timings: bool = False,
              fast: bool = False) -> StudyOutcome | Submitted | None:
    """Run (or join, or resume) a grid study: `results/<study>/` and one MLflow parent run.

    `storage`: an Optuna storage URL that processes on several machines share (default: a
    SQLite file in the state folder). `fuse` and `workers` None: chosen per device (on the
    CPU one worker per core, each training a wide group; on CUDA/MPS fused groups of up to
    `max_fuse` in one process). `final` False: only train; the process that ends the study
    writes the results. `share_cores`: on the CPU a worker that runs out of trials gives
    its core to those still training (faster, but their numbers no longer repeat bit for
    bit). `executor`: where the `workers` run: "local" (processes here), "ray" or
    `Ray(address=..., gpus_per_worker=...)` (tasks on a Ray cluster), "slurm" or
    `Slurm(partition=..., time=...)` (array tasks); with a cluster, `storage` and `tracking`
    must be stores every node reaches, and `checkpoint_uri` (a shared folder or fsspec URL;
    default: the runs' MLflow artifacts) is where resume checkpoints follow a trial.
    `Slurm(wait=False)` only submits the workers (the one that ends the study writes the
    results) and returns a `Submitted` (the job, and how to follow it).
    `command`: the command line recorded with the runs. On the CPU the study uses this
    machine's calibrated layout where one is cached (`cnnbench bench --calibrate`); `fast`:
    the fast profile (`fast_spec`), its results in `results_root`/fast/. `timings`: where
    the wall time went, as a table in the outcome and metrics `timings/...` on the parent
    run (also CNNBENCH_TIMINGS=1). Returns the outcome (rows, files, counts, the table), or
    None when another process writes the results."""
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    if not spec.scientific:
        raise ConfigError(f"{spec.path}: no scientific block; a spec with only a search block is run by run_sweep")
    at_least_one(workers=workers, max_fuse=max_fuse)
    if fast:  # other trials than fp32's, so another results folder: the fp32 results stay
        spec, results_root = fast_spec(spec, data_root=data_root, state=state), Path(results_root) / "fast"
    return study_runner(spec, data_root=data_root, results_root=results_root, tracking=tracking, state=state,
                        storage=storage, fuse=fuse, workers=workers, max_fuse=max_fuse, command=command,
                        final=final, share_cores=share_cores, executor=executor, checkpoint_uri=checkpoint_uri,
                        timings=timings, fast=fast)


def fast_spec(spec: StudySpec, *, data_root: str | os.PathLike | None = None,
              state: str | os.PathLike | None = None) -> StudySpec:
    """The study's fast profile on a CPU with bf16 matrix units: amp=bf16 (other trials
    than fp32's: `run_study` writes their results to `results/fast/<study>/`, and
    `cnnbench compare results/<study> results/fast/<study>` tells whether they reproduce
    fp32's), this machine's calibration measured first where none is cached (its fast
    layout is what the study then uses). ConfigError elsewhere."""
    device = resolve_device(spec.base_config().device)
    if device.type != "cpu":
        raise ConfigError(f"--fast: a profile of the CPU, and study {spec.name} runs on {device.type}; "
                          "--set amp=bf16 gives bf16 there")
    units = calibration.matrix_units(calibration.machine())
    if not units:
        raise ConfigError("--fast: this CPU has no bf16 matrix units (AMX, AVX-512-BF16), where bf16 is emulated "
                          "and slower than fp32; run the study without it")
    from cnnbench.tools.bench.calibrate import calibrate as calibrate_cpu  # only for --fast: the calibration's benches

    cal = calibrate_cpu(data_root=data_root, state=state)[0]
    print(f"--fast: bf16 autocast on {', '.join(units)}; {cal.bf16}", flush=True)
    return spec.with_overrides({"amp": "bf16"})


def workers_kept() -> Any:
    """A `with` block whose studies and sweeps, run one after another, keep their local
    worker processes from one to the next where a worker would start the same way (its
    threads and GPU, the same environment variables): one start-up of torch, MLflow and
    the stores for them all, and on a GPU one CUDA context and cuDNN's autotune cache.
    Every worker ends with the block. `cnnbench study A.yaml B.yaml ...` runs in one.

        with cnnbench.workers_kept():
            for name in ("lr", "batch"):
                cnnbench.run_study(name, data_root="../shared/data")
    """
    return keeping()


def run_sweep(spec: StudySpec | str | os.PathLike, *, workers: int = 1, final: bool = True,
              storage: str | None = None, tracking: str | None = None, state: str | os.PathLike | None = None,
              results_root: str | os.PathLike = "results", n_trials: int | None = None,
              sampler_seed: int | None = None, data_root: str | os.PathLike | None = None, command: str = "",
              fuse_k: int | None = None, share_cores: bool = False, executor: str | Local | Ray | Slurm = "local",
              checkpoint_uri: str | None = None,
              timings: bool = False) -> tuple[Session, WorkerReport, SweepOutcome | Submitted | None]:
    """Run (or join, or resume) an Optuna sweep over the spec's search block.

    `workers` processes here (more join with the same `storage` from elsewhere);
    `n_trials` finished trials to reach (default: the spec's); `sampler_seed` seeds the
    sampler; `fuse_k` trials each worker takes at once and trains fused (default: 16 on
    CUDA and MPS, 1 on the CPU); `final` False: only train trials; `executor`,
    `checkpoint_uri` and `timings` as for run_study. Returns (session, worker report,
    outcome), the outcome None where another process writes the results (a Submitted with
    `Slurm(wait=False)`)."""
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    at_least_one(n_trials=n_trials, fuse_k=fuse_k, workers=workers)
    return sweep_runner(spec, workers=workers, final=final, storage=storage, tracking=tracking, state=state,
                        results_root=results_root, n_trials=n_trials, sampler_seed=sampler_seed,
                        data_root=data_root, command=command, fuse_k=fuse_k, share_cores=share_cores,
                        executor=executor, checkpoint_uri=checkpoint_uri, timings=timings)


def run_worker(spec: StudySpec | str | os.PathLike, *, storage: str | None = None, tracking: str | None = None,
               state: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
               results_root: str | os.PathLike = "results", max_fuse: int | None = None, threads: int | None = None,
               checkpoint_uri: str | None = None, final: bool = False, command: str = "") -> int:
    """Join the study or sweep of `spec` in `storage` as one more worker (any number of
    them, on any machine, started in any order), claim and train trials until nothing is
    left, and return the exit status: 0 done; 1 stopped on a fault of the machine or on
    trials that kept failing; 2 bad input; 128 + the signal on a stop request. `final`:
    the worker that ends the study writes the results. `max_fuse`: trials claimed and
    trained at once (default: 16 on CUDA and MPS, 4 on the CPU); `threads`: CPU threads."""
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    at_least_one(max_fuse=max_fuse, threads=threads)
    ended = join_as_worker(spec, storage=storage, tracking=tracking, state=state, data_root=data_root,
                           results_root=results_root, command=command, max_fuse=max_fuse, threads=threads,
                           checkpoint_uri=checkpoint_uri, final=final)
    if ended.status == EXIT_INPUT:
        raise ConfigError(ended.message)
    if ended.status in (EXIT_STORAGE, EXIT_GAVE_UP):
        return 1
    return ended.status


def at_least_one(**counts: int | None) -> None:
    """A count option given below 1 is bad input (None: the default)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")


def evaluate(checkpoint: str | os.PathLike, *, device: str = "auto", data_root: str | os.PathLike | None = None,
             test_batch_size: int = 1024,
             model_path: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> dict[str, Any]:
    """Re-test a saved checkpoint (an epoch's, the best or the last) on the test set:
    {"epoch", "config", "test_loss", "test_acc", "images"}. `model_path`: folders to import
    a network of your own (module:Class) from."""
    use_model_path(model_path)
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        payload = load_checkpoint(path)
    except Exception as err:
        raise ConfigError(f"{path}: cannot read checkpoint ({' '.join(str(err).split())[:200]})") from None
    config = TrialConfig.from_dict(payload["config"], where=str(path))
    loss, acc, n = evaluate_checkpoint(payload, device=device, data_root=data_root, test_batch_size=test_batch_size)
    return {"epoch": payload["epoch"], "config": config, "test_loss": loss, "test_acc": acc, "images": n}


def load_runs(study: str, tracking: str | None = None, *, run_ids: list[str] | None = None):
    """A study's trials read back from MLflow: one row per trial x epoch (pandas), with
    `frame.attrs` naming its scientific, nuisance and fixed hyperparameters."""
    from cnnbench.track import reader  # only for reading back: pandas frames of runs

    return reader.load_runs(study, tracking, run_ids=run_ids)


def statistics(runs, spec: StudySpec | None = None):
    """Per scientific value and accuracy: n, mean, std, the 95% interval, the difference to
    the best value and the verdict (`best`, `within noise of best`, `worse`), from
    `load_runs`'s frame (the same as `results/<study>/stats.csv`)."""
    from cnnbench.report import analysis  # only for the notebooks' frames

    return analysis.statistics(runs, spec)


def summarize(model: str | Any, input_shape: Iterable[int] | None = None, *, num_classes: int = 10):
    """A model's layers: output shape, parameters, multiply-accumulates and activation
    memory per layer, for a registered name (`summarize("vgg16", (3, 224, 224),
    num_classes=1000)`) or any nn.Module; `print(cnnbench.models.summary.render(s))`."""
    from cnnbench.models.summary import summarize as layer_summary  # only for the summaries: pandas frames

    return layer_summary(model, input_shape, num_classes=num_classes)


# ----------------------------------------------------------------------------------------
# the tools behind the other commands (each checks its options: a bad one is a ConfigError)


def models() -> list[tuple[str, int, str]]:
    """The registry: (name, parameters on MNIST, source) per architecture."""
    return [(name, sum(p.numel() for p in get_model(name).parameters()), model_entry(name).source)
            for name in list_models()]


def sweep_storage_url(spec: StudySpec, state: str | os.PathLike | None = None) -> str:
    """The Optuna storage a sweep uses by default: a SQLite file in the state folder."""
    return default_url(spec.name, state_dir(state))


def __getattr__(name: str) -> Any:
    """`bench`: `tools.bench.bench` itself (explicit keyword-only parameters; returns the
    files written), imported on first use: only for the benches."""
    if name == "bench":
        from cnnbench.tools.bench import bench

        return bench
    raise AttributeError(f"module 'cnnbench.api' has no attribute {name!r}")


def summary_text(model: str | None = None, *, input: str | None = None, classes: int = 10, fmt: str = "table",
                 all_models: bool = False, documents: bool = False, results_dir: str | None = None,
                 model_path: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> str:
    """`cnnbench summary`: per-layer tables of `model` (a registry name or module:Class; or
    every model, `all_models`), with the documents' counts beside ours (`documents`), as
    text in `fmt` (table, markdown, csv), or written under `results_dir`/summary/; `input`
    one image as CxHxW; `model_path` folders to import module:Class from."""
    from cnnbench.tools.summary_documents import summary_command  # only for `cnnbench summary`

    use_model_path(model_path)
    return summary_command(model, input=input, classes=classes, fmt=fmt, all_models=all_models, documents=documents,
                           results_dir=results_dir)


def compare(a: str, b: str, *, labels: str | None = None, name: str | None = None, out: str = "results",
            tracking: str | None = None, command: str = "") -> tuple[Path, Path]:
    """Does execution B of a study reproduce execution A? Writes compare.md and compare.csv."""
    from cnnbench.report.compare import compare_command  # only for `cnnbench compare`: scipy, the reader

    return compare_command(a, b, labels=labels, name=name, out=out, tracking_uri=tracking, command=command)


def report(results_dir: str | os.PathLike = "results", *, names: list[str] | None = None,
           tracking: str | None = None, timeout: int = 600) -> Any:
    """Run the notebooks headless for the studies and sweeps in `results_dir`; HTML beside them."""
    if timeout < 1:
        raise ConfigError(f"--timeout: must be >= 1, got {timeout}")
    from cnnbench.tools.notebooks import build_reports  # only for `cnnbench report`: the notebooks' runner

    return build_reports(Path(results_dir), names=names, tracking_uri=tracking, timeout=timeout)


def screenshot(study: str, out: str | os.PathLike, *, charts: str | os.PathLike | None = None,
               tracking: str | None = None) -> list[Path]:
    """The MLflow UI's comparison view of a study (and its chart view) as PNG files."""
    from cnnbench.tools.ui import screenshot_study  # only for `cnnbench ui-screenshot`: Playwright

    return screenshot_study(study, out, charts=charts, tracking_uri=tracking)


def gpu_check(out: str | os.PathLike, *, dry_run: bool = False, data_root: str | os.PathLike | None = None,
              budget: float = 480.0, parts: str = "tests,conv,engines,studies,sweep",
              studies: str | None = None) -> Any:
    """Every GPU measurement in one command, into `out` (`tools.gpu_check`): `parts`
    (comma-separated: tests, conv, engines, bench, kbench, studies, sweep) within `budget`
    seconds; `studies`
    comma-separated NAME or NAME:KEY=VALUE; `dry_run` takes the same path on the CPU."""
    from cnnbench.tools.gpu_check import gpu_check as run_gpu_check  # only for `cnnbench gpu-check`

    return run_gpu_check(out, dry_run=dry_run, data_root=data_root, budget=budget, parts=parts, studies=studies)


def command(name: str, /, *, typed: str = "", **o: Any) -> tuple[str, int]:
    """A command of `cnnbench` other than run, study and sweep (models, evaluate, bench,
    summary, compare, report, ui-screenshot, gpu-check) from its command-line options:
    (the text to show, the exit status)."""
    if name == "models":
        rows = [f"{'name':<14} {'parameters':>12}  source"]
        return "\n".join(rows + [f"{m:<14} {n:>12,}  {source}" for m, n, source in models()]), 0
    if name == "evaluate":
        r = evaluate(o["checkpoint"], device=o["device"], data_root=o["data_dir"], test_batch_size=o["test_batch_size"],
                     model_path=o["model_path"])
        c = r["config"]
        return (f"{o['checkpoint']}: epoch {r['epoch']} of {c.model} (lr={c.lr:g}, seed={c.seed}): test loss "
                f"{r['test_loss']:.4f}, test accuracy {r['test_acc']:.2f}% on {r['images']} images"), 0
    if name == "bench":
        from cnnbench.tools.bench import bench  # only for `cnnbench bench`

        keys = ("device", "model", "batch_size", "steps", "repeats", "max_k", "options", "lr_study", "epochs",
                "sweep", "fuse_k", "sweep_trials", "sweep_epochs", "sweep_train_subset", "engines", "executors",
                "overhead", "baseline", "calibrate", "recalibrate", "profile", "results_dir")
        files = bench(data_root=o["data_dir"], state=o["state_dir"], command=typed, **{k: o[k] for k in keys})
        return ("wrote " + ", ".join(files)) if files else "", 0
    if name == "summary":
        return summary_text(o["model"], input=o["input"], classes=o["classes"], fmt=o["format"], all_models=o["all"],
                            documents=o["documents"], results_dir=o["results_dir"], model_path=o["model_path"]), 0
    if name == "compare":
        md, csv = compare(o["a"], o["b"], labels=o["labels"], name=o["name"], out=o["out"],
                          tracking=o["tracking_uri"], command=typed)
        return f"{md.read_text()}\nwrote {md} and {csv}", 0
    if name == "report":
        outcome = report(o["results_dir"], names=o["names"] or None, tracking=o["tracking_uri"], timeout=o["timeout"])
        lines = [f"skipped {line}" for line in outcome.skipped]
        lines += [f"{job.html}  ({job.notebook}, {job.kind} {job.name})" for job in outcome.written]
        lines += [f"cnnbench: {job.notebook} for {job.kind} {job.name} failed at {why}" for job, why in outcome.failed]
        lines.append(f"{len(outcome.written)} report(s) written, {len(outcome.failed)} failed; index: {outcome.index}")
        return "\n".join(lines), 1 if outcome.failed else 0
    if name == "ui-screenshot":
        paths = screenshot(o["study"], o["out"], charts=o["charts"], tracking=o["tracking_uri"])
        lines = [f"{paths[0]}: the MLflow comparison view of study {o['study']}"]
        if o["charts"]:
            lines.append(f"{paths[1]}: the chart view of its train/loss, grouped by value")
        return "\n".join(lines), 0
    if name == "gpu-check":
        steps = gpu_check(o["out"], dry_run=o["dry_run"], data_root=o["data_dir"], budget=o["budget"],
                          parts=o["parts"], studies=o["studies"])
        return f"gpu check: {len(steps)} step(s) in {o['out']}", 1 if any(s.status == "failed" for s in steps) else 0
    raise ConfigError(f"no command {name!r}")
