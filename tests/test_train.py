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


class _InterruptedForward(nn.Module):
    """Wraps a model; the ``at``-th training forward raises KeyboardInterrupt *after* the batch-norm layers
    updated their running statistics, i.e. in the middle of a step."""

    def __init__(self, net, at=None):
        super().__init__()
        self.net, self.at, self.calls = net, at, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        return out


@pytest.mark.parametrize("at", [3, 11])  # in the first epoch (no checkpoint yet), in the second
def test_interrupt_in_the_middle_of_a_step_is_never_saved_half_done(synthetic, tmp_path, at):
    """Issue 10 item 4: the checkpoint held the step's BN update but not the step, so resuming replayed it
    (num_batches_tracked one too many, running statistics off)."""
    reference = _InterruptedForward(small_model())
    train(reference, synthetic, quick_config(), progress=False)

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        train(_InterruptedForward(small_model(), at=at), synthetic, quick_config(checkpoint=str(ckpt)), progress=False)
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)  # weights_only is test_checkpoint_loads_with_weights_only's
        tracked = {v.item() for k, v in saved["model"].items() if k.endswith("num_batches_tracked")}
        assert tracked == {saved["state"]["step"]}
    resumed = _InterruptedForward(small_model())
    history = train(resumed, synthetic, quick_config(checkpoint=str(ckpt), resume=True), progress=False)
    assert history.final["steps"] == 16 and states_equal(resumed, reference)


def test_checkpoint_loads_with_weights_only(synthetic, tmp_path):
    ckpt = tmp_path / "c.pt"
    train(small_model(), synthetic, quick_config(epochs=1, checkpoint=str(ckpt)), progress=False)
    saved = torch.load(ckpt, weights_only=True)  # an UnpicklingError before (a TorchVersion in the history)
    assert saved["history"]["meta"]["torch"] == str(torch.__version__) and saved["state"]["step"] == 8


def test_more_epochs_extend_a_finished_run(synthetic, tmp_path):
    """Issue 10 item 10: resuming a finished run with more epochs did nothing."""
    ckpt = str(tmp_path / "c.pt")
    train(small_model(), synthetic, quick_config(epochs=1, checkpoint=ckpt), progress=False)
    history = train(small_model(), synthetic, quick_config(epochs=3, checkpoint=ckpt, resume=True), progress=False)
    assert history.status == "done" and history.final["steps"] == 3 * 8
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3] and history.reason == "3 epochs"


@pytest.mark.parametrize("end_only", [0, None])
def test_eval_every_zero_evaluates_at_the_end_only(synthetic, end_only):
    legacy = train(small_model(), synthetic, quick_config(epochs=3, eval_every=10 ** 6), progress=False)
    history = train(small_model(), synthetic, quick_config(epochs=3, eval_every=end_only), progress=False)
    assert [e["test_acc"] is None for e in history.epochs] == [True, True, False]
    assert without_time(history.epochs) == without_time(legacy.epochs)


@pytest.mark.parametrize("bad", [dict(lr=math.inf), dict(lr=math.nan), dict(momentum=-1), dict(momentum=1.0),
                                 dict(weight_decay=-1e-4), dict(divergence_loss=0), dict(eval_every=-1),
                                 dict(batch_size=1), dict(epochs=2.5)])
def test_config_rejects_bad_numbers_as_user_errors(bad):
    from bnlab.errors import UserError
    with pytest.raises(UserError, match=f"TrainConfig: {next(iter(bad))}"):
        quick_config(**bad)


def test_airbench_is_whitened_by_the_engine_at_the_start_of_a_fresh_run(synthetic):
    """The data-dependent initialisation lives in the model (init_from_data), not in the CLI."""
    set_seed(0)
    net = models.create("airbench", in_channels=1, num_classes=4, width=0.125)
    x = torch.nn.functional.interpolate(synthetic.train_x, size=24)
    data24 = data.Dataset("s24", x, synthetic.train_y, torch.nn.functional.interpolate(synthetic.test_x, size=24),
                          synthetic.test_y, 4, 1, "test", False)
    seen = []
    train(net, data24, quick_config(epochs=1, max_steps=1), callbacks=[type("C", (), {
        "on_step": lambda self, step, model, loss, batch: seen.append(model.whiten.weight.detach().clone())})()],
        progress=False)
    expected = models.create("airbench", in_channels=1, num_classes=4, width=0.125)
    expected.init_whitening(x[:5000])
    # after one SGD step the stem moved a little from the whitening; before the fix it stayed at its random init
    assert torch.allclose(seen[0], expected.whiten.weight, atol=0.05)


@pytest.mark.parametrize("dataset_padding, config_padding, expected", [(4, None, 4), (2, None, 2), (4, 1, 1)])
def test_crop_padding_follows_the_dataset_unless_given(monkeypatch, synthetic, dataset_padding, config_padding,
                                                        expected):
    import dataclasses

    import bnlab.train
    seen = []

    class RecordingLoader(data.Loader):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["crop_padding"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bnlab.train, "Loader", RecordingLoader)
    ds = dataclasses.replace(synthetic, crop_padding=dataset_padding)
    train(small_model(), ds, quick_config(crop_padding=config_padding, max_steps=1, augment=True), progress=False)
    assert seen == [expected]


def _lrs(history):
    return [s["lr"] for s in history.steps]


def test_extending_a_finished_run_gives_the_added_epochs_a_new_cycle(synthetic, tmp_path):
    """Issue "the edges a user hits", item 15: the rate jumped from 0 at the end of the finished one-cycle
    to where a longer one-cycle would be at that step (15/19 of the peak here), as if the run had been
    planned longer from the start. Now the added epochs get a cycle of their own, interrupted or not."""
    ckpt = str(tmp_path / "c.pt")
    kw = dict(log_steps=True, checkpoint=ckpt)
    train(small_model(), synthetic, quick_config(epochs=1, **kw), progress=False)
    with pytest.raises(KeyboardInterrupt):  # interrupted in the middle of the added epochs, then resumed
        train(small_model(), synthetic, quick_config(epochs=3, resume=True, **kw), callbacks=[_Interrupt(13)],
              progress=False)
    history = train(small_model(), synthetic, quick_config(epochs=3, resume=True, **kw), progress=False)
    # 8 steps: warm-up over round(0.2 · 8) = 2, linear decay to 0 over 6; then 16 steps: warm-up over
    # round(0.2 · 16) = 3 from 0 again, linear decay to 0 over 13
    first = [1 / 2, 1] + [1 - k / 6 for k in range(1, 7)]
    added = [1 / 3, 2 / 3, 1] + [1 - k / 13 for k in range(1, 14)]
    assert _lrs(history) == pytest.approx([0.05 * f for f in first + added], abs=1e-12)
    assert [s["step"] for s in history.steps] == list(range(1, 25)) and history.reason == "3 epochs"


def test_extending_a_finished_constant_schedule_stays_at_the_peak(synthetic, tmp_path):
    ckpt = str(tmp_path / "c.pt")
    kw = dict(log_steps=True, checkpoint=ckpt, schedule="constant", warmup_fraction=0.25)
    train(small_model(), synthetic, quick_config(epochs=1, **kw), progress=False)
    history = train(small_model(), synthetic, quick_config(epochs=2, resume=True, **kw), progress=False)
    assert _lrs(history) == pytest.approx([0.05 * f for f in [1 / 2, 1] + [1] * 14], abs=1e-12)  # one warm-up


def test_resuming_with_fewer_epochs_than_trained_is_an_error(synthetic, tmp_path):
    """Item 15: resuming a finished 2-epoch run with epochs=1 returned its history as if that were asked."""
    from bnlab.errors import UserError
    ckpt = str(tmp_path / "c.pt")
    train(small_model(), synthetic, quick_config(epochs=2, checkpoint=ckpt), progress=False)
    with pytest.raises(UserError, match=r"holds 2 trained epochs; epochs=1 would shorten the run.*nothing was trained"):
        train(small_model(), synthetic, quick_config(epochs=1, checkpoint=ckpt, resume=True), progress=False)
    same = train(small_model(), synthetic, quick_config(epochs=2, checkpoint=ckpt, resume=True), progress=False)
    assert same.status == "done" and same.final["steps"] == 16  # the same epochs: nothing to do, no error
