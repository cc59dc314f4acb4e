"""Per-layer output shapes, parameters, multiply-accumulates and activation memory of a model.

`summarize("vgg16", (3, 224, 224), num_classes=1000)` runs one forward pass of one image
and returns a `Summary`: one `LayerRow` per call of a leaf module (in execution order,
after an `input` row), then totals, in the manner of document 004's VGG16 table.

How each column is counted:
- output: the module's output shape without the batch dimension (C x H x W, or features);
- params: the module's own parameters (not its children's), each counted once;
- MACs: multiply-accumulates = FLOPs / 2, where FLOPs are counted by torch's own
  `torch.utils.flop_counter.FlopCounterMode`. That counter counts convolutions and matrix
  products (2 FLOPs per multiply-add, bias additions not counted); pooling, activations,
  normalisation and additions count 0, as in the documents' hand counts;
- activations: values in the output that are new memory. An output that aliases a tensor
  already counted (an in-place ReLU, a Flatten view, Dropout in eval mode) counts 0, so the
  total is the forward activation memory of one image, input included (document 004's
  "TOTAL memory ... (only forward)").
Work done by a container's own forward code (a resize, a functional pool or conv feeding a
child, torch.cat in an Inception block) gets a row named after the container, noted "own
ops", with the FLOPs and the new tensors it made; an intermediate tensor that reaches
neither a child module nor the container's output is not seen.

Registered models are built on the meta device: shapes and counts without allocating
or computing anything, so VGG16 at 224 x 224 takes milliseconds. Knows nothing of training.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cnnbench.models import get_model, model_entry, model_identity
from cnnbench.models.meta import on_meta
from cnnbench.models.tv import ResizeInput

MNIST_INPUT = (1, 28, 28)  # what get_model builds for by default (in_channels=1, image_size=28)


@dataclass(frozen=True)
class LayerRow:
    name: str  # path from named_modules(); "input" for the input, "(model)" for the root
    type: str  # class name of the module
    shape: tuple[int, ...]  # output shape without the batch dimension; () when not called
    params: int  # own parameters, counted at the module's first call only
    flops: int  # counted by FlopCounterMode for this call, children excluded
    activations: int  # values in the output that are new memory (0 when it aliases its input)
    activation_bytes: int  # the same in bytes (4 per value in fp32)
    note: str = ""  # "aliases input" (no new memory), "own ops", "not called", "call 2"

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape)) if self.shape else "-"


@dataclass(frozen=True)
class Summary:
    model: str  # registry name, or the module's class name
    input_shape: tuple[int, ...]  # C x H x W of the input summarized (batch 1)
    num_classes: int | None  # None when a module was passed in
    source: str  # the registry's source line, or ""
    rows: list[LayerRow] = field(repr=False)
    param_bytes: int = 0  # all parameters' storage (4 bytes each in fp32)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def activations(self) -> int:
        return sum(r.activations for r in self.rows)

    @property
    def activation_bytes(self) -> int:
        return sum(r.activation_bytes for r in self.rows)

    def row(self, name: str) -> LayerRow:
        """The first row of the module at `name` (e.g. "features.0")."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"{self.model} has no layer {name!r}")

    def cost(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "activation_bytes": self.activation_bytes,
                "param_bytes": self.param_bytes}

    def frame(self):
        """The rows as a pandas DataFrame (one row per layer, counts as integers)."""
        return pd.DataFrame([{"model": self.model, **_flat(r)} for r in self.rows])


def summarize(model: str | nn.Module, input_shape: Iterable[int] | None = None, *,
              num_classes: int = 10) -> Summary:
    """Summarize a registered model by name, or a module, for one image of `input_shape`.

    For a name, `input_shape` defaults to the model's natural input: the native size of
    the ImageNet architectures (which cnnbench wraps in `ResizeInput`), else 1 x 28 x 28.
    At its native size a wrapper is a no-op and is left out, so the rows carry the
    published names and shapes (alexnet_paper conv1 -> 96 x 55 x 55). At any other size
    the wrapper stays and its resize appears as a row of its own.
    A module is summarized as it is (on its own device); `input_shape` is then required.
    """
    if isinstance(model, str):
        module, shape, source = _build(model, input_shape, num_classes)
        name, classes = model, num_classes
    else:
        if input_shape is None:
            raise ValueError("summarize(module) needs input_shape")
        module, shape, source, name, classes = model, tuple(input_shape), "", type(model).__name__, None
    rows = _trace(module, shape)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return Summary(name, shape, classes, source, rows, param_bytes)


def model_cost(name: str, input_shape: Iterable[int] | None = None, *, num_classes: int = 10) -> dict[str, int]:
    """{"params", "macs", "activation_bytes", "param_bytes"} of one image through a registered model."""
    return summarize(name, input_shape, num_classes=num_classes).cost()


def natural_input(name: str) -> tuple[int, int, int]:
    """The input a registered model is summarized at when none is given (a user's: MNIST's)."""
    if model_identity(name) is not None:
        return MNIST_INPUT
    with on_meta():
        probe = get_model(name)
    return (probe.channels, probe.size, probe.size) if isinstance(probe, ResizeInput) else MNIST_INPUT


def _build(name: str, input_shape: Iterable[int] | None, num_classes: int) -> tuple[nn.Module, tuple[int, ...], str]:

    source = model_entry(name).source  # KeyError listing the known names
    shape = tuple(input_shape) if input_shape is not None else natural_input(name)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input shape must be C x H x W with positive sizes, got {shape}")
    c, h, w = shape
    if h != w:
        raise ValueError(f"registered models take square images; got {h} x {w}")
    # shapes and counts only: nothing is allocated or computed (a user's network may compute
    # with real values while it is built or run: on the CPU)
    with on_meta() if model_identity(name) is None else torch.device("cpu"):
        module = get_model(name, in_channels=c, image_size=h, num_classes=num_classes)
    if isinstance(module, ResizeInput) and shape == (module.channels, module.size, module.size):
        module = module.net  # the wrapper would pass the input through unchanged
    return module, shape, source


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _trace(module: nn.Module, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """Run one image through `module` with hooks on every submodule and collect the rows."""
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    return _Tracer(module).run(torch.zeros(1, *input_shape, device=device, dtype=dtype))


class _Tracer:
    """One traced forward pass: a row per leaf call and per container doing work of its own
    (a resize, a functional conv or pool), with the FLOPs each did itself, the activation
    memory it newly wrote and the parameters it owns (each counted once)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.names = {m: (n or "(model)") for n, m in module.named_modules()}
        self.memory = _Memory()
        self.counted_params: set[int] = set()
        self.calls: dict[nn.Module, int] = {}
        self.stack: list[list[Any]] = []  # per open call: [module, FLOPs at entry, children's FLOPs, own FLOPs shown]
        self.rows: list[LayerRow] = []
        self.counter = FlopCounterMode(display=False)

    def run(self, x: Tensor) -> list[LayerRow]:
        self.rows.append(_row("input", "-", x, self.memory.new(x), params=0, flops=0, notes=[]))
        handles = []
        for m in self.names:
            handles.append(m.register_forward_pre_hook(self.pre))
            handles.append(m.register_forward_hook(self.post))
        modes = {m: m.training for m in self.names}
        self.module.eval()  # eval: dropout passes its input through, batch norm uses running statistics
        try:
            with torch.no_grad(), self.counter:
                self.module(x)
        finally:
            for h in handles:
                h.remove()
            for m, training in modes.items():
                m.training = training
        for m, name in self.names.items():  # parameters of modules the forward pass never called
            n = self.own_params(m)
            if n:
                self.rows.append(LayerRow(name, type(m).__name__, (), n, 0, 0, 0, "not called"))
        return self.rows

    def own_params(self, m: nn.Module) -> int:
        n = 0
        for p in m.parameters(recurse=False):
            if id(p) not in self.counted_params:
                self.counted_params.add(id(p))
                n += p.numel()
        return n

    def own_flops(self, entry: list[Any]) -> int:
        """FLOPs of an open call's own code since it last looked (children's excluded)."""
        done = self.counter.get_total_flops() - entry[1] - entry[2] - entry[3]
        entry[3] += done
        return done

    def pre(self, m: nn.Module, args: Any) -> None:
        if self.stack:  # work the caller did itself before this call: a resize, a functional conv or pool
            entry = self.stack[-1]
            caller, flops = entry[0], self.own_flops(entry)
            new = sum(self.memory.new(t) for t in _tensors(args))  # an input no module has output yet
            if flops or new:
                self.rows.append(_row(self.names[caller], type(caller).__name__, args, new,
                                      params=self.own_params(caller), flops=flops, notes=["own ops"]))
        self.stack.append([m, self.counter.get_total_flops(), 0, 0])

    def post(self, m: nn.Module, args: Any, out: Any) -> None:
        entry = self.stack.pop()
        flops = self.own_flops(entry)
        if self.stack:
            self.stack[-1][2] += entry[2] + entry[3]  # everything this call did is a child's work to its caller
        self.calls[m] = self.calls.get(m, 0) + 1
        notes = [f"call {self.calls[m]}"] if self.calls[m] > 1 else []
        new = sum(self.memory.new(t) for t in _tensors(out))
        row = _row(self.names[m], type(m).__name__, out, new, params=self.own_params(m), flops=flops, notes=notes)
        if next(m.children(), None) is None:  # a leaf: always a row
            self.rows.append(_replace(row, note=", ".join(notes + ([] if new else ["aliases input"]))))
        elif row.flops or row.activations or row.params:  # a container doing work of its own
            self.rows.append(_replace(row, note=", ".join(notes + ["own ops"])))


class _Memory:
    """Which storages have been counted: a view or an in-place result adds nothing."""
    def __init__(self) -> None:
        self._seen: dict[int, Any] = {}  # id -> storage; holding them keeps the ids unique

    def new(self, t: Tensor) -> int:
        """Bytes of `t`'s storage if not counted yet (then counted), else 0."""
        storage = t.untyped_storage()  # views share one Python storage object
        if id(storage) in self._seen:
            return 0
        self._seen[id(storage)] = storage
        return storage.nbytes()  # a 3-channel expand of a 1-channel image is one channel of memory


def _row(name: str, type_: str, out: Any, new_bytes: int, *, params: int, flops: int, notes: list[str]) -> LayerRow:
    tensors = _tensors(out)
    size = tensors[0].element_size() if tensors else 4
    shape = tuple(tensors[0].shape[1:]) if len(tensors) == 1 else ()
    return LayerRow(name, type_, shape, params, flops, new_bytes // size, new_bytes, ", ".join(notes))


def _replace(row: LayerRow, **changes: Any) -> LayerRow:
    return LayerRow(**{**asdict(row), **changes})


def _flat(row: LayerRow) -> dict[str, Any]:
    return {"layer": row.name, "type": row.type, "output": row.shape_text, "params": row.params,
            "macs": row.macs, "flops": row.flops, "activations": row.activations,
            "activation_bytes": row.activation_bytes, "note": row.note}


# ---- rendering ---------------------------------------------------------------------------

COLUMNS = ("layer", "type", "output", "params", "MACs", "activations", "note")


def _cells(row: LayerRow) -> list[str]:
    return [row.name, row.type, row.shape_text, f"{row.params:,}", f"{row.macs:,}", f"{row.activations:,}",
            row.note]


def si(n: float, unit: str = "") -> str:
    """1234567 -> "1.23 M": decimal prefixes, as document 004 writes 3.2M and 96MB."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def header(s: Summary) -> str:
    classes = f", {s.num_classes} classes" if s.num_classes is not None else ""
    source = f" ({s.source})" if s.source else ""
    return f"{s.model}{source}: input {'x'.join(map(str, s.input_shape))}, batch 1{classes}, eval mode"


def totals(s: Summary) -> list[str]:
    per_value = s.activation_bytes // s.activations if s.activations else 4
    return [
        f"TOTAL params: {s.params:,} ({si(s.params)}; {si(s.param_bytes, 'B')} of parameters)",
        f"TOTAL MACs: {s.macs:,} ({si(s.macs)}; FLOPs = 2 x MACs = {si(s.flops)}, counted by "
        "torch.utils.flop_counter: convolutions and matrix products)",
        f"TOTAL memory: {s.activations:,} values x {per_value} bytes = {si(s.activation_bytes, 'B')} / image "
        "(forward only: every new layer output, input included)",
    ]


def render_csv(summaries: list[Summary]) -> str:
    """Every row of every summary, one CSV (integers unformatted, a model column first)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["model", *_flat(summaries[0].rows[0])], lineterminator="\n")
    writer.writeheader()
    writer.writerows({"model": s.model, **_flat(r)} for s in summaries for r in s.rows)
    return buf.getvalue()


def costs_csv(summaries: list[Summary]) -> str:
    """One line per model: its input and totals (for studies and notebooks comparing models)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "input", "classes", "params", "macs", "flops", "activations", "activation_bytes",
                     "param_bytes"])
    for s in summaries:
        writer.writerow([s.model, "x".join(map(str, s.input_shape)), s.num_classes, s.params, s.macs, s.flops,
                         s.activations, s.activation_bytes, s.param_bytes])
    return buf.getvalue()


def render(s: Summary, fmt: str = "table") -> str:
    """The summary as "table" (aligned text), "markdown" or "csv" (integers unformatted)."""
    if fmt == "csv":
        return render_csv([s])
    cells = [_cells(r) for r in s.rows]
    if fmt == "markdown":
        lines = [f"**{header(s)}**", "", "| " + " | ".join(COLUMNS) + " |",
                 "|" + "|".join("---:" if c in ("params", "MACs", "activations") else "---" for c in COLUMNS) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines + [""] + [f"- {t}" for t in totals(s)]) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; known: table, markdown, csv")
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    right = {3, 4, 5}

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([header(s), line(list(COLUMNS)), *map(line, cells), *totals(s)]) + "\n"
