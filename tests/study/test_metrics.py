"""The study's metric functions against hand-computed values and NumPy/torch oracles."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.study import metrics
from bnlab.study.signal import run_signal


def test_percentiles_of_0_to_100_are_the_percentile_values():
    x = torch.arange(0, 101, dtype=torch.float32).reshape(1, 101)
    assert metrics.percentiles(x) == pytest.approx([15.0, 50.0, 85.0])


def test_percentiles_interpolate_like_numpy():
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    # sorted 1 1 2 3 4 5 6 9; position 0.15*7 = 1.05 → 1 + 0.05*(2-1) = 1.05
    assert metrics.percentiles(torch.tensor(values), (15,))[0] == pytest.approx(1.05)


def test_mean_ci_matches_hand_computation():
    mean, low, high = metrics.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) from tables · sd / √n
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert metrics.mean_ci([5.0]) == (5.0, 5.0, 5.0)
    assert all(math.isnan(v) for v in metrics.mean_ci([]))
    assert metrics.mean_ci([1.0, float("nan"), 3.0])[0] == pytest.approx(2.0)
    assert metrics.mean_ci([98.0, 99.0, 100.0], (0, 100))[2] == 100.0  # an accuracy stays inside 0–100


def test_log_mean_ci_is_geometric():
    mean, low, high = metrics.log_mean_ci([2.0, 8.0])
    assert mean == pytest.approx(4.0)
    assert low < 4.0 < high


def test_step_changes():
    assert metrics.step_changes([1.0, 3.0, 2.5]) == pytest.approx([2.0, 0.5])


def test_gradient_ics_distance_and_cosine():
    distance, cosine = metrics.gradient_ics(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
    assert distance == pytest.approx(5.0)
    assert cosine == pytest.approx(0.0)
    distance, cosine = metrics.gradient_ics(torch.tensor([1.0, 1.0]), torch.tensor([-2.0, -2.0]))
    assert distance == pytest.approx(math.sqrt(18))
    assert cosine == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same shape"):
        metrics.gradient_ics(torch.zeros(2), torch.zeros(3))


def test_channel_stats_by_hand():
    # channel 0 holds 1, 3, 5, 7 (mean 4, variance 5); channel 1 holds 0, 0, 2, 2 (mean 1, variance 1)
    x = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[5.0, 7.0], [2.0, 2.0]]])  # (N=2, C=2, L=2)
    sq_mean, var = metrics.channel_stats(x)
    assert sq_mean == pytest.approx((16 + 1) / 2)
    assert var == pytest.approx((5 + 1) / 2)
    with pytest.raises(ValueError, match="expected"):
        metrics.channel_stats(torch.zeros(3))


def test_variance_ratio():
    assert metrics.variance_ratio(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 4.0])) == pytest.approx(0.25)


def test_loss_curve_area_is_the_mean_under_the_trapezoid():
    assert metrics.loss_curve_area([0, 1, 2], [2.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert metrics.loss_curve_area([0, 2, 3], [1.0, 1.0, 4.0]) == pytest.approx((2 * 1 + 1 * 2.5) / 3)


def test_steps_to_target_and_matched_index():
    assert metrics.steps_to_target([10, 20, 30], [0.2, 0.5, 0.6], 0.5) == 20
    assert metrics.steps_to_target([10, 20], [0.2, 0.3], 0.5) is None
    assert metrics.first_index_at_or_below([3.0, float("nan"), 1.5, 1.0], 1.5) == 2
    assert metrics.first_index_at_or_below([3.0], 1.0) is None


def test_max_stable_lr():
    assert metrics.max_stable_lr([0.01, 0.1, 1.0], [True, True, False]) == 0.1
    assert metrics.max_stable_lr([0.01, 0.1], [False, False]) is None


def test_smoothness_summaries():
    s = metrics.smoothness([1.0, 0.5, 0.8], [0.2, 0.4, 1.0], [0.1, 0.2, 0.4], grad_norm=2.0)
    assert s["loss_range"] == pytest.approx(0.5)
    assert s["grad_change"] == pytest.approx(1.0)
    assert s["beta"] == pytest.approx(max(0.2 / 0.2, 0.4 / 0.4, 1.0 / 0.8))


class _IdentityBlock(nn.Module):
    """A residual block whose branch outputs zeros: the stream passes through unchanged."""

    def __init__(self, channels):
        super().__init__()
        self.branch = nn.Conv1d(channels, channels, 1, bias=False)
        nn.init.zeros_(self.branch.weight)
        self.shortcut = nn.Identity()

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


class _IdentityNet(nn.Module):
    def __init__(self, channels=3, depth=4, classes=2):
        super().__init__()
        self.blocks = nn.Sequential(*[_IdentityBlock(channels) for _ in range(depth)])
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.blocks(x).mean(-1))


def test_signal_propagation_of_an_identity_network_is_flat():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5]).reshape(1, 3, 1) + 1.0
    data = SimpleNamespace(train_x=x, train_y=torch.randint(0, 2, (64,), generator=g))
    status, result = run_signal({"seed": 0, "batch_size": 64}, data, lambda spec, d: _IdentityNet())
    assert status == "done"
    xs = x.double().numpy()
    per_channel_mean = xs.mean(axis=(0, 2))
    per_channel_var = xs.var(axis=(0, 2))
    for block in result["blocks"]:
        assert block["stream_sq_mean"] == pytest.approx(float(np.mean(per_channel_mean ** 2)), rel=1e-6)
        assert block["stream_var"] == pytest.approx(float(np.mean(per_channel_var)), rel=1e-6)
        assert block["branch_var"] == 0.0
        assert block["ratio"] == 0.0
    assert len(result["grad_norms"]) == 4 + 1  # four branch convs and the classifier
