"""bnlab.models.stack: K networks as one. The oracle is each network computed on its own."""

import functools

import pytest
import torch
from torch import nn

import bnlab.models as models
from bnlab.nn.variants import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.train import param_groups

NORMS = ["bn", "torch_bn", "none", "ghost", "groupnorm:4", "layernorm", "skipinit", "fixup"]


def _nets(norm, dims=1, k=3, dtype=torch.float64, depth=8, plain=False):
    if norm == "ghost":
        norm = functools.partial(GhostBatchNorm1d if dims == 1 else GhostBatchNorm2d, virtual_batch_size=4)
    name = "resnet1d" if dims == 1 else "resnet"
    nets = [models.create(name, depth=depth, width=0.5, in_channels=2, num_classes=5, norm=norm, init_seed=s,
                          fused=False, plain=plain).to(dtype) for s in range(k)]
    for i, net in enumerate(nets):   # every parameter distinct per member (Fixup and SkipInit start at zero)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * (i + 1) * torch.randn(p.shape, dtype=dtype,
                                                    generator=torch.Generator().manual_seed(100 + i)))
    return nets


def _batch(dims, k=3, n=16, dtype=torch.float64, seed=0):
    shape = (k, n, 2, 24) if dims == 1 else (k, n, 2, 8, 8)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 5, (k, n), generator=g)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("norm", NORMS)
def test_forward_and_gradients_are_each_members_own(norm, dims):
    nets = _nets(norm, dims)
    stacked = models.stack(nets)
    x, y = _batch(dims)
    out = stacked(x)
    assert out.shape == (3, 16, 5)
    loss = sum(nn.functional.cross_entropy(out[i], y[i]) for i in range(3))
    loss.backward()
    for i, net in enumerate(nets):
        alone = net(x[i])
        torch.testing.assert_close(out[i], alone, rtol=1e-10, atol=1e-12)
        nn.functional.cross_entropy(alone, y[i]).backward()
        grads = dict(net.named_parameters())
        for name, p in stacked.net.named_parameters():
            torch.testing.assert_close(stacked.member_blocks(p.grad)[i], grads[name].grad.reshape(-1),
                                       rtol=1e-9, atol=1e-12, msg=f"{norm}: gradient of {name}, member {i}")


@pytest.mark.parametrize("norm", ["bn", "none", "ghost", "groupnorm:4", "skipinit"])
def test_sgd_on_the_stack_steps_each_member_as_alone(norm):
    """Twenty steps of Nesterov SGD with weight decay (norm parameters and biases exempt, as
    bnlab.train groups them) on the stack end where each network's own twenty steps end, running
    statistics included."""
    nets = _nets(norm, dims=1)
    stacked = models.stack(nets)
    make = lambda m: torch.optim.SGD(param_groups(m, 1e-2, 0.0), lr=0.05, momentum=0.9, nesterov=True)
    opt = make(stacked)
    opts = [make(net) for net in nets]
    for step in range(20):
        x, y = _batch(1, seed=step)
        out = stacked(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, 5), y.reshape(-1), reduction="none").view(3, -1).mean(1)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        for i, (net, o) in enumerate(zip(nets, opts)):
            o.zero_grad()
            nn.functional.cross_entropy(net(x[i]), y[i]).backward()
            o.step()
    for i, net in enumerate(nets):
        mine = stacked.member_state(i)
        for name, t in net.state_dict().items():
            torch.testing.assert_close(mine[name].to(t.dtype), t, rtol=1e-8, atol=1e-10,
                                       msg=f"{norm}: {name} of member {i} after 20 steps")


def test_weight_decay_groups_follow_the_members():
    """A stacked classifier bias is (K, out) but still a bias: exempt, as in the member's groups."""
    nets = _nets("bn")
    stacked = models.stack(nets)
    ours = [sorted(n for n, p in stacked.named_parameters() if any(p is q for q in g["params"]))
            for g in param_groups(stacked, 0.1, 0.0)]
    theirs = [sorted("net." + n for n, p in nets[0].named_parameters() if any(p is q for q in g["params"]))
              for g in param_groups(nets[0], 0.1, 0.0)]
    assert ours == theirs
    assert "net.fc.bias" in ours[1] and "net.fc.weight" in ours[0]


def test_a_diverged_member_leaves_the_others_alone():
    """NaN weights in member 1: member 0's output, gradients and running statistics are what they are
    alone; member 1's running statistics keep their old values (per channel, without a warning)."""
    nets = _nets("bn", k=2, dtype=torch.float32)
    with torch.no_grad():
        nets[1].stem[0].weight.fill_(float("nan"))
    stacked = models.stack(nets)
    reference = models.stack(nets[:1])
    x, y = _batch(1, k=2, dtype=torch.float32)
    before = stacked.member_state(1)["stem.1.running_mean"].clone()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "statistics are not finite" warning for the stack
        out = stacked(x)
    alone = reference(x[:1])
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[0], alone[0], rtol=1e-5, atol=1e-6)
    nn.functional.cross_entropy(out.reshape(-1, 5), y.reshape(-1), reduction="none").view(2, -1).mean(1).sum().backward()
    nn.functional.cross_entropy(alone[0], y[0]).backward()
    grads = dict(reference.net.named_parameters())
    for name, p in stacked.net.named_parameters():
        g0 = stacked.member_blocks(p.grad)[0]
        assert torch.isfinite(g0).all(), name
        torch.testing.assert_close(g0, reference.member_blocks(grads[name].grad)[0], rtol=1e-5, atol=1e-6)
    for name, t in reference.member_state(0).items():
        torch.testing.assert_close(stacked.member_state(0)[name], t, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(stacked.member_state(1)["stem.1.running_mean"], before)


def test_write_to_and_read_from_round_trip():
    nets = _nets("bn", k=3)
    stacked = models.stack(nets)
    with torch.no_grad():
        for p in stacked.parameters():
            p.mul_(2.0)
    copies = _nets("bn", k=3)
    stacked.write_to(copies)
    for net, copy in zip(nets, copies):
        for (name, p), q in zip(net.named_parameters(), copy.parameters()):
            torch.testing.assert_close(q, 2.0 * p, msg=name)
    again = models.stack(_nets("bn", k=3))
    again.read_from(copies)
    for a, b in zip(again.state_dict().values(), stacked.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_bad_stacks_are_refused_by_name():
    with pytest.raises(ValueError, match="at least one"):
        models.stack([])
    with pytest.raises(ValueError, match="network 1 differs in architecture"):
        models.stack([models.create("resnet1d", depth=8, in_channels=1), models.create("resnet1d", depth=14,
                                                                                       in_channels=1)])
    net = models.create("resnet1d", depth=8, in_channels=1)
    net.blocks[0].branch.relu = nn.Dropout(0.1)
    with pytest.raises(TypeError, match=r"blocks\.0\.branch\.relu \(Dropout\) cannot be stacked"):
        models.stack([net])
    stacked = models.stack([models.create("resnet1d", depth=8, in_channels=1) for _ in range(2)])
    with pytest.raises(ValueError, match=r"expected input \(members=2, N, C"):
        stacked(torch.randn(3, 4, 1, 16))
    with pytest.raises(ValueError, match="expected 2 networks"):
        stacked.write_to([net])


def test_plain_twins_and_depth_stack_too():
    nets = _nets("bn", depth=14, plain=True)
    stacked = models.stack(nets)
    x, _ = _batch(1)
    out = stacked(x)
    for i, net in enumerate(nets):
        torch.testing.assert_close(out[i], net(x[i]), rtol=1e-10, atol=1e-12)


def test_the_networks_hooks_stay_with_the_networks():
    """A hook on a network sees that network's tensors; the stack (a copy of network 0's modules) runs
    without it."""
    nets = _nets("bn", k=2)
    seen = []
    nets[0].stem.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    stacked = models.stack(nets)
    stacked(_batch(1, k=2)[0])
    assert seen == []
    nets[0](_batch(1, k=2)[0][0])
    assert seen == [(16, 8, 24)]


def test_a_retired_member_stays_at_zero_and_the_others_step_on():
    nets = _nets("bn", k=3)
    stacked = models.stack(nets)
    reference = models.stack(_nets("bn", k=3))
    opt = torch.optim.SGD(param_groups(stacked, 1e-2, 0.0), lr=0.05, momentum=0.9, nesterov=True)
    ref_opt = torch.optim.SGD(param_groups(reference, 1e-2, 0.0), lr=0.05, momentum=0.9, nesterov=True)
    for step in range(6):
        x, y = _batch(1, seed=step)
        for net, o in ((stacked, opt), (reference, ref_opt)):
            loss = nn.functional.cross_entropy(net(x).reshape(-1, 5), y.reshape(-1), reduction="none")
            o.zero_grad()
            loss.view(3, -1).mean(1).sum().backward()
            net.hold_retired()
            o.step()
        if step == 2:
            stacked.retire(1, opt)
    for name, p in stacked.net.named_parameters():
        assert not stacked.member_blocks(p)[1].any(), name
        torch.testing.assert_close(stacked.member_blocks(p)[[0, 2]],
                                   reference.member_blocks(dict(reference.net.named_parameters())[name])[[0, 2]],
                                   rtol=1e-10, atol=1e-12, msg=name)


def _assert_members_are(stacked, members, alone, context):
    """Stack position p holds network ``alone[members[p]]``'s state (weights and statistics), to 1e-8."""
    for position, i in enumerate(members):
        mine = stacked.member_state(position)
        for name, t in alone[i].state_dict().items():
            torch.testing.assert_close(mine[name].to(t.dtype), t, rtol=1e-8, atol=1e-10,
                                       msg=f"{name} of member {i}, {context}")


@pytest.mark.parametrize("norm", ["bn", "skipinit"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_narrowed_stack_steps_its_members_on_as_alone(norm, optimizer):
    """Eight steps on a stack of three, then member 1 leaves (narrowed, the optimizer's state carried over)
    and members 2 and 0 — in that order — take eight more: each ends where its network's own sixteen steps
    end (weights, running statistics), with its momentum (SGD) or moments and step count (Adam)."""
    nets, alone = _nets(norm), _nets(norm)
    if optimizer == "sgd":
        make = lambda m: torch.optim.SGD(param_groups(m, 1e-2, 0.0), lr=0.05, momentum=0.9, nesterov=True)
    else:
        make = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)
    stacked = models.stack(nets)
    opt, opts = make(stacked), [make(net) for net in alone]
    members = [0, 1, 2]
    for step in range(16):
        if step == 8:
            keep = [2, 0]
            narrow = stacked.narrowed(nets, keep)
            assert narrow.members == 2 and narrow.training
            narrow_opt = make(narrow)
            stacked.carry_optimizer_state(opt, narrow, narrow_opt, keep)
            stacked, opt, members = narrow, narrow_opt, keep
        x, y = _batch(1, seed=step)
        out = stacked(x[members])
        opt.zero_grad()
        stacked.member_losses(out, y[members]).sum().backward()
        opt.step()
        for i, (net, o) in enumerate(zip(alone, opts)):
            o.zero_grad()
            nn.functional.cross_entropy(net(x[i]), y[i]).backward()
            o.step()
    _assert_members_are(stacked, members, alone, f"{norm}, {optimizer}, after 16 steps")


def test_narrowing_names_what_it_expected():
    nets = _nets("bn")
    stacked = models.stack(nets)
    for keep in ([], [0, 0], [3]):
        with pytest.raises(ValueError, match=r"Stacked\(3 members\): keep must name distinct members 0-2"):
            stacked.narrowed(nets, keep)
    with pytest.raises(ValueError, match=r"expected 3 networks \(got 2\)"):
        stacked.narrowed(nets[:2], [0])


@pytest.mark.parametrize("momentum,nesterov,decay", [(0.0, False, 0.0), (0.9, False, 1e-2), (0.9, True, 1e-2)])
def test_stacked_sgd_steps_each_member_at_its_own_rate(momentum, nesterov, decay):
    """Three members at learning rates 0.01, 0.05 and 0.2 under a schedule factor that changes every step,
    narrowed to members 2 and 0 halfway: each ends where torch.optim.SGD's own steps at its rate end."""
    rates = [0.01, 0.05, 0.2]
    nets, alone = _nets("bn"), _nets("bn")
    stacked = models.stack(nets)
    make = lambda m, lrs: models.StackedSGD(m, lrs, param_groups(m, decay, 0.0), momentum=momentum,
                                            nesterov=nesterov)
    opt = make(stacked, rates)
    opts = [torch.optim.SGD(param_groups(net, decay, 0.0), lr=r, momentum=momentum, nesterov=nesterov)
            for net, r in zip(alone, rates)]
    members = [0, 1, 2]
    for step in range(12):
        factor = 1.0 - step / 12
        if step == 6:
            keep = [2, 0]
            narrow = stacked.narrowed(nets, keep)
            narrow_opt = make(narrow, [rates[i] for i in keep])
            stacked.carry_optimizer_state(opt, narrow, narrow_opt, keep)
            stacked, opt, members = narrow, narrow_opt, keep
        for group in opt.param_groups:
            group["lr"] = factor
        x, y = _batch(1, seed=step)
        opt.zero_grad()
        stacked.member_losses(stacked(x[members]), y[members]).sum().backward()
        opt.step()
        for i, (net, o) in enumerate(zip(alone, opts)):
            for group in o.param_groups:
                group["lr"] = rates[i] * factor
            o.zero_grad()
            nn.functional.cross_entropy(net(x[i]), y[i]).backward()
            o.step()
    _assert_members_are(stacked, members, alone, f"at lrs {rates}")


def test_stacked_sgd_wants_one_positive_rate_per_member():
    stacked = models.stack(_nets("bn"))
    for rates in ([0.1, 0.0, 0.1], [0.1, 0.1]):
        with pytest.raises(ValueError, match=r"StackedSGD: member_lrs must be 3 positive learning rates, one per member"):
            models.StackedSGD(stacked, rates)
