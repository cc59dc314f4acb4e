"""Running studies and sweeps: plans, worker processes, Optuna storage and claims,
resume, and the results they write."""
