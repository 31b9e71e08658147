"""adam_on_field's Adam against torch.optim.Adam: the same values bit for bit (it avoids torch.optim's import)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_unireg.engines.instance_optimisation import adam_on_field


def _reference(initial, objective, iterations, learning_rate, eps, schedule):
    """The loop as it was with ``torch.optim.Adam``."""
    field = nn.Parameter(initial.detach().clone())
    optimizer = torch.optim.Adam([field], lr=learning_rate, eps=eps)
    losses = []
    with torch.enable_grad():
        for step in range(iterations + 1):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = objective(field)
            losses.append(float(loss.detach()))
            if step == iterations:
                break
            loss.backward()
            if schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate * float(schedule(step))
            optimizer.step()
    return field.detach(), losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule", [None, lambda step: (1 - step / 25) ** 2])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_adam_is_torch_optim_adam_bit_for_bit(dtype, schedule, eps) -> None:
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(1, 3, 6, 7, 5, generator=generator, dtype=dtype)
    initial = torch.randn(1, 3, 6, 7, 5, generator=generator, dtype=dtype) * 0.1

    def objective(field):
        # a smooth non-quadratic loss whose gradients span many magnitudes (some below eps)
        difference = field - target
        return (
            difference.square() * torch.linspace(1e-9, 1.0, difference.numel(), dtype=dtype).view_as(field)
        ).sum() + (field.diff(dim=2).abs().mean()), {}

    ours, our_losses = adam_on_field(initial, objective, 25, 0.05, eps=eps, schedule=schedule)
    theirs, their_losses = _reference(initial, objective, 25, 0.05, eps, schedule)
    assert torch.equal(ours, theirs)
    assert our_losses == their_losses
