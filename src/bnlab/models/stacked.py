"""Several networks of one architecture computed as one: :func:`stack`.

A small network on a CPU spends most of a training step in per-operation overhead, not arithmetic: each
convolution, norm and activation is a call through Python, the dispatcher and autograd whatever its size.
Training ``K`` seeds of a network as one network with ``K`` times the channels pays that overhead once.
Every layer keeps the seeds apart exactly:

* a convolution becomes a grouped convolution (``groups × K``): member ``k``'s output channels see only
  its own input channels and weights;
* a batch norm (bnlab's, its variants, PyTorch's) holds ``K × C`` channels; its statistics are per channel,
  so per member. bnlab's layers keep the running statistics of each channel apart
  (``per_channel_finite``): one member's divergence never stops another's update;
* a ``GroupNorm(G, C)`` becomes ``GroupNorm(K·G, K·C)`` (``layernorm``, ``GroupNorm(1, C)``, stays
  per sample and member);
* the zero-padded shortcut pads each member's channels; activations and pooling act per channel;
* the classifier is a batched matrix product with one weight matrix per member;
* SkipInit's and Fixup's scalars become one scalar per member, applied to its channels.

So member ``k`` of the stacked network computes what network ``k`` computes, up to the rounding of a
grouped convolution (exact in float64 to ~1e-12; in float32 the trajectories of a long training run
drift apart as any two float32 runs on different kernels do). Gradients are per member too: the loss
of a stack is the sum of the members' losses, so each member's parameters get their own network's
gradient, and an optimizer with per-element updates (SGD with momentum and weight decay, Adam) steps each
member as it would alone — given one learning rate for all.

Example::

    >>> import torch, bnlab.models as models
    >>> nets = [models.create("resnet1d", depth=8, width=0.5, in_channels=1, init_seed=s) for s in range(3)]
    >>> stacked = models.stack(nets)
    >>> logits = stacked(torch.randn(3, 16, 1, 40))      # (members, batch, channels, length)
    >>> logits.shape
    torch.Size([3, 16, 10])
    >>> stacked.write_to(nets)                            # each member's state back into its network

The networks' forward and backward hooks are not carried into the stack (they would see all members'
channels as one network's); register a stack's own on ``stacked.net``.

Layers it does not know to keep apart (``nn.LayerNorm`` over the whole width, dropout's shared random
draws, any other module) raise a ``TypeError`` naming the layer.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from bnlab.models.resnet import BasicBlock, Bias, Bottleneck, PreActBlock, ResNet, Scale, ZeroPadShortcut

__all__ = ["stack", "Stacked", "StackedSGD", "StackedLinear", "StackedZeroPad", "StackedScale", "StackedBias"]

# modules without state that act per channel (or per element): a stack uses them as they are
_PER_CHANNEL = (nn.ReLU, nn.GELU, nn.SiLU, nn.Identity, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)
# containers whose forward only composes their children (and adds, and applies ReLU)
_CONTAINERS = (nn.Sequential, ResNet, BasicBlock, PreActBlock, Bottleneck)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class StackedLinear(nn.Module):
    """``K`` linear layers at once: input ``(N, K·in)`` (member-major features), output ``(K, N, out)``;
    ``weight`` is ``(K, out, in)``, ``bias`` ``(K, out)``."""

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], self.members, self.in_features).transpose(0, 1)   # (K, N, in)
        if self.bias is None:
            return torch.bmm(h, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), h, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


class StackedScale(nn.Module):
    """``K`` learnable scalar multipliers (SkipInit's α, Fixup's multiplier): ``weight[k]`` scales member
    ``k``'s channels."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members
        self.weight = nn.Parameter(torch.ones(members))

    def forward(self, x: Tensor) -> Tensor:
        per_member = x.reshape(x.shape[0], self.members, -1) * self.weight.view(1, -1, 1)
        return per_member.reshape(x.shape)


class StackedBias(nn.Module):
    """``K`` learnable scalar biases (Fixup's): ``bias[k]`` is added to member ``k``'s channels."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members
        self.bias = nn.Parameter(torch.zeros(members))

    def forward(self, x: Tensor) -> Tensor:
        per_member = x.reshape(x.shape[0], self.members, -1) + self.bias.view(1, -1, 1)
        return per_member.reshape(x.shape)


class StackedZeroPad(ZeroPadShortcut):
    """He et al.'s option A for ``K`` members: subsample, then zero-pad each member's channels."""

    def __init__(self, members: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)]
        n, spatial = x.shape[0], x.shape[2:]
        extra = self.out_channels - self.in_channels
        pad = [0, 0] * (x.dim() - 2) + [extra // 2, extra - extra // 2]
        grouped = nn.functional.pad(x.reshape(n, self.members, self.in_channels, *spatial), pad)
        return grouped.reshape(n, self.members * self.out_channels, *spatial)

    def extra_repr(self) -> str:
        return f"members={self.members}, {super().extra_repr()}"


def _widened(leaf: nn.Module, k: int) -> nn.Module:
    """A copy of a per-channel layer with every per-channel parameter and buffer ``k`` times as long."""
    out = copy.deepcopy(leaf)
    for name, p in list(out._parameters.items()):
        if p is not None:
            out._parameters[name] = nn.Parameter(p.detach().repeat(k), requires_grad=p.requires_grad)
    for name, b in list(out._buffers.items()):
        if b is not None and b.dim() > 0:
            out._buffers[name] = b.repeat(k)
    return out


def _stacked_leaf(path: str, leaf: nn.Module, k: int) -> nn.Module:
    """The module that computes ``k`` copies of ``leaf`` (its parameters still to be filled in)."""
    if isinstance(leaf, _CONVS):
        return type(leaf)(leaf.in_channels * k, leaf.out_channels * k, leaf.kernel_size, leaf.stride,
                          leaf.padding, leaf.dilation, leaf.groups * k, leaf.bias is not None,
                          leaf.padding_mode, device=leaf.weight.device, dtype=leaf.weight.dtype)
    if isinstance(leaf, nn.modules.batchnorm._BatchNorm):
        out = _widened(leaf, k)
        out.num_features = leaf.num_features * k
        if hasattr(out, "per_channel_finite"):
            out.per_channel_finite = True
        return out
    if isinstance(leaf, nn.GroupNorm):
        out = _widened(leaf, k)
        out.num_groups, out.num_channels = leaf.num_groups * k, leaf.num_channels * k
        return out
    if isinstance(leaf, nn.Linear):
        return StackedLinear(k, leaf.in_features, leaf.out_features, leaf.bias is not None).to(leaf.weight)
    if isinstance(leaf, Scale):
        return StackedScale(k).to(leaf.weight)
    if isinstance(leaf, Bias):
        return StackedBias(k).to(leaf.bias)
    if isinstance(leaf, ZeroPadShortcut):
        return StackedZeroPad(k, leaf.in_channels, leaf.out_channels, leaf.stride)
    if isinstance(leaf, _PER_CHANNEL) or (isinstance(leaf, nn.Sequential) and not len(leaf)):
        return copy.deepcopy(leaf)
    raise TypeError(f"stack: {path or 'the model'} ({type(leaf).__name__}) cannot be stacked: only "
                    f"convolutions, batch/group norms, linear layers, zero-pad shortcuts, scalar scales and "
                    f"biases, and per-channel activations and pooling keep the members apart")


class Stacked(nn.Module):
    """``K`` networks of one architecture as one (see :mod:`bnlab.models.stacked`); build it with
    :func:`stack`.

    ``forward(x)`` takes ``(K, N, C, *spatial)`` — member ``k``'s batch at ``x[k]``, every member the same
    ``N`` — and returns ``(K, N, classes)``. The stacked network's state dict has the members' keys, each
    tensor holding the ``K`` members' along its first dimension (concatenated channels; the classifier's
    stacked); :meth:`member_state` takes member ``k``'s out, :meth:`write_to` and :meth:`read_from` copy
    to and from the separate networks.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("stack: expected at least one network (got none)")
        first = models[0]
        names = [n for n, _ in first.state_dict().items()]
        shapes = {n: t.shape for n, t in first.state_dict().items()}
        for i, m in enumerate(models[1:], 1):
            if type(m) is not type(first):
                raise TypeError(f"stack: network {i} is a {type(m).__name__}, network 0 a {type(first).__name__}")
            state = m.state_dict()
            if list(state) != names or any(state[n].shape != shapes[n] for n in names):
                raise ValueError(f"stack: network {i} differs in architecture from network 0 (its state-dict "
                                 f"keys or shapes differ)")
        self.members = k = len(models)
        self.net = copy.deepcopy(first)
        for module in self.net.modules():   # the networks' hooks see one network's tensors: not the stack's
            for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                          "_forward_hooks_always_called"):
                getattr(module, hooks, {}).clear()
        self._indexed: set[str] = set()   # state keys stacked along a new first dimension (the classifier's)
        for path, module in list(self.net.named_modules()):
            children = list(module.children())
            if children:
                if not isinstance(module, _CONTAINERS):
                    raise TypeError(f"stack: {path or 'the model'} ({type(module).__name__}) cannot be stacked: "
                                    f"its forward is not known to keep channels apart")
                if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
                    raise TypeError(f"stack: {path or 'the model'} ({type(module).__name__}) has parameters of "
                                    f"its own; only its layers' can be stacked")
                continue
            new = _stacked_leaf(path, module, k)
            if isinstance(new, (StackedLinear, StackedScale, StackedBias)):
                self._indexed.update(f"{path}.{n}" for n in ("weight", "bias"))
            self._replace(path, new)
        #: each parameter's dimensions in a member (what weight-decay exemption reads, see
        #: :func:`bnlab.train.param_groups`), by this module's parameter names
        self.member_ndim = {f"net.{n}": p.ndim for n, p in first.named_parameters()}
        self.retired: set[int] = set()   # members held at zero (:meth:`retire`)
        self.read_from(models)

    def _replace(self, path: str, new: nn.Module) -> None:
        if not path:
            self.net = new
            return
        parent_path, _, name = path.rpartition(".")
        parent = self.net.get_submodule(parent_path) if parent_path else self.net
        setattr(parent, name, new)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[0] != self.members:
            raise ValueError(f"Stacked({self.members} members): expected input (members={self.members}, N, C, "
                             f"*spatial) (got shape {tuple(x.shape)})")
        k, n, c = x.shape[:3]
        return self.net(x.transpose(0, 1).reshape(n, k * c, *x.shape[3:]))

    @staticmethod
    def member_losses(logits: Tensor, y: Tensor) -> Tensor:
        """Each member's mean cross-entropy, ``(K,)``, from ``logits`` ``(K, N, classes)`` and labels ``y``
        ``(K, N)``: the sum is the stack's loss, whose gradient is each member's own."""
        flat = logits.reshape(-1, logits.shape[-1])   # half precision up to float32; float64 kept
        losses = nn.functional.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), y.reshape(-1),
                                             reduction="none")
        return losses.view(logits.shape[0], -1).mean(1)

    # ------------------------------------------------------------------ members' state
    def _split(self, name: str, tensor: Tensor) -> list[Tensor]:
        if name in self._indexed:
            return list(tensor.unbind(0))
        if tensor.dim() == 0:   # a count (num_batches_tracked): the members step together
            return [tensor] * self.members
        return list(tensor.chunk(self.members, 0))

    def member_state(self, index: int) -> dict[str, Tensor]:
        """Member ``index``'s state dict (views into the stacked tensors)."""
        if not 0 <= index < self.members:
            raise IndexError(f"Stacked({self.members} members): no member {index}")
        return {name: self._split(name, t)[index] for name, t in self.net.state_dict().items()}

    @torch.no_grad()
    def write_to(self, models: Sequence[nn.Module], members: Sequence[int] | None = None) -> None:
        """Copy each member's state into its network (``models[k]`` ← member ``k``; only ``members``, if
        given)."""
        self._check_count(models)
        for k in range(self.members) if members is None else members:
            models[k].load_state_dict(self.member_state(k))

    @torch.no_grad()
    def read_from(self, models: Sequence[nn.Module]) -> None:
        """Set every member's state from its network."""
        self._check_count(models)
        states = [m.state_dict() for m in models]
        for name, t in self.net.state_dict().items():
            parts = [s[name] for s in states]
            if name in self._indexed:
                t.copy_(torch.stack(parts))
            elif t.dim() == 0:
                t.copy_(parts[0])
            else:
                t.copy_(torch.cat(parts, 0))

    @torch.no_grad()
    def retire(self, index: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Hold member ``index`` at zero from now on, for a member whose run has ended (it fitted, or
        diverged) while the others go on: its parameters, and with ``optimizer`` their optimizer state
        (momentum buffers, moments), are zeroed now, and :meth:`hold_retired` zeroes its gradients before
        each later step — finite, and never changed again."""
        self.retired.add(index)
        for p in self.parameters():
            self.member_blocks(p)[index] = 0.0
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    self.member_blocks(value)[index] = 0.0

    @torch.no_grad()
    def hold_retired(self) -> None:
        """Zero the retired members' gradients (call between ``backward`` and the optimizer's step)."""
        if not self.retired:
            return
        rows = sorted(self.retired)
        for p in self.parameters():
            if p.grad is not None:
                self.member_blocks(p.grad)[rows] = 0.0

    @torch.no_grad()
    def narrowed(self, models: Sequence[nn.Module], keep: Sequence[int]) -> "Stacked":
        """A stack of members ``keep`` only, in that order, from their current state (written into their
        networks ``models[k]`` on the way). A retired member still costs its share of every step; a stack
        whose members end at different steps (one fits early, another trains on) is cheaper narrowed to the
        ones still training. The new stack is in training mode; carry an optimizer's state over with
        :meth:`carry_optimizer_state`."""
        self._check_count(models)
        keep = list(keep)
        if not keep or len(set(keep)) != len(keep) or not all(0 <= k < self.members for k in keep):
            raise ValueError(f"Stacked({self.members} members): keep must name distinct members 0-{self.members - 1} "
                             f"(got {keep})")
        self.write_to(models, keep)
        narrow = Stacked([models[k] for k in keep])
        return narrow.train(self.training)

    @torch.no_grad()
    def carry_optimizer_state(self, optimizer: torch.optim.Optimizer, narrow: "Stacked",
                              narrow_optimizer: torch.optim.Optimizer, keep: Sequence[int]) -> None:
        """Give ``narrow_optimizer`` (over ``narrow``, this stack :meth:`narrowed` to ``keep``) the kept members'
        state from ``optimizer`` (over this stack): each tensor shaped like its parameter (a momentum buffer,
        Adam's moments) is cut to the kept members' rows; a scalar (Adam's step count) is copied."""
        keep = list(keep)
        params = dict(narrow.named_parameters())
        for name, p in self.named_parameters():
            state = optimizer.state.get(p)
            if not state:
                continue
            q = params[name]
            narrow_optimizer.state[q] = {
                key: (self.member_blocks(value)[keep].reshape(q.shape).clone()
                      if isinstance(value, Tensor) and value.shape == p.shape
                      else value.clone() if isinstance(value, Tensor) else copy.deepcopy(value))
                for key, value in state.items()}

    def member_blocks(self, tensor: Tensor) -> Tensor:
        """A parameter (or its gradient) of the stacked network as a ``(K, -1)`` view: row ``k`` is member
        ``k``'s part (every stacked tensor keeps a member's values contiguous along its first dimension)."""
        return tensor.view(self.members, -1)

    def _check_count(self, models: Sequence[nn.Module]) -> None:
        if len(models) != self.members:
            raise ValueError(f"Stacked({self.members} members): expected {self.members} networks "
                             f"(got {len(models)})")


class StackedSGD(torch.optim.SGD):
    """SGD over a :class:`Stacked` network with one learning rate per member: member ``k`` takes the step
    ``torch.optim.SGD`` would take alone at ``lr × member_lrs[k]`` (momentum, Nesterov, weight decay, as
    there; ``lr`` is the schedule's factor, 1 for a constant rate). ``params``: the stack's parameters or
    parameter groups (default: all of them, one group). Several runs that differ in their seed
    *and* their learning rate — a learning-rate grid — train as one stack.

    Every parameter of the stack keeps a member's values contiguous (:meth:`Stacked.member_blocks`), so the
    update is torch's with its last multiplication per member: multi-tensor (``torch._foreach_*``) operations
    over the parameters, as torch's own SGD, a few calls per step whatever the network's size. Dampening and
    ``maximize`` are not supported.
    """

    def __init__(self, stacked: "Stacked", member_lrs: Sequence[float], params=None, lr: float = 1.0,
                 momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> None:
        rates = [float(r) for r in member_lrs]
        if len(rates) != stacked.members or not all(r > 0 for r in rates):
            raise ValueError(f"StackedSGD: member_lrs must be {stacked.members} positive learning rates, one per "
                             f"member of the stack (got {rates})")
        super().__init__(stacked.parameters() if params is None else params, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov)
        self.member_lrs = torch.tensor(rates, dtype=torch.float64)
        self._rate_cache: dict[Tensor, Tensor] = {}

    def _rates(self, p: Tensor) -> Tensor:
        """Each member's rate over its block of ``p``, shaped like ``p`` (cached per parameter)."""
        rates = self._rate_cache.get(p)
        if rates is None or rates.shape != p.shape or rates.dtype != p.dtype:
            k = len(self.member_lrs)
            rates = self._rate_cache[p] = self.member_lrs.to(p.dtype).repeat_interleave(p.numel() // k).view_as(p)
        return rates

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            decay, momentum = group["weight_decay"], group["momentum"]
            grads = [p.grad for p in params]
            d = torch._foreach_add(grads, params, alpha=decay) if decay != 0 else grads
            if momentum != 0:
                bufs = []
                for p, dp in zip(params, d):
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:   # the first step: the buffer is the step itself
                        state["momentum_buffer"] = torch.clone(dp).detach()
                        state["fresh"] = True
                    bufs.append(state["momentum_buffer"])
                old = [(b, dp) for p, b, dp in zip(params, bufs, d) if not self.state[p].pop("fresh", False)]
                if old:
                    torch._foreach_mul_([b for b, _ in old], momentum)
                    torch._foreach_add_([b for b, _ in old], [dp for _, dp in old])
                d = torch._foreach_add(d, bufs, alpha=momentum) if group["nesterov"] else bufs
            steps = torch._foreach_mul(d, [self._rates(p) for p in params])
            torch._foreach_add_(params, steps, alpha=-group["lr"])
        return loss


def stack(models: Sequence[nn.Module]) -> Stacked:
    """One network computing every network of ``models`` (same class and architecture) at once, each
    member from its network's current weights and statistics. See :mod:`bnlab.models.stacked`."""
    return Stacked(models)
