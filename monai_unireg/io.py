"""Reading and writing images and displacement fields, atomically and with their physical geometry.

Displacement fields on disk follow the ITK / ANTs convention for NIfTI displacement fields, so that
``antsApplyTransforms -t ddf.nii.gz`` or ``sitk.DisplacementFieldTransform`` apply them directly:

- a 5-D array ``[X, Y, Z, 1, 3]`` with NIfTI intent ``vector`` on the fixed image's grid and affine;
- each vector is the physical displacement in **mm in LPS world coordinates** (ITK's frame; NIfTI
  affines are RAS, so the first two components are negated);
- the vector at fixed point ``p`` maps it to the moving point ``p + d(p)``, the same pull-back direction
  as our voxel fields (``warped(x) = moving(x + ddf(x))``).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn

from monai_unireg.spatial import ddf_mm_to_voxel, ddf_voxel_to_mm
from monai_unireg.validation import check_affine, check_ddf

__all__ = [
    "TEMPORARY_INFIX",
    "atomic_path",
    "remove_stale_temporaries",
    "IMAGE_SUFFIXES",
    "check_image_file",
    "load_nifti",
    "save_nifti",
    "save_ddf",
    "load_ddf",
    "load_weights",
    "load_network",
    "check_checkpoint_method",
]

RAS_TO_LPS = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
NIFTI_INTENT_VECTOR = "vector"
#: gzip level of ``ddf.nii.gz``: 0, stored without compression (still a gzip file, read as any ``.nii.gz``). A float
#: field barely compresses (nibabel's level 1: 9.6 of 10.3 MB on a 2 mm brain field) and compressing it took 0.6 s,
#: most of the command's writing (``benchmarks/register_stages.py``).
DDF_GZIP_LEVEL = 0


#: Infix of every temporary file this package writes beside a target (``.<name>.<random>.partial<suffixes>``), so
#: that one left by a killed process is recognised and removed by :func:`remove_stale_temporaries`.
TEMPORARY_INFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give ``path`` the mode a plainly created file gets (``0o666`` less the umask); ``mkstemp`` makes it 0600."""
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves no partial output behind. The finished file is
    readable as the umask says (as if created directly). The temporary name keeps the target's suffixes
    (``.nii.gz``) so format detection still works, and carries :data:`TEMPORARY_INFIX`, so a temporary left by a
    killed process is recognisable (:func:`remove_stale_temporaries`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f"{TEMPORARY_INFIX}{suffix}", dir=target.parent
    )
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        _apply_umask(temporary_path)
        os.replace(temporary_path, target)
    finally:
        temporary_path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries (:func:`atomic_path`'s files, ``.partial-*`` staging folders) that a killed run left
    in ``folder``; returns what was removed. Finished files are never touched."""
    removed = []
    directory = Path(folder)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        name = entry.name
        if not name.startswith(".") or TEMPORARY_INFIX not in name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    with atomic_path(path) as temporary:
        write(temporary)
    return Path(path)


#: File endings of the image formats MONAI's ``LoadImage`` reads here (NIfTI and MGH through nibabel, the rest
#: through ITK when it is installed).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".mha", ".mhd", ".nrrd", ".nhdr")
_NIBABEL_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")


def check_image_file(path: str | os.PathLike, name: str) -> Path:
    """Check that ``path`` is an existing image file in a format of :data:`IMAGE_SUFFIXES` with a readable header.

    Only the header is read (NIfTI/MGH through nibabel), so this is cheap enough for every entry of a dataset list
    and turns "a text file in the image list" into one line naming ``name`` instead of a reader's traceback later.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: another file type, or a NIfTI/MGH file whose header cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} names {str(path)!r}, which does not exist or is not a file.")
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise ValueError(
            f"{name} names {str(path)!r}, which is not an image file (expected {', '.join(IMAGE_SUFFIXES)})."
        )
    if suffix in _NIBABEL_SUFFIXES:
        try:
            header = nib.load(str(path)).header
            header.get_data_shape()
        except Exception as error:
            raise ValueError(
                f"{name} names {str(path)!r}, which is not a readable {suffix} image: {_first_line(error)}"
            ) from None
    return path


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file; return ``(array, affine)`` with the voxel-to-RAS-mm ``affine`` ``[4, 4]``.

    Raises ``ValueError`` naming the path when it is missing or not a readable NIfTI file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist or is not a file.")
    try:
        image = nib.load(str(path))
        return np.asanyarray(image.dataobj), image.affine
    except Exception as error:
        raise ValueError(f"path {str(path)!r} is not a readable NIfTI file: {error}") from error


def save_nifti(array: np.ndarray | torch.Tensor, affine: np.ndarray | torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``array`` (spatial axes first) with ``affine`` to ``path`` atomically."""
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    affine_array = check_affine(affine).numpy()
    image = nib.Nifti1Image(data, affine_array)
    image.set_qform(affine_array, code=1)
    image.set_sform(affine_array, code=1)
    return _write(path, lambda temporary: nib.save(image, str(temporary)))


def save_ddf(ddf: torch.Tensor, affine: np.ndarray | torch.Tensor, path: str | os.PathLike) -> Path:
    """Save a voxel displacement field as an ITK/ANTs-readable NIfTI displacement field (see module docstring).

    Args:
        ddf: ``[3, X, Y, Z]`` or ``[1, 3, X, Y, Z]`` displacement in voxels of the fixed grid.
        affine: ``[4, 4]`` voxel-to-RAS-mm affine of the fixed image.
        path: output file (``.nii.gz``), written atomically.
    """
    field = ddf.unsqueeze(0) if ddf.ndim == 4 else ddf
    check_ddf(field, "ddf")
    if field.shape[0] != 1:
        raise ValueError(f"ddf must hold a single field [3, X, Y, Z] or [1, 3, X, Y, Z], got {tuple(ddf.shape)}.")
    affine = check_affine(affine)
    lps_mm = ddf_voxel_to_mm(field.to(torch.float64), affine) * RAS_TO_LPS
    vectors = lps_mm[0].permute(1, 2, 3, 0).unsqueeze(3).to(torch.float32).cpu().numpy()
    image = nib.Nifti1Image(vectors, affine.numpy())
    image.set_qform(affine.numpy(), code=1)
    image.set_sform(affine.numpy(), code=1)
    image.header.set_intent(NIFTI_INTENT_VECTOR)
    if "".join(Path(path).suffixes[-2:]) != ".nii.gz":
        return _write(path, lambda temporary: nib.save(image, str(temporary)))
    return _write(path, lambda temporary: _save_gzip(image, temporary, DDF_GZIP_LEVEL))


def _save_gzip(image: nib.Nifti1Image, path: Path, level: int) -> None:
    """``image`` as a gzip-compressed NIfTI file at ``level`` (no timestamp in the gzip header, as nibabel)."""
    with gzip.GzipFile(path, "wb", compresslevel=level, mtime=0) as stream:
        stream.write(image.to_bytes())


def load_ddf(path: str | os.PathLike) -> tuple[torch.Tensor, np.ndarray]:
    """Read a field written by :func:`save_ddf` (or by ITK/ANTs); return ``(ddf [1, 3, X, Y, Z] voxels, affine)``."""
    vectors, affine = load_nifti(path)
    if vectors.ndim != 5 or vectors.shape[3] != 1 or vectors.shape[4] != 3:
        raise ValueError(
            f"path {str(path)!r} must hold a displacement field of shape [X, Y, Z, 1, 3], got {vectors.shape}."
        )
    lps_mm = torch.from_numpy(np.asarray(vectors[:, :, :, 0, :], dtype=np.float64)).permute(3, 0, 1, 2).unsqueeze(0)
    ddf = ddf_mm_to_voxel(lps_mm * RAS_TO_LPS, torch.from_numpy(affine))
    return ddf.to(torch.float32), affine


def load_weights(path: str | os.PathLike, name: str = "weights file") -> Any:
    """Read a user's weights file with ``torch.load(map_location="cpu", weights_only=True)`` (no code in it runs).

    Raises a ``ValueError`` of one line naming ``name`` and the path when the file is missing, empty, truncated or
    corrupt, not a PyTorch file, or holds Python objects that weights-only loading refuses (such a file is never
    unpickled: it may run code). What it holds (state dict, checkpoint dictionary) is for the caller to check.
    """
    path_str = os.fspath(path)
    if not os.path.isfile(path_str):
        raise ValueError(f"{name} {path_str!r} does not exist or is not a file.")
    try:
        return torch.load(path_str, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # garbage rather than a pickled object
            raise ValueError(f"{name} {path_str!r} {_unreadable_reason(path_str)}.") from None
        raise ValueError(
            f"{name} {path_str!r} holds Python objects besides tensors and plain containers; it was refused without "
            f"being run (weights-only loading). Give a plain state dict or a checkpoint written by monai_unireg "
            f"({_first_line(error)})."
        ) from None
    except Exception:  # torch raises several types for unreadable files
        raise ValueError(f"{name} {path_str!r} {_unreadable_reason(path_str)}.") from None


def _first_line(error: BaseException) -> str:
    """What torch's weights-only refusal refused (e.g. ``Unsupported global: GLOBAL module.Class``), without its
    advice to allowlist the object or to disable the check (wrong advice for a file of unknown origin)."""
    match = re.search(r"Unsupported global: [^ ]+(?: [^ ]+)?", str(error))
    return match.group(0).rstrip(".") if match else "unsupported content"


def _unreadable_reason(path: str) -> str:
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"is truncated or corrupt ({size} bytes; not a complete PyTorch zip archive): write or copy it again"
    if magic == b"PK\x03\x04":
        return "is a zip archive but not a readable PyTorch file (corrupt or of another program)"
    return "is not a PyTorch weights file (torch.save format)"


def check_checkpoint_method(state: dict[str, Any], expected: str, path: str | os.PathLike) -> None:
    """Refuse a checkpoint written for another network: ``state["method"]`` (the network class name that
    monai_unireg's trainers store) must be ``expected`` when present.

    Raises:
        ValueError: naming the file, the network it holds and the one asked for.
    """
    method = state.get("method")
    if method is not None and method != expected:
        raise ValueError(
            f"weights file {os.fspath(path)!r} holds a {method} checkpoint, not {expected}: give a {expected} weights "
            f"file or choose the method that wrote it."
        )


def load_network(path: str | os.PathLike, build: Callable[[dict[str, Any] | None], nn.Module], name: str) -> nn.Module:
    """A network built from a training checkpoint's ``"config"`` and filled with its ``"model"`` weights.

    Reads ``{"method", "config", "model"}`` files (``model.pt`` / ``checkpoint_epoch=N.pt`` of the bundles'
    train.yaml) or a bare state dict (``build`` then gets ``None``). Every tensor must fit (strict loading); a
    checkpoint of another network (by its ``"method"`` or by a ``config`` the network does not take) or anything
    else raises a ``ValueError`` naming the file and ``name``.

    Args:
        path: the weights file.
        build: ``build(config)`` -> the network to fill (``config`` is ``None`` for a bare state dict).
        name: the network's class name (what the trainers store as ``"method"``).
    """
    path_str = os.fspath(path)
    state = load_weights(path_str)
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path_str!r} does not hold a state dict.")
    check_checkpoint_method(state, name, path_str)
    config = state.get("config")
    try:
        network = build(config if isinstance(config, dict) else None)
    except TypeError as error:  # a config of another network: unexpected or missing constructor arguments
        raise ValueError(
            f"weights file {path_str!r} was not written for {name}: its network config does not fit ({error})."
        ) from None
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"weights file {path_str!r} does not hold a state dict of tensors.")
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights file {path_str!r} does not fit {name}: {_key_summary(error)}") from None
    return network


def _key_summary(error: RuntimeError) -> str:
    """torch's strict-loading error on one line: the first missing / unexpected keys and size mismatches."""
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:400] + " ..."
