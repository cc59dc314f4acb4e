"""What a user installing cnnbench gets: the extras named when one is missing, the
studies and notebooks found from a checkout and from an installed package, and a
pyproject.toml that lists every package and keeps the tested torch inside its range."""

from __future__ import annotations

import pytest

from cnnbench.errors import ConfigError, MissingExtra
from cnnbench.util import extras

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_require_names_the_extra_and_the_missing_module():
    extras.require("report", ["json", "os.path"], what="cnnbench report")  # all there: nothing said
    with pytest.raises(MissingExtra) as err:
        extras.require("report", ["json", "cnnbench_no_such_module", "no_such_parent.child"], what="cnnbench report")
    assert isinstance(err.value, ConfigError)  # the command maps it to exit status 2, one line
    assert str(err.value) == ("cnnbench report needs the report extra: pip install 'cnnbench[report]' "
                              "(no module cnnbench_no_such_module, no_such_parent.child)")


def test_a_command_without_its_extra_says_which_in_one_line(monkeypatch, tmp_path, capsys):
    from cnnbench.cli import EXIT_INPUT, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(extras.EXTRAS, "report", ("cnnbench_no_such_module",))
    assert main(["report"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cnnbench: error: cnnbench report needs the report extra: pip install 'cnnbench[report]' "
                   "(no module cnnbench_no_such_module)"]
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_postgresql_store_without_its_driver_names_the_postgres_extra(monkeypatch):
    from cnnbench.run import storage
    from cnnbench.track import stores

    monkeypatch.setitem(stores.PG_DRIVERS, "psycopg", "cnnbench_no_such_driver")
    url = "postgresql://user:secret@127.0.0.1:1/db"  # never reached: the driver is asked for first
    for check in (stores.require_driver, storage.check, lambda u: stores.StoreLock(u, "x")):
        with pytest.raises(MissingExtra) as err:
            check(url)
        text = str(err.value)
        assert "needs the postgres extra: pip install 'cnnbench[postgres]'" in text
        assert "secret" not in text and "user:***@" in text
    stores.require_driver("postgresql+psycopg2://u@h/db")  # psycopg2 is here
    stores.require_driver("sqlite:///x.db")


def test_studies_and_notebooks_are_found_in_the_checkout():
    from cnnbench.tools import gpu_studies, notebooks, resources

    assert resources.checkout() == REPO
    assert resources.path("studies", "lr") == REPO / "studies" / "lr.yaml"
    assert resources.path("notebooks", "analysis.ipynb") == REPO / "notebooks" / "analysis.ipynb"
    assert resources.names("studies") == sorted(p.stem for p in (REPO / "studies").glob("*.yaml"))
    assert resources.names("notebooks") == ["analysis", "models", "sweep"]
    # where the commands look (tools/ is one folder deeper than the package root)
    assert gpu_studies.studies_dir() == REPO / "studies"
    assert notebooks.NOTEBOOK_DIR == REPO / "notebooks" and notebooks.PACKAGE_ROOT == REPO
    with pytest.raises(ValueError, match="unknown kind of resource 'models'"):
        resources.folder("models")


def test_an_installed_package_finds_its_own_copies(monkeypatch, tmp_path):
    """Without a checkout, the package data: cnnbench/resources/<kind>/ (pyproject maps
    the top-level folders there in a wheel)."""
    from cnnbench.tools import resources

    fake = tmp_path / "site" / "cnnbench"
    (fake / "resources" / "studies").mkdir(parents=True)
    (fake / "resources" / "studies" / "lr.yaml").write_text("name: lr\n")
    monkeypatch.setattr(resources, "checkout", lambda: None)
    monkeypatch.setattr("importlib.resources.files", lambda package: fake)
    assert resources.folder("studies") == fake / "resources" / "studies"
    assert resources.path("studies", "lr") == fake / "resources" / "studies" / "lr.yaml"
    assert resources.names("studies") == ["lr"]
    monkeypatch.chdir(tmp_path)
    assert resources.spec_file("lr") == resources.spec_file("studies/lr.yaml") == fake / "resources" / "studies" / "lr.yaml"
    assert str(resources.spec_file("studies/nosuch.yaml")) == "studies/nosuch.yaml"  # the loader says it is missing
    (tmp_path / "lr.yaml").write_text("name: mine\n")
    assert resources.spec_file("lr.yaml").resolve() == tmp_path / "lr.yaml"  # a file given wins


def test_pyproject_lists_every_package_and_maps_the_resources():
    setup = PYPROJECT["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "cnnbench").rglob("*.py")
               if "__pycache__" not in p.parts}
    listed = set(setup["packages"])
    assert listed - {"cnnbench.resources.studies", "cnnbench.resources.notebooks"} == folders
    for package, folder in setup["package-dir"].items():
        assert package in listed and (REPO / folder).is_dir()
    assert setup["package-data"] == {"cnnbench.resources.studies": ["*.yaml"],
                                     "cnnbench.resources.notebooks": ["*.ipynb"]}
    assert setup["dynamic"]["version"] == {"attr": "cnnbench.__version__"}
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]


def test_the_extras_and_the_tested_torch():
    from packaging.requirements import Requirement

    project = PYPROJECT["project"]
    optional = project["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(optional)
    # `make install` (the dev extra) brings every extra: the tests of each part run in CI
    (everything,) = [r for r in optional["dev"] if r.startswith("cnnbench[")]
    assert set(Requirement(everything).extras) == set(extras.EXTRAS) == {"report", "ui", "postgres", "ray", "slurm"}
    core = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    assert not {"papermill", "playwright", "psycopg", "psycopg2-binary", "optuna-dashboard", "ray",
                "submitit"} & set(core)
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")
    for version in (pins["torch"], "2.11.0"):
        assert version in core["torch"].specifier
    for version in (pins["torchvision"], "0.26.0"):
        assert version in core["torchvision"].specifier
    for name in ("grimp", "import-linter", "pytest-xdist", "execnet", "kubernetes-validate", "ray", "submitit"):
        assert name in pins  # the dev extra's test tools and the cluster engines are pinned like the rest



def test_a_shipped_study_is_loaded_by_name_from_any_folder(monkeypatch, tmp_path):
    from cnnbench import api

    monkeypatch.chdir(tmp_path)  # no studies/ here: the shipped ones
    for name in ("lr", "studies/lr.yaml"):
        spec = api.load_spec(name, overrides={"epochs": 1})
        assert spec.name == "lr" and spec.path == str(REPO / "studies" / "lr.yaml")
    with pytest.raises(ConfigError, match="studies/missing.yaml: no such spec file"):
        api.load_spec("studies/missing.yaml")
