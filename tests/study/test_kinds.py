"""Run kinds (:mod:`bnlab.study.kinds`): declared once, and read, never branched on, everywhere else."""

import ast
from pathlib import Path

import pytest

import bnlab.study
from bnlab.study import get_profile, kinds
from bnlab.study.claims import CLAIMS
from bnlab.study.plan import count_runs
from bnlab.study.specs import make_spec

STUDY = Path(bnlab.study.__file__).parent


def _reads_kind(node) -> bool:
    """``x["kind"]`` or ``x.get("kind", ...)``."""
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "kind"
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "kind")


def _branches_on_a_kind(tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_reads_kind(n) for n in ast.walk(node)):
            found.append(f"line {node.lineno}: compares a spec's kind")  # if spec["kind"] == "ics"
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict)
              and any(_reads_kind(n) for n in ast.walk(node.slice))):
            found.append(f"line {node.lineno}: looks a spec's kind up in a table")  # {"ics": 3.0}[spec["kind"]]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Dict) and any(_reads_kind(a) for a in node.args)):
            found.append(f"line {node.lineno}: looks a spec's kind up in a table")
        elif isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "kind" for k in node.keys):
            found.append(f"line {node.lineno}: builds a spec by hand")  # {"kind": "train", ...}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "make_spec":
            found.append(f"line {node.lineno}: names a kind by its string")  # make_spec("signal", ...)
    return found


def test_only_the_kinds_declaration_branches_on_a_run_kind():
    problems = [f"{path.name} {problem}" for path in sorted(STUDY.glob("*.py")) if path.name != "kinds.py"
                for problem in _branches_on_a_kind(ast.parse(path.read_text()))]
    assert not problems, "\n".join(problems)
    # the check sees the branches it forbids
    assert len(_branches_on_a_kind(ast.parse('if spec["kind"] == "ics":\n    f = {"ics": 3.0}.get(s.get("kind"))\n'
                                             'x = {"ics": 1}[spec["kind"]]; y = {"kind": "train"}; '
                                             'make_spec("signal")'))) == 5


def test_every_claim_runs_declared_kinds_only():
    profile = get_profile("quick")
    used = {s["kind"] for c in count_runs(profile, sorted(CLAIMS)).values() for s in c.own.values()}
    assert used == set(kinds.KINDS) == {"train", "ics", "signal"}
    assert all(kind.name == name for name, kind in kinds.KINDS.items())


def test_an_unknown_kind_is_refused_by_name_and_fails_its_run():
    with pytest.raises(ValueError, match=r"spec kind must be one of train, ics, signal \(got 'fly'\)"):
        make_spec("fly")
    status, result, error = kinds.execute({"kind": "fly", "seed": 0})
    assert (status, result) == ("failed", {}) and "spec kind must be one of" in error
