"""The training engine: schedules, parameter groups, repeatability, resume, divergence, accuracy."""

import math

import pytest
import torch
from torch import nn

from bnlab import data, models
from bnlab.train import History, TrainConfig, evaluate, lr_factor, param_groups, set_seed, train


@pytest.fixture(scope="module")
def synthetic():
    return data.load("synthetic")


def small_model(seed=0, norm="bn"):
    set_seed(seed)
    return models.create("resnet8", norm=norm, in_channels=1, num_classes=4, width=0.5)


def quick_config(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.05, device="cpu", augment=True, seed=3, eval_every=1)
    return TrainConfig(**{**base, **kw})


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_time(records):
    return [{k: v for k, v in r.items() if k not in ("time", "epoch_time")} for r in records]


def test_schedules_by_hand():
    total, warm = 10, 0.2          # two warm-up steps: lr/2, lr
    assert [lr_factor(s, total, "onecycle", warm) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, total, "onecycle", warm) == pytest.approx(1 - 1 / 8)
    assert lr_factor(9, total, "onecycle", warm) == 0.0
    assert lr_factor(5, total, "cosine", warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(9, total, "cosine", warm) == pytest.approx(0.0)
    assert lr_factor(7, total, "constant", warm) == 1.0
    assert lr_factor(0, total, "constant", 0.0) == 1.0


def test_norm_parameters_and_biases_get_their_own_weight_decay():
    model = small_model()
    groups = param_groups(model, weight_decay=5e-4, norm_weight_decay=0.0)
    exempt = {id(p) for p in groups[1]["params"]}
    norm_or_bias = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__.startswith("BatchNorm")
                    or name == "bias"}
    assert exempt == norm_or_bias
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_config_validation_and_roundtrip():
    config = quick_config(optimizer="adamw", label_smoothing=0.1)
    assert TrainConfig.from_dict(config.to_dict()) == config
    for bad in (dict(optimizer="lbfgs"), dict(schedule="step"), dict(epochs=0), dict(resume=True)):
        with pytest.raises(ValueError, match="TrainConfig"):
            quick_config(**bad)


def test_evaluate_against_torch(synthetic):
    model = small_model().eval()
    x, y = synthetic.test_x, synthetic.test_y
    loss, acc = evaluate(model, x, y, batch_size=100)
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == (logits.argmax(1) == y).float().mean().item()
    _, acc_tta = evaluate(model, x, y, tta=True)
    with torch.no_grad():
        averaged = 0.5 * (logits + model(x.flip(-1)))
    assert acc_tta == (averaged.argmax(1) == y).float().mean().item()


def test_seeded_cpu_run_is_bitwise_repeatable(synthetic):
    runs = []
    for _ in range(2):
        model = small_model()
        history = train(model, synthetic, quick_config(epochs=1, log_steps=True), progress=False)
        runs.append((model, history))
    assert states_equal(runs[0][0], runs[1][0])
    assert runs[0][1].steps == runs[1][1].steps and without_time(runs[0][1].epochs) == without_time(runs[1][1].epochs)
    other = small_model()
    train(other, synthetic, quick_config(epochs=1, seed=4), progress=False)
    assert not states_equal(runs[0][0], other)


class _Interrupt:
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step(self, step, model, loss, batch):
        assert isinstance(loss, float)
        if step == self.at_step:
            raise KeyboardInterrupt


def test_resume_after_interruption_equals_uninterrupted_run(synthetic, tmp_path):
    reference = small_model()
    expected = train(reference, synthetic, quick_config(), progress=False)

    ckpt = tmp_path / "run" / "checkpoint.pt"
    interrupted = small_model()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, synthetic, quick_config(checkpoint=str(ckpt)), callbacks=[_Interrupt(11)], progress=False)
    assert ckpt.is_file() and not list(ckpt.parent.glob("*.tmp"))

    resumed = small_model(seed=99)  # a different init: everything must come from the checkpoint
    history = train(resumed, synthetic, quick_config(checkpoint=str(ckpt), resume=True), progress=False)
    assert states_equal(resumed, reference)
    assert history.status == "done" and history.final["steps"] == expected.final["steps"] == 16
    assert without_time(history.epochs) == without_time(expected.epochs)


def test_resume_refuses_a_different_config(synthetic, tmp_path):
    ckpt = str(tmp_path / "c.pt")
    train(small_model(), synthetic, quick_config(epochs=1, checkpoint=ckpt), progress=False)
    with pytest.raises(ValueError, match="different config.*lr"):
        train(small_model(), synthetic, quick_config(epochs=1, checkpoint=ckpt, resume=True, lr=0.5), progress=False)


@pytest.mark.parametrize("kw,reason", [(dict(lr=1e6, schedule="constant", warmup_fraction=0.0), "not finite|divergence"),
                                       (dict(divergence_loss=1e-3), "> divergence_loss")])
def test_divergence_is_reported_not_raised(synthetic, kw, reason):
    history = train(small_model(norm="none"), synthetic, quick_config(epochs=3, **kw), progress=False)
    assert history.status == "diverged"
    assert any(word in history.reason for word in reason.split("|"))
    assert len(history.epochs) == 1 and history.final["steps"] < 24
    restored = History.from_dict(history.to_dict())
    assert restored.status == "diverged" and restored.reason == history.reason


def test_max_steps_log_steps_and_callbacks(synthetic, tmp_path):
    seen = []

    class Recorder:
        def on_step(self, step, model, loss, batch):
            seen.append((step, loss, batch[0].shape))

        def on_epoch(self, epoch, model, record):
            seen.append(("epoch", epoch, record["test_acc"]))

    history = train(small_model(), synthetic, quick_config(max_steps=5, log_steps=True, optimizer="adamw", lr=1e-3),
                    callbacks=[Recorder()], progress=False)
    assert history.final["steps"] == 5 and [s["step"] for s in history.steps] == [1, 2, 3, 4, 5]
    assert [s[0] for s in seen[:5]] == [1, 2, 3, 4, 5] and seen[0][2] == (64, 1, 8, 8)
    assert seen[-1][0] == "epoch" and 0 <= seen[-1][2] <= 1
    assert all(s["loss"] == l for s, (_, l, _) in zip(history.steps, seen))
    history.save_json(tmp_path / "h.json")
    assert History.load_json(tmp_path / "h.json") == history


def test_resnet8_reaches_80_percent_on_5k_fashion_mnist():
    if data.locate("fashion-mnist") is None:
        pytest.skip("no Fashion-MNIST copy on this machine (apt-get install dataset-fashion-mnist)")
    ds = data.load("fashion-mnist", subset=5000, seed=0)
    set_seed(0)
    model = models.create("resnet8", in_channels=1, num_classes=10)
    config = TrainConfig(epochs=4, batch_size=128, lr=0.2, augment=False, device="cpu", eval_every=100)
    history = train(model, ds, config, progress=False)
    assert history.status == "done"
    assert history.final["test_acc"] > 0.80, history.final
