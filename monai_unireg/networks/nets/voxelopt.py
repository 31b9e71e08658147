"""VoxelOpt: training-free discrete registration with voxel-adaptive message passing.

Zhang et al., "VoxelOpt: Voxel-Adaptive Message Passing for Discrete Optimization in Deformable Abdominal CT
Registration", MICCAI 2025 (``shared/papers/voxelopt.txt``); details of the authors' code in
``shared/reference/METHODS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from monai_unireg.losses.mind import MINDSSC
from monai_unireg.networks.blocks.adaptive_filter import adaptive_gaussian_filter
from monai_unireg.networks.blocks.cost_volume import NEIGHBOUR_OFFSETS, neighbour_cost_volume, tied_argmin_field
from monai_unireg.spatial import compose, integrate_velocity, resize_ddf, resize_image, warp
from monai_unireg.validation import check_bool, check_image_pair, check_integer, check_option, check_positive

__all__ = ["VoxelOpt", "PAPER_COUPLING", "REFERENCE_COUPLING", "AUTHORS_PYRAMID"]

#: Interaction weights ``1 / (2 theta)`` for the paper's ``theta = {150, 50, 15, 5, 1.5, 0.5}`` (Sec. 3.2).
PAPER_COUPLING = tuple(1.0 / (2.0 * theta) for theta in (150.0, 50.0, 15.0, 5.0, 1.5, 0.5))
#: Interaction weights of the authors' code (METHODS.md): nearly the same schedule, rounded.
REFERENCE_COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)

#: The authors' code's pyramid placement (METHODS.md): features halved once, then 5 levels (deepest 6x5x8 for
#: 192x160x256 inputs). ``VoxelOpt(**AUTHORS_PYRAMID)``.
AUTHORS_PYRAMID = {"num_levels": 5, "finest_level": 1}

FEATURE_NAMES = ("mind", "raw")
SIGMA_MAPPINGS = ("paper", "reference")


class VoxelOpt(nn.Module):
    """Training-free deformable registration by discrete optimisation on a feature pyramid.

    For both images, features ``f`` (fixed) and ``m`` (moving) are computed once at the input resolution and
    downsampled by two (trilinear, corner-aligned, each level from the previous one) ``finest_level + num_levels - 1``
    times; the ``num_levels`` coarsest levels are optimised. From the coarsest level to the finest, with ``phi`` the
    field found so far (upsampled, values rescaled):

    1. warp ``m`` with ``phi`` and build the 27-neighbour L1 cost volume ``C(x, o) = mean_c |f(x) - m(x + o)|``
       (Eq. 3, zero padding);
    2. displacement entropy ``E(x) = -sum_o P log P`` with ``P = softmax(-C / beta)`` (Eq. 4), mapped to a
       per-voxel filter width ``sigma(x)`` (see ``sigma_mapping``);
    3. pre-filter ``C`` with the voxel-adaptive Gaussian (``prefilter_passes`` passes, Table 2 #3 vs #7);
    4. ``v = argmin_o C`` (hard; tied offsets are averaged, see below), ``u = adaptive filter of v``
       (``filter_passes`` passes); then for each coupling weight ``c`` (Eq. 5, theta decreasing):
       ``v = argmin_o C(x, o) + c ||u(x) - o||^2``, ``u = filter(v)``;
    5. integrate ``u`` by scaling and squaring (``integration_steps``) and compose: ``phi <- compose(phi, exp(u))``.

    Ties (ours; the paper does not say): offsets whose cost lies within ``tie_tolerance`` times the sample's mean
    cost of the minimum are all optimal, and ``v`` is their mean (:func:`tied_argmin_field`). A voxel with no
    information (exactly flat in both images: MIND-SSC is then 1 in every channel and all 27 costs are equal) gets
    ``v = 0`` and, its entropy being maximal, the widest filter, so it follows its neighbours instead of moving on
    its own. ``argmin``'s first-offset rule (``(-1, -1, -1)``) and the authors' sum of the tied offsets both drift:
    on an identity pair of BrainVXM2mm (2 mm, 67 % exact-zero background) the first-offset rule moved the
    background by up to 7.1 voxels (mean 3.5 mm), the tie mean by 0; with a known smooth field the endpoint error
    inside the brain stays 0.83 mm with both, on the original and on an 8-bit-quantised copy.
    Padding: moving features outside the volume are zero (the authors' code); replicate padding changed neither
    the endpoint error nor the background motion on those pairs (0.83 mm, 0.92 mm).

    Defaults and why:
        - From the paper (Sec. 3.2): ``num_levels=5``, 27 neighbours (k = 1), L1 cost, 6 coupling steps with the
          theta schedule below, 7 integration steps, ``alpha=1.5``, separable 1D filters along the three axes.
        - From the authors' code (METHODS.md; the paper gives none of these): ``beta=0.1``, 3 filter passes per
          u-step and 3 pre-filter passes, MIND-SSC radius 2 / dilation 2, zero padding of the moving features,
          and the pyramid placement of :data:`AUTHORS_PYRAMID` (``finest_level=1``; our default 0 reads the paper's
          "5-level pyramid" as starting at the input resolution, see ``finest_level``).
        - ``coupling="paper"``: ``1 / (2 theta)`` for the paper's theta schedule; ``"reference"`` gives the code's
          rounded values (the difference is below 10 % at every step).
        - ``sigma_mapping="paper"``: Eq. 6, ``sigma = alpha ln(E / max E + 1)``, ``alpha = 1.5``: weak-signal voxels
          reach ``sigma ~ 1.04`` and confident ones ``0``. ``"reference"`` is the authors' code,
          ``sigma = sigma_min + (sigma_max - sigma_min) log2(1 + E_n)`` with ``E_n`` the entropy min-max normalised
          per image and ``[sigma_min, sigma_max] = [0.1, 0.5]``. Measured with ``benchmarks/peers.py`` pairs
          (BrainSynth, 10 pairs; BrainVXM2mm with a known field): the same Dice (0.660 both) and a lower
          endpoint error for Eq. 6 (1.09 mm against 1.35 mm), the narrower reference range leaving more of the
          integer argmin's noise in the field.
        - ``features="mind"``: the built-in feature of the paper's ablation (Table 2 #2); the paper's best
          features come from a CT segmentation model (:class:`UniversalModelFeatures` with user weights), which
          any ``nn.Module`` mapping ``[B, 1, D, H, W]`` to ``[B, C, D, H, W]`` can provide.

    Any batch size, CPU or CUDA, float32 or float16 inputs (computed in float32; the field is returned in the
    input's dtype). No parameters are learned; a feature module is run without gradients.

    Args:
        features: ``"mind"`` (MIND-SSC, 12 channels), ``"raw"`` (intensities) or an ``nn.Module`` feature extractor.
        num_levels: pyramid levels optimised (each coarser level halves every axis); the paper's "5-level pyramid".
        beta: softmax temperature of the entropy (Eq. 4).
        sigma_mapping: ``"reference"`` or ``"paper"`` (see above).
        alpha: blurring strength of the paper's mapping (Eq. 6).
        sigma_range: ``(sigma_min, sigma_max)`` of the reference mapping.
        coupling: ``"paper"``, ``"reference"`` or a sequence of increasing interaction weights.
        prefilter_passes: adaptive filter passes on the cost volume before optimisation (0 disables it).
        filter_passes: adaptive filter passes in each u-step.
        adaptive: use the entropy-driven ``sigma(x)``; ``False`` uses the constant ``sigma_range[1]``
            everywhere (the paper's non-adaptive ablation, Table 2 #4).
        integration_steps: scaling-and-squaring steps per level.
        mind_radius: MIND-SSC patch radius.
        mind_dilation: MIND-SSC neighbourhood dilation.
        finest_level: how many times the features are halved before the finest optimised level. 0 (ours, the
            paper's text read literally): the 5 levels run from the input resolution, deepest 12x10x16 at 192x160x256,
            reach about 31 voxels (62 mm at 2 mm). 1 (the authors' code, :data:`AUTHORS_PYRAMID`): the features are
            halved once and the 5 levels run from there, deepest 6x5x8, reach about 62 voxels (124 mm); the field is
            upsampled to the input size, so the finest motion is a 2-voxel step. See :meth:`reach`.
        tie_tolerance: costs within ``tie_tolerance x`` (the sample's mean cost at that level) of a voxel's minimum
            count as tied (0: exact ties only); float32 rounding of the filtered costs is about ``1e-7`` relative.

    Attributes:
        progress: ``None``, or ``progress(levels_done, levels_total)`` called after each pyramid level (the command
            line shows a progress bar with it).
    """

    def __init__(
        self,
        features: str | nn.Module = "mind",
        num_levels: int = 5,
        beta: float = 0.1,
        sigma_mapping: str = "paper",
        alpha: float = 1.5,
        sigma_range: Sequence[float] = (0.1, 0.5),
        coupling: str | Sequence[float] = "paper",
        prefilter_passes: int = 3,
        filter_passes: int = 3,
        adaptive: bool = True,
        integration_steps: int = 7,
        mind_radius: int = 2,
        mind_dilation: int = 2,
        finest_level: int = 0,
        tie_tolerance: float = 1e-5,
    ) -> None:
        super().__init__()
        self.feature_extractor = _feature_extractor(features, mind_radius, mind_dilation)
        self.num_levels = check_integer(num_levels, "num_levels", 1)
        self.beta = float(check_positive(beta, "beta"))
        self.sigma_mapping = check_option(sigma_mapping, "sigma_mapping", SIGMA_MAPPINGS)
        self.alpha = float(check_positive(alpha, "alpha"))
        self.sigma_range = _check_sigma_range(sigma_range)
        self.coupling = _coupling_schedule(coupling)
        self.prefilter_passes = check_integer(prefilter_passes, "prefilter_passes", 0)
        self.filter_passes = check_integer(filter_passes, "filter_passes", 0)
        self.adaptive = check_bool(adaptive, "adaptive")
        self.integration_steps = check_integer(integration_steps, "integration_steps", 0)
        self.finest_level = check_integer(finest_level, "finest_level", 0)
        self.tie_tolerance = float(check_positive(tie_tolerance, "tie_tolerance", allow_zero=True))
        self.progress: Callable[[int, int], None] | None = None

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: ``[B, 1, D, H, W]`` moving image (any channels for a custom feature module).
            fixed: ``[B, 1, D, H, W]`` fixed image on the same grid.

        Returns:
            ``[B, 3, D, H, W]`` displacement in voxels, ``warp(moving, ddf) ~ fixed``.
        """
        check_image_pair(moving, fixed)
        sizes = self.pyramid_sizes(fixed.shape[2:])
        with torch.no_grad():
            fixed_pyramid = _feature_pyramid(self._features(fixed), sizes)
            moving_pyramid = _feature_pyramid(self._features(moving), sizes)
            ddf = torch.zeros(fixed.shape[0], 3, *sizes[-1], device=fixed.device, dtype=torch.float32)
            levels = list(reversed(range(self.finest_level, len(sizes))))
            for done, level in enumerate(levels, start=1):
                if tuple(ddf.shape[2:]) != sizes[level]:
                    ddf = resize_ddf(ddf, sizes[level])
                increment = self.solve_level(fixed_pyramid[level], warp(moving_pyramid[level], ddf))
                ddf = compose(ddf, integrate_velocity(increment, self.integration_steps))
                if self.progress is not None:
                    self.progress(done, len(levels))
            if self.finest_level:
                ddf = resize_ddf(ddf, sizes[0])
        return ddf.to(fixed.dtype)

    @staticmethod
    def levels_for(shape: Sequence[int], coarsest: int = 8, maximum: int = 5) -> int:
        """Pyramid levels for a volume of spatial ``shape``: at most ``maximum`` (the paper's 5), and no more than
        keep ``coarsest`` voxels along every axis at the coarsest level (the paper's 192x160x256 volumes keep 10).

        A coarser top level would move whole structures by ``2^(L-1)`` voxels per step on a handful of voxels.
        """
        check_integer(coarsest, "coarsest", 2)
        levels, size = 1, min(int(s) for s in shape)
        while levels < check_integer(maximum, "maximum", 1) and size // 2 >= coarsest:
            size //= 2
            levels += 1
        return levels

    def pyramid_sizes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial sizes from the input resolution (first) to the coarsest level (last); each halves every axis.

        ``finest_level + num_levels`` sizes: the first ``finest_level`` are not optimised."""
        sizes = [tuple(int(s) for s in shape)]
        halvings = self.finest_level + self.num_levels - 1
        for _ in range(halvings):
            sizes.append(tuple(s // 2 for s in sizes[-1]))
        if min(sizes[-1]) < 2:
            raise ValueError(
                f"moving and fixed of spatial shape {tuple(shape)} are too small for num_levels={self.num_levels} "
                f"with finest_level={self.finest_level}: the coarsest level would be {sizes[-1]}; use fewer levels "
                f"or at least {2 ** (halvings + 1)} voxels per axis."
            )
        return sizes

    def reach(self) -> int:
        """Largest displacement along an axis, in input voxels, that the pyramid can build: each level's velocity
        moves at most one of its voxels (``2^l`` input voxels at level ``l``), ``sum_l 2^l`` over the optimised
        levels (scaling and squaring of a varying field can exceed it slightly)."""
        return sum(2**level for level in range(self.finest_level, self.finest_level + self.num_levels))

    def solve_level(self, fixed_features: torch.Tensor, moving_features: torch.Tensor) -> torch.Tensor:
        """One level's discrete optimisation (steps 1-4 of the class docstring).

        Args:
            fixed_features: ``[B, C, *S]`` fixed features at this level.
            moving_features: ``[B, C, *S]`` moving features warped by the field found so far.

        Returns:
            ``[B, 3, *S]`` residual velocity ``u`` in voxels of this level, each component in [-1, 1].
        """
        cost = neighbour_cost_volume(fixed_features, moving_features, metric="l1")
        sigma = self.filter_width(cost)
        cost = adaptive_gaussian_filter(cost, sigma, self.prefilter_passes)
        offsets = NEIGHBOUR_OFFSETS.to(device=cost.device, dtype=cost.dtype)
        grid_shape = (cost.shape[0], *cost.shape[2:])
        voxels = math.prod(grid_shape[1:])
        # costs within tie_tolerance x (the sample's mean cost) of the minimum are ties, one value per voxel row
        # (the mean is summed in float64: its float32 value must not depend on the thread count)
        scale = cost.flatten(1).abs().mean(1, dtype=torch.float64).to(cost.dtype)
        tolerance = scale.mul_(self.tie_tolerance).repeat_interleave(voxels).unsqueeze(1)
        # [B * prod(S), 27]: one contiguous row of costs per voxel, for fast minima over the offsets
        cost = cost.movedim(1, -1).contiguous().view(-1, len(offsets))

        def choose(costs: torch.Tensor) -> torch.Tensor:
            field = tied_argmin_field(costs, tolerance, offsets).view(*grid_shape, 3).movedim(-1, 1).contiguous()
            return adaptive_gaussian_filter(field, sigma, self.filter_passes)

        velocity = choose(cost)
        # C + w ||u - o||^2 = C + w ||o||^2 - 2 w u.o + w ||u||^2; the last term does not depend on o, and the
        # rest is one matrix product [u, 1] @ [[-2 w o^T], [w ||o||^2]] added to C, written into one buffer
        rows = torch.ones(cost.shape[0], 4, device=cost.device, dtype=cost.dtype)
        coupled = torch.empty_like(cost)
        for weight in self.coupling:
            coupling = torch.cat([-2 * weight * offsets.T, weight * offsets.square().sum(1, keepdim=True).T])
            rows[:, :3] = velocity.movedim(1, -1).reshape(-1, 3)
            velocity = choose(torch.addmm(cost, rows, coupling, out=coupled))
        return velocity

    def filter_width(self, cost: torch.Tensor) -> torch.Tensor:
        """Per-voxel filter width ``sigma [B, 1, *S]`` from the entropy of ``cost [B, 27, *S]`` (Eqs. 4, 6)."""
        if not self.adaptive:
            return torch.full_like(cost[:, :1], self.sigma_range[1])
        # log P = z - logsumexp(z) with z = -C / beta, and -E = sum P log P, in two volume-sized buffers
        log_probability = cost.mul(-1.0 / self.beta)
        log_probability.sub_(torch.logsumexp(log_probability, dim=1, keepdim=True))
        entropy = -log_probability.exp().mul_(log_probability).sum(1, keepdim=True)
        per_image = entropy.flatten(1)
        maximum = per_image.amax(1).view(-1, 1, 1, 1, 1)
        if self.sigma_mapping == "paper":
            return self.alpha * torch.log1p(entropy / maximum.clamp(min=1e-12))
        minimum = per_image.amin(1).view(-1, 1, 1, 1, 1)
        normalised = (entropy - minimum) / (maximum - minimum).clamp(min=1e-12)
        low, high = self.sigma_range
        return low + (high - low) * torch.log2(1 + normalised)

    def _features(self, image: torch.Tensor) -> torch.Tensor:
        features = self.feature_extractor(image.to(torch.float32))
        if features.ndim != 5 or features.shape[0] != image.shape[0] or features.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"features must map an image {tuple(image.shape)} to [B, C, {', '.join(map(str, image.shape[2:]))}], "
                f"got {tuple(features.shape)}."
            )
        return features.to(torch.float32)


class _Intensity(nn.Module):
    """Raw intensities as features (the paper's Table 2 #1)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image


def _feature_extractor(features: str | nn.Module, radius: int, dilation: int) -> nn.Module:
    if isinstance(features, nn.Module):
        return features
    check_option(features, "features", FEATURE_NAMES)
    return MINDSSC(radius=radius, dilation=dilation) if features == "mind" else _Intensity()


def _feature_pyramid(features: torch.Tensor, sizes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """``features`` at every size of ``sizes`` (finest first), each level resized from the one before (x0.5)."""
    pyramid = [features]
    for size in sizes[1:]:
        pyramid.append(resize_image(pyramid[-1], size))
    return pyramid


def _check_sigma_range(sigma_range: Sequence[float]) -> tuple[float, float]:
    values = tuple(sigma_range)
    if len(values) != 2 or not 0 <= values[0] <= values[1] or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"sigma_range must be (sigma_min, sigma_max) with 0 <= sigma_min <= sigma_max, got {sigma_range!r}."
        )
    return float(values[0]), float(values[1])


def _coupling_schedule(coupling: str | Sequence[float]) -> tuple[float, ...]:
    if isinstance(coupling, str):
        check_option(coupling, "coupling", ("paper", "reference"))
        return PAPER_COUPLING if coupling == "paper" else REFERENCE_COUPLING
    weights = tuple(coupling)
    check_positive(list(weights), "coupling")
    if list(weights) != sorted(weights):
        raise ValueError(f"coupling weights must increase (theta decreases), got {weights!r}.")
    return tuple(float(w) for w in weights)
