"""`bnlab study --dry-run` (issue 12): the plan's run counts are the runner's, nothing is created, the
time estimate is arithmetic on a calibration (linear in the steps), and mistakes are one line."""

import json

import pytest

from bnlab import cli
from bnlab.study import get_profile
from bnlab.study.claims import CLAIMS, collect_specs
from bnlab.study.plan import (Calibration, calibrate, count_runs, estimate_seconds, format_plan, later_looks,
                              later_rounds, make_plan, steps_of, wall_seconds)
from bnlab.study.specs import make_spec, spec_key


@pytest.mark.parametrize("name", ["tiny", "quick"])
@pytest.mark.parametrize("claims", [[1, 2, 3, 4, 5], [4, 5], [4]])
def test_run_counts_are_the_runners_specs_each_counted_once(name, claims):
    # every seed in the first round (tuned: below), in one look (later looks: test_plan_counts_the_first_look_…)
    profile = {**get_profile(name), "tune_seeds": None, "looks": None, "look_alphas": None}
    counts = count_runs(profile, claims)
    runner = collect_specs(profile, claims, None)
    owned = [k for c in counts.values() for k in c.own]
    assert len(owned) == len(set(owned)) == len(runner) and set(owned) == set(runner)
    for number in claims:  # independently: each claim's distinct specs = its own + the ones it shares
        declared = {spec_key(s) for s in CLAIMS[number].measure(profile, None)}
        c = counts[number]
        assert len(c.own) + sum(c.shared.values()) == len(declared)
        assert all(n < number for n in c.shared)  # shared with an earlier claim, which counts them
        kinds = {}
        for key in c.own:
            kinds[runner[key]["kind"]] = kinds.get(runner[key]["kind"], 0) + 1
        assert c.kinds() == kinds


def test_tuned_claims_count_their_second_round():
    # quick: 6 seeds in its first look, 2 of them tuning seeds; each arm/cell runs its grid on those, one rate
    # on the others
    profile = get_profile("quick")
    assert profile["tune_seeds"] == 2 and profile["looks"][0] == 6
    counts = count_runs(profile, [1, 3, 5])
    # claim 3 has its own looks, the first at 10 seeds: 6 arms (BN, ghost 16, ghost 4, GroupNorm, none, none +
    # weight decay), 4 rates each on the tuning seeds, one rate on the other 8
    assert profile["regularize"]["looks"][0] == 10 and len(profile["regularize"]["lrs"]) == 4
    assert len(counts[3].own) == 6 * (4 * 2 + 8)
    # claim 1: BN over 3 rates, the 3 noisy arms and none over 2, on the tuning seeds, one rate on the other 4;
    # BN and none at lr 0.1 on every seed for gradient ICS (0.1 is in both grids: the tuning runs are shared;
    # on the other seeds the placeholder tie picks each grid's smallest rate, 0.1 for BN, 0.03 for none: +4)
    assert len(counts[1].own) == (3 * 2 + 4) + 4 * (2 * 2 + 4) + 4
    # claim 5: 2 depths x 4 cells x 5 rates on 2 seeds + 1 rate on 4 seeds; signal runs: 3 depths x 6 arms
    # (the 4 cells, SkipInit, Fixup) x 6 seeds
    assert len(counts[5].own) == 2 * 4 * (5 * 2 + 4) + 3 * 6 * 6


def test_later_round_bounds_from_the_profile():
    # quick: 2 arms, 5 rates, 1 batch size, max_extensions 2, 6 seeds in the first look (hand-derived)
    profile = get_profile("quick")
    assert (len(profile["lr"]["arms"]), len(profile["lr"]["lrs"]), profile["lr"]["max_extensions"],
            profile["looks"][0], len(profile["lr"]["batch_sizes"])) == (2, 5, 2, 6, 1)
    # claim 2: the sweep's extensions, its 2 arms' longer runs at every rate of the extended grid, and BN's
    # rerun for the plateau budget in every seed
    assert profile["speed"]["arms"] == ["bn", "none"]
    assert later_rounds(profile, [1, 2, 3, 4, 5]) == {2: 2 * 2 * 6 + 2 * (5 + 2) * 6 + 6, 4: 0}
    assert later_rounds(profile, [4]) == {4: 2 * 2 * 6}
    assert later_rounds(profile, [1, 3, 5]) == {}


def _train(max_steps, **extra):
    return make_spec("train", dataset="synthetic", device="cpu", width=0.25, depth=8, eval_every=10,
                     val_size=64, val_eval_size=32, norm="bn", lr=0.1, batch_size=32, seed=0,
                     max_steps=max_steps, **extra)


def test_the_estimate_is_linear_in_the_steps_and_hand_checked():
    cal = Calibration(step_seconds=0.02, forward_seconds=0.001, peak_mb=1.0, device="cpu")
    sizes = {"train": 448, "val": 64, "test": 256}
    # 100 steps: 100 × 0.02 s, and (100 // 10 + 1) evaluations of 32 examples + final val 64 + test 256
    assert estimate_seconds(_train(100), cal, sizes) == pytest.approx(100 * 0.02 + (11 * 32 + 64 + 256) * 0.001)
    no_eval = Calibration(0.02, 0.0, 1.0, "cpu")
    assert estimate_seconds(_train(200), no_eval, sizes) == pytest.approx(2 * estimate_seconds(_train(100),
                                                                                               no_eval, sizes))
    # epochs × full batches per epoch when there is no max_steps
    assert steps_of({**_train(None), "epochs": 3}, 448) == 3 * (448 // 32)
    assert steps_of(make_spec("ics", steps=77, batch_size=8), 448) == 77
    assert steps_of(make_spec("signal", batch_size=8), 448) == 1


def test_calibrating_a_spec_then_twice_its_steps_doubles_the_training_part():
    spec = _train(5)
    cal = calibrate(spec, steps=2, warmup=1)
    assert cal.step_seconds > 0 and cal.forward_seconds > 0 and cal.peak_mb >= 0
    sizes = {"train": 448, "val": 64, "test": 256}
    one, two = estimate_seconds(_train(50), cal, sizes), estimate_seconds(_train(100), cal, sizes)
    evaluated = lambda steps: (steps // 10 + 1) * 32 + 64 + 256  # noqa: E731
    assert two - one == pytest.approx(50 * cal.step_seconds + (evaluated(100) - evaluated(50)) * cal.forward_seconds)


def test_wall_time_spreads_the_longest_runs_first():
    # 2 slots: 3 | 3, then 2 → 5 | 3, 2 → 5 | 5, 2 → 7 | 5
    assert wall_seconds([2, 3, 2, 3, 2], 2) == 7
    assert wall_seconds([2, 3, 2, 3, 2], 1) == 12
    assert wall_seconds([4, 1, 1], 8) == 4


def test_dry_run_creates_nothing_and_prints_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never"
    assert cli.main(["study", "--profile", "tiny", "--dry-run", "--out", str(out), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and list(tmp_path.iterdir()) == []
    total = len(collect_specs(get_profile("tiny"), [1, 2, 3, 4, 5], None))
    line = next(l for l in printed.splitlines() if l.startswith("total (counted rounds)"))
    assert int(line.split()[3]) == total and "wall-h@2" in printed and "CPU-h" in printed


def test_dry_run_json_for_scripts(tmp_path, capsys):
    assert cli.main(["study", "--profile", "tiny", "--claims", "4", "--dry-run", "--json",
                     "--out", str(tmp_path / "o")]) == 0
    plan = json.loads(capsys.readouterr().out)
    specs = collect_specs(get_profile("tiny"), [4], None)
    assert plan["total"]["runs"] == len(specs) == plan["claims"][0]["runs"]
    assert plan["total"]["hours"] > 0 and plan["total"]["peak_mb"] >= 0 and plan["calibrated_on"] == "cpu"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["quick", "full"])
def test_no_calibrate_prints_a_row_per_claim(name, tmp_path, capsys):
    assert cli.main(["study", "--profile", name, "--dry-run", "--no-calibrate", "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = count_runs(get_profile(name), sorted(CLAIMS))
    for number, c in counts.items():
        row = next(l for l in lines if l.startswith(f"{number}. "))
        assert int(row[44:50]) == len(c.own)
    assert "Claim 2 may add up to" in "\n".join(lines) and not (tmp_path / "o").exists()


def test_a_cuda_profile_is_planned_on_the_cpu_and_says_so(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = make_plan({**get_profile("tiny"), "device": "cuda"}, [4], jobs=1, executor="ray")
    assert plan.calibrated_on == "cpu"
    notes = " ".join(plan.notes)
    assert "GPU time is not estimated here" in notes and "--gpus-per-run" in notes


@pytest.mark.parametrize("argv, fragment", [
    (["--no-calibrate"], "--no-calibrate is for --dry-run"),
    (["--json"], "--json is for --dry-run"),
    (["--dry-run", "--jobs", "0"], "--jobs"),
    (["--dry-run", "--claims", "9"], "--claims"),
    (["--dry-run", "--profile", "huge"], "--profile"),
    (["--dry-run", "--gpus-per-run", "0.5"], "--gpus-per-run"),
])
def test_user_errors_are_one_line(argv, fragment, tmp_path, capsys):
    out = tmp_path / "o"
    status = cli.main(["study", "--profile", "tiny", *argv, "--out", str(out)] if "--profile" not in argv
                      else ["study", *argv, "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("bnlab study: error: ") and fragment in lines[0]
    assert not out.exists()


def test_full_is_planned_without_its_dataset_on_disk_and_downloads_nothing(tmp_path, capsys, monkeypatch):
    """Issue 21 item 13: `--profile full --dry-run` failed when CIFAR-10 was not on disk ("a dry run downloads
    nothing"). Every class of run is calibrated on stand-in tensors instead (the calibration itself is faked
    here: ResNet-110 steps on one CPU thread take seconds each), and the plan says so."""
    from bnlab.study import plan as plan_module
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("BNLAB_DATA", str(empty))  # the only place looked in, and the download cache
    calls = []

    def fake(spec, baseline_mb=None, stand_in=False, **kw):
        calls.append((spec["dataset"], stand_in))
        return Calibration(0.01, 1e-4, 100.0, spec["device"])
    monkeypatch.setattr(plan_module, "calibrate", fake)
    monkeypatch.setattr(plan_module, "_device_memory_mb", lambda device, free: 10 ** 9)
    assert cli.main(["study", "--profile", "full", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert calls and set(calls) == {("cifar10", True)}
    assert "cifar10 is not on disk and a dry run downloads nothing: its runs were calibrated on random tensors " \
           "of its shape (3×32×32" in printed
    assert list(empty.iterdir()) == [] and not (tmp_path / "o").exists()


def test_a_stand_in_calibration_reads_no_file_and_counts_the_data_it_would_hold(tmp_path, monkeypatch):
    from bnlab.study import runs
    from bnlab.study.plan import data_sizes, stand_in_data
    from bnlab.study.profiles import with_overrides
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path))   # nothing there
    monkeypatch.setattr(runs, "load_data", lambda spec: pytest.fail("a stand-in calibration loaded the data"))
    profile = with_overrides(get_profile("tiny"), dataset="cifar10")
    plan = make_plan(profile, [4], jobs=1)
    assert plan.calibration and all(row["stand_in"] for row in plan.calibration)
    assert plan.total["hours"] > 0 and list(tmp_path.iterdir()) == []
    spec = next(iter(count_runs(profile, [4])[4].own.values()))
    data = stand_in_data(spec)
    assert tuple(data.train_x.shape[1:]) == (3, 8, 8) and data.num_classes == 10   # tiny pools to 8×8
    # the data the run would hold, float32: 448 training, 64 validation and 10,000 test images of 3×8×8
    assert data_sizes(spec) == {"train": 448, "val": 64, "test": 10000}
    row = next(r for r in plan.calibration if r["kind"] == "train")
    assert row["peak_mb"] >= (448 + 64 + 10000) * 3 * 8 * 8 * 4 / 2 ** 20


@pytest.mark.parametrize("spec", [
    {"dataset": "synthetic", "val_size": 64},
    {"dataset": "synthetic", "val_size": 64, "subset": 50},
    {"dataset": "digits", "val_size": 100, "train_size": 300, "image_size": 4},
    {"dataset": "digits", "val_size": 100, "train_size": 5000},
    {"dataset": "mnist1d", "val_size": 500},
    {"dataset": "mnist1d"},
])
def test_data_sizes_are_what_load_data_returns(spec):
    from bnlab.study.plan import data_sizes
    from bnlab.study.runs import load_data
    data = load_data({"kind": "train", **spec})
    assert data_sizes(spec) == {"train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)}


def test_estimate_mb_by_hand():
    """ResNet-8 (one block per stage), width 1 (16/32/64 channels), batch 10 on synthetic's 1×8×8 images, none
    held out: activations 3.5 × 10 × 16 × 64 × (3 convs at full size + 2 at ½ + 2 at ¼ of its volume) floats;
    parameters 2 × 9 × 16² × (1 + 4 + 16) + 9 × 1 × 16, ×4 with their gradients and momentum; the data
    (512 + 256) × 64 floats. Four bytes each."""
    from bnlab.study.plan import estimate_mb
    spec = {"kind": "train", "dataset": "synthetic", "depth": 8, "width": 1.0, "batch_size": 10}
    activations = 3.5 * 10 * 16 * 64 * (3 + 2 * 0.5 + 2 * 0.25)
    parameters = 2 * 9 * 16 ** 2 * 21 + 9 * 16
    data = (512 + 256) * 64
    assert estimate_mb(spec) == pytest.approx((activations + 4 * parameters + data) * 4 / 2 ** 20)


_MEASURE = """
import json, sys
from bnlab.study.plan import calibrate, estimate_mb, _data_mb
spec = json.loads(sys.argv[1])
peak = calibrate(spec, stand_in=True, steps=1, warmup=1).peak_mb
print(json.dumps([peak - _data_mb(spec), estimate_mb(spec) - _data_mb(spec)]))
"""


def test_the_memory_estimate_is_within_a_factor_of_two_of_the_measured_peak():
    """Measured in a fresh process (memory an earlier test freed stays resident here): ResNet-32 at batch 64
    on CIFAR-shaped tensors, the data left out of both (the estimate adds it by arithmetic)."""
    import subprocess
    import sys
    from pathlib import Path
    spec = {"kind": "train", "dataset": "cifar10", "depth": 32, "width": 1.0, "batch_size": 64, "seed": 0,
            "device": "cpu", "val_size": 5000}
    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(spec)], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(src)})
    measured, estimated = json.loads(out.stdout.strip().splitlines()[-1])
    assert estimated / 2 < measured < estimated * 2, (measured, estimated)


def test_classes_that_cannot_fit_the_free_memory_are_not_calibrated_and_say_so(monkeypatch):
    from bnlab.study import plan as plan_module
    from bnlab.study.plan import estimate_mb, spec_class
    profile = get_profile("tiny")
    specs = [s for c in count_runs(profile, [5]).values() for s in c.own.values()]
    estimates = sorted({spec_class(s): estimate_mb(s) for s in specs}.items(), key=lambda kv: kv[1])
    free_mb = (estimates[0][1] + estimates[-1][1]) / 2 / plan_module.CALIBRATE_WITHIN   # between the extremes
    monkeypatch.setattr(plan_module, "_device_memory_mb", lambda device, free=True: free_mb)
    plan = make_plan(profile, [5], jobs=1)
    calibrated = {tuple(row[f] for f in plan_module.CLASS_FIELDS) for row in plan.calibration}
    assert calibrated == {cls for cls, mb in estimates if mb <= plan_module.CALIBRATE_WITHIN * free_mb}
    assert 0 < len(calibrated) < len(estimates)
    assert plan.total["uncalibrated"] == sum(1 for s in specs if spec_class(s) not in calibrated)
    assert any(note.startswith("Not calibrated: ") for note in plan.notes)
    row = next(l for l in format_plan(plan).splitlines() if l.startswith("5. "))
    assert ">" in row   # the claim's hours leave runs out


def test_check_memory_names_the_run_and_the_fields_to_lower(monkeypatch):
    from bnlab.errors import UserError
    from bnlab.study import plan as plan_module
    from bnlab.study.plan import check_memory, estimate_mb
    profile = get_profile("tiny")
    largest = max(estimate_mb(s) for c in count_runs(profile, [1]).values() for s in c.own.values())
    monkeypatch.setattr(plan_module, "_device_memory_mb", lambda device, free: largest * 1.01)
    check_memory(profile, [1])   # fits
    monkeypatch.setattr(plan_module, "_device_memory_mb", lambda device, free: largest * 0.99)
    with pytest.raises(UserError, match=r"one ics run of depth 8, width 0.25, batch 32 on synthetic \(claim 1\) "
                                        r"needs ≈ .*; lower depth, width, ics.batch_size$"):
        check_memory(profile, [1])


def test_plan_counts_the_first_look_in_every_setting_and_bounds_the_later_looks():
    from bnlab.study.plan import later_looks
    from bnlab.study.profiles import validate
    base = get_profile("tiny")
    base["seeds"] = [0, 1, 2, 3, 4]
    three = validate({**base, "seeds": [0, 1, 2]})
    looked = validate({**base, "looks": [3, 5], "look_alphas": [0.02, 0.03]})
    claims = [1, 2, 3, 4, 5]
    first = {n: set(c.own) for n, c in count_runs(looked, claims).items()}
    assert first == {n: set(c.own) for n, c in count_runs(three, claims).items()}   # only the first look's seeds
    every = count_runs(validate(base), claims)
    # every run of one look at all 5 seeds, but claim 3's arms of no part (GroupNorm, weight decay, ghost
    # batches of 16): they run the first look only, so its later looks add 3 arms x 2 seeds
    assert later_looks(looked, claims) == {n: len(every[n].own) - len(first[n]) for n in claims} | {3: 3 * 2}
    assert later_looks(validate(base), claims) == {}
    two = validate({**base, "settings": [{}, {"depth": 14}]})
    union = set(collect_specs(validate(base), claims)) | set(collect_specs(validate({**base, "depth": 14}), claims))
    counted = {k for c in count_runs(two, claims).values() for k in c.own}
    assert union <= counted   # both settings' first rounds, each run once (plus the tuned claims' second round)
    assert {s["depth"] for c in count_runs(two, claims).values() for s in c.own.values()} >= {8, 14}


def test_later_looks_of_a_claim_with_its_own_design_count_the_arms_of_its_parts_at_every_seed():
    # quick's claim 3: 10 seeds first, up to 80 (its own looks); the 3 arms its two parts read (none, BN, ghost
    # batches of 4) may run the 70 others at the chosen rate, the 3 arms of no part never do
    profile = get_profile("quick")
    assert later_looks(profile, [3]) == {3: 3 * 70}
    # the profile's own looks (6, then 10) for a claim without a design of its own: claim 2's 2 arms, 4 seeds
    assert later_looks(profile, [2])[2] >= 2 * 4


def test_the_plan_names_each_claims_own_looks():
    plan = make_plan(get_profile("standard"), [1, 2, 3, 4, 5], jobs=2, calibration=False)
    note = next(n for n in plan.notes if n.startswith("Sequential seeds"))
    assert "3 looks (6 seeds at 98.5%, 10 seeds at 98.5%, 14 seeds at 98%)" in note
    assert "claim 3: 4 looks (10 seeds at 99%" in note and "80 seeds at 98%), each part stopping" in note
    # claim 5 stops as a whole (its parts do not stop separately)
    assert "claim 5: 4 looks (6 seeds at 99%, 10 seeds at 99%, 16 seeds at 99%, 24 seeds at 98%);" in note
