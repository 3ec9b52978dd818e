"""The study package's structure: its modules in layers, each importing only its own layer or lower ones,
and claim modules that never import one another (what several claims share has its own module)."""

import ast
from pathlib import Path

import bnlab.study
from bnlab.study.claims import MODULES

STUDY = Path(bnlab.study.__file__).parent
CLAIM_MODULES = tuple(name.rsplit(".", 1)[1] for name in MODULES)

# lowest first; a module may import its own layer or a lower one
LAYERS = [
    ("__init__", "verdict", "sequential", "style", "store", "templates"),  # rules, figure style, store, templates
    ("answers",),                                              # the claims' plain answers, from their parts
    ("metrics", "browser", "steps"),
    ("signal", "ics_loop", "runs"),                            # what the runs execute
    ("kinds",),                                                # the run kinds, declared once
    ("specs", "executors"),
    ("common",),                                               # what claims share
    ("sweep",),                                                # the learning-rate sweep claims 2, 4 and 5 read
    CLAIM_MODULES,
    ("claims",),                                               # the registry
    ("profiles",),
    ("scope",),                                                # settings and sequential looks
    ("runner",),
    ("plan", "report"),
]


def _imports(path: Path) -> set[str]:
    """The bnlab.study modules ``path`` imports (anywhere in it, function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "bnlab.study":
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnlab.study."):
            names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[2] for a in node.names if a.name.startswith("bnlab.study."))
    return names & {p.stem for p in STUDY.glob("*.py")}


def _layer(name: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) if name in layer]
    assert found, f"bnlab.study.{name} belongs to no layer: add it to LAYERS"
    return found[0]


def test_every_module_imports_only_its_layer_or_lower_ones():
    assert all(_layer(path.stem) >= 0 for path in STUDY.glob("*.py"))
    upward = [f"{path.stem} (layer {_layer(path.stem)}) imports {name} (layer {_layer(name)})"
              for path in sorted(STUDY.glob("*.py")) for name in sorted(_imports(path))
              if _layer(name) > _layer(path.stem)]
    assert not upward, "\n".join(upward)


def test_no_claim_module_imports_another():
    assert len(CLAIM_MODULES) == 5 and all((STUDY / f"{name}.py").is_file() for name in CLAIM_MODULES)
    crossing = [f"{name} imports {other}" for name in CLAIM_MODULES
                for other in sorted(_imports(STUDY / f"{name}.py") & set(CLAIM_MODULES))]
    assert not crossing, crossing
    # nor does anything below them, so the claims share only what the shared modules hold
    below = [f"{path.stem} imports {other}" for path in STUDY.glob("*.py") if _layer(path.stem) < _layer("claims")
             and path.stem not in CLAIM_MODULES for other in _imports(path) & set(CLAIM_MODULES)]
    assert not below, below
