"""The SACB-Net bundle beyond the conformance test, each config run as a user would, with
``python -m monai.bundle run`` (and ``torchrun`` for multi_gpu_train.yaml), on BrainSynth with a small network:
training with a task file (validation, TensorBoard, checkpoints), bit-exact resumption after a kill, swapping the
optimiser, a transform and a handler by overrides, inference with the trained weights followed by evaluate.yaml's
table, fine-tuning at another size on a paired dataset, two-process training, the task files' values, and refused
overrides."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import (
    TORCHRUN,
    BundleRunner,
    assert_merged_evaluation,
    assert_same_weights,
    final_weights,
    read_checkpoint,
)

from monai_unireg.data import load_learn2reg, pair_name
from monai_unireg.engines import SACBNET_LAMBDAS
from monai_unireg.networks.nets import SACBNet

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "sacbnet"
_RUNNER = BundleRunner(BUNDLE)
bundle_command = _RUNNER.command
run_bundle = _RUNNER.run
parse = _RUNNER.parse
TRAIN = ["configs/train.yaml"]
TRAIN_LPBA = ["configs/train.yaml", "configs/lpba.yaml"]
MULTI_GPU_TRAIN = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
#: A network small enough for a CPU test: 32^3 working size, encoder channels 4, 8, 8, 8, 8.
SMALL_NETWORK = {"input_size": "[32, 32, 32]", "channels": "[4, 8, 8, 8, 8]"}
#: The paper's tasks (paper Sec. 4): working size and lambda (METHODS.md); each trains on every pair once per epoch.
TASKS = {
    "ixi": ([160, 192, 224], 3.0),
    "lpba": ([160, 192, 160], 1.0),
    "abdomen_ct": ([192, 160, 224], 0.3),
}


@pytest.fixture(scope="module")
def brainsynth(shared_data) -> Path:
    return shared_data / "BrainSynth" / "BrainSynth_dataset.json"


def train_overrides(dataset: Path, output_dir: Path, **overrides: object) -> dict:
    """Small, quick training (2 random pairs per epoch, one iteration per pair, batch 1, the small network)."""
    return {
        "datasets": f"['{dataset}']",
        "output_dir": output_dir,
        "pairs_per_dataset": 2,
        "max_iterations_per_epoch": 2,
        "kmeans_iterations": 5,
        **SMALL_NETWORK,
        **overrides,
    }


@pytest.fixture(scope="module")
def trained(brainsynth, tmp_path_factory) -> tuple[Path, str]:
    """train.yaml + lpba.yaml for 2 epochs, validated on the first registration_val pair; its folder and log."""
    output_dir = tmp_path_factory.mktemp("lpba")
    overrides = train_overrides(brainsynth, output_dir, epochs=2, validation_json=brainsynth, max_validation_pairs=1)
    return output_dir, run_bundle(TRAIN_LPBA, **overrides)


def test_training_with_a_task_file_validates_logs_and_checkpoints(trained):
    output_dir, log = trained
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint_epoch=2.pt").is_file()
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard is on by default
    assert "train_loss: " in log and "val_dice" in log and "Saved checkpoint at epoch: 2" in log
    state = read_checkpoint(output_dir)
    assert state["trainer"]["iteration"] == 4 and state["pairs"]["epoch"] == 1
    assert state["pairs"]["one_pass"] is True  # lpba.yaml: every training pair once per epoch (capped here)
    assert state["lr_scheduler"]["last_epoch"] == 2  # PolynomialLR stepped every epoch, as the reference code
    group = state["optimizer"]["param_groups"][0]  # Adam; decayed from 1e-4 to 0 over the run's epochs
    assert group["initial_lr"] == 1e-4 and group["lr"] == 0.0 and "betas" in group
    assert set(final_weights(output_dir)) == set(SACBNet((32, 32, 32), channels=[4, 8, 8, 8, 8]).state_dict())


def test_resume_after_a_kill_is_bit_exact(brainsynth, trained, tmp_path):
    """Killed right after the first epoch's checkpoint (os._exit, no clean-up), the same command again finishes
    the run: the network equals the uninterrupted run's bit for bit."""
    output_dir = tmp_path / "killed"
    overrides = train_overrides(brainsynth, output_dir, epochs=2, validation_json=brainsynth, max_validation_pairs=1)
    _RUNNER.resume_after_a_kill(TRAIN_LPBA, overrides, output_dir)
    assert_same_weights(final_weights(output_dir), final_weights(trained[0]))


def test_swapping_the_optimiser_a_transform_and_a_handler_by_overrides(brainsynth, tmp_path):
    output_dir = tmp_path / "swapped"
    overrides = train_overrides(brainsynth, output_dir, epochs=1, max_iterations_per_epoch=1)
    overrides["optimizer#_target_"] = "torch.optim.SGD"  # the optimiser
    overrides["train#preprocessing#transforms#2"] = (  # the intensity transform: MONAI's ScaleIntensityd
        "{'_target_': 'ScaleIntensityd', 'keys': ['fixed_image', 'moving_image']}"
    )
    overrides["train#handlers#3#tag_name"] = "objective"  # a handler's setting
    overrides["tensorboard"] = False  # a handler off
    overrides["progress_bar"] = True  # on by default on a terminal only (captured output here is not one)
    log = run_bundle(TRAIN, **overrides)
    assert "objective: " in log and "train_loss" not in log
    assert "[1/1] 100%|" in log  # ignite's ProgressBar
    state = read_checkpoint(output_dir)
    assert "momentum" in state["optimizer"]["param_groups"][0] and "betas" not in state["optimizer"]["param_groups"][0]
    assert not (output_dir / "tensorboard").exists()
    swapped = {"train#preprocessing#transforms#2": {"_target_": "ScaleIntensityd", "keys": ["fixed_image"]}}
    transforms = parse(TRAIN, **swapped).get_parsed_content("train#preprocessing").transforms
    assert type(transforms[2]).__name__ == "ScaleIntensityd"


def test_inference_with_weights_then_evaluation(brainsynth, trained, tmp_path):
    output_dir = tmp_path / "evaluation"
    log = run_bundle(
        EVALUATE,
        **{"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:2]"},
        dataset_json=brainsynth,
        output_dir=output_dir,
        weights=trained[0] / "model.pt",
        **SMALL_NETWORK,
    )
    assert f"Restored all variables from {trained[0] / 'model.pt'}" in log and "untrained" not in log
    pairs = load_learn2reg(brainsynth, "registration_val")[:2]
    for pair in pairs:
        field, fixed = nib.load(str(output_dir / pair_name(pair) / "ddf.nii.gz")), nib.load(pair["fixed_image"])
        assert field.shape == (*fixed.shape, 1, 3) and np.isfinite(field.get_fdata()).all()
        np.testing.assert_allclose(field.affine, fixed.affine, atol=1e-4)
        assert np.abs(field.get_fdata()).max() > 0
        assert (output_dir / pair_name(pair) / "warped.nii.gz").is_file()
    with open(output_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["pair"] for row in rows] == [pair_name(pair) for pair in pairs]
    assert all(0 < float(row["dice_mean"]) <= 1 for row in rows)
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["dice_mean"]["n"] == 2 and summary["sdlogj"]["n"] == 2


def test_fine_tuning_at_another_size_on_a_paired_dataset(shared_data, trained, tmp_path):
    """init_weights (strict: same channels and clusters) trains at the task's size, here the atlas-style ixi.yaml
    (paired dataset: its training_paired_images) on ProstateMRUS, with the optional Dice term on its labels."""
    prostate = shared_data / "ProstateMRUS" / "ProstateMRUS_dataset.json"
    output_dir = tmp_path / "finetuned"
    overrides = train_overrides(
        prostate,
        output_dir,
        epochs=1,
        input_size="[32, 48, 32]",
        init_weights=trained[0] / "model.pt",
        learning_rate=1e-3,
        dice_weight=1.0,
    )
    log = run_bundle(["configs/train.yaml", "configs/ixi.yaml"], **overrides)
    assert f"Restored all variables from {trained[0] / 'model.pt'}" in log
    assert parse(["configs/train.yaml", "configs/ixi.yaml"], **overrides).get_parsed_content("lam") == 3.0
    tuned, start = final_weights(output_dir), final_weights(trained[0])
    assert any(not torch.equal(value, tuned[name]) for name, value in start.items())


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)
def test_multi_gpu_train_on_two_cpu_processes(brainsynth, tmp_path):
    output_dir = tmp_path / "distributed"
    overrides = train_overrides(brainsynth, output_dir, epochs=1, pairs_per_dataset=4, max_iterations_per_epoch=None)
    log = run_bundle(MULTI_GPU_TRAIN, launcher=TORCHRUN, backend="gloo", **overrides)
    # 4 pairs over 2 processes: 2 synchronised steps each; rank 0 alone logs the loss and writes the checkpoint
    assert log.count("Iter: 2/2 -- train_loss") == 1 and log.count("Saved checkpoint at epoch: 1") == 1
    assert sorted(path.name for path in output_dir.glob("*.pt")) == ["checkpoint_epoch=1.pt", "model.pt"]
    assert read_checkpoint(output_dir)["trainer"]["iteration"] == 2


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)
def test_multi_gpu_evaluate_on_two_cpu_processes(brainsynth, trained, tmp_path):
    """3 pairs over 2 processes (2 + 1): each writes its pairs' folders, rank 0 the one merged table."""
    output_dir = tmp_path / "distributed_evaluation"
    configs = [*EVALUATE, "configs/multi_gpu_evaluate.yaml"]
    subset = {"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:3]"}
    overrides = {"dataset_json": brainsynth, "output_dir": output_dir, "weights": trained[0] / "model.pt"}
    run_bundle(configs, launcher=TORCHRUN, backend="gloo", **subset, **overrides, **SMALL_NETWORK)
    assert_merged_evaluation(
        output_dir, [pair_name(pair) for pair in load_learn2reg(brainsynth, "registration_val")[:3]]
    )


def test_paper_defaults_and_task_files():
    train = parse(TRAIN)
    expected = {
        "task": None,
        "epochs": 300,
        "batch_size": 1,
        "learning_rate": 1e-4,
        "power": 0.9,
        "lam": 1.0,
        "dice_weight": 0.0,
        "num_clusters": 7,
        "channels": [8, 16, 32, 64, 64],
        "input_size": [160, 192, 224],
        "ct_window": [-1000, 1000],
        "tensorboard": True,
        "mlflow": False,
    }
    assert {key: train.get_parsed_content(key) for key in expected} == expected
    assert train.get_parsed_content("output_dir") == f"{BUNDLE}/models/sacbnet"
    assert train.get("train")["trainer"]["_target_"] == "SupervisedTrainer"
    assert parse(MULTI_GPU_TRAIN).get("network")["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    inference = parse(["configs/inference.yaml"])
    expected = {"weights": None, "ct_window": [-1000, 1000], "input_size": [160, 192, 224], "num_clusters": 7}
    assert {key: inference.get_parsed_content(key) for key in expected} == expected
    cuda_when_available = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert inference.get_parsed_content("device") == train.get_parsed_content("device") == cuda_when_available
    for task, (size, lam) in TASKS.items():
        parser = parse([*TRAIN, f"configs/{task}.yaml"])
        assert parser.get_parsed_content("task") == task and parser.get_parsed_content("input_size") == size
        assert parser.get_parsed_content("lam") == lam == SACBNET_LAMBDAS[task]
        assert parser.get_parsed_content("one_pass") is True
        assert parser.get_parsed_content("output_dir") == f"{BUNDLE}/models/{task}"
        assert parser.get_parsed_content("ct_window") == [-1000, 1000]
        inference = parse(["configs/inference.yaml", f"configs/{task}.yaml"])
        assert inference.get_parsed_content("input_size") == size
        assert inference.get_parsed_content("output_dir") == f"{BUNDLE}/outputs"


def test_bad_overrides_are_refused(brainsynth, tmp_path):
    log = run_bundle(TRAIN, succeed=False, **train_overrides(brainsynth, tmp_path / "a", task="brain", epochs=1))
    assert "task must be one of ['ixi', 'lpba', 'abdomen_ct'], got 'brain'" in log
    log = run_bundle(TRAIN, succeed=False, **train_overrides(brainsynth, tmp_path / "a", epochs="ten"))
    assert "epochs must be a whole number >= 1, got 'ten'" in log
    log = run_bundle(["configs/inference.yaml"], succeed=False, dataset_jsn=brainsynth, output_dir=tmp_path / "b")
    assert "--dataset_jsn is not a key of the bundle's configs" in log and "did you mean 'dataset_json'" in log
    overrides = {"dataset_json": brainsynth, "output_dir": tmp_path / "b", "input_size": "[30, 32, 32]"}
    log = run_bundle(["configs/inference.yaml"], succeed=False, **overrides)
    assert "each a multiple of 16" in log
    # weights of another network: CheckpointLoader (strict) names the keys that do not fit
    other = tmp_path / "other.pt"
    torch.save({"model": SACBNet((32, 32, 32), channels=[4, 8, 8, 8, 8]).state_dict()}, other)
    overrides = {"dataset_json": brainsynth, "output_dir": tmp_path / "b", "weights": other, **SMALL_NETWORK}
    overrides["channels"] = "[4, 8, 8, 8, 16]"
    log = run_bundle(["configs/inference.yaml"], succeed=False, **overrides)
    assert "size mismatch" in log
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
