"""grouped_conv2d (im2col + batched matrix products) computes F.conv2d(groups=G): outputs and
gradients, NCHW and channels-last, every geometry of the registry's models; and the wide
engine's choice of path (conv_path.py): its override, its measurement, its cache.

How fp32 agreement is measured: for each of the output, grad_input, grad_weight and
grad_bias, `d = max|bmm - conv| / max|conv64|` (conv = F.conv2d in fp32, conv64 = F.conv2d
in float64, the scale). F.conv2d's own fp32 rounding, measured in the same test, is
`noise = max(max|conv - conv64|, max|conv(channels-last x) - conv|) / max|conv64|`; the
rule is `d <= max(1e-6, 2 * noise)` (two fp32 results, each within the noise of the
truth). With integer-valued data every sum is exact in fp32, whatever its order, and the
two paths must agree bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from cnnbench.errors import ConfigError
from cnnbench.train import conv_path as paths
from cnnbench.train.conv_path import ENV, bench_conv, choose_conv_path, conv_path
from cnnbench.train.device import set_tf32
from cnnbench.train.grouped_conv import GroupedConv2d, bmm_reason, grouped_conv2d
from cnnbench.train.wide import WideConv2d

# (N, K groups, C/K, O/K, H, W, kernel, stride, padding, dilation): the registry's geometries
SHAPES = [
    (16, 3, 6, 16, 14, 14, 5, 1, 0, 1),  # LeNet-5 conv2 (issue 25), K = 3
    (16, 8, 6, 16, 14, 14, 5, 1, 0, 1),  # ... K = 8
    (8, 3, 1, 6, 28, 28, 5, 1, 2, 1),  # LeNet-5 conv1 on per-trial batches
    (8, 2, 16, 24, 12, 12, 5, 1, 2, 1),  # AlexNet (MNIST) conv2, Inception's 5x5 branch
    (8, 4, 24, 24, 7, 7, 3, 1, 1, 1),  # 3x3 padding 1: ResNet blocks, Inception, VGG
    (8, 3, 10, 16, 12, 12, 1, 1, 0, 1),  # Inception's 1x1
    (4, 2, 3, 8, 32, 32, 7, 2, 3, 1),  # torchvision ResNet-18 / GoogLeNet stem: 7x7 stride 2
    (4, 2, 3, 8, 35, 35, 11, 4, 2, 1),  # torchvision AlexNet conv1: 11x11 stride 4
    (4, 3, 4, 4, 9, 9, 3, 2, 1, 2),  # dilation 2 (no model here uses it; F.conv2d takes it)
]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the rounding does not depend on the thread count, and thousands of tiny
    products (gradcheck) do not each wait for a busy second core (16 s on two shared cores,
    1 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def operands(shape, *, dtype=torch.float32, channels_last=False, bias=True, integers=False, seed=0):
    n, k, cg, og, h, w, kernel, *_ = shape
    gen = torch.Generator().manual_seed(seed)

    def draw(*size, scale=1.0):
        if integers:  # products and sums of small integers are exact in fp32
            return torch.randint(-2, 3, size, generator=gen).to(dtype)
        return torch.randn(*size, generator=gen, dtype=dtype) * scale

    x = draw(n, k * cg, h, w)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight = draw(k * og, cg, kernel, kernel, scale=0.1)
    b = draw(k * og) if bias else None
    return x, weight, b


def results(conv, x, weight, bias, shape, grad_out=None):
    """Output and gradients of (x, weight[, bias]) for a random output gradient."""
    k, stride, padding, dilation = shape[1], shape[7], shape[8], shape[9]
    leaves = [t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
              for t in (x, weight, bias) if t is not None]
    out = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None, stride, padding, dilation, k)
    if grad_out is None:
        gen = torch.Generator(device=out.device).manual_seed(1)
        grad_out = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))], grad_out


def gaps(shape, device="cpu", channels_last=False, bmm=None, seed=0):
    """(d, noise) per result, as the module's docstring defines them; `bmm`: the bmm path's
    results when they were computed elsewhere (a CUDA graph), for the grad_out `results` draws."""
    x, w, b = (t.to(device) for t in operands(shape, channels_last=channels_last, seed=seed))
    conv, grad = results(F.conv2d, x, w, b, shape)
    bmm = bmm or results(grouped_conv2d, x, w, b, shape, grad)[0]
    x_other = x.contiguous() if channels_last else x.contiguous(memory_format=torch.channels_last)
    other, _ = results(F.conv2d, x_other, w, b, shape, grad)
    conv64, _ = results(F.conv2d, x.double(), w.double(), b.double(), shape, grad.double())
    out = []
    for c, m, o, t in zip(conv, bmm, other, conv64):
        scale = t.abs().max().item()
        d = (m.double() - c).abs().max().item() / scale
        noise = max((c.double() - t).abs().max().item(), (o - c).abs().max().item()) / scale
        out.append((d, noise))
    return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_fp32_output_and_gradients_match_conv2d(shape, channels_last):
    for name, (d, noise) in zip(["output", "grad_input", "grad_weight", "grad_bias"],
                                gaps(shape, channels_last=channels_last)):
        assert d <= max(1e-6, 2 * noise), (name, d, noise)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_integer_data_gives_the_same_bits(shape, channels_last):
    x, w, b = operands(shape, channels_last=channels_last, integers=True)
    out_shape = F.conv2d(x, w, b, shape[7], shape[8], shape[9], shape[1]).shape
    grad = torch.randint(-2, 3, out_shape, generator=torch.Generator().manual_seed(2)).float()
    conv, _ = results(F.conv2d, x, w, b, shape, grad)
    bmm, _ = results(grouped_conv2d, x, w, b, shape, grad)
    for c, m in zip(conv, bmm):
        assert torch.equal(c, m)
    # the layout follows F.conv2d's: channels-last in, channels-last out and grad_input
    for c, m in zip(conv[:2], bmm[:2]):
        assert m.is_contiguous(memory_format=torch.channels_last) == c.is_contiguous(memory_format=torch.channels_last)
        assert m.is_contiguous() == c.is_contiguous()


@pytest.mark.parametrize("k, stride, padding", [(1, 1, 0), (3, 2, 1), (8, 1, 2), (3, 1, 0), (8, 2, 0), (1, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_in_float64(k, stride, padding, channels_last):
    x, w, b = operands((2, k, 2, 2, 5, 4, 3, stride, padding, 1), dtype=torch.float64, channels_last=channels_last)
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), (stride, stride), (padding, padding),
              (1, 1), k)
    assert torch.autograd.gradcheck(GroupedConv2d.apply, inputs)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), k=st.integers(1, 5), cg=st.integers(1, 3), og=st.integers(1, 3),
       h=st.integers(1, 10), w=st.integers(1, 10), kh=st.integers(1, 4), kw=st.integers(1, 4),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), bias=st.booleans(), channels_last=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_random_shapes_match_conv2d_in_float64(n, k, cg, og, h, w, kh, kw, stride, padding, dilation, bias,
                                              channels_last, seed):
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if h + 2 * padding[0] < span_h or w + 2 * padding[1] < span_w:
        with pytest.raises(RuntimeError):  # F.conv2d refuses an empty output; so does the bmm path
            grouped_conv2d(torch.zeros(n, k * cg, h, w), torch.zeros(k * og, cg, kh, kw), None, stride, padding,
                           dilation, k)
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k * cg, h, w, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight = torch.randn(k * og, cg, kh, kw, generator=gen, dtype=torch.float64)
    b = torch.randn(k * og, generator=gen, dtype=torch.float64) if bias else None
    leaves = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    ref = F.conv2d(x, weight, b, stride, padding, dilation, k)
    out = grouped_conv2d(x, weight, b, stride, padding, dilation, k)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for r, o in zip([ref, *torch.autograd.grad(ref, leaves, grad)], [out, *torch.autograd.grad(out, leaves, grad)]):
        assert r.shape == o.shape
        assert (r - o).abs().max() <= 1e-12 * max(1.0, r.abs().max().item())


def test_what_the_bmm_path_refuses():
    x, w = torch.zeros(2, 6, 8, 8), torch.zeros(12, 3, 3, 3)
    assert bmm_reason(x, w, 1, 2) is None
    for args, why in [((x, w, "same", 2), "padding='same'"), ((x[0], w, 1, 2), "3-d input"),
                      ((x.long(), w.long(), 1, 2), "dtype torch.int64"), ((x, w, 1, 4), "do not split into 4")]:
        assert why in bmm_reason(*args)
        with pytest.raises(ValueError, match="grouped_conv2d cannot compute"):
            grouped_conv2d(args[0], args[1], None, 1, args[2], 1, args[3])
        assert conv_path(args[0], args[1], None, 1, args[2], 1, args[3]) == "grouped"


def test_autocast_casts_as_conv2d_does():
    shape = SHAPES[0]
    x, w, b = operands(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv, grad = results(F.conv2d, x, w, b, shape)
        bmm, _ = results(grouped_conv2d, x, w, b, shape, grad)
    exact, _ = results(F.conv2d, x.double(), w.double(), b.double(), shape, grad.double())
    assert bmm[0].dtype == conv[0].dtype == torch.bfloat16
    for c, m, t in zip(conv, bmm, exact):  # gradients reach the fp32 leaves in fp32
        assert m.dtype == c.dtype
        noise = (c.double() - t).abs().max()  # F.conv2d's own bf16 error
        assert (m.double() - t).abs().max() <= 2 * noise + 1e-6 * t.abs().max()


@pytest.fixture
def no_choices(monkeypatch):
    """An empty cache of measured choices for the test, and the override unset."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(paths, "CHOICES", {})
    return paths.CHOICES


def lenet_conv2(k):
    convs = []
    for seed in range(k):
        torch.manual_seed(seed)
        convs.append(nn.Conv2d(6, 16, 5))
    return WideConv2d(convs)


def test_the_cpu_default_is_todays_grouped_convolution_without_a_measurement(no_choices, monkeypatch, bmm_calls):
    wide = lenet_conv2(3)
    x = torch.randn(8, 18, 14, 14)
    assert torch.equal(wide(x), F.conv2d(x, wide.weight, wide.bias, groups=3))
    assert bmm_calls.calls == 0 and no_choices == {}
    monkeypatch.setenv(ENV, "grouped")
    assert torch.equal(wide(x), F.conv2d(x, wide.weight, wide.bias, groups=3))
    assert bmm_calls.calls == 0


def test_the_override_forces_the_bmm_path_but_not_for_a_dense_convolution(no_choices, monkeypatch, bmm_calls):
    wide = lenet_conv2(3)
    monkeypatch.setenv(ENV, "bmm")
    x = torch.randn(8, 18, 14, 14)
    assert torch.allclose(wide(x), F.conv2d(x, wide.weight, wide.bias, groups=3), rtol=0, atol=1e-5)
    assert bmm_calls.calls == 1
    wide(torch.randn(8, 6, 14, 14))  # the shared batch: one dense convolution with K*O outputs
    assert bmm_calls.calls == 1 and no_choices == {}
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ConfigError, match=f"{ENV}='fast': expected one of grouped, bmm, grouped-fp32, auto"):
        wide(x)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_fp32_path_keeps_grouped_convolutions_in_fp32_under_bf16_autocast(no_choices, monkeypatch, bmm_calls,
                                                                             channels_last):
    """`grouped-fp32`: a grouped convolution under bf16 autocast is F.conv2d in fp32, bit
    for bit (output and gradients, which reach the fp32 weights); without autocast it is
    the grouped path itself; a dense one (the shared batch) still takes autocast's bf16."""
    wide = lenet_conv2(3)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(8, 18, 14, 14).contiguous(memory_format=layout)
    monkeypatch.setenv(ENV, "grouped")
    plain = torch.autograd.grad(wide(x).sum(), [wide.weight, wide.bias])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = wide(x)
    assert mixed.dtype == torch.bfloat16  # what the fp32 path changes
    monkeypatch.setenv(ENV, "grouped-fp32")
    assert torch.equal(wide(x), F.conv2d(x, wide.weight, wide.bias, groups=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wide(x)
        grads = torch.autograd.grad(out.sum(), [wide.weight, wide.bias])
        dense = wide(torch.randn(8, 6, 14, 14))
    assert out.dtype == torch.float32 and torch.equal(out, F.conv2d(x, wide.weight, wide.bias, groups=3))
    assert all(g.dtype == torch.float32 and torch.equal(g, p) for g, p in zip(grads, plain))
    assert dense.dtype == torch.bfloat16
    assert bmm_calls.calls == 0 and no_choices == {}


def test_auto_measures_once_per_shape_and_leaves_the_random_streams_alone(no_choices, monkeypatch):
    monkeypatch.setenv(ENV, "auto")
    wide, timed = lenet_conv2(3), []
    time_paths = paths.time_paths
    monkeypatch.setattr(paths, "time_paths", lambda *a, **kw: timed.append(a) or time_paths(*a, **kw))
    rng = torch.get_rng_state()
    x = torch.randn(4, 18, 14, 14)
    rng_after_x = torch.get_rng_state()
    for _ in range(3):
        wide(x)
    assert torch.equal(torch.get_rng_state(), rng_after_x) and not torch.equal(rng, rng_after_x)
    assert len(timed) == 1 and list(no_choices.values())[0] in ("grouped", "bmm")
    wide(torch.randn(2, 18, 14, 14))  # another batch size: another shape, measured once more
    assert len(timed) == 2 and len(no_choices) == 2
    with torch.no_grad():  # a test pass that meets a new shape still times forward + backward
        wide(torch.randn(3, 18, 14, 14))
    assert len(timed) == 3
    assert choose_conv_path(x.device, x.shape, wide.weight.shape, groups=3) in ("grouped", "bmm")
    assert len(timed) == 3  # the first call's measurement, from the cache


def test_auto_takes_the_grouped_path_under_deterministic_algorithms(no_choices, monkeypatch):
    monkeypatch.setenv(ENV, "auto")
    torch.use_deterministic_algorithms(True)
    try:
        x, w = torch.randn(2, 6, 8, 8), torch.randn(8, 3, 3, 3)
        assert conv_path(x, w, None, 1, 0, 1, 2) == "grouped" and no_choices == {}
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_benchmark_counts_as_many_ops_for_any_k():
    rows = bench_conv("cpu", ks=(2, 6), batch=4, repeats=1)
    assert [(r["k"], r["path"]) for r in rows] == [(2, "grouped"), (2, "bmm"), (6, "grouped"), (6, "bmm")]
    assert all(r["us"] > 0 and r["kernels"] > 0 for r in rows)
    bmm = [r["kernels"] for r in rows if r["path"] == "bmm"]
    assert bmm[0] == bmm[1]


@pytest.fixture
def fp32_cuda():
    set_tf32(False)
    yield
    set_tf32(False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[6]], ids=["lenet_conv2", "3x3", "7x7_stride2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_matches_conv2d(shape, channels_last, fp32_cuda):
    for name, (d, noise) in zip(["output", "grad_input", "grad_weight", "grad_bias"],
                                gaps(shape, "cuda", channels_last)):
        assert d <= max(1e-6, 2 * noise), (name, d, noise)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_per_call_do_not_grow_with_k(fp32_cuda):
    rows = bench_conv("cuda", ks=(8, 128), batch=16, repeats=2)
    bmm = [r["kernels"] for r in rows if r["path"] == "bmm"]
    # the same ops at any K; cuBLAS may split one product's reduction over a second kernel
    # at some batch counts, for each of the three products at most
    assert abs(bmm[0] - bmm[1]) <= 3, rows


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_forward_and_backward(fp32_cuda):
    """Captured once, replayed on new data: F.conv2d's results on that data, within its noise."""
    shape = SHAPES[1]
    x, w, b = (t.cuda().requires_grad_() for t in operands(shape))
    _, grad = results(F.conv2d, x, w, b, shape)  # the output gradient gaps() draws

    def step():
        out = grouped_conv2d(x, w, b, 1, 0, 1, shape[1])
        return [out, *torch.autograd.grad(out, [x, w, b], grad)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as graphs.StepGraph does
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        for t, new in zip((x, w, b), operands(shape, seed=5)):
            t.copy_(new.cuda())
    graph.replay()
    for name, (d, noise) in zip(["output", "grad_input", "grad_weight", "grad_bias"],
                                gaps(shape, "cuda", bmm=[t.clone() for t in static], seed=5)):
        assert d <= max(1e-6, 2 * noise), (name, d, noise)
