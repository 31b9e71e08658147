"""The uniGradICON bundle beyond the conformance test, each config run as a user would, with
``python -m monai.bundle run`` (and ``torchrun`` for multi_gpu_train.yaml), on BrainSynth with a small network:
stage 1 with validation and resumption, stage 2 from stage 1, inference with the trained weights and instance
optimisation followed by evaluate.yaml's table, two-process training, and stage 2 without stage-1 weights."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import BundleRunner, read_checkpoint

from monai_unireg.data import load_learn2reg, pair_name

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "unigradicon"
_RUNNER = BundleRunner(BUNDLE)
bundle_command = _RUNNER.command
run_bundle = _RUNNER.run
TRAIN = ["configs/train.yaml"]
MULTI_GPU_TRAIN = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
#: A network small enough for a CPU test: 32^3 working size, three UNet levels of 4, 8, 8 channels.
SMALL_NETWORK = {"input_size": 32, "down_channels": "[4, 8, 8]", "up_channels": "[4, 8, 8]"}


@pytest.fixture(scope="module")
def brainsynth(shared_data) -> Path:
    return shared_data / "BrainSynth" / "BrainSynth_dataset.json"


def train_overrides(brainsynth: Path, output_dir: Path, **overrides: object) -> dict:
    """Small, quick training on BrainSynth (2 random pairs per epoch, one iteration per pair, batch 1)."""
    return {
        "datasets": f"['{brainsynth}']",
        "output_dir": output_dir,
        "pairs_per_dataset": 2,
        "batch_size": 1,
        "max_iterations_per_epoch": 2,
        **SMALL_NETWORK,
        **overrides,
    }


@pytest.fixture(scope="module")
def stage_one(brainsynth, tmp_path_factory) -> tuple[Path, str]:
    """Stage 1 for 2 epochs, validated on the first registration_val pair; returns its folder and its log."""
    output_dir = tmp_path_factory.mktemp("stage1")
    overrides = train_overrides(brainsynth, output_dir, epochs=2, validation_json=brainsynth, max_validation_pairs=1)
    return output_dir, run_bundle(TRAIN, **overrides)


@pytest.fixture(scope="module")
def stage_two(brainsynth, stage_one, tmp_path_factory) -> tuple[Path, str]:
    """Stage 2 for 1 epoch of 1 iteration from the stage-1 model.pt; returns its folder and its log."""
    output_dir = tmp_path_factory.mktemp("stage2")
    overrides = train_overrides(
        brainsynth, output_dir, stage=2, stage1_weights=stage_one[0] / "model.pt", epochs=1, max_iterations_per_epoch=1
    )
    return output_dir, run_bundle(TRAIN, **overrides)


def test_stage_one_trains_validates_and_resumes(brainsynth, stage_one, tmp_path):
    output_dir, log = stage_one
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint.pt").is_file()
    state = read_checkpoint(output_dir)
    assert state["config"]["include_step2"] is False and state["config"]["input_size"] == [32, 32, 32]
    assert [record["epoch"] for record in state["history"]] == [1, 2]
    assert all(0 < record["validation_dice"] <= 1 for record in state["history"])
    assert "uniGradICON stage 1: 3 UNets at 32x32x32" in log
    resumed = tmp_path / "stage1"
    shutil.copytree(output_dir, resumed)
    log = run_bundle(TRAIN, **train_overrides(brainsynth, resumed, epochs=3))
    assert f"resumed from {resumed / 'checkpoint.pt'} at epoch 2" in log
    assert "epoch 3/3 iteration 2/2" in log and "epoch 1/3" not in log and "epoch 2/3" not in log
    history = read_checkpoint(resumed)["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3] and history[:2] == state["history"]


def test_stage_two_starts_from_stage_one(stage_one, stage_two):
    output_dir, log = stage_two
    state = read_checkpoint(output_dir)
    assert state["config"]["include_step2"] is True and [record["epoch"] for record in state["history"]] == [1]
    assert {key.split(".")[1] for key in state["model"]} == {"0", "1", "2", "3"}
    stage_one_state = torch.load(stage_one[0] / "model.pt", weights_only=True)["model"]
    assert set(stage_one_state) < set(state["model"])
    assert "uniGradICON stage 2: 4 UNets at 32x32x32" in log


def test_inference_with_weights_and_instance_optimisation_then_evaluation(brainsynth, stage_two, tmp_path):
    output_dir = tmp_path / "evaluation"
    log = run_bundle(
        EVALUATE,
        dataset_json=brainsynth,
        **{"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:2]"},
        output_dir=output_dir,
        weights=stage_two[0] / "model.pt",
        io_iterations=1,
        **SMALL_NETWORK,
    )
    assert "Restored all variables from" in log and "instance optimisation 1/1" in log and "untrained" not in log
    pairs = load_learn2reg(brainsynth, "registration_val")[:2]
    for pair in pairs:
        field, fixed = nib.load(str(output_dir / pair_name(pair) / "ddf.nii.gz")), nib.load(pair["fixed_image"])
        assert field.shape == (*fixed.shape, 1, 3) and np.isfinite(field.get_fdata()).all()
        np.testing.assert_allclose(field.affine, fixed.affine, atol=1e-4)
        assert np.abs(field.get_fdata()).max() > 0  # trained and instance-optimised: not the identity
    with open(output_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["pair"] for row in rows] == [pair_name(pair) for pair in pairs]
    assert all(0 < float(row["dice_mean"]) <= 1 for row in rows)
    assert (output_dir / "summary.json").is_file()


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)
def test_multi_gpu_train_on_two_cpu_processes(brainsynth, tmp_path):
    output_dir = tmp_path / "distributed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    overrides = train_overrides(brainsynth, output_dir, epochs=1, max_iterations_per_epoch=1)
    log = run_bundle(MULTI_GPU_TRAIN, launcher=torchrun, **overrides)
    assert "process 0 of 2 (gloo) on cpu" in log and "process 1 of 2 (gloo) on cpu" in log
    assert log.count("epoch 1/1 done") == 1  # rank 0 alone logs and writes the checkpoint
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint.pt", "model.pt"]
    assert [record["epoch"] for record in read_checkpoint(output_dir)["history"]] == [1]


def test_stage_two_without_stage_one_weights_is_refused(brainsynth, tmp_path):
    output_dir = tmp_path / "not_written"
    log = run_bundle(TRAIN, succeed=False, **train_overrides(brainsynth, output_dir, stage=2, epochs=1))
    assert "stage 2 needs stage1_weights" in log and not output_dir.exists()
