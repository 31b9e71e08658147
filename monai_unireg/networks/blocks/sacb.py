"""SACB-Net building blocks: the spatial-awareness convolution block and the 27-neighbour soft matching flow.

Cheng et al., "SACB-Net: Spatial-awareness Convolutions for Medical Image Registration", CVPR 2025
(``shared/papers/sacbnet.txt``); details read from the authors' code in ``shared/reference/METHODS.md``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from monai_unireg.networks.blocks.cost_volume import NEIGHBOUR_OFFSETS, neighbour_cost_volume
from monai_unireg.networks.blocks.kmeans import kmeans
from monai_unireg.validation import check_image, check_integer

#: Lloyd iteration cap of the SACB K-Means (ours; the reference code runs to convergence). Measured with
#: ``benchmarks/sacbnet_kmeans_cap.py`` (2 BrainSynth pairs, untrained network): a cap of 50 changed the cluster of
#: up to 1.5 % of the voxels at 1/4 and 1/2 (field up to 0.77 voxel apart) against convergence (a cap of 1000); a
#: cap of 200 gave the converged clusters at every level (0 voxels changed, field difference 0; convergence took
#: between 129 and 200 iterations at 1/2). Each entry still stops as soon as its centroids settle.
KMEANS_ITERATIONS = 200

__all__ = ["SpatialAwareConvBlock", "conv_norm_act", "soft_matching_flow"]

#: Slope of every LeakyReLU of SACB-Net (paper Sec. 3.1).
NEGATIVE_SLOPE = 0.1


def conv_norm_act(in_channels: int, out_channels: int) -> Convolution:
    """SACB-Net's convolution layer: 3x3x3 convolution (with bias), InstanceNorm (no affine), LeakyReLU(0.1)."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=3,
        act=("leakyrelu", {"negative_slope": NEGATIVE_SLOPE}),
        norm="instance",
    )


def _mlp(in_features: int, hidden: int, out_features: int) -> list[nn.Module]:
    """``Linear -> ReLU -> Linear -> ReLU -> Linear`` (the paper's mapping functions F_w and F_b)."""
    return [
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_features),
    ]


class SpatialAwareConvBlock(nn.Module):
    """Spatial-awareness convolution block (SACB, paper Sec. 3.2, Eqs. 2-7).

    For an input ``F`` (``C`` channels):

    1. project: ``P = LeakyReLU(InstanceNorm(conv3(F)))``;
    2. spatial context (Eqs. 2-4): every voxel's 3x3x3 patch of ``P`` (zero padding) is averaged over its 27
       positions; K-Means (:func:`~monai_unireg.networks.blocks.kmeans`) splits these vectors into ``N`` clusters
       ``S_n`` with centroids ``S_n^c`` (no gradient flows through the clustering);
    3. adaptive kernels (Eqs. 5-6): cluster ``n`` convolves with ``W_n = sigmoid(MLP_w(S_n^c)) * W`` (a
       27-vector modulating the taps of one shared learnable kernel ``W`` ``[C_out, C, 27]``) and adds the bias
       ``MLP_b(S_n^c)``; each voxel uses its own cluster's kernel;
    4. output (Eq. 7): ``F + LeakyReLU(SAC(P))``.

    The adaptive convolution is vectorised over clusters and batch. Since the cluster modulation scales whole
    taps, ``SAC(P)(v) = b_n(v) + sum_k g_n(v)[k] (W_k P)(v + o_k)``: each voxel's 27 tap weights ``g`` and bias are
    gathered from its cluster, and for each of the 27 taps one matrix product ``W_k P`` over all voxels is shifted
    by the tap's offset, scaled by the per-voxel weight and accumulated. Memory: at inference a padded
    channels-last copy of ``P``, one ``[B, D+2, H+2, W+2, C]`` tap response at a time, ``[B, D*H*W, 27]`` weights
    and the ``[B, D*H*W, C]`` output; training keeps the 27 tap responses for the backward pass (27 times the
    features, as the unfolded patches of the authors' code). K-Means needs ``B*P*N`` more values for the ``P``
    voxels it fits on.

    Args:
        channels: input and output channels ``C`` (the residual needs them equal).
        num_clusters: ``N`` (paper: 7; 5 in the authors' code default).
        kernel_hidden: hidden width of ``MLP_w`` (128 in the authors' code).
        bias_hidden: hidden width of ``MLP_b`` (64 in the authors' code).
        kmeans_iterations: Lloyd iteration cap.
        kmeans_tolerance: K-Means stops when no centroid moves further than this.
        kmeans_fit_points: K-Means fits its centroids on at most this many evenly spaced voxels, then labels every
            voxel (``None``: fit on all voxels, as the authors' code, which also iterates to convergence; a
            160x192x224 input has 860,160 voxels at 1/2 resolution).
        seed: K-Means initialisation seed (the same clustering for the same features).
    """

    def __init__(
        self,
        channels: int,
        num_clusters: int = 7,
        kernel_hidden: int = 128,
        bias_hidden: int = 64,
        kmeans_iterations: int = KMEANS_ITERATIONS,
        kmeans_tolerance: float = 1e-4,
        kmeans_fit_points: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.channels = check_integer(channels, "channels", 1)
        self.num_clusters = check_integer(num_clusters, "num_clusters", 1)
        self.kmeans_iterations = check_integer(kmeans_iterations, "kmeans_iterations", 1)
        self.kmeans_tolerance = float(kmeans_tolerance)
        if not math.isfinite(self.kmeans_tolerance) or self.kmeans_tolerance < 0:
            raise ValueError(f"kmeans_tolerance must be a finite number >= 0, got {kmeans_tolerance!r}.")
        self.kmeans_fit_points = (
            None if kmeans_fit_points is None else check_integer(kmeans_fit_points, "kmeans_fit_points", num_clusters)
        )
        self.seed = check_integer(seed, "seed", 0)
        taps = 27
        self.project = conv_norm_act(channels, channels)
        self.weight = nn.Parameter(torch.empty(channels, channels, taps))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv3d's default initialisation
        self.kernel_mlp = nn.Sequential(*_mlp(channels, check_integer(kernel_hidden, "kernel_hidden", 1), taps))
        self.bias_mlp = nn.Sequential(*_mlp(channels, check_integer(bias_hidden, "bias_hidden", 1), channels))

    def cluster(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial context estimation (Eqs. 2-4).

        Args:
            projected: ``[B, C, D, H, W]`` projected features ``P``.

        Returns:
            ``[B, D*H*W]`` cluster index of every voxel and ``[B, N, C]`` centroids (no gradient).
        """
        patch_means = F.avg_pool3d(F.pad(projected.detach(), (1, 1, 1, 1, 1, 1)), 3, stride=1)  # zeros count
        points = patch_means.flatten(2).transpose(1, 2)  # [B, D*H*W, C]
        return kmeans(
            points, self.num_clusters, self.kmeans_iterations, self.kmeans_tolerance, self.seed, self.kmeans_fit_points
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Refine ``features`` ``[B, C, D, H, W]`` -> ``[B, C, D, H, W]`` (Eq. 7)."""
        check_image(features, "features")
        if features.shape[1] != self.channels:
            raise ValueError(f"features must have {self.channels} channels, got shape {tuple(features.shape)}.")
        batch, channels, depth, height, width = features.shape
        projected = self.project(features)
        labels, centroids = self.cluster(projected)
        modulation = torch.sigmoid(self.kernel_mlp(centroids))  # [B, N, 27]
        bias = self.bias_mlp(centroids)  # [B, N, C]
        voxel_modulation = modulation.gather(1, labels.unsqueeze(-1).expand(-1, -1, modulation.shape[-1]))
        voxel_bias = bias.gather(1, labels.unsqueeze(-1).expand(-1, -1, bias.shape[-1]))
        padded = F.pad(projected, (1, 1, 1, 1, 1, 1)).permute(0, 2, 3, 4, 1).contiguous()  # [B, D+2, H+2, W+2, C]
        taps = self.weight.permute(2, 1, 0)  # [27, C_in, C_out], tap k = 9 z + 3 y + x of the 3x3x3 window
        modulation_map = voxel_modulation.view(batch, depth, height, width, 27)
        response = voxel_bias.view(batch, depth, height, width, channels)  # accumulates the taps in place
        for k, (z, y, x) in enumerate(itertools.product(range(3), repeat=3)):
            tap_response = padded @ taps[k]  # every voxel's contribution through tap k
            window = tap_response[:, z : z + depth, y : y + height, x : x + width]
            response = response.addcmul_(window, modulation_map[..., k : k + 1])
        response = response.permute(0, 4, 1, 2, 3)
        return features + F.leaky_relu(response, NEGATIVE_SLOPE)


def soft_matching_flow(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Displacement from the 27-neighbour similarity matching of SACB-Net (paper Eqs. 8-10).

    ``p_o(x) = softmax_o <F_f(x), F_m(x + o)>`` over the offsets ``o`` in ``{-1, 0, 1}^3`` (raw dot products, moving
    features zero outside the volume), ``phi(x) = sum_o p_o(x) o``: a soft arg-max of at most one voxel per axis.

    Args:
        fixed: ``[B, C, D, H, W]`` fixed features.
        moving: ``[B, C, D, H, W]`` (warped) moving features.

    Returns:
        ``[B, 3, D, H, W]`` displacement in voxels (MONAI ``Warp`` convention: ``moving(x + phi(x)) ~ fixed(x)``).
    """
    probabilities = torch.softmax(neighbour_cost_volume(fixed, moving, metric="dot"), dim=1)
    offsets = NEIGHBOUR_OFFSETS.to(device=probabilities.device, dtype=probabilities.dtype)
    return torch.einsum("bk...,kc->bc...", probabilities, offsets)
