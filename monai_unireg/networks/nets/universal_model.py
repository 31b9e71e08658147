"""Pre-classifier features of the CLIP-driven Universal Model (UNet backbone), the features used by VoxelOpt.

Liu et al., "CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection", ICCV 2023
(https://github.com/ljwztc/CLIP-Driven-Universal-Model). Its ``'unet'`` backbone is the Models Genesis 3D UNet
(Zhou et al., "Models Genesis", MedIA 2021); the Universal Model feeds the UNet's last decoder output (64 channels,
full resolution) to ``precls_conv = GroupNorm(16, 64) -> ReLU -> Conv3d(64, 8, 1)`` and then to text-conditioned
dynamic heads. VoxelOpt (Zhang et al., MICCAI 2025, https://github.com/tinymilky/VoxelOpt) registers with the
8-channel output of ``precls_conv`` (the "pre-softmax" features). The weights are not shipped here: build the
network with :class:`UniversalModelFeatures` and load a user-supplied checkpoint with
:func:`load_universal_model_checkpoint` (nothing is ever downloaded).

Architecture, as read from the reference code (``model/Unet.py``: ``UNet3D``, ``DownTransition``, ``UpTransition``,
``LUConv``, ``ContBatchNorm3d``; ``model/Universal_model.py``, ``backbone == 'unet'``). Every convolution block is
``Conv3d(k=3, padding=1) -> BatchNorm3d -> ReLU``; ``S`` is the input's spatial shape:

==============  ========================================  ==================  ===========
module          blocks (in -> out channels)               output              resolution
==============  ========================================  ==================  ===========
``down_tr64``   1 -> 32, 32 -> 64, then MaxPool3d(2)      64 (skip: 64)       S / 2
``down_tr128``  64 -> 64, 64 -> 128, then MaxPool3d(2)    128 (skip: 128)     S / 4
``down_tr256``  128 -> 128, 128 -> 256, then MaxPool3d(2) 256 (skip: 256)     S / 8
``down_tr512``  256 -> 256, 256 -> 512 (no pooling)       512                 S / 8
``up_tr256``    ConvT(512 -> 512), cat skip, 768 -> 256,  256                 S / 4
                256 -> 256
``up_tr128``    ConvT(256 -> 256), cat skip, 384 -> 128,  128                 S / 2
                128 -> 128
``up_tr64``     ConvT(128 -> 128), cat skip, 192 -> 64,   64                  S
                64 -> 64
``precls_conv`` GroupNorm(16, 64), ReLU, Conv3d(64, 8, 1) 8                   S
==============  ========================================  ==================  ===========

``ConvT`` is ``ConvTranspose3d(kernel_size=2, stride=2)``; the decoder concatenates ``[upsampled, skip]`` in that
order. Backbone plus ``precls_conv``: 19,074,248 trainable parameters (the bottleneck branch of the Universal Model,
``GAP``/``controller``/organ embedding, is not needed for the features).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg.io import load_weights
from monai_unireg.validation import check_bool, check_image

__all__ = ["UniversalModelFeatures", "load_universal_model_checkpoint", "map_universal_model_keys"]

# Pooling happens three times (after the first three encoder levels), so every spatial size must be a multiple of 8.
SIZE_DIVISOR = 8
# Leading key prefixes written by torch.nn.DataParallel / DistributedDataParallel.
_WRAPPER_PREFIX = "module."
# Prefix of the UNet inside the authors' Universal_model (``self.backbone = UNet3D()``).
_BACKBONE_PREFIX = "backbone."
# Top-level submodules of UniversalModelFeatures: the authors' UNet3D levels and their precls_conv.
SUBMODULES = ("down_tr64", "down_tr128", "down_tr256", "down_tr512", "up_tr256", "up_tr128", "up_tr64", "precls_conv")
# Buffers that do not influence the output; a checkpoint may lack them (older PyTorch) without harm.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class BatchStatisticsNorm3d(nn.BatchNorm3d):
    """``BatchNorm3d`` that can normalise with the statistics of the current batch in eval mode too.

    The reference ``ContBatchNorm3d`` always calls ``F.batch_norm(..., training=True)``: the mean and variance of
    the current batch (over ``B`` and the spatial axes, per channel) normalise the input whatever the module mode,
    and the running buffers are updated as a side effect. Here, with ``batch_statistics=True`` an eval-mode forward
    gives the same output but leaves the running buffers untouched (a frozen feature extractor keeps its state);
    with ``batch_statistics=False`` it is a plain ``BatchNorm3d`` (running statistics in eval mode). Training mode
    is the standard ``BatchNorm3d`` behaviour (batch statistics, running buffers updated).

    Args:
        num_features: number of channels ``C``.
        batch_statistics: use batch statistics in eval mode.
    """

    def __init__(self, num_features: int, batch_statistics: bool = True) -> None:
        super().__init__(num_features)
        self.batch_statistics = check_bool(batch_statistics, "batch_statistics")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``[B, C, D, H, W]``; returns the same shape."""
        if self.training or not self.batch_statistics:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _ConvBlock(nn.Module):
    """``Conv3d(3x3x3, padding 1) -> BatchStatisticsNorm3d -> ReLU`` (the reference ``LUConv``, ``act='relu'``)."""

    def __init__(self, in_channels: int, out_channels: int, batch_statistics: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = BatchStatisticsNorm3d(out_channels, batch_statistics)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, *S] -> [B, C_out, *S]``."""
        return self.activation(self.bn1(self.conv1(x)))


class _Down(nn.Module):
    """Two convolution blocks ``in -> mid -> 2 * mid``, then an optional ``MaxPool3d(2)`` (``DownTransition``)."""

    def __init__(self, in_channels: int, mid_channels: int, pool: bool, batch_statistics: bool) -> None:
        super().__init__()
        self.ops = nn.Sequential(
            _ConvBlock(in_channels, mid_channels, batch_statistics),
            _ConvBlock(mid_channels, 2 * mid_channels, batch_statistics),
        )
        self.maxpool = nn.MaxPool3d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C_in, *S]`` -> (output ``[B, 2 mid, *S / 2]`` (``*S`` without pooling), skip ``[B, 2 mid, *S]``)."""
        skip = self.ops(x)
        return self.maxpool(skip), skip


class _Up(nn.Module):
    """``ConvTranspose3d(k=2, s=2)``, concatenation ``[up, skip]``, two convolution blocks (``UpTransition``)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, batch_statistics: bool) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(
            _ConvBlock(in_channels + skip_channels, out_channels, batch_statistics),
            _ConvBlock(out_channels, out_channels, batch_statistics),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``x [B, C_in, *S / 2]`` and ``skip [B, C_skip, *S]`` -> ``[B, C_out, *S]``."""
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class UniversalModelFeatures(nn.Module):
    """8-channel pre-classifier features of the CLIP-driven Universal Model with its UNet backbone.

    ``forward(image)`` maps ``[B, 1, D, H, W]`` to ``[B, 8, D, H, W]`` (same spatial size): the Models Genesis 3D
    UNet (see the module docstring for the channel table) followed by ``precls_conv``. This is the feature map of
    VoxelOpt (Zhang et al., MICCAI 2025), which registers with it as is (no normalisation of the features).

    Normalisation: the reference BatchNorm (``ContBatchNorm3d``) always uses the statistics of the current batch,
    also at inference; ``batch_statistics=True`` (default) reproduces that in eval mode, so a sample's features
    depend on the other samples of its batch. The reference code extracts features one image at a time
    (batch size 1): pass images one by one to reproduce it. ``batch_statistics=False`` uses the checkpoint's
    running statistics instead (not how the model was used by its authors). The running buffers are never changed
    by an eval-mode forward.

    Input: the Universal Model was trained on CT in RAS orientation at 1.5 mm spacing with HU clipped to
    ``[-175, 250]`` and scaled to ``[0, 1]``; VoxelOpt feeds whole abdomen CT volumes at 2 mm
    (``192 x 160 x 256``) clipped to ``[-500, 800]`` HU and scaled to ``[0, 1]`` (its code's defaults), then
    downsamples the features by 2 (trilinear) for registration. Every spatial size must be a multiple of 8 (three
    2x poolings).

    Parameter and buffer names follow the authors' ``UNet3D`` (``down_tr64.ops.0.conv1.weight``, ...,
    ``up_tr64.ops.1.bn1.running_var``) plus ``precls_conv.{0,2}.{weight,bias}``, i.e. the authors' checkpoint keys
    without their ``module.`` and ``backbone.`` prefixes; see :func:`load_universal_model_checkpoint`.

    Args:
        batch_statistics: normalise with batch statistics in eval mode (reference behaviour).
    """

    def __init__(self, batch_statistics: bool = True) -> None:
        super().__init__()
        batch_statistics = check_bool(batch_statistics, "batch_statistics")
        self.down_tr64 = _Down(1, 32, True, batch_statistics)
        self.down_tr128 = _Down(64, 64, True, batch_statistics)
        self.down_tr256 = _Down(128, 128, True, batch_statistics)
        self.down_tr512 = _Down(256, 256, False, batch_statistics)
        self.up_tr256 = _Up(512, 256, 256, batch_statistics)
        self.up_tr128 = _Up(256, 128, 128, batch_statistics)
        self.up_tr64 = _Up(128, 64, 64, batch_statistics)
        self.precls_conv = nn.Sequential(
            nn.GroupNorm(16, 64),
            nn.ReLU(inplace=True),
            nn.Conv3d(64, 8, kernel_size=1),
        )

    @property
    def batch_statistics(self) -> bool:
        """Whether the BatchNorm layers normalise with batch statistics in eval mode."""
        return all(m.batch_statistics for m in self.modules() if isinstance(m, BatchStatisticsNorm3d))

    @batch_statistics.setter
    def batch_statistics(self, value: bool) -> None:
        value = check_bool(value, "batch_statistics")
        for m in self.modules():
            if isinstance(m, BatchStatisticsNorm3d):
                m.batch_statistics = value

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Compute the features of ``image``.

        Args:
            image: ``[B, 1, D, H, W]`` intensities (see the class docstring for the expected range), each of
                ``D, H, W`` a multiple of 8.

        Returns:
            ``[B, 8, D, H, W]`` pre-classifier features.
        """
        check_image(image, "image")
        if image.shape[1] != 1:
            raise ValueError(f"image must have 1 channel, got shape {tuple(image.shape)}.")
        spatial = tuple(image.shape[2:])
        if any(s % SIZE_DIVISOR for s in spatial):
            raise ValueError(
                f"image spatial size must be a multiple of {SIZE_DIVISOR} along every axis (three 2x poolings), "
                f"got {spatial}; pad or resize it."
            )
        bottleneck_values = image.shape[0] * math.prod(spatial) // SIZE_DIVISOR**3
        if (self.training or self.batch_statistics) and bottleneck_values < 2:
            raise ValueError(
                f"image of shape {tuple(image.shape)} leaves one value per channel at the 1/8-resolution bottleneck, "
                "where batch statistics are undefined; use a larger image or batch."
            )
        x, skip64 = self.down_tr64(image)
        x, skip128 = self.down_tr128(x)
        x, skip256 = self.down_tr256(x)
        x, _ = self.down_tr512(x)
        x = self.up_tr256(x, skip256)
        x = self.up_tr128(x, skip128)
        x = self.up_tr64(x, skip64)
        return self.precls_conv(x)


def map_universal_model_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the authors' checkpoint keys to :class:`UniversalModelFeatures` names and drop the unused ones.

    Mapping (applied in order): strip every leading ``module.`` (``DataParallel``/``DistributedDataParallel``),
    then a leading ``backbone.`` (the UNet inside the authors' ``Universal_model``). So
    ``module.backbone.down_tr64.ops.0.conv1.weight -> down_tr64.ops.0.conv1.weight`` and
    ``module.precls_conv.2.weight -> precls_conv.2.weight``; keys already in this layout (a bare ``UNet3D`` state
    dict, or VoxelOpt's ``UNet3D`` with ``precls_conv`` inside) are kept. Keys whose first component is not in
    ``SUBMODULES`` (``down_tr64``, ..., ``up_tr64``, ``precls_conv``) are dropped: the Universal Model's ``GAP``,
    ``controller``, ``organ_embedding``, ``text_to_vision``, a Models Genesis ``out_tr``, ...

    Args:
        state_dict: the checkpoint's state dict.

    Returns:
        the kept entries under their mapped names.
    """
    mapped: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in state_dict.items():
        name = str(key)
        while name.startswith(_WRAPPER_PREFIX):
            name = name[len(_WRAPPER_PREFIX) :]
        if name.startswith(_BACKBONE_PREFIX):
            name = name[len(_BACKBONE_PREFIX) :]
        if name.split(".", 1)[0] not in SUBMODULES:
            continue
        if name in mapped:
            raise ValueError(f"checkpoint keys {sources[name]!r} and {key!r} both map to parameter {name!r}.")
        mapped[name] = value
        sources[name] = str(key)
    return mapped


def _format_keys(keys: list[str], limit: int = 20) -> str:
    """Comma-separated ``keys``, at most ``limit`` of them, then how many were left out."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys) - limit} more)"


def _extract_state_dict(checkpoint: Any, path: str) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint: ``checkpoint['net']``, ``['state_dict']`` or the mapping itself."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, expected a dict (state dict).")
    for wrapper in ("net", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            return checkpoint[wrapper]
    return checkpoint


def load_universal_model_checkpoint(
    module: UniversalModelFeatures, path: str | os.PathLike[str]
) -> UniversalModelFeatures:
    """Load the authors' Universal Model (UNet backbone) weights into ``module`` in place.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``; it may hold a plain state
    dict or a dict with the state dict under ``'net'`` (the authors' training checkpoints and the released
    ``unet.pth``: ``{'net': ..., 'optimizer': ..., ...}`` with DistributedDataParallel ``module.`` prefixes) or
    ``'state_dict'``. Keys are renamed by :func:`map_universal_model_keys`; the parts this module does not use are
    ignored. Every parameter and buffer of ``module`` must be present with the right shape (``num_batches_tracked``
    may be absent); values are cast to the module's dtype.

    Args:
        module: the network to fill.
        path: checkpoint file supplied by the user.

    Returns:
        ``module``, with the checkpoint's weights.

    Raises:
        ValueError: ``path`` is missing or not a readable ``weights_only`` checkpoint, or it lacks keys of ``module``,
            has keys of the wrong shape, or has keys under ``module``'s submodules that ``module`` does not have
            (e.g. PReLU weights of a differently built UNet).
    """
    if not isinstance(module, UniversalModelFeatures):
        raise ValueError(f"module must be a UniversalModelFeatures, got {type(module).__name__}.")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
    path_str = os.fspath(path)
    checkpoint = load_weights(path_str, "path")
    state_dict = _extract_state_dict(checkpoint, path_str)

    own = module.state_dict()
    mapped = map_universal_model_keys(state_dict)

    unexpected = sorted(k for k in mapped if k not in own)
    missing = sorted(k for k in own if k not in mapped and not k.endswith(_OPTIONAL_SUFFIXES))
    not_tensors = sorted(k for k in mapped if k in own and not isinstance(mapped[k], torch.Tensor))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(mapped[k].shape)}, expected {tuple(own[k].shape)})"
        for k in mapped
        if k in own and isinstance(mapped[k], torch.Tensor) and mapped[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {_format_keys(mismatched)}")
    if not_tensors:
        problems.append(f"non-tensor values: {_format_keys(not_tensors)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if problems:
        raise ValueError(
            f"checkpoint {path_str!r} does not match the Universal Model UNet features "
            f"(keys after stripping 'module.' and 'backbone.'); " + "; ".join(problems) + "."
        )
    own.update(mapped)
    module.load_state_dict(own, strict=True)
    return module
