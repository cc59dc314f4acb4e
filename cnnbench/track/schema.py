"""The record's schema: every MLflow tag, param and metric key and every Optuna attribute
name that cnnbench writes or reads, in one place. The writer (`track.writer`), the reader
(`report.analysis`), studies and sweeps use these names; no other module spells a key."""

TAG_PHASE = "cnnbench.phase"  # search | final
TAG_TRIAL = "optuna.trial_number"
TAG_STATE = "optuna.state"
TAG_OPTUNA_STUDY = "optuna.study"
ATTR = "cnnbench."  # prefix of the study's user attributes




def worker_name(attrs: dict) -> str:
    """The worker that holds a trial or a claim, from its attributes: `host:pid`."""
    return f"{attrs.get('worker_host', '?')}:{attrs.get('worker_pid', '?')}"
