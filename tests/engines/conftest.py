"""Fixtures of the training tests: tiny Learn2Reg datasets written on the fly and a tiny stand-in network."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from monai_unireg import io
from monai_unireg.data.synthetic import make_synthetic_pair

CASE_SHAPE = (12, 14, 16)


class TinyRegistrationNet(nn.Module):
    """A stand-in registration network: two convolutions on the concatenated pair give a ``[B, 3, *S]`` field."""

    def __init__(self, input_size: tuple[int, int, int] = (16, 16, 16), channels: int = 4) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.config = {"input_size": list(input_size), "channels": channels}
        self.body = nn.Sequential(
            nn.Conv3d(2, channels, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv3d(channels, 3, 3, padding=1)
        )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([moving, fixed], dim=1))


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


@pytest.fixture
def tiny_network() -> Callable[..., TinyRegistrationNet]:
    """A factory ``tiny_network(seed=0, **config)`` of seeded :class:`TinyRegistrationNet` instances."""

    def make(seed: int = 0, **config) -> TinyRegistrationNet:
        torch.manual_seed(seed)
        return TinyRegistrationNet(**config)

    return make
