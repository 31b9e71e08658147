"""PromptReg: the RDP backbone with the Registration Prompt Generator at its bottleneck.

Xie et al., "PromptReg: Universal Medical Image Registration via Task Prompt Learning and Domain Knowledge
Transfer", MICCAI 2025 (``shared/papers/promptreg.txt``); the backbone is RDP (Wang et al., "Recursive Deformable
Pyramid Network for Unsupervised Medical Image Registration", TMI 2024); layer details read from the authors' code
in ``shared/reference/METHODS.md``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from monai_unireg.io import load_network
from monai_unireg.networks.blocks.prompt import ConvInsBlock, PromptOutput, RegistrationPromptGenerator
from monai_unireg.spatial import _compose, _warp, integrate_velocity, resize_ddf
from monai_unireg.validation import check_bool, check_image_pair, check_integer, plain_tensor

__all__ = ["RDPNet", "PromptReg", "PromptRegOutput", "load_promptreg", "RDP_STEPS"]

#: Recursive refinement steps at 1/8, 1/4, 1/2 and full resolution (RDP; METHODS.md).
RDP_STEPS = (2, 2, 3, 1)


#: Fields move between the levels of the stride-2 pyramid as the authors' code moves them: upsampled x2 (trilinear,
#: ``align_corners=False``) and multiplied by 2, the half-voxel geometry in which grid and values double exactly.
PYRAMID_ALIGN_CORNERS = False


class _ResidualBlock(nn.Module):
    """``act(norm(x + conv(act(norm(x)))))`` with InstanceNorm and LeakyReLU(0.1) (the authors' ``ResBlock``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm3d(channels), nn.LeakyReLU(0.1), nn.Conv3d(channels, channels, 3, padding=1)
        )
        self.out = nn.Sequential(nn.InstanceNorm3d(channels), nn.LeakyReLU(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(x) + x)


class _Encoder(nn.Sequential):
    """Features at 1, 1/2, 1/4, 1/8 with ``c, 2c, 4c, 8c`` channels (stride-2 convolution + residual block)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        levels = [ConvInsBlock(in_channels, channels)]
        for k in range(3):
            levels.append(
                nn.Sequential(
                    nn.Conv3d(channels * 2**k, channels * 2 ** (k + 1), 3, stride=2, padding=1),
                    _ResidualBlock(channels * 2 ** (k + 1)),
                )
            )
        super().__init__(*levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in self:
            x = level(x)
            features.append(x)
        return features


def _velocity_head(in_channels: int) -> nn.Conv3d:
    """3x3x3 convolution to a velocity, weights ``N(0, 1e-5)`` and zero bias (a new network is near identity)."""
    head = nn.Conv3d(in_channels, 3, 3, padding=1)
    nn.init.normal_(head.weight, std=1e-5)
    nn.init.zeros_(head.bias)
    return head


class RDPNet(nn.Module):
    """RDP, the recursive deformable pyramid (PromptReg's backbone; PromptReg's "w/o RPG" ablation by itself).

    Two encoders (moving, fixed; not shared) give features at 1, 1/2, 1/4, 1/8 (channels ``c``, ``2c``, ``4c``,
    ``8c``). The decoder starts from ``C_4 = convs([F_4, M_4])`` and refines the field recursively, coarse to
    fine, ``steps`` times per level (2, 2, 3, 1). One step at a level: warp the moving features by the field so
    far, ``C = convs([F_l, warped M_l, D])`` (``D``: the decoder features, upsampled from the coarser level by a
    transposed convolution, or reduced from the previous step's ``C``), a velocity ``v = head(C)``, its exponential
    ``w = exp(v)`` (scaling and squaring, 7 steps) and ``phi <- phi o w = w + phi(x + w)``. At 1/8 the first step
    reads ``C_4`` directly. Between levels the field is resized x2 (values scaled). Convolution blocks are conv3 +
    InstanceNorm + LeakyReLU; velocity heads start at ``N(0, 1e-5)``, so a new network is close to the identity.

    Args:
        in_channels: channels of each image.
        channels: base channels ``c`` (16 in the paper's code).
        steps: refinement steps at 1/8, 1/4, 1/2, 1 (RDP: 2, 2, 3, 1).
        integration_steps: scaling-and-squaring steps (7).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 16,
        steps: Sequence[int] = RDP_STEPS,
        integration_steps: int = 7,
    ) -> None:
        super().__init__()
        c = check_integer(channels, "channels", 1)
        self.steps = tuple(check_integer(s, "steps", 1) for s in steps)
        if len(self.steps) != 4:
            raise ValueError(f"steps must hold 4 values (levels 1/8, 1/4, 1/2, 1), got {tuple(steps)!r}.")
        self.integration_steps = check_integer(integration_steps, "integration_steps", 0)
        self.encoder_moving = _Encoder(check_integer(in_channels, "in_channels", 1), c)
        self.encoder_fixed = _Encoder(in_channels, c)
        self.bottleneck = nn.Sequential(ConvInsBlock(16 * c, 8 * c), ConvInsBlock(8 * c, 8 * c))
        level_channels = [c, 2 * c, 4 * c, 8 * c]  # features at 1, 1/2, 1/4, 1/8
        # Level 3 (1/8): C has 8c channels; its recursion reads [F_4, warped M_4, C] (24c) back to 8c.
        # Levels 0-2: C = convs([F_l, warped M_l, D]) keeps 3 x level channels; D comes from the coarser C.
        self.heads = nn.ModuleList([_velocity_head(3 * level_channels[k]) for k in range(3)] + [_velocity_head(8 * c)])
        self.combine = nn.ModuleList(
            [nn.Sequential(ConvInsBlock(3 * ch, 3 * ch), ConvInsBlock(3 * ch, 3 * ch)) for ch in level_channels[:3]]
            + [nn.Sequential(ConvInsBlock(24 * c, 8 * c), ConvInsBlock(8 * c, 8 * c))]
        )
        self.reduce = nn.ModuleList(
            [
                ConvInsBlock(3 * ch, ch) if self.steps[3 - k] > 1 else nn.Identity()
                for k, ch in enumerate(level_channels[:3])
            ]
        )
        coarser = [6 * c, 12 * c, 8 * c]  # channels of C at 1/2, 1/4, 1/8
        self.upsample = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose3d(coarser[k], level_channels[k], 4, stride=2, padding=1),
                nn.InstanceNorm3d(level_channels[k]),
                nn.LeakyReLU(0.1),
            )
            for k in range(3)
        )
        self.config = {
            "in_channels": in_channels,
            "channels": c,
            "steps": list(self.steps),
            "integration_steps": self.integration_steps,
        }

    def fuse_bottleneck(self, context: torch.Tensor) -> torch.Tensor:
        """Hook on ``C_4`` before the decoder: identity here, the prompt in :class:`PromptReg`."""
        return context

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Register ``moving`` to ``fixed``: ``[B, in_channels, D, H, W]`` each, every size divisible by 8.

        Returns:
            ``[B, 3, D, H, W]`` displacement in voxels, ``warp(moving, ddf) ~ fixed``.
        """
        check_image_pair(moving, fixed)
        if any(s % 8 for s in moving.shape[2:]):
            raise ValueError(
                f"moving/fixed spatial size must be divisible by 8 (three stride-2 levels), got "
                f"{tuple(moving.shape[2:])}; resize or pad the images (PromptReg resizes to 160^3)."
            )
        if moving.shape[1] != self.config["in_channels"]:
            raise ValueError(f"moving and fixed must have {self.config['in_channels']} channels, got {moving.shape}.")
        moving_features = self.encoder_moving(plain_tensor(moving))
        fixed_features = self.encoder_fixed(plain_tensor(fixed))
        context = self.fuse_bottleneck(self.bottleneck(torch.cat([fixed_features[3], moving_features[3]], dim=1)))
        flow = self._exp(self.heads[3](context))
        for _ in range(self.steps[0] - 1):
            warped = _warp(moving_features[3], flow)
            context = self.combine[3](torch.cat([fixed_features[3], warped, context], dim=1))
            flow = _compose(flow, self._exp(self.heads[3](context)))
        for level in (2, 1, 0):
            decoded = self.upsample[level](context)
            flow = resize_ddf(flow, decoded.shape[2:], align_corners=PYRAMID_ALIGN_CORNERS)
            for step in range(self.steps[3 - level]):
                if step:
                    decoded = self.reduce[level](context)
                warped = _warp(moving_features[level], flow)
                context = self.combine[level](torch.cat([fixed_features[level], warped, decoded], dim=1))
                flow = _compose(flow, self._exp(self.heads[level](context)))
        return flow

    def _exp(self, velocity: torch.Tensor) -> torch.Tensor:
        return integrate_velocity(velocity, self.integration_steps)


@dataclass
class PromptRegOutput:
    """:meth:`PromptReg.register`'s result: the field and what the prompt losses need.

    Attributes:
        ddf: ``[B, 3, *S]`` displacement in voxels.
        prompt: the prompt generator's output (weights, weighted prompt, knowledge base).
    """

    ddf: torch.Tensor
    prompt: PromptOutput


class PromptReg(RDPNet):
    """PromptReg (paper Sec. 2, Fig. 2): RDP whose bottleneck features ``C_4`` are fused with a task prompt.

    ``C_4 <- convs([C_4, P])`` with ``P`` from :class:`~monai_unireg.networks.blocks.RegistrationPromptGenerator`;
    the rest is :class:`RDPNet`. ``forward(moving, fixed) -> ddf``; :meth:`register` also returns the prompt
    weights, the weighted prompt and the knowledge base for the orthogonality and task-similarity losses (the
    domain index of each pair is needed only there, in training).

    Args:
        input_size: training size (paper: 160^3; the prompts are ``input_size / 8``, resized for other sizes).
        num_domains: ``Z``, prompts in the knowledge base: the number of training datasets.
        in_channels: channels of each image.
        channels: backbone base channels (16).
        steps: RDP refinement steps per level.
        temperature: ``tau`` of the prompt weights (paper: 0.1).
        use_prompt: ``False`` builds the backbone alone (the "w/o RPG" ablation), same as :class:`RDPNet`.
        integration_steps: scaling-and-squaring steps (7).
    """

    def __init__(
        self,
        input_size: Sequence[int] = (160, 160, 160),
        num_domains: int = 5,
        in_channels: int = 1,
        channels: int = 16,
        steps: Sequence[int] = RDP_STEPS,
        temperature: float = 0.1,
        use_prompt: bool = True,
        integration_steps: int = 7,
    ) -> None:
        super().__init__(in_channels, channels, steps, integration_steps)
        self.input_size = tuple(check_integer(s, "input_size", 8) for s in input_size)
        if len(self.input_size) != 3 or any(s % 8 for s in self.input_size):
            raise ValueError(f"input_size must be 3 sizes divisible by 8, got {tuple(input_size)!r}.")
        self.use_prompt = check_bool(use_prompt, "use_prompt")
        self.config.update(
            input_size=list(self.input_size),
            num_domains=num_domains,
            temperature=temperature,
            use_prompt=self.use_prompt,
        )
        if self.use_prompt:
            size = [s // 8 for s in self.input_size]
            self.prompt_generator = RegistrationPromptGenerator(8 * channels, num_domains, size, temperature)
            self.prompt_fusion = nn.Sequential(
                ConvInsBlock(16 * channels, 8 * channels), ConvInsBlock(8 * channels, 8 * channels)
            )
        self._last_prompt: PromptOutput | None = None

    def fuse_bottleneck(self, context: torch.Tensor) -> torch.Tensor:
        if not self.use_prompt:
            return context
        self._last_prompt = self.prompt_generator(context)
        return self.prompt_fusion(torch.cat([context, self._last_prompt.prompt], dim=1))

    def pop_prompt(self) -> PromptOutput:
        """The prompt generator's output of the last forward pass, handed over once (then forgotten).

        Training calls the network through its (possibly ``DistributedDataParallel``) wrapper and then reads the
        prompt here for the orthogonality and task-similarity losses.
        """
        if self._last_prompt is None:
            raise ValueError("no prompt to hand over: run a forward pass of a network built with use_prompt=True.")
        prompt, self._last_prompt = self._last_prompt, None
        return prompt

    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> PromptRegOutput:
        """:meth:`forward` plus the prompt generator's output (``use_prompt=True`` only)."""
        return PromptRegOutput(self.forward(moving, fixed), self.pop_prompt())


def load_promptreg(path: str | os.PathLike) -> PromptReg:
    """A :class:`PromptReg` built from a checkpoint's ``"config"`` and filled with its weights (``model.pt`` or
    ``checkpoint_epoch=N.pt`` of the bundle's train.yaml). Mismatched files raise a ``ValueError`` naming the file."""
    return load_network(path, functools.partial(_promptreg_from_config, os.fspath(path)), "PromptReg")


def _promptreg_from_config(path: str, config: dict | None) -> PromptReg:
    if config is None:
        raise ValueError(f"weights file {path!r} is not a PromptReg checkpoint (no 'config': its size and domains).")
    return PromptReg(**config)
