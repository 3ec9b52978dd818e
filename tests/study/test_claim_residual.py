"""Claim 5 (BN complements residual connections): every outcome of its rules on synthetic results (the
BN × residual interaction and the exponents at initialization), and its "ours | paper" table beside He et
al."""

import math

import pytest

from bnlab.study import claim_residual
from bnlab.study.report import analyze
from bnlab.study.verdict import INCONCLUSIVE, NOT_SUPPORTED, PARTLY, SUPPORTED, UNDECIDED
from synthetic import make_profile, make_row, paper_rows, simulate


def _res_fake(acc, exponent, loss=None):
    """Train runs: test = validation accuracy ``acc[(norm, plain)]`` at lr 0.1 (5 points less elsewhere),
    final training loss ``loss[(norm, plain)]`` (× 1.01^seed), at every depth; signal runs: Var(branch)/Var(skip)
    at block ℓ is ℓ^exponent(norm)."""
    loss = loss or {cell: 1.0 - a for cell, a in acc.items()}
    def fake(spec):
        if spec["kind"] == "signal":
            blocks = [{"ratio": (i + 1) ** exponent(spec["norm"]), "stream_var": 1.0, "stream_sq_mean": 0.1}
                      for i in range((spec["depth"] - 2) // 2)]
            return {"status": "done", "result": {"blocks": blocks, "grad_norms": [1.0, 1.0, 1.0]}}
        cell = (spec["norm"], bool(spec.get("plain")))
        a = acc[cell] + 0.002 * spec["seed"] - (0 if spec["lr"] == 0.1 else 0.05)
        final = loss[cell] * 1.01 ** spec["seed"]
        return make_row(val=a, test=a, losses=(2.3, 1.0, final, final))
    return fake


def _claim5(acc, exponent, loss=None):
    profile = make_profile(residual={"lrs": [0.01, 0.1, 1.0]})
    return analyze(claim_residual, profile, simulate(profile, [5], _res_fake(acc, exponent, loss or LOSS[id(acc)])))


COMPLEMENT = {("bn", False): 0.9, ("none", False): 0.6, ("bn", True): 0.6, ("none", True): 0.55}
ADDITIVE = {("bn", False): 0.9, ("none", False): 0.7, ("bn", True): 0.7, ("none", True): 0.5}
# final training losses: BN lowers the residual net's 10× and the plain net's 2× (complement), or both 2×
LOSS = {id(COMPLEMENT): {("bn", False): 0.01, ("none", False): 0.1, ("bn", True): 0.1, ("none", True): 0.2},
        id(ADDITIVE): {("bn", False): 0.05, ("none", False): 0.1, ("bn", True): 0.1, ("none", True): 0.2}}


def test_claim5_supported_by_the_interaction_and_the_exponents():
    result = _claim5(COMPLEMENT, lambda n: -1.0 if n == "bn" else 0.0)
    assert result.verdict.verdict == SUPPORTED
    assert result.numbers["interaction"]["mean"] == pytest.approx(1.0 - math.log10(2))   # log10(10) − log10(2)
    assert result.numbers["accuracy_interaction"]["mean"] == pytest.approx(25.0)         # (90 − 60) − (60 − 55)
    assert result.numbers["exponent_gap"]["mean"] == pytest.approx(1.0)                  # 0 − (−1)


def test_claim5_main_effects_without_interaction_are_not_supported():
    result = _claim5(ADDITIVE, lambda n: 0.0)
    assert result.numbers["interaction"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert result.verdict.verdict == NOT_SUPPORTED


def test_claim5_a_diverged_run_counts_as_untrained_not_as_missing():
    """A run that diverged at its cell's validated rate enters with its loss at initialization (it did not
    train), so no seed is dropped on an outcome the treatment affects."""
    from bnlab.study.common import lookup
    profile = make_profile(residual={"lrs": [0.01, 0.1, 1.0]})
    fake = _res_fake(COMPLEMENT, lambda n: 0.0, LOSS[id(COMPLEMENT)])

    def diverging(spec):
        row = fake(spec)
        if spec["kind"] == "train" and spec["norm"] == "none" and spec.get("plain") and spec["seed"] == 4:
            row["status"] = "diverged"
        return row
    results = simulate(profile, [5], diverging)
    findings = claim_residual.decide(profile, results)
    assert findings.parts[0].effect.n == len(profile["seeds"])
    cell = findings.cells[(14, "none", True)]
    assert cell.log_loss[4] == pytest.approx(math.log10(2.3))   # the run's first loss, its initial loss


def test_claim5_partly_when_the_mechanism_is_absent():
    result = _claim5(COMPLEMENT, lambda n: 0.0)
    assert result.verdict.verdict == PARTLY


def test_claim5_straddle_is_inconclusive():
    def exponent_by_seed(n):
        return -0.4 if n == "bn" else 0.0  # gap 0.4: between margin 0.2 and threshold 0.5, zero spread
    result = _claim5(COMPLEMENT, exponent_by_seed)
    assert result.numbers["parts"][1]["outcome"] == UNDECIDED and result.verdict.verdict == INCONCLUSIVE


def test_claim5_paper_table_beside_he_et_al():
    profile = make_profile(residual={"lrs": [0.01, 0.1, 1.0], "train_depths": [8, 20]})
    result = analyze(claim_residual, profile, simulate(profile, [5], _res_fake(COMPLEMENT, lambda n: 0.0)))
    rows = paper_rows(result)
    # BN residual: test accuracy 90 + 0.2·seed points at lr 0.1 → error 10 − 0.2·mean(seeds) = 9.5
    at20 = rows["test error % of the BN ResNet-20"]
    assert at20[1].startswith("9.50") and at20[1].endswith("at lr 0.1") and at20[2].startswith("8.75")
    assert rows["test error % of the BN ResNet-110"][1] == "not measured by this profile"
    assert rows["test error % of the BN ResNet-110"][2].startswith("6.43")
    # the fake's accuracy does not depend on depth: the plain nets do not degrade
    assert rows["test error % of the deepest BN plain net − of the shallowest"][1].startswith("0.00")
    assert "64k iterations" in at20[3] and "synthetic" in at20[3]


def test_claim5_reports_the_interaction_at_every_depth_and_decides_at_the_deepest():
    profile = make_profile(residual={"lrs": [0.01, 0.1, 1.0]})   # train depths 8 and 14
    shallow, deep = LOSS[id(ADDITIVE)], LOSS[id(COMPLEMENT)]

    def fake(spec):
        loss = deep if spec.get("depth") == 14 else shallow
        return _res_fake(COMPLEMENT, lambda n: -1.0 if n == "bn" else 0.0, loss)(spec)
    result = analyze(claim_residual, profile, simulate(profile, [5], fake))
    by_depth = result.numbers["by_depth"]
    assert by_depth["8"]["interval"]["mean"] == pytest.approx(0.0, abs=1e-9) and by_depth["8"]["outcome"] == "refuted"
    assert by_depth["14"]["interval"]["mean"] == pytest.approx(1 - math.log10(2)) and by_depth["14"]["outcome"] == "holds"
    assert result.numbers["interaction"]["mean"] == pytest.approx(1 - math.log10(2))      # the deepest decides
    assert "The answer changes with depth" in result.verdict.explanation
    assert result.answer.startswith("At depth 14, BN lowered the training loss of residual networks about "
                                    f"{10 ** (1 - math.log10(2)):.0f}× more than that of plain ones"), result.answer
    # beside a disagreement with the papers, the measured numbers: the interaction at each depth
    by_depth_said = next(d for d in result.differences if d.startswith("The interaction by depth"))
    assert "depth 8: " in by_depth_said and "(refuted)" in by_depth_said and "depth 14: " in by_depth_said
