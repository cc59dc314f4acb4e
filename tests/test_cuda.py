"""The CUDA path, on a real GPU: device choice, data on the device, fused = alone in fp32,
each speed option trains, checkpoints move to the CPU, out of memory fails one trial.

Every test here is marked `cuda` and skips on a machine without CUDA (CI has none):
`pytest -m cuda` runs them where there is a GPU, and `cnnbench gpu-check` runs them first.
"""

from __future__ import annotations

import math

import pytest
import torch

from cnnbench.config.spec import StudySpec
from cnnbench.data.tensors import DeviceData
from cnnbench.run.study import run_study
from cnnbench.train.conv_path import ENV as CONV_PATH_ENV
from cnnbench.train.device import resolve_device, set_tf32
from cnnbench.train.loop import evaluate_checkpoint, load_data, train_group
from cnnbench.train.result import FAILED, FINISHED, Recorder

from conftest import quick

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class Losses(Recorder):
    def __init__(self):
        self.loss = []

    def train_loss(self, samples, loss):
        self.loss.append(loss)


@pytest.fixture(autouse=True)
def plain_fp32():
    """Each test starts from fp32 (TF32 off) and leaves it so."""
    set_tf32(False)
    yield
    set_tf32(False)


def test_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"
    assert quick().device == "auto"


def test_data_lives_on_the_gpu_as_uint8_and_batches_are_made_there(data_root):
    config = quick(device="cuda")
    data = load_data(config, data_root, resolve_device("cuda"))
    assert isinstance(data, DeviceData)
    assert data.train.x.is_cuda and data.train.x.dtype == torch.uint8
    assert data.test.x.is_cuda and data.train.y.is_cuda
    order = data.epoch_order(0, 0)
    assert order.is_cuda
    batch = data.to_float(data.train.x[order[:64]])
    assert batch.is_cuda and batch.dtype == torch.float32 and batch.shape == (64, 1, 28, 28)
    # the same order as on the CPU: a study resumes on another device with the same batches
    cpu = load_data(config.replace(device="cpu"), data_root, torch.device("cpu"))
    assert torch.equal(cpu.epoch_order(0, 0), order.cpu())


@pytest.mark.parametrize("engine", ["vmap", "wide"])
@pytest.mark.parametrize("variant, tolerance", [
    (dict(), 1e-4), (dict(seed=1), 1e-4),
    # Adam on CUDA: 2.5e-4 to 2.8e-4 measured on an H100 (torch 2.11, vmap), with torch.optim's
    # fused kernel and with its foreach kernels alike. The fused group's convolutions are
    # cuDNN's grouped ones, the lone trial's plain ones: their fp32 rounding differs by
    # about 1e-7, and Adam's per-weight normalisation carries that further than SGD does.
    # (The wide engine's figure is not measured yet: the same bound.)
    (dict(optimizer="adam", lr=0.001), 5e-4),
], ids=["sgd", "sgd-two-seeds", "adam"])
def test_fused_trial_follows_the_same_trial_alone_on_cuda_in_fp32(data_root, variant, tolerance, engine):
    """The CPU test's rule on the GPU: 1e-4 relative over the first 200 steps, TF32 off
    (Adam: see its tolerance). Both fused engines; the group's trials are on two seeds, so
    the wide engine takes one batch per stream and SGD's steps are CUDA graphs."""
    settings = dict(train_subset=200 * 64, test_subset=500, epochs=1, log_every=1, device="cuda",
                    cudnn_benchmark=False)
    target = quick(**settings, **variant)
    others = [target.replace(lr=target.lr * 2), target.replace(lr=target.lr / 2, seed=target.seed + 1)]
    alone, fused = Losses(), Losses()
    train_group([target], data_root=data_root, recorders=[alone])
    results = train_group([target, *others], data_root=data_root, recorders=[fused, Losses(), Losses()],
                          engine=engine)
    assert results[0].fused_with == 3 and results[0].device.startswith("cuda")
    assert len(alone.loss) == len(fused.loss) == 200
    worst = max(abs(a - f) / abs(a) for a, f in zip(alone.loss, fused.loss))
    assert worst < tolerance, worst


@pytest.mark.parametrize("option, k", [
    (dict(amp="bf16"), 1), (dict(amp="bf16"), 3), (dict(channels_last=True), 1), (dict(channels_last=True), 3),
    (dict(tf32=True), 3), (dict(compile="default"), 3),
    (dict(compile="reduce-overhead"), 1), (dict(compile="reduce-overhead"), 3),  # CUDA graphs
], ids=["bf16-single", "bf16-fused", "channels_last-single", "channels_last-fused", "tf32-fused",
        "compile-fused", "cudagraphs-single", "cudagraphs-fused"])
def test_each_speed_option_trains_with_a_finite_falling_loss(data_root, option, k):
    config = quick(device="cuda", activation="relu", lr=0.05, train_subset=80 * 64, epochs=1, log_every=10,
                   **option)
    configs = [config.replace(lr=0.05 / (1 + i)) for i in range(k)]
    recorders = [Losses() for _ in configs]
    results = train_group(configs, data_root=data_root, recorders=recorders)
    for r, rec in zip(results, recorders):
        assert r.status == FINISHED, r.reason
        assert len(rec.loss) == 8 and all(math.isfinite(x) for x in rec.loss)
        assert rec.loss[-1] < 0.8 * rec.loss[0], rec.loss
        assert r.history[-1]["test/acc"] > 50


def test_a_checkpoint_saved_on_cuda_loads_and_evaluates_on_the_cpu(data_root, tmp_path):
    config = quick(device="cuda", activation="relu", lr=0.05)
    result = train_group([config], data_root=data_root, checkpoint_dirs=[tmp_path / "ckpt"])[0]
    assert result.status == FINISHED and result.final_checkpoint is not None
    gpu_acc = result.history[-1]["test/acc"]
    loss, acc, n = evaluate_checkpoint(result.final_checkpoint, device="cpu", data_root=data_root)
    assert n == config.test_subset and math.isfinite(loss)
    assert abs(acc - gpu_acc) <= 0.5, (acc, gpu_acc)  # fp32 on another device: a handful of images at most


def test_out_of_memory_on_the_gpu_fails_that_trial_and_the_study_goes_on(data_root, tmp_path):
    """A trial whose batch does not fit is recorded as failed (out of memory); the next
    trial of the study trains. The GPU is narrowed to 512 MB more than this process
    holds already (earlier tests' CUDA-graph pools stay reserved): LeNet's first
    activation alone at batch 30,000 is 564 MB."""
    total = torch.cuda.get_device_properties(0).total_memory
    spec = StudySpec(name="oom", path="(test)", title="out of memory", source="test", description="",
                     scientific={"batch_size": (30_000, 64)}, nuisance={},
                     fixed={"model": "lenet5", "activation": "relu", "lr": 0.05, "epochs": 1,
                            "train_subset": 30_000, "test_subset": 500,
                            "device": "cuda", "progress": False, "log_every": 10},
                     seeds=(0,), reported=())
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 512 * 2**20) / total))
    try:
        outcome = run_study(spec, data_root=data_root, results_root=tmp_path / "results",
                            tracking=f"sqlite:///{tmp_path / 'mlflow.db'}", state=tmp_path / "state")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    status = {row.result.config.batch_size: row.result for row in outcome.rows}
    assert status[30_000].status == FAILED and "out of memory" in status[30_000].reason
    assert status[64].status == FINISHED and status[64].history[-1]["test/acc"] > 20
    assert (tmp_path / "results" / "oom" / "summary.csv").exists()


@pytest.mark.parametrize("settings", [
    dict(),  # document 003's LeNet-5: one trial
    dict(fused="vmap"),  # three trials, two seeds: the batch is (K, B, ...)
    dict(fused="wide"),  # the same, one wide model: one batch per stream, (S, B, ...)
    dict(fused="wide", model="resnet_bn", lr=0.01),  # batch norm's running statistics in the graph
    dict(schedule="step", step_size=1, gamma=0.5, epochs=3),  # a new rate each epoch: captured again
], ids=["single", "vmap", "wide", "wide-batch-norm", "step-schedule"])
def test_a_graphed_trial_computes_the_same_numbers_as_the_eager_one(data_root, settings, monkeypatch):
    """cuda_graphs replays the eager step's own kernels: the same losses and accuracies,
    the last (short) batch of each epoch run eagerly. cuDNN autotuning off and the wide
    engine's convolution path fixed, so both runs use the same algorithms."""
    monkeypatch.setenv(CONV_PATH_ENV, "bmm")
    settings = dict(settings)
    fused = settings.pop("fused", None)
    base = quick(device="cuda", train_subset=50 * 64 + 17, log_every=5, cudnn_benchmark=False, **settings)
    configs = [base, base.replace(lr=base.lr * 2), base.replace(seed=base.seed + 1)] if fused else [base]

    def train(graphs):
        recorders = [Losses() for _ in configs]
        results = train_group([c.replace(cuda_graphs=graphs) for c in configs], data_root=data_root,
                              recorders=recorders, engine=fused)
        return [(rec.loss, [h["test/acc"] for h in r.history]) for r, rec in zip(results, recorders)]

    eager, graphed = train(False), train(True)
    for (loss_e, acc_e), (loss_g, acc_g) in zip(eager, graphed):
        assert len(loss_e) == len(loss_g) > 10
        assert max(abs(a - b) / abs(a) for a, b in zip(loss_e, loss_g)) < 1e-6
        assert acc_e == acc_g


def test_groups_side_by_side_on_cuda_compute_what_they_compute_one_after_another(data_root, monkeypatch):
    """Three groups (two batch sizes, two activations, one of them wide on two seeds), each
    on its own CUDA stream in its own thread, with whole steps as CUDA graphs: the same
    losses and accuracies as one group after another. Deterministic kernels (cuDNN's and
    cuBLAS's) and the convolution path fixed: choices made by timing could differ under the
    other groups' load, and cuDNN's default weight gradients add in whatever order the
    GPU's blocks finish (on the H200 the lone batch-32 trial's curve differed from itself
    side by side, the wide group's did not)."""
    from cnnbench.train.side_by_side import StopRecorder, run_together

    monkeypatch.setenv(CONV_PATH_ENV, "bmm")
    base = quick(device="cuda", activation="relu", lr=0.05, train_subset=100 * 64, log_every=5,
                 cudnn_benchmark=False, deterministic=True)
    groups = [[base, base.replace(lr=0.02, seed=1), base.replace(lr=0.01)], [base.replace(batch_size=32)],
              [base.replace(activation="sigmoid", batch_size=128)]]

    def train(group, wave=None):
        recorders = [StopRecorder(Losses(), wave) if wave else Losses() for _ in group]
        engine = "wide" if len(group) > 1 else None
        results = train_group(group, data_root=data_root, recorders=recorders, engine=engine)
        losses = [(r.inner if wave else r).loss for r in recorders]
        return [(r.status, loss, [h["test/acc"] for h in r.history]) for r, loss in zip(results, losses)]

    alone = [train(g) for g in groups]
    tasks = [lambda wave, g=g: train(g, wave) for g in groups]
    together = run_together(tasks, torch.device("cuda"))
    assert together == alone
    assert all(status == FINISHED for group in together for status, _, _ in group)


def test_checkpoints_copied_off_the_gpu_in_the_background_never_break_a_capture(data_root, tmp_path, capsys):
    """gpu-check's fused sweep on an H200 (2026-12-04) failed every fused trial: the
    background writer copied an epoch's checkpoints off the GPU while the training thread
    captured the next epoch's step as a CUDA graph ("operation not permitted when stream is
    capturing"; checkpoint.on_host). Sixteen wide trials of a few steps an epoch, so that
    each epoch's capture begins while the last one's sixteen checkpoints are copied: every
    trial finishes, every capture holds, every checkpoint is written."""
    from cnnbench.util.background import writer

    base = quick(device="cuda", activation="relu", lr=0.01, train_subset=8 * 64, epochs=6, log_every=2,
                 cuda_graphs=True)
    configs = [base.replace(lr=0.001 * (i + 1)) for i in range(16)]
    dirs = [tmp_path / f"trial{i}" for i in range(16)]
    assert not writer().sync  # the background writer, as on any accelerator
    results = train_group(configs, data_root=data_root, checkpoint_dirs=dirs, engine="wide")
    assert [r.status for r in results] == [FINISHED] * 16, [r.reason for r in results]
    assert "capture failed" not in capsys.readouterr().err
    assert all((d / "last.pt").is_file() for d in dirs)
