"""check_tensor's finiteness check (one min/max reduction) refuses exactly the tensors isfinite().all() refuses."""

from __future__ import annotations

import pytest
import torch

from monai_unireg.validation import check_tensor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 17, -1])
def test_non_finite_values_are_refused(dtype, bad, where) -> None:
    x = torch.randn(2, 3, 4, 5).to(dtype)
    x.view(-1)[where] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        check_tensor(x, "x")
    assert check_tensor(x, "x", finite=False) is x


def test_finite_empty_integer_and_grad_tensors_pass() -> None:
    large = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    for x in (torch.randn(3, 4), torch.empty(0, 3), torch.arange(5), large, torch.randn(4, requires_grad=True)):
        assert check_tensor(x, "x") is x
