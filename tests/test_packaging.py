"""Packaging: the layer and the toolkit import with torch alone; one version source."""

import pathlib
import re
import subprocess
import sys

import bnlab

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_imports_without_the_study_dependencies():
    blocked = ["matplotlib", "sklearn", "mnist1d", "jinja2"]
    code = ("import sys\n"
            f"for name in {blocked!r}:\n"
            "    sys.modules[name] = None   # any import of it raises ImportError\n"
            "import bnlab, bnlab.nn, bnlab.functional, bnlab.nn.variants, bnlab.tools.fold, bnlab.tools.doctor, bnlab.protocol\n"
            "import bnlab.tools.recalibrate, bnlab.tools.accumulate, bnlab.tools.amp, bnlab.nn.sync, bnlab.nn.fused, bnlab.models\n"
            f"assert not any(sys.modules.get(n) for n in {blocked!r})\n")
    env = {"PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr


def test_one_version_source():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.M)   # no literal version here
    assert re.fullmatch(r"\d+\.\d+\.\d+", bnlab.__version__)
    assert re.search(r'^license = "MIT"', pyproject, re.M)
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "src" / "bnlab" / "py.typed").exists()


MOVED = {"bnlab.fold": "bnlab.tools.fold", "bnlab.recalibrate": "bnlab.tools.recalibrate",
         "bnlab.accumulate": "bnlab.tools.accumulate", "bnlab.amp": "bnlab.tools.amp",
         "bnlab.doctor": "bnlab.tools.doctor", "bnlab.frozen": "bnlab.tools.freeze",
         "bnlab.distributed": "bnlab.nn.sync", "bnlab.fused": "bnlab.nn.fused"}


def _import_fresh(name: str):
    """Import ``name`` in a child process with every warning recorded; returns (warnings, facts)."""
    code = ("import importlib, json, sys, warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            f"    import {name} as old\n"
            "print(json.dumps([[str(w.message), w.category.__name__, w.filename] for w in caught]))\n")
    return code


def test_moved_modules_keep_their_old_names_for_one_release():
    for old, new in MOVED.items():
        code = _import_fresh(old) + (f"import {new}\n"
                                     f"assert old is sys.modules[{new!r}], (old, sys.modules[{new!r}])\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={"PYTHONPATH": str(ROOT / "src")})
        assert done.returncode == 0, done.stderr
        caught = [w for w in __import__("json").loads(done.stdout.splitlines()[-1]) if w[1] == "FutureWarning"]
        assert len(caught) == 1 and caught[0][0] == f"{old} is now {new}; the old name works until bnlab 0.3"
        assert caught[0][2] == "<string>"   # the warning points at the importing code, not at bnlab


def test_old_variants_name_offers_the_layers_and_the_freeze_tools():
    code = _import_fresh("bnlab.variants") + (
        "import bnlab.nn.variants as layers, bnlab.tools.freeze as tools\n"
        "assert old.GhostBatchNorm2d is layers.GhostBatchNorm2d and old.BatchRenorm2d is layers.BatchRenorm2d\n"
        "assert old.freeze_bn is tools.freeze_bn and old.FrozenBatchNorm2d is tools.FrozenBatchNorm2d\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    caught = [w for w in __import__("json").loads(done.stdout.splitlines()[-1]) if w[1] == "FutureWarning"]
    assert len(caught) == 1 and "bnlab.nn.variants" in caught[0][0] and "bnlab.tools.freeze" in caught[0][0]
