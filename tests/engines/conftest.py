"""Fixtures of the engine tests: tiny Learn2Reg datasets written on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_unireg import io
from monai_unireg.data.synthetic import make_synthetic_pair

CASE_SHAPE = (12, 14, 16)


def _write_dataset(folder: Path, name: str, cases: int, labels: bool) -> Path:
    """A Learn2Reg dataset of ``cases`` synthetic phantoms (``CASE_SHAPE``), with or without label maps."""
    training = []
    for case in range(1, cases + 1):
        pair = make_synthetic_pair(CASE_SHAPE, max_displacement=2.0, seed=case)
        image = f"./imagesTr/{name}_{case:04d}_0000.nii.gz"
        io.save_nifti(pair.moving[0, 0], pair.affine, folder / image)
        entry = {"image": image}
        if labels:
            entry["label"] = image.replace("imagesTr", "labelsTr")
            io.save_nifti(pair.moving_label[0, 0], pair.affine, folder / entry["label"])
        training.append(entry)
    description = {
        "name": name,
        "pairings": "unpaired",
        "modality": {"0": "MR"},
        "training": training,
        "numTraining": cases,
        "registration_val": [{"fixed": training[0]["image"], "moving": training[1]["image"]}],
    }
    json_path = folder / f"{name}_dataset.json"
    json_path.write_text(json.dumps(description))
    return json_path


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"labelled": json, "unlabelled": json}``: 4 labelled and 3 unlabelled synthetic cases."""
    root = tmp_path_factory.mktemp("tiny_learn2reg")
    return {
        "labelled": _write_dataset(root / "Tiny", "Tiny", 4, labels=True),
        "unlabelled": _write_dataset(root / "TinyNoLabels", "TinyNoLabels", 3, labels=False),
    }
