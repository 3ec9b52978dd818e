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
            "import bnlab, bnlab.nn, bnlab.functional, bnlab.variants, bnlab.fold, bnlab.doctor, bnlab.protocol\n"
            "import bnlab.recalibrate, bnlab.accumulate, bnlab.amp, bnlab.distributed, bnlab.fused, bnlab.models\n"
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
