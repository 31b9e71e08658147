"""Continuous refinement of a displacement field, and a registration network followed by it.

**Ours, beyond the VoxelOpt paper** (``shared/papers/voxelopt.txt`` stops at the discrete field). VoxelOpt's field
moves by at most one voxel of each pyramid level per level, so its finest detail is a {-1, 0, 1} step smoothed by
the adaptive filter. Like the second stages of ConvexAdam (Siebert et al., "ConvexAdam: Self-Configuring Dual-
Optimisation-Based 3D Multitask Medical Image Registration", IEEE TMI 2024: Adam on the field at half resolution,
MIND-SSC features, diffusion regulariser) and FireANTs (Jena et al., "FireANTs: Adaptive Riemannian Optimization for
Multi-Scale Diffeomorphic Registration", 2024: Adam at 4x/2x/1x with cross-correlation), :func:`refine_field` moves
the field continuously, a few multi-resolution Adam steps on the displacement itself, with

.. math::

    L(u) = \\mathrm{sim}(m \\circ (\\mathrm{Id} + u), f) + \\lambda \\, L_{diff}(u)

per level (``sim``: by default the mean squared difference of locally normalised intensities, exactly stationary
at ``warped = fixed`` unlike LNCC; or ``1 - LNCC``; or the mean squared difference of MIND-SSC features;
``L_diff``: :func:`~monai_unireg.losses.diffusion_regularisation`, in the level's voxels; the command line's
settings use ``lambda = 0``, see :data:`CLI_REFINEMENT`). The gradient is written out (the sampler's backward pass,
:func:`~monai_unireg.spatial.pullback_sampler`, and the chain rule through each similarity and the diffusion term, all
tested against autograd) and the Adam loop is :func:`~monai_unireg.engines.instance_optimisation.adam_descent`,
shared with the field instance optimisation. Before each step the gradient is Gaussian-smoothed (``gradient_sigma``,
FireANTs' and Greedy's update smoothing), after it the field itself (``field_sigma``, Greedy's smoothing of the
whole warp).

Multi-resolution scheme, level by level (coarse to fine, ``factors`` e.g. ``(2, 1)``): the features (or images) of
both images are smoothed and resized to the level's grid (``size // factor``, corner-aligned, as every resize in
:mod:`monai_unireg.spatial`), the current full-resolution field is resized to it (``u0``), Adam moves it to ``u``,
and the change is added back at full resolution, ``ddf <- ddf + resize_ddf(u - u0)``, so that detail finer than the
level (VoxelOpt's finest level) is kept.

Where things live: :func:`refine_field` and :class:`FieldRefinement` are an optimisation engine, next to the field
instance optimisation they share the loop with; :class:`RefinedRegistration` (a network followed by a refinement)
sits here too, like :class:`~monai_unireg.engines.instance_optimisation.FieldOptimised`, because
:mod:`monai_unireg.networks` does not depend on the engines.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.engines.instance_optimisation import adam_descent
from monai_unireg.filtering import separable_filter
from monai_unireg.losses import diffusion_gradient
from monai_unireg.losses.lncc import LNCCLoss, window_kernel
from monai_unireg.losses.mind import MINDSSC
from monai_unireg.networks.nets.voxelopt import VoxelOpt
from monai_unireg.validation import (
    check_ddf,
    check_image_pair,
    check_integer,
    check_option,
    check_positive,
    check_same_spatial_shape,
)

__all__ = [
    "CLI_REFINEMENT",
    "CLI_VOXELOPT",
    "CLI_VOXELOPT_FACTOR",
    "Downsampled",
    "FieldRefinement",
    "REFINEMENT_SIMILARITIES",
    "RefinedRegistration",
    "refine_field",
    "refined_voxelopt",
]

REFINEMENT_SIMILARITIES = ("mind", "lncc", "nsd")

Progress = Callable[[int, int], None]


def _per_level(value: float | int | Sequence[float | int], count: int, name: str) -> tuple:
    """``value`` repeated for ``count`` levels, or checked to have ``count`` entries."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * count
    values = tuple(value)
    if len(values) != count:
        raise ValueError(f"{name} must be one value or one per level ({count} levels), got {value!r}.")
    return values


def _check_factors(factors: Sequence[int]) -> tuple[int, ...]:
    values = tuple(factors) if not isinstance(factors, (int, str)) else (factors,)
    if not values:
        raise ValueError("factors must list at least one downsampling factor, got an empty sequence.")
    for value in values:
        check_integer(value, "factors", 1)
    if list(values) != sorted(values, reverse=True):
        raise ValueError(f"factors must run from coarse to fine (non-increasing), got {tuple(factors)!r}.")
    return tuple(int(v) for v in values)


def level_shapes(
    shape: Sequence[int], factors: Sequence[int], max_voxels: int | None = None, min_size: int = 8
) -> list[tuple[int, ...]]:
    """The grids the levels of :func:`refine_field` run on, coarse to fine.

    Level ``k`` runs at ``s // factors[k]`` per axis; with ``max_voxels`` a level whose grid would hold more voxels
    is coarsened (its factor doubled) until it fits, which is how the finest level adapts to the volume's size. A
    level with an axis under ``min_size`` voxels is raised to ``min(min_size, s)`` along that axis; levels that end on
    the same grid are merged (the settings of the finer entry are used).

    Returns:
        the spatial shape of each level kept, coarse to fine.
    """
    return [grid for grid, _ in _level_plan(shape, factors, max_voxels, min_size)]


def _level_plan(
    shape: Sequence[int], factors: Sequence[int], max_voxels: int | None, min_size: int = 8
) -> list[tuple[tuple[int, ...], int]]:
    plan: list[tuple[tuple[int, ...], int]] = []
    for index, factor in enumerate(factors):
        while True:
            grid = tuple(max(min(min_size, s), s // factor) for s in shape)
            if max_voxels is None or math.prod(grid) <= max_voxels or min(grid) <= min_size:
                break
            factor *= 2
        if plan and plan[-1][0] == grid:
            plan[-1] = (grid, index)
        else:
            plan.append((grid, index))
    return plan


def _smooth_and_resize(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``volume [B, C, *S]`` resized to ``size``; when shrinking, first Gaussian-smoothed with sigma = half the
    (largest) shrink factor, against aliasing (trilinear resizing alone samples every ``factor``-th voxel)."""
    if tuple(volume.shape[2:]) == tuple(size):
        return volume
    factor = max(s / n for s, n in zip(volume.shape[2:], size))
    if factor > 1.0:
        kernel = window_kernel("gaussian", sigma=0.5 * factor)
        volume = separable_filter(volume, kernel, spatial_dims=3, padding_mode="replicate")
    return spatial.resize_image(volume, size)


def _local_normalisation(image: torch.Tensor, kernel: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - E[x]) / sqrt(Var[x] + eps)`` with the windowed mean and variance of ``image [B, 1, *S]`` (Gaussian
    window ``kernel``, zero padding, as :class:`~monai_unireg.losses.LNCCLoss`)."""
    moments = separable_filter(torch.stack([image, image * image]), kernel, spatial_dims=3)
    mean, mean_square = moments.unbind(0)
    return (image - mean) / torch.sqrt(torch.relu(mean_square - mean * mean) + eps)


def _normalised_difference_gradient(
    warped: torch.Tensor, fixed_normalised: torch.Tensor, kernel: torch.Tensor, eps: float
) -> torch.Tensor:
    r"""The gradient with respect to ``warped`` of ``mean((n(warped) - fixed_normalised)^2)``, written out.

    With the windowed moments ``mu = G w`` and ``q = G w^2 - mu^2`` (``G``: the zero-padded Gaussian filter of
    :func:`_local_normalisation`, a symmetric matrix), ``t = (relu(q) + eps)^{-1/2}``, ``n = (w - mu) t`` and
    ``a = 2 (n - n_f) / N`` (``N`` voxels in the batch):

    .. math::

        \frac{\partial L}{\partial w} = a t + G(-a t - 2 \mu b) + 2 w \, G(b), \qquad
        b = -\tfrac{1}{2} a (w - \mu) t^3 [q > 0]

    (the chain rule through ``mu`` and ``q``; tested against autograd in float64). Two filter passes forward and
    two back, as autograd would, without its graph.

    Args:
        warped: ``[B, 1, *S]`` warped moving image.
        fixed_normalised: ``[B, 1, *S]`` the fixed image after :func:`_local_normalisation` (same kernel, eps).
        kernel: the window's 1D weights.
        eps: the variance offset.

    Returns:
        ``[B, 1, *S]`` gradient.
    """
    moments = torch.empty((2, *warped.shape), dtype=warped.dtype, device=warped.device)
    moments[0].copy_(warped)
    torch.mul(warped, warped, out=moments[1])
    mean, mean_square = separable_filter(moments, kernel, spatial_dims=3).unbind(0)
    variance = mean_square - mean * mean
    deviation = torch.relu(variance).add_(eps).sqrt_()
    centred = warped - mean
    # n(w) exactly as _local_normalisation computes it, so that the residual is exactly 0 where w is the fixed image
    residual_scaled = (centred / deviation).sub_(fixed_normalised).mul_(2.0 / warped.numel())  # a, then a t
    scale = deviation.reciprocal_()
    residual_scaled.mul_(scale)
    variance_part = centred.mul_(residual_scaled).mul_(scale).mul_(scale).mul_(-0.5).masked_fill_(variance <= 0, 0.0)
    backward = torch.empty((2, *warped.shape), dtype=warped.dtype, device=warped.device)
    torch.addcmul(residual_scaled, mean, variance_part, value=2.0, out=backward[0]).neg_()
    backward[1].copy_(variance_part)
    through_mean, through_square = separable_filter(backward, kernel, spatial_dims=3).unbind(0)
    return residual_scaled.add_(through_mean).addcmul_(warped, through_square, value=2.0)


def _similarity_gradient(
    similarity: str, lncc_sigma: float, eps: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``gradient(warped, fixed_level)``: the gradient of the level's similarity term with respect to the warped
    moving image (or its features), ``[B, C, *S]`` (``fixed_level``: the fixed features, or for ``"nsd"`` the
    locally normalised fixed image; ``lncc_sigma`` and ``eps``: the window and variance offset of ``"nsd"`` and
    ``"lncc"``, see :func:`refine_field`)."""
    window = window_kernel("gaussian", sigma=lncc_sigma)
    if similarity == "nsd":
        return lambda warped, fixed_level: _normalised_difference_gradient(warped, fixed_level, window, eps)
    if similarity == "mind":  # mean squared difference of features
        return lambda warped, fixed_level: (warped - fixed_level).mul_(2.0 / warped.numel())

    lncc = LNCCLoss(sigma=lncc_sigma, eps=eps)

    def lncc_gradient(warped: torch.Tensor, fixed_level: torch.Tensor) -> torch.Tensor:
        variable = warped.requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(lncc(variable, fixed_level), variable)
        return gradient

    return lncc_gradient


def _smoothing(kernel: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """``smooth(field)``: ``field [B, 3, *S]`` replaced in place by its Gaussian smoothing (``kernel``, replicate
    padding)."""

    def smooth(field: torch.Tensor) -> None:
        field.copy_(separable_filter(field, kernel, spatial_dims=3, padding_mode="replicate"))

    return smooth


def refine_field(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    initial_ddf: torch.Tensor,
    similarity: str = "nsd",
    factors: Sequence[int] = (4, 2, 1),
    iterations: int | Sequence[int] = (50, 50, 30),
    learning_rate: float | Sequence[float] = 0.2,
    smoothness: float | Sequence[float] = 1.0,
    max_voxels: int | None = None,
    mind_radius: int = 1,
    mind_dilation: int = 1,
    lncc_sigma: float = 2.0,
    lncc_eps: float = 1e-3,
    gradient_sigma: float = 0.0,
    gradient_floor: float = 3e-2,
    field_sigma: float = 0.0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Refine ``initial_ddf`` by multi-resolution Adam on the displacement (module docstring).

    Args:
        moving: ``[B, 1, D, H, W]`` moving image (normalised as for the initial network).
        fixed: ``[B, 1, D, H, W]`` fixed image on the same grid.
        initial_ddf: ``[B, 3, D, H, W]`` starting field in voxels (MONAI ``Warp`` convention).
        similarity: ``"nsd"`` (ours: mean squared difference of the locally normalised intensities, ``n(x) =
            (x - E[x]) / sqrt(Var[x] + lncc_eps)`` with the Gaussian window of LNCC (``lncc_sigma`` level voxels);
            same modality, like LNCC, but exactly stationary at ``warped = fixed``), ``"lncc"`` (``1 - LNCC``,
            :class:`~monai_unireg.losses.LNCCLoss` with ``lncc_sigma`` and ``lncc_eps``) or ``"mind"`` (mean
            squared difference of MIND-SSC features computed once at the input resolution, smoothed and resized per
            level, as ConvexAdam; across modalities). All three have no gradient where both images are flat.
            Why ``"nsd"``: LNCC's ``eps`` makes it non-stationary where it matters, at ``warped = fixed``: its
            gradient there is ``e (b - E[b]) / (Var + e)^2`` per window, largest where the local variance is about
            ``e`` (an edge against a flat background, smooth interiors), so an identical pair is pulled apart. On
            an 8-bit ball in a flat background against itself (40^3, levels 4/2/1, 50/50/30 steps) LNCC moved the
            field by up to 0.90 voxel (``eps = 1e-5``) and 2.1 voxels (``1e-3``), ``"nsd"`` by 0.15, MIND by 0.04;
            on BrainVXM2mm 8-bit (known field, from VoxelOpt at half resolution) ``"nsd"`` gave Dice 0.926 /
            endpoint error 0.82 mm, LNCC (1e-5) 0.928 / 0.83 mm, (1e-3) 0.93 / 0.98 mm; on BrainSynth 0001<-0002
            Dice 0.841, 0.849, 0.852 (MIND: 0.904 / 0.68 mm on BrainVXM2mm, 0.721 on BrainSynth).
        factors: downsampling factor of each level, coarse to fine (non-increasing integers >= 1; 1 = the input
            grid).
        iterations: Adam steps per level (one value for all levels or one per level; 0 skips a level).
        learning_rate: Adam step size in voxels of each level's grid (one or per level), at the first step of the
            level; it decays to 0 along a cosine over the level's steps.
        smoothness: weight ``lambda`` of the diffusion term, on the level's field in its voxels (one or per level).
        max_voxels: coarsen any level whose grid would hold more voxels (see :func:`level_shapes`); ``None``: no
            limit.
        mind_radius: MIND-SSC patch radius (``similarity="mind"``).
        mind_dilation: MIND-SSC neighbour distance (``similarity="mind"``).
        lncc_sigma: LNCC window standard deviation in level voxels (``similarity="lncc"``).
        lncc_eps: the ``eps`` added to each local variance by ``"nsd"`` and ``"lncc"`` (intensities normalised to
            [0, 1]); see ``similarity``.
        gradient_sigma: Gaussian smoothing (standard deviation in level voxels, 0: none) of the objective's
            gradient with respect to the field before each Adam step, as FireANTs' ``smooth_grad_sigma`` (and
            Greedy's update-field smoothing): the steps move neighbouring voxels together.
        gradient_floor: per-voxel gradient (objective per voxel, per voxel of displacement) below which Adam stops
            normalising: its ``eps`` is ``gradient_floor / (B * voxels of the level)`` (the objective is a mean).
            Adam's steps are about the learning rate wherever the gradient is not exactly zero, however small
            (e.g. the float rounding of a warp by a zero field, spread into flat voxels by the gradient
            smoothing); below the floor a voxel moves by ``learning_rate * gradient / eps``, i.e. hardly. 0.03: an
            8-bit object in a flat background against itself stays within 0.03 voxel (0.01 let it move by up to
            0.3 voxel, see :data:`CLI_REFINEMENT`).
        field_sigma: Gaussian smoothing (standard deviation in level voxels, 0: none) of the field itself after every
            Adam step, as Greedy smooths its whole warp each iteration (``-s`` second value): removes voxel-scale
            roughness that the diffusion term cannot without pulling the field's true gradients down; repeated every
            step, it also regularises (``k`` passes smooth like one of sigma ``field_sigma * sqrt(k)``).
        progress: ``progress(levels_done, levels_total)`` after each level, or ``None``.

    Returns:
        ``[B, 3, D, H, W]`` refined field in voxels, in the dtype of ``initial_ddf``, without gradient.

    Raises:
        ValueError: for a malformed image, field or setting (the message names the argument).
    """
    check_image_pair(moving, fixed, 3)
    check_ddf(initial_ddf, "initial_ddf")
    check_same_spatial_shape(fixed, initial_ddf, "fixed", "initial_ddf")
    if initial_ddf.shape[0] != fixed.shape[0]:
        raise ValueError(
            f"initial_ddf must have the batch size of fixed ({fixed.shape[0]}), got {tuple(initial_ddf.shape)}."
        )
    check_option(similarity, "similarity", REFINEMENT_SIMILARITIES)
    factors = _check_factors(factors)
    count = len(factors)
    steps = [check_integer(v, "iterations", 0) for v in _per_level(iterations, count, "iterations")]
    rates = [float(check_positive(v, "learning_rate")) for v in _per_level(learning_rate, count, "learning_rate")]
    weights = [
        float(check_positive(v, "smoothness", allow_zero=True)) for v in _per_level(smoothness, count, "smoothness")
    ]
    if max_voxels is not None:
        check_integer(max_voxels, "max_voxels", 1)
    check_integer(mind_radius, "mind_radius", 0)
    check_integer(mind_dilation, "mind_dilation", 1)
    check_positive(lncc_sigma, "lncc_sigma")
    check_positive(lncc_eps, "lncc_eps")
    check_positive(gradient_sigma, "gradient_sigma", allow_zero=True)
    check_positive(gradient_floor, "gradient_floor")
    check_positive(field_sigma, "field_sigma", allow_zero=True)
    field_kernel = window_kernel("gaussian", sigma=field_sigma) if field_sigma > 0 else None
    gradient_kernel = window_kernel("gaussian", sigma=gradient_sigma) if gradient_sigma > 0 else None

    shape = tuple(fixed.shape[2:])
    plan = _level_plan(shape, factors, max_voxels)
    with torch.no_grad():
        moving32, fixed32 = moving.detach().to(torch.float32), fixed.detach().to(torch.float32)
        if similarity == "mind":
            descriptor = MINDSSC(radius=mind_radius, dilation=mind_dilation)
            moving_source, fixed_source = descriptor(moving32), descriptor(fixed32)
        else:
            moving_source, fixed_source = moving32, fixed32
        window = window_kernel("gaussian", sigma=lncc_sigma)
        ddf = initial_ddf.detach().to(torch.float32).clone()
    similarity_gradient = _similarity_gradient(similarity, lncc_sigma, lncc_eps)
    for done, (grid, index) in enumerate(plan, start=1):
        if steps[index]:
            with torch.no_grad():
                moving_level = _smooth_and_resize(moving_source, grid)
                fixed_level = _smooth_and_resize(fixed_source, grid)
                if similarity == "nsd":  # the fixed image's normalisation, once per level
                    fixed_level = _local_normalisation(fixed_level, window, lncc_eps)
                start = ddf if grid == shape else spatial.resize_ddf(ddf, grid)
            weight = weights[index]
            warp_pullback = spatial.pullback_sampler(moving_level)

            def gradient(
                field: torch.Tensor,
                fixed_level: torch.Tensor = fixed_level,
                weight: float = weight,
                warp_pullback: Callable = warp_pullback,
            ) -> torch.Tensor:
                warped, pullback = warp_pullback(field)
                total = pullback(similarity_gradient(warped, fixed_level))
                if weight:
                    total.add_(diffusion_gradient(field), alpha=weight)
                if gradient_kernel is None:
                    return total
                return separable_filter(total, gradient_kernel, spatial_dims=3, padding_mode="replicate")

            eps = gradient_floor / (fixed.shape[0] * math.prod(grid))
            # cosine decay to 0 over the level's steps: the field settles instead of jittering by ~learning_rate
            count_steps = steps[index]
            refined = adam_descent(
                start,
                gradient,
                count_steps,
                rates[index],
                eps=eps,
                schedule=lambda step, n=count_steps: 0.5 * (1.0 + math.cos(math.pi * step / n)),
                after_step=None if field_kernel is None else _smoothing(field_kernel),
            )
            with torch.no_grad():
                ddf = refined if grid == shape else ddf + spatial.resize_ddf(refined - start, shape)
        if progress is not None:
            progress(done, len(plan))
    return ddf.to(initial_ddf.dtype)


class FieldRefinement:
    """The settings of :func:`refine_field`, kept together: ``refinement(moving, fixed, initial_ddf) -> ddf``.

    Args:
        **settings: keyword arguments of :func:`refine_field` except the tensors and ``progress`` (checked here,
            so that a wrong setting fails before any registration runs).

    Attributes:
        progress: ``None``, or ``progress(levels_done, levels_total)`` after each level.
    """

    def __init__(self, **settings: object) -> None:
        allowed = set(list(inspect.signature(refine_field).parameters)[3:]) - {"progress"}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(f"unknown refinement settings {unknown}; allowed: {sorted(allowed)}.")
        self.settings = dict(settings)
        # the checks of refine_field, by running it on a tiny pair (8^3: a few milliseconds)
        probe = torch.zeros(1, 1, 8, 8, 8)
        refine_field(probe, probe, torch.zeros(1, 3, 8, 8, 8), **self.settings)
        self.progress: Progress | None = None

    def num_levels(self, shape: Sequence[int]) -> int:
        """How many levels run on a volume of spatial ``shape``."""
        defaults = inspect.signature(refine_field).parameters
        factors = _check_factors(self.settings.get("factors", defaults["factors"].default))
        return len(_level_plan(tuple(shape), factors, self.settings.get("max_voxels", defaults["max_voxels"].default)))

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor, initial_ddf: torch.Tensor) -> torch.Tensor:
        """Refine ``initial_ddf [B, 3, D, H, W]`` for the pair ``moving``, ``fixed`` ``[B, 1, D, H, W]``."""
        return refine_field(moving, fixed, initial_ddf, progress=self.progress, **self.settings)

    def __repr__(self) -> str:
        return f"FieldRefinement({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"


class RefinedRegistration(nn.Module):
    """A registration network followed by a continuous refinement of its field (ours, beyond the papers).

    ``forward(moving, fixed) -> ddf``: ``refinement(moving, fixed, initial(moving, fixed))``; the initial network
    runs without gradients. With :func:`refined_voxelopt` it is "VoxelOpt + refinement".

    Args:
        initial: ``initial(moving, fixed) -> ddf [B, 3, D, H, W]`` (e.g. :class:`VoxelOpt`).
        refinement: a :class:`FieldRefinement` (or any ``refinement(moving, fixed, ddf) -> ddf``).

    Attributes:
        progress: ``None``, or ``progress(done, total)`` over the initial network's steps (when it reports them
            through its own ``progress`` attribute, as VoxelOpt reports levels) followed by the refinement's
            levels.
    """

    def __init__(self, initial: nn.Module, refinement: FieldRefinement) -> None:
        super().__init__()
        if not isinstance(initial, nn.Module):
            raise ValueError(f"initial must be an nn.Module registration network, got {type(initial).__name__}.")
        if not callable(refinement):
            raise ValueError(f"refinement must be callable as refinement(moving, fixed, ddf), got {refinement!r}.")
        self.initial = initial
        self.refinement = refinement
        self.progress: Progress | None = None

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: ``[B, 1, D, H, W]`` moving image.
            fixed: ``[B, 1, D, H, W]`` fixed image on the same grid.

        Returns:
            ``[B, 3, D, H, W]`` displacement in voxels, ``warp(moving, ddf) ~ fixed``.
        """
        check_image_pair(moving, fixed, 3)
        report = self.progress
        levels = getattr(self.refinement, "num_levels", None)
        after = levels(fixed.shape[2:]) if report is not None and callable(levels) else 0
        first = {"total": 0}

        def initial_progress(done: int, total: int) -> None:
            first["total"] = total
            report(done, total + after)

        def refinement_progress(done: int, total: int) -> None:
            report(first["total"] + done, first["total"] + total)

        reports_initial = report is not None and hasattr(self.initial, "progress")
        saved_initial = getattr(self.initial, "progress", None)
        saved_refinement = getattr(self.refinement, "progress", None)
        try:
            if reports_initial:
                self.initial.progress = initial_progress
            if report is not None and hasattr(self.refinement, "progress"):
                self.refinement.progress = refinement_progress
            with torch.no_grad():
                initial = self.initial(moving, fixed)
            return self.refinement(moving, fixed, initial)
        finally:
            if reports_initial:
                self.initial.progress = saved_initial
            if report is not None and hasattr(self.refinement, "progress"):
                self.refinement.progress = saved_refinement


class Downsampled(nn.Module):
    """A registration network run on the pair shrunk by ``factor`` (Gaussian-smoothed with sigma ``factor / 2``,
    then resized, as every refinement level shrinks its images), its field resized back to the input grid.

    ``forward(moving, fixed) -> ddf``: ``[B, 1, D, H, W]`` images -> ``[B, 3, D, H, W]`` voxels of the input grid.

    Args:
        network: ``network(moving, fixed) -> ddf`` on the small grid (e.g. :class:`VoxelOpt`).
        factor: downsampling factor (integer >= 1; each axis becomes ``max(1, size // factor)``).

    Attributes:
        progress: the network's own ``progress`` (read and set through), when it has one.
    """

    def __init__(self, network: nn.Module, factor: int) -> None:
        super().__init__()
        self.network = network
        self.factor = check_integer(factor, "factor", 1)

    @property
    def progress(self) -> Progress | None:
        return getattr(self.network, "progress", None)

    @progress.setter
    def progress(self, value: Progress | None) -> None:
        self.network.progress = value

    def small_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The grid the network runs on for an input grid of spatial ``shape``."""
        return tuple(max(1, int(s) // self.factor) for s in shape)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_image_pair(moving, fixed, 3)
        shape = tuple(fixed.shape[2:])
        small = self.small_shape(shape)
        ddf = self.network(_smooth_and_resize(moving, small), _smooth_and_resize(fixed, small))
        return ddf if small == shape else spatial.resize_ddf(ddf, shape)


#: VoxelOpt settings of "VoxelOpt + refinement" for ``monai-unireg register`` (beside the pyramid depth from
#: :meth:`VoxelOpt.levels_for`), run on the pair shrunk by :data:`CLI_VOXELOPT_FACTOR`: the refinement recovers the
#: full-resolution detail (see :data:`CLI_REFINEMENT`).
CLI_VOXELOPT: dict[str, object] = {"mind_radius": 1, "mind_dilation": 1}

#: VoxelOpt of ``monai-unireg register`` runs on the pair downsampled by 2 (:class:`Downsampled`). Earlier it ran
#: the authors' pyramid placement (MIND-SSC on the input grid, the finest optimised level at half resolution,
#: ``finest_level=1``); with the features computed on the half-resolution pair instead, VoxelOpt took 0.18 s instead
#: of about 0.45 s on the 8-bit BrainVXM2mm pair and the refined scores hardly moved (Dice / endpoint error 0.933 /
#: 0.458 mm against 0.933 / 0.457 mm, BrainSynth 0.754 against 0.753, CT 0.905 / 1.36 mm against 0.906 / 1.29 mm).
CLI_VOXELOPT_FACTOR = 2

#: Refinement settings of "VoxelOpt + refinement" for ``monai-unireg register``, chosen on ``benchmarks/peers.py``
#: cases (8-bit BrainVXM2mm known field, BrainSynth 0001<-0002 .. 0004<-0005, CT known field; 8-bit BrainVXM1mm held
#: out), from VoxelOpt at half resolution (Dice / endpoint error; Greedy on the same: 0.930 / 0.51 mm, BrainSynth
#: 0.739, CT 0.894 / 1.44 mm, BrainVXM1mm 0.961 / 0.27 mm).
#:
#: Like Greedy (``-s 1.732vox 0.707vox``), the field is kept smooth by smoothing the gradient before every step
#: (``gradient_sigma``) and the field itself after it (``field_sigma``), with no diffusion term: the diffusion term
#: (earlier lambda 3, then 0.3) pulled the field's true gradients down and left an error of a few tenths of a voxel
#: spread evenly over the brain. Levels 2x and 1x only: a 4x level first (4/2/1, 50/50/30 steps, lambda 0.3, field
#: sigma 0.45: 0.934 / 0.47 mm, BrainSynth 0.761 with folding up to 2.7 %, CT 0.908 / 1.15 mm) moved the
#: inter-subject pairs by more than it could follow smoothly; without it (2/1, 30/20 steps, same settings) 0.933 /
#: 0.49 mm, BrainSynth 0.769 with at most 0.45 % folding. The step counts are the time target's (issue 13: the whole
#: command at most Greedy's process): each full-resolution step cost about 75 ms at 80x96x112 on 2 threads (45 ms
#: since the 2D sampler of :func:`~monai_unireg.spatial.pullback_sampler`, the fused Adam and the blocked filters),
#: and the 2x level hardly matters (30/30/20 and 50/50/20 with the 4x level: the same scores); 16 full-resolution
#: steps gave 0.50 mm, 20 0.46 mm, 25 steps (lambda 0.3) 0.48 mm. Moving steps to the 2x level (6 ms a step) does
#: not pay: 40 + 16, 50 + 14, 60 + 12 steps gave 0.930 / 0.49 mm, 0.928 / 0.51 mm, 0.928 / 0.52 mm (CT 1.42-1.50 mm,
#: Greedy's 1.40 mm), and 20 + 20 or 25 + 20 scored within 0.001 of 30 + 20. Chosen: no diffusion, field sigma 0.5,
#: gradient sigma 1.7, rate 0.3, 30 + 20 steps: 0.935 / 0.46 mm, BrainSynth 0.759 (folding <= 0.51 %), CT 0.908 /
#: 1.26 mm, and on the held-out 8-bit BrainVXM1mm at full resolution (``max_voxels`` 8 M: 160x192x224 is 6.9 M
#: voxels) 0.967 / 0.20 mm.
#: ``gradient_floor`` 0.03 (was 0.01): an 8-bit object in a flat background against itself (40^3) moved by up to
#: 0.30 voxel (18 % of the voxels by more than 0.1) at 0.01, by at most 0.006 at 0.03 (0.02 at 64^3); the gradient
#: smoothing spreads the edges' rounding-level gradients into flat voxels, whose Adam steps are normalised to the
#: learning rate unless the gradient is under the floor. Scores at 0.03: 0.933 / 0.46 mm, BrainSynth 0.753 (folding
#: <= 0.27 %), CT 0.906 / 1.29 mm (0.1: BrainSynth 0.741, 0.3: 0.720).
#: The refinement adds displacements (it is not diffeomorphic). Whole-run figures against ANTs SyNOnly and Greedy: the
#: closing note of issue 13.
CLI_REFINEMENT: dict[str, object] = {
    "similarity": "nsd",
    "factors": (2, 1),
    "iterations": (30, 20),
    "learning_rate": 0.3,
    "smoothness": 0.0,
    "gradient_sigma": 1.7,
    "field_sigma": 0.5,
    "gradient_floor": 3e-2,
    "max_voxels": 8_000_000,
}


def refined_voxelopt(
    shape: Sequence[int],
    voxelopt: dict[str, object] | None = None,
    refinement: dict[str, object] | None = None,
    voxelopt_factor: int = CLI_VOXELOPT_FACTOR,
) -> RefinedRegistration:
    """ "VoxelOpt + refinement" for a fixed grid of spatial ``shape``: :class:`VoxelOpt` with ``voxelopt``
    (default :data:`CLI_VOXELOPT`) and ``num_levels`` from :meth:`VoxelOpt.levels_for` on the grid it optimises
    (after ``voxelopt_factor`` and any ``finest_level`` halvings), run on the pair shrunk by ``voxelopt_factor``
    (:class:`Downsampled`; 1: the input grid), followed by :class:`FieldRefinement` with ``refinement`` (default
    :data:`CLI_REFINEMENT`)."""
    voxelopt = dict(CLI_VOXELOPT if voxelopt is None else voxelopt)
    check_integer(voxelopt_factor, "voxelopt_factor", 1)
    finest = int(voxelopt.get("finest_level", 0))
    levels = VoxelOpt.levels_for([max(1, int(s) // voxelopt_factor // 2**finest) for s in shape])
    network: nn.Module = VoxelOpt(**{"num_levels": levels, **voxelopt})
    if voxelopt_factor > 1:
        network = Downsampled(network, voxelopt_factor)
    return RefinedRegistration(network, FieldRefinement(**dict(CLI_REFINEMENT if refinement is None else refinement)))
