"""The PromptReg bundle beyond the conformance test, each config run as a user would, with
``python -m monai.bundle run`` (and ``torchrun`` for the multi_gpu configs), on the shared datasets with a small
network: leave-one-dataset-out training (BrainSynth and CTTotalSeg as the domains, ProstateMRUS held out and
validated zero-shot, TensorBoard, checkpoints), bit-exact resumption after a kill, the "w/o RPG" ablation with the
optimiser, a transform and a handler swapped by overrides, inference with the trained weights, evaluate.yaml's
per-dataset Dice table, two-process training and evaluation, the paper's defaults, and refused overrides."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import TORCHRUN, BundleRunner, assert_same_weights, final_weights, read_checkpoint

from monai_unireg.data import load_learn2reg, pair_name
from monai_unireg.networks.nets import PromptReg, load_promptreg

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "promptreg"
_RUNNER = BundleRunner(BUNDLE)
run_bundle = _RUNNER.run
parse = _RUNNER.parse
TRAIN = ["configs/train.yaml"]
MULTI_GPU_TRAIN = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]
INFERENCE = ["configs/inference.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
MULTI_GPU_EVALUATE = [*EVALUATE, "configs/multi_gpu_evaluate.yaml"]
#: A network small enough for a CPU test: 32^3 working size, base channels 4 (bottleneck 32 channels at 4^3).
SMALL_NETWORK = {"input_size": "[32, 32, 32]", "channels": 4}
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)


@pytest.fixture(scope="module")
def data(shared_data) -> dict[str, Path]:
    """Dataset json by name: two training domains (BrainSynth MRI, CTTotalSeg CT) and ProstateMRUS (US/MR)."""
    return {name: shared_data / name / f"{name}_dataset.json" for name in ("BrainSynth", "CTTotalSeg", "ProstateMRUS")}


def listed(*paths: Path) -> str:
    return str([str(path) for path in paths])


def train_overrides(datasets: list[Path], output_dir: Path, **overrides: object) -> dict:
    """Small, quick training (2 random pairs per dataset and epoch, 2 iterations, the small network)."""
    return {
        "datasets": listed(*datasets),
        "output_dir": output_dir,
        "pairs_per_dataset": 2,
        "max_iterations_per_epoch": 2,
        **SMALL_NETWORK,
        **overrides,
    }


def leave_one_out(data: dict[str, Path], output_dir: Path) -> dict:
    """2 epochs on BrainSynth and CTTotalSeg, ProstateMRUS held out (by name), validated on its first pair."""
    overrides = train_overrides(list(data.values()), output_dir, epochs=2, held_out="ProstateMRUS")
    return {**overrides, "max_validation_pairs": 1}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, str]:
    """The leave-one-out training run: its folder and log."""
    output_dir = tmp_path_factory.mktemp("without_prostate")
    return output_dir, run_bundle(TRAIN, **leave_one_out(data, output_dir))


def test_leave_one_out_training_validates_zero_shot_logs_and_checkpoints(trained):
    output_dir, log = trained
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint_epoch=2.pt").is_file()
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard is on by default
    assert "PromptReg on 2 domain(s) ['BrainSynth', 'CTTotalSeg'], one prompt each" in log
    assert "held out of training: ProstateMRUS (zero-shot); validation on 1 registration_val pairs" in log
    assert "train_loss: " in log and log.count("Metrics -- val_dice: ") == 2  # zero-shot, on ProstateMRUS
    state = read_checkpoint(output_dir)
    assert state["pairs"]["datasets"] == ["BrainSynth", "CTTotalSeg"]  # the held-out dataset is not trained on
    assert state["trainer"]["iteration"] == 4
    # the polynomial decay steps every iteration (total_iters = epochs x iterations per epoch), to 0 at the end
    assert state["lr_scheduler"]["total_iters"] == 4 and state["lr_scheduler"]["last_epoch"] == 4
    group = state["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 1e-4 and group["lr"] == 0.0 and group["amsgrad"] is True  # the authors' Adam
    weights = final_weights(output_dir)
    assert set(weights) == set(PromptReg((32, 32, 32), num_domains=2, channels=4).state_dict())
    assert weights["prompt_generator.knowledge_base"].shape[0] == 2  # one prompt per training dataset
    network = load_promptreg(output_dir / "model.pt")  # the command line's --weights: the network and its settings
    assert network.config["num_domains"] == 2 and network.config["channels"] == 4 and network.use_prompt
    assert state["config"] == network.config


def test_resume_after_a_kill_is_bit_exact(data, trained, tmp_path):
    """Killed right after the first epoch's checkpoint (os._exit, no clean-up), the same command again finishes
    the run: the network equals the uninterrupted run's bit for bit."""
    output_dir = tmp_path / "killed"
    overrides = leave_one_out(data, output_dir)
    resumed = {**overrides, "held_out": data["ProstateMRUS"]}  # held out by path this time: the same run
    _RUNNER.resume_after_a_kill(TRAIN, overrides, output_dir, resumed)
    assert_same_weights(final_weights(output_dir), final_weights(trained[0]))


def test_the_ablation_with_the_optimiser_a_transform_and_a_handler_swapped(data, tmp_path):
    """use_prompt False (paper Table 2, "w/o RPG"): the backbone alone, MIND + diffusion only; and the yaml swaps."""
    output_dir = tmp_path / "no_rpg"
    overrides = train_overrides([data["BrainSynth"], data["ProstateMRUS"]], output_dir, epochs=1, use_prompt=False)
    overrides["max_iterations_per_epoch"] = 1
    # the optimiser, a whole block: SGD takes no amsgrad
    overrides["optimizer"] = "{'_target_': 'torch.optim.SGD', 'params': '$@network.parameters()', 'lr': 0.01}"
    overrides["train#preprocessing#transforms#2"] = (  # the intensity transform: MONAI's ScaleIntensityd
        "{'_target_': 'ScaleIntensityd', 'keys': ['fixed_image', 'moving_image']}"
    )
    overrides["train#handlers#3#tag_name"] = "objective"  # a handler's setting
    overrides["tensorboard"] = False  # a handler off
    log = run_bundle(TRAIN, **overrides)
    assert "objective: " in log and "train_loss" not in log and "val_dice" not in log  # nothing held out
    state = read_checkpoint(output_dir)
    assert "momentum" in state["optimizer"]["param_groups"][0] and "betas" not in state["optimizer"]["param_groups"][0]
    assert not any("prompt" in name for name in state["model"]) and not (output_dir / "tensorboard").exists()
    swapped = {"train#preprocessing#transforms#2": {"_target_": "ScaleIntensityd", "keys": ["fixed_image"]}}
    transforms = parse(TRAIN, **swapped).get_parsed_content("train#preprocessing").transforms
    assert type(transforms[2]).__name__ == "ScaleIntensityd"


def test_inference_with_weights_then_the_dice_table(data, trained, tmp_path):
    weights = trained[0] / "model.pt"
    output_dir = tmp_path / "evaluation"
    datasets = [data["BrainSynth"], data["ProstateMRUS"]]
    overrides = {"datasets": listed(*datasets), "max_pairs": 1, "table_row": "w/o ProstateMRUS"}
    log = run_bundle(EVALUATE, output_dir=output_dir, weights=weights, num_domains=2, **SMALL_NETWORK, **overrides)
    assert f"Restored all variables from {weights}" in log and "untrained" not in log
    assert "Dice (%) per dataset, w/o ProstateMRUS: BrainSynth" in log
    for dataset in datasets:
        name = dataset.name.removesuffix("_dataset.json")
        pair = load_learn2reg(dataset, "registration_val")[0]
        field, fixed = nib.load(str(output_dir / name / pair_name(pair) / "ddf.nii.gz")), nib.load(pair["fixed_image"])
        assert field.shape == (*fixed.shape, 1, 3) and np.isfinite(field.get_fdata()).all()
        np.testing.assert_allclose(field.affine, fixed.affine, atol=1e-4)
        assert np.abs(field.get_fdata()).max() > 0
        with open(output_dir / name / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["pair"] for row in rows] == [f"{name}/{pair_name(pair)}"] and 0 < float(rows[0]["dice_mean"]) <= 1
        assert json.loads((output_dir / name / "summary.json").read_text())["dice_mean"]["n"] == 1
        # each dataset's Dice averages its json's evaluation_labels
        metrics = json.loads((output_dir / name / pair_name(pair) / "metrics.json").read_text())
        assert metrics["dice_labels"] == json.loads(dataset.read_text())["evaluation_labels"]
    assert json.loads((output_dir / "summary.json").read_text())["dice_mean"]["n"] == 2  # every pair of the run
    with open(output_dir / "dice_table.csv", newline="", encoding="utf-8") as handle:
        header, row = list(csv.reader(handle))
    assert header == ["training set", "BrainSynth", "ProstateMRUS"] and row[0] == "w/o ProstateMRUS"
    for cell in row[1:]:
        mean, spread = (float(value) for value in cell.split(" ± "))
        assert 0 < mean <= 100 and spread == 0  # one pair each
    table = (output_dir / "dice_table.md").read_text(encoding="utf-8")
    assert f"| w/o ProstateMRUS | {row[1]} | {row[2]} |" in table and "(BrainSynth 1, ProstateMRUS 1)" in table


@needs_gloo
def test_multi_gpu_train_on_two_cpu_processes(data, tmp_path):
    output_dir = tmp_path / "distributed"
    overrides = train_overrides([data["BrainSynth"], data["ProstateMRUS"]], output_dir, epochs=1)
    overrides["max_iterations_per_epoch"] = None
    log = run_bundle(MULTI_GPU_TRAIN, launcher=TORCHRUN, backend="gloo", **overrides)
    # 4 pairs over 2 processes: 2 synchronised steps each; rank 0 alone logs the loss and writes the checkpoint
    assert log.count("Iter: 2/2 -- train_loss") == 1 and log.count("Saved checkpoint at epoch: 1") == 1
    assert sorted(path.name for path in output_dir.glob("*.pt")) == ["checkpoint_epoch=1.pt", "model.pt"]
    state = read_checkpoint(output_dir)
    assert state["trainer"]["iteration"] == 2 and state["lr_scheduler"]["total_iters"] == 2


@needs_gloo
def test_multi_gpu_evaluate_on_two_cpu_processes(data, trained, tmp_path):
    """3 pairs of 2 datasets over 2 processes (2 + 1): each writes its pairs' folders, rank 0 the merged tables."""
    output_dir = tmp_path / "distributed_evaluation"
    overrides = {
        "datasets": listed(data["BrainSynth"], data["ProstateMRUS"]),
        "dataset#data": "$monai_unireg.engines.promptreg.dataset_pair_items(@datasets, @section, 2)[:3]",
        "output_dir": output_dir,
        "weights": trained[0] / "model.pt",
        "num_domains": 2,
    }
    run_bundle(MULTI_GPU_EVALUATE, launcher=TORCHRUN, backend="gloo", **overrides, **SMALL_NETWORK)
    brain = load_learn2reg(data["BrainSynth"], "registration_val")[:2]
    prostate = load_learn2reg(data["ProstateMRUS"], "registration_val")[:1]
    names = [f"BrainSynth/{pair_name(pair)}" for pair in brain] + [f"ProstateMRUS/{pair_name(prostate[0])}"]
    assert all((output_dir / name / "ddf.nii.gz").is_file() for name in names)
    with open(output_dir / "metrics.csv", newline="") as handle:
        assert [row["pair"] for row in csv.DictReader(handle)] == names
    assert "(BrainSynth 2, ProstateMRUS 1)" in (output_dir / "dice_table.md").read_text(encoding="utf-8")


def test_paper_defaults(data):
    train = parse(TRAIN)
    expected = {
        "held_out": None,
        "epochs": 300,
        "pairs_per_dataset": 100,
        "batch_size": 1,
        "learning_rate": 1e-4,
        "amsgrad": True,
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
        "tensorboard": True,
        "mlflow": False,
    }
    assert {key: train.get_parsed_content(key) for key in expected} == expected
    assert train.get_parsed_content("output_dir") == f"{BUNDLE}/models/promptreg"
    assert train.get("train")["trainer"]["_target_"] == "SupervisedTrainer"
    assert train.get("lr_scheduler")["_target_"] == "torch.optim.lr_scheduler.PolynomialLR"
    assert train.get("train")["handlers"][1]["epoch_level"] is False  # per iteration, paper Sec. 3.1
    datasets = [str(path) for path in data.values()]
    held_out = parse(TRAIN, datasets=datasets, held_out=str(data["CTTotalSeg"]))
    assert held_out.get_parsed_content("output_dir") == f"{BUNDLE}/models/promptreg_without_CTTotalSeg"
    assert held_out.get_parsed_content("num_domains") == 2
    assert held_out.get_parsed_content("validation_source") == str(data["CTTotalSeg"])
    ablation = parse(TRAIN, datasets=datasets, held_out="BrainSynth", use_prompt=False)
    assert ablation.get_parsed_content("output_dir") == f"{BUNDLE}/models/promptreg_no_rpg_without_BrainSynth"
    assert parse(MULTI_GPU_TRAIN).get("network")["_target_"] == "torch.nn.parallel.DistributedDataParallel"
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


def refusal(**overrides: object) -> str:
    """The error (with its causes) of train.yaml's checks on these overrides, in-process."""
    with pytest.raises(Exception) as error:
        parse(TRAIN, **overrides).get_parsed_content("checks")
    return str(error.getrepr(chain=True))


def test_bad_overrides_are_refused(data, tmp_path):
    brainsynth, prostate = data["BrainSynth"], data["ProstateMRUS"]
    two = [str(brainsynth), str(prostate)]
    message = refusal(datasets=two, held_out="Hippocampus")
    assert "held_out 'Hippocampus' must name exactly one of datasets" in message
    assert "(BrainSynth, ProstateMRUS)" in message
    message = refusal(datasets=two[:1], held_out=two[0])
    assert "is the only dataset of datasets, which leaves no training dataset" in message
    for key, value, expected in [
        ("epochs", "ten", "epochs must be a whole number >= 1, got 'ten'"),
        ("use_prompt", "yes", "use_prompt must be True or False, got 'yes'"),
        ("smoothness", [0.1], "smoothness must be a number, got [0.1]"),
        ("channels", 0, "channels must be a whole number >= 1, got 0"),
    ]:
        assert expected in refusal(datasets=two, **{key: value}), key
    log = run_bundle(TRAIN, succeed=False, **train_overrides([brainsynth], tmp_path / "a", held_ot="BrainSynth"))
    assert "--held_ot is not a key of the bundle's configs" in log and "did you mean 'held_out'" in log
    with pytest.raises(Exception) as error:
        parse(EVALUATE, datasets=two, dice_spread="variance").get_parsed_content("evaluation_checks")
    assert "dice_spread must be one of" in str(error.getrepr(chain=True))
    with pytest.raises(Exception) as error:
        parse(EVALUATE, datasets=[two[0], two[0]]).get_parsed_content("dataset#data")
    assert "two datasets have the same name" in str(error.getrepr(chain=True))
    with pytest.raises(Exception) as error:
        parse(INFERENCE, input_size=[30, 32, 32]).get_parsed_content("network_def")
    assert "input_size must be 3 sizes divisible by 8" in str(error.getrepr(chain=True))
    assert not (tmp_path / "a").exists()
