"""Settings and specs are validated on load, with one-line errors naming file and field."""

import textwrap

import pytest

from cnnbench.config.spec import load_spec, parse_overrides, parse_value
from cnnbench.config.trial import TrialConfig
from cnnbench.errors import ConfigError

from conftest import REPO


def test_defaults_are_document_003():
    c = TrialConfig()
    assert (c.model, c.lr, c.momentum, c.batch_size, c.test_batch_size, c.epochs) == ("lenet5", 0.01, 0.9, 64, 1024, 10)


@pytest.mark.parametrize("values, message", [
    ({"lr": 0}, "lr: must be > 0"),
    ({"lr": -1.0}, "lr: must be > 0"),
    ({"batch_size": 0}, "batch_size: must be >= 1"),
    ({"epochs": 0}, "epochs: must be >= 1"),
    ({"momentum": -0.1}, "momentum: must be in [0, 1)"),
    ({"weight_decay": -1e-4}, "weight_decay: must be >= 0"),
    ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
    ({"batch_size": 64.5}, "batch_size: expected an integer"),
    ({"batch_size": True}, "batch_size: expected an integer"),
    ({"lr": True}, "lr: expected a number, got True"),
    ({"epochs": False}, "epochs: expected an integer, got False"),
    ({"seed": True}, "seed: expected an integer, got True"),
    ({"model": "lenet", "dropout": True}, "dropout: expected a number, got True"),
    ({"normalize": "yes"}, "normalize: expected true or false"),
    ({"model": "lenet7"}, "model: unknown value 'lenet7'; known: alexnet"),
    ({"dataset": "svhn"}, "dataset: unknown value 'svhn'"),
    ({"activation": "swish"}, "activation: unknown value 'swish'"),
    ({"optimizer": "rmsprop"}, "optimizer: unknown value 'rmsprop'; known: sgd, adam"),
    ({"schedule": "cosine"}, "schedule: unknown value 'cosine'"),
    ({"augment": "hflip,rotate"}, "augment: unknown value 'rotate'"),
    ({"device": "tpu"}, "device: unknown value 'tpu'"),
    ({"lrr": 0.1}, "unknown setting 'lrr' (did you mean 'lr'?)"),
    ({"model": "resnet18", "activation": "relu"}, "activation: model resnet18 has no activation setting"),
    ({"lr": None}, "lr: a value is required"),
])
def test_bad_settings_are_refused(values, message):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict(values, where="--set")
    text = str(err.value)
    assert text.startswith("--set: ") and message in text and "\n" not in text


def test_ints_are_accepted_for_floats_and_kept_as_floats():
    assert TrialConfig.from_dict({"lr": 1}).lr == 1.0 and isinstance(TrialConfig.from_dict({"lr": 1}).lr, float)


@pytest.mark.parametrize("text, value", [("0.01", 0.01), ("1e-3", 0.001), ("64", 64), ("true", True),
                                         ("null", None), ("relu", "relu"), ("hflip,grayscale", "hflip,grayscale")])
def test_set_values_are_typed(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_set_needs_key_equals_value():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])


def test_trial_key_ignores_runtime_settings_only():
    a = TrialConfig()
    assert a.key() == a.replace(device="cpu", log_every=7, progress=False).key()
    assert a.key() != a.replace(lr=0.02).key() != a.replace(seed=1).key()


def test_every_study_in_the_repo_loads():
    specs = sorted((REPO / "studies").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        assert spec.name and (spec.trial_configs() if spec.scientific else spec.search)


def test_lr_study_is_document_003():
    spec = load_spec(REPO / "studies" / "lr.yaml")
    assert spec.scientific == {"lr": (0.001, 0.005, 0.01, 0.05, 0.1)}
    c = spec.trial_configs()[2]
    assert (c.model, c.activation, c.batch_size, c.momentum, c.epochs, c.test_batch_size) == \
        ("lenet5", "sigmoid", 64, 0.9, 10, 1024)
    assert {r["lr"]: r["final_test_acc"] for r in spec.reported}[0.01] == 98.70


GOOD = """
name: demo
scientific: {lr: [0.01, 0.1]}
fixed: {epochs: 1}
seeds: [0, 1]
"""


@pytest.mark.parametrize("text, message", [
    ("name: demo\nscientific: {lr: [0.01\n", "malformed YAML at line"),
    ("- just\n- a list\n", "expected a mapping"),
    (GOOD + "colour: blue\n", "unknown key 'colour'"),
    (GOOD.replace("{lr:", "{lrr:"), "scientific.lrr: unknown setting (did you mean 'lr'?)"),
    (GOOD.replace("[0.01, 0.1]", "[0.01, -0.1]"), "lr: must be > 0"),
    (GOOD.replace("[0.01, 0.1]", "[]"), "scientific.lr: expected a non-empty list"),
    (GOOD.replace("[0.01, 0.1]", "[0.01, 0.01]"), "scientific.lr: values repeat"),
    (GOOD.replace("{epochs: 1}", "{epochs: 0}"), "epochs: must be >= 1"),
    (GOOD.replace("{epochs: 1}", "{epochs: one}"), "fixed: epochs: expected an integer"),
    (GOOD.replace("{epochs: 1}", "{lr: 0.5}"), "fixed.lr: also varied by the study"),
    (GOOD.replace("{epochs: 1}", "{model: lenet7}"), "model: unknown value 'lenet7'"),
    (GOOD.replace("[0, 1]", "[0, -1]"), "seeds: expected a non-empty list of integers >= 0"),
    (GOOD.replace("scientific: {lr: [0.01, 0.1]}", ""), "a study needs at least one scientific hyperparameter"),
    (GOOD + "reported: [{lr: 0.01, final_test_acc: 140}]\n", "expected a percentage in [0, 100]"),
    (GOOD + "search: {}\n", "search: expected a non-empty mapping"),
    (GOOD + "search: {lr: {type: float, low: 0.1, high: 0.01}}\n", "low must be < high"),
    (GOOD + "search: {lr: {type: float, low: 0, high: 0.1, log: true}}\n", "a log range needs low > 0"),
    (GOOD + "search: {lr: [0.1]}\nsweep: {sampler: annealing}\n", "sweep.sampler: unknown value 'annealing'"),
])
def test_bad_specs_are_refused_naming_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_overrides_change_fixed_settings_but_not_varied_ones(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    spec = load_spec(path).with_overrides({"epochs": 3, "train_subset": 100})
    assert {c.epochs for c in spec.trial_configs()} == {3} and len(spec.trial_configs()) == 4
    with pytest.raises(ConfigError, match="lr is varied by study demo"):
        load_spec(path).with_overrides({"lr": 0.5})
    with pytest.raises(ConfigError, match="--set: unknown setting 'epoch'"):
        load_spec(path).with_overrides({"epoch": 3})


SWEEP = """
name: sw
search: {lr: {type: float, low: 0.001, high: 0.1, log: true}, batch_size: {type: int, low: 32, high: 128}}
fixed: {epochs: 1, val_size: 100}
"""


@pytest.mark.parametrize("text, message", [
    # a study: YAML's true and false are ints to Python (bool subclasses int), no numbers to a spec
    (GOOD.replace("[0, 1]", "[true]"), "seeds: expected a non-empty list of integers >= 0, got [True]"),
    (GOOD.replace("[0, 1]", "[0, false]"), "seeds: expected a non-empty list of integers >= 0, got [0, False]"),
    (GOOD.replace("seeds: [0, 1]", "seeds: true"), "seeds: expected a non-empty list of integers >= 0, got True"),
    (GOOD.replace("[0.01, 0.1]", "[0.01, true]"), "scientific: lr: expected a number, got True"),
    (GOOD.replace("{epochs: 1}", "{epochs: false}"), "fixed: epochs: expected an integer, got False"),
    (GOOD.replace("{epochs: 1}", "{epochs: 1, momentum: true}"), "fixed: momentum: expected a number, got True"),
    (GOOD + "reported: [{lr: 0.01, final_test_acc: true}]\n", "expected a percentage in [0, 100], got True"),
    # a sweep's search space
    (SWEEP.replace("low: 0.001", "low: true"), "search.lr.low: expected a number, got True"),
    (SWEEP.replace("high: 0.1", "high: true"), "search.lr.high: expected a number, got True"),
    (SWEEP.replace("low: 0.001, high: 0.1, log: true", "low: 0.001, high: 0.1, step: true"),
     "search.lr.step: expected a number > 0 (and no log scale), got True"),
    (SWEEP.replace("high: 128}", "high: 128, step: true}"),
     "search.batch_size.step: expected an integer > 0 (and no log scale), got True"),
    (SWEEP.replace("high: 128}", "high: 128, step: 0.5}"),
     "search.batch_size.step: expected an integer > 0 (and no log scale), got 0.5"),
    (SWEEP.replace("{type: int, low: 32, high: 128}", "[32, true]"), "batch_size: expected an integer, got True"),
    # a sweep's settings
    (SWEEP + "sweep: {startup_trials: true}\n", "sweep.startup_trials: expected an integer >= 0, got True"),
    (SWEEP + "sweep: {n_trials: true}\n", "sweep.n_trials: expected an integer >= 1, got True"),
    (SWEEP + "sweep: {final_seeds: [true]}\n", "sweep.final_seeds: expected a non-empty list of integers >= 0, got [True]"),
    (SWEEP + "sweep: {final_seeds: [0, false]}\n", "sweep.final_seeds: expected a non-empty list of integers >= 0"),
])
def test_a_bool_is_refused_where_a_number_is_expected(tmp_path, text, message):
    path = tmp_path / "bool.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_the_sweep_spec_of_the_bool_cases_loads_as_it_is(tmp_path):
    path = tmp_path / "sw.yaml"
    path.write_text(SWEEP + "sweep: {startup_trials: 0, n_trials: 4, final_seeds: [0, 1]}\n")
    spec = load_spec(path)
    assert spec.sweep.startup_trials == 0 and spec.sweep.final_seeds == (0, 1) and len(spec.search) == 2
