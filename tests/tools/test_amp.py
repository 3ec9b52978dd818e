"""Keeping mixed-precision overflow out of the running statistics (bnlab.tools.amp)."""

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.tools.amp import BNStatsGuard


def _amp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), bnn.BatchNorm1d(3))


def test_guard_rolls_back_statistics_of_a_step_the_scaler_skipped():
    model = _amp_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    guard = BNStatsGuard(model, scaler)

    def step(loss_scale):
        with guard:
            loss = model(torch.randn(8, 4)).square().mean() * loss_scale
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()

    step(1.0)                                      # a normal step: statistics move
    after_good = {k: v.clone() for k, v in model.state_dict().items()}
    assert int(model[1].num_batches_tracked) == 1
    step(1e36)                                     # gradients overflow: the scaler skips the step
    assert scaler.get_scale() < 2.0 ** 16 and guard.skipped_steps == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after_good[k])   # weights (scaler) and statistics (guard) unchanged
    assert model[1].skipped_updates == 1 and model[4].skipped_updates == 1


def test_guard_restores_non_finite_statistics_of_torch_layers():
    model = _amp_model()
    guard = BNStatsGuard(model)
    with guard:
        model(torch.randn(8, 4))
    good = model[1].running_mean.clone()
    with guard, pytest.warns(RuntimeWarning, match="BatchNorm1d\\(3\\).*not finite"):   # bnlab's own skip
        model(torch.full((8, 4), float("inf")))    # torch.nn.BatchNorm1d would keep the NaN
    torch.testing.assert_close(model[1].running_mean, good)
    assert model[1].skipped_updates == 1
