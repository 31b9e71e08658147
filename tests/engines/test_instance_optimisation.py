"""adam_on_field's Adam against torch.optim.Adam (fused): the same values bit for bit (it avoids torch.optim's import);
adam_descent with a written-out gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_unireg.engines.instance_optimisation import adam_descent, adam_on_field


def _reference(initial, objective, iterations, learning_rate, eps, schedule):
    """The loop as it was with ``torch.optim.Adam`` (its fused kernel, which ours calls)."""
    field = nn.Parameter(initial.detach().clone())
    optimizer = torch.optim.Adam([field], lr=learning_rate, eps=eps, fused=True)
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


def test_adam_descent_takes_the_gradient_it_is_given() -> None:
    """The shared loop with a written-out gradient equals adam_on_field with autograd on the same objective."""
    generator = torch.Generator().manual_seed(4)
    target = torch.randn(1, 3, 5, 6, 4, generator=generator, dtype=torch.float64)
    initial = torch.zeros_like(target)

    def objective(field):
        return (field - target).square().mean(), {}

    def gradient(field):
        return (field - target) * (2.0 / field.numel())

    ours = adam_descent(initial, gradient, 30, 0.1, eps=1e-8, schedule=lambda step: 1.0 - step / 30)
    expected, _ = adam_on_field(initial, objective, 30, 0.1, eps=1e-8, schedule=lambda step: 1.0 - step / 30)
    torch.testing.assert_close(ours, expected, atol=1e-14, rtol=0)
    assert torch.equal(initial, torch.zeros_like(target))  # the start is copied, not moved
