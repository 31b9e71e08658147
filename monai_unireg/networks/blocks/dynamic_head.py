"""UniReg's dynamic deformation head: a controller generates, per sample, the weights of a small 1x1x1 conv head.

Li et al., "UniReg: Foundation Model for Controllable Medical Image Registration" (``shared/papers/unireg.txt``,
Sec. 3.1.3, Eq. 5), after the dynamic filters of DoDNet (Zhang et al., CVPR 2021): the controller ``G`` maps the
conditional control vector ``c = [T, e, pool(E)]`` to ``omega = G(c)``, the weights and biases of three cascaded
1x1x1 convolutions ``8 -> 8 -> 8 -> 3`` (171 numbers), which turn the backbone features ``E`` of that sample into
its displacement field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg.validation import check_bool, check_integer

__all__ = ["DynamicDeformationHead", "head_parameter_count"]

#: Channels of the paper's head: 8 features in, two hidden layers of 8, 3 displacement components out.
UNIREG_HEAD_CHANNELS = (8, 8, 8, 3)


def head_parameter_count(channels: Sequence[int] = UNIREG_HEAD_CHANNELS) -> int:
    """Weights and biases of the 1x1x1 conv cascade ``channels[0] -> ... -> channels[-1]``.

    ``(8, 8, 8, 3)``: weights ``8*8 + 8*8 + 8*3 = 152``, biases ``8 + 8 + 3 = 19``, 171 in all (paper Sec. 3.1.3).
    """
    return sum(c_in * c_out + c_out for c_in, c_out in zip(channels[:-1], channels[1:]))


class DynamicDeformationHead(nn.Module):
    """Per-sample 1x1x1 conv cascade whose parameters come from a controller (or are static, for the ablation).

    ``forward(features [B, C_0, *S], condition [B, K]) -> [B, C_L, *S]``: ``omega = W c + b`` (the controller
    ``G``, one linear layer as DoDNet's 1x1x1 controller conv) is split into the layers' weights and biases, and
    sample ``i`` goes through ``conv_L(... LeakyReLU(conv_1(E_i; omega_i)) ...)`` (LeakyReLU 0.2 between layers, none
    after the last; one batched matrix product per layer).

    Initialisation: ``b`` holds a freshly initialised static head (Kaiming-normal hidden layers for LeakyReLU(0.2),
    last layer ``N(0, 1e-5)``, zero biases, so a new network predicts a near-zero field) and ``W = 0``: the
    untrained dynamic head *is* that static head, whatever the condition, and learns from there how the condition
    changes it. With ``dynamic=False`` (the paper's Table 6 "w/o dynamic deformation generation") the head's
    parameters are that same vector, learned directly, and the condition is ignored.

    Args:
        condition_channels: ``K``, length of the control vector (tasks + 2 registration types + pooled features).
        channels: ``(C_0, ..., C_L)`` of the cascade (paper: ``(8, 8, 8, 3)``, 171 parameters).
        dynamic: generate the parameters from the condition (``False``: a static head).
    """

    def __init__(
        self, condition_channels: int, channels: Sequence[int] = UNIREG_HEAD_CHANNELS, dynamic: bool = True
    ) -> None:
        super().__init__()
        self.channels = tuple(check_integer(c, "channels", 1) for c in channels)
        if len(self.channels) < 2:
            raise ValueError(f"channels must list at least input and output channels, got {tuple(channels)!r}.")
        self.condition_channels = check_integer(condition_channels, "condition_channels", 1)
        self.dynamic = check_bool(dynamic, "dynamic")
        self.num_parameters = head_parameter_count(self.channels)
        initial = self._static_initialisation()
        if self.dynamic:
            self.controller = nn.Linear(self.condition_channels, self.num_parameters)
            with torch.no_grad():
                self.controller.weight.zero_()
                self.controller.bias.copy_(initial)
        else:
            self.static_parameters = nn.Parameter(initial)

    def _static_initialisation(self) -> torch.Tensor:
        """The flat parameter vector of a new static head (layer by layer: weight ``[out, in]`` then bias)."""
        parts = []
        for layer, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            conv = nn.Conv3d(c_in, c_out, 1)
            if layer == len(self.channels) - 2:
                nn.init.normal_(conv.weight, std=1e-5)
            else:
                nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.zeros_(conv.bias)
            parts += [conv.weight.detach().flatten(), conv.bias.detach()]
        return torch.cat(parts)

    def head_parameters(self, condition: torch.Tensor) -> torch.Tensor:
        """``omega``, ``[B, P]`` (``P = 171`` for the paper's head), of each sample's condition ``[B, K]``."""
        if condition.ndim != 2 or condition.shape[1] != self.condition_channels:
            raise ValueError(
                f"condition must be [B, {self.condition_channels}] control vectors, got {tuple(condition.shape)}."
            )
        if self.dynamic:
            return self.controller(condition)
        return self.static_parameters.expand(condition.shape[0], -1)

    def forward(self, features: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``[B, C_0, *S]`` features and ``[B, K]`` conditions -> ``[B, C_L, *S]`` (per-sample 1x1x1 convs)."""
        if features.ndim < 3 or features.shape[1] != self.channels[0]:
            raise ValueError(f"features must be [B, {self.channels[0]}, *S], got {tuple(features.shape)}.")
        if condition.shape[0] != features.shape[0]:
            raise ValueError(
                f"condition has {condition.shape[0]} rows for a batch of {features.shape[0]} feature maps."
            )
        omega = self.head_parameters(condition.to(features.dtype))
        batch, spatial = features.shape[0], features.shape[2:]
        x = features.reshape(batch, self.channels[0], -1)
        offset = 0
        for layer, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            weight = omega[:, offset : offset + c_out * c_in].view(batch, c_out, c_in)
            offset += c_out * c_in
            bias = omega[:, offset : offset + c_out].view(batch, c_out, 1)
            offset += c_out
            x = torch.baddbmm(bias, weight, x)
            if layer < len(self.channels) - 2:
                x = F.leaky_relu(x, 0.2)
        return x.view(batch, self.channels[-1], *spatial)
