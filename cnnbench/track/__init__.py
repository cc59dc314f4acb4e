"""The record: its schema (every MLflow and Optuna key), the MLflow writer, and the
databases both live in."""
