"""`cnnbench summary`: per-layer counts against the documents' hand calculations, and the command."""

import csv
import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import cli
from cnnbench.tools import summary_documents as sd
from cnnbench.tools.summary_layouts import Counts
from cnnbench.cli import main
from cnnbench.models import get_model, list_models
from cnnbench.models.summary import model_cost, natural_input, render, summarize


# ---- the documents' figures ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet5", "lenet"])
def test_lenet_c1_and_c5_as_documents_000_and_003_count_them(name):
    s = summarize(name, (1, 28, 28))
    c1, c5 = s.row("features.0"), s.row("classifier.1")
    assert (c1.shape, c1.params, c1.macs) == ((6, 28, 28), 156, 117_600)
    assert c1.flops == 2 * 117_600  # torch counts a multiply-add as two FLOPs
    assert (c5.shape, c5.params, c5.macs) == ((120,), 48_120, 48_000)
    assert s.params == 61_706


def test_alexnet_paper_conv1_is_96x55x55_with_34944_parameters():
    s = summarize("alexnet_paper", num_classes=1000)
    assert s.input_shape == (3, 227, 227)
    conv1 = s.row("features.0")
    assert conv1.shape == (96, 55, 55)
    assert conv1.params == 11 * 11 * 3 * 96 + 96 == 34_944
    assert s.row("features.14").shape == (256, 6, 6)
    assert s.params == 62_378_344


def test_vgg16_matches_document_004_table_with_biases_noted():
    s = summarize("vgg16", (3, 224, 224), num_classes=1000)
    assert s.params == 138_357_544  # "TOTAL params: 138M"
    rows = sd.vgg16_rows(Counts())
    assert len(rows) == 22
    for r in rows:
        assert r["shape ok"] and r["memory ok"], r
        assert r["counted weights"] == r["params (doc)"], r  # the table counts weights
        bias = 0 if r["params (doc)"] == 0 else int(r["counted shape"].split("x")[0])
        assert r["counted params"] == r["params (doc)"] + bias, r  # one bias per output channel
    # forward memory: the listed outputs plus torchvision's 7x7 adaptive pool; in-place ReLUs add nothing
    assert s.activations == 15_237_608 + 25_088
    assert all(r.activations == 0 for r in s.rows if r.type == "ReLU")
    assert s.activation_bytes == 4 * s.activations
    assert s.param_bytes == 4 * 138_357_544


def test_document_000_lenet_total_and_alexnet_conv1_sum_are_off():
    verdicts = {(v.claim.doc, v.claim.where, v.claim.quantity): v for v in sd.check()}
    total = verdicts["000", "LeNet", "total parameters"]
    assert (total.claim.figure, total.counted, total.agrees) == (60_790, 61_706, False)
    conv1 = verdicts["000", "AlexNet conv1", "parameters"]
    assert (conv1.counted, conv1.agrees) == (34_944, False)
    memory = verdicts["004", "VGG16", "TOTAL memory (values)"]
    assert (memory.counted, memory.agrees) == (15_237_608, False)
    assert verdicts["004", "VGG16", "TOTAL params"].agrees
    assert verdicts["001", "AlexNet conv1", "output side"].counted == 67  # (277-11)/4+1 = 67.5


def test_every_claim_is_off_exactly_when_the_data_says_why():
    for v in sd.check():
        assert v.agrees == (v.claim.kind == ""), f"{v.claim.doc} {v.claim.where} {v.claim.quantity}: {v.counted}"


def test_lecun_1998_layout_counts():
    s = Counts().lenet1998
    assert s.row("3").type == "SparseC3" and Counts().under(s, "3", "params") == 1_516
    assert s.params == 156 + 12 + 1_516 + 32 + 48_120 + 10_164 + 840 == 60_840
    assert Counts().lenet1998_trainable == 60_000  # the paper's "60,000 trainable parameters"


@pytest.mark.parametrize("figure, value, expected", [
    ("800K", 802_816, True), ("3.2M", 3_211_264, True), ("150K", 150_528, True), ("138M", 138_357_544, True),
    ("24M", 15_237_608, False), ("3.2M", 3_300_000, False), ("854M", 1_089_952, False),
])
def test_figures_agree_to_the_digits_written(figure, value, expected):
    assert sd.agrees(figure, value) is expected


# ---- every model, from the registry -------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("at", ["natural", "mnist"])
def test_every_model_summarizes_and_totals_add_up(name, at):
    shape = natural_input(name) if at == "natural" else (1, 28, 28)
    s = summarize(name, shape)
    with torch.device("meta"):
        model = get_model(name, in_channels=shape[0], image_size=shape[1])
    assert s.params == sum(r.params for r in s.rows) == sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape, device="meta"))
    assert s.flops == sum(r.flops for r in s.rows) == counter.get_total_flops()  # no FLOP lost or counted twice
    assert s.rows[0].name == "input" and s.rows[-1].shape == (10,)
    assert s.activations >= sum(r.activations for r in s.rows if r.type in ("Conv2d", "Linear")) > 0
    assert len(render(s).splitlines()) == len(s.rows) + 5


def test_resized_models_show_the_resize_as_a_row_of_their_own():
    s = summarize("vgg16", (1, 28, 28))
    resize = s.rows[1]
    assert (resize.name, resize.type, resize.note) == ("(model)", "ResizeInput", "own ops")
    assert resize.activations == 224 * 224  # one grey channel; the 3 channels are a view of it
    assert s.row("net.features.0").shape == (64, 224, 224)
    assert natural_input("vgg16") == (3, 224, 224) and natural_input("lenet5") == (1, 28, 28)


def test_model_cost_for_other_code():
    cost = model_cost("lenet5", (1, 28, 28))
    assert cost == {"params": 61_706, "macs": 416_520, "activation_bytes": 4 * 10_538, "param_bytes": 4 * 61_706}


# ---- modules that do work outside their leaves --------------------------------------------

class _Odd(nn.Module):
    """A functional conv and a cat in a container, a module called twice, one never called."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6 * 2, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        y = self.act(F.conv2d(x, self.w))  # 4 x 6 x 6, made by this module's own code
        z = self.act(y)  # a second call of the same ReLU
        return self.fc(torch.cat([y, z], 1).flatten(1))


def test_own_ops_second_calls_and_unused_modules_are_accounted_for():
    model = _Odd()
    model.train()
    s = summarize(model, (1, 8, 8))
    by_note = {r.note: r for r in s.rows}
    own = [r for r in s.rows if r.note == "own ops"]
    assert [r.shape for r in own] == [(4, 6, 6), (288,)]  # the conv output, the cat (flatten is a view)
    assert own[0].activations == 144 and own[1].activations == 288
    assert own[0].params == 36 and own[0].flops == 2 * 36 * 36  # F.conv2d: 36 weights x 36 outputs
    assert own[1].params == own[1].flops == 0
    assert by_note["call 2"].params == 0 and by_note["call 2"].shape == (4, 6, 6)
    assert by_note["not called"].params == 6
    assert s.params == sum(p.numel() for p in model.parameters())
    assert model.training and not model._forward_hooks and not model.act._forward_pre_hooks  # left as found
    assert s.rows[0].activations == 64  # the input, on the CPU like the module


# ---- the command --------------------------------------------------------------------------

def test_cli_prints_lenet5_c1_row(tmp_path):
    proc = cli("summary", "lenet5", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^features\.0\s+Conv2d\s+6x28x28\s+156\s+117,600\s+4,704$", proc.stdout, re.M), proc.stdout
    assert "TOTAL params: 61,706" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["summary", "nosuchmodel"], "unknown model 'nosuchmodel'; known: alexnet, alexnet_paper"),
    (["summary", "lenet5", "--input", "1x28"], "--input: expected CxHxW"),
    (["summary", "lenet5", "--input", "0x28x28"], "--input: expected CxHxW"),
    (["summary", "lenet5", "--input", "1x4x4"], "lenet5 cannot take input 1x4x4"),
    (["summary", "lenet5", "--input", "1x28x32"], "square"),
    (["summary"], "give a MODEL"),
    (["summary", "lenet5", "--classes", "0"], "--classes"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_csv_and_markdown(capsys):
    assert main(["summary", "vgg16", "--classes", "1000", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sum(int(r["params"]) for r in rows) == 138_357_544
    assert rows[1]["layer"] == "features.0" and rows[1]["output"] == "64x224x224"
    assert main(["summary", "alexnet_paper", "--format", "markdown"]) == 0
    assert "| features.0 | Conv2d | 96x55x55 | 34,944 |" in capsys.readouterr().out


def test_cli_writes_every_table_and_the_documents_check(tmp_path, capsys):
    assert main(["summary", "--all", "--documents", "--results-dir", str(tmp_path)]) == 0
    out = tmp_path / "summary"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{m}.md" for m in list_models()] + ["models.csv",
                                                                                                "documents.md"])
    costs = {r["model"]: r for r in csv.DictReader((out / "models.csv").open())}
    assert int(costs["lenet5"]["macs"]) == 416_520 and costs["vgg16"]["input"] == "3x224x224"
    doc = (out / "documents.md").read_text()
    assert "| 000 | AlexNet conv1 | parameters | `11x11x3x96+96=34848` | 34,848 | 34,944 | **off (arithmetic)**" in doc
