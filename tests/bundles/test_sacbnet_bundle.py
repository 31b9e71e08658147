"""The SACB-Net bundle beyond the conformance test, each config run as a user would, with
``python -m monai.bundle run`` (and ``torchrun`` for multi_gpu_train.yaml), on BrainSynth with a small network:
training with a task file, validation and resumption, inference with the trained weights followed by
evaluate.yaml's table, fine-tuning at another size on a paired dataset, two-process training, the task files'
values, and refused overrides; plus the workflow functions in-process (the network of inference.yaml, the checks
of the training set-up)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import BundleRunner, read_checkpoint

from monai_unireg.data import load_learn2reg, pair_name
from monai_unireg.engines import SACBNET_LAMBDAS, build_sacbnet, train_sacbnet_workflow
from monai_unireg.networks.nets import ResizedRegistration, SACBNet

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
#: The paper's tasks (paper Sec. 4): working size, lambda (METHODS.md), training pairs per epoch.
TASKS = {
    "ixi": ([160, 192, 224], 3.0, 403),
    "lpba": ([160, 192, 160], 1.0, 600),
    "abdomen_ct": ([192, 160, 224], 0.4, 342),
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
        **SMALL_NETWORK,
        **overrides,
    }


@pytest.fixture(scope="module")
def trained(brainsynth, tmp_path_factory) -> tuple[Path, str]:
    """train.yaml + lpba.yaml for 2 epochs, validated on the first registration_val pair; its folder and log."""
    output_dir = tmp_path_factory.mktemp("lpba")
    overrides = train_overrides(brainsynth, output_dir, epochs=2, validation_json=brainsynth, max_validation_pairs=1)
    return output_dir, run_bundle(TRAIN_LPBA, **overrides)


def test_training_with_a_task_file_validates_and_resumes(brainsynth, trained, tmp_path):
    output_dir, log = trained
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint.pt").is_file()
    state = read_checkpoint(output_dir)
    assert state["config"]["input_size"] == [32, 32, 32] and state["config"]["channels"] == [4, 8, 8, 8, 8]
    assert state["config"]["num_clusters"] == [7, 7, 7, 7]
    assert [record["epoch"] for record in state["history"]] == [1, 2]
    assert all(0 < record["validation_dice"] <= 1 for record in state["history"])
    assert all(record["diffusion"] > 0 for record in state["history"])
    assert state["history"][0]["learning_rate"] > state["history"][1]["learning_rate"] >= 0  # polynomial decay
    assert "SACB-Net (lpba) at 32x32x32" in log and "lambda 1, Dice weight 0" in log
    resumed = tmp_path / "lpba"
    shutil.copytree(output_dir, resumed)
    log = run_bundle(TRAIN_LPBA, **train_overrides(brainsynth, resumed, epochs=3))
    assert f"resumed from {resumed / 'checkpoint.pt'} at epoch 2" in log
    assert "epoch 3/3 iteration 2/2" in log and "epoch 1/3" not in log and "epoch 2/3" not in log
    history = read_checkpoint(resumed)["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3] and history[:2] == state["history"]


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
    """init_weights keeps the file's architecture and trains at the task's size, here the atlas-style ixi.yaml
    (paired dataset: its training_paired_images) on ProstateMRUS, with the optional Dice term on its labels."""
    prostate = shared_data / "ProstateMRUS" / "ProstateMRUS_dataset.json"
    output_dir = tmp_path / "finetuned"
    overrides = train_overrides(
        prostate,
        output_dir,
        epochs=1,
        input_size="[32, 48, 32]",
        channels="[8, 16, 32, 64, 64]",  # ignored: the file's channels are kept
        init_weights=trained[0] / "model.pt",
        learning_rate=1e-3,
        dice_weight=1.0,
    )
    log = run_bundle(["configs/train.yaml", "configs/ixi.yaml"], **overrides)
    assert "SACB-Net (ixi), fine-tuning" in log and "lambda 3" in log
    tuned, start = read_checkpoint(output_dir), torch.load(trained[0] / "model.pt", weights_only=True)
    assert tuned["config"] == {**start["config"], "input_size": [32, 48, 32]}
    assert 0 <= tuned["history"][0]["dice"] <= 1
    assert any(not torch.equal(value, tuned["model"][name]) for name, value in start["model"].items())


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)
def test_multi_gpu_train_on_two_cpu_processes(brainsynth, tmp_path):
    output_dir = tmp_path / "distributed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    overrides = train_overrides(brainsynth, output_dir, epochs=1, pairs_per_dataset=4)
    log = run_bundle(MULTI_GPU_TRAIN, launcher=torchrun, **overrides)
    assert "process 0 of 2 (gloo) on cpu" in log and "process 1 of 2 (gloo) on cpu" in log
    assert "batch 1 per process on 2 processes" in log
    assert "epoch 1/1 iteration 2/2" in log  # a second synchronised step: every parameter got its gradient
    assert log.count("epoch 1/1 done") == 1  # rank 0 alone logs and writes the checkpoint
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint.pt", "model.pt"]
    assert [record["epoch"] for record in read_checkpoint(output_dir)["history"]] == [1]


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
        "distributed": None,
    }
    assert {key: train.get_parsed_content(key) for key in expected} == expected
    assert train.get_parsed_content("output_dir") == f"{BUNDLE}/models/sacbnet"
    assert train.get("training")["_target_"] == "monai_unireg.engines.sacbnet_workflows.train_workflow"
    assert parse(MULTI_GPU_TRAIN).get_parsed_content("distributed") is True
    inference = parse(["configs/inference.yaml"])
    expected = {"weights": None, "ct_window": [-1000, 1000], "input_size": [160, 192, 224], "num_clusters": 7}
    assert {key: inference.get_parsed_content(key) for key in expected} == expected
    cuda_when_available = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert inference.get_parsed_content("device") == train.get_parsed_content("device") == cuda_when_available
    for task, (size, lam, pairs) in TASKS.items():
        parser = parse([*TRAIN, f"configs/{task}.yaml"])
        assert parser.get_parsed_content("task") == task and parser.get_parsed_content("input_size") == size
        assert parser.get_parsed_content("lam") == lam == SACBNET_LAMBDAS[task]
        assert parser.get_parsed_content("pairs_per_dataset") == pairs
        assert parser.get_parsed_content("output_dir") == f"{BUNDLE}/models/{task}"
        assert parser.get_parsed_content("ct_window") == [-1000, 1000]
        inference = parse(["configs/inference.yaml", f"configs/{task}.yaml"])
        assert inference.get_parsed_content("input_size") == size
        assert inference.get_parsed_content("output_dir") == f"{BUNDLE}/outputs"


def test_bad_overrides_are_refused(brainsynth, tmp_path):
    log = run_bundle(TRAIN, succeed=False, **train_overrides(brainsynth, tmp_path / "a", task="brain", epochs=1))
    assert "task must be one of ['ixi', 'lpba', 'abdomen_ct'], got 'brain'" in log
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


def test_the_inference_network_with_and_without_weights(tmp_path, caplog):
    small = {"input_size": 32, "channels": [4, 8, 8, 8, 8]}
    with caplog.at_level(logging.WARNING, logger="sacbnet"):
        network = build_sacbnet(None, **small)
    assert any(r.levelno == logging.WARNING and "untrained" in r.message for r in caplog.records)
    assert isinstance(network, ResizedRegistration) and network.size == (32, 32, 32)
    again = build_sacbnet(None, **small)  # the initial weights come from the seed
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values()))
    moving, fixed = torch.rand(1, 1, 20, 24, 28), torch.rand(1, 1, 20, 24, 28)
    with torch.no_grad():
        assert network.eval()(moving, fixed).shape == (1, 3, 20, 24, 28)
    trained = SACBNet((16, 32, 48), channels=[2, 4, 4, 4, 4], num_clusters=3)
    torch.save({"config": trained.config, "model": trained.state_dict()}, tmp_path / "model.pt")
    loaded = build_sacbnet(tmp_path / "model.pt", **small)  # the file's configuration wins
    assert loaded.size == (16, 32, 48) and loaded.network.config == trained.config
    with pytest.raises(ValueError, match="does not exist"):
        build_sacbnet(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="input_size must be one size or 3 sizes"):
        build_sacbnet(None, input_size=[32, 32])


def test_training_set_up_is_checked(brainsynth, trained, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = {"datasets": [brainsynth], "output_dir": tmp_path / "out", "device": "cpu", "input_size": 32}
    with pytest.raises(ValueError, match="lam is None and no task is given"):
        train_sacbnet_workflow(**common)
    with pytest.raises(ValueError, match="dice_weight"):
        train_sacbnet_workflow(lam=1.0, dice_weight=-1.0, **common)
    with pytest.raises(ValueError, match="datasets must be a non-empty list"):
        train_sacbnet_workflow(**{**common, "datasets": str(brainsynth)}, task="lpba")
    with pytest.raises(ValueError, match="not started by torchrun"):
        train_sacbnet_workflow(task="lpba", distributed=True, **common)
    assert not (tmp_path / "out").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(trained[0], resumed)
    with pytest.raises(ValueError, match=r"written for a network with channels=\[4, 8, 8, 8, 8\].*--resume False"):
        train_sacbnet_workflow(**{**common, "output_dir": resumed}, task="lpba", channels=[4, 8, 8, 8, 16])
