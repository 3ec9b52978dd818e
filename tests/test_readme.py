"""The README is the manual: every Python snippet in it runs as written, and every time it gives for a study
profile is the profile's own description (which ``bnlab study --help`` and the report quote too).

Snippet conventions, on a snippet's first line:

* ``# needs: REASON`` — skipped, with REASON (a GPU, several processes, the network);
  ``# needs: data NAME`` — skipped unless a copy of the dataset NAME is on this machine (no download);
* ``# long: …`` — run with the ``tiny`` profile in place of ``"quick"`` (the quick study takes minutes).

Each snippet runs in a fresh namespace, in a temporary directory (files it writes land there).
"""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", TEXT, re.M | re.S)


def _name(code: str) -> str:
    """The snippet's first import or statement, as its test id."""
    lines = [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
    return re.sub(r"\W+", "-", lines[0])[:40].strip("-") if lines else "empty"


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(SNIPPETS) >= 15
    assert sum(code.startswith("# needs:") for code in SNIPPETS) <= 6  # most run everywhere


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"{i}-{_name(c)}" for i, c in enumerate(SNIPPETS)])
def test_a_readme_snippet_runs_as_written(code, tmp_path, monkeypatch):
    first = code.splitlines()[0]
    if first.startswith("# needs: data "):
        import bnlab.data
        name = first.split()[3]
        if bnlab.data.from_files(name) and bnlab.data.locate(name) is None:
            pytest.skip(f"no copy of {name} on this machine (the snippet would download it)")
    elif first.startswith("# needs:"):
        pytest.skip(first[len("# needs:"):].strip())
    if first.startswith("# long:"):
        assert '"quick"' in code
        code = code.replace('"quick"', '"tiny"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md snippet {_name(code)}", "exec"), {"__name__": "__readme__"})


# ------------------------------------------------------------------------------------------ profile times
def _times() -> dict[str, str]:
    from bnlab.study.profiles import PROFILES
    from bnlab.study.templates import profile_time
    return {name: profile_time(p["description"]) for name, p in PROFILES.items()}


# an estimate of a duration: "≈ 20 minutes", "about 30 seconds", "~4 h" (a measurement says "measured" or
# gives minutes and seconds, "3 min 57 s")
_ESTIMATE = re.compile(r"(?:≈|about|~)\s*\d[\d.,–-]*\s*(?:seconds?|s|minutes?|min|hours?|h|GPU-hours|days)\b")


def test_the_profile_table_quotes_each_profiles_description():
    times = _times()
    rows = dict(re.findall(r"^\| `(\w+)`[^|]* \| ([^|]+) \|", TEXT, re.M))
    assert {name: rows.get(name, "").strip() for name in times} == times


def test_every_estimated_time_of_the_study_is_a_profiles_description():
    """On a line that names a profile or runs the study, an estimated time must be a profile's description."""
    times = _times()
    for number, line in enumerate(TEXT.splitlines(), 1):
        named = [p for p in times if re.search(rf"`{p}`|--profile {p}\b|\b{p} profile\b", line)]
        if not (named or re.search(r"bnlab study|make study", line)):
            continue
        for estimate in _ESTIMATE.findall(line):
            assert any(times[p] in line for p in named or times), f"README.md:{number}: {estimate!r} in {line!r}"


def test_help_and_report_state_the_same_times():
    from bnlab.cli import build_parser
    from bnlab.study import get_profile
    from bnlab.study.report import _first_screen_scope
    parser = build_parser()
    study = next(a for a in parser._actions if a.dest == "command").choices["study"]
    text = study.format_help()
    for name, time in _times().items():
        assert re.search(rf"^  {name} +{re.escape(time)}$", text, re.M), name
        scope = _first_screen_scope(get_profile(name), {"seeds": [], "run_seconds": None}, [])
        assert f"the {name} profile takes {time}" in scope
    assert "7 min" not in text and os.linesep.join(sorted(_times())) != ""
