"""Reader for Learn2Reg ``*_dataset.json`` files: MONAI-ready lists of pair dictionaries.

A Learn2Reg dataset folder holds ``imagesTr/`` (and ``labelsTr/`` with label maps of the same file
names) and a JSON description whose paths are relative to the folder (``"./imagesTr/X.nii.gz"``).
Pair sections (``registration_val``, ``registration_test``, ``training_paired_images``) list
``{"fixed": path, "moving": path}`` entries; ``training`` lists the cases ``{"image": path, "label": path}``.

Every pair dictionary returned here has the keys ``fixed_image``, ``moving_image`` (absolute paths),
``fixed_label`` / ``moving_label`` (only where the label file exists) and ``dataset`` (the dataset name),
ready for ``monai.transforms.LoadImaged(keys=[...], allow_missing_keys=True)``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_unireg.io import check_image_file
from monai_unireg.validation import check_option

__all__ = [
    "PAIR_SECTIONS",
    "PAIR_FOLDER_SUFFIXES",
    "Learn2RegDataset",
    "find_learn2reg_datasets",
    "label_path_for",
    "load_learn2reg",
    "load_pair_folder",
    "make_pair",
    "pair_name",
    "read_learn2reg",
]

#: Sections of the JSON listing explicit pairs, with the key holding their declared count.
_PAIR_SECTION_COUNTS: dict[str, str] = {
    "registration_val": "numRegistration_val",
    "registration_test": "numRegistration_test",
    "training_paired_images": "numPairedTraining",
}
#: Every section accepted by :func:`load_learn2reg`; ``training_unpaired`` = all ordered pairs of training cases.
PAIR_SECTIONS: tuple[str, ...] = (*_PAIR_SECTION_COUNTS, "training_unpaired")


def label_path_for(image_path: str | os.PathLike) -> Path | None:
    """Learn2Reg label path of an image: its ``images*`` folder replaced by ``labels*`` (``imagesTr`` -> ``labelsTr``).

    Returns ``None`` when the image does not lie in an ``images*`` folder. The file may not exist.
    """
    image_path = Path(image_path)
    folder = image_path.parent.name
    if not folder.startswith("images"):
        return None
    return image_path.parent.parent / ("labels" + folder[len("images") :]) / image_path.name


@dataclass(frozen=True, eq=False)
class Learn2RegDataset:
    """Description of one Learn2Reg dataset, read from its ``*_dataset.json`` by :func:`read_learn2reg`.

    Attributes:
        name: dataset name (``"name"`` in the JSON).
        root: absolute dataset folder; JSON paths are relative to it.
        modality: modality per channel/time index, e.g. ``{"0": "US", "1": "MR"}``.
        labels: label value -> name (of label channel ``"0"``).
        evaluation_labels: label values to average metrics over (all non-zero labels when the JSON has none).
        spacing: voxel spacing in mm (``spacing_mm``), or ``None`` when the JSON does not give it.
        paired: whether the JSON declares ``"pairings": "paired"`` (intra-subject pairs given explicitly).
        cases: the ``training`` cases as ``{"image": abs path, "label": abs path (when it exists)}``.
        json_path: absolute path of the JSON file.
        raw: the parsed JSON, for keys this class does not model.
    """

    name: str
    root: Path
    modality: dict[str, str]
    labels: dict[int, str]
    evaluation_labels: tuple[int, ...]
    spacing: tuple[float, ...] | None
    paired: bool
    cases: tuple[dict[str, str], ...]
    json_path: Path
    raw: dict[str, Any] = field(repr=False)

    def pairs(self, section: str = "registration_val") -> list[dict[str, str]]:
        """Pair dictionaries of ``section`` (one of :data:`PAIR_SECTIONS`); see :func:`load_learn2reg`."""
        check_option(section, "section", PAIR_SECTIONS)
        if section == "training_unpaired":
            return self._unpaired_training_pairs()
        entries = _require(self.raw, section, self.json_path)
        _check_count(self.raw, section, _PAIR_SECTION_COUNTS[section], self.json_path)
        return [self._pair_from_entry(entry, f"{section}[{i}]") for i, entry in enumerate(entries)]

    def _pair_from_entry(self, entry: Any, where: str) -> dict[str, str]:
        """One ``{"fixed": ..., "moving": ...}`` entry -> pair dictionary with labels where they exist."""
        if not isinstance(entry, dict):
            raise ValueError(f"{where} of {self.json_path} must be an object with 'fixed' and 'moving', got {entry!r}.")
        fixed, moving = (
            _case(_resolve(self.json_path, _require(entry, side, self.json_path, where), f"{where}.{side}"))
            for side in ("fixed", "moving")
        )
        return make_pair(fixed, moving, self.name)

    def _unpaired_training_pairs(self) -> list[dict[str, str]]:
        """All ordered pairs ``(i, j)``, ``i != j``, of the training cases (inter-subject registration)."""
        if self.paired:
            raise ValueError(
                f"section 'training_unpaired' needs an unpaired dataset, but {self.name} is paired; "
                "use section='training_paired_images'."
            )
        return [make_pair(fixed, moving, self.name) for fixed, moving in itertools.permutations(self.cases, 2)]


def make_pair(fixed_case: dict[str, str], moving_case: dict[str, str], dataset: str) -> dict[str, str]:
    """Pair dictionary from two case dictionaries ``{"image": path, "label": path (optional)}``."""
    pair = {"fixed_image": fixed_case["image"], "moving_image": moving_case["image"]}
    for side, case in (("fixed", fixed_case), ("moving", moving_case)):
        if "label" in case:
            pair[f"{side}_label"] = case["label"]
    pair["dataset"] = dataset
    return pair


def _case(image: str) -> dict[str, str]:
    """Case dictionary of an image path, with its Learn2Reg label path when that file exists."""
    label = label_path_for(image)
    return {"image": image, "label": str(label)} if label is not None and label.is_file() else {"image": image}


def _resolve(json_path: Path, relative: Any, where: str) -> str:
    """Absolute path of a JSON path given relative to the dataset folder; it must be a readable image file."""
    if not isinstance(relative, str):
        raise ValueError(f"{where} of {json_path} must be a path string, got {relative!r}.")
    return str(check_image_file((json_path.parent / relative).resolve(), f"{where} of {json_path}"))


def _require(mapping: dict[str, Any], key: str, json_path: Path, where: str = "the top level") -> Any:
    """``mapping[key]``, or a ``ValueError`` naming the missing key and the file."""
    if key not in mapping:
        raise ValueError(f"{json_path}: key {key!r} is missing at {where}.")
    return mapping[key]


def _check_count(raw: dict[str, Any], section: str, count_key: str, json_path: Path) -> None:
    """Check the declared count (e.g. ``numRegistration_val``) against the list length, when declared."""
    entries = raw[section]
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: {section!r} must be a list, got {type(entries).__name__}.")
    if count_key in raw and raw[count_key] != len(entries):
        raise ValueError(f"{json_path}: {count_key} = {raw[count_key]} but {section!r} has {len(entries)} entries.")


def _read_json(json_path: Path) -> dict[str, Any]:
    """Parse ``json_path``; clear errors for a missing file or invalid JSON."""
    if not json_path.is_file():
        raise FileNotFoundError(f"json_path {json_path} does not exist.")
    try:
        raw = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"json_path {json_path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"json_path {json_path} must hold a JSON object, got {type(raw).__name__}.")
    return raw


def _read_cases(raw: dict[str, Any], json_path: Path) -> tuple[dict[str, str], ...]:
    """The ``training`` cases with absolute paths; a label is kept when declared or found next to the image."""
    entries = _require(raw, "training", json_path)
    _check_count(raw, "training", "numTraining", json_path)
    cases = []
    for i, entry in enumerate(entries):
        where = f"training[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} of {json_path} must be an object with 'image', got {entry!r}.")
        image = _resolve(json_path, _require(entry, "image", json_path, where), f"{where}.image")
        if "label" in entry:
            cases.append({"image": image, "label": _resolve(json_path, entry["label"], f"{where}.label")})
        else:
            cases.append(_case(image))
    return tuple(cases)


def read_learn2reg(json_path: str | os.PathLike) -> Learn2RegDataset:
    """Read a Learn2Reg ``*_dataset.json`` into a :class:`Learn2RegDataset` (checks that all training files exist).

    Raises:
        FileNotFoundError: the JSON or a file it names does not exist.
        ValueError: invalid JSON, a missing key (``name``, ``training``, ...) or a count that does not match its list.
    """
    json_path = Path(json_path).resolve()
    raw = _read_json(json_path)
    name = _require(raw, "name", json_path)
    label_names = raw.get("labels", {}).get("0", {})
    labels = {int(value): str(label) for value, label in label_names.items()}
    evaluation = raw.get("evaluation_labels", [value for value in sorted(labels) if value != 0])
    spacing = raw.get("spacing_mm")
    return Learn2RegDataset(
        name=str(name),
        root=json_path.parent,
        modality={str(k): str(v) for k, v in raw.get("modality", {}).items()},
        labels=labels,
        evaluation_labels=tuple(int(v) for v in evaluation),
        spacing=tuple(float(s) for s in spacing) if spacing is not None else None,
        paired=raw.get("pairings") == "paired",
        cases=_read_cases(raw, json_path),
        json_path=json_path,
        raw=raw,
    )


def load_learn2reg(json_path: str | os.PathLike, section: str = "registration_val") -> list[dict[str, str]]:
    """Pair dictionaries of one section of a Learn2Reg ``*_dataset.json``.

    Args:
        json_path: path of the dataset JSON (paths inside are relative to its folder).
        section: ``"registration_val"``, ``"registration_test"``, ``"training_paired_images"`` (the
            pairs listed in the JSON) or ``"training_unpaired"`` (all ordered pairs ``i != j`` of the
            ``training`` cases; unpaired datasets only).

    Returns:
        ``[{"fixed_image", "moving_image", "fixed_label"?, "moving_label"?, "dataset"}, ...]`` with absolute
        paths; a label key is present only where the label file exists (labels are found by the Learn2Reg
        rule ``imagesTr/X`` -> ``labelsTr/X``).

    Raises:
        ValueError: unknown ``section``, invalid JSON, a missing key or a count (``numRegistration_val``, ...)
            that does not match its list.
        FileNotFoundError: the JSON or an image it names does not exist.
    """
    check_option(section, "section", PAIR_SECTIONS)
    return read_learn2reg(json_path).pairs(section)


def _image_path(value: Any, key: str) -> str:
    """Path of a pair entry: a path itself, or the ``filename_or_obj`` of a loaded ``MetaTensor``."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    filename = getattr(value, "meta", {}).get("filename_or_obj")
    if not isinstance(filename, (str, os.PathLike)):
        raise ValueError(
            f"pair[{key!r}] must be a path or a loaded MetaTensor with 'filename_or_obj', got {type(value).__name__}."
        )
    return os.fspath(filename)


def _stem(path: str) -> str:
    """File name without its image suffixes (``X.nii.gz`` -> ``X``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd", ".npz", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def pair_name(pair: Mapping[str, Any]) -> str:
    """A name for a pair's outputs (e.g. a folder), unique per ordered pair: ``"<fixed stem>__<moving stem>"``.

    ``{"fixed_image": ".../BrainSynth_0001_0000.nii.gz", "moving_image": ".../BrainSynth_0002_0000.nii.gz"}``
    -> ``"BrainSynth_0001_0000__BrainSynth_0002_0000"``. The values may be paths or images loaded by
    ``LoadImaged`` (their ``filename_or_obj`` metadata is used).
    """
    for key in ("fixed_image", "moving_image"):
        if key not in pair:
            raise ValueError(f"pair must have the key {key!r}, got keys {sorted(pair)}.")
    fixed, moving = (_stem(_image_path(pair[key], key)) for key in ("fixed_image", "moving_image"))
    return f"{fixed}__{moving}"


def find_learn2reg_datasets(root: str | os.PathLike) -> list[Path]:
    """Sorted paths of the ``<root>/<name>/<name>_dataset.json`` files below ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root {root} is not a directory.")
    return sorted(root.glob("*/*_dataset.json"))


#: File-name suffixes of a folder of pairs: ``<name>_fixed.nii.gz``, ``<name>_moving.nii.gz`` and optional labels.
PAIR_FOLDER_SUFFIXES = {
    "fixed_image": "_fixed.nii.gz",
    "moving_image": "_moving.nii.gz",
    "fixed_label": "_fixed_label.nii.gz",
    "moving_label": "_moving_label.nii.gz",
}


def load_pair_folder(folder: str | os.PathLike) -> list[dict[str, str]]:
    """Pair dicts from a folder of ``<name>_fixed.nii.gz`` + ``<name>_moving.nii.gz`` files (sorted by name),
    with ``<name>_fixed_label.nii.gz`` / ``<name>_moving_label.nii.gz`` added when present.

    Raises:
        ValueError: when ``folder`` is not a folder, holds no ``*_fixed.nii.gz``, or a fixed image has no moving one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} does not exist or is not a folder.")
    fixed_suffix = PAIR_FOLDER_SUFFIXES["fixed_image"]
    prefixes = sorted(str(path)[: -len(fixed_suffix)] for path in folder.glob(f"*{fixed_suffix}"))
    if not prefixes:
        raise ValueError(f"folder {str(folder)!r} holds no '*{fixed_suffix}' image; expected <name>{fixed_suffix}.")
    pairs = []
    for prefix in prefixes:
        pair = {key: prefix + suffix for key, suffix in PAIR_FOLDER_SUFFIXES.items() if Path(prefix + suffix).is_file()}
        if "moving_image" not in pair:
            raise ValueError(
                f"folder {str(folder)!r}: {prefix}{fixed_suffix} has no {Path(prefix).name}_moving.nii.gz."
            )
        pairs.append(pair)
    return pairs
