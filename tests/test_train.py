"""The training loop on real MNIST subsets: curves, determinism, fusion, divergence, resume."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnbench.train.checkpoint import load_checkpoint, plain
from cnnbench.train.loop import run_trial, train_group
from cnnbench.train.result import DIVERGED, FINISHED, INTERRUPTED, Recorder
from cnnbench.train.schedule import LRSchedule

import rounding
from conftest import quick


class Points(Recorder):
    def __init__(self):
        self.loss, self.epochs, self.started, self.finished = [], [], None, None

    def start(self, config, info, resumed):
        # the result object goes on growing: keep what was restored at this moment
        self.started = (config, info, None if resumed is None else list(resumed.history))

    def train_loss(self, samples, loss):
        self.loss.append((samples, loss))

    def epoch(self, record):
        self.epochs.append(record)

    def finish(self, result):
        self.finished = result


def test_a_trial_learns_and_records_per_epoch(data_root):
    rec = Points()
    r = run_trial(quick(activation="relu", lr=0.05), data_root=data_root, recorder=rec)
    assert r.status == FINISHED and rec.finished is r
    assert [h["epoch"] for h in r.history] == [1, 2] == [e["epoch"] for e in rec.epochs]
    assert {"train/epoch_loss", "test/loss", "test/acc", "lr"} <= set(r.history[0])
    # loss against samples seen: every 5 steps of 64 images, and at each epoch's end (1280 images)
    assert [s for s, _ in r.curve[:4]] == [320, 640, 960, 1280]
    assert r.curve[-1][0] == 2560 and rec.loss == r.curve
    assert r.curve[-1][1] < r.curve[0][1] * 0.7
    assert r.history[-1]["test/acc"] > 60  # chance is 10%
    assert r.images == 2560 and r.images_per_second > 0


def test_same_config_and_seed_give_the_same_numbers(data_root):
    a = run_trial(quick(), data_root=data_root)
    b = run_trial(quick(), data_root=data_root)
    c = run_trial(quick(seed=1), data_root=data_root)
    assert a.curve == b.curve and [h["test/acc"] for h in a.history] == [h["test/acc"] for h in b.history]
    assert a.curve != c.curve


# 200 steps of document 003's sigmoid LeNet-5 and three variants: smooth activations and
# small steps, where a rounding difference stays near float32's last digits (measured
# 1e-7 to 2e-7, Adam 2e-5 to 4e-5, under every kernel set; rounding.py) while a member
# trained with another lr, even 1 % off, drifts 1e-4 and more (checked below)
VARIANTS = {
    "doc003": dict(),
    "slower": dict(lr=0.005, momentum=0.5, weight_decay=5e-4),
    "seed1": dict(seed=1),  # its own init and data order: the fused batch becomes (K, B, ...)
    "adam": dict(optimizer="adam", lr=0.001),
}
ALONE: dict[str, tuple[list[float], float]] = {}  # per variant: the curve alone, its rounding noise


def target_of(variant: str):
    return quick(train_subset=200 * 64, test_subset=500, epochs=1, log_every=1, **VARIANTS[variant])


def partners_of(target):
    return [target.replace(lr=target.lr * 2), target.replace(lr=target.lr / 2, seed=target.seed + 1)]


def losses(configs, data_root, **how) -> list[list[float]]:
    """Each trial's loss at every logging point, the group trained together."""
    points = [Points() for _ in configs]
    results = train_group(configs, data_root=data_root, recorders=points, **how)
    assert all(r.status == FINISHED for r in results)
    return [[loss for _, loss in p.loss] for p in points]


def alone_with_noise(variant: str, data_root) -> tuple[list[float], float]:
    """The variant's target trained alone at one thread, and its rounding noise (rounding.py);
    measured once, for both engines' tests."""
    if variant not in ALONE:
        target = target_of(variant)

        def alone(**change) -> list[float]:
            return losses([target.replace(**change)], data_root)[0]

        with rounding.threads(1):
            reference = alone()
        ALONE[variant] = reference, rounding.curve_noise(alone, reference)
    return ALONE[variant]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vmap", "wide"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_trial_follows_the_same_loss_curve_as_alone(data_root, variant, engine):
    """fp32: a trial trained in a fused group of 3 (either fused engine) follows itself
    trained alone over the first 200 steps (same seed, same data order), within 10 times
    the rounding noise of the trial alone (rounding.py)."""
    target = target_of(variant)
    alone, noise = alone_with_noise(variant, data_root)
    with rounding.threads(1):
        fused = losses([target, *partners_of(target)], data_root, engine=engine)[0]
    assert len(alone) == len(fused) == 200
    rounding.assert_within_noise(rounding.curve_gap(alone, fused), noise, f"{engine}, {variant}")


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["swapped", "one_percent"])
def test_the_curve_check_catches_a_member_trained_with_the_wrong_lr(data_root, planted):
    """The check above is not blind: a fusing error that hands the target its partner's
    learning rate, or its own 1 % off, is caught (by a factor of 30 and more here)."""
    target = target_of("doc003")
    alone, noise = alone_with_noise("doc003", data_root)
    partners = partners_of(target)
    if planted == "swapped":
        group = [target.replace(lr=partners[0].lr), partners[0].replace(lr=target.lr), partners[1]]
    else:
        group = [target.replace(lr=target.lr * 1.01), *partners]
    with rounding.threads(1):
        wrong = losses(group, data_root, engine="wide")[0]
    with pytest.raises(AssertionError, match="more than 10 x the rounding noise"):
        rounding.assert_within_noise(rounding.curve_gap(alone, wrong), noise, planted)


@pytest.mark.slow
def test_a_diverging_trial_stops_at_once_and_its_group_goes_on(data_root):
    good, bad = Points(), Points()
    configs = [quick(lr=0.05, epochs=3, activation="relu"), quick(lr=10, epochs=3, activation="relu")]
    results = train_group(configs, data_root=data_root, recorders=[good, bad])
    assert results[1].status == DIVERGED and "became nan" in results[1].reason.lower()
    assert len(results[1].history) == 0 and len(bad.loss) <= 1  # stopped in its first logging window
    assert results[0].status == FINISHED and len(results[0].history) == 3
    alone = run_trial(quick(lr=10, epochs=3, activation="relu"), data_root=data_root)
    assert alone.status == DIVERGED and alone.history == []


class StopAfter(Points):
    def __init__(self, epochs):
        super().__init__()
        self.stop_after = epochs

    def epoch(self, record):
        super().epoch(record)
        if record["epoch"] == self.stop_after:
            raise KeyboardInterrupt


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(), dict(optimizer="adam", lr=0.002, schedule="plateau", patience=0)])
def test_an_interrupted_trial_resumes_from_its_epoch_checkpoint(data_root, tmp_path, settings):
    config = quick(epochs=3, **settings)
    whole = run_trial(config, data_root=data_root)
    stopper = StopAfter(2)
    with pytest.raises(KeyboardInterrupt):
        run_trial(config, data_root=data_root, recorder=stopper, checkpoint_dir=tmp_path)
    assert stopper.finished.status == INTERRUPTED
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    again = Points()
    resumed = run_trial(config, data_root=data_root, recorder=again, checkpoint_dir=tmp_path)
    assert again.started[2] is not None and [h["epoch"] for h in again.started[2]] == [1, 2]  # restored
    assert [e["epoch"] for e in again.epochs] == [3]
    assert resumed.status == FINISHED
    assert [h["test/acc"] for h in resumed.history] == [h["test/acc"] for h in whole.history]
    assert [s for s, _ in resumed.curve] == [s for s, _ in whole.curve]
    assert [loss for _, loss in resumed.curve] == pytest.approx([loss for _, loss in whole.curve], rel=1e-6)


def only_plain(value, where="checkpoint"):
    """Every leaf of a loaded checkpoint is a tensor or a plain Python value."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) in (str, int), (where, k)
            only_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            only_plain(v, f"{where}[{i}]")
    else:
        assert isinstance(value, torch.Tensor) or value is None or type(value) in (str, int, float, bool), \
            (where, type(value))


@pytest.mark.parametrize("how", [dict(), dict(fused=True, engine="vmap"), dict(fused=True, engine="wide")],
                         ids=["single", "vmap", "wide"])
def test_a_checkpoint_loads_with_weights_only_and_the_trial_resumes_from_it(data_root, tmp_path, how):
    """torch.load(weights_only=True), with nothing allowed beyond its defaults, reads an
    epoch checkpoint of every engine (Adam's state and a plateau schedule's included),
    and the trial resumes from it to the numbers of an uninterrupted run."""
    config = quick(epochs=2, train_subset=256, test_subset=100, log_every=2, optimizer="adam", lr=0.002,
                   schedule="plateau", patience=0)
    (whole,) = train_group([config], data_root=data_root, **how)
    with pytest.raises(KeyboardInterrupt):
        train_group([config], data_root=data_root, recorders=[StopAfter(1)], checkpoint_dirs=[tmp_path], **how)
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    only_plain(raw)
    assert raw["epoch"] == 1 and raw["torch"] == torch.__version__ and raw["optimizer"]
    again = Points()
    (resumed,) = train_group([config], data_root=data_root, recorders=[again], checkpoint_dirs=[tmp_path], **how)
    assert [h["epoch"] for h in again.started[2]] == [1] and [e["epoch"] for e in again.epochs] == [2]
    assert resumed.status == FINISHED
    assert [h["test/acc"] for h in resumed.history] == pytest.approx([h["test/acc"] for h in whole.history], abs=1e-9)


class Opaque:
    """A class of the tests: weights_only unpickling refuses it."""


def test_old_checkpoints_load_and_one_holding_other_objects_is_refused_in_one_line(tmp_path):
    # before: torch's version stored as a TorchVersion (a str subclass), allowed by name
    torch.save({"format": "cnnbench-checkpoint-1", "torch": torch.__version__, "epoch": 3}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 3
    for name, thing in (("path.pt", Path("x")), ("class.pt", Opaque())):
        torch.save({"format": "cnnbench-checkpoint-1", "thing": thing}, tmp_path / name)
        with pytest.raises(ValueError) as err:
            load_checkpoint(tmp_path / name)
        text = str(err.value)
        assert text.startswith(str(tmp_path / name)) and type(thing).__name__ in text and "\n" not in text


def test_plain_turns_values_into_plain_python_and_refuses_objects():
    t = torch.ones(2)
    out = plain({"v": torch.__version__, "p": Path("a/b"), "d": torch.device("cpu"), "n": np.float32(0.5),
                 "i": np.int64(3), "a": np.arange(2), "c": [(1, 0.5)], "t": t})
    assert out == {"v": str(torch.__version__), "p": "a/b", "d": "cpu", "n": 0.5, "i": 3, "a": [0, 1],
                   "c": [(1, 0.5)], "t": t}
    only_plain(out)
    with pytest.raises(TypeError, match=r"checkpoint\.x: a .*Opaque is not a tensor"):
        plain({"x": Opaque()})


@pytest.mark.slow
def test_checkpoints_keep_the_best_epoch(data_root, tmp_path):
    r = run_trial(quick(epochs=3, checkpoints="all"), data_root=data_root, checkpoint_dir=tmp_path)
    best_acc, best_epoch = r.best("test/acc")
    assert r.best_epoch == best_epoch
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == best_epoch
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]


@pytest.mark.parametrize("kind", ["step", "plateau", "onecycle"])
def test_schedules_match_torch(kind):
    from cnnbench.config.trial import TrialConfig

    c = TrialConfig(schedule=kind, lr=0.1, epochs=6, step_size=2, gamma=0.5, patience=1)
    steps = 7
    ours = LRSchedule(c, steps)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = {
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6 * steps,
                                                                cycle_momentum=False),
    }[kind]()
    losses = [1.0, 0.9, 0.95, 0.97, 0.96, 0.8]
    for epoch in range(6):
        for step in range(steps):
            assert ours.lr(epoch, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), (epoch, step)
            opt.step()
            if kind == "onecycle" and epoch * steps + step < 6 * steps - 1:
                sched.step()
        ours.end_epoch(losses[epoch])
        if kind == "step":
            sched.step()
        elif kind == "plateau":
            sched.step(losses[epoch])


@pytest.mark.slow
def test_augmentation_and_adam_train(data_root):
    r = run_trial(quick(augment="hflip,grayscale,crop", optimizer="adam", lr=0.003, activation="relu"),
                  data_root=data_root)
    assert r.status == FINISHED and all(math.isfinite(h["test/loss"]) for h in r.history)
    assert r.history[-1]["test/acc"] > 40


@pytest.mark.parametrize("k", [1, 3], ids=["single", "fused"])
def test_an_engine_restored_from_its_state_tensors_trains_as_if_untouched(data_root, k):
    """What a CUDA graph's warm-up relies on (graphs.StepGraph): every tensor a step
    changes is in `state_tensors()`, so steps taken and undone leave no trace."""
    from cnnbench.tools.bench.steps import make_engine
    from cnnbench.train.loop import load_data

    base = quick(activation="relu", lr=0.05, momentum=0.9, weight_decay=1e-4)
    configs = [base.replace(lr=0.05 / (1 + i)) for i in range(k)]
    data = load_data(base, data_root, torch.device("cpu"))
    order = data.epoch_order(0, 0)

    def steps(engine, first, count):
        engine.begin_epoch([[c.lr for c in configs]])
        engine.train(True)
        out = []
        for s in range(first, first + count):
            idx = order[s * 64:(s + 1) * 64]
            out.append(engine.train_step(data.to_float(data.train.x[idx]), data.train.y[idx], 0).tolist())
        return out

    fresh = steps(make_engine(configs, data), 0, 5)
    engine = make_engine(configs, data)
    saved = [t.detach().clone() for t in engine.state_tensors()]
    steps(engine, 10, 3)  # the warm-up, on other batches
    with torch.no_grad():
        for t, s in zip(engine.state_tensors(), saved):
            t.copy_(s)
    assert steps(engine, 0, 5) == fresh
