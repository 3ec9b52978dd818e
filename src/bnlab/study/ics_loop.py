"""Claim 1's training loop: plain SGD that also measures internal covariate shift.

Santurkar et al. 2018 (https://arxiv.org/abs/1805.11604) asked whether BN helps *because* it reduces
internal covariate shift (ICS). One run of :func:`run_ics` trains a ResNet with plain SGD (no momentum,
so "the step" is exactly −lr·G, as in their definition) and records:

(a) distributional shift — the 15/50/85th percentiles, mean and std of the middle block's first BN output
    (the activations the noisy arm perturbs; the first convolution's output without BN), every
    ``record_every`` steps;
(b) gradient ICS (their Def. 2.1) at early/middle/late layers — G, a layer's gradient on the batch, and
    G′, its gradient on the *same* batch after every earlier layer took its SGD step: ‖G − G′‖, cos(G, G′);
    with ``probe_steps`` the earlier layers' step is −η·G for each η of that grid as well (the training
    learning rate among them), on the same checkpoints, with G′'s change relative to G (‖G − G′‖/‖G‖) and
    whether the whole step θ − η·G lowers the batch's loss (a *descent* step, or an overshoot);
(c) smoothness along the gradient — the loss and gradient at θ − η·g for several step sizes η;
(d) validation accuracy every ``eval_every`` steps and, at the end, validation and test accuracy.

Several seeds of one run train as one stacked network (:func:`run_ics_stack`, :func:`bnlab.models.stack`):
each member records what it records alone, up to float rounding.

Every BN arm is evaluated with statistics re-estimated on clean training batches
(:func:`bnlab.tools.recalibrate.recalibrate_bn` with the noise hooks off): running averages gathered while the
noise was on describe a network nobody evaluates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from bnlab.models.norms import is_batch_norm
from bnlab.study.metrics import gradient_ics, percentiles, smoothness
from bnlab.study.signal import weight_layers

__all__ = ["NoisyBatchNorm", "noisy_layers", "run_ics", "run_ics_stack", "gradients_after_earlier_steps", "clean_statistics"]


def noisy_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Where claim 1 injects noise: the first BN of every residual branch, in forward order.

    Its output goes through a ReLU and a convolution into the branch's next BN, which renormalizes it —
    the residual-net analogue of Santurkar et al.'s VGG, where a BN follows every noisy layer. The stem's
    BN and each branch's last BN are left clean: they feed the un-normalized residual stream, where
    injected noise would accumulate up to the classifier with nothing renormalizing it.
    """
    found = []
    for name, module in model.named_modules():
        branch = getattr(module, "branch", None)
        if not isinstance(branch, nn.Sequential):
            continue
        norms = [(part, m) for part, m in branch.named_children() if is_batch_norm(m)]
        if len(norms) >= 2:  # a later BN in the same branch renormalizes the first one's output
            found.append((f"{name}.branch.{norms[0][0]}", norms[0][1]))
    if not found:
        raise ValueError(f"noisy BN: {type(model).__name__} has no residual branch with two batch-norm layers; "
                         f"noise is injected only where a following BN renormalizes it (use norm='bn')")
    return found


class NoisyBatchNorm:
    """Santurkar et al.'s "noisy BN": non-stationary, per-activation noise after chosen BN layers.

    At every step (:meth:`resample`) and for every layer, the noise *distribution* is redrawn with
    ``d = strength``: an additive mean μ ~ U(−d, d) and spread σ ~ U(0, d), and a multiplicative log-mean
    ν ~ U(−d/2, d/2) and log-spread τ ~ U(0, d/2). Each forward in training mode then perturbs every
    activation of every sample independently: ``y ← y · exp(ν + τ·ε₁) + (μ + σ·ε₂)`` with ε₁, ε₂ ~ N(0, 1)
    i.i.d. per value. In eval mode, or while :attr:`enabled` is ``False``, outputs are untouched.

    Args:
        model: the network; noise goes after :func:`noisy_layers` (or ``layers``).
        strength: d above (> 0).
        seed: seeds the noise's own generator (the model's initialization and data order are untouched).
        layers: modules to perturb instead of :func:`noisy_layers`.
    """

    def __init__(self, model: nn.Module, strength: float = 1.0, seed: int = 0,
                 layers: Optional[list[nn.Module]] = None) -> None:
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
            raise ValueError(f"NoisyBatchNorm: strength must be a positive number (got {strength!r})")
        self.strength, self.seed = float(strength), seed
        self.layers = list(layers) if layers is not None else [m for _, m in noisy_layers(model)]
        self.enabled = True
        self._generators: dict[torch.device, torch.Generator] = {}
        self.params: dict[int, tuple[float, float, float, float]] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        self.resample()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(10_000 + self.seed)
        return self._generators[device]

    def resample(self) -> None:
        """Draw this step's noise distribution for every layer: (μ, σ, ν, τ)."""
        d, g = self.strength, self._generator(torch.device("cpu"))
        for m in self.layers:
            u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
            self.params[id(m)] = ((2 * u[0] - 1) * d, u[1] * d, (u[2] - 0.5) * d, u[3] * d / 2)

    def _hook(self, module, inputs, output):
        if not (module.training and self.enabled):
            return None
        mu, sigma, nu, tau = self.params[id(module)]
        g = self._generator(output.device)
        eps_scale = torch.randn(output.shape, generator=g, device=output.device, dtype=output.dtype)
        eps_shift = torch.randn(output.shape, generator=g, device=output.device, dtype=output.dtype)
        return output * torch.exp(nu + tau * eps_scale) + (mu + sigma * eps_shift)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def clean_statistics(model: nn.Module, noise: Optional[NoisyBatchNorm], data, batch_size: int,
                     num_batches: int, seed: int) -> None:
    """Re-estimate every BN layer's running statistics on clean training batches (noise off), in place."""
    from bnlab.data import Loader
    from bnlab.tools.recalibrate import recalibrate_bn
    if not any(is_batch_norm(m) for m in model.modules()):
        return
    enabled = noise.enabled if noise is not None else None
    if noise is not None:
        noise.enabled = False
    try:
        loader = Loader(data.train_x, data.train_y, batch_size, shuffle=True, drop_last=True, seed=seed + 7_919)
        recalibrate_bn(model, loader, num_batches=num_batches)
    finally:
        if noise is not None:
            noise.enabled = enabled


def _evaluate_clean(model, noise, data, x, y, batch_size, num_batches, seed) -> tuple[float, float]:
    """(loss, accuracy) on (x, y) with clean statistics, leaving the training run's statistics as they were."""
    from bnlab.train import evaluate
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    clean_statistics(model, noise, data, batch_size, num_batches, seed)
    loss, acc = evaluate(model, x, y)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return loss, acc


def _loss_fn(model, params, buffers, x, y):
    # buffers are cloned so the extra forwards leave the real running statistics untouched
    logits = functional_call(model, ({**params}, {k: v.clone() for k, v in buffers.items()}), (x,))
    return nn.functional.cross_entropy(logits, y)


def gradients_after_earlier_steps(model: nn.Module, x, y, grads: dict, lr: float, layer: str,
                                  loss_fn=None) -> torch.Tensor:
    """G′ for the parameter named ``layer``: its gradient on (x, y) after every parameter registered
    before it took the SGD step ``−lr·grad`` (registration order is forward order in our ResNets).
    ``loss_fn(model, params, buffers, x, y)`` defaults to cross-entropy through ``functional_call``."""
    names = [n for n, _ in model.named_parameters()]
    position = names.index(layer)
    params = {n: (p.detach() - lr * grads[n]) if i < position and n in grads else p.detach()
              for i, (n, p) in enumerate(model.named_parameters())}
    params[layer] = params[layer].clone().requires_grad_(True)
    loss = (loss_fn or _loss_fn)(model, params, dict(model.named_buffers()), x, y)
    return torch.autograd.grad(loss, params[layer])[0]


def _probe(model, x, y, grads: dict, layers: list[str], etas: list[float], loss: float) -> dict:
    """Gradient ICS at each probe step η on one batch: for every η and measured layer, ‖G − G′‖, cos(G, G′)
    and ‖G − G′‖/‖G‖ (G′ after every earlier layer stepped by −η·G); and for every η whether the whole
    step θ − η·G lowers the batch's loss below ``loss`` (a descent step) — a step that raises it overshoots,
    and its G′ measures the overshoot, not the shift of a layer's inputs."""
    out = {"distance": [], "cosine": [], "relative": [], "descent": []}
    base = {n: p.detach() for n, p in model.named_parameters()}
    for eta in etas:
        pairs = [gradient_ics(grads[layer], gradients_after_earlier_steps(model, x, y, grads, eta, layer))
                 for layer in layers]
        norms = [float(torch.linalg.vector_norm(grads[layer].double())) for layer in layers]
        out["distance"].append([d for d, _ in pairs])
        out["cosine"].append([c for _, c in pairs])
        out["relative"].append([d / n if n > 0 else math.nan for (d, _), n in zip(pairs, norms)])
        with torch.no_grad():
            moved = {n: (p - eta * grads[n]) if n in grads else p for n, p in base.items()}
            after = float(_loss_fn(model, moved, dict(model.named_buffers()), x, y))
        out["descent"].append(bool(math.isfinite(after) and after < loss))
    return out


def _smoothness(model, x, y, grads: dict, step_sizes) -> dict:
    base = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n in base if n in grads]
    g_flat = torch.cat([grads[n].flatten() for n in names])
    losses, changes = [], []
    for eta in step_sizes:
        moved = {n: (p - eta * grads[n] if n in grads else p).requires_grad_(True) for n, p in base.items()}
        loss = _loss_fn(model, moved, dict(model.named_buffers()), x, y)
        new = torch.autograd.grad(loss, [moved[n] for n in names], allow_unused=True)
        new_flat = torch.cat([(g if g is not None else torch.zeros_like(moved[n])).flatten()
                              for g, n in zip(new, names)])
        losses.append(float(loss.detach()))
        changes.append(float((new_flat - g_flat).norm()))
    return smoothness(losses, changes, step_sizes, float(g_flat.norm()))


def _measured_layers(model: nn.Module, fractions) -> list[str]:
    """Weights of the convolutions at ``fractions`` of the depth (early/middle/late), stem excluded
    (the first layer has no earlier layer, so its G′ = G)."""
    convs = [name for name, m in weight_layers(model) if not isinstance(m, nn.Linear)][1:]
    return list(dict.fromkeys(convs[min(len(convs) - 1, int(f * len(convs)))] + ".weight" for f in fractions))


def _distribution_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The middle block's first ReLU: its input is the first BN's output (plus noise in the noisy arm), or
    the first convolution's output without BN — the activations noisy BN perturbs."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "branch", None), nn.Sequential)]
    if not blocks:
        raise ValueError(f"claim 1: {type(model).__name__} has no residual blocks")
    name, block = blocks[len(blocks) // 2]
    part, relu = next((part, m) for part, m in block.branch.named_children() if isinstance(m, nn.ReLU))
    return f"{name}.branch.{part}", relu


class _IcsRun:
    """One claim-1 run's state and bookkeeping around its SGD steps (see :func:`run_ics`): the network and
    its noise, the records, and what happens after a step's backward (divergence, measurements) and after
    its update (validation). :func:`run_ics` takes the steps one network at a time and
    :func:`run_ics_stack` for several seeds as one stacked network; both call these methods in the same
    order, so a member of a stack records what the run alone records."""

    def __init__(self, spec: dict, data, build_model) -> None:
        self.spec, self.data = spec, data
        self.seed, self.lr, self.total_steps = spec["seed"], spec["lr"], spec["steps"]
        torch.manual_seed(self.seed)  # same seed, same initialization in every arm
        self.model = model = build_model(spec, data)
        model.train()
        self.noise = NoisyBatchNorm(model, spec["noise"], self.seed) if spec.get("noise") else None
        self.has_bn = any(is_batch_norm(m) for m in model.modules())
        self.measured = _measured_layers(model, spec.get("ics_layers", [0.25, 0.5, 0.75]))
        self.measure_every = spec.get("measure_every", 0)
        self.record_every = spec.get("record_every", 10)
        self.batch_size, self.recal_batches = spec["batch_size"], spec.get("recal_batches", 20)
        self.val_x = data.val_x[:spec.get("val_eval_size")]
        self.val_y = data.val_y[:spec.get("val_eval_size")]
        self.dist_name, self.dist_module = _distribution_layer(model)
        self.dist = {"step": [], "p15": [], "p50": [], "p85": [], "mean": [], "std": []}
        self.step, self.recording = 0, True
        self.hook = self.dist_module.register_forward_pre_hook(lambda module, inputs: self.record(module, inputs[0]))
        self.losses, self.ema_losses, self.ema = [], [], None
        self.curve = {"step": [], "val_acc": [], "val_loss": []}
        self.ics = {"step": [], "ema_loss": [], "distance": [], "cosine": []}
        self.probe_steps = [float(eta) for eta in spec.get("probe_steps") or []]
        self.probe = {"etas": self.probe_steps, "step": [], "loss": [], "distance": [], "cosine": [],
                      "relative": [], "descent": []}
        self.smooth = {"step": [], "ema_loss": [], "loss_range": [], "grad_change": [], "beta": []}
        self.status = "done"

    def record(self, module, h) -> None:
        """The distribution of the activations noisy BN perturbs, every ``record_every`` training steps."""
        if module.training and self.recording and self.step % self.record_every == 0:
            h = h.detach()
            self.dist["step"].append(self.step)
            for key, value in zip(("p15", "p50", "p85"), percentiles(h, (15, 50, 85))):
                self.dist[key].append(value)
            self.dist["mean"].append(float(h.mean()))
            self.dist["std"].append(float(h.std()))

    def validate(self, step: int) -> None:
        from bnlab.train import evaluate
        if self.has_bn:
            loss, acc = _evaluate_clean(self.model, self.noise, self.data, self.val_x, self.val_y, self.batch_size,
                                        self.recal_batches, self.seed)
        else:
            loss, acc = evaluate(self.model, self.val_x, self.val_y)
        self.curve["step"].append(step)
        self.curve["val_loss"].append(loss if math.isfinite(loss) else None)
        self.curve["val_acc"].append(acc)

    def measures_now(self) -> bool:
        return bool(self.measure_every) and self.step % self.measure_every == 0

    def after_backward(self, x, y, value: float, grads: Optional[dict] = None) -> bool:
        """The step's loss ``value`` and gradients are known (in the model's ``.grad`` or ``grads``): stop
        on divergence, else book the loss and measure when due. Returns whether the run goes on."""
        if not math.isfinite(value) or value > self.spec.get("divergence_loss", 1e3):
            self.status = "diverged"
            return False
        self.losses.append(value)
        self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
        self.ema_losses.append(self.ema)
        if self.measures_now():
            self._measure(x, y, value, grads)
        return True

    def _measure(self, x, y, value: float, grads: Optional[dict]) -> None:
        model, step, lr, probe_steps = self.model, self.step, self.lr, self.probe_steps
        self.recording = False
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        at_lr = None
        if probe_steps:
            measured_probe = _probe(model, x, y, grads, self.measured, probe_steps, value)
            for key, value_ in (("step", step), ("loss", value), *measured_probe.items()):
                self.probe[key].append(value_)
            at_lr = probe_steps.index(lr) if lr in probe_steps else None
        if probe_steps and at_lr is not None:   # the training step is one of the probe steps: reuse it
            pairs = list(zip(measured_probe["distance"][at_lr], measured_probe["cosine"][at_lr]))
        else:
            pairs = [gradient_ics(grads[layer], gradients_after_earlier_steps(model, x, y, grads, lr, layer))
                     for layer in self.measured]
        for key, value_ in (("step", step), ("ema_loss", self.ema), ("distance", [d for d, _ in pairs]),
                            ("cosine", [c for _, c in pairs])):
            self.ics[key].append(value_)
        s = _smoothness(model, x, y, grads, self.spec.get("step_sizes", [0.05, 0.1, 0.2, 0.4]))
        self.smooth["step"].append(step)
        self.smooth["ema_loss"].append(self.ema)
        for key in ("loss_range", "grad_change", "beta"):
            self.smooth[key].append(s[key])
        self.recording = True

    def after_update(self) -> None:
        """The step's update is taken."""
        self.step += 1

    def validates_now(self) -> bool:
        return self.step % self.spec.get("eval_every", 10 ** 9) == 0 and self.step < self.total_steps

    def finished(self) -> bool:
        return self.step >= self.total_steps

    def finish(self) -> tuple[str, dict]:
        from bnlab.train import evaluate
        self.hook.remove()
        model, data = self.model, self.data
        chance = 1.0 / data.num_classes
        final = {"train_loss": self.ema if self.ema is not None else math.nan, "chance": chance}
        if self.status == "done":
            if self.noise is not None:
                self.noise.remove()
            if self.has_bn:  # every BN arm: statistics of the final weights on clean batches
                clean_statistics(model, None, data, self.batch_size, self.recal_batches, self.seed)
            self.validate(self.step)
            final["val_acc"], final["val_loss"] = self.curve["val_acc"][-1], self.curve["val_loss"][-1]
            final["test_loss"], final["test_acc"] = evaluate(model, data.test_x, data.test_y)  # once, at the end
        else:  # a diverged run scores chance level (its weights are not finite)
            final.update(val_acc=chance, test_acc=chance, val_loss=None, test_loss=None)
        ics = dict(self.ics)
        if self.probe_steps:
            ics["probe"] = self.probe
        result = {"losses": self.losses, "ema_losses": self.ema_losses, "curve": self.curve, "dist": self.dist,
                  "ics": ics, "smooth": self.smooth, "layers": self.measured, "distribution_layer": self.dist_name,
                  "noisy_layers": [n for n, _ in noisy_layers(model)] if self.noise is not None else [],
                  "final": final}
        return self.status, result


def run_ics(spec: dict, data, build_model) -> tuple[str, dict]:
    """One claim-1 run (see the module docstring); returns ``(status, result)``."""
    from bnlab.data import Loader
    run = _IcsRun(spec, data, build_model)
    model = run.model
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    loader = Loader(data.train_x, data.train_y, run.batch_size, shuffle=True, drop_last=True, seed=run.seed)
    going = True
    while going:
        for x, y in loader:
            if run.noise is not None:
                run.noise.resample()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not run.after_backward(x, y, float(loss.detach())):
                going = False
                break
            optimizer.step()
            run.after_update()
            if run.validates_now():
                run.validate(run.step)
            if run.finished():
                going = False
                break
    return run.finish()


def run_ics_stack(specs: list[dict], data, build_model) -> list[tuple[str, dict]]:
    """Several claim-1 runs differing only in their seed and learning rate, trained as one
    :func:`bnlab.models.stack` (each member stepped at its own rate): what :func:`run_ics` gives each, up to
    float rounding.

    Each member keeps its own run (:class:`_IcsRun`): its initial weights, its batches in its own order, its
    noise (drawn from its own generator, in the same order as alone: the stacked noisy layers apply each
    member's noise to its channels), its records of the distribution. Measurements and validations run on
    the member's own network with the stack's weights, statistics and gradients copied into it. A member that
    diverges is finished then, as alone, and held at zero in the stack (:meth:`~bnlab.models.Stacked.retire`:
    the noise hooks sit on the stack's layers, so this stack is not narrowed).
    """
    import bnlab.models
    from bnlab.data import Loader
    members = [_IcsRun(spec, data, build_model) for spec in specs]
    k, first = len(members), members[0]
    stacked = bnlab.models.stack([m.model for m in members])
    stacked.train()
    net = stacked.net
    live = list(range(k))
    # the distribution record and the noise, per member, on the stacked layers
    dist_stacked = net.get_submodule(first.dist_name)

    def record(module, inputs):
        for i, chunk in enumerate(inputs[0].chunk(k, 1)):
            if i in live:
                members[i].record(module, chunk)
    handles = [dist_stacked.register_forward_pre_hook(record)]
    if first.noise is not None:
        for name, _ in noisy_layers(first.model):
            layers = [m.model.get_submodule(name) for m in members]

            def noisy(module, inputs, output, layers=layers):
                if not module.training:
                    return None
                parts = [members[i].noise._hook(layers[i], None, chunk) if i in live else None
                         for i, chunk in enumerate(output.chunk(k, 1))]
                return torch.cat([chunk if p is None else p for p, chunk in zip(parts, output.chunk(k, 1))], 1)
            handles.append(net.get_submodule(name).register_forward_hook(noisy))
    optimizer = bnlab.models.StackedSGD(stacked, [m.lr for m in members])   # plain SGD, each at its rate
    loaders = [Loader(data.train_x, data.train_y, first.batch_size, shuffle=True, drop_last=True, seed=m.seed)
               for m in members]
    outcomes: list = [None] * k

    def finish(i: int) -> None:
        stacked.write_to([m.model for m in members], [i])
        outcomes[i] = members[i].finish()
        outcomes[i][1]["stack"] = {"members": k, "index": i}
        stacked.retire(i, optimizer)
        live.remove(i)

    params = dict(stacked.net.named_parameters())
    while live:
        for batches in zip(*loaders):
            for i in live:
                if members[i].noise is not None:
                    members[i].noise.resample()
            x = torch.stack([b[0] for b in batches])
            y = torch.stack([b[1] for b in batches])
            losses = stacked.member_losses(stacked(x), y)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            values = losses.detach().tolist()
            measuring = [i for i in live if members[i].measures_now()]
            if measuring:
                stacked.write_to([m.model for m in members], measuring)
            for i in list(live):
                run = members[i]
                grads = None
                if i in measuring:
                    shapes = dict(run.model.named_parameters())
                    grads = {n: stacked.member_blocks(p.grad)[i].reshape(shapes[n].shape).clone()
                             for n, p in params.items() if p.grad is not None}
                if not run.after_backward(batches[i][0], batches[i][1], values[i], grads):
                    finish(i)
            stacked.hold_retired()
            optimizer.step()
            for i in list(live):
                members[i].after_update()
                if members[i].validates_now():
                    stacked.write_to([m.model for m in members], [i])
                    members[i].validate(members[i].step)
                elif members[i].finished():
                    finish(i)
            if not live:
                break
    for h in handles:
        h.remove()
    return outcomes
