"""Training: engines (one trial, or K fused as vmap or one wide model), the loop,
schedules, checkpoints, the result and the recorder protocol. Knows nothing of
MLflow, Optuna or the CLI."""
