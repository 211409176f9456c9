"""One training step's gradients, and their error against another step's (shared by the tests
that run a whole model on different kernel paths: test_models, test_threads)."""
from __future__ import annotations

import torch


def step_grads(model, x, target, autocast=False) -> list[torch.Tensor]:
    """The gradients of cross_entropy(model(x), target) for every parameter of model; the forward
    under bfloat16 autocast if asked, the backward outside it (as training runs)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = torch.nn.functional.cross_entropy(model(x), target.to(x.device))
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def rel_error(grads, exact) -> float:
    """||grads - exact|| / ||exact|| over all gradients at once (on the CPU, float64): some are 0
    in exact arithmetic (a BatchNorm's beta feeding another BatchNorm), where a per-tensor relative
    error means nothing."""
    a = torch.cat([u.to("cpu", torch.float64).flatten() for u in grads])
    b = torch.cat([v.to("cpu", torch.float64).flatten() for v in exact])
    return ((a - b).norm() / b.norm()).item()
