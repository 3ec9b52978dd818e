"""Claim 1's training loop: plain SGD that also measures internal covariate shift, three ways.

Santurkar et al. 2018 (https://arxiv.org/abs/1805.11604) asked whether BN helps *because* it reduces
internal covariate shift (ICS). This loop measures, on the same run:

(a) distributional shift — the 15/50/85th percentiles, mean and std of a middle layer's inputs at
    every step (their step-to-step change is the "shift");
(b) gradient ICS — for layer i, G is its gradient on the batch and G′ its gradient on the *same* batch
    after every earlier layer took its SGD step; ‖G − G′‖ and cos(G, G′) (their Def. 2.1);
(c) smoothness along the gradient — the loss and gradient at θ − η·g for several step sizes η.

Plain SGD (no momentum) is used so that "the step" is exactly −lr·G, as in the definition. The noisy-BN
arm (:class:`NoisyBatchNorm`) perturbs every BN output with a per-channel scale and shift whose
distribution is redrawn every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from bnlab.models.norms import is_batch_norm
from bnlab.study.metrics import gradient_ics, percentiles, smoothness
from bnlab.study.signal import weight_layers

__all__ = ["NoisyBatchNorm", "run_ics", "gradients_after_earlier_steps"]


class NoisyBatchNorm:
    """Adds non-stationary noise after every BN layer of ``model`` (in training mode only).

    Each step (:meth:`resample`), per BN layer, the noise *distribution* is redrawn — a centre
    μ_t ~ U(−shift, shift) and a spread s_t ~ U(1, scale) — and then per channel c a shift
    b_c ~ N(μ_t, 1)·shift and a scale a_c ~ U(1/s_t, s_t); the layer's output y becomes a_c·y + b_c.
    The layer inputs downstream thus move every step, by design.
    """

    def __init__(self, model: nn.Module, shift: float = 1.0, scale: float = 1.5, seed: int = 0) -> None:
        if shift < 0 or scale < 1:
            raise ValueError(f"NoisyBatchNorm: need shift >= 0 and scale >= 1 (got {shift}, {scale})")
        self.shift, self.scale = shift, scale
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        self.layers = [m for m in model.modules() if is_batch_norm(m)]
        self.noise: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        self.resample()

    def resample(self) -> None:
        g = self.generator
        for m in self.layers:
            c = m.num_features
            centre = (torch.rand((), generator=g) * 2 - 1) * self.shift
            spread = 1 + torch.rand((), generator=g) * (self.scale - 1)
            shift = (centre + torch.randn(c, generator=g)) * self.shift
            log_scale = (torch.rand(c, generator=g) * 2 - 1) * torch.log(spread)
            self.noise[id(m)] = (log_scale.exp(), shift)

    def _hook(self, module, inputs, output):
        if not module.training:
            return None
        scale, shift = self.noise[id(module)]
        shape = [1, -1] + [1] * (output.dim() - 2)
        return output * scale.to(output).reshape(shape) + shift.to(output).reshape(shape)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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


def _smoothness(model, x, y, grads: dict, step_sizes) -> dict:
    base = {n: p.detach() for n, p in model.named_parameters()}
    g_flat = torch.cat([grads[n].flatten() for n in base if n in grads])
    losses, changes = [], []
    for eta in step_sizes:
        moved = {n: (p - eta * grads[n] if n in grads else p).requires_grad_(True) for n, p in base.items()}
        loss = _loss_fn(model, moved, dict(model.named_buffers()), x, y)
        new = torch.autograd.grad(loss, [moved[n] for n in base if n in grads], allow_unused=True)
        new_flat = torch.cat([(g if g is not None else torch.zeros_like(moved[n])).flatten()
                              for g, n in zip(new, [n for n in base if n in grads])])
        losses.append(float(loss.detach()))
        changes.append(float((new_flat - g_flat).norm()))
    return smoothness(losses, changes, step_sizes, float(g_flat.norm()))


def run_ics(spec: dict, data, build_model) -> tuple[str, dict]:
    from bnlab.data import Loader
    from bnlab.train import evaluate
    seed, lr, total_steps = spec["seed"], spec["lr"], spec["steps"]
    torch.manual_seed(seed)
    model = build_model(spec, data)
    model.train()
    noise = (NoisyBatchNorm(model, spec.get("noise_shift", 1.0), spec.get("noise_scale", 1.5), seed)
             if spec.get("norm") == "noisy_bn" else None)
    convs = [name for name, m in weight_layers(model) if not isinstance(m, nn.Linear)]
    fractions = spec.get("ics_layers", [0.25, 0.5, 0.75])
    measured = [convs[min(len(convs) - 1, int(f * len(convs)))] + ".weight" for f in fractions]
    middle = dict(model.named_modules())[convs[len(convs) // 2]]
    dist = {"p15": [], "p50": [], "p85": [], "mean": [], "std": []}

    def record_inputs(module, inputs):
        if module.training and record_inputs.active:
            h = inputs[0].detach()
            for key, value in zip(("p15", "p50", "p85"), percentiles(h, (15, 50, 85))):
                dist[key].append(value)
            dist["mean"].append(float(h.mean()))
            dist["std"].append(float(h.std()))
    record_inputs.active = True
    hook = middle.register_forward_pre_hook(record_inputs)

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = Loader(data.train_x, data.train_y, spec["batch_size"], shuffle=True, drop_last=True, seed=seed)
    losses, ema, ema_losses = [], None, []
    ics = {"step": [], "ema_loss": [], "distance": [], "cosine": []}
    smooth = {"step": [], "ema_loss": [], "loss_range": [], "grad_change": [], "beta": []}
    status, step = "done", 0
    while step < total_steps and status == "done":
        for x, y in loader:
            if step >= total_steps:
                break
            if noise is not None:
                noise.resample()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value) or value > spec.get("divergence_loss", 1e3):
                status = "diverged"
                break
            losses.append(value)
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            ema_losses.append(ema)
            if step % spec.get("measure_every", 10) == 0:
                record_inputs.active = False
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                distances, cosines = [], []
                for layer in measured:
                    d, c = gradient_ics(grads[layer], gradients_after_earlier_steps(model, x, y, grads, lr, layer))
                    distances.append(d)
                    cosines.append(c)
                for key, value_ in (("step", step), ("ema_loss", ema), ("distance", distances), ("cosine", cosines)):
                    ics[key].append(value_)
                s = _smoothness(model, x, y, grads, spec.get("step_sizes", [0.05, 0.1, 0.2, 0.4]))
                smooth["step"].append(step)
                smooth["ema_loss"].append(ema)
                for key in ("loss_range", "grad_change", "beta"):
                    smooth[key].append(s[key])
                record_inputs.active = True
            optimizer.step()
            step += 1
    hook.remove()
    if noise is not None:
        noise.remove()  # evaluation is in eval mode anyway; the hooks are gone for good
    model.eval()
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
    result = {"losses": losses, "ema_losses": ema_losses, "dist": dist, "ics": ics, "smooth": smooth,
              "layers": measured, "middle_layer": convs[len(convs) // 2],
              "final": {"test_acc": float(test_acc), "test_loss": float(test_loss),
                        "train_loss": ema if ema is not None else math.nan}}
    return status, result
