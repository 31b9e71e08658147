"""The VoxelOpt bundle beyond the conformance test: evaluate.yaml's table, the folder-of-pairs input and the
optional feature checkpoint, each run as a user would, with ``python -m monai.bundle run``."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import TORCHRUN, BundleRunner, assert_merged_evaluation

from monai_unireg import io
from monai_unireg.data import load_learn2reg, pair_name
from monai_unireg.data.synthetic import make_synthetic_pair
from monai_unireg.networks.nets import UniversalModelFeatures

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "voxelopt"
_RUNNER = BundleRunner(BUNDLE)
run_bundle = _RUNNER.run
INFERENCE = ["configs/inference.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
TABLE_COLUMNS = ["pair", "dice_mean", "hd95_mm_mean", "sdlogj", "folding_percent", "runtime_s"]


def _conformance_module():
    """``tests/test_bundles.py`` loaded by path (tests are not a package under ``--import-mode=importlib``)."""
    spec = importlib.util.spec_from_file_location("_bundle_conformance", PROJECT_ROOT / "tests" / "test_bundles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """The conformance test's dataset: 3 cases of 24x28x32 voxels, labels 1 and 2, two registration_val pairs."""
    return _conformance_module().write_tiny_dataset(tmp_path_factory.mktemp("tiny_learn2reg"))


def read_table(output_dir: Path) -> tuple[list[dict], dict]:
    with open(output_dir / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == TABLE_COLUMNS
        rows = list(reader)
    return rows, json.loads((output_dir / "summary.json").read_text())


def write_pair_folder(folder: Path) -> None:
    """Two generated 32^3 pairs in the folder convention: ``a`` with label maps, ``b`` without."""
    for name, seed, with_labels in (("a", 0, True), ("b", 1, False)):
        pair = make_synthetic_pair(shape=(32, 32, 32), seed=seed)
        sides = ["fixed", "moving"] + (["fixed_label", "moving_label"] if with_labels else [])
        for side in sides:
            io.save_nifti(getattr(pair, side)[0, 0], pair.affine, folder / f"{name}_{side}.nii.gz")


def mean_dice(first: np.ndarray, second: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of either map."""
    values = [v for v in np.union1d(np.unique(first), np.unique(second)) if v != 0]
    overlaps = [2 * ((first == v) & (second == v)).sum() / ((first == v).sum() + (second == v).sum()) for v in values]
    return float(np.mean(overlaps))


def test_evaluate_writes_one_row_per_pair_and_a_summary(tiny_dataset, tmp_path):
    output_dir = tmp_path / "evaluation"
    run_bundle(EVALUATE, dataset_json=tiny_dataset, output_dir=output_dir)  # section: registration_val by default
    pairs = load_learn2reg(tiny_dataset, "registration_val")
    rows, summary = read_table(output_dir)
    assert [row["pair"] for row in rows] == [pair_name(pair) for pair in pairs]
    for row in rows:
        values = {column: float(row[column]) for column in TABLE_COLUMNS[1:]}
        assert all(math.isfinite(value) for value in values.values()), row
        assert 0 < values["dice_mean"] <= 1 and values["hd95_mm_mean"] >= 0 and values["runtime_s"] > 0
        assert 0 <= values["folding_percent"] <= 100 and values["sdlogj"] >= 0
        # Dice / HD95 over the dataset's evaluation labels (1 and 2; the tiny json lists all its labels)
        assert set(json.loads((output_dir / row["pair"] / "metrics.json").read_text())["dice"]) == {"1", "2"}
        assert (output_dir / row["pair"] / "ddf.nii.gz").is_file()
    for column in TABLE_COLUMNS[1:]:
        assert summary[column]["n"] == len(pairs)
        assert summary[column]["mean"] == pytest.approx(np.mean([float(row[column]) for row in rows]))


def test_folder_of_pairs_with_and_without_labels(tmp_path):
    folder, output_dir = tmp_path / "pairs", tmp_path / "evaluation"
    write_pair_folder(folder)
    run_bundle(EVALUATE, pairs_dir=folder, output_dir=output_dir)  # no dataset_json: the folder is used
    rows, summary = read_table(output_dir)
    assert [row["pair"] for row in rows] == ["a_fixed__a_moving", "b_fixed__b_moving"]
    labelled, unlabelled = output_dir / "a_fixed__a_moving", output_dir / "b_fixed__b_moving"
    for result in (labelled, unlabelled):
        field = nib.load(str(result / "ddf.nii.gz"))
        assert field.shape == (32, 32, 32, 1, 3) and np.isfinite(field.get_fdata()).all()
        assert (result / "warped.nii.gz").is_file()
    assert not (unlabelled / "warped_label.nii.gz").exists() and rows[1]["dice_mean"] == ""
    fixed_label = np.asarray(nib.load(str(folder / "a_fixed_label.nii.gz")).dataobj)
    moving_label = np.asarray(nib.load(str(folder / "a_moving_label.nii.gz")).dataobj)
    warped_label = np.asarray(nib.load(str(labelled / "warped_label.nii.gz")).dataobj)
    assert float(rows[0]["dice_mean"]) == pytest.approx(mean_dice(warped_label, fixed_label), abs=1e-4)
    assert mean_dice(warped_label, fixed_label) > mean_dice(moving_label, fixed_label) + 0.02
    assert summary["dice_mean"]["n"] == 1 and summary["sdlogj"]["n"] == 2


def test_inference_with_a_universal_model_checkpoint(tmp_path):
    """A checkpoint in the authors' layout (``{'net': ...}`` with DistributedDataParallel ``module.`` keys) is
    used; one lacking a layer stops the run with the loader's message."""
    folder, output_dir = tmp_path / "pairs", tmp_path / "inference"
    pair = make_synthetic_pair(shape=(32, 32, 32), seed=2)
    for side in ("fixed", "moving"):
        io.save_nifti(getattr(pair, side)[0, 0], pair.affine, folder / f"c_{side}.nii.gz")
    torch.manual_seed(0)
    state = {f"module.{key}": value for key, value in UniversalModelFeatures().state_dict().items()}
    checkpoint = tmp_path / "unet.pth"
    torch.save({"net": state}, checkpoint)
    run_bundle(INFERENCE, pairs_dir=folder, output_dir=output_dir, feature_checkpoint=checkpoint)
    field = nib.load(str(output_dir / "c_fixed__c_moving" / "ddf.nii.gz"))
    assert field.shape == (32, 32, 32, 1, 3) and np.isfinite(field.get_fdata()).all()
    incomplete = tmp_path / "incomplete.pth"
    torch.save({key: value for key, value in state.items() if "precls_conv" not in key}, incomplete)
    unused = tmp_path / "not_written"
    log = run_bundle(INFERENCE, succeed=False, pairs_dir=folder, output_dir=unused, feature_checkpoint=incomplete)
    assert "missing keys: precls_conv" in log and not unused.exists()


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)
def test_multi_gpu_evaluate_on_two_cpu_processes(tiny_dataset, tmp_path):
    """The pairs split over 2 processes: each writes its pairs' folders, rank 0 the one merged table, in order."""
    output_dir = tmp_path / "distributed_evaluation"
    configs = [*EVALUATE, "configs/multi_gpu_evaluate.yaml"]
    run_bundle(configs, launcher=TORCHRUN, backend="gloo", dataset_json=tiny_dataset, output_dir=output_dir)
    assert_merged_evaluation(output_dir, [pair_name(pair) for pair in load_learn2reg(tiny_dataset, "registration_val")])
