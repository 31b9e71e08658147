"""The command's results are bit-identical run to run on the CPU: two runs in one process, and a run in another
process with another thread count, give the same field, warped image, warped labels and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_unireg.cli import main

SHAPE = (40, 36, 32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A smooth blob pair with a rotated, shifted moving grid (so the moving image and labels are resampled)."""
    folder = tmp_path_factory.mktemp("pair")
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    rng = np.random.default_rng(3)
    fixed = np.exp(-((grid[0] - 0.1) ** 2 + grid[1] ** 2 + (grid[2] + 0.1) ** 2) * 4) + 0.05 * rng.random(SHAPE)
    moving = np.exp(-((grid[0] + 0.05) ** 2 + (grid[1] - 0.1) ** 2 + grid[2] ** 2) * 5) + 0.05 * rng.random(SHAPE)
    labels = [(image > 0.5).astype(np.int16) + (image > 0.8) for image in (fixed, moving)]
    angle = np.deg2rad(4.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    moving_affine = rotation @ np.diag([2.0, 2.0, 2.0, 1.0])
    moving_affine[:3, 3] = [1.5, -1.0, 0.5]
    paths = {}
    for name, data, affine in (
        ("fixed", fixed.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
        ("moving", moving.astype(np.float32), moving_affine),
        ("fixed_label", labels[0], np.diag([2.0, 2.0, 2.0, 1.0])),
        ("moving_label", labels[1], moving_affine),
    ):
        paths[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), paths[name])
    return paths


def _arguments(pair: dict[str, Path], out: Path) -> list[str]:
    options = ("fixed", "moving", "fixed_label", "moving_label")
    return ["register", *[a for o in options for a in (f"--{o.replace('_', '-')}", str(pair[o]))], "--out", str(out)]


def _results(out: Path) -> dict[str, object]:
    arrays = {name: np.asanyarray(nib.load(out / name).dataobj) for name in ("ddf.nii.gz", "warped.nii.gz")}
    arrays["warped_label.nii.gz"] = np.asanyarray(nib.load(out / "warped_label.nii.gz").dataobj)
    metrics = json.loads((out / "metrics.json").read_text())
    return {**arrays, "metrics": {k: v for k, v in metrics.items() if "time" not in k and not k.endswith("_s")}}


def _assert_identical(a: dict[str, object], b: dict[str, object]) -> None:
    for name in ("ddf.nii.gz", "warped.nii.gz", "warped_label.nii.gz"):
        assert a[name].tobytes() == b[name].tobytes(), name
    assert a["metrics"] == b["metrics"]


def test_two_runs_in_one_process_and_one_in_another_are_bit_identical(pair, tmp_path, capsys):
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([*_arguments(pair, first), "--device", "cpu", "--no-overview"]) == 0
    assert main([*_arguments(pair, second), "--device", "cpu", "--no-overview"]) == 0
    capsys.readouterr()
    results = _results(first)
    assert float(np.abs(results["ddf.nii.gz"]).max()) > 0.1  # it did register something
    _assert_identical(results, _results(second))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "monai_unireg", *_arguments(pair, third), "--device", "cpu", "--no-overview"]
    subprocess.run(command, check=True, env=environment, capture_output=True, timeout=600)
    _assert_identical(results, _results(third))
