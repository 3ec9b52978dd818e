"""Signal propagation at initialization (claim 5): what each residual block does to the stream.

One training-mode forward of one batch through a freshly initialized network, with forward hooks on
every block and its ``branch`` (the contract of :mod:`bnlab.models`), then one backward:

* ``stream_sq_mean`` / ``stream_var`` — average channel squared mean and variance of the residual
  stream after each block (Brock et al. 2021, https://arxiv.org/abs/2101.08692);
* ``branch_var`` — variance of the branch output; ``ratio`` — Var(branch) / Var(shortcut(x)), which De &
  Smith 2020 (https://arxiv.org/abs/2002.10444) predict shrinks like 1/depth-so-far with BN;
* ``grad_norms`` — ‖∂L/∂W‖ for every convolution and the classifier, in forward order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.study.metrics import channel_stats, variance_ratio

__all__ = ["run_signal", "weight_layers"]


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and linear layers in forward (registration) order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def _batch(data, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train_x), generator=generator)[:size]
    return data.train_x[index.to(data.train_x.device)], data.train_y[index.to(data.train_y.device)]


def run_signal(spec: dict, data, build_model) -> tuple[str, dict]:
    torch.manual_seed(spec["seed"])
    model = build_model(spec, data)
    model.train()  # BN normalizes with batch statistics, as in the first training step
    x, y = _batch(data, spec.get("batch_size", 256), spec["seed"])
    records: list[dict] = [{} for _ in model.blocks]
    branch_out: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        def block_hook(module, inputs, output, i=i):
            sq_mean, var = channel_stats(output)
            records[i].update(stream_sq_mean=sq_mean, stream_var=var)
            if module.shortcut is not None:
                with torch.no_grad():
                    skip = module.shortcut(inputs[0])
                records[i]["ratio"] = variance_ratio(branch_out.pop(i), skip)
            else:
                records[i]["ratio"] = None

        def branch_hook(module, inputs, output, i=i):
            branch_out[i] = output.detach()
            records[i]["branch_var"] = float(output.detach().double().var(unbiased=False))

        handles.append(block.register_forward_hook(block_hook))
        handles.append(block.branch.register_forward_hook(branch_hook))
    try:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    grad_norms = [float(m.weight.grad.norm()) if m.weight.grad is not None else 0.0
                  for _, m in weight_layers(model)]
    result = {"blocks": records, "grad_norms": grad_norms, "loss": float(loss.detach()),
              "logit_var": float(logits.detach().double().var())}
    finite = math.isfinite(float(loss.detach())) and all(math.isfinite(g) for g in grad_norms)
    return ("done" if finite else "diverged"), result
