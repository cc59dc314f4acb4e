"""The one reader of runs: a tracking store's runs as a pandas frame, through the client of
one tracking URI (never the process-wide one, so a notebook's own MLflow setting is left
alone). The columns are `mlflow.search_runs`'s: run_id, experiment_id, status,
artifact_uri, start_time, end_time, and `metrics.*`, `params.*`, `tags.*`."""

from __future__ import annotations

from typing import Any

import pandas as pd


def runs_frame(client: Any, experiment_ids: list[str], *, filter_string: str = "",
               order_by: list[str] | None = None, max_results: int | None = None) -> pd.DataFrame:
    """Every run that matches (all pages, or the first `max_results`), one row each."""
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, order_by=order_by,
                                  max_results=min(max_results or 1000, 1000), page_token=token)
        for run in page:
            info, data = run.info, run.data
            row: dict[str, Any] = {
                "run_id": info.run_id, "experiment_id": info.experiment_id, "status": info.status,
                "artifact_uri": info.artifact_uri,
                "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
                "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
            }
            row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
            row.update({f"params.{k}": v for k, v in data.params.items()})
            row.update({f"tags.{k}": v for k, v in data.tags.items()})
            rows.append(row)
        token = page.token
        if not token or (max_results is not None and len(rows) >= max_results):
            break
    return pd.DataFrame(rows[:max_results] if max_results is not None else rows)
