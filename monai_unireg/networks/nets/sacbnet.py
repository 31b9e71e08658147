"""SACB-Net: a pyramid flow estimator with spatial-awareness convolution blocks.

Cheng et al., "SACB-Net: Spatial-awareness Convolutions for Medical Image Registration", CVPR 2025
(``shared/papers/sacbnet.txt``, Sec. 3 and Fig. 2); layer details read from the authors' code in
``shared/reference/METHODS.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn

from monai_unireg.io import load_network
from monai_unireg.networks.blocks.sacb import (
    KMEANS_ITERATIONS,
    SpatialAwareConvBlock,
    conv_norm_act,
    soft_matching_flow,
)
from monai_unireg.spatial import _compose, _warp, resize_ddf
from monai_unireg.validation import check_image_pair, check_integer, plain_tensor

__all__ = ["SACBNet", "load_sacbnet", "SACBNET_CHANNELS"]

#: Encoder channels at 1, 1/2, 1/4, 1/8 and 1/16 of the input resolution (paper Fig. 2; authors' code ``c = 4``).
SACBNET_CHANNELS = (8, 16, 32, 64, 64)


#: Fields move between pyramid levels in the geometry of the average-pooled features: coarse voxel ``i`` covers fine
#: voxels ``2i, 2i + 1`` (half-voxel, ``align_corners=False``), so upsampling doubles both grid and values exactly.
#: (Corner-aligned resizing would scale values by ``(N_f - 1) / (N_c - 1)``: 2.11 at 1/16 of 160, a 5 % error.)
PYRAMID_ALIGN_CORNERS = False


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_norm_act(in_channels, out_channels), conv_norm_act(out_channels, out_channels))


class SACBNet(nn.Module):
    """SACB-Net (paper Fig. 2, Eq. 11): shared encoder, SACB-refined features and soft matching per level.

    - Encoder (shared by both images): at full resolution a stem ``conv(in -> channels[0] / 2)`` and two
      convolutions to ``channels[0]``; at each coarser level average pooling x2 then two convolutions (every
      convolution 3x3x3 + InstanceNorm + LeakyReLU(0.1), as the authors' code).
    - Levels 1/16 .. 1/2 (coarse to fine): the field so far is upsampled x2 to the level (values x2, in the
      half-voxel geometry of the average-pooled pyramid: :data:`PYRAMID_ALIGN_CORNERS`), the moving
      features are warped by it, one :class:`~monai_unireg.networks.blocks.sacb.SpatialAwareConvBlock` per level
      (shared by fixed and moving) refines both, :func:`~monai_unireg.networks.blocks.sacb.soft_matching_flow`
      gives the increment ``delta`` (at most one voxel per axis) and the field becomes
      ``phi o delta = delta + phi(x + delta)`` (:func:`monai_unireg.spatial.compose`).
    - Full resolution: no matching; two convolutions refine both feature maps, and a head of two convolutions
      plus a plain 3x3x3 convolution (small initial weights) on ``[fixed, warped moving]`` predicts the last
      increment, composed the same way.

    With the default channels it has 1,105,591 parameters (paper Table 1: 1.11 M).

    Args:
        input_size: working size of the bundle and command line (images are resized to it before the network);
            every axis must be divisible by 16. ``forward`` accepts any size divisible by 16.
        in_channels: channels of each image.
        channels: encoder channels at the five levels.
        num_clusters: K-Means clusters ``N`` of the SACBs (paper: 7), one value or one per level (1/16 .. 1/2).
        kmeans_iterations: Lloyd iteration cap of every SACB (:data:`~.blocks.sacb.KMEANS_ITERATIONS`: 200).
        kmeans_tolerance: K-Means stopping tolerance (largest centroid move).
        kmeans_fit_points: K-Means fits on at most this many evenly spaced voxels and then labels all of them
            (``None``: all voxels, as the authors' code); see :class:`SpatialAwareConvBlock`.
        seed: K-Means initialisation seed.
    """

    def __init__(
        self,
        input_size: Sequence[int] = (160, 192, 224),
        in_channels: int = 1,
        channels: Sequence[int] = SACBNET_CHANNELS,
        num_clusters: int | Sequence[int] = 7,
        kmeans_iterations: int = KMEANS_ITERATIONS,
        kmeans_tolerance: float = 1e-4,
        kmeans_fit_points: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.input_size = _check_size(input_size, "input_size")
        channels = tuple(check_integer(c, "channels", 2) for c in channels)
        if len(channels) != 5:
            raise ValueError(f"channels must hold 5 values (levels 1 .. 1/16), got {channels!r}.")
        clusters = (num_clusters,) * 4 if isinstance(num_clusters, int) else tuple(num_clusters)
        if len(clusters) != 4:
            raise ValueError(f"num_clusters must be an int or 4 ints (levels 1/16 .. 1/2), got {num_clusters!r}.")
        self.config = {
            "input_size": list(self.input_size),
            "in_channels": check_integer(in_channels, "in_channels", 1),
            "channels": list(channels),
            "num_clusters": [check_integer(n, "num_clusters", 1) for n in clusters],
            "kmeans_iterations": kmeans_iterations,
            "kmeans_tolerance": kmeans_tolerance,
            "kmeans_fit_points": kmeans_fit_points,
            "seed": seed,
        }
        stem = conv_norm_act(in_channels, channels[0] // 2)
        self.encoder = nn.ModuleList(
            [nn.Sequential(stem, *_double_conv(channels[0] // 2, channels[0]))]
            + [nn.Sequential(nn.AvgPool3d(2), *_double_conv(channels[k - 1], channels[k])) for k in range(1, 5)]
        )
        # SACBs of levels 1/2, 1/4, 1/8, 1/16 (index = level)
        self.sacbs = nn.ModuleList(
            [nn.Identity()]
            + [
                SpatialAwareConvBlock(
                    channels[k], clusters[4 - k], 128, 64, kmeans_iterations, kmeans_tolerance, kmeans_fit_points, seed
                )
                for k in range(1, 5)
            ]
        )
        self.full_resolution_refine = _double_conv(channels[0], channels[0])
        last = nn.Conv3d(channels[0], 3, kernel_size=3, padding=1)
        nn.init.normal_(last.weight, std=1e-5)
        nn.init.zeros_(last.bias)
        self.head = nn.Sequential(*_double_conv(2 * channels[0], channels[0]), last)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Features at levels 1, 1/2, 1/4, 1/8, 1/16 of ``image`` ``[B, in_channels, D, H, W]``."""
        features = [self.encoder[0](image)]
        for block in self.encoder[1:]:
            features.append(block(features[-1]))
        return features

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: ``[B, in_channels, D, H, W]``, every spatial size divisible by 16.
            fixed: same shape.

        Returns:
            ``[B, 3, D, H, W]`` displacement in voxels, ``warp(moving, ddf) ~ fixed``.
        """
        check_image_pair(moving, fixed)
        _check_size(moving.shape[2:], "moving/fixed spatial size")
        if moving.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"moving and fixed must have in_channels={self.config['in_channels']} channels, got shape "
                f"{tuple(moving.shape)}."
            )
        moving, fixed = plain_tensor(moving), plain_tensor(fixed)
        moving_features, fixed_features = self.encode(moving), self.encode(fixed)
        phi = None
        for level in range(4, 0, -1):
            level_moving = moving_features[level]
            if phi is not None:
                phi = resize_ddf(phi, level_moving.shape[2:], align_corners=PYRAMID_ALIGN_CORNERS)
                level_moving = _warp(level_moving, phi)
            sacb = self.sacbs[level]
            delta = soft_matching_flow(sacb(fixed_features[level]), sacb(level_moving))
            phi = delta if phi is None else _compose(phi, delta)
        phi = resize_ddf(phi, moving.shape[2:], align_corners=PYRAMID_ALIGN_CORNERS)
        level_moving = self.full_resolution_refine(_warp(moving_features[0], phi))
        level_fixed = self.full_resolution_refine(fixed_features[0])
        delta = self.head(torch.cat([level_fixed, level_moving], dim=1))
        return _compose(phi, delta)


def _check_size(size: Sequence[int], name: str) -> tuple[int, int, int]:
    """Three spatial sizes, each a positive multiple of 16 (four poolings x2)."""
    sizes = tuple(int(s) for s in size)
    if len(sizes) != 3 or any(s < 16 or s % 16 for s in sizes):
        raise ValueError(
            f"{name} must be 3 sizes, each a multiple of 16 (SACB-Net pools four times by 2), got {tuple(size)}; "
            "resize or pad the images (e.g. monai.transforms.ResizeWithPadOrCrop / DivisiblePad(k=16))."
        )
    return sizes


def load_sacbnet(path: str | os.PathLike) -> SACBNet:
    """A :class:`SACBNet` built from a checkpoint's ``"config"`` and filled with its weights.

    Accepted: ``{"config", "model"}`` files written by the bundle's train.yaml (``model.pt``,
    ``checkpoint_epoch=N.pt``), or a bare state dict of the default network. Every tensor must fit: mismatches
    raise a ``ValueError`` naming the file.
    """
    return load_network(path, lambda config: SACBNet(**config) if config else SACBNet(), "SACBNet")
