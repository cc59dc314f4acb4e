"""The documents' hand counts beside `cnnbench.models.summary`'s counts: where their arithmetic holds.

Each `Claim` is data: the document, the layer, the quantity, the document's own words,
the figure it arrives at, how we count the same thing, and (when they differ) what kind of
slip it is and why. Every counted figure comes from `summarize` on a module: a registered
model, or one of two reference layouts the registry lacks (LeCun et al.'s 1998 LeNet-5 with
its sparse C3 table and RBF output; CS231n's naive Inception module). A claim "agrees"
when the counted figure equals the document's (to the precision written, for "3.2M").
`kind` says what the document got wrong when it does not: the tests check that exactly the
claims with a kind disagree, so a change in a count cannot silently flip a verdict.

`cnnbench summary --documents` prints the report; `make summary` writes it to
results/summary/documents.md.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnbench.errors import ConfigError
from cnnbench.models import get_model, list_models, summary
from cnnbench.models.summary import Summary, si, summarize
from cnnbench.util import fileio

Figure = int | str | tuple  # exact count | "3.2M" as written | shape (C, H, W) or (H, W)


# ---- reference layouts the registry does not hold ----------------------------------------

# LeCun et al. (1998), Table I: the S2 maps each C3 map reads (document 003 describes it)
C3_MAPS = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),  # 6 maps on 3 neighbours
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),  # 6 on 4 neighbours
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),  # 3 on 4 non-neighbours
    (0, 1, 2, 3, 4, 5),  # 1 on all 6
)


class Subsampling(nn.Module):
    """LeNet-5's S2/S4: the sum of a 2x2 block times a trainable coefficient, plus a trainable bias, per map."""
    def __init__(self, maps: int) -> None:
        super().__init__()
        self.coef = nn.Parameter(torch.ones(maps))
        self.bias = nn.Parameter(torch.zeros(maps))

    def forward(self, x: Tensor) -> Tensor:
        # the paper squashes every layer's weighted sum (a scaled tanh); the counts do not depend on it
        return torch.tanh(F.avg_pool2d(x, 2) * 4 * self.coef[:, None, None] + self.bias[:, None, None])


class SparseC3(nn.Module):
    """C3 of LeCun et al. (1998): map j convolves only the S2 maps C3_MAPS[j] (1,516 parameters)."""
    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Conv2d(len(m), 1, kernel_size=5) for m in C3_MAPS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x[:, list(idx)]) for conv, idx in zip(self.maps, C3_MAPS)], dim=1)


class RBFOutput(nn.Module):
    """Euclidean RBF units: y_i = sum_j (x_j - w_ij)^2, w fixed by hand (84 x 10, not trained)."""
    def __init__(self, features: int = 84, classes: int = 10) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.zeros(classes, features), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return ((x[:, None, :] - self.centres) ** 2).sum(-1)


def lenet5_1998() -> nn.Module:
    """LeNet-5 as LeCun et al. (1998) and document 003's table describe it, on 1 x 32 x 32."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.Tanh(),  # C1: 6 x 28 x 28
        Subsampling(6),  # S2: 6 x 14 x 14
        SparseC3(), nn.Tanh(),  # C3: 16 x 10 x 10
        Subsampling(16),  # S4: 16 x 5 x 5
        nn.Conv2d(16, 120, kernel_size=5), nn.Tanh(),  # C5: 120 x 1 x 1
        nn.Flatten(), nn.Linear(120, 84), nn.Tanh(),  # F6: 84
        RBFOutput(),  # output: 10
    )


class NaiveInception(nn.Module):
    """CS231n lecture 9's naive Inception module on 256 x 28 x 28 (its slide; the document's
    copy lost the image but keeps the input depth 256 and the total, 854M)."""

    def __init__(self, c: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 128, kernel_size=1)
        self.conv3 = nn.Conv2d(c, 192, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(c, 96, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv1(x), self.conv3(x), self.conv5(x), self.pool(x)], dim=1)  # 672 x 28 x 28


# ---- the counts the claims draw on --------------------------------------------------------

def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


class Counts:
    """Summaries of the layouts the documents describe, made once, on the meta device."""
    @functools.cached_property
    def lenet5(self) -> Summary:  # document 003's network, as cnnbench trains it (C1 padded: 28 x 28 out)
        return summarize("lenet5")

    @functools.cached_property
    def lenet(self) -> Summary:  # document 000's ReLU LeNet
        return summarize("lenet")

    @functools.cached_property
    def lenet1998(self) -> Summary:
        return summarize(_meta(lenet5_1998), (1, 32, 32))

    @functools.cached_property
    def lenet1998_trainable(self) -> int:
        return sum(p.numel() for p in _meta(lenet5_1998).parameters() if p.requires_grad)

    @functools.cached_property
    def alexnet(self) -> Summary:  # the paper's network, 1000 classes, at its native 227 x 227
        return summarize("alexnet_paper", num_classes=1000)

    @functools.cached_property
    def alexnet_277(self) -> Summary:  # its convolutional part at document 001's 277 x 277

        return summarize(_meta(lambda: get_model("alexnet_paper", num_classes=1000).net.features), (3, 277, 277))

    @functools.cached_property
    def vgg16(self) -> Summary:
        return summarize("vgg16", num_classes=1000)

    @functools.cached_property
    def vgg16_layers(self) -> list[tuple[str, nn.Module | None]]:
        """Document 004's rows in our terms: the input, then each conv, max-pool and linear layer."""

        net = _meta(lambda: get_model("vgg16", num_classes=1000).net)
        listed = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.Linear))]
        return [("input", None), *listed]

    @functools.cached_property
    def vgg16_listed_values(self) -> int:
        """Values in the outputs of the layers document 004 lists (input included)."""
        return sum(self.vgg16.row(name).activations for name, _ in self.vgg16_layers)

    @functools.cached_property
    def vgg16_relu_values(self) -> int:
        """The same, if every ReLU wrote a tensor of its own instead of working in place."""
        return self.vgg16_listed_values + sum(math.prod(r.shape) for r in self.vgg16.rows if r.type == "ReLU")

    @functools.cached_property
    def vgg16_weights(self) -> int:
        """Weights only (no biases) of the layers document 004 lists, as its params column counts."""
        return sum(m.weight.numel() for _, m in self.vgg16_layers if isinstance(m, (nn.Conv2d, nn.Linear)))

    @functools.cached_property
    def naive_inception(self) -> Summary:
        return summarize(_meta(NaiveInception), (256, 28, 28))

    def under(self, s: Summary, prefix: str, what: str) -> int:
        """Sum of a column over the rows of one module and its children."""
        return sum(getattr(r, what) for r in s.rows if r.name == prefix or r.name.startswith(prefix + "."))

    def connections(self, s: Summary, prefix: str) -> int:
        """LeCun's "connections": multiply-accumulates plus one bias input per output value."""
        outputs = sum(math.prod(r.shape) for r in s.rows
                      if r.type in ("Conv2d", "Linear") and (r.name == prefix or r.name.startswith(prefix + ".")))
        return self.under(s, prefix, "macs") + outputs


# ---- the claims ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    doc: str  # "000" .. "004" (the file names in shared/seeds)
    where: str  # the layer or line
    quantity: str
    written: str  # the document's words
    figure: Figure  # the figure it arrives at
    count: Callable[[Counts], Figure]
    why: str | Callable[[Counts], str]  # what was counted and, if off, why (a function of the counts)
    kind: str = ""  # when the document is off: "arithmetic", "typo", "omission", "wording", "order"


CLAIMS: tuple[Claim, ...] = (
    # document 000: LeNet and AlexNet by hand
    Claim("000", "LeNet C1", "parameters", "(5*5*1+1)*6 = 156", 156,
          lambda c: c.lenet5.row("features.0").params,
          "lenet5's C1 (1x28x28 padded by 2 gives the 28x28 output of a 32x32 input)"),
    Claim("000", "LeNet C1", "multiplications (its \"FLOPs\")", "5*5*1*28*28*6 = 117600", 117_600,
          lambda c: c.lenet5.row("features.0").macs,
          lambda c: f"MACs; torch's counter reports {c.lenet5.row('features.0').flops:,} FLOPs, 2 per multiply-add"),
    Claim("000", "LeNet C5", "parameters", "(5*5*16+1)*120 = 48120", 48_120,
          lambda c: c.lenet5.row("classifier.1").params,
          "lenet5's C5 is a linear layer on the flattened 16x5x5 maps: the same weights"),
    Claim("000", "LeNet C5", "multiplications (its \"FLOPs\")", "120*1*1*5*5*16 = 48000", 48_000,
          lambda c: c.lenet5.row("classifier.1").macs, "MACs"),
    Claim("000", "LeNet", "total parameters", "约6万(60790)个超参数", 60_790, lambda c: c.lenet.params,
          lambda c: f"its own network (padded C1, full C3, linear output) has {c.lenet.params:,}; LeCun's layout "
                    f"has {c.lenet1998_trainable:,} trainable (sparse C3, S2/S4 coefficients) and "
                    f"{c.lenet1998.params:,} with the RBF's 840 fixed weights. No layout gives 60,790 (60,796, the "
                    "paper's without S2/S4, less C1's 6 biases would); \"about 60 thousand\" is right",
          kind="arithmetic"),
    Claim("000", "AlexNet conv1", "output shape", "227-11+0/4+1=55 ... 55*55*96", (96, 55, 55),
          lambda c: c.alexnet.row("features.0").shape, "brackets lost in the text; (227-11)/4+1 = 55 is meant"),
    Claim("000", "AlexNet conv1", "parameters", "11x11x3x96+96=34848", 34_848,
          lambda c: c.alexnet.row("features.0").params,
          "11x11x3x96 alone is 34,848; adding the 96 biases gives 34,944", kind="arithmetic"),
    Claim("000", "AlexNet pool1", "output shape", "55-3+0/2+1=27 ... 27*27*96", (96, 27, 27),
          lambda c: c.alexnet.row("features.3").shape, ""),
    Claim("000", "AlexNet conv2", "output shape", "(27-5+2x2)/1+1=27 ... 27x27x256", (256, 27, 27),
          lambda c: c.alexnet.row("features.4").shape, ""),
    Claim("000", "AlexNet FC6", "input values", "6x6x256=9216", 9_216,
          lambda c: math.prod(c.alexnet.row("features.14").shape), ""),
    # document 001: AlexNet layer by layer
    Claim("001", "AlexNet conv1", "output side", "输入图像大小:277×277×3 ... (277-11)/4+1=55", 55,
          lambda c: c.alexnet_277.row("0").shape[1],
          lambda c: "(277-11)/4+1 = 67.5: a 277x277 input gives a {1}x{2} map. 277 is a typo for 227, the input of "
                    "the paper and of documents 000 and 004: (227-11)/4+1 = 55".format(*c.alexnet_277.row("0").shape),
          kind="typo"),
    Claim("001", "AlexNet conv2", "output shape", "(31-5)/1+1=27 ,即 27×27×256", (256, 27, 27),
          lambda c: c.alexnet.row("features.4").shape, ""),
    Claim("001", "AlexNet pool3", "output shape", "(13-3)/2+1=6 ,即 6×6×256", (256, 6, 6),
          lambda c: c.alexnet.row("features.14").shape, ""),
    # document 003: LeNet-5's layer table (LeCun et al. 1998)
    Claim("003", "C1", "parameters", "(5 × 5 + 1) × 6 = 156", 156, lambda c: c.lenet1998.row("0").params, ""),
    Claim("003", "C1", "connections", "(5 × 5 + 1) × 6 × 28 × 28 = 122304", 122_304,
          lambda c: c.connections(c.lenet1998, "0"),
          lambda c: f"connections = MACs ({c.lenet1998.row('0').macs:,}) + one bias input per output value (4,704)"),
    Claim("003", "S2", "output size (second line)", "输出图像尺寸:28 × 28", (28, 28),
          lambda c: c.lenet1998.row("2").shape[1:],
          "the line above it, 6 × 14 × 14, is right; 28 × 28 repeats S2's input", kind="typo"),
    Claim("003", "C3", "parameters", "6×(3×5×5+1)+6×(4×5×5+1)+3×(4×5×5+1)+1×(6×5×5+1) = 1516", 1_516,
          lambda c: c.under(c.lenet1998, "3", "params"),
          lambda c: "on the sparse table; cnnbench's lenet5 connects all 6 S2 maps to all 16 C3 maps: "
                    f"{c.lenet5.row('features.3').params:,}"),
    Claim("003", "C3", "connections", "10 × 10 × 1516 = 151600", 151_600, lambda c: c.connections(c.lenet1998, "3"),
          lambda c: f"MACs ({c.under(c.lenet1998, '3', 'macs'):,}) + 1,600 bias inputs"),
    Claim("003", "C5", "parameters", "120 × (16 × 5 × 5 + 1) = 48120", 48_120,
          lambda c: c.lenet1998.row("6").params, ""),
    Claim("003", "C5", "connections", "120 × (16 × 5 × 5 + 1) = 48120", 48_120,
          lambda c: c.connections(c.lenet1998, "6"), "a 1x1 output: one connection per parameter"),
    Claim("003", "F6", "parameters", "84 × (120 + 1) = 10164", 10_164, lambda c: c.lenet1998.row("9").params, ""),
    Claim("003", "output", "parameters", "84 × 10 = 840", 840, lambda c: c.lenet1998.row("11").params,
          lambda c: "the RBF centres; cnnbench's linear output layer adds 10 biases: "
                    f"{c.lenet5.row('classifier.5').params:,}"),
    # document 004: CS231n lecture 9
    Claim("004", "AlexNet conv1", "parameters", "parameters_num = filter_size*filter_number (11x11x3 x 96)", 34_848,
          lambda c: c.alexnet.row("features.0").params, "the formula leaves out one bias per filter: +96",
          kind="omission"),
    Claim("004", "AlexNet NORM1", "output shape", "[27x27x96] NORM1, after MAX POOL1", (96, 27, 27),
          lambda c: c.alexnet.row("features.2").shape,
          "an order, not a sum: the paper normalises conv1's output, then pools (so does alexnet_paper), giving "
          "96x55x55; the lecture pools first, as Caffe's CaffeNet does. The same for NORM2", kind="order"),
    Claim("004", "VGG16 conv1_1", "parameters", "(3x3x3)x64 = 1,728", 1_728,
          lambda c: c.vgg16.row("features.0").params,
          lambda c: "every params row of the table counts weights only (the products are right); the 13 conv "
                    f"and 3 FC layers also have one bias per output, {c.vgg16.params - c.vgg16_weights:,} in all",
          kind="omission"),
    Claim("004", "VGG16 conv1_1", "memory", "224x224x64=3.2M", "3.2M", lambda c: c.vgg16.row("features.0").activations,
          "values in the output; every memory row of the table agrees (below)"),
    Claim("004", "VGG16", "TOTAL params", "TOTAL params: 138M", "138M", lambda c: c.vgg16.params,
          lambda c: f"{c.vgg16.params:,} with biases; the table's weight-only rows add up to {c.vgg16_weights:,}"),
    Claim("004", "VGG16", "TOTAL memory (values)", "TOTAL memory: 24M * 4 bytes", "24M",
          lambda c: c.vgg16_listed_values,
          lambda c: f"the table's own rows add up to {c.vgg16_listed_values:,} values; torchvision's VGG16 adds a "
                    f"7x7 adaptive pool: {c.vgg16.activations:,}. Even a tensor of its own for every ReLU gives "
                    f"{c.vgg16_relu_values:,}, not 24M", kind="arithmetic"),
    Claim("004", "VGG16", "TOTAL memory (bytes)", "~= 96MB/image (only forward)", "96M",
          lambda c: c.vgg16_listed_values * 4,
          lambda c: f"{c.vgg16_listed_values:,} values x 4 bytes; 96MB follows from the 24M", kind="arithmetic"),
    Claim("004", "naive Inception (28x28x256 in)", "operations", "操作数量达到了854M", "854M",
          lambda c: c.naive_inception.macs, "multiply-accumulates of its 1x1/128, 3x3/192 and 5x5/96 convolutions"),
    Claim("004", "naive Inception (28x28x256 in)", "parameters", "单层的参数就达到854M个", "854M",
          lambda c: c.naive_inception.params,
          lambda c: f"854M counts operations; the module has {c.naive_inception.params:,} parameters", kind="wording"),
)


# ---- verdicts -----------------------------------------------------------------------------

_SUFFIX = {"K": 1e3, "M": 1e6, "G": 1e9}


def agrees(figure: Figure, counted: Figure) -> bool:
    """Exact for integers and shapes; for "3.2M", "800K", "138M" to the significant digits written
    (802,816 is "800K", 15,237,608 is not "24M")."""
    if isinstance(figure, str):
        m = re.fullmatch(r"(\d+)(?:\.(\d+))?([KMG])", figure)
        if not m:
            raise ValueError(f"cannot read figure {figure!r}")
        whole, frac, suffix = m.groups()
        digits = len(whole.lstrip("0") + (frac or "")) if frac else len(whole.strip("0")) or 1
        value = float(f"{whole}.{frac or 0}") * _SUFFIX[suffix]
        return math.isclose(float(f"{float(counted):.{digits}g}"), value, rel_tol=1e-9)
    if isinstance(figure, tuple):
        return tuple(counted) == figure
    return counted == figure


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    counted: Figure
    agrees: bool
    why: str

    @property
    def text(self) -> str:
        return "agrees" if self.agrees else f"off ({self.claim.kind or 'unexpected'})"


def check(counts: Counts | None = None) -> list[Verdict]:
    c = counts or Counts()
    out = []
    for claim in CLAIMS:
        counted = claim.count(c)
        why = claim.why(c) if callable(claim.why) else claim.why
        out.append(Verdict(claim, counted, agrees(claim.figure, counted), why))
    return out


# ---- document 004's tables beside ours ----------------------------------------------------

# (label, shape as written H x W x C, memory as written, params as written)
VGG16_TABLE = (
    ("INPUT", "224x224x3", "150K", 0), ("CONV3-64", "224x224x64", "3.2M", 1_728),
    ("CONV3-64", "224x224x64", "3.2M", 36_864), ("POOL2", "112x112x64", "800K", 0),
    ("CONV3-128", "112x112x128", "1.6M", 73_728), ("CONV3-128", "112x112x128", "1.6M", 147_456),
    ("POOL2", "56x56x128", "400K", 0), ("CONV3-256", "56x56x256", "800K", 294_912),
    ("CONV3-256", "56x56x256", "800K", 589_824), ("CONV3-256", "56x56x256", "800K", 589_824),
    ("POOL2", "28x28x256", "200K", 0), ("CONV3-512", "28x28x512", "400K", 1_179_648),
    ("CONV3-512", "28x28x512", "400K", 2_359_296), ("CONV3-512", "28x28x512", "400K", 2_359_296),
    ("POOL2", "14x14x512", "100K", 0), ("CONV3-512", "14x14x512", "100K", 2_359_296),
    ("CONV3-512", "14x14x512", "100K", 2_359_296), ("CONV3-512", "14x14x512", "100K", 2_359_296),
    ("POOL2", "7x7x512", "25K", 0), ("FC", "1x1x4096", "4096", 102_760_448),
    ("FC", "1x1x4096", "4096", 16_777_216), ("FC", "1x1x1000", "1000", 4_096_000),
)

# (label, document 004's shape, document 001's shape, our layer in alexnet_paper)
ALEXNET_TABLE = (
    ("INPUT", "227x227x3", "277×277×3", "input"), ("CONV1", "55x55x96", "55×55×96", "features.0"),
    ("NORM1", "27x27x96", "", "features.2"), ("MAX POOL1", "27x27x96", "27×27×96", "features.3"),
    ("CONV2", "27x27x256", "27×27×256", "features.4"), ("NORM2", "13x13x256", "", "features.6"),
    ("MAX POOL2", "13x13x256", "13×13×256", "features.7"), ("CONV3", "13x13x384", "13×13×384", "features.8"),
    ("CONV4", "13x13x384", "13×13×384", "features.10"), ("CONV5", "13x13x256", "13×13×256", "features.12"),
    ("MAX POOL3", "6x6x256", "6×6×256", "features.14"), ("FC6", "4096", "4096", "classifier.2"),
    ("FC7", "4096", "4096", "classifier.5"), ("FC8", "1000", "1000", "classifier.7"),
)


def hwc(text: str) -> tuple[int, ...]:
    """A shape as the documents write it (H x W x C, "1x1x4096" for a vector) in C x H x W."""
    dims = tuple(int(d) for d in re.split(r"[x×]", text))
    if len(dims) == 3 and dims[:2] == (1, 1):
        return (dims[2],)
    return (dims[2], dims[0], dims[1]) if len(dims) == 3 else dims


def _mem(written: str, values: int) -> bool:
    return agrees(written, values) if written[-1] in _SUFFIX else int(written) == values


def vgg16_rows(c: Counts) -> list[dict[str, Any]]:
    if len(c.vgg16_layers) != len(VGG16_TABLE):
        raise AssertionError("document 004's VGG16 table and torchvision's VGG16 no longer line up")
    rows = []
    for (label, shape, memory, params), (name, module) in zip(VGG16_TABLE, c.vgg16_layers):
        r = c.vgg16.row(name)
        weights = module.weight.numel() if module is not None and hasattr(module, "weight") else 0
        rows.append({"document 004": label, "layer": name, "shape": shape, "counted shape": r.shape_text,
                     "memory": memory, "counted memory": r.activations, "params (doc)": params,
                     "counted weights": weights, "counted params": r.params,
                     "shape ok": hwc(shape) == r.shape, "memory ok": _mem(memory, r.activations),
                     "weights ok": params == weights, "params ok": params == r.params})
    return rows


def alexnet_rows(c: Counts) -> list[dict[str, Any]]:
    rows = []
    for label, doc004, doc001, name in ALEXNET_TABLE:
        r = c.alexnet.row(name)
        rows.append({"layer": label, "ours": name, "document 004": doc004, "document 001": doc001,
                     "counted": r.shape_text, "004 ok": hwc(doc004) == r.shape,
                     "001 ok": (hwc(doc001) == r.shape) if doc001 else None})
    return rows


# ---- rendering ----------------------------------------------------------------------------

def _fig(x: Figure) -> str:
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    return f"{x:,}" if isinstance(x, int) else str(x)


def _md(rows: list[list[str]], head: list[str]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(esc(x) for x in row) + " |" for row in rows)]


def _ok(flag: bool | None) -> str:
    return "" if flag is None else ("yes" if flag else "**no**")


def render(verdicts: list[Verdict], counts: Counts, fmt: str = "markdown") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["document", "where", "quantity", "written", "figure", "counted", "verdict", "why"])
        for v in verdicts:
            cl = v.claim
            w.writerow([cl.doc, cl.where, cl.quantity, cl.written, _fig(cl.figure), _fig(v.counted), v.text, v.why])
        return buf.getvalue()
    off = [v for v in verdicts if not v.agrees]
    lines = [
        "# The documents' hand counts, counted",
        "",
        "Counted with `cnnbench.models.summary` (torch's `FlopCounterMode`, forward hooks, one image). MACs are "
        "multiply-accumulates (FLOPs / 2): the documents' \"FLOPs\" and \"operations\" count multiplications, "
        "i.e. MACs. Memory counts values (4 bytes each in fp32). Shapes are C x H x W.",
        "",
        f"{len(verdicts)} figures checked: {len(verdicts) - len(off)} agree, {len(off)} are off "
        f"({', '.join(sorted({v.claim.kind for v in off}))}).",
        "",
    ]
    lines += _md([[v.claim.doc, v.claim.where, v.claim.quantity, f"`{v.claim.written}`", _fig(v.claim.figure),
                   _fig(v.counted), v.text if v.agrees else f"**{v.text}**", v.why] for v in verdicts],
                 ["doc", "where", "quantity", "written", "figure", "counted", "verdict", "why"])
    lines += ["", "## Document 004's AlexNet (and document 001's) beside alexnet_paper", ""]
    lines += _md([[r["layer"], r["ours"], r["document 004"], _ok(r["004 ok"]), r["document 001"], _ok(r["001 ok"]),
                   r["counted"]] for r in alexnet_rows(counts)],
                 ["layer", "ours", "doc 004 (HxWxC)", "ok", "doc 001", "ok", "counted (CxHxW)"])
    v = vgg16_rows(counts)
    lines += ["", "## Document 004's VGG16 table beside torchvision's VGG16 (1000 classes, 3x224x224)", "",
              "The document's params are weights only; the counted params add one bias per output channel.", ""]
    lines += _md([[r["document 004"], r["layer"], r["shape"], r["counted shape"], _ok(r["shape ok"]), r["memory"],
                   f"{r['counted memory']:,}", _ok(r["memory ok"]), f"{r['params (doc)']:,}",
                   f"{r['counted weights']:,}", _ok(r["weights ok"]), f"{r['counted params']:,}"] for r in v],
                 ["doc 004", "ours", "shape", "counted", "ok", "memory", "counted", "ok", "params (doc)",
                  "weights", "ok", "weights + biases"])
    listed = counts.vgg16_listed_values
    lines += ["", f"Sums: document memory rows {si(listed)} values = {listed:,} ({si(listed * 4, 'B')} at 4 bytes; "
                  f"the document says 24M, 96MB); weights {counts.vgg16_weights:,}; weights + biases "
                  f"{counts.vgg16.params:,} (the document's 138M).", ""]
    return "\n".join(lines)


def input_shape(text: str | None) -> tuple[int, int, int] | None:
    """`--input CxHxW` as a shape (None when not given)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ConfigError(f"--input: expected CxHxW with positive sizes, such as 1x28x28 or 3x224x224; got {text!r}")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def summary_command(model: str | None = None, *, input: str | None = None, classes: int = 10, fmt: str = "table",
                    all_models: bool = False, documents: bool = False, results_dir: str | None = None) -> str:
    """`cnnbench summary`: the text to print, or (with `results_dir`) the files written,
    as a line. Options are checked first; bad ones raise ConfigError naming the option."""

    if model and all_models:
        raise ConfigError("summary: give a MODEL or --all, not both")
    if not (model or all_models or documents):
        raise ConfigError("summary: give a MODEL (one of " + ", ".join(list_models()) + "), --all or --documents")
    if model and model not in list_models():
        raise ConfigError(f"summary: unknown model {model!r}; known: {', '.join(list_models())}")
    if classes < 1:
        raise ConfigError(f"--classes: must be >= 1, got {classes}")
    shape = input_shape(input)

    summaries = []
    for name in list_models() if all_models else [model] if model else []:
        try:
            summaries.append(summary.summarize(name, shape, num_classes=classes))
        except (ValueError, RuntimeError) as err:
            if shape is None:
                raise  # the model's own input failing is a bug, not bad input
            raise ConfigError(f"summary: {name} cannot take input {input}: {' '.join(str(err).split())}") from None
    counts = None
    if documents:
        counts = Counts()
        verdicts = check(counts)

    if results_dir is None:
        parts = [summary.render_csv(summaries)] if fmt == "csv" and summaries else \
            [summary.render(s, fmt) for s in summaries]
        if counts is not None:
            parts.append(render(verdicts, counts, "csv" if fmt == "csv" else "markdown"))
        return "\n".join(parts)

    out = Path(results_dir) / "summary"
    fileio.check_writable(out)
    written = []
    for s in summaries:
        fileio.write_text(out / f"{s.model}.md", summary.render(s, "markdown"))
        written.append(out / f"{s.model}.md")
    if len(summaries) > 1:
        fileio.write_text(out / "models.csv", summary.costs_csv(summaries))
        written.append(out / "models.csv")
    if counts is not None:
        fileio.write_text(out / "documents.md", render(verdicts, counts, "markdown"))
        written.append(out / "documents.md")
    return "wrote " + ", ".join(map(str, written)) + "\n"
