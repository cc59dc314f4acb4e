"""The command line parses what its --help promises (options as data in cli.py)."""

from __future__ import annotations

import pytest

from cnnbench.cli import build_parser

CASES = [
    ("run --set lr=0.1 --set epochs=2 --experiment e --no-track --resume --data-dir d --tracking-uri u --state-dir s",
     dict(sets=["lr=0.1", "epochs=2"], experiment="e", no_track=True, resume=True, data_dir="d", tracking_uri="u",
          state_dir="s")),
    ("study x.yaml --seeds 0,1 --results-dir r --storage sqlite:///a.db --no-fuse --max-fuse 4 --workers 3 --no-final",
     dict(spec="x.yaml", seeds="0,1", results_dir="r", storage="sqlite:///a.db", fuse=False, max_fuse=4, workers=3,
          no_final=True)),
    ("study x.yaml", dict(fuse=None, workers=None, max_fuse=16, no_final=False, results_dir="results")),
    ("study x.yaml --fuse", dict(fuse=True)),
    ("sweep s.yaml --n-trials 5 --workers 2 --sampler-seed 3 --fuse-k 4 --no-final --print-storage",
     dict(n_trials=5, workers=2, sampler_seed=3, fuse_k=4, no_final=True, print_storage=True)),
    ("evaluate c.pt --device cpu --test-batch-size 7", dict(checkpoint="c.pt", device="cpu", test_batch_size=7)),
    ("bench --model lenet --batch-size 8 --steps 30 --repeats 2 --max-k 4 --options --lr-study --epochs 2 --sweep "
     "--fuse-k 2 --sweep-trials 3 --sweep-epochs 1 --sweep-train-subset 100 --engines --results-dir r",
     dict(model="lenet", batch_size=8, steps=30, repeats=2, max_k=4, options=True, lr_study=True, epochs=2,
          sweep=True, fuse_k=2, sweep_trials=3, sweep_epochs=1, sweep_train_subset=100, engines=True,
          results_dir="r")),
    ("summary vgg16 --input 3x224x224 --classes 1000 --format csv --all --documents --results-dir r",
     dict(model="vgg16", input="3x224x224", classes=1000, format="csv", all=True, documents=True, results_dir="r")),
    ("compare a b --labels x,y --name n --out o", dict(a="a", b="b", labels="x,y", name="n", out="o")),
    ("report lr batch --results-dir r --timeout 5", dict(names=["lr", "batch"], results_dir="r", timeout=5)),
    ("ui-screenshot --study lr --out a.png --charts b.png", dict(study="lr", out="a.png", charts="b.png")),
    ("gpu-check --out g --dry-run --budget 9.5 --parts tests --studies lr", dict(out="g", dry_run=True, budget=9.5,
                                                                               parts="tests", studies="lr")),
]


@pytest.mark.parametrize("line, expected", CASES)
def test_every_option_parses_as_documented(line, expected):
    args = vars(build_parser().parse_args(line.split()))
    assert {k: args[k] for k in expected} == expected


def test_every_option_has_help(capsys):
    parser = build_parser()
    for command in ("run", "study", "sweep", "models", "evaluate", "bench", "summary", "compare", "report",
                    "ui-screenshot", "gpu-check"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert text.startswith(f"usage: cnnbench {command}")
        options = [w for w in text.split() if w.startswith("--") and w[2:3].isalpha()]
        assert options, command
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "a", "b", "--name"])  # a value option wants its value
