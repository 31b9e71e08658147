"""Dictionary transforms on registration pairs: checking, resizing to a network size, restoring fields, warping.

A pair dictionary holds channel-first tensors without batch axis (MONAI dictionary style):
``fixed_image`` / ``moving_image`` ``[C, D, H, W]``, optional ``fixed_label`` / ``moving_label``
``[1, D, H, W]`` (integer-valued) and, after the network, ``ddf`` ``[3, D, H, W]`` in voxels of the fixed
grid (MONAI ``Warp`` convention, ``warped(x) = moving(x + ddf(x))``, see :mod:`monai_unireg.spatial`).

Grid convention for resizing: corner-aligned (``align_corners=True``): the first and last voxel centres
of the original and resized grids coincide, so voxel ``i`` of an ``n``-voxel network axis lies at original
index ``i (N - 1) / (n - 1)``. Images are resized with trilinear interpolation on that correspondence, labels
by nearest neighbour on the same correspondence, and fields are brought back with
:func:`monai_unireg.spatial.resize_ddf` (values rescaled by ``(N - 1) / (n - 1)`` per axis). For
``MetaTensor`` inputs the affine is updated to match (``A_new = A diag((N - 1) / (n - 1), 1)``), so
network-size tensors keep a correct voxel-to-world mapping.

Typical inference chain (``CopyItemsd`` keeps full-resolution copies where warping at the original size
is wanted)::

    Compose([LoadImaged(keys, ensure_channel_first=True, allow_missing_keys=True),
             MRIPercentiled(("fixed_image", "moving_image")),
             CopyItemsd(("fixed_image", "moving_image"), names=("fixed_image_full", "moving_image_full")),
             CheckPaird(), ResizePaird((175, 175, 175))])
    # ddf = net(moving[None], fixed[None])[0] stored under "ddf", then
    Compose([RestoreDDFd("ddf"), WarpImaged("moving_image_full", ref_key="fixed_image_full")])
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor, ensure_tuple

from monai_unireg.spatial import (
    INTERPOLATION_MODES,
    PADDING_MODES,
    ddf_to_grid,
    resize_ddf,
    resize_image,
    warp,
    warp_labels,
)
from monai_unireg.validation import check_informative_image, check_labels, check_option, check_tensor, plain_tensor

__all__ = [
    "FIXED_IMAGE",
    "MOVING_IMAGE",
    "FIXED_LABEL",
    "MOVING_LABEL",
    "DDF",
    "WARPED_IMAGE",
    "WARPED_LABEL",
    "ORIGINAL_SHAPE_SUFFIX",
    "ORIGINAL_AFFINE_SUFFIX",
    "CheckPaird",
    "ResizePaird",
    "ResizeDDF",
    "RestoreDDFd",
    "DDFToGridd",
    "WarpImaged",
    "WarpLabeld",
]

FIXED_IMAGE = "fixed_image"
MOVING_IMAGE = "moving_image"
FIXED_LABEL = "fixed_label"
MOVING_LABEL = "moving_label"
DDF = "ddf"
WARPED_IMAGE = "warped_image"
WARPED_LABEL = "warped_label"
#: :class:`ResizePaird` stores an image's spatial shape before resizing under ``key + ORIGINAL_SHAPE_SUFFIX``.
ORIGINAL_SHAPE_SUFFIX = "_original_shape"
#: :class:`ResizePaird` stores a ``MetaTensor`` image's affine before resizing under ``key + ORIGINAL_AFFINE_SUFFIX``.
ORIGINAL_AFFINE_SUFFIX = "_original_affine"

SPATIAL_DIMS = 3


def _as_tensor(value: Any, key: Hashable) -> torch.Tensor:
    """``value`` as a (Meta)Tensor; ``ValueError`` naming ``key`` for other types."""
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise ValueError(f"data[{key!r}] must be a torch.Tensor or numpy array, got {type(value).__name__}.")
    return convert_to_tensor(value, track_meta=isinstance(value, MetaTensor))


def _check_volume(value: Any, key: Hashable) -> torch.Tensor:
    """Check a channel-first volume ``[C, D, H, W]`` of finite values; return it as a tensor."""
    tensor = _as_tensor(value, key)
    if tensor.ndim != SPATIAL_DIMS + 1:
        raise ValueError(
            f"data[{key!r}] must be a channel-first volume [C, D, H, W] ({SPATIAL_DIMS + 1} dimensions, no batch "
            f"axis), got shape {tuple(tensor.shape)}."
        )
    if min(tensor.shape) == 0:
        raise ValueError(f"data[{key!r}] must not be empty, got shape {tuple(tensor.shape)}.")
    return check_tensor(tensor, f"data[{key!r}]")


def _describe(key: Hashable, value: Any) -> str:
    """``data['fixed_image']`` followed by the file it was read from, when it carries that metadata."""
    filename = value.meta.get("filename_or_obj") if isinstance(value, MetaTensor) else None
    return f"data[{key!r}]" + (f" ({filename})" if filename else "")


def _check_label(value: Any, key: Hashable) -> torch.Tensor:
    """Check a single-channel integer-valued label volume ``[1, D, H, W]``; return it as a tensor."""
    tensor = _check_volume(value, key)
    if tensor.shape[0] != 1:
        raise ValueError(f"data[{key!r}] must be a label map with one channel [1, D, H, W], got {tuple(tensor.shape)}.")
    check_labels(tensor, f"data[{key!r}]", allow_empty=True)
    return tensor


def _check_ddf(value: Any, key: Hashable) -> torch.Tensor:
    """Check a displacement field ``[3, D, H, W]`` of finite floating values; return it as a tensor."""
    tensor = _check_volume(value, key)
    if tensor.shape[0] != SPATIAL_DIMS or not tensor.is_floating_point():
        raise ValueError(
            f"data[{key!r}] must be a floating displacement field [{SPATIAL_DIMS}, D, H, W], "
            f"got shape {tuple(tensor.shape)} and dtype {tensor.dtype}."
        )
    return tensor


def _check_same_shape(shapes: Mapping[Hashable, Sequence[int]], reason: str) -> None:
    """``ValueError`` naming the keys when the spatial shapes in ``shapes`` (key -> shape) differ."""
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        listing = ", ".join(f"data[{key!r}] {tuple(shape)}" for key, shape in shapes.items())
        raise ValueError(f"spatial shapes must match ({reason}), got {listing}.")


def _with_meta(out: torch.Tensor, source: Any, affine: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` carrying a copy of the metadata of the MetaTensor ``source`` (and ``affine`` if given).

    Returns the plain tensor ``out`` when ``source`` is not a MetaTensor and no affine is given.
    """
    if isinstance(source, MetaTensor):
        result = MetaTensor(out, meta=copy.deepcopy(source.meta))
    elif affine is not None:
        result = MetaTensor(out)
    else:
        return out
    if affine is not None:
        result.affine = affine
    return result


def _corner_aligned_affine(affine: torch.Tensor, old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Affine of a grid resized from ``old`` to ``new`` voxels with corner-aligned voxel centres.

    ``A_new = A_old diag(s, 1)`` with ``s_i = (old_i - 1) / (new_i - 1)`` (``1`` on singleton axes).
    """
    scale = [(o - 1) / (n - 1) if n > 1 else 1.0 for o, n in zip(old, new)]
    affine = torch.as_tensor(affine, dtype=torch.float64)
    return affine @ torch.diag(torch.tensor([*scale, 1.0], dtype=torch.float64))


def _check_resizable(x: torch.Tensor, key: Hashable) -> torch.Tensor:
    """Check that ``x`` ``[C, *S]`` has >= 2 voxels per spatial axis (a corner-aligned grid needs two)."""
    if min(x.shape[1:]) < 2:
        raise ValueError(
            f"data[{key!r}] needs >= 2 voxels along every spatial axis to be resized on a corner-aligned grid, "
            f"got shape {tuple(x.shape)}."
        )
    return x


def _check_spatial_size(spatial_size: Any) -> tuple[int, ...]:
    """Normalise ``spatial_size`` (an int or 3 ints, each >= 2) to a 3-tuple."""
    size = ensure_tuple(spatial_size)
    size = size * SPATIAL_DIMS if len(size) == 1 else size
    if len(size) != SPATIAL_DIMS or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in size):
        raise ValueError(f"spatial_size must be an int or {SPATIAL_DIMS} ints, got {spatial_size!r}.")
    if min(size) < 2:
        raise ValueError(f"spatial_size must be >= 2 along every axis (corner-aligned grids), got {spatial_size!r}.")
    return tuple(int(s) for s in size)


class CheckPaird(MapTransform):
    """Validate a pair dictionary and pass it through unchanged.

    Every present key must hold a channel-first volume ``[C, D, H, W]`` of finite values, images must not be
    constant (:func:`~monai_unireg.validation.check_informative_image`), labels must have one channel and integer
    values, and all of them must share one spatial shape (needed wherever the moving image is warped with a field
    on the fixed grid). Label keys are optional.

    Args:
        keys: image keys (required unless ``allow_missing_keys``).
        label_keys: label keys, checked when present.
        allow_missing_keys: do not raise ``KeyError`` for absent image keys.

    Raises:
        ValueError: naming the offending key(s).
    """

    def __init__(
        self,
        keys: KeysCollection = (FIXED_IMAGE, MOVING_IMAGE),
        label_keys: KeysCollection = (FIXED_LABEL, MOVING_LABEL),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = ensure_tuple(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check ``data``; returns a shallow copy."""
        d = dict(data)
        shapes = {}
        for key in self.key_iterator(d):
            image = _check_volume(d[key], key)
            check_informative_image(image, _describe(key, d[key]))
            shapes[key] = image.shape[1:]
        shapes.update({key: _check_label(d[key], key).shape[1:] for key in self.label_keys if key in d})
        _check_same_shape(shapes, "fixed and moving images and labels of a pair share one grid")
        return d


class ResizePaird(MapTransform):
    """Resize the images and labels of a pair to the network size, recording what is needed to go back.

    Images: trilinear, ``align_corners=True`` (cast to ``float32`` when not floating); labels: nearest
    neighbour on the same corner-aligned correspondence (dtype kept). Fixed and moving may differ in shape
    (each is resized to ``spatial_size``, no aspect preservation, as uniGradICON / PromptReg do); a label
    must have the shape of its image. For every image key, the spatial shape before resizing is stored
    under ``key + "_original_shape"`` (int64 tensor ``[3]``) and, for ``MetaTensor`` images, the affine
    under ``key + "_original_affine"``; :class:`RestoreDDFd` reads them. The affine of a resized
    ``MetaTensor`` is updated for the corner-aligned grid.

    Args:
        spatial_size: network size, an int (isotropic) or 3 ints, each >= 2 (uniGradICON 175, PromptReg 160).
        keys: image keys (required unless ``allow_missing_keys``).
        label_keys: label keys parallel to ``keys`` (``label_keys[i]`` labels the image ``keys[i]``),
            resized when present.
        allow_missing_keys: do not raise ``KeyError`` for absent image keys.
    """

    def __init__(
        self,
        spatial_size: int | Sequence[int],
        keys: KeysCollection = (FIXED_IMAGE, MOVING_IMAGE),
        label_keys: KeysCollection = (FIXED_LABEL, MOVING_LABEL),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = _check_spatial_size(spatial_size)
        self.label_keys = ensure_tuple(label_keys)
        if len(self.label_keys) != len(self.keys):
            raise ValueError(
                f"label_keys must be parallel to keys ({len(self.keys)} image keys), got {self.label_keys}."
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resize every present image and label of ``data``."""
        d = dict(data)
        for image_key, label_key in self.key_iterator(d, self.label_keys):
            image = _check_resizable(_check_volume(d[image_key], image_key), image_key)
            original_shape = tuple(image.shape[1:])
            if label_key in d:
                label = _check_label(d[label_key], label_key)
                _check_same_shape({image_key: original_shape, label_key: label.shape[1:]}, "a label labels its image")
                d[label_key] = self._resize(label, is_label=True)
            d[image_key + ORIGINAL_SHAPE_SUFFIX] = torch.tensor(original_shape, dtype=torch.int64)
            if isinstance(image, MetaTensor):
                d[image_key + ORIGINAL_AFFINE_SUFFIX] = image.affine.clone()
            d[image_key] = self._resize(image, is_label=False)
        return d

    def _resize(self, x: torch.Tensor, is_label: bool) -> torch.Tensor:
        """Resize one volume ``[C, *S]`` to ``spatial_size``; a MetaTensor keeps its metadata, affine updated."""
        data = plain_tensor(x)
        if is_label:
            out = resize_image(data[None], self.spatial_size, mode="nearest", align_corners=True)[0]
        else:
            data = data if data.is_floating_point() else data.to(torch.float32)
            out = resize_image(data[None], self.spatial_size, mode="trilinear", align_corners=True)[0]
        if not isinstance(x, MetaTensor):
            return out
        return _with_meta(out, x, _corner_aligned_affine(x.affine, x.shape[1:], self.spatial_size))


class ResizeDDF(Transform):
    """Resample a displacement field ``[3, *S]`` (voxels) to ``spatial_size``, rescaling its values.

    Uses :func:`monai_unireg.spatial.resize_ddf` with ``align_corners=True`` (the grid convention of
    :class:`ResizePaird`): a constant field of ``k`` voxels on an ``n``-voxel axis becomes
    ``k (N - 1) / (n - 1)`` voxels on an ``N``-voxel axis. A ``MetaTensor`` keeps its metadata with the
    affine updated for the new grid.

    Args:
        spatial_size: target spatial shape, an int (isotropic) or 3 ints, each >= 2.
    """

    def __init__(self, spatial_size: int | Sequence[int]) -> None:
        self.spatial_size = _check_spatial_size(spatial_size)

    def __call__(self, ddf: torch.Tensor) -> torch.Tensor:
        """``[3, *S]`` field -> ``[3, *spatial_size]`` field."""
        ddf = _check_resizable(_check_ddf(ddf, "ddf"), "ddf")
        out = resize_ddf(plain_tensor(ddf)[None], self.spatial_size, align_corners=True)[0]
        if not isinstance(ddf, MetaTensor):
            return out
        return _with_meta(out, ddf, _corner_aligned_affine(ddf.affine, ddf.shape[1:], self.spatial_size))


class RestoreDDFd(MapTransform):
    """Bring fields predicted at the network size back to the original fixed grid (after :class:`ResizePaird`).

    The target shape is ``data[ref_key + "_original_shape"]`` (recorded by :class:`ResizePaird`), or the
    spatial shape of ``data[ref_key]`` when nothing was recorded (the reference kept its original size).
    Values are rescaled per axis by ``(N - 1) / (n - 1)`` (:func:`monai_unireg.spatial.resize_ddf`,
    ``align_corners=True``). The restored field is a ``MetaTensor`` carrying the metadata of
    ``data[ref_key]`` with the original affine (``ref_key + "_original_affine"``) when the reference is a
    ``MetaTensor``; otherwise a plain tensor.

    A voxel field maps the fixed grid into the moving grid, so it can only be restored by one factor per
    axis when the moving image had the fixed image's original shape: if both were recorded and differ,
    ``ValueError`` (resample the moving image onto the fixed grid first, e.g. with ``ResampleToMatchd``).

    Args:
        keys: field keys, ``[3, n, n, n]`` each.
        ref_key: fixed image key (its original grid is the target).
        moving_key: moving image key whose recorded original shape must equal the fixed one, or ``None``.
        allow_missing_keys: skip absent field keys instead of raising ``KeyError``.
    """

    def __init__(
        self,
        keys: KeysCollection = DDF,
        ref_key: str = FIXED_IMAGE,
        moving_key: str | None = MOVING_IMAGE,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.moving_key = moving_key

    def _target(self, d: Mapping[Hashable, Any]) -> tuple[tuple[int, ...], torch.Tensor | None]:
        """Original fixed spatial shape and affine (``None`` when unknown) read from ``d``."""
        shape_key, affine_key = self.ref_key + ORIGINAL_SHAPE_SUFFIX, self.ref_key + ORIGINAL_AFFINE_SUFFIX
        if shape_key in d:
            shape = tuple(int(s) for s in ensure_tuple(d[shape_key]))
        elif self.ref_key in d:
            shape = tuple(_as_tensor(d[self.ref_key], self.ref_key).shape[1:])
        else:
            raise ValueError(f"RestoreDDFd needs data[{shape_key!r}] (from ResizePaird) or data[{self.ref_key!r}].")
        if self.moving_key is not None and self.moving_key + ORIGINAL_SHAPE_SUFFIX in d:
            moving_shape = tuple(int(s) for s in ensure_tuple(d[self.moving_key + ORIGINAL_SHAPE_SUFFIX]))
            _check_same_shape(
                {shape_key: shape, self.moving_key + ORIGINAL_SHAPE_SUFFIX: moving_shape},
                "a voxel field can be restored only when the moving image had the fixed image's grid",
            )
        if affine_key in d:
            return shape, torch.as_tensor(d[affine_key])
        reference = d.get(self.ref_key)
        return shape, reference.affine if isinstance(reference, MetaTensor) else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Restore every field under ``keys`` to the original fixed grid."""
        d = dict(data)
        for key in self.key_iterator(d):
            shape, affine = self._target(d)
            ddf = _check_ddf(d[key], key)
            out = resize_ddf(plain_tensor(ddf)[None], shape, align_corners=True)[0]
            d[key] = _with_meta(out, d.get(self.ref_key), affine)
        return d


class DDFToGridd(MapTransform):
    """Bring fields predicted on a resampled grid back to the original fixed grid, through physical space.

    After spatial transforms that change the grid in physical space (MONAI ``Orientationd``, ``Spacingd``,
    ``ResizeWithPadOrCropd``: UniReg's paper geometry), a field on the network's grid (``data[grid_key].affine``)
    becomes the same mapping in voxels of ``data[ref_key]``'s grid (its affine and spatial shape), with
    :func:`monai_unireg.spatial.ddf_to_grid`; voxels outside the network's grid do not move. The result carries
    ``data[ref_key]``'s metadata.

    Args:
        keys: field keys, ``[3, *S]`` each (e.g. an evaluator's ``pred``).
        grid_key: key of an image on the field's grid (a ``MetaTensor``: its affine).
        ref_key: key of an image on the target grid (a ``MetaTensor``: its affine and shape).
        allow_missing_keys: skip absent field keys instead of raising ``KeyError``.
    """

    def __init__(
        self,
        keys: KeysCollection = DDF,
        grid_key: str = FIXED_IMAGE,
        ref_key: str = "fixed_original",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.grid_key, self.ref_key = grid_key, ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        grid, reference = d.get(self.grid_key), d.get(self.ref_key)
        for key, value in ((self.grid_key, grid), (self.ref_key, reference)):
            if not isinstance(value, MetaTensor):
                raise ValueError(
                    f"DDFToGridd needs data[{key!r}] as a MetaTensor (its affine), got {type(value).__name__}."
                )
        for key in self.key_iterator(d):
            ddf = _check_ddf(d[key], key)
            out = ddf_to_grid(
                plain_tensor(ddf)[None], torch.as_tensor(grid.affine), torch.as_tensor(reference.affine),
                reference.shape[1:],
            )[0]  # fmt: skip
            d[key] = _with_meta(out, reference, torch.as_tensor(reference.affine))
        return d


class _Warpd(MapTransform):
    """Warp the volumes under ``keys`` with ``data[ddf_key]`` into ``output_keys`` (shared by image/label)."""

    def __init__(
        self,
        keys: KeysCollection,
        ddf_key: str,
        output_keys: KeysCollection,
        ref_key: str | None,
        allow_missing_keys: bool,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ddf_key = ddf_key
        self.output_keys = ensure_tuple(output_keys)
        self.ref_key = ref_key
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys must be parallel to keys ({len(self.keys)} keys), got {self.output_keys}.")

    @abstractmethod
    def _check_input(self, value: Any, key: Hashable) -> torch.Tensor:
        """Validate the volume to warp, ``[C, D, H, W]``."""

    @abstractmethod
    def _warp(self, x: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Warp a batched volume ``[1, C, D, H, W]`` with a batched field ``[1, 3, D, H, W]``."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Warp every present key; the result lies on the fixed grid and carries ``data[ref_key]``'s metadata."""
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            ddf = _check_ddf(d[self.ddf_key], self.ddf_key)
            x = self._check_input(d[key], key)
            _check_same_shape({key: x.shape[1:], self.ddf_key: ddf.shape[1:]}, "the field is defined on this grid")
            reference = d.get(self.ref_key) if self.ref_key is not None else None
            if isinstance(reference, MetaTensor):
                _check_same_shape(
                    {self.ref_key: reference.shape[1:], self.ddf_key: ddf.shape[1:]},
                    "the warped volume lies on the reference (fixed) grid",
                )
            d[output_key] = _with_meta(self._warp(plain_tensor(x)[None], plain_tensor(ddf)[None])[0], reference)
        return d


class WarpImaged(_Warpd):
    """Warp moving images with a predicted field: ``warped(x) = moving(x + ddf(x))`` (:func:`spatial.warp`).

    The moving image ``[C, D, H, W]`` and the field ``[3, D, H, W]`` must share the spatial shape (ValueError
    naming both keys otherwise). The result is floating point (``float32`` for integer inputs) and, when
    ``data[ref_key]`` is a ``MetaTensor``, carries its metadata: the warped image lies on the fixed grid.

    Args:
        keys: moving image keys.
        ddf_key: key of the field, in voxels of the fixed grid.
        output_keys: where to store the results, parallel to ``keys``.
        ref_key: fixed image key whose metadata the result takes (``None``: plain tensor).
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` or ``"reflection"``.
        allow_missing_keys: skip absent moving image keys instead of raising ``KeyError``.
    """

    def __init__(
        self,
        keys: KeysCollection = MOVING_IMAGE,
        ddf_key: str = DDF,
        output_keys: KeysCollection = WARPED_IMAGE,
        ref_key: str | None = FIXED_IMAGE,
        mode: str = "bilinear",
        padding_mode: str = "border",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, ddf_key, output_keys, ref_key, allow_missing_keys)
        self.mode = check_option(mode, "mode", INTERPOLATION_MODES)
        self.padding_mode = check_option(padding_mode, "padding_mode", PADDING_MODES)

    def _check_input(self, value: Any, key: Hashable) -> torch.Tensor:
        return _check_volume(value, key)

    def _warp(self, x: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        x = x if x.is_floating_point() else x.to(torch.float32)
        return warp(x, ddf, mode=self.mode, padding_mode=self.padding_mode)


class WarpLabeld(_Warpd):
    """Warp moving label maps with a predicted field, without interpolation artefacts (:func:`spatial.warp_labels`).

    ``method="onehot"`` interpolates each label's indicator linearly and keeps the most likely label
    (smooth boundaries), ``"nearest"`` takes the nearest voxel's label; either way the output holds only
    label values of the input, in the input's dtype. Label ``[1, D, H, W]`` and field ``[3, D, H, W]`` must
    share the spatial shape.

    Args:
        keys: moving label keys.
        ddf_key: key of the field, in voxels of the fixed grid.
        output_keys: where to store the results, parallel to ``keys``.
        ref_key: fixed image key whose metadata the result takes (``None``: plain tensor).
        method: ``"onehot"`` or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` (outside is label 0) or ``"reflection"``.
        allow_missing_keys: skip absent moving label keys instead of raising ``KeyError``.
    """

    def __init__(
        self,
        keys: KeysCollection = MOVING_LABEL,
        ddf_key: str = DDF,
        output_keys: KeysCollection = WARPED_LABEL,
        ref_key: str | None = FIXED_IMAGE,
        method: str = "onehot",
        padding_mode: str = "border",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, ddf_key, output_keys, ref_key, allow_missing_keys)
        self.method = check_option(method, "method", ("onehot", "nearest"))
        self.padding_mode = check_option(padding_mode, "padding_mode", PADDING_MODES)

    def _check_input(self, value: Any, key: Hashable) -> torch.Tensor:
        return _check_label(value, key)

    def _warp(self, x: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        return warp_labels(x, ddf, method=self.method, padding_mode=self.padding_mode)
