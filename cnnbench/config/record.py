"""The keys of a trial's per-epoch record: the dict the training loop (`train.loop`) makes
after each epoch, which `TrialResult.history` keeps and which the MLflow writer logs as
metrics (every key but `EPOCH`, which is the metric's step).

This is the one home of these names. It lives in `config`, below `train`, because the
layers' lower users need them too: `config.space` maps a sweep's objective to one of them
(`OBJECTIVES`), and `train` may not import `track`. `track.schema`, the home of every
other key of the record, re-exports them, so that modules above `track` find every key
there.
"""

EPOCH = "epoch"  # 1-based; the step of the other keys' MLflow metrics
TRAIN_EPOCH_LOSS = "train/epoch_loss"  # mean training loss over the epoch
LR = "lr"  # the learning rate in effect during the epoch (its first step's)
EPOCH_SECONDS = "epoch_seconds"  # time in training steps this epoch
VAL_LOSS = "val/loss"  # on the validation split held out of the training set (val_size > 0)
VAL_ACC = "val/acc"  # percent
TEST_LOSS = "test/loss"  # on the test set (studies; a sweep's trials never read it)
TEST_ACC = "test/acc"  # percent

# (loss, accuracy) of each evaluated split, in the order the loop evaluates them
SPLIT_KEYS = {"val": (VAL_LOSS, VAL_ACC), "test": (TEST_LOSS, TEST_ACC)}
