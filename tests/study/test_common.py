"""Choosing learning rates on the tuning seeds (:func:`bnlab.study.common.tuned`, which claims 1, 3 and 5
use): the choice sees only those seeds, and the other seeds run only the chosen rate."""

from bnlab.study import claim_regularize
from bnlab.study.claims import collect_specs
from bnlab.study.report import analyze
from synthetic import make_profile, make_row, simulate


def test_rates_are_chosen_on_the_tuning_seeds_and_the_other_seeds_run_only_the_chosen_rate():
    # validation prefers lr 0.2 on the tuning seeds 0-1 and lr 0.05 on every other seed: the choice is
    # made on seeds 0-1 only, and seeds 2-5 never run the other rate
    profile = make_profile(regularize={"fit_threshold": 99.0, "lrs": [0.05, 0.2]})
    profile["tune_seeds"] = 2

    def fake(spec):
        better = (spec["lr"] == 0.2) == (spec["seed"] < 2)
        acc = 0.7 if better else 0.6
        return make_row(val=acc, test=acc, train=1.0, weight_norm={"initial": 1.0, "final": 1.0})
    first = collect_specs(profile, [3], {})
    assert {s["seed"] for s in first.values()} == {0, 1}  # round 1: the tuning seeds over the whole grid
    results = simulate(profile, [3], fake)
    runs = [s for s in results.values() if s["status"] == "done"]
    specs = collect_specs(profile, [3], results).values()
    assert len(runs) == len(specs) == len(claim_regularize.arms(profile)) * (2 * 2 + 4)
    assert {(s["lr"], s["seed"]) for s in specs if s["seed"] >= 2} == {(0.2, s) for s in range(2, 6)}
    result = analyze(claim_regularize, profile, results)
    assert {row[1] for row in result.tables[0]["rows"]} == {"0.200"}
    assert "seeds 0, 1, which ran every rate" in result.caveats[0] and "other 4 seeds" in result.caveats[0]
