"""The PromptReg bundle beyond the conformance test, each config run as a user would, with
``python -m monai.bundle run`` (and ``torchrun`` for multi_gpu_train.yaml), on the shared datasets with a small
network: leave-one-dataset-out training (BrainSynth and CTTotalSeg as the domains, ProstateMRUS held out and
validated zero-shot) and its resumption, inference with the trained weights, evaluate.yaml's per-dataset Dice table,
the "w/o RPG" ablation, two-process training, the paper's defaults, and refused overrides; plus the workflow
functions in-process (the network of inference.yaml, the checks of the training set-up and of the evaluation)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import BundleRunner, read_checkpoint

from monai_unireg.data import load_learn2reg, pair_name
from monai_unireg.engines import evaluate_datasets, train_promptreg_workflow
from monai_unireg.networks.nets import PromptReg, ResizedRegistration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "promptreg"
_RUNNER = BundleRunner(BUNDLE)
bundle_command = _RUNNER.command
run_bundle = _RUNNER.run
parse = _RUNNER.parse
TRAIN = ["configs/train.yaml"]
MULTI_GPU_TRAIN = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]
INFERENCE = ["configs/inference.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
#: A network small enough for a CPU test: 32^3 working size, base channels 4 (bottleneck 32 channels at 4^3).
SMALL_NETWORK = {"input_size": "[32, 32, 32]", "channels": 4}


@pytest.fixture(scope="module")
def data(shared_data) -> dict[str, Path]:
    """Dataset json by name: two training domains (BrainSynth MRI, CTTotalSeg CT) and ProstateMRUS (US/MR)."""
    return {name: shared_data / name / f"{name}_dataset.json" for name in ("BrainSynth", "CTTotalSeg", "ProstateMRUS")}


def listed(*paths: Path) -> str:
    return str([str(path) for path in paths])


def train_overrides(datasets: list[Path], output_dir: Path, **overrides: object) -> dict:
    """Small, quick training (2 random pairs per dataset and epoch, one iteration per pair, the small network)."""
    return {
        "datasets": listed(*datasets),
        "output_dir": output_dir,
        "pairs_per_dataset": 2,
        "max_iterations_per_epoch": 2,
        **SMALL_NETWORK,
        **overrides,
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, str]:
    """train.yaml for 2 epochs on BrainSynth and CTTotalSeg, ProstateMRUS held out (by name) and validated on its
    first 2 registration_val pairs; the run's folder and log."""
    output_dir = tmp_path_factory.mktemp("without_prostate")
    overrides = train_overrides(list(data.values()), output_dir, epochs=2, held_out="ProstateMRUS")
    return output_dir, run_bundle(TRAIN, **overrides, max_validation_pairs=2)


def test_leave_one_out_training_validates_zero_shot_and_resumes(data, trained, tmp_path):
    output_dir, log = trained
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint.pt").is_file()
    state = read_checkpoint(output_dir)
    config = state["config"]
    assert config["input_size"] == [32, 32, 32] and config["channels"] == 4 and config["num_domains"] == 2
    assert config["use_prompt"] is True and config["temperature"] == 0.1
    assert state["sampler"]["datasets"] == ["BrainSynth", "CTTotalSeg"]  # the held-out dataset is not trained on
    assert [record["epoch"] for record in state["history"]] == [1, 2]
    assert all(0 < record["validation_dice"] <= 1 for record in state["history"])  # zero-shot on ProstateMRUS
    assert all(record["orthogonality"] > 0 and record["task_similarity"] >= 0 for record in state["history"])
    assert state["history"][0]["learning_rate"] > state["history"][1]["learning_rate"] >= 0  # polynomial decay
    assert "held out of training: ProstateMRUS (zero-shot); validation on 2 registration_val pairs" in log
    assert "from ['BrainSynth', 'CTTotalSeg']" in log and "2 prompts, tau 0.1" in log
    assert "lambdas 0.1 / 0.001 / 0.001" in log
    resumed = tmp_path / "resumed"
    shutil.copytree(output_dir, resumed)
    overrides = train_overrides(list(data.values()), resumed, epochs=3, held_out=data["ProstateMRUS"])
    log = run_bundle(TRAIN, **overrides, max_validation_pairs=2)  # held out by path this time: the same run
    assert f"resumed from {resumed / 'checkpoint.pt'} at epoch 2" in log
    assert "epoch 3/3 iteration 2/2" in log and "epoch 1/3" not in log and "epoch 2/3" not in log
    history = read_checkpoint(resumed)["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3] and history[:2] == state["history"]
    assert 0 < history[2]["validation_dice"] <= 1


def test_inference_with_weights_then_the_dice_table(data, trained, tmp_path):
    weights = trained[0] / "model.pt"
    prostate = data["ProstateMRUS"]
    pair = load_learn2reg(prostate, "registration_val")[0]
    log = run_bundle(
        INFERENCE,
        dataset_json=prostate,
        **{"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:1]"},
        output_dir=tmp_path / "inference",
        weights=weights,
        num_domains=2,
        **SMALL_NETWORK,
    )
    assert f"Restored all variables from {weights}" in log and "untrained" not in log
    field, fixed = nib.load(str(tmp_path / "inference" / pair_name(pair) / "ddf.nii.gz")), nib.load(pair["fixed_image"])
    assert field.shape == (*fixed.shape, 1, 3) and np.isfinite(field.get_fdata()).all()
    np.testing.assert_allclose(field.affine, fixed.affine, atol=1e-4)
    assert np.abs(field.get_fdata()).max() > 0

    output_dir = tmp_path / "evaluation"
    datasets = [data["BrainSynth"], prostate]
    overrides = {"datasets": listed(*datasets), "max_pairs": 2, "table_row": "w/o ProstateMRUS"}
    log = run_bundle(EVALUATE, output_dir=output_dir, weights=weights, num_domains=2, **SMALL_NETWORK, **overrides)
    assert "Dice (%) per dataset, w/o ProstateMRUS: BrainSynth" in log
    for dataset in datasets:
        name = dataset.name.removesuffix("_dataset.json")
        pairs = load_learn2reg(dataset, "registration_val")[:2]
        for pair in pairs:
            field = nib.load(str(output_dir / name / pair_name(pair) / "ddf.nii.gz"))
            assert field.shape == (*nib.load(pair["fixed_image"]).shape, 1, 3)
        with open(output_dir / name / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["pair"] for row in rows] == [pair_name(pair) for pair in pairs]
        assert all(0 < float(row["dice_mean"]) <= 1 for row in rows)
        assert json.loads((output_dir / name / "summary.json").read_text())["dice_mean"]["n"] == 2
    with open(output_dir / "dice_table.csv", newline="", encoding="utf-8") as handle:
        header, row = list(csv.reader(handle))
    assert header == ["training set", "BrainSynth", "ProstateMRUS"] and row[0] == "w/o ProstateMRUS"
    for cell in row[1:]:
        mean, spread = (float(value) for value in cell.split(" ± "))
        assert 0 < mean <= 100 and spread >= 0
    table = (output_dir / "dice_table.md").read_text(encoding="utf-8")
    assert f"| w/o ProstateMRUS | {row[1]} | {row[2]} |" in table and "(BrainSynth 2, ProstateMRUS 2)" in table


def test_the_ablation_without_the_prompt_generator_trains(data, tmp_path):
    """use_prompt False (paper Table 2, "w/o RPG"): the backbone alone, MIND + diffusion only."""
    output_dir = tmp_path / "no_rpg"
    overrides = train_overrides([data["BrainSynth"], data["ProstateMRUS"]], output_dir, epochs=1, use_prompt=False)
    log = run_bundle(TRAIN, **overrides)
    assert "working size 32x32x32, channels 4, no RPG" in log
    state = read_checkpoint(output_dir)
    assert state["config"]["use_prompt"] is False and not any("prompt" in name for name in state["model"])
    assert {"similarity", "diffusion"} <= set(state["history"][0]) and "orthogonality" not in state["history"][0]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)
def test_multi_gpu_train_on_two_cpu_processes(data, tmp_path):
    output_dir = tmp_path / "distributed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    overrides = train_overrides([data["BrainSynth"], data["ProstateMRUS"]], output_dir, epochs=1)
    log = run_bundle(MULTI_GPU_TRAIN, launcher=torchrun, **overrides)
    assert "process 0 of 2 (gloo) on cpu" in log and "process 1 of 2 (gloo) on cpu" in log
    assert "batch 1 per process on 2 processes" in log
    assert "epoch 1/1 iteration 2/2" in log  # a second synchronised step: every parameter got its gradient
    assert log.count("epoch 1/1 done") == 1  # rank 0 alone logs and writes the checkpoint
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint.pt", "model.pt"]
    state = read_checkpoint(output_dir)
    assert [record["epoch"] for record in state["history"]] == [1] and state["config"]["num_domains"] == 2


def test_paper_defaults(data):
    train = parse(TRAIN)
    expected = {
        "held_out": None,
        "epochs": 300,
        "pairs_per_dataset": 100,
        "batch_size": 1,
        "learning_rate": 1e-4,
        "power": 0.9,
        "smoothness": 0.1,
        "orthogonality": 1e-3,
        "task_similarity": 1e-3,
        "normalize_orthogonality": False,
        "temperature": 0.1,
        "use_prompt": True,
        "input_size": [160, 160, 160],
        "channels": 16,
        "ct_window": [-1000, 1000],
        "distributed": None,
    }
    assert {key: train.get_parsed_content(key) for key in expected} == expected
    assert train.get_parsed_content("output_dir") == f"{BUNDLE}/models/promptreg"
    assert train.get("training")["_target_"] == "monai_unireg.engines.promptreg_workflows.train_workflow"
    datasets = [str(path) for path in data.values()]
    held_out = parse(TRAIN, datasets=datasets, held_out=str(data["CTTotalSeg"]))
    assert held_out.get_parsed_content("output_dir") == f"{BUNDLE}/models/promptreg_without_CTTotalSeg"
    ablation = parse(TRAIN, datasets=datasets, held_out="BrainSynth", use_prompt=False)
    assert ablation.get_parsed_content("output_dir") == f"{BUNDLE}/models/promptreg_no_rpg_without_BrainSynth"
    assert parse(MULTI_GPU_TRAIN).get_parsed_content("distributed") is True
    inference = parse(INFERENCE)
    expected = {
        "weights": None,
        "ct_window": [-1000, 1000],
        "input_size": [160, 160, 160],
        "num_domains": 5,
        "channels": 16,
        "use_prompt": True,
        "modality": "auto",
    }
    assert {key: inference.get_parsed_content(key) for key in expected} == expected
    cuda_when_available = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert inference.get_parsed_content("device") == train.get_parsed_content("device") == cuda_when_available
    evaluate = parse(EVALUATE, dataset_json=str(data["BrainSynth"]))
    assert evaluate.get_parsed_content("datasets") == [str(data["BrainSynth"])]
    assert evaluate.get_parsed_content("dice_spread") == "std" and evaluate.get_parsed_content("max_pairs") is None


def test_bad_overrides_are_refused(data, tmp_path):
    brainsynth, prostate = data["BrainSynth"], data["ProstateMRUS"]
    overrides = train_overrides([brainsynth, prostate], tmp_path / "a", held_out="Hippocampus", epochs=1)
    log = run_bundle(TRAIN, succeed=False, **overrides)
    assert "held_out 'Hippocampus' must name exactly one of datasets" in log and "(BrainSynth, ProstateMRUS)" in log
    overrides = train_overrides([brainsynth], tmp_path / "b", held_out=brainsynth, epochs=1)
    log = run_bundle(TRAIN, succeed=False, **overrides)
    assert "is the only dataset of datasets, which leaves no training dataset" in log
    overrides = {"dataset_json": brainsynth, "output_dir": tmp_path / "c", "input_size": "[30, 32, 32]"}
    log = run_bundle(INFERENCE, succeed=False, **overrides)
    assert "input_size must be 3 sizes divisible by 8" in log
    assert not any((tmp_path / name).exists() for name in "abc")


def test_training_set_up_is_checked(data, trained, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    two = [data["BrainSynth"], data["ProstateMRUS"]]
    common = {"output_dir": tmp_path / "out", "device": "cpu", "input_size": 32, "channels": 2}
    with pytest.raises(ValueError, match="datasets must be a non-empty list"):
        train_promptreg_workflow(str(data["BrainSynth"]), **common)
    with pytest.raises(ValueError, match="held_out 'CTTotalSeg' must name exactly one of datasets"):
        train_promptreg_workflow(two, held_out="CTTotalSeg", **common)
    with pytest.raises(ValueError, match="leaves no training dataset"):
        train_promptreg_workflow(two[:1], held_out="BrainSynth", **common)
    with pytest.raises(ValueError, match="not started by torchrun"):
        train_promptreg_workflow(two, distributed=True, **common)
    with pytest.raises(ValueError, match="init_weights .* has a knowledge base of 2 prompts"):
        train_promptreg_workflow([data["BrainSynth"]], init_weights=trained[0] / "model.pt", **common)
    with pytest.raises(ValueError, match="smoothness"):
        train_promptreg_workflow(two, smoothness=-1.0, **common)
    assert not (tmp_path / "out").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(trained[0], resumed)
    another = {**common, "output_dir": resumed, "channels": 4}
    with pytest.raises(ValueError, match=r"trained on the datasets \['BrainSynth', 'CTTotalSeg'\].*--resume False"):
        train_promptreg_workflow(list(data.values()), held_out="BrainSynth", **another)
    with pytest.raises(ValueError, match=r"written for a network with channels=4.*--resume False"):
        train_promptreg_workflow(list(data.values()), held_out="ProstateMRUS", **common | {"output_dir": resumed})


def test_the_evaluation_is_checked(data, tmp_path):
    network = ResizedRegistration(PromptReg((16, 16, 16), channels=2), (16, 16, 16))
    with pytest.raises(ValueError, match="spread must be one of"):
        evaluate_datasets(network, [data["BrainSynth"]], tmp_path, spread="variance")
    with pytest.raises(ValueError, match="two datasets have the same name"):
        evaluate_datasets(network, [data["BrainSynth"], data["BrainSynth"]], tmp_path)
    with pytest.raises(ValueError, match="has no registration_val pairs"):
        evaluate_datasets(network, [data["CTTotalSeg"]], tmp_path)
    assert not any(tmp_path.iterdir())
