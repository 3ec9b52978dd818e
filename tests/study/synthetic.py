"""Synthetic results for the claims' tests: a profile, rows shaped like the store's, and the runner's
collect → run rounds with a fake in place of training (each claim's test module supplies the fake)."""

from bnlab.study import get_profile
from bnlab.study.claims import collect_specs
from bnlab.study.runner import run_rounds

SEEDS = [0, 1, 2, 3, 4, 5]
LR4 = {"lrs": [0.01, 0.1, 1.0], "batch_sizes": [32], "max_extensions": 2}  # claim 4's sweep, which claim 2 reuses


def make_profile(**sections):
    """The tiny profile with six seeds and ``sections`` updated (``lr={...}`` changes claim 4's sweep)."""
    profile = get_profile("tiny")
    profile["seeds"] = list(SEEDS)
    for name, values in sections.items():
        profile[name].update(values)
    return profile


def make_row(status="done", val=0.5, test=None, train=None, losses=(2.4, 1.6, 0.8, 0.4), curve=None, chance=0.1,
             steps=None, **extra):
    """A stored run's row: its status and a result with the fields the claims read."""
    result = {"losses": list(losses), "initial_loss": losses[0], "chance": chance, "steps": steps or len(losses),
              "final": {"val_acc": val, "test_acc": val if test is None else test, "train_acc": train},
              "curve": curve or {"step": [len(losses)], "val_acc": [val], "seconds": [0.0]}, **extra}
    return {"status": status, "result": result}


def simulate(profile, claims, fake):
    """Run the runner's collect → run rounds (:func:`bnlab.study.runner.run_rounds`) with ``fake(spec) -> row``
    instead of training."""
    results = {}

    def run(fresh):
        results.update({key: fake(spec) for key, spec in fresh.items()})
        return {key: results[key]["status"] for key in fresh}

    run_rounds(lambda seen: collect_specs(profile, claims, seen), run, lambda: results, {})
    return results


def paper_rows(result) -> dict:
    """quantity → row of the claim's "ours | paper | setting" table (the only one with those columns)."""
    tables = [t for t in result.tables if t["columns"] == ["quantity", "ours", "paper", "setting"]]
    assert len(tables) == 1, [t["title"] for t in result.tables]
    return {row[0]: row for row in tables[0]["rows"]}


def leading_number(text: str) -> float:
    """The leading number of a table cell ("5.3 [5.1, 5.4] at lr 0.05" → 5.3)."""
    return float(text.split()[0].rstrip("×"))
