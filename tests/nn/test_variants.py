"""bnlab.nn.variants: ghost batch norm and batch renormalization — each against an independent
computation with torch.nn.functional.batch_norm or plain tensor arithmetic."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from bnlab import nn as bnn
from bnlab import protocol
from bnlab.nn import variants as V


def _pair(cls, num_features, **kwargs):
    torch.manual_seed(0)
    layer = cls(num_features, **kwargs).double()
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


# --------------------------------------------------------------------------------------------------
# ghost batch norm
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,shape,vbs", [
    (V.GhostBatchNorm2d, (12, 3, 5, 4), 4),     # divides evenly
    (V.GhostBatchNorm2d, (11, 3, 5, 4), 4),     # a last smaller ghost batch of 3
    (V.GhostBatchNorm1d, (10, 7), 4),           # 2D input, a last ghost batch of 2 samples
    (V.GhostBatchNorm1d, (9, 2, 5), 4),
    (V.GhostBatchNorm3d, (6, 2, 3, 2, 2), 2),
    (V.GhostBatchNorm2d, (5, 3, 4, 4), 8),      # virtual batch larger than the batch: plain BN
])
def test_ghost_equals_batch_norm_per_sub_batch(cls, shape, vbs):
    layer = _pair(cls, shape[1], virtual_batch_size=vbs)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    (y * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    y_ref = torch.cat([TF.batch_norm(chunk, None, None, w, b, training=True, eps=layer.eps)
                       for chunk in x_ref.split(vbs)])
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)

    # running statistics: those of plain BN on the whole batch (population estimates)
    plain = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](shape[1]).double()
    plain(x.detach())
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    torch.testing.assert_close(layer.running_var, plain.running_var)
    assert int(layer.num_batches_tracked) == 1


def test_ghost_inference_uses_population_statistics():
    layer = _pair(V.GhostBatchNorm2d, 3, virtual_batch_size=2)
    for _ in range(3):
        layer(torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1)
    layer.eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    expected = TF.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False,
                             eps=layer.eps)
    before = layer.running_mean.clone()
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.running_mean, before)
    # one sample at a time gives the same answer in eval mode (no dependence on the batch)
    torch.testing.assert_close(torch.cat([layer(x[i:i + 1]) for i in range(5)]), expected)


def test_ghost_refuses_a_single_value_ghost_batch_and_bad_size():
    layer = V.GhostBatchNorm1d(4, virtual_batch_size=3)
    with pytest.raises(ValueError, match="GhostBatchNorm1d\\(4\\).*last ghost batch"):
        layer(torch.randn(7, 4))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        V.GhostBatchNorm2d(4, virtual_batch_size=0)


def test_ghost_state_dict_matches_torch_batch_norm_and_channels_last():
    layer = V.GhostBatchNorm2d(6, virtual_batch_size=4)
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(6).state_dict())
    nn.BatchNorm2d(6).load_state_dict(layer.state_dict())
    x = torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, layer(x.contiguous()))


# --------------------------------------------------------------------------------------------------
# batch renormalization
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,shape", [(V.BatchRenorm2d, (6, 3, 4, 5)), (V.BatchRenorm1d, (9, 4))])
def test_renorm_with_rmax_1_dmax_0_equals_batch_norm(cls, shape):
    layer = _pair(cls, shape[1], rmax=1.0, dmax=0.0, warmup_steps=0, ramp_steps=0, momentum=0.1)
    plain = _pair(bnn.BatchNorm2d if len(shape) == 4 else bnn.BatchNorm1d, shape[1])
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)          # r/d would be far from 1/0 if they were not clipped
        layer.running_var.uniform_(0.2, 3)
        plain.running_mean.copy_(layer.running_mean)
        plain.running_var.copy_(layer.running_var)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(*shape, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    (plain(x2) * upstream).sum().backward()
    torch.testing.assert_close(layer(x.detach()), plain(x2.detach()))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)
    torch.testing.assert_close(layer.running_var, plain.running_var)


def test_renorm_unclipped_training_output_equals_inference_output():
    # with r and d inside their limits, (x − μB)/σB · r + d = (x − μ)/σ: the paper's central identity
    layer = _pair(V.BatchRenorm2d, 3, rmax=100.0, dmax=100.0, warmup_steps=0, ramp_steps=0)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    expected = TF.batch_norm(x, layer.running_mean.clone(), layer.running_var.clone(), layer.weight,
                             layer.bias, False, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected)


def test_renorm_gradient_treats_r_and_d_as_constants():
    layer = _pair(V.BatchRenorm1d, 4, rmax=2.0, dmax=1.0, warmup_steps=0, ramp_steps=0)
    with torch.no_grad():
        layer.running_mean.uniform_(-2, 2)
        layer.running_var.uniform_(0.1, 4)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(10, 4, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()

    # the paper's Algorithm 1, written out with stop-gradient on r and d
    xr = x.detach().clone().requires_grad_(True)
    mu = xr.mean(0)
    sigma = (xr.var(0, unbiased=False) + layer.eps).sqrt()
    running_sigma = (rv + layer.eps).sqrt()
    r = (sigma / running_sigma).clamp(0.5, 2.0).detach()
    d = ((mu - rm) / running_sigma).clamp(-1.0, 1.0).detach()
    y = ((xr - mu) / sigma * r + d) * layer.weight.detach() + layer.bias.detach()
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_renorm_schedule_is_plain_bn_then_linear_ramp():
    layer = V.BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_steps=10, ramp_steps=20)
    assert layer.current_limits(0) == (1.0, 0.0) and layer.current_limits(10) == (1.0, 0.0)
    assert layer.current_limits(20) == pytest.approx((2.0, 2.5))
    assert layer.current_limits(30) == (3.0, 5.0) and layer.current_limits(1000) == (3.0, 5.0)
    with pytest.raises(ValueError, match="rmax >= 1"):
        V.BatchRenorm2d(2, rmax=0.5)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        V.BatchRenorm2d(2, track_running_stats=False)


# --------------------------------------------------------------------------------------------------
# the fused BN+ReLU path must not bypass the variants' own training forward
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: V.GhostBatchNorm2d(3, virtual_batch_size=2, backend="triton"),
                                  lambda: V.BatchRenorm2d(3, backend="triton")])
def test_variants_declare_their_training_forward_is_their_own(make):
    layer = make()
    assert not protocol.capability(layer, "bn_plain_training")   # training: the layer's own forward must run
    assert protocol.capability(layer, "bn_plain_inference")      # inference: plain BN, any backend will do
    assert layer.backend == "triton"
    assert "backend" not in layer.state_dict() and "_backend" not in layer.state_dict()


_FUSED_CHECK = """
import copy
import torch
from bnlab.nn import fused, variants
torch.manual_seed(0)
x, residual = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
layers = [variants.GhostBatchNorm2d(3, virtual_batch_size=2, backend="triton"),
          variants.BatchRenorm2d(3, backend="triton", warmup_steps=0, ramp_steps=0)]
layers[1].running_mean.fill_(1.0)
for layer in layers:
    twin = copy.deepcopy(layer)
    expected = torch.relu(layer(x) + residual)
    got = fused.batch_norm_add_relu(twin, x, residual)
    assert torch.allclose(got, expected, atol=1e-5), type(layer).__name__
    layer.eval()
    assert torch.allclose(fused.batch_norm_relu(layer, x), torch.relu(layer(x)), atol=1e-5)
print("ok")
"""


def test_fused_tail_with_triton_interpreter_calls_the_variant_forward():
    import importlib.util
    import os
    import subprocess
    import sys
    # Triton runs in a fresh process: TRITON_INTERPRET must be set before its first import
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton (its CPU interpreter) for the fused kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")    # must be set before Triton is first imported
    done = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
