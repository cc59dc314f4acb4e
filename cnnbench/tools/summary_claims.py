"""The documents' hand counts, as data: each `Claim` is the document, the layer, the
quantity, the document's own words, the figure it arrives at, how we count the same thing
(a function of `summary_layouts.Counts`), and (when they differ) what kind of slip it is
and why; then document 004's AlexNet and VGG16 tables as it prints them.
`summary_documents` checks and renders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from cnnbench.tools.summary_layouts import Counts

Figure = int | str | tuple  # exact count | "3.2M" as written | shape (C, H, W) or (H, W)


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
