"""A process's handle on a shared study or sweep (`Session`), and the small `Kind` object
that holds what differs between a grid study and a sweep.

A grid study and a sweep are one thing to the engine: an Optuna study in a storage that
any number of processes share, each trial claimed once, trained (alone or fused with
others), told and recorded as an MLflow child run under one parent run. What differs is
how the Optuna study is created and its trials chosen, how a trained trial's outcome is
scored, and how its run is named and tagged: a `Kind` says each of these
(`run.study.GRID` and `run.sweep.SWEEP` are the two), so that the rooms of the engine
(opening, claims, trials, workers) have no `if study ... else sweep` of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from optuna.trial import TrialState

from cnnbench.config.space import Plan
from cnnbench.config.spec import StudySpec
from cnnbench.config.trial import TrialConfig
from cnnbench.run.cores import CoreShare
from cnnbench.run.storage import ClaimLock
from cnnbench.track.schema import TEST_ACC
from cnnbench.train.result import TrialResult


def trial_id(trial: Any) -> int:
    """The storage's id of an Optuna trial (live or frozen). Optuna has no public accessor
    for it: its storage API takes this id, and the trial keeps it as `_trial_id`. This is the
    one place in cnnbench that reads it (tests/test_layers.py allows exactly this use)."""
    return trial._trial_id


def count_states(trials: list[Any]) -> dict[str, int]:
    """Trials per Optuna state name, and `done`: complete and pruned together."""
    out = {state.name: 0 for state in TrialState}
    for t in trials:
        out[t.state.name] += 1
    out["done"] = out["COMPLETE"] + out["PRUNED"]
    return out


class Outcome(NamedTuple):
    """A trained trial's outcome as Optuna is told it: the state, the value it is told
    (None unless COMPLETE), the figure shown to the person watching, and the user
    attributes that go with it."""
    state: Any  # optuna TrialState
    value: float | None
    shown: float
    attrs: dict[str, Any]


@dataclass
class Member:
    """One claimed trial on its way through training: its settings, checkpoint folder and
    MLflow recorder (the child run is created when it starts)."""
    trial: Any
    config: TrialConfig
    ckpt: Path
    inner: Any  # its MLflow recorder
    told: bool = False  # Optuna knows its outcome

    @property
    def run_id(self) -> str | None:
        return getattr(self.inner, "run_id", None)


class Opened(NamedTuple):
    """What a kind's `create` gives `opening.open_session`."""
    study: Any  # the optuna Study
    target: int  # finished (complete + pruned) trials to reach
    grid_size: int  # points of a grid (0: not a grid)
    configs: dict[str, TrialConfig]  # a study's planned runs by key, in queue order (empty for a sweep)
    fuse_k: int


class Kind:
    """What differs between a grid study and a sweep. Subclasses: `run.study.GridStudy`
    and `run.sweep.Sweep`; instances are stateless, so they travel to worker processes."""

    name = ""  # "study" or "sweep": MLflow's cnnbench.kind tag of the parent run, and the lines shown
    evaluate_test = True  # whether a trial reads the test set each epoch (a sweep never does)
    max_failures_in_a_row = 0  # a worker stops after this many failed trials in a row (0: never)

    # -- opening (run.opening) --------------------------------------------------------------

    def configs_to_check(self, spec: StudySpec, plan: Plan | None) -> list[TrialConfig]:
        """The settings whose device and data the preflight checks."""
        raise NotImplementedError

    def execution(self, spec: StudySpec, plan: Plan | None, *, uri: str, url: str) -> tuple[str, str]:
        """(the Optuna study's name, the identity of an execution with these settings): two
        processes with one identity share an execution and its results folder."""
        raise NotImplementedError

    def create(self, spec: StudySpec, *, plan: Plan | None, store: Any, uri: str, n_trials: int | None,
               sampler_seed: int | None, fuse_k: int | None) -> Opened:
        """Create or load the Optuna study in `store`."""
        raise NotImplementedError

    def initialise(self, session: "Session") -> str:
        """Under the claim lock: queue what must be queued and create (or join) the MLflow
        parent run; returns its id."""
        raise NotImplementedError

    # -- claiming (run.claims) ------------------------------------------------------------------

    def room(self, session: "Session", trials: list[Any], k: int) -> int:
        """How many of the next trials may be claimed together (at most `k`)."""
        return k

    def claimed(self, session: "Session", trial: Any) -> None:
        """A trial was just asked for (under the claim lock, before the next is asked)."""

    # -- a trial (run.trials) -----------------------------------------------------------------

    def metric(self, spec: StudySpec) -> str | None:
        """The per-epoch metric reported to Optuna (None: nothing is reported or pruned)."""
        return None

    def board_metric(self, spec: StudySpec) -> str:
        """The per-epoch figure the progress board shows."""
        return self.metric(spec) or TEST_ACC

    def names(self, spec: StudySpec) -> list[str]:
        """The hyperparameters in a trial's run name."""
        raise NotImplementedError

    def config_of(self, session: "Session", trial: Any) -> TrialConfig:
        """A claimed trial's settings (ConfigError: no trial can take them)."""
        raise NotImplementedError

    def label(self, session: "Session", trial: Any, config: TrialConfig) -> str:
        """How the progress board names a running trial."""
        raise NotImplementedError

    def run_of(self, session: "Session", trial: Any, config: TrialConfig) -> tuple[Path, str, dict[str, str]]:
        """A trial's checkpoint folder, MLflow run name and tags."""
        raise NotImplementedError

    def outcome(self, session: "Session", result: TrialResult) -> Outcome:
        """A trained (or recorded) trial's outcome for Optuna."""
        raise NotImplementedError

    def ended(self, session: "Session", member: Member, result: TrialResult, outcome: Outcome, took: str) -> None:
        """A trial's end is recorded: tell the person watching; what else the kind does then."""
        raise NotImplementedError

    def done_at_start(self, session: "Session") -> int:
        """The finished trials a progress board starts from."""
        return session.counts()["done"]


@dataclass
class Session:
    """This process's handle on a shared study or sweep: created by `opening.open_session`,
    used by the claims, the trials and the worker loop."""
    spec: StudySpec
    kind: Kind
    url: str  # the Optuna storage's URL
    storage: Any
    study: Any
    lock: ClaimLock
    tracker: Any
    parent: str  # the MLflow parent run
    target: int  # finished (complete + pruned) trials the study must reach
    out_dir: Path
    ckpt_root: Path
    data_root: Any
    command: str
    worker: str = ""  # a label for this process's lines
    role: str = "lead"  # lead (it leads an execution), worker (`cnnbench worker`), supervised (run/pool.py's)
    grid_size: int = 0
    fuse_k: int = 1  # trials claimed and trained fused at once (1: one at a time)
    wide_only: bool = False  # fuse only models that widen (the CPU default)
    engine: str | None = None  # the fused engine preferred ("wide", "vmap"; None: fused.engine_for's choice)
    configs: dict[str, TrialConfig] = field(default_factory=dict)  # a study's runs by key, in queue order
    plan: Plan | None = None
    skipped: int = 0  # a study's runs already finished when this process opened it
    threads: int | None = None  # CPU threads per trial, where the runner chose them
    events: Any = None  # a queue that the parent's progress board reads (worker processes)
    cores: CoreShare | None = None  # worker processes: the machine's workers training (cores.py)
    open_args: dict[str, Any] = field(default_factory=dict)  # how a worker process joins
    supervisor: str | None = None  # a supervised worker: the process that started it and watches it ("HOST BOOT PID")
    slot: str | None = None  # ... and its name for this worker (w0, w1, ...)
    owner: Any = None  # the lock on the results folder (owner.ResultsOwner), held by the process leading
    share: Any = None  # where resume checkpoints follow a trial to any node (checkpoint_share.py); None: this one
    executor: str = "local"  # what started this worker (local, ray, slurm, worker), for its runs' tags
    node: str = ""  # the node it runs on (default: the host name)

    def close(self) -> None:
        """This process is done with the session: the results folder's lock is let go."""
        if self.owner is not None:
            self.owner.release()

    @property
    def metric(self) -> str | None:
        """The per-epoch metric reported to Optuna (a sweep's objective); none for a study."""
        return self.kind.metric(self.spec)

    @property
    def names(self) -> list[str]:
        """The hyperparameters in a run's name."""
        return self.kind.names(self.spec)

    def config_of(self, trial: Any) -> TrialConfig:
        """A claimed trial's settings: a study's planned run, or the sweep's suggestion."""
        return self.kind.config_of(self, trial)

    def counts(self) -> dict[str, int]:
        return count_states(self.study.get_trials(deepcopy=False))

    def room(self, counts: dict[str, int]) -> int:
        """Trials that could still be claimed: the target's rest not done or running, and
        of a grid only its queued points."""
        room = self.target - counts["done"] - counts["RUNNING"]
        return min(room, counts["WAITING"]) if self.grid_size else room

    def is_finished(self, counts: dict[str, int]) -> bool:
        """The target is reached, or a grid has no point left to run (a point that failed for
        good, diverging at once say, is not run again)."""
        if counts["done"] >= self.target:
            return True
        return bool(self.grid_size) and counts["WAITING"] == 0 and counts["RUNNING"] == 0

    def say(self, line: str, *, ended: str | None = None) -> None:
        """A line for the person watching: through the progress board when there is one
        (`ended`: the label of the trial whose end it tells)."""
        if self.events is not None:
            self.events.put(("line", self.worker, line, ended))
        else:
            print(line, flush=True)
