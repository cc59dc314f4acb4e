"""Resume checkpoints that follow a trial to any node.

On one machine a trial resumes from its epoch checkpoints in the state folder. When a
study's workers run on many machines (a Ray or Slurm executor, `cnnbench worker`), a
trial whose worker is lost is retried wherever a worker is free, so each epoch's resume
checkpoint (last.pt) is also put where every node reads it: the trial's MLflow run
artifacts (`resume/last.pt`: what a tracking server with an artifact store already
shares), or a shared folder or fsspec URL (`--checkpoint-uri`). A retried trial that
finds no checkpoint in its node's state folder fetches the newest shared one of its
lineage (the same study run key; the sweep trial it repeats) and resumes from it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cnnbench.track.schema import TAG_CHECKPOINT
from cnnbench.util import fileio

ARTIFACT_DIR = "resume"  # a run's artifact folder holding its last resume checkpoint
CHECKPOINT = "last.pt"


class CheckpointShare:
    def __init__(self, tracker: Any, uri: str | None = None) -> None:
        """`uri`: a shared folder or fsspec URL (None: the runs' MLflow artifacts)."""
        self.tracker, self.uri = tracker, uri.rstrip("/") if uri else None

    def put(self, run_id: str | None, ckpt_dir: Path) -> None:
        """Share `ckpt_dir/last.pt` (a trial's, just written whole)."""
        path = ckpt_dir / CHECKPOINT
        if self.uri is None:
            if run_id:
                self.tracker.client.log_artifact(run_id, str(path), ARTIFACT_DIR)
            return
        fs, root = filesystem(self.uri)
        target = f"{root}/{ckpt_dir.name}/{CHECKPOINT}"
        fs.makedirs(f"{root}/{ckpt_dir.name}", exist_ok=True)
        fs.put_file(str(path), target + ".tmp")
        fs.mv(target + ".tmp", target)  # whole or absent

    def fetch(self, ckpt_dir: Path) -> bool:
        """`ckpt_dir/last.pt` from the shared place, where this node has none; whether it came."""
        if (ckpt_dir / CHECKPOINT).exists():
            return False
        if self.uri is not None:
            fs, root = filesystem(self.uri)
            source = f"{root}/{ckpt_dir.name}/{CHECKPOINT}"
            if not fs.exists(source):
                return False
            fileio.write_with(ckpt_dir / CHECKPOINT, lambda tmp: fs.get_file(source, str(tmp)))
            return True
        for run in self.tracker.runs_with_tag(TAG_CHECKPOINT, ckpt_dir.name):  # newest first
            with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Exception):
                got = self.tracker.client.download_artifacts(run.info.run_id, f"{ARTIFACT_DIR}/{CHECKPOINT}", tmp)
                fileio.write_with(ckpt_dir / CHECKPOINT, lambda target: shutil.copyfile(got, target))
                return True
        return False


def filesystem(uri: str) -> tuple[Any, str]:
    """fsspec's file system for `uri` and the path within it (a plain path: the local one)."""
    import fsspec  # an MLflow dependency; only the shared-folder path needs it

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")
