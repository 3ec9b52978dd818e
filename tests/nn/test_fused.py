"""bnlab.nn.fused: BN+ReLU and BN+add+ReLU over a bnlab.nn module, against torch.nn.BatchNorm* composed with
the addition and the ReLU — outputs, every gradient, running statistics and the batch counter, in training
and evaluation, on the fused-kernel path (backend="triton", CPU tensors under Triton's interpreter) and on
the plain-composition fallbacks."""

import pytest
import torch

from bnlab.nn import fused
from bnlab import nn as bnn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_or_skip():
    pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")
    from bnlab.kernels import launch
    if DEVICE == "cpu" and not launch.INTERPRETED:
        pytest.skip("no CUDA device and Triton was imported before TRITON_INTERPRET=1 was set")
    return launch


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN, so an unwritten element fails the comparison; and the test must have
    gone through the fused kernels (not the fallback)."""
    launch = _kernels_or_skip()
    from bnlab import kernels
    monkeypatch.setattr(launch, "POISON", True)
    calls = []
    for name in ("batch_norm_train", "batch_norm_eval"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    yield calls
    assert calls, "the fused kernels were never called"


def _pair(cls_name, C, **kw):
    """A bnlab layer and a torch layer with the same (non-trivial) parameters."""
    backend = kw.pop("backend", "triton")
    ours = getattr(bnn, cls_name)(C, backend=backend, **kw).to(DEVICE)
    theirs = getattr(torch.nn, cls_name)(C, **kw).to(DEVICE)
    if ours.weight is not None:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 1.5, C))
                m.bias.copy_(torch.linspace(-0.5, 0.5, C))
    return ours, theirs


def _params(m):
    return [p for p in (m.weight, m.bias) if p is not None]


def _check_steps_match_torch(ours, theirs, shape, residual, channels_last, steps=3, train=True):
    ours.train(train)
    theirs.train(train)
    for step in range(steps):
        x = torch.randn(shape, device=DEVICE) * (step + 1) + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        r = torch.randn(shape, device=DEVICE) if residual else None
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ro = r.clone().requires_grad_() if residual else None
        rt = r.clone().requires_grad_() if residual else None
        yo = fused.batch_norm_add_relu(ours, xo, ro) if residual else fused.batch_norm_relu(ours, xo)
        yt = torch.relu(theirs(xt) + rt) if residual else torch.relu(theirs(xt))
        torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(yo).all()
        dy = torch.randn(shape, device=DEVICE)
        go = torch.autograd.grad(yo, [xo] + _params(ours) + ([ro] if residual else []), dy)
        gt = torch.autograd.grad(yt, [xt] + _params(theirs) + ([rt] if residual else []), dy)
        for a, t in zip(go, gt):
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4)
        if channels_last:
            assert yo.is_contiguous(memory_format=torch.channels_last)
    if theirs.track_running_stats:
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_kernels_match_torch_composition(poisoned, residual, channels_last, momentum):
    torch.manual_seed(0)
    ours, theirs = _pair("BatchNorm2d", 5, momentum=momentum)
    _check_steps_match_torch(ours, theirs, (3, 5, 7, 3), residual, channels_last)
    _check_steps_match_torch(ours, theirs, (3, 5, 7, 3), residual, channels_last, steps=1, train=False)


@pytest.mark.parametrize("cls_name,shape", [("BatchNorm1d", (9, 4)), ("BatchNorm1d", (3, 4, 5)),
                                            ("BatchNorm3d", (2, 3, 2, 3, 4))])
def test_fused_other_dimensions(poisoned, cls_name, shape):
    torch.manual_seed(1)
    ours, theirs = _pair(cls_name, shape[1])
    _check_steps_match_torch(ours, theirs, shape, residual=True, channels_last=False, steps=2)
    _check_steps_match_torch(ours, theirs, shape, residual=True, channels_last=False, steps=1, train=False)


@pytest.mark.parametrize("kw", [dict(affine=False), dict(track_running_stats=False)])
def test_fused_without_affine_or_running_stats(poisoned, kw):
    torch.manual_seed(2)
    ours, theirs = _pair("BatchNorm2d", 3, **kw)
    _check_steps_match_torch(ours, theirs, (4, 3, 5, 5), residual=True, channels_last=False, steps=2)
    _check_steps_match_torch(ours, theirs, (4, 3, 5, 5), residual=True, channels_last=False, steps=1, train=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_batch_is_kept_out_of_running_stats(poisoned):
    ours, _ = _pair("BatchNorm2d", 3)
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    x[0, 1, 2, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="not finite"):
        fused.batch_norm_add_relu(ours, x, torch.zeros_like(x))
    assert torch.equal(ours.running_mean, torch.zeros(3, device=DEVICE))
    assert torch.equal(ours.running_var, torch.ones(3, device=DEVICE))
    assert int(ours.num_batches_tracked) == 0 and ours.skipped_updates == 1


def test_frozen_statistics_switches_are_respected(poisoned):
    """use_batch_stats=False in training: the running statistics normalize and are not updated."""
    ours, theirs = _pair("BatchNorm2d", 3)
    with torch.no_grad():
        for m in (ours, theirs):
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    ours.use_batch_stats = False
    x, r = torch.randn(4, 3, 5, 5, device=DEVICE), torch.randn(4, 3, 5, 5, device=DEVICE)
    y = fused.batch_norm_add_relu(ours, x, r)
    theirs.eval()
    torch.testing.assert_close(y, torch.relu(theirs(x) + r))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    assert int(ours.num_batches_tracked) == 0


# --------------------------------------------------------------------------------------------------
# the plain composition where the kernels do not apply
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["torch_module", "torch_backend", "broadcast_residual", "other_dtype"])
def test_fallbacks_compose(case):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, 5, device=DEVICE, dtype=torch.float64)
    r = torch.randn(4, 3, 5, 5, device=DEVICE, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3).to(DEVICE, torch.float64)
    if case == "torch_module":
        bn = torch.nn.BatchNorm2d(3).to(DEVICE, torch.float64)
    else:
        bn = bnn.BatchNorm2d(3, backend="torch" if case == "torch_backend" else "auto").to(DEVICE, torch.float64)
    if case == "broadcast_residual":
        r = r[:1]
    if case == "other_dtype":
        r = r.float()
    y = fused.batch_norm_add_relu(bn, x, r)
    expected = torch.relu(theirs(x) + r)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(bn.running_var, theirs.running_var)


def test_relu_fallback_and_errors():
    bn = bnn.BatchNorm2d(3, backend="torch")
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(fused.batch_norm_relu(bn, x), torch.relu(torch.nn.BatchNorm2d(3)(x)))
    with pytest.raises(ValueError, match="expected 4D input"):
        fused.batch_norm_relu(bn, torch.randn(4, 3))
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        fused.batch_norm_add_relu(bn, x, 1.0)


# --------------------------------------------------------------------------------------------------
# the fused modules
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_module_is_a_batch_norm_with_a_relu_tail(backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setattr(_kernels_or_skip(), "POISON", True)
    torch.manual_seed(4)
    theirs = torch.nn.BatchNorm2d(4).to(DEVICE)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours = fused.BatchNormReLU2d(4, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x, r = torch.randn(3, 4, 5, 5, device=DEVICE), torch.randn(3, 4, 5, 5, device=DEVICE)
    torch.testing.assert_close(ours(x, r), torch.relu(theirs(x) + r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), torch.relu(theirs(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x, r), torch.relu(theirs(x) + r), rtol=1e-5, atol=1e-5)


def test_resnet_block_fused_equals_unfused(poisoned):
    """A ResNet built with fused=True (bnlab batch norm on the Triton backend) trains like fused=False."""
    models = pytest.importorskip("bnlab.models", reason="bnlab.models is not available")
    torch.manual_seed(5)
    nets = {}
    for flag in (True, False):
        torch.manual_seed(5)
        nets[flag] = models.create("resnet8", norm="bn", in_channels=3, num_classes=4, fused=flag).to(DEVICE)
    for m in nets[True].modules():
        if isinstance(m, bnn.BatchNorm):
            m.backend = "triton"
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    out = {flag: net(x) for flag, net in nets.items()}
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)
    grads = {flag: torch.autograd.grad(out[flag].square().sum(), list(nets[flag].parameters())) for flag in nets}
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for a, b in zip(nets[True].buffers(), nets[False].buffers()):
        torch.testing.assert_close(a, b)


def test_subclass_with_its_own_forward_is_not_bypassed(poisoned):
    """A batch-norm variant that overrides forward keeps it: the fused tail composes around it."""
    class Doubled(bnn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(6)
    bn, plain = Doubled(3, backend="triton").to(DEVICE), bnn.BatchNorm2d(3, backend="triton").to(DEVICE)
    x, r = torch.randn(4, 3, 5, 5, device=DEVICE), torch.randn(4, 3, 5, 5, device=DEVICE)
    torch.testing.assert_close(fused.batch_norm_add_relu(bn, x, r), torch.relu(2 * plain(x) + r))
    torch.testing.assert_close(bn.running_var, plain.running_var)
