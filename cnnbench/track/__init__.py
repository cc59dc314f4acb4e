"""The record: its schema (every MLflow and Optuna key), the MLflow writer, the reader
(the one loader of runs, for the notebooks and the tools), and the databases both live in."""
