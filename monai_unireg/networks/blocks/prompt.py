"""PromptReg's Registration Prompt Generator (RPG): static knowledge base, dynamic prompt, adaptive fusion.

Xie et al., "PromptReg: Universal Medical Image Registration via Task Prompt Learning and Domain Knowledge
Transfer", MICCAI 2025 (``shared/papers/promptreg.txt``, Sec. 2.1-2.3, Fig. 2); layer details read from the authors'
code in ``shared/reference/METHODS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg.validation import check_image, check_integer

__all__ = ["ConvInsBlock", "PromptOutput", "RegistrationPromptGenerator"]


class ConvInsBlock(nn.Sequential):
    """3x3x3 convolution (bias), InstanceNorm (no affine), LeakyReLU: the convolution block of RDP and PromptReg.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: 3 (or 1 for the prompt fusion's projection).
        stride: 1, or 2 to halve the resolution.
        negative_slope: LeakyReLU slope (authors' code: 0.01).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, negative_slope: float = 0.01
    ) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
            nn.InstanceNorm3d(out_channels),
            nn.LeakyReLU(negative_slope),
        )


@dataclass
class PromptOutput:
    """What the prompt generator computed for a batch (the inputs of PromptReg's prompt losses).

    Attributes:
        prompt: ``[B, C, *S]`` task prompt ``P`` (Sec. 2.3).
        weights: ``[B, Z]`` adaptive weights ``w_i`` (Eq. 3), summing to 1 per sample.
        weighted_prompt: ``[B, C, *S]`` ``p_w = sum_i w_i b_i`` (Eq. 4).
        knowledge_base: ``[Z, C, *S]`` the static prompts ``B`` at the features' size (Sec. 2.1).
    """

    prompt: torch.Tensor
    weights: torch.Tensor
    weighted_prompt: torch.Tensor
    knowledge_base: torch.Tensor


class RegistrationPromptGenerator(nn.Module):
    """The Registration Prompt Generator (paper Fig. 2).

    - Static knowledge base (Sec. 2.1): ``Z`` learnable prompts ``b_i`` shaped like the fused features ``C_4``
      (``[C, *prompt_size]``, Kaiming-normal initialisation as the authors' code).
    - Dynamic prompt (Sec. 2.2): ``p_d = convs([C_4, p_t])`` with a learnable template ``p_t``.
    - Adaptive fusion (Sec. 2.3): ``w = softmax_i(cos(p_d, b_i) / tau)`` (Eqs. 2-3, cosine over the whole
      flattened prompt), ``p_w = sum_i w_i b_i`` (Eq. 4), ``P = conv blocks([p_d, p_w])``.

    The prompt stays spatial, as in the paper (the authors' code pools it to one token for a degenerate
    single-key attention; METHODS.md). For features of another size than ``prompt_size`` the knowledge base and
    the template are resized to it (trilinear), so any input size works.

    Args:
        channels: channels ``C`` of ``C_4`` (8 x the backbone's base channels: 128).
        num_prompts: ``Z``, the number of training domains (tasks).
        prompt_size: spatial size of the prompts (``C_4``'s size at the training input: 20^3 for 160^3).
        temperature: ``tau`` of Eq. 3 (paper: 0.1).
    """

    def __init__(self, channels: int, num_prompts: int, prompt_size: Sequence[int], temperature: float = 0.1) -> None:
        super().__init__()
        channels = check_integer(channels, "channels", 1)
        self.num_prompts = check_integer(num_prompts, "num_prompts", 1)
        self.prompt_size = tuple(check_integer(s, "prompt_size", 1) for s in prompt_size)
        if len(self.prompt_size) != 3:
            raise ValueError(f"prompt_size must hold 3 sizes, got {tuple(prompt_size)!r}.")
        self.temperature = float(temperature)
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
        self.knowledge_base = nn.Parameter(torch.empty(self.num_prompts, channels, *self.prompt_size))
        self.template = nn.Parameter(torch.empty(1, channels, *self.prompt_size))
        for prompt in (self.knowledge_base, self.template):
            nn.init.kaiming_normal_(prompt, a=1e-2, mode="fan_in", nonlinearity="leaky_relu")
        self.dynamic = nn.Sequential(ConvInsBlock(2 * channels, channels), ConvInsBlock(channels, channels))
        self.fusion = nn.Sequential(ConvInsBlock(2 * channels, channels), ConvInsBlock(channels, channels, 1))

    def prompts_at(self, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The knowledge base ``[Z, C, *size]`` and the template ``[1, C, *size]``, resized when needed."""
        size = tuple(size)
        if size == self.prompt_size:
            return self.knowledge_base, self.template
        return tuple(
            F.interpolate(prompt, size=size, mode="trilinear", align_corners=True)
            for prompt in (self.knowledge_base, self.template)
        )

    def forward(self, features: torch.Tensor) -> PromptOutput:
        """Task prompt of the fused features ``C_4`` ``[B, C, *S]`` (see :class:`PromptOutput`)."""
        check_image(features, "features")
        if features.shape[1] != self.knowledge_base.shape[1]:
            raise ValueError(
                f"features must have {self.knowledge_base.shape[1]} channels, got shape {tuple(features.shape)}."
            )
        batch = features.shape[0]
        knowledge_base, template = self.prompts_at(features.shape[2:])
        dynamic = self.dynamic(torch.cat([features, template.expand(batch, -1, -1, -1, -1)], dim=1))
        similarity = F.normalize(dynamic.flatten(1), dim=1) @ F.normalize(knowledge_base.flatten(1), dim=1).t()
        weights = torch.softmax(similarity / self.temperature, dim=1)  # [B, Z]
        weighted = torch.einsum("bz,z...->b...", weights, knowledge_base)
        prompt = self.fusion(torch.cat([dynamic, weighted], dim=1))
        return PromptOutput(prompt, weights, weighted, knowledge_base)
