"""The diffusion term's written-out gradient against autograd."""

from __future__ import annotations

import pytest
import torch

from monai_unireg.losses import diffusion_gradient, diffusion_regularisation


@pytest.mark.parametrize("shape", [(1, 3, 5, 6, 7), (2, 3, 2, 9, 3)])
def test_diffusion_gradient_is_autograd_of_the_diffusion_term(shape):
    field = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    variable = field.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(diffusion_regularisation(variable), variable)
    torch.testing.assert_close(diffusion_gradient(field), expected, atol=1e-15, rtol=0)


def test_diffusion_gradient_of_a_linear_field_lives_on_the_border():
    """u(x) = A x has constant differences: the gradient cancels inside and is only at the first and last planes."""
    axis = torch.arange(6.0, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    field = torch.einsum("ij,j...->i...", torch.tensor([[0.1, 0.2, 0.0], [0.0, -0.3, 0.1], [0.2, 0.0, 0.1]],
                                                       dtype=torch.float64), grid)[None]  # fmt: skip
    gradient = diffusion_gradient(field)
    assert float(gradient[..., 1:-1, 1:-1, 1:-1].abs().max()) < 1e-15
    assert float(gradient.abs().max()) > 1e-4
