"""bnlab.tools.doctor: each finding is triggered by a model built to have that problem, and a healthy model
(running statistics computed exactly on the probe data) has none."""

import json

import pytest
import torch
from torch import nn

from bnlab import cli
from bnlab import nn as bnn
from bnlab.nn import variants as V
from bnlab.tools import freeze as FZ
from bnlab.tools.doctor import diagnose
from bnlab.tools.recalibrate import recalibrate_bn


def make_net(conv_bias: bool = False) -> nn.Module:
    """Factory used by the CLI test too (as test_doctor:make_net)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias), bnn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _batches(n=32, k=4):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 8, 8, generator=gen) * 1.5 + 0.3 for _ in range(k)]


def _healthy(conv_bias=False):
    net = make_net(conv_bias)
    recalibrate_bn(net, _batches(), mode="population")   # exact statistics of the probe data
    return net.eval()


def _checks(report, layer=None):
    return {f.check for f in report.findings if layer is None or f.layer == layer}


def test_healthy_model_has_no_findings():
    report = diagnose(_healthy(), _batches())
    assert report.findings == [], report.format()
    assert report.healthy and report.model_gap < 0.1   # the default gap_tol
    assert [r.values_per_channel for r in report.layers] == [32 * 64, 32 * 64]


def test_train_mode_at_inference():
    net = _healthy().train()
    report = diagnose(net, _batches())
    assert _checks(report) == {"train_mode"} and {f.layer for f in report.findings} == {"1", "4"}
    assert "model.eval()" in report.findings[0].fix
    assert diagnose(net, _batches(), for_inference=False).findings == []
    net.eval()
    FZ.set_bn_switches(net[4], use_batch_stats=True)
    assert _checks(diagnose(net, _batches())) == {"train_mode"}


def test_initial_statistics_never_updated():
    report = diagnose(make_net().eval())                   # no data needed for this check
    assert _checks(report) == {"initial_statistics"} and {f.layer for f in report.findings} == {"1", "4"}
    assert diagnose(make_net().eval(), for_inference=False).findings == []


def test_momentum_convention():
    net = _healthy()
    net[1].momentum = 0.99
    report = diagnose(net, _batches())
    assert _checks(report) == {"momentum_convention"} and report.findings[0].layer == "1"
    assert "0.01" in report.findings[0].fix


def test_dead_channels():
    net = _healthy()
    with torch.no_grad():
        net[4].weight[:3] = 0.0
    report = diagnose(net, _batches())
    assert _checks(report) == {"dead_channels"} and "3 of 8" in report.findings[0].evidence
    assert report.layers[1].dead_channels == 3


def test_redundant_conv_bias():
    report = diagnose(_healthy(conv_bias=True), _batches())
    assert _checks(report) == {"redundant_bias"}
    assert report.findings[0].layer == "1" and "bias=False" in report.findings[0].fix


def test_nonfinite_running_statistics():
    net = _healthy()
    net[4].running_var[2] = float("nan")
    report = diagnose(net, _batches())
    assert "nonfinite_stats" in _checks(report, "4") and report.findings[0].severity == "error"
    assert "[2]" in report.findings[0].evidence


def test_stale_statistics_and_train_eval_gap():
    net = _healthy()
    net[1].running_mean += 3 * net[1].running_var.sqrt()
    report = diagnose(net, _batches())
    assert _checks(report, "1") == {"stale_statistics", "train_eval_gap"}
    assert "train_eval_gap" in _checks(report, "<model>")
    assert report.layers[0].mean_distance == pytest.approx(3.0, rel=0.01)


def test_few_values_per_channel():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    batches = [torch.randn(4, 6) for _ in range(3)]
    recalibrate_bn(mlp, batches, mode="population")
    report = diagnose(mlp.eval(), batches)
    few = [f for f in report.findings if f.check == "few_values"]
    assert [f.layer for f in few] == ["1"] and "only 4 value" in few[0].evidence


def test_refuses_model_without_batch_norm():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        diagnose(nn.Linear(3, 3), torch.randn(2, 3))


def test_cli_json_with_factory_and_checkpoint(tmp_path, capsys):
    net = _healthy()
    with torch.no_grad():
        net[1].running_mean += 5.0
        net[4].weight.zero_()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "epoch": 3}, path)
    status = cli.main(["doctor", "test_doctor:make_net", "--checkpoint", str(path), "--shape", "16,3,8,8",
                       "--batches", "2", "--eval", "--json", "--strict"])
    out = json.loads(capsys.readouterr().out)
    assert status == 1 and not out["healthy"]
    found = {(f["check"], f["layer"]) for f in out["findings"]}
    assert ("stale_statistics", "1") in found and ("dead_channels", "4") in found
    status = cli.main(["doctor", "test_doctor:make_net", "--arg", "conv_bias=True", "--shape", "16,3,8,8",
                       "--batches", "1"])
    text = capsys.readouterr().out
    assert status == 0 and "redundant_bias" in text and "train_mode" in text and "values/ch" in text


def test_cli_with_a_model_name_and_a_dataset(capsys):
    models = pytest.importorskip("bnlab.models")
    pytest.importorskip("bnlab.data")
    status = cli.main(["doctor", "resnet8", "--data", "synthetic", "--batches", "1", "--batch-size", "16",
                       "--training", "--json"])
    out = json.loads(capsys.readouterr().out)
    net = models.create("resnet8", in_channels=1, num_classes=4)
    assert status == 0 and len(out["layers"]) == sum(FZ.is_batch_norm(m) for m in net.modules())
    assert all(f["check"] != "train_mode" for f in out["findings"])      # --training


def test_identical_findings_are_one_line_with_the_layers_and_json_keeps_each():
    """Issue 21 item 11: Hugging Face's MobileNetV2 (momentum 0.997 in all 52 layers) printed the same warning
    52 times."""
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(6)
                          for m in (nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3, momentum=0.997))])
    names = [name for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    report = diagnose(net.eval())
    assert sum(f.check == "momentum_convention" for f in report.findings) == 6          # every layer, as data
    assert [f["layer"] for f in report.to_dict()["findings"] if f["check"] == "momentum_convention"] == names
    lines = report.format().splitlines()
    momentum = [line for line in lines if "momentum_convention" in line]
    assert len(momentum) == 1, "\n".join(lines)
    assert momentum[0].startswith(f"[warning] 6 layers ({', '.join(names[:4])} and 2 more): momentum_convention")
    assert sum(line.strip().startswith("fix: use momentum=0.003") for line in lines) == 1
    assert "12 finding(s): 12 warning (in 2 groups of identical findings)" in lines   # + initial_statistics
    # findings that differ (the evidence names the layer's own numbers) stay one per layer
    net[1].momentum, net[3].momentum = 0.9, 0.8
    lines = diagnose(net.eval()).format().splitlines()
    assert sum("momentum_convention" in line for line in lines) == 3


def test_cli_imports_a_factory_from_the_current_directory(tmp_path, monkeypatch, capsys):
    """Issue 21 item 12: `bnlab doctor mypkg.models:build` from the directory holding mypkg said
    "No module named 'mypkg'" (the bnlab script's own directory is on the path, not the user's)."""
    import sys
    package = tmp_path / "doctor_factory_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("from torch import nn\n\ndef build(width=4):\n"
                                       "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))\n")
    monkeypatch.chdir(tmp_path)
    cwd = str(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", cwd)])
    monkeypatch.delitem(sys.modules, "doctor_factory_pkg", raising=False)
    monkeypatch.delitem(sys.modules, "doctor_factory_pkg.models", raising=False)
    status = cli.main(["doctor", "doctor_factory_pkg.models:build", "--arg", "width=5", "--shape", "4,3,6,6",
                       "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert [layer["num_features"] for layer in json.loads(captured.out)["layers"]] == [5]
    status = cli.main(["doctor", "no_such_pkg_here.models:build", "--shape", "4,3,6,6"])
    err = capsys.readouterr().err
    assert status == 2 and "No module named 'no_such_pkg_here'" in err and f"current directory {cwd}" in err
