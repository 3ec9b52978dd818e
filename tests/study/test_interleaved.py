"""The runner asks a claim for its next runs as soon as its own runs have finished (``asked`` in
:func:`bnlab.study.scope.collect`), not once every claim's have: whatever order the runs finish in, each
claim must end with the runs — and the verdict — the round-by-round runner gives it."""

import types

import pytest
from synthetic import LR4, make_profile, make_row, simulate, simulate_interleaved
from test_claim_lr import _sweep_fake
from test_claim_regularize import _reg_fake
from test_claim_residual import COMPLEMENT, _res_fake
from test_claim_speed import _speed_fake

from bnlab.study import claim_lr, claim_regularize, claim_residual, claim_speed
from bnlab.study.report import analyze


def _speed_and_sweep(spec):
    """Claim 4's sweep diverges above lr 1 for BN and 0.1 without (so its grid extends), claim 2's runs reach the
    target in 10 steps with BN and 30 without."""
    if spec.get("schedule") == "constant":
        return _speed_fake(lambda a, s: 10 if a == "bn" else 30, lambda a: 1.0)(spec)
    return _sweep_fake(lambda a, s: {"bn": 1.0, "none": 0.1}.get(a, 0.3),
                       lambda a, s: {"bn": 0.9, "none": 0.6}.get(a, 0.7) + 0.01 * s)(spec)


CASES = {
    "claims 2 and 4": (dict(lr={**LR4, "lrs": [0.01, 0.1]}, speed={"target_fraction": 0.97}), [2, 4],
                       _speed_and_sweep, [claim_speed, claim_lr]),
    "claim 3": ({}, [3], _reg_fake(lambda a, s: 3.0 if a == "none" else 1.0), [claim_regularize]),
    "claim 5": ({}, [5], _res_fake(COMPLEMENT, lambda n: -1.0 if n == "bn" else 0.0), [claim_residual]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_runs_finishing_in_any_order_give_the_runs_and_verdicts_of_the_rounds(case):
    sections, claims, fake, modules = CASES[case]
    profile = make_profile(**sections)
    rounds = simulate(profile, claims, fake)
    verdicts = [analyze(m, profile, rounds).verdict.verdict for m in modules]
    for seed in range(5):
        interleaved = simulate_interleaved(profile, claims, fake, seed)
        assert set(interleaved) == set(rounds), f"order {seed}"
        assert [analyze(m, profile, interleaved).verdict.verdict for m in modules] == verdicts


def test_a_claim_is_not_asked_again_until_its_runs_have_finished(monkeypatch):
    """A claim that reads part of a round (here: a follow-up chosen from the runs finished so far) gets the
    rounds' runs only through ``asked``: without it, the runner would start the follow-up an early run chose."""
    from bnlab.study import claims
    from bnlab.study.specs import make_spec, spec_key

    def measure(profile, results=None):
        first = [make_spec("train", seed=s, norm="bn", lr=0.1) for s in profile["seeds"]]
        finished = [(results or {}).get(spec_key(spec)) for spec in first]
        vals = [row["result"]["final"]["val_acc"] for row in finished if row]
        if not vals:
            return first
        return first + [make_spec("train", seed=0, norm="bn", lr=1.0 if min(vals) > 0.5 else 0.01)]

    monkeypatch.setitem(claims.CLAIMS, 99, types.SimpleNamespace(measure=measure))
    profile = make_profile()
    fake = lambda spec: make_row(val=0.1 if spec["seed"] == 5 else 0.9)   # noqa: E731
    rounds = set(simulate(profile, [99], fake))
    assert len(rounds) == len(profile["seeds"]) + 1
    for seed in range(5):
        assert set(simulate_interleaved(profile, [99], fake, seed)) == rounds
    assert any(set(simulate_interleaved(profile, [99], fake, seed, asked=False)) != rounds for seed in range(5))
