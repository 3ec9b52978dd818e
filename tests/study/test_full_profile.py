"""The ``full`` profile replicates the papers' settings (checked against the published numbers, typed in
here from the papers), needs CUDA, and every claim's report carries an "ours | paper | setting" table
whose "ours" numbers are derived by hand from synthetic results."""

import json

import pytest
import torch

from bnlab.cli import main
from bnlab.errors import UserError
from bnlab.study import claim_ics, claim_lr, claim_regularize, claim_residual, claim_speed, get_profile, \
    with_overrides
from bnlab.study.claims import CLAIMS, collect_specs
from bnlab.study.plan import count_runs
from bnlab.study.profiles import validate

from test_ics_loop import PROFILE as ICS_PROFILE, _results as ics_results
from test_claim_verdicts import (SEEDS, _claim2, _claim3, _claim4, _profile, _res_fake, _simulate,
                                COMPLEMENT)

FULL = get_profile("full")


def _paper_rows(result) -> dict:
    """quantity → row of the claim's "ours | paper | setting" table (the only one with those columns)."""
    tables = [t for t in result.tables if t["columns"] == ["quantity", "ours", "paper", "setting"]]
    assert len(tables) == 1, [t["title"] for t in result.tables]
    return {row[0]: row for row in tables[0]["rows"]}


def _mean(text: str) -> float:
    """The leading number of a table cell ("5.3 [5.1, 5.4] at lr 0.05" → 5.3)."""
    return float(text.split()[0].rstrip("×"))


# ------------------------------------------------------------------------------------------ the profile

def test_full_validates_and_round_trips_through_show_profile(tmp_path, capsys):
    assert main(["study", "--profile", "full", "--show-profile"]) == 0
    path = tmp_path / "full.json"
    path.write_text(capsys.readouterr().out)
    assert get_profile(str(path)) == json.loads(path.read_text()) == FULL


def test_full_uses_the_papers_settings():
    assert FULL["dataset"] == "cifar10" and FULL["regularize"].get("dataset") in (None, "cifar10")
    assert len(FULL["seeds"]) >= 10 and FULL["requires_cuda"] and FULL["device"].startswith("cuda")
    # claim 5: He et al. 2016's CIFAR-10 depths, lr 0.1 among the rates, batch 128, wd 1e-4, momentum 0.9
    assert FULL["residual"]["train_depths"] == [20, 32, 44, 56, 110]
    assert 0.1 in FULL["residual"]["lrs"]
    lr = FULL["lr"]
    assert lr["batch_sizes"][0] == 128 and lr["weight_decay"] == 1e-4 and lr["momentum"] == 0.9
    # claim 4: Bjorck et al. 2018's ResNet-110 and a grid spanning their rates, 1e-4 and 0.1 interior
    assert FULL["depth"] == 110
    assert lr["lrs"][0] <= 1e-5 * 1.0001 and lr["lrs"][-1] >= 3.0
    assert lr["lrs"][0] < 1e-4 < lr["lrs"][-1] and 1e-4 in lr["lrs"] and 0.1 in lr["lrs"]
    # claim 3: Wu & He 2018's 32/16/8/4/2 images per batch as ghost batches, beside GroupNorm
    assert sorted(FULL["regularize"]["ghost_sizes"]) == [2, 4, 8, 16, 32]
    assert "groupnorm" in [key for key, _, _ in claim_regularize.arms(FULL)]
    for paper in ("He et al. 2016", "Bjorck et al. 2018", "Wu & He 2018", "Santurkar et al. 2018", "VGG"):
        assert paper in FULL["description"]


def test_full_sweep_runs_carry_weight_decay_and_other_profiles_keep_their_run_keys():
    spec = claim_lr.sweep_spec(FULL, "bn", 0.1, 128, 0)
    assert spec["weight_decay"] == 1e-4 and spec["depth"] == 110 and spec["dataset"] == "cifar10"
    depth20 = [s for s in claim_residual.measure(FULL) if s["kind"] == "train" and s["depth"] == 20]
    assert depth20 and all(s["weight_decay"] == 1e-4 and s["batch_size"] == 128 for s in depth20)
    quick = get_profile("quick")  # stores of earlier runs resume: no new keys where the profile sets none
    assert "weight_decay" not in claim_lr.sweep_spec(quick, "bn", 0.1, 64, 0)
    assert "momentum" not in claim_lr.sweep_spec(quick, "bn", 0.1, 64, 0)


def test_the_sweeps_weight_decay_and_momentum_are_validated_with_their_path():
    bad = {**FULL, "lr": {**FULL["lr"], "weight_decay": -1e-4, "momentum": 1.0}}
    with pytest.raises(UserError) as info:
        validate(bad, "profile bad")
    assert "lr.weight_decay" in str(info.value) and "lr.momentum" in str(info.value)


def test_the_stated_budget_matches_the_profiles_runs():
    """The description's run count and GPU-hours, recounted from the specs: 0.2 s per layer per epoch of
    the 45k training images, ICS steps counted as training steps, plus claim 2's 4 × 10 longer runs (the
    unnormalized arm's to its plateau)."""
    counts = count_runs(FULL, sorted(CLAIMS))
    specs = [s for c in counts.values() for s in c.own.values()]
    assert "1299 runs (the first round, then the other seeds" in FULL["description"] and len(specs) == 1299
    images = 50_000 - FULL["val_size"]

    def epochs(s):
        if s["kind"] == "train":
            return s["max_steps"] * s["batch_size"] / images if s.get("max_steps") else s["epochs"]
        return s["steps"] * s["batch_size"] / images if s["kind"] == "ics" else 0.0
    layer_epochs = sum(epochs(s) * s["depth"] for s in specs)
    speed = FULL["speed"]
    layer_epochs += len(FULL["seeds"]) * FULL["depth"] * ((len(FULL["lr"]["arms"]) - 1) * speed["epochs"]
                                                          + speed["plateau_epochs"])
    assert "≈ 100 GPU-hours" in FULL["description"]
    assert layer_epochs * 0.2 / 3600 == pytest.approx(100, rel=0.1)


def test_full_requires_cuda_and_says_so():
    with pytest.raises(UserError, match="requires a CUDA GPU"):
        with_overrides(FULL, device="cpu")
    custom = {**FULL, "requires_cuda": False, "device": "cpu"}
    assert validate(custom)["device"] == "cpu"  # a copy without the flag runs anywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_study_full_without_cuda_fails_in_one_line_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "study-full"
    assert main(["study", "--profile", "full", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnlab study: error: ") and "needs a CUDA GPU" in lines[0] and "--dry-run" in lines[0], lines
    assert not out.exists()


# ---------------------------------------------------------------------------- "ours | paper | setting"

def test_every_claim_declares_its_published_figures():
    for number, module in CLAIMS.items():
        assert module.PAPER, number
        for entry in module.PAPER:
            assert set(entry) == {"quantity", "paper", "value", "setting", "ours_key"}, (number, entry)
            assert all(isinstance(v, str) and v for v in entry.values()), (number, entry)


def test_claim1_paper_table_beside_santurkar():
    result = claim_ics.analyze(ICS_PROFILE, ics_results({"bn": 0.9, "none": 0.5},
                                                        {"bn": 0.95, "none": 0.8, "noisy": 0.85}))
    rows = _paper_rows(result)
    cosine = rows["gradient ICS: cos(G, G′) with BN − without"]
    assert cosine[1].startswith("0.400") and "Santurkar et al. 2018" in cosine[2]   # 0.9 − 0.5
    noisy = rows["test accuracy, BN − noisy BN (points)"]
    assert noisy[1].startswith("10.0")                                               # 95% − 85%
    assert "stands in for their VGG" in noisy[3] and "VGG network on CIFAR-10" in noisy[3]


def test_claim2_paper_table_beside_ioffe_and_szegedy():
    result, _, _ = _claim2(lambda a, s: {"bn": 2, "none": 8}.get(a, 8))
    row = _paper_rows(result)["steps without BN / steps with BN to the target"]
    assert row[1].startswith("4×")                          # 8 steps without BN, 2 with it
    assert "31.0M / 2.1M" in row[2] and "ImageNet" in row[3] and "synthetic" in row[3]


def test_claim3_paper_table_beside_wu_and_he():
    gaps = {"none": 20, "bn": 10, "ghost:4": 5, "ghost:16": 8, "groupnorm": 12, "none+wd": 15}
    rows = _paper_rows(_claim3(lambda a, s: gaps[a]))
    # test accuracy = 100 − gap − 0.1·seed points, so the error is gap + 0.1·mean(seeds) = gap + 0.25
    ghost4, ghost16 = (rows[f"test error % with BN over {g} images (ours: ghost batches of {g})"] for g in (4, 16))
    assert _mean(ghost4[1]) == pytest.approx(5.25, abs=0.051) and ghost4[2].startswith("27.3")  # shown to 0.1
    assert _mean(ghost16[1]) == pytest.approx(8.25, abs=0.051) and ghost16[2].startswith("23.7")
    assert _mean(rows["test error % with GroupNorm"][1]) == pytest.approx(12.25, abs=0.051)
    assert rows["test error % with BN over 2 images (ours: ghost batches of 2)"][1] == "not measured by this profile"
    assert "overfitting regime" in rows["test error % with GroupNorm"][3]


def test_claim4_paper_table_beside_bjorck():
    result, _, _ = _claim4(lambda a, s: {"bn": 1.0, "none": 0.01}.get(a, 0.1),
                           lambda a, s: {"bn": 0.9, "none": 0.5}.get(a, 0.7) + 0.01 * s)
    rows = _paper_rows(result)
    # accuracy 90 + seed (BN) and 50 + seed (none) points: means 92.5 and 52.5 at each arm's limit
    assert rows["test accuracy % with BN, at its rate"][1].startswith("92.5") and \
        rows["test accuracy % with BN, at its rate"][1].endswith("at lr 1")
    none = rows["test accuracy % without normalization, at its best rate"][1]
    assert none.startswith("52.5") and none.endswith("at lr 0.01")  # rates as given, however small
    assert rows["test accuracy % with BN, at its rate"][2].startswith("≈ 93 at lr 0.1")
    decades = rows["log10(rate with BN / rate without), decades"]
    assert decades[1].startswith("2.00") and "largest stable" in decades[3]   # log10(1.0 / 0.01)


def test_claim5_paper_table_beside_he_et_al():
    profile = _profile(residual={"lrs": [0.01, 0.1, 1.0], "train_depths": [8, 20]})
    result = claim_residual.analyze(profile, _simulate(profile, [5], _res_fake(COMPLEMENT, lambda n: 0.0)))
    rows = _paper_rows(result)
    # BN residual: test accuracy 90 + 0.2·seed points at lr 0.1 → error 10 − 0.2·mean(seeds) = 9.5
    at20 = rows["test error % of the BN ResNet-20"]
    assert at20[1].startswith("9.50") and at20[1].endswith("at lr 0.1") and at20[2].startswith("8.75")
    assert rows["test error % of the BN ResNet-110"][1] == "not measured by this profile"
    assert rows["test error % of the BN ResNet-110"][2].startswith("6.43")
    # the fake's accuracy does not depend on depth: the plain nets do not degrade
    assert rows["test error % of the deepest BN plain net − of the shallowest"][1].startswith("0.00")
    assert "64k iterations" in at20[3] and "synthetic" in at20[3]
