"""The wide engine: K trials as one wide model (grouped convolutions, batched linears,
one batch norm over K*C channels) follows each trial trained alone, on every widened
architecture, and keeps checkpoints in the single-trial format."""

import pytest
import torch

from cnnbench.train.fused import engine_for, fuse_groups, fusable
from cnnbench.models import get_model, list_models
from cnnbench.train.checkpoint import load_checkpoint
from cnnbench.train.loop import train_group
from cnnbench.train.result import FINISHED, Recorder
from cnnbench.train.conv_path import ENV as CONV_PATH_ENV
from cnnbench.train.device import set_tf32
from cnnbench.train.wide import widen, widen_reason

import rounding
from conftest import quick

# trained 200 steps in the equivalence test: the registry's MNIST-sized models
SMALL = ["lenet5", "lenet", "alexnet", "inception", "resnet", "resnet_bn"]
# torchvision's ImageNet models resize the input to 224 x 224: a forward check of the two
# with batch norm, residual sums and Inception branches (alexnet_tv and vgg16 are plain
# stacks of the layers checked here, and widen: test_the_registry_is_covered)
LARGE_WIDE = ["resnet18", "googlenet", "alexnet_tv", "vgg16"]
LARGE_CHECKED = ["resnet18", "googlenet"]
NOT_WIDE = {"alexnet_paper": "LocalResponseNorm"}

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


class Losses(Recorder):
    def __init__(self):
        self.loss = []

    def train_loss(self, samples, loss):
        self.loss.append(loss)


@pytest.fixture
def fp32():
    """Plain fp32 matmuls and convolutions on CUDA (no TF32), as every trial starts
    (train.configure_backends sets it from the trial's `tf32`, False by default)."""
    set_tf32(False)
    yield
    set_tf32(False)


def test_the_registry_is_covered():
    assert sorted(SMALL + LARGE_WIDE + list(NOT_WIDE)) == list_models()
    for name in SMALL + LARGE_WIDE:
        assert widen_reason(get_model(name)) is None, name
    for name, why in NOT_WIDE.items():
        assert why in widen_reason(get_model(name))


# The settings of each model's 200-step comparison (rounding.py: the bound is 10 times the
# rounding noise of the same trial alone, measured in the test), chosen where that noise
# stays small, so that the comparison measures the engine and not how fast the model
# amplifies a 1e-7 rounding difference. Measured at one thread, 200 steps, alone
# channels-first vs channels-last -> wide vs alone, on an AMD EPYC: resnet_bn at lr 1e-4
# with momentum 0.9, 1.1e-3 -> 8.7e-4, and at lr 1e-3 without momentum 1.3e-3 -> 8.4e-4;
# resnet with ReLU at lr 1e-3, 1.8e-3 -> 1.4e-3; lenet (tanh) at lr 0.01, 4.4e-4 for the
# wide trial; inception (tanh) at lr 0.01, 3.5e-3. Momentum multiplies the step tenfold,
# and a ReLU or a max-pool turns a rounding difference into a different gradient. At these
# settings (same measurement): lenet5 3.1e-7 -> 4.2e-7, lenet 3.3e-7 -> 3.2e-7, alexnet
# -> 1.8e-5, inception 8.7e-7 -> 1.4e-6, resnet 1.8e-7 -> 2.2e-7, resnet_bn 3.9e-5 ->
# 1.6e-5 (its batch statistics amplify rounding: channels-first and channels-last differ
# by 3.7e-6 from the first step). Smooth activations (tanh; lenet5 keeps document 003's
# sigmoid/tanh). Dropout off: its masks are drawn for the wide tensor, not per trial.
# Every model still learns in the 200 steps (asserted).
SETTINGS = {
    "lenet5": dict(lr=0.02),
    "lenet": dict(activation="tanh", lr=0.001),
    "alexnet": dict(activation="tanh", lr=0.005, dropout=0.0),
    "inception": dict(activation="tanh", lr=0.001),
    "resnet": dict(activation="tanh", lr=0.001),
    "resnet_bn": dict(lr=1e-5),
}


@pytest.fixture
def one_thread():
    """One thread, as a study's CPU worker trains: the rounding, and so the drift between a
    wide trial and its lone twin, then does not depend on what ran before in the process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", SMALL)
def test_wide_trial_follows_the_same_loss_curve_as_alone(data_root, model, device, fp32, one_thread):
    """fp32: a trial trained in a wide group follows itself trained alone over the first
    200 steps, batch norm included, within 10 times the rounding noise of the trial alone
    (rounding.py). Its partner has another lr, momentum and seed, so the batch is per
    trial, (K, B, ...)."""
    follows_alone(data_root, model, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["lenet5", "resnet_bn"])
def test_wide_trial_on_the_bmm_convolution_follows_alone(data_root, model, device, fp32, one_thread, monkeypatch,
                                                         bmm_calls):
    """The same, with every grouped convolution of the wide group forced onto the batched
    matrix products (grouped_conv.py): LeNet-5 (biases, padding 2) and the residual net with
    batch norm (no biases, 3x3 padding 1, residual sums). Eager steps: a CUDA graph's replays
    run the captured op without calling it (the H200 counted 9 and 29 calls)."""
    monkeypatch.setenv(CONV_PATH_ENV, "bmm")
    follows_alone(data_root, model, device, cuda_graphs=False)
    assert bmm_calls.calls > 200  # every step's convolutions took it


def follows_alone(data_root, model, device, **settings):
    target = quick(model=model, train_subset=200 * 64, test_subset=500, epochs=1, log_every=1, device=device,
                   **SETTINGS[model], **settings)
    other = target.replace(lr=target.lr / 2, momentum=0.5, seed=target.seed + 1)
    alone, fused = Losses(), Losses()
    (lone,) = train_group([target], data_root=data_root, recorders=[alone])
    results = train_group([target, other], data_root=data_root, recorders=[fused, Losses()], engine="wide")
    assert results[0].status == results[1].status == FINISHED and results[0].fused_with == 2
    assert len(alone.loss) == len(fused.loss) == 200

    def alone_again(**change) -> list[float]:
        again = Losses()
        train_group([target.replace(**change)], data_root=data_root, recorders=[again])
        return again.loss

    noise = rounding.curve_noise(alone_again, alone.loss)
    rounding.assert_within_noise(rounding.curve_gap(alone.loss, fused.loss), noise, f"wide {model}")
    # the test pass (500 images, on the CPU in pieces of CPU_EVAL_IMAGES // 2): one image at most
    assert results[0].metric("test/acc") == pytest.approx(lone.metric("test/acc"), abs=0.21)
    assert sum(fused.loss[-20:]) < sum(fused.loss[:20])  # it learned


@pytest.mark.slow
@pytest.mark.parametrize("model", LARGE_CHECKED)
def test_large_models_widen_to_the_same_logits(model, one_thread):
    """Forward only (224 x 224 input), in train mode (batch statistics): shared and
    per-trial batches, within 10 times the rounding noise of the models alone (the same
    forward in channels-last, and at two threads; rounding.py)."""
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(get_model(model, **({"dropout": 0.0} if model != "resnet18" else {})))
    wide = widen(models, in_channels=1)
    x, xs = torch.randn(2, 1, 28, 28), torch.randn(2, 2, 1, 28, 28)

    def alone(inputs) -> torch.Tensor:  # N x K x classes
        return torch.stack([m(inputs[k]) for k, m in enumerate(models)], 1)

    with torch.no_grad():
        lone = alone([x, x])
        shared = wide(x).view(2, 2, -1)
        own = alone(xs)
        per_trial = wide(xs.permute(1, 0, 2, 3, 4).reshape(2, 2, 28, 28)).view(2, 2, -1)
        with rounding.threads(2):
            noise = [rounding.tensor_gap(lone, alone([x, x])), rounding.tensor_gap(own, alone(xs))]
        for m in models:
            m.to(memory_format=torch.channels_last)
        noise += [rounding.tensor_gap(lone, alone([x, x])), rounding.tensor_gap(own, alone(xs))]
    rounding.assert_within_noise(rounding.tensor_gap(lone, shared), max(noise), f"{model}, a shared batch")
    rounding.assert_within_noise(rounding.tensor_gap(own, per_trial), max(noise), f"{model}, a batch per trial")


def test_engine_choice_and_fallbacks():
    bn, paper, lenet = quick(model="resnet_bn"), quick(model="alexnet_paper"), quick()
    assert engine_for(lenet) == "wide" and engine_for(lenet, "vmap") == "vmap"
    assert engine_for(bn) == "wide" and fusable(bn)
    with pytest.raises(ValueError, match="vmap cannot fuse"):
        engine_for(bn, "vmap")
    assert engine_for(paper) == "vmap"  # no batch norm: vmap fuses what does not widen
    with pytest.raises(ValueError, match="LocalResponseNorm"):
        engine_for(paper, "wide")
    # the CPU fuses only what widens; batch norm models now fuse
    configs = [bn, bn.replace(lr=0.1), paper, paper.replace(lr=0.1)]
    assert fuse_groups(configs) == [[0, 1], [2, 3]]
    assert fuse_groups(configs, wide_only=True) == [[0, 1], [2], [3]]


def test_the_cpu_shares_a_study_out_over_its_workers_in_wide_groups():
    from cnnbench.run.layout import execution
    from cnnbench.train.calibration import group_size

    assert group_size(5, 2, 16) == 3 and group_size(15, 2, 16) == 8 and group_size(1, 2, 16) == 1
    assert group_size(40, 2, 16) == 16
    fuse, workers, threads = execution("cpu", None, None)
    assert fuse and workers >= 1 and threads >= 1
    lrs = [quick(lr=lr) for lr in (0.001, 0.005, 0.01, 0.05, 0.1)]
    assert fuse_groups(lrs, max_k=group_size(5, 2, 16), wide_only=True) == [[0, 1, 2], [3, 4]]


def test_the_cpu_groups_trials_of_several_seeds_seed_by_seed():
    """The 3-seed lr study's 15 trials, 8 at most a group: on the CPU each group cut seed by
    seed (streams.stream_blocks), the study's queue order (seed by seed) or not; on a GPU
    (one batch per stream in any order) runs of 8 as before."""
    lrs = (0.001, 0.005, 0.01, 0.05, 0.1)
    queued = [quick(lr=lr, seed=seed, device="cpu") for seed in (0, 1, 2) for lr in lrs]
    assert fuse_groups(queued, max_k=8, wide_only=True) == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    by_lr = [quick(lr=lr, seed=seed, device="cpu") for lr in lrs for seed in (0, 1, 2)]
    assert fuse_groups(by_lr, max_k=8, wide_only=True) == [[0, 3, 6], [1, 4, 7], [2, 5],
                                                           [9, 12], [10, 13], [8, 11, 14]]
    cuda = [c.replace(device="cuda") for c in queued]
    assert fuse_groups(cuda, max_k=8) == [list(range(8)), list(range(8, 15))]


class StopAfter(Recorder):
    def epoch(self, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_a_wide_group_with_batch_norm_resumes_and_writes_single_trial_checkpoints(data_root, tmp_path):
    configs = [quick(model="resnet_bn", epochs=3, lr=lr) for lr in (0.05, 0.01)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    whole = train_group(configs, data_root=data_root)
    with pytest.raises(KeyboardInterrupt):
        train_group(configs, data_root=data_root, checkpoint_dirs=dirs, recorders=[Recorder(), StopAfter()])
    payload = load_checkpoint(dirs[1] / "last.pt")
    assert payload["epoch"] == 2
    model = get_model("resnet_bn")
    model.load_state_dict(payload["model"])  # strict: the single-trial format, batch norm statistics included
    assert model.features[1].num_batches_tracked.item() == 2 * 20  # 2 epochs of 20 steps
    assert set(payload["optimizer"]) == {n for n, _ in model.named_parameters()}
    resumed = train_group(configs, data_root=data_root, checkpoint_dirs=dirs)
    assert [r.status for r in resumed] == [FINISHED, FINISHED]
    for a, b in zip(whole, resumed):
        assert [h["epoch"] for h in b.history] == [1, 2, 3]
        assert [h["test/acc"] for h in b.history] == [h["test/acc"] for h in a.history]
        assert [loss for _, loss in b.curve] == pytest.approx([loss for _, loss in a.curve], rel=1e-6)


def test_every_engine_meets_the_one_engine_protocol():
    """The loop calls an engine only through `engine.Engine`'s members, and SingleEngine,
    FusedEngine and WideEngine each have every one of them; a class lacking one is no Engine."""
    import ast
    import inspect

    from cnnbench.data.tensors import DATASETS
    from cnnbench.train import loop
    from cnnbench.train.engine import Engine
    from cnnbench.train.fused import FusedEngine
    from cnnbench.train.single import SingleEngine
    from cnnbench.train.wide import WideEngine

    members = set(Engine.__annotations__) | {n for n, v in vars(Engine).items() if inspect.isfunction(v)}
    assert members >= {"k", "eval_images", "begin_epoch", "train_step", "eval_batch", "trial_state"}

    def engine_of(node):  # `engine.x` or `fit.engine.x`
        v = node.value
        return (isinstance(v, ast.Name) and v.id == "engine") or (isinstance(v, ast.Attribute) and v.attr == "engine")

    called = {n.attr for n in ast.walk(ast.parse(inspect.getsource(loop)))
              if isinstance(n, ast.Attribute) and engine_of(n)}
    assert called and called <= members, called - members

    info, cpu = DATASETS["mnist"], torch.device("cpu")
    two = [quick(activation="relu"), quick(activation="relu", lr=0.02)]
    for engine in (SingleEngine(two[:1], cpu, info), FusedEngine(two, cpu, info), WideEngine(two, cpu, info)):
        assert isinstance(engine, Engine), type(engine).__name__

    class NoEvalBatch:
        k, eval_images = 1, None

        def begin_epoch(self, lrs): ...
        def deactivate(self, k): ...
        def train(self, mode): ...
        def train_step(self, x, y, step): ...
        def trial_state(self, k): ...
        def load_trial_state(self, k, state): ...

    assert not isinstance(NoEvalBatch(), Engine)


# the wide groups whose steps a CUDA graph's warm-up must undo: a shared batch (dense conv1),
# one batch per stream (3 trials on 2 seeds), batch norm's running statistics (buffers)
RESTORED = {"shared": ("lenet5", [0, 0, 0]), "per-stream": ("lenet5", [0, 1, 0]), "batch-norm": ("resnet_bn", [0, 1])}


@pytest.mark.parametrize("case", list(RESTORED))
def test_a_wide_engine_restored_from_its_state_tensors_trains_as_if_untouched(data_root, case, monkeypatch):
    """What graphs.StepGraph's warm-up relies on: every tensor a wide step changes is in
    `state_tensors()` (weights, momentum buffers, batch norm statistics), so steps taken and
    undone leave no trace: snapshot, three steps, restore, five steps == five fresh steps."""
    from cnnbench.train.loop import load_data
    from cnnbench.train.streams import ENV as DEDUPE_ENV
    from cnnbench.train.wide import WideEngine

    monkeypatch.setenv(DEDUPE_ENV, "1")  # the per-stream case on the CPU too

    model, seeds = RESTORED[case]
    base = quick(model=model, activation="relu", lr=0.05, momentum=0.9, weight_decay=1e-4)
    configs = [base.replace(lr=0.05 / (1 + i), seed=s) for i, s in enumerate(seeds)]
    data = load_data(base, data_root, torch.device("cpu"))
    streams = sorted(set(seeds))
    orders = [data.epoch_order(s, 0) for s in streams]

    def steps(engine, first, count):
        engine.begin_epoch([[c.lr for c in configs]])
        engine.train(True)
        out = []
        for s in range(first, first + count):
            rows = [o[s * 64:(s + 1) * 64] for o in orders]
            xs, ys = [data.to_float(data.train.x[r]) for r in rows], [data.train.y[r] for r in rows]
            x, y = (xs[0], ys[0]) if len(rows) == 1 else (torch.stack(xs), torch.stack(ys))
            out.append(engine.train_step(x, y, 0).tolist())
        return out

    fresh = steps(WideEngine(configs, data.device, data.info), 0, 5)
    engine = WideEngine(configs, data.device, data.info)
    assert engine.per_stream == (case == "per-stream")
    saved = [t.detach().clone() for t in engine.state_tensors()]
    steps(engine, 10, 3)  # the warm-up, on other batches
    with torch.no_grad():
        for t, s in zip(engine.state_tensors(), saved):
            t.copy_(s)
    assert steps(engine, 0, 5) == fresh


def test_graph_reason_lets_a_wide_step_be_captured():
    """graphs.graph_reason on CUDA (the decision only: nothing runs on a GPU here)."""
    from cnnbench.data.tensors import DATASETS
    from cnnbench.train.graphs import graph_reason
    from cnnbench.train.wide import WideEngine

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    configs = [quick(), quick(lr=0.02, seed=1), quick(lr=0.05)]
    wide = WideEngine(configs, cpu, DATASETS["mnist"])
    assert graph_reason(configs, wide, cuda, per_step_lr=False) == ""
    assert graph_reason(configs, wide, cpu, per_step_lr=False) == "not on CUDA"
    assert "schedule" in graph_reason(configs, wide, cuda, per_step_lr=True)
    off = [c.replace(cuda_graphs=False) for c in configs]
    assert graph_reason(off, wide, cuda, per_step_lr=False) == "cuda_graphs is off"
    adam = [c.replace(optimizer="adam") for c in configs]
    assert "adam" in graph_reason(adam, wide, cuda, per_step_lr=False)

    class NoState:  # an engine that cannot restore what its steps change
        pass

    assert "cannot restore" in graph_reason(configs, NoState(), cuda, per_step_lr=False)


def test_the_fused_engine_follows_the_measured_speeds(tmp_path, monkeypatch):
    """fused.default_engine: the wide engine on the CPU whatever was measured; elsewhere the
    faster one measured for this device, model, batch size and nearest K (measured.py), vmap
    where nothing was measured or the file is damaged."""
    from cnnbench.train.fused import default_engine
    from cnnbench.train.measured import entry, measured_engine, record_speeds, speeds_file

    gpu, config = "NVIDIA H100 80GB HBM3", quick()
    path = speeds_file(tmp_path)
    assert default_engine(config, "cuda", gpu, 16, speeds=path) == "vmap"  # nothing measured
    record_speeds([entry(gpu, "lenet5", 64, 4, {"vmap": 2e5, "wide": 1e5}),
                   entry(gpu, "lenet5", 64, 64, {"vmap": 1e6, "wide": 2e6}),
                   entry("another GPU", "lenet5", 64, 16, {"vmap": 1.0, "wide": 9.0})], path)
    assert default_engine(config, "cuda", gpu, 3, speeds=path) == "vmap"  # nearest measured K: 4
    assert default_engine(config, "cuda", gpu, 32, speeds=path) == "wide"  # 64 (log scale: 32 is nearer 64 than 4)
    assert default_engine(config, "cpu", "x86_64", 3, speeds=path) == "wide"
    assert measured_engine(gpu, "lenet", 64, 16, path=path) is None  # another model
    assert measured_engine(gpu, "lenet5", 128, 16, path=path) is None  # another batch size
    record_speeds([entry(gpu, "lenet5", 64, 64, {"vmap": 3e6, "wide": 2e6})], path)  # measured again: replaced
    assert measured_engine(gpu, "lenet5", 64, 64, path=path) == "vmap"
    assert len(__import__("json").loads(path.read_text())["entries"]) == 3
    path.write_text("{not json")
    assert default_engine(config, "cuda", gpu, 64, speeds=path) == "vmap"
    monkeypatch.setenv("CNNBENCH_HOME", str(tmp_path / "state"))
    assert speeds_file() == tmp_path / "state" / "engine-speeds.json"
