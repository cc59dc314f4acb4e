"""The record's schema: every MLflow tag, param and metric key and every Optuna attribute
name that cnnbench writes or reads, in one place. The writer (`track.writer`), the reader
(`report.analysis`), studies, sweeps and tools use these names; no other module spells a
key (tests/test_schema.py walks the package and fails on a literal one).

The per-epoch record's keys (`test/acc`, `val/loss`, ...: metrics too) have their home in
`cnnbench.config.record`, below the training loop that makes them; they are re-exported
here, so that every key can be imported from this module.

Every upper-case str constant of this module (and of `config.record`) is a key or a key's
prefix; a value never changes, since stored runs and studies are read back by it. Names:
`TAG_*` MLflow tags (`MLFLOW_*` MLflow's own), `PARAM_*` params, `PREFIX_*` the prefixes
of tag and param families, `METRIC_*` run-level metrics, `ATTR_*` an Optuna trial's user
attributes, `STUDY_*` an Optuna study's user attributes, `CLAIM_*` the fields of the
results claim, `OPTUNA_*` Optuna's own names.
"""

from cnnbench.config.record import EPOCH, EPOCH_SECONDS, LR, TEST_ACC, TEST_LOSS, TRAIN_EPOCH_LOSS, VAL_ACC, VAL_LOSS

# the per-epoch record's keys (config.record's), re-exported
RECORD_KEYS = (EPOCH, TRAIN_EPOCH_LOSS, LR, EPOCH_SECONDS, VAL_LOSS, VAL_ACC, TEST_LOSS, TEST_ACC)

# ----------------------------------------------------------------------------------------
# MLflow tags

# MLflow's own (mlflow.utils.mlflow_tags names them too; tests/test_schema.py checks that
# they agree): spelled here so that importing the schema does not import mlflow
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # a trial's (child run's) parent: the study or sweep run
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_RUN_NOTE = "mlflow.note.content"  # the run's description, as the UI shows it
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_SOURCE_NAME = "mlflow.source.name"

# every run (parent and trial)
TAG_STUDY = "cnnbench.study"  # the experiment: the study's or sweep's name
TAG_KIND = "cnnbench.kind"  # study | trial | sweep | run
TAG_PID = "cnnbench.pid"  # the process that created the run ...
TAG_HOST = "cnnbench.host"  # ... and its machine (a run of a dead process here is closed)
TAG_BOOT = "cnnbench.boot"  # ... and the machine's boot id (a pid means nothing across a reboot)
TAG_HEARTBEAT = "cnnbench.heartbeat"  # "SECONDS HOST BOOT PID": the last stamp of a process that keeps the run going
TAG_STATUS = "cnnbench.status"  # running | finished | diverged | pruned | failed | interrupted
TAG_REASON = "cnnbench.reason"  # why a run failed, diverged or was closed

# a study's or sweep's parent run
TAG_SPEC = "cnnbench.spec"  # the spec file
TAG_COMMAND = "cnnbench.command"  # the command line that started it
TAG_SCIENTIFIC = "cnnbench.scientific"  # the scientific hyperparameters, comma-separated (trials too)
TAG_NUISANCE = "cnnbench.nuisance"  # the nuisance hyperparameters, comma-separated
TAG_FUSE = "cnnbench.fuse"  # whether trials train fused
TAG_FUSE_K = "cnnbench.fuse_k"  # trials claimed and trained fused at once
TAG_WORKERS = "cnnbench.workers"  # worker processes
TAG_THREADS = "cnnbench.threads"  # CPU threads per trial (empty: torch's default)
TAG_CPU_LAYOUT = "cnnbench.cpu_layout"  # a CPU study's layout in words: the calibrated one, or "defaults"
TAG_CALIBRATION = "cnnbench.calibration"  # ... as JSON (train.calibration.Layout), or "none": the defaults
TAG_CALIBRATION_KEY = "cnnbench.calibration_key"  # ... the machine's calibration key (CPU, flags, torch, cores)
TAG_ENGINE = "cnnbench.engine"  # which engine trains the trials (wide, vmap, one at a time) and why, per network
TAG_OPTUNA_STORAGE = "optuna.storage"  # the Optuna storage URL (password masked)
TAG_OPTUNA_STUDY = "optuna.study"  # the Optuna study's name (a sweep's trials too)

# a trial's run
TAG_KEY = "cnnbench.trial_key"  # TrialConfig.key(): the resolved config and seed
TAG_RESUMED_FROM_EPOCH = "cnnbench.resumed_from_epoch"  # the epochs a checkpoint restored
TAG_MODEL = "model"
TAG_DATASET = "dataset"
TAG_SEED = "seed"
TAG_DEVICE = "device"  # where it trained (the `device` param is the setting, e.g. auto)
TAG_FUSED_WITH = "fused_with"  # trials trained together with it, itself included
TAG_TORCH_VERSION = "torch_version"
TAG_DIVERGED = "diverged"  # "true" when it diverged
TAG_TRIAL_THREADS = "threads"  # a study trial's CPU threads (empty: torch's default; "1-2": it started
# with 1 and ended with 2, taking the cores of worker processes that had ended: --share-cores, run/cores.py)
TAG_PHASE = "cnnbench.phase"  # a sweep's trial: search | final
TAG_SEARCHED = "cnnbench.searched"  # a sweep's trial: the searched hyperparameters, comma-separated
TAG_TESTED = "cnnbench.tested"  # a sweep's final run: how its test set was read
TAG_TRIAL = "optuna.trial_number"  # the Optuna trial (a final run: the best trial it repeats)
TAG_STATE = "optuna.state"  # the Optuna trial's state (RUNNING, COMPLETE, PRUNED, FAIL)
TAG_EXECUTOR = "cnnbench.executor"  # a trial's executor: local, ray, slurm, worker (cnnbench worker)
TAG_NODE = "cnnbench.node"  # ... the node it trained on (the host name; a Ray node's id)
TAG_WORKER = "cnnbench.worker"  # ... and its worker (w0, w1, ...; a replacement keeps the name)
TAG_CHECKPOINT = "cnnbench.checkpoint"  # a trial's resume-checkpoint lineage: its folder's name (a retry keeps it)
TAG_RETRY_OF = "optuna.retry_of"  # a retried sweep trial: the trial it repeats

# ----------------------------------------------------------------------------------------
# prefixes of tag and param families: prefix + a name

PREFIX_SCIENTIFIC = "scientific."  # a study run's params (its values) and a trial's tags (its value)
PREFIX_NUISANCE = "nuisance."  # the same for the nuisance hyperparameters
PREFIX_FIXED = "fixed."  # a study's or sweep's params: the spec's fixed settings
PREFIX_SEARCH = "search."  # a sweep's params: each searched hyperparameter's space
PREFIX_SWEEP = "sweep."  # a sweep's params: its `sweep:` block (SweepSpec's fields)
PREFIX_STATS = "stats/"  # a study run's statistics: stats/<accuracy>/<value>/<field>, see STATS_*
PREFIX_TIMINGS = "timings/"  # a study's or sweep's run with --timings: timings/<section>/<phase> (seconds,
# summed over its processes; util/timings.py names the phases) and timings/<counter> (events)

# ----------------------------------------------------------------------------------------
# MLflow params (a trial's params are its resolved config: TrialConfig's field names)

PARAM_SEED = "seed"  # a trial's seed (a TrialConfig field); a sweep run's seed
PARAM_SEEDS = "seeds"  # a study run's seeds
PARAM_TRIALS = "trials"  # a study run's trials ...
PARAM_RUNS = "runs"  # ... and the runs that train them (epoch reuse: fewer)
PARAM_N_TRIALS = "n_trials"  # a sweep run's target
PARAM_SWEEP_OBJECTIVE = PREFIX_SWEEP + "objective"

# ----------------------------------------------------------------------------------------
# MLflow metrics (besides the per-epoch record's, above)

METRIC_TRAIN_LOSS = "train/loss"  # a trial's training loss curve, step = training samples seen
# a trial's summary, logged once at its end (step 0)
METRIC_TRAIN_SECONDS = "train_seconds"
METRIC_WALL_SECONDS = "wall_seconds"
METRIC_IMAGES_PER_SECOND = "images_per_second"
METRIC_FINAL_TEST_ACC = "final/test_acc"
METRIC_BEST_ACC = "best/acc"  # the best epoch's accuracy (validation where there is one, else test)
METRIC_BEST_EPOCH = "best/epoch"
SUMMARY_METRICS = (METRIC_TRAIN_SECONDS, METRIC_WALL_SECONDS, METRIC_IMAGES_PER_SECOND, METRIC_FINAL_TEST_ACC,
                   METRIC_BEST_ACC, METRIC_BEST_EPOCH)
METRIC_OPTUNA_VALUE = "optuna/value"  # a sweep trial's objective value, as Optuna was told
# a sweep's parent run, at its end
METRIC_TRIALS_COMPLETE = "trials/complete"
METRIC_TRIALS_PRUNED = "trials/pruned"
METRIC_TRIALS_FAILED = "trials/failed"
METRIC_BEST_VALUE = "best/value"
METRIC_BEST_TRIAL_NUMBER = "best/trial_number"
METRIC_FINAL_TEST_ACC_MEAN = "final/test_acc_mean"  # over the final seeds
METRIC_FINAL_TEST_ACC_STD = "final/test_acc_std"
METRIC_FINAL_N = "final/n"
METRIC_TIMINGS_WALL = PREFIX_TIMINGS + "wall"  # with --timings: the wall time of the study or sweep (seconds)
# a study's statistics: metrics PREFIX_STATS/<accuracy>/<value>/<field> and tags .../<field>
STATS_METRICS = ("n", "mean", "std", "ci_low", "ci_high", "diff", "p_holm", "seeds_needed")
STATS_TAGS = ("verdict", "doc_verdict")

# ----------------------------------------------------------------------------------------
# Optuna: a trial's user attributes

ATTR_KEY = "key"  # a study trial: its planned run's TrialConfig.key()
ATTR_SEED = "seed"  # a study trial: its seed (beside its varied values, each under its own name)
ATTR_MLFLOW_RUN_ID = "mlflow_run_id"  # the trial's MLflow run
ATTR_RUN_ID = "run_id"  # the same, as sweeps of older versions named it (read only)
ATTR_STATUS = "status"  # the run's outcome (TrialResult.status)
ATTR_REASON = "reason"
ATTR_BEST_EPOCH = "best_epoch"  # a sweep trial: the epoch of its best objective value
ATTR_TRAIN_SECONDS = "train_seconds"
ATTR_FUSED_WITH = "fused_with"
ATTR_REUSED = "reused"  # a study trial read back from MLflow (an earlier execution trained it)
# the worker that holds the trial (the results claim carries them too)
ATTR_WORKER_HOST = "worker_host"
ATTR_WORKER_BOOT = "worker_boot"  # the machine's boot id: tells machines (and reboots) with one host name apart
ATTR_WORKER_PID = "worker_pid"
ATTR_WORKER_SUPERVISOR = "worker_supervisor"  # the process that started the worker and watches it: "HOST BOOT PID"
ATTR_WORKER_SLOT = "worker_slot"  # the supervisor's name for the worker (w0, w1, ...: a replacement keeps it)
ATTR_WORKER_DEATHS = "worker_deaths"  # times a worker died under this trial while its supervisor lived

# ----------------------------------------------------------------------------------------
# Optuna: a study's user attributes, ATTR + name

ATTR = "cnnbench."  # prefix of the study's user attributes
STUDY_READY = ATTR + "ready"  # the first worker set the study up; later ones join it
STUDY_PARENT_RUN_ID = ATTR + "mlflow_parent_run_id"
STUDY_EXPERIMENT = ATTR + "mlflow_experiment"
STUDY_TRACKING_URI = ATTR + "tracking_uri"  # password masked
STUDY_SPEC = ATTR + "spec"  # the spec file
STUDY_KIND = ATTR + "kind"  # study | sweep
STUDY_SPEC_HASH = ATTR + "spec_hash"  # a sweep's search space, fixed settings and objective
STUDY_SAMPLER = ATTR + "sampler"
STUDY_FINAL_CLAIM = ATTR + "final_claim"  # the process that writes the results: CLAIM_* and ATTR_WORKER_*
CLAIM_DONE = "done"
CLAIM_SINCE = "since"
CLAIM_FINGERPRINT = "fingerprint"  # what the written results depend on

# ----------------------------------------------------------------------------------------
# Optuna's own names

OPTUNA_FIXED_PARAMS = "fixed_params"  # a queued trial's parameters (system attribute)
OPTUNA_FAILED_TRIAL = "failed_trial"  # a retried trial: the number of the one it repeats (system attribute)
OPTUNA_USER_ATTRS_COLUMN = "user_attrs_"  # prefix of a user attribute's column in trials_dataframe()


def worker_name(attrs: dict) -> str:
    """The worker that holds a trial or a claim, from its attributes: `host:pid`."""
    return f"{attrs.get(ATTR_WORKER_HOST, '?')}:{attrs.get(ATTR_WORKER_PID, '?')}"

