"""The documents' hand counts beside `cnnbench.models.summary`'s counts: where their arithmetic holds.

The claims are data (`summary_claims.CLAIMS`: the document, the layer, the quantity, its
words, its figure, how we count the same thing and, when off, what kind of slip it is);
every counted figure comes from `summarize` on a module (`summary_layouts.Counts`: a
registered model, or one of two reference layouts the registry lacks). A claim "agrees"
when the counted figure equals the document's (to the precision written, for "3.2M").
`kind` says what the document got wrong when it does not: the tests check that exactly the
claims with a kind disagree, so a change in a count cannot silently flip a verdict.

`cnnbench summary --documents` prints the report; `make summary` writes it to
results/summary/documents.md.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnbench.errors import ConfigError
from cnnbench.models import is_import_path, list_models, summary
from cnnbench.models.summary import si
from cnnbench.tools.summary_claims import ALEXNET_TABLE, CLAIMS, VGG16_TABLE, Claim, Figure
from cnnbench.tools.summary_layouts import Counts
from cnnbench.util import fileio


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
    if model and not is_import_path(model) and model not in list_models():
        raise ConfigError(f"summary: unknown model {model!r}; known: {', '.join(list_models())}")
    if classes < 1:
        raise ConfigError(f"--classes: must be >= 1, got {classes}")
    shape = input_shape(input)

    summaries = []
    for name in list_models() if all_models else [model] if model else []:
        try:
            summaries.append(summary.summarize(name, shape, num_classes=classes))
        except (ValueError, RuntimeError) as err:
            if shape is None and not is_import_path(name):
                raise  # the model's own input failing is a bug, not bad input (a user's network's: bad input)
            shown = input or "1x28x28 (give another with --input CxHxW)"
            raise ConfigError(f"summary: {name} cannot take input {shown}: {' '.join(str(err).split())}") from None
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
