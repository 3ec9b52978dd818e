"""The oracle itself, checked against PyTorch's autograd in float64 (an independent computation)."""

import numpy as np
import pytest
import torch

from bnlab import reference


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (3, 2, 5, 4), (2, 3, 3, 2, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_reference_matches_torch_autograd(shape, training):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=shape)
    weight, bias = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    running_mean, running_var = rng.normal(size=shape[1]), rng.uniform(0.5, 2.0, size=shape[1])
    dy = rng.normal(size=shape)

    y, cache = reference.forward(x, weight, bias, eps=1e-5, training=training,
                                 running_mean=running_mean, running_var=running_var)
    dx, dgamma, dbeta = reference.backward(dy, cache)

    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    rm, rv = torch.tensor(running_mean), torch.tensor(running_var)
    yt = torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training=training, momentum=0.1, eps=1e-5)
    yt.backward(torch.tensor(dy))

    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dgamma, wt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-9, atol=1e-10)
    if training:  # torch updated rm/rv in place with the same EMA rule
        new_mean, new_var = reference.update_running(running_mean, running_var, cache, 0.1)
        np.testing.assert_allclose(new_mean, rm.numpy(), rtol=1e-12)
        np.testing.assert_allclose(new_var, rv.numpy(), rtol=1e-12)


def test_reference_normalizes_to_zero_mean_unit_variance():
    x = np.random.default_rng(1).normal(5.0, 0.1, size=(64, 4, 3))
    y, cache = reference.forward(x, eps=0.0)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2)), 1.0, rtol=1e-10)
    assert cache["count"] == 64 * 3


def test_reference_rejects_1d_input():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        reference.forward(np.zeros(3))
