"""Shared fixtures: real MNIST from ../shared/data, a throwaway MLflow store per test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path | None:
    for candidate in (os.environ.get("CNNBENCH_DATA"), REPO.parent / "shared" / "data", REPO / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        pytest.skip("real MNIST not found: set CNNBENCH_DATA or provide ../shared/data")
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch, data_root) -> Path:
    """A fresh working directory with its own tracking store, state and results."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CNNBENCH_DATA", str(data_root))
    monkeypatch.setenv("CNNBENCH_HOME", str(tmp_path / ".cnnbench"))
    return tmp_path


class CallCounter:
    def __init__(self, monkeypatch, cls):
        self.calls = 0
        forward = cls.forward

        def counted(*args):
            self.calls += 1
            return forward(*args)

        monkeypatch.setattr(cls, "forward", staticmethod(counted))


@pytest.fixture
def bmm_calls(monkeypatch) -> CallCounter:
    """Counts the forward calls of the bmm convolution path (train/grouped_conv.py)."""
    from cnnbench.train.grouped_conv import GroupedConv2d

    return CallCounter(monkeypatch, GroupedConv2d)


def quick(**overrides):
    """Settings of a trial that trains in a second or two on real MNIST."""
    from cnnbench.config.trial import TrialConfig

    base = dict(train_subset=1280, test_subset=500, epochs=2, log_every=5, progress=False)
    return TrialConfig.from_dict({**base, **overrides})


# `--set` arguments that shrink a study to trials of a second or so (640 training images)
TINY_STUDY = ["--set", "epochs=2", "--set", "train_subset=640", "--set", "test_subset=300", "--set", "log_every=2",
              "--set", "progress=false"]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `cnnbench` command in a subprocess."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cnnbench", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(*args: str) -> int:
    """`cnnbench *args` in this process, through the command's own entry (cnnbench.cli.main):
    its exit status, an argparse refusal's included. Far cheaper than `cli` (no interpreter,
    torch and MLflow to start again); each kind of bad input keeps one `cli` case, for the
    real command's exit status and stderr."""
    from cnnbench.cli import main

    try:
        return main(list(args))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


def refusal(args: tuple[str, ...] | list[str], *, real: bool, cwd: Path, capsys) -> tuple[int, str]:
    """A refused command's exit status and stderr: through the real `cnnbench` command
    (`real`: one case per kind of bad input) or in this process (`run_main`)."""
    if real:
        out = cli(*args, cwd=cwd)
        return out.returncode, out.stderr
    return run_main(*args), capsys.readouterr().err


def tree(path: Path) -> set[str]:
    """Every file under `path` (relative), to check that nothing was written."""
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def postgres():
    """Two fresh databases on the PostgreSQL server that .ci/run starts: Optuna's, MLflow's."""
    url = os.environ.get("CNNBENCH_TEST_POSTGRES")
    if not url:
        if os.environ.get("CNNBENCH_REQUIRE_POSTGRES"):
            pytest.fail("CNNBENCH_REQUIRE_POSTGRES is set but CNNBENCH_TEST_POSTGRES is not (see .ci/postgres)")
        pytest.skip("no PostgreSQL server: set CNNBENCH_TEST_POSTGRES (.ci/run does)")
    import sqlalchemy

    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    names = [f"cnnbench_{uuid.uuid4().hex[:10]}_{kind}" for kind in ("optuna", "mlflow")]
    with admin.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    base = sqlalchemy.engine.make_url(url)
    yield [base.set(database=name).render_as_string(hide_password=False) for name in names]
    with admin.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
