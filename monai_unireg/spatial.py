"""Spatial operations on images and displacement fields: the one module every method uses.

Convention (MONAI ``Warp``): a displacement field ``ddf`` of shape ``[B, n, *S]`` (``n`` = number of
spatial axes, channel ``i`` = displacement along spatial axis ``i`` of the tensor) in **voxels** defines
the map ``phi(x) = x + ddf(x)`` from the fixed grid into the moving image, and

    warped(x) = moving(phi(x)) = moving(x + ddf(x)).

Grids are corner-aligned: voxel index ``i`` on an axis of ``N`` voxels has the normalised coordinate
``2 i / (N - 1) - 1`` in [-1, 1] (``align_corners=True`` in PyTorch), exactly as ``monai.networks.blocks.Warp``.

Composition order: ``compose(outer, inner)`` is the field of ``x -> phi_outer(phi_inner(x))``, i.e.

    compose(outer, inner)(x) = inner(x) + outer(x + inner(x)),

so warping by ``outer`` first and then warping the result by ``inner`` equals one warp by the composition:
``warp(warp(image, outer), inner) == warp(image, compose(outer, inner))``. In a coarse-to-fine or cascaded
network, the field found so far is ``outer`` and the new increment, estimated on the already-warped
image, is ``inner``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_unireg.validation import (
    check_affine,
    check_ddf,
    check_image,
    check_integer,
    check_labels,
    check_option,
    check_same_spatial_shape,
)

__all__ = [
    "identity_grid",
    "sample",
    "warp",
    "pullback_sampler",
    "warp_labels",
    "sample_labels",
    "grid_coordinates",
    "resample_to_grid",
    "ddf_to_grid",
    "compose",
    "cascade_displacement",
    "integrate_velocity",
    "resize_ddf",
    "resize_image",
    "ddf_voxel_to_normalized",
    "ddf_normalized_to_voxel",
    "ddf_voxel_to_mm",
    "ddf_mm_to_voxel",
    "spacing_from_affine",
    "jacobian_determinant",
]

INTERPOLATION_MODES = ("bilinear", "nearest")
PADDING_MODES = ("border", "zeros", "reflection")
NORMALIZED_RANGES = ("[-1,1]", "[0,1]")


def identity_grid(
    shape: Sequence[int], *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel-index coordinates of every grid point.

    Args:
        shape: spatial shape ``S`` (2 or 3 axes).
        device: device of the result.
        dtype: floating dtype of the result.

    Returns:
        ``[n, *S]`` tensor whose channel ``i`` holds the index along axis ``i``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must list 2 or 3 positive sizes, got {shape}.")
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _to_grid_sample_coordinates(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``[B, n, *S_out]`` -> ``grid_sample`` grid ``[B, *S_out, n]`` (normalised, axes reversed)."""
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=coords.device, dtype=coords.dtype)
    normalised = coords * scale.view(1, -1, *([1] * (coords.ndim - 2))) - 1.0
    return normalised.flip(1).movedim(1, -1)


def _slab_layout(batch: int, length: int, device: torch.device) -> tuple[int, int]:
    """``(slabs, rows)``: how :func:`_grid_sample` cuts an output of ``length`` rows into equal slabs (see there)."""
    slabs = min(torch.get_num_threads() // batch, length) if device.type == "cpu" else 1
    return (1, length) if slabs < 2 else (slabs, -(-length // slabs))


def _slab_source(image: torch.Tensor, slabs: int) -> torch.Tensor:
    """``image [B, C, *S]`` repeated for each slab of its batch entry (a view for one pair)."""
    if slabs == 1:
        return image
    return image.expand(slabs, *image.shape[1:]) if image.shape[0] == 1 else image.repeat_interleave(slabs, dim=0)


def _from_slabs(sampled: torch.Tensor, batch: int, slabs: int, rows: int, length: int) -> torch.Tensor:
    """``[B * slabs, C, rows, *rest]`` samples of the slab layout -> ``[B, C, length, *rest]``."""
    if slabs == 1:
        return sampled
    channels, rest = sampled.shape[1], sampled.shape[3:]
    blocks = sampled.view(batch, slabs, channels, rows, *rest).movedim(1, 2)  # [B, C, slabs, rows, ...]
    if batch * channels == 1:  # the slabs follow each other in memory: a view
        return blocks.reshape(batch, channels, slabs * rows, *rest)[:, :, :length]
    out = sampled.new_empty((batch, channels, length, *rest))
    full, remainder = divmod(length, rows)
    out[:, :, : full * rows].unflatten(2, (full, rows)).copy_(blocks[:, :, :full])
    if remainder:
        out[:, :, full * rows :].copy_(blocks[:, :, full, :remainder])
    return out


def _into_slabs(values: torch.Tensor, slabs: int, rows: int) -> torch.Tensor:
    """The inverse layout of :func:`_from_slabs`: ``[B, C, length, *rest]`` -> ``[B * slabs, C, rows, *rest]``,
    zeros in the rows past ``length``."""
    if slabs == 1:
        return values
    batch, channels, length, rest = values.shape[0], values.shape[1], values.shape[2], values.shape[3:]
    if batch * channels == 1 and length == slabs * rows and values.is_contiguous():  # the slabs follow each other
        return values.view(slabs, 1, rows, *rest)
    padded = values.new_zeros((batch, channels, slabs * rows, *rest))
    padded[:, :, :length] = values
    return padded.view(batch, channels, slabs, rows, *rest).movedim(2, 1).reshape(batch * slabs, channels, rows, *rest)


def _grid_sample(
    image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, length: int | None = None
) -> torch.Tensor:
    """``F.grid_sample(image, grid, align_corners=True)``, using every CPU thread for small batches.

    PyTorch's CPU kernel parallelises over the batch only, so a single pair runs on one core. When the batch is
    smaller than the thread count, the grid is cut along its first spatial axis into slabs that become extra
    batch entries, each sampling the whole image (values identical bit for bit, differentiable as before).

    Args:
        image: ``[B, C, *S_in]``.
        grid: ``[B, *S_out, n]`` normalised coordinates, axes reversed (``grid_sample``'s convention); or, with
            ``length``, a grid already extended along its first axis to the slab layout of :func:`_slab_layout`
            (rows past ``length`` are ignored).
        length: number of output rows ``S_out[0]`` when ``grid`` is extended.

    Returns:
        ``[B, C, *S_out]``.
    """
    batch = grid.shape[0]
    length = grid.shape[1] if length is None else length
    if torch.jit.is_tracing():  # one plain call: the slab layout depends on the thread count and on Python ints
        return F.grid_sample(image, grid[:, :length], mode=mode, padding_mode=padding_mode, align_corners=True)
    slabs, rows = _slab_layout(batch, length, image.device)
    if slabs == 1:
        return F.grid_sample(image, grid[:, :length], mode=mode, padding_mode=padding_mode, align_corners=True)
    if grid.shape[1] < rows * slabs:  # repeat the last row so that the slabs are equal
        grid = torch.cat([grid, grid[:, -1:].expand(-1, rows * slabs - grid.shape[1], *grid.shape[2:])], dim=1)
    grid = grid[:, : rows * slabs].reshape(batch * slabs, rows, *grid.shape[2:])
    sampled = F.grid_sample(_slab_source(image, slabs), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return _from_slabs(sampled, batch, slabs, rows, length)


def sample(
    image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Sample an image at arbitrary voxel coordinates.

    Args:
        image: ``[B, C, *S_in]`` image.
        coords: ``[B, n, *S_out]`` voxel coordinates into ``image`` (channel ``i`` = index along axis ``i``).
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        padding_mode: value outside the image: ``"border"``, ``"zeros"`` or ``"reflection"``.

    Returns:
        ``[B, C, *S_out]`` sampled values in the dtype of ``image`` (coordinates are handled in at least
        float32, so float16 images keep sub-voxel accuracy).
    """
    spatial_dims = image.ndim - 2
    check_image(image, "image", spatial_dims)
    check_image(coords, "coords", spatial_dims)
    if coords.shape[0] != image.shape[0] or coords.shape[1] != spatial_dims:
        raise ValueError(
            f"coords must have shape [B={image.shape[0]}, {spatial_dims}, ...] to sample image of shape "
            f"{tuple(image.shape)}, got {tuple(coords.shape)}."
        )
    check_option(mode, "mode", INTERPOLATION_MODES)
    check_option(padding_mode, "padding_mode", PADDING_MODES)
    return _sample(image, coords, mode, padding_mode)


def _sample(image: torch.Tensor, coords: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """:func:`sample` without argument checks."""
    compute_dtype = torch.promote_types(torch.promote_types(image.dtype, coords.dtype), torch.float32)
    grid = _to_grid_sample_coordinates(coords.to(compute_dtype), image.shape[2:])
    sampled = _grid_sample(image.to(compute_dtype), grid, mode, padding_mode)
    return sampled.to(image.dtype)


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Warp an image with a displacement field: ``warped(x) = image(x + ddf(x))``.

    Gives the same result as ``monai.networks.blocks.Warp(mode, padding_mode)`` (tested), and also works
    for float16 on the CPU and for a field of another floating dtype than the image.

    Args:
        image: ``[B, C, *S]`` floating image.
        ddf: ``[B, n, *S]`` displacement in voxels.
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"border"`` (MONAI ``Warp`` default), ``"zeros"`` or ``"reflection"``.

    Returns:
        ``[B, C, *S]`` warped image.
    """
    spatial_dims = image.ndim - 2
    check_image(image, "image", spatial_dims)
    check_ddf(ddf, "ddf", spatial_dims)
    check_same_spatial_shape(image, ddf, "image", "ddf")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating point tensor, got dtype {image.dtype}; use warp_labels for labels.")
    check_option(mode, "mode", INTERPOLATION_MODES)
    check_option(padding_mode, "padding_mode", PADDING_MODES)
    return _warp(image, ddf, mode, padding_mode)


def _warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """:func:`warp` without argument checks, for internal loops whose inputs are already checked.

    The ``grid_sample`` grid (normalised, axes reversed) is built from the components,
    ``grid[..., n - 1 - i] = linspace_i + ddf_i * 2 / (N_i - 1)``; without autograd it is written in place in the
    slab layout of :func:`_grid_sample` (no intermediate volumes). This is the inner step of every integration and
    composition.
    """
    compute_dtype = torch.promote_types(torch.promote_types(image.dtype, ddf.dtype), torch.float32)
    batch, spatial_dims, shape = ddf.shape[0], ddf.shape[1], ddf.shape[2:]
    lines, scales = [], []
    for axis, size in enumerate(shape):
        line_shape = [1] * (spatial_dims + 1)
        line_shape[axis + 1] = size
        lines.append(torch.linspace(-1.0, 1.0, size, device=ddf.device, dtype=compute_dtype).view(line_shape))
        scales.append(2.0 / max(size - 1, 1))
    components = [ddf[:, axis].to(compute_dtype) for axis in range(spatial_dims)]
    if torch.jit.is_tracing() or (torch.is_grad_enabled() and ddf.requires_grad):
        grid = torch.stack([lines[a] + components[a] * scales[a] for a in reversed(range(spatial_dims))], dim=-1)
    else:
        slabs, rows = _slab_layout(batch, shape[0], image.device)
        grid = torch.empty(batch, slabs * rows, *shape[1:], spatial_dims, device=ddf.device, dtype=compute_dtype)
        for axis in range(spatial_dims):
            column = grid[:, : shape[0], ..., spatial_dims - 1 - axis]
            torch.add(lines[axis], components[axis], alpha=scales[axis], out=column)
        grid[:, shape[0] :] = grid[:, shape[0] - 1 : shape[0]]
    sampled = _grid_sample(image.to(compute_dtype), grid, mode, padding_mode, length=shape[0])
    return sampled.to(image.dtype)


def _tiled_slices(image: torch.Tensor) -> torch.Tensor:
    """``image [B, C, D, H, W]`` as the 2D source of :func:`pullback_sampler`: ``[B, 2C, R, W]``, ``R`` rows
    (``(D + 1) (H + 2)`` of tiles, then zeros up to a power of two plus one).

    Tile ``j = 0 .. D`` of ``H + 2`` rows holds slice ``j - 1`` in channels ``:C`` and slice ``j`` in channels
    ``C:`` (slice indices clamped to ``[0, D - 1]``), each framed by a copy of its first and last row: border
    padding along both axes, inside the tile.
    """
    batch, channels, depth, height, width = image.shape
    padded = F.pad(image, (0, 0, 1, 1, 1, 1), mode="replicate")  # [B, C, D + 2, H + 2, W]
    tiles = torch.cat([padded[:, :, :-1], padded[:, :, 1:]], dim=1)
    rows = (depth + 1) * (height + 2)
    # zero rows up to 2^p + 1 in all: the normalised coordinate of a whole row, 2 r / 2^p - 1, is then exact in
    # floating point (and so is grid_sample's way back), so that a whole row is read without rounding
    padded_rows = 2 ** math.ceil(math.log2(max(rows - 1, 1))) + 1
    return F.pad(tiles.reshape(batch, 2 * channels, rows, width), (0, 0, 0, padded_rows - rows))


def pullback_sampler(
    image: torch.Tensor,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    r"""``warp_pullback(ddf) -> (warped, pullback)`` for a fixed ``image``: ``warped = warp(image, ddf)``
    (trilinear, border padding, 3D) and ``pullback(grad_warped) -> grad_ddf``, the vector-Jacobian product
    ``d <grad_warped, warped> / d ddf`` (what autograd gives through :func:`warp`: equal to 1e-12 in float64,
    tested).

    For optimisers that write the gradient of their objective by hand (:mod:`monai_unireg.engines.refinement`),
    which warp the same image by a new field at every step. PyTorch's 3D CPU sampler is a scalar loop while its 2D
    one is vectorised, so the trilinear sample is taken as two bilinear ones: with ``k = floor(z)`` and
    ``t = z - k``,

    .. math::

        w = (1 - t) \, b_k(y, x) + t \, b_{k+1}(y, x), \qquad \frac{\partial w}{\partial z} = b_{k+1} - b_k,

    where ``b_k`` interpolates slice ``k`` bilinearly. Both slices are read by one 2D ``grid_sample`` of the tiled
    source of :func:`_tiled_slices` (built once here), the derivatives in ``y`` and ``x`` come from the 2D
    sampler's backward pass for the grid fed ``(1 - t) g`` and ``t g``. Border padding needs no mask: ``z`` is
    clamped to ``[-1, D - 1]`` and ``y`` to ``[-1/2, H - 1/2]``, where the tiles repeat the edge slice and row, so
    the value is the edge's and the derivative 0, as PyTorch's border mode gives. At 80x96x112 with 2 threads, a warp
    and its pull-back take about 10 ms, against 30 ms for ``grid_sample`` in 3D and its backward pass (40 ms through
    autograd, which also records the grid's construction). In float32 a row coordinate in the tiled source (``R``
    rows, about ``(D + 1) (H + 2)``) is rounded to about ``3e-8 R`` rows (2.5e-4 voxel at 80x96, 1e-3 at 160x192),
    far from a tile's edge (the clamp leaves half a row); whole rows are exact (``R - 1`` is a power of two), so a
    zero field reads the image at least as closely as the 3D sampler (8e-6 against 2e-5 at 80x96x112: the column
    coordinate's rounding).

    Args:
        image: ``[B, C, D, H, W]`` floating image (checked by the caller; no gradient flows into it).

    Returns:
        ``warp_pullback``: ``ddf [B, 3, D, H, W]`` (voxels) -> ``warped [B, C, D, H, W]`` (float32 at least, no
        gradient) and ``pullback``: ``grad_warped [B, C, D, H, W]`` -> ``[B, 3, D, H, W]``.
    """
    batch, channels, depth, height, width = image.shape
    with torch.no_grad():
        tiled = _tiled_slices(image.detach().to(torch.promote_types(image.dtype, torch.float32)))
    tile_height = height + 2
    row_scale, column_scale = 2.0 / (tiled.shape[2] - 1), 2.0 / max(width - 1, 1)

    def warp_pullback(ddf: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        dtype = torch.promote_types(tiled.dtype, ddf.dtype)
        slabs, rows = _slab_layout(batch, depth, ddf.device)
        length = slabs * rows  # the slab layout's rows: scalar fields [B, length, H, W] are [B * slabs, rows, H, W]
        with torch.no_grad():
            field = ddf.detach().to(dtype)
            lines = [torch.arange(size, device=ddf.device, dtype=dtype) for size in (depth, height, width)]
            z = field.new_empty((batch, length, height, width))
            torch.add(field[:, 0], lines[0].view(-1, 1, 1), out=z[:, :depth])
            z[:, depth:] = z[:, depth - 1 : depth]
            tile = z.clamp_(-1.0, depth - 1.0).floor()
            fraction = z.sub_(tile).view(batch * slabs, 1, rows, height, width)
            grid = field.new_empty((batch, length, height, width, 2))
            # normalised column, and row of the tiled source: ((k + 1) (H + 2) + 1 + clamp(y)) * scale - 1
            torch.add(lines[2] * column_scale - 1.0, field[:, 2], alpha=column_scale, out=grid[:, :depth, ..., 0])
            row = torch.add(lines[1].view(-1, 1) * row_scale, field[:, 1], alpha=row_scale)
            row.clamp_(-0.5 * row_scale, (height - 0.5) * row_scale).add_((tile_height + 1) * row_scale - 1.0)
            torch.add(row, tile[:, :depth], alpha=tile_height * row_scale, out=grid[:, :depth, ..., 1])
            grid[:, depth:] = grid[:, depth - 1 : depth]
            slab_grid = grid.view(batch * slabs, rows * height, width, 2)
            source = _slab_source(tiled.to(dtype), slabs)
            sampled = F.grid_sample(source, slab_grid, mode="bilinear", padding_mode="border", align_corners=True)
            lower, upper = sampled.view(batch * slabs, 2 * channels, rows, height, width).split(channels, dim=1)
            difference = upper - lower
            warped = _from_slabs(torch.addcmul(lower, difference, fraction), batch, slabs, rows, depth)

        def pullback(grad_warped: torch.Tensor) -> torch.Tensor:
            # the 2D sampler's own backward pass for the grid only (``output_mask``); torch.autograd.grad with a
            # gradient tensor would import torch.fx's symbolic shapes and sympy on first use (0.2 s)
            upstream = _into_slabs(grad_warped.to(dtype), slabs, rows)  # [B * slabs, C, rows, H, W]
            weighted = upstream.new_empty((batch * slabs, 2 * channels, rows, height, width))
            torch.mul(upstream, fraction, out=weighted[:, channels:])
            torch.sub(upstream, weighted[:, channels:], out=weighted[:, :channels])
            _, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                weighted.view(batch * slabs, 2 * channels, rows * height, width),
                source,
                slab_grid,
                0,  # bilinear
                1,  # border padding
                True,  # align_corners
                [False, True],
            )
            grad_grid = grad_grid.view(batch, length, height, width, 2)[:, :depth]
            gradient = grad_grid.new_empty((batch, 3, depth, height, width))
            along_z = difference.mul_(upstream)
            if channels > 1:
                along_z = along_z.sum(dim=1, keepdim=True)
            gradient[:, 0] = along_z.view(batch, length, height, width)[:, :depth]
            torch.mul(grad_grid[..., 1], row_scale, out=gradient[:, 1])
            torch.mul(grad_grid[..., 0], column_scale, out=gradient[:, 2])
            return gradient

        return warped, pullback

    return warp_pullback


def warp_labels(
    labels: torch.Tensor, ddf: torch.Tensor, method: str = "onehot", padding_mode: str = "border"
) -> torch.Tensor:
    """Warp an integer label map without interpolation artefacts: labels sampled at ``x + ddf(x)``.

    See :func:`sample_labels` for the two methods; the output holds only label values present in the input.

    Args:
        labels: ``[B, 1, *S]`` integer-valued label map (any integer or floating dtype).
        ddf: ``[B, n, *S]`` displacement in voxels.
        method: ``"onehot"`` or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` (outside is label 0) or ``"reflection"``.

    Returns:
        ``[B, 1, *S]`` warped labels, same dtype as ``labels``.
    """
    check_ddf(ddf, "ddf", labels.ndim - 2)
    check_same_spatial_shape(labels, ddf, "labels", "ddf")
    dtype = torch.promote_types(ddf.dtype, torch.float32)
    coords = identity_grid(ddf.shape[2:], device=ddf.device, dtype=dtype).unsqueeze(0) + ddf.to(dtype)
    return sample_labels(labels, coords, method, padding_mode)


def sample_labels(
    labels: torch.Tensor, coords: torch.Tensor, method: str = "onehot", padding_mode: str = "border"
) -> torch.Tensor:
    """Sample an integer label map at arbitrary voxel coordinates without interpolation artefacts.

    ``"onehot"`` gives, per point, the label whose indicator map has the largest trilinearly interpolated
    value there (smooth boundaries; ties go to the smaller label value). It is computed exactly from the
    8 grid corners around each point: a label's interpolated indicator is the summed trilinear weight of the
    corners carrying it, so the cost does not grow with the number of labels. ``"nearest"`` takes the nearest
    voxel's label. Either way the output holds only label values present in the input. With
    ``padding_mode="zeros"`` everything outside the grid is label 0.

    Args:
        labels: ``[B, 1, *S_in]`` integer-valued label map (any integer or floating dtype).
        coords: ``[B, n, *S_out]`` voxel coordinates into ``labels``.
        method: ``"onehot"`` or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` or ``"reflection"``.

    Returns:
        ``[B, 1, *S_out]`` labels, same dtype as ``labels``.
    """
    spatial_dims = labels.ndim - 2
    check_image(labels, "labels", spatial_dims)
    if labels.shape[1] != 1:
        raise ValueError(f"labels must have one channel [B, 1, ...], got shape {tuple(labels.shape)}.")
    check_labels(labels, "labels", allow_empty=True)
    check_image(coords, "coords", spatial_dims)
    if coords.shape[0] != labels.shape[0] or coords.shape[1] != spatial_dims:
        raise ValueError(f"coords must have shape [{labels.shape[0]}, {spatial_dims}, ...], got {tuple(coords.shape)}.")
    check_option(method, "method", ("onehot", "nearest"))
    check_option(padding_mode, "padding_mode", PADDING_MODES)
    coords = coords.to(torch.promote_types(coords.dtype, torch.float32))
    if method == "nearest":
        sampled = _sample(labels.to(coords.dtype), coords, "nearest", padding_mode)
        return torch.round(sampled).to(labels.dtype)
    if padding_mode == "reflection":
        coords = _reflect(coords, labels.shape[2:])
    flat_coords = coords.flatten(2)
    flat_labels = labels.flatten(1)
    sampled = torch.empty(labels.shape[0], flat_coords.shape[-1], dtype=labels.dtype, device=labels.device)
    for start in range(0, flat_coords.shape[-1], LABEL_WARP_CHUNK):
        chunk = slice(start, start + LABEL_WARP_CHUNK)
        sampled[:, chunk] = _majority_of_corners(flat_labels, flat_coords[..., chunk], labels.shape[2:], padding_mode)
    return sampled.view(labels.shape[0], 1, *coords.shape[2:])


LABEL_WARP_CHUNK = 2**18


def _reflect(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Reflect voxel coordinates ``[B, n, ...]`` into ``[0, N - 1]`` (corner-aligned ``grid_sample`` rule)."""
    size = torch.tensor([max(s - 1, 1) for s in shape], device=coords.device, dtype=coords.dtype)
    size = size.view(1, -1, *([1] * (coords.ndim - 2)))
    folded = torch.remainder(coords, 2 * size)
    return torch.where(folded > size, 2 * size - folded, folded)


def _majority_of_corners(
    flat_labels: torch.Tensor, coords: torch.Tensor, shape: Sequence[int], padding_mode: str
) -> torch.Tensor:
    """Label of largest summed trilinear weight among the 2^n corners around each point.

    Args:
        flat_labels: ``[B, prod(S)]`` label map, flattened.
        coords: ``[B, n, P]`` voxel coordinates of ``P`` sample points.

    Returns:
        ``[B, P]`` labels.
    """
    spatial_dims = coords.shape[1]
    sizes = torch.tensor(list(shape), device=coords.device)
    lower = torch.floor(coords)
    fraction = coords - lower
    lower = lower.long()
    strides = [int(torch.tensor(shape[a + 1 :]).prod()) for a in range(spatial_dims)]
    corner_labels, corner_weights = [], []
    for corner in torch.cartesian_prod(*[torch.tensor([0, 1])] * spatial_dims).view(-1, spatial_dims).tolist():
        index = lower + torch.tensor(corner, device=coords.device).view(1, -1, 1)
        weight = torch.ones_like(fraction[:, 0])
        for axis, offset in enumerate(corner):
            weight = weight * (fraction[:, axis] if offset else 1 - fraction[:, axis])
        inside = ((index >= 0) & (index < sizes.view(1, -1, 1))).all(1)
        index = torch.minimum(index.clamp(min=0), (sizes - 1).view(1, -1, 1))
        flat_index = sum(index[:, axis] * strides[axis] for axis in range(spatial_dims))
        label = torch.gather(flat_labels, 1, flat_index)
        if padding_mode == "zeros":
            label = torch.where(inside, label, torch.zeros_like(label))
        corner_labels.append(label)
        corner_weights.append(weight)
    corner_labels_t = torch.stack(corner_labels, 1)
    corner_weights_t = torch.stack(corner_weights, 1)
    same = corner_labels_t.unsqueeze(1) == corner_labels_t.unsqueeze(2)
    scores = (same * corner_weights_t.unsqueeze(1)).sum(2)
    best = scores.max(1, keepdim=True).values
    candidates = scores >= best - 1e-6
    largest = torch.iinfo(torch.int64).max
    winner = torch.where(candidates, corner_labels_t.long(), torch.full_like(corner_labels_t.long(), largest))
    return winner.min(1).values.to(flat_labels.dtype)


def compose(outer: torch.Tensor, inner: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Field of the composed map ``x -> phi_outer(phi_inner(x))`` (see the module docstring for the order).

    ``compose(outer, inner)(x) = inner(x) + outer(x + inner(x))``, so that
    ``warp(warp(image, outer), inner) == warp(image, compose(outer, inner))``.

    ``outer`` may live on a grid of another size over the same field of view (corner-aligned, as
    :func:`resize_ddf`): it is then evaluated at ``inner``'s points directly, with its values converted to
    voxels of ``inner``'s grid, instead of being resampled onto that grid first (one interpolation, not two;
    this is how a cascade of networks at several resolutions composes its steps).

    Args:
        outer: ``[B, n, *S_outer]`` field applied to the image first (e.g. the field found so far).
        inner: ``[B, n, *S]`` field applied second (e.g. the increment estimated on the warped image).
        padding_mode: how ``outer`` is extended outside its grid (``"border"`` keeps the edge displacement).

    Returns:
        ``[B, n, *S]`` composed displacement in voxels of ``inner``'s grid.
    """
    check_ddf(outer, "outer", outer.ndim - 2)
    check_ddf(inner, "inner", outer.ndim - 2)
    if outer.shape[:2] != inner.shape[:2]:
        raise ValueError(
            f"outer and inner must have the same batch size and components, got {tuple(outer.shape)} and "
            f"{tuple(inner.shape)}."
        )
    check_option(padding_mode, "padding_mode", PADDING_MODES)
    return _compose(outer, inner, padding_mode)


def _compose(outer: torch.Tensor, inner: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """:func:`compose` without argument checks.

    Both grids span the same extent, so ``inner``'s points have the same normalised coordinates in ``outer``'s
    grid: :func:`_warp` samples ``outer`` there whatever its size, and only the values change units. The sum is
    formed in the sampled values' buffer (no further volume).
    """
    sampled = _warp(outer, inner, padding_mode=padding_mode).to(torch.promote_types(outer.dtype, inner.dtype))
    if outer.shape[2:] != inner.shape[2:]:
        to_outer = _resize_scale(inner.shape[2:], outer.shape[2:], True)
        view = (1, -1, *([1] * (inner.ndim - 2)))
        sampled = sampled.div_(torch.tensor(to_outer, device=inner.device, dtype=sampled.dtype).view(view))
    return sampled.add_(inner)


def cascade_displacement(
    fields: Sequence[torch.Tensor], points: torch.Tensor, shape: Sequence[int], padding_mode: str = "border"
) -> torch.Tensor:
    """Displacement of the composed map ``phi_1 o phi_2 o ... o phi_k`` at arbitrary points, step by step.

    Each step map is ``phi_i(y) = y + u_i(y)`` with ``u_i`` interpolated (trilinear) from its own grid; the last
    step is applied first: ``y_k = x + u_k(x)``, ``y_{i} = y_{i+1} + u_i(y_{i+1})``, result ``y_1 - x``. This is the
    reference uniGradICON's function composition (``TwoStepRegistration``: ``phi(psi(x))``); collapsing the cascade
    onto one grid first (:func:`compose`) and interpolating that field gives another value off the grid.

    Args:
        fields: ``[B, n, *S_i]`` step fields ``u_1 ... u_k`` in voxels of their own grids, all over the field of view
            of ``shape`` (corner-aligned, as :func:`resize_ddf`).
        points: ``[B, n, *P]`` voxel coordinates on the grid of ``shape``.
        shape: the grid ``points`` refer to (e.g. the working size of the finest step).
        padding_mode: how each field extends outside its grid (reference: ``"border"``).

    Returns:
        ``[B, n, *P]`` displacement ``phi(x) - x`` in voxels of ``shape``'s grid.
    """
    if len(fields) == 0:
        raise ValueError("fields must hold at least one step field.")
    check_option(padding_mode, "padding_mode", PADDING_MODES)
    spatial_dims = points.ndim - 2
    view = (1, -1, *([1] * spatial_dims))
    reached = points
    for index, field in enumerate(reversed(fields)):
        check_ddf(field, f"fields[{len(fields) - 1 - index}]", spatial_dims)
        to_field = torch.tensor(_resize_scale(shape, field.shape[2:], True), device=points.device, dtype=points.dtype)
        to_field = to_field.view(view)
        step = _sample(field, reached * to_field, "bilinear", padding_mode).to(points.dtype) / to_field
        reached = reached + step
    return reached - points


def integrate_velocity(svf: torch.Tensor, num_steps: int = 7, padding_mode: str = "border") -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring (Arsigny et al. 2006).

    ``u_0 = v / 2^K``, ``u_{k+1} = compose(u_k, u_k)``; returns ``u_K``, the displacement of ``exp(v)``.
    Same scheme as ``monai.networks.blocks.DVF2DDF``, here with a selectable padding (default ``"border"``:
    a constant velocity integrates to exactly that shift everywhere).

    Args:
        svf: ``[B, n, *S]`` velocity in voxels.
        num_steps: number of squarings ``K`` (0 returns ``svf`` itself).
        padding_mode: padding used when sampling the field outside its grid.

    Returns:
        ``[B, n, *S]`` displacement in voxels.
    """
    check_ddf(svf, "svf", svf.ndim - 2)
    check_integer(num_steps, "num_steps", 0)
    check_option(padding_mode, "padding_mode", PADDING_MODES)
    ddf = svf / (2**num_steps)
    for _ in range(num_steps):
        ddf = _compose(ddf, ddf, padding_mode)
    return ddf


def grid_coordinates(
    source_affine: torch.Tensor, target_affine: torch.Tensor, target_shape: Sequence[int]
) -> torch.Tensor:
    """Voxel coordinates in the source grid of every target voxel centre, through physical space.

    ``y = A_source^-1 A_target x``: the world point of target voxel ``x`` expressed in source voxel indices.

    Args:
        source_affine: ``[n+1, n+1]`` voxel-to-world affine of the grid being sampled.
        target_affine: ``[n+1, n+1]`` voxel-to-world affine of the output grid.
        target_shape: output spatial shape.

    Returns:
        ``[1, n, *target_shape]`` float64 coordinates.
    """
    spatial_dims = len(target_shape)
    source = check_affine(source_affine, "source_affine", spatial_dims)
    target = check_affine(target_affine, "target_affine", spatial_dims)
    if source.ndim != 2 or target.ndim != 2:
        raise ValueError("source_affine and target_affine must each be a single [n+1, n+1] matrix.")
    mapping = torch.linalg.inv(source) @ target
    grid = identity_grid(target_shape, dtype=torch.float64)
    coords = torch.einsum("ij,j...->i...", mapping[:spatial_dims, :spatial_dims], grid)
    return (coords + mapping[:spatial_dims, spatial_dims].view(-1, *([1] * spatial_dims))).unsqueeze(0)


def resample_to_grid(
    image: torch.Tensor,
    source_affine: torch.Tensor,
    target_affine: torch.Tensor,
    target_shape: Sequence[int],
    is_label: bool = False,
) -> torch.Tensor:
    """Resample an image from its grid onto another grid in physical space (outside the source: 0).

    Used to bring a moving image acquired on another grid or orientation onto the fixed grid before
    registration, so that the identity means "same physical point".

    Args:
        image: ``[1, C, *S_source]`` image, or ``[1, 1, *S_source]`` integer labels with ``is_label``.
        source_affine: ``[n+1, n+1]`` voxel-to-world affine of ``image``.
        target_affine: ``[n+1, n+1]`` voxel-to-world affine of the output grid.
        target_shape: output spatial shape.
        is_label: sample labels without interpolation artefacts (:func:`sample_labels`, one-hot method).

    Returns:
        ``[1, C, *target_shape]`` resampled image (labels keep their dtype).
    """
    check_image(image, "image", len(target_shape))
    if image.shape[0] != 1:
        raise ValueError(f"image must hold one volume [1, C, ...], got shape {tuple(image.shape)}.")
    coords = grid_coordinates(source_affine, target_affine, target_shape).to(image.device)
    if is_label:
        return sample_labels(image, coords, padding_mode="zeros")
    floating = image if image.is_floating_point() else image.to(torch.float32)
    return _sample(floating, coords.to(torch.promote_types(floating.dtype, torch.float32)), "bilinear", "zeros").to(
        floating.dtype
    )


def ddf_to_grid(
    ddf: torch.Tensor, source_affine: torch.Tensor, target_affine: torch.Tensor, target_shape: Sequence[int]
) -> torch.Tensor:
    """A displacement field on one grid as the same mapping on another grid, through physical space.

    For a field ``u`` ``[1, n, *S_source]`` in voxels of the source grid (e.g. the network's grid after reorienting,
    resampling and padding or cropping), the target voxel ``p`` at world point ``A_t p = A_s q`` moves to
    ``A_s (q + u(q))``, i.e. by ``L u(q)`` target voxels with ``L`` the linear part of ``A_t^-1 A_s``; ``u(q)`` is
    interpolated (trilinear), and a target voxel outside the source grid does not move.

    Args:
        ddf: ``[1, n, *S_source]`` displacement in source voxels.
        source_affine: ``[n+1, n+1]`` voxel-to-world affine of the field's grid.
        target_affine: ``[n+1, n+1]`` voxel-to-world affine of the output grid.
        target_shape: output spatial shape.

    Returns:
        ``[1, n, *target_shape]`` displacement in target voxels, in the dtype of ``ddf``.
    """
    spatial_dims = len(target_shape)
    check_image(ddf, "ddf", spatial_dims)
    if ddf.shape[0] != 1 or ddf.shape[1] != spatial_dims:
        raise ValueError(f"ddf must be one field [1, {spatial_dims}, ...], got shape {tuple(ddf.shape)}.")
    coords = grid_coordinates(source_affine, target_affine, target_shape).to(ddf.device)
    floating = ddf.to(torch.promote_types(ddf.dtype, torch.float32))
    moved = _sample(floating, coords.to(floating.dtype), "bilinear", "zeros")
    source = check_affine(source_affine, "source_affine", spatial_dims).to(torch.float64)
    target = check_affine(target_affine, "target_affine", spatial_dims).to(torch.float64)
    linear = (torch.linalg.inv(target) @ source)[:spatial_dims, :spatial_dims].to(moved)
    return torch.einsum("ij,bj...->bi...", linear, moved).to(ddf.dtype)


def _resize_scale(old: Sequence[int], new: Sequence[int], align_corners: bool) -> list[float]:
    """Per-axis factor from voxels of the ``old`` grid to voxels of the ``new`` grid (a singleton axis keeps 1)."""
    if align_corners:
        return [(n - 1) / (o - 1) if o > 1 else 1.0 for o, n in zip(old, new)]
    return [n / o for o, n in zip(old, new)]


def resize_image(
    image: torch.Tensor, size: Sequence[int], mode: str = "trilinear", align_corners: bool = True
) -> torch.Tensor:
    """Resize an image ``[B, C, *S]`` to ``size`` on the same field of view.

    With ``align_corners=True`` (the package default) the first and last voxel centres of both grids
    coincide, the convention :func:`resize_ddf` uses to bring a field computed at a network size back.

    Args:
        image: ``[B, C, *S]`` floating image.
        size: new spatial shape.
        mode: ``"trilinear"``/``"bilinear"`` (by rank) or ``"nearest"`` (use for labels; any dtype).
        align_corners: corner-aligned (True) or half-voxel (False) grid correspondence.

    Returns:
        ``[B, C, *size]`` resized image.
    """
    spatial_dims = image.ndim - 2
    check_image(image, "image", spatial_dims)
    size = _check_size(size, spatial_dims)
    check_option(mode, "mode", ("trilinear", "bilinear", "nearest"))
    if mode == "nearest":
        return _resize_nearest(image, size, align_corners)
    linear = "trilinear" if spatial_dims == 3 else "bilinear"
    return F.interpolate(image, size=size, mode=linear, align_corners=align_corners)


def _resize_nearest(image: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """Nearest-neighbour resize on the same grid correspondence as the linear modes.

    Corner-aligned: new index ``i`` takes old index ``round(i (N - 1) / (n - 1))``; otherwise PyTorch's
    half-voxel ``"nearest-exact"`` rule.
    """
    if not align_corners:
        return F.interpolate(image, size=size, mode="nearest-exact")
    resized = image
    for axis, (old, new) in enumerate(zip(image.shape[2:], size)):
        step = (old - 1) / (new - 1) if new > 1 else 0.0
        index = torch.round(torch.arange(new, device=image.device, dtype=torch.float64) * step).long()
        resized = resized.index_select(axis + 2, index)
    return resized


def _check_size(size: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    size = tuple(size)
    if len(size) != spatial_dims or any(isinstance(s, bool) or int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must list {spatial_dims} positive integers, got {size}.")
    return tuple(int(s) for s in size)


def resize_ddf(ddf: torch.Tensor, size: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Resample a displacement field to another grid over the same field of view, rescaling its values.

    Each component is interpolated (trilinear) and multiplied by the ratio of voxel sizes along its axis,
    ``(N_new - 1) / (N_old - 1)`` for corner-aligned grids, ``N_new / N_old`` otherwise, so the displacement
    in millimetres is unchanged.

    Args:
        ddf: ``[B, n, *S_old]`` displacement in voxels of the old grid.
        size: new spatial shape ``S_new``.
        align_corners: grid correspondence used when the images were resized (see :func:`resize_image`).

    Returns:
        ``[B, n, *S_new]`` displacement in voxels of the new grid.
    """
    spatial_dims = ddf.ndim - 2
    check_ddf(ddf, "ddf", spatial_dims)
    size = _check_size(size, spatial_dims)
    resized = resize_image(ddf, size, align_corners=align_corners)
    scale = torch.tensor(_resize_scale(ddf.shape[2:], size, align_corners), device=ddf.device, dtype=ddf.dtype)
    return resized * scale.view(1, -1, *([1] * spatial_dims))


def ddf_voxel_to_normalized(ddf: torch.Tensor, value_range: str = "[-1,1]") -> torch.Tensor:
    """Voxel displacement -> displacement in normalised coordinates of a corner-aligned grid.

    ``"[-1,1]"``: ``d * 2 / (N - 1)`` (PyTorch ``grid_sample``, ``align_corners=True``);
    ``"[0,1]"``: ``d / (N - 1)`` (icon_registration / uniGradICON). Channel order stays the spatial-axis order
    (``grid_sample`` wants it reversed; :func:`sample` does that internally).

    Args:
        ddf: ``[B, n, *S]`` displacement in voxels.
        value_range: ``"[-1,1]"`` or ``"[0,1]"``.

    Returns:
        ``[B, n, *S]`` displacement in normalised units.
    """
    return ddf * _normalized_units_per_voxel(ddf, value_range)


def ddf_normalized_to_voxel(ddf: torch.Tensor, value_range: str = "[-1,1]") -> torch.Tensor:
    """Inverse of :func:`ddf_voxel_to_normalized`: ``[B, n, *S]`` normalised displacement -> voxels."""
    return ddf / _normalized_units_per_voxel(ddf, value_range)


def _normalized_units_per_voxel(ddf: torch.Tensor, value_range: str) -> torch.Tensor:
    """Checked ``[1, n, 1, ...]`` size of one voxel of ``ddf``'s grid in normalised units."""
    check_ddf(ddf, "ddf", ddf.ndim - 2)
    check_option(value_range, "value_range", NORMALIZED_RANGES)
    return _normalized_voxel_size(ddf, value_range)


def _normalized_voxel_size(ddf: torch.Tensor, value_range: str) -> torch.Tensor:
    """``[1, n, 1, ...]`` size of one voxel of ``ddf``'s grid in normalised units, without argument checks."""
    extent = 2.0 if value_range == "[-1,1]" else 1.0
    per_voxel = [extent / max(s - 1, 1) for s in ddf.shape[2:]]
    return torch.tensor(per_voxel, device=ddf.device, dtype=ddf.dtype).view(1, -1, *([1] * (ddf.ndim - 2)))


def _linear_part(affine: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """``[B, n, n]`` linear part of an affine ``[n+1, n+1]`` or ``[B, n+1, n+1]``, matched to ``ddf``."""
    spatial_dims = ddf.shape[1]
    affine = check_affine(affine, "affine", spatial_dims)
    linear = affine[..., :spatial_dims, :spatial_dims]
    if linear.ndim == 2:
        linear = linear.expand(ddf.shape[0], -1, -1)
    elif linear.shape[0] != ddf.shape[0]:
        raise ValueError(f"affine has batch size {linear.shape[0]} but ddf has batch size {ddf.shape[0]}.")
    return linear


def ddf_voxel_to_mm(ddf: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Voxel displacement -> physical displacement in millimetres (world axes of the affine).

    ``d_mm(x) = A d_vox(x)`` with ``A`` the linear part of the voxel-to-world ``affine`` (e.g. a NIfTI
    affine: world axes RAS+). The result is a vector per voxel of the same grid, channel ``j`` = world axis ``j``.

    Args:
        ddf: ``[B, n, *S]`` displacement in voxels.
        affine: ``[n+1, n+1]`` or ``[B, n+1, n+1]`` voxel-to-world affine of the grid.

    Returns:
        ``[B, n, *S]`` displacement in mm.
    """
    check_ddf(ddf, "ddf", ddf.ndim - 2)
    linear = _linear_part(affine, ddf).to(device=ddf.device, dtype=torch.float64)
    return torch.einsum("bij,bj...->bi...", linear, ddf.to(torch.float64)).to(ddf.dtype)


def ddf_mm_to_voxel(ddf_mm: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Physical displacement in mm (world axes) -> voxels: ``d_vox = A^-1 d_mm`` (see :func:`ddf_voxel_to_mm`)."""
    check_ddf(ddf_mm, "ddf_mm", ddf_mm.ndim - 2)
    inverse = torch.linalg.inv(_linear_part(affine, ddf_mm)).to(device=ddf_mm.device)
    return torch.einsum("bij,bj...->bi...", inverse, ddf_mm.to(torch.float64)).to(ddf_mm.dtype)


def spacing_from_affine(affine: torch.Tensor | np.ndarray, spatial_dims: int = 3) -> np.ndarray:
    """Voxel spacing from a voxel-to-world affine: the Euclidean norms of the columns of its linear part.

    Args:
        affine: ``[n+1, n+1]`` or batched ``[B, n+1, n+1]`` (``n = spatial_dims``), voxel index -> world (mm).
        spatial_dims: number of spatial axes ``n``.

    Returns:
        float64 ``[n]`` or ``[B, n]``: the spacing of each array axis, in the affine's world unit.
    """
    affine = check_affine(affine, "affine", spatial_dims)
    return torch.linalg.vector_norm(affine[..., :spatial_dims, :spatial_dims], dim=-2).cpu().numpy()


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of ``phi(x) = x + ddf(x)``: ``det(I + grad u)``.

    Derivatives are finite differences in voxel units (``torch.gradient``: central differences
    ``(u[i+1] - u[i-1]) / 2`` inside, one-sided at the borders). In the interior this equals the Learn2Reg
    evaluation's kernel ``[-0.5, 0, 0.5]``. Computed in float32 at least (float64 stays float64).

    Args:
        ddf: ``[B, n, *S]`` displacement in voxels, every spatial size >= 2.

    Returns:
        ``[B, 1, *S]`` determinant; values <= 0 mark folding.
    """
    spatial_dims = ddf.ndim - 2
    check_ddf(ddf, "ddf", spatial_dims)
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"ddf needs at least 2 voxels along every spatial axis, got shape {tuple(ddf.shape)}.")
    field = ddf if ddf.dtype == torch.float64 else ddf.to(torch.float32)
    gradients = torch.gradient(field, dim=tuple(range(2, 2 + spatial_dims)))
    # j[i][d] = d phi_i / d x_d = delta_id + d u_i / d x_d, each [B, *S]
    j = [[gradients[d][:, i] + (1.0 if i == d else 0.0) for d in range(spatial_dims)] for i in range(spatial_dims)]
    if spatial_dims == 2:
        determinant = j[0][0] * j[1][1] - j[0][1] * j[1][0]
    else:
        determinant = (
            j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
        )
    return determinant.unsqueeze(1)
