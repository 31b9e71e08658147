"""The uniGradICON bundle beyond the conformance test, each config run as a user would, with
``python -m monai.bundle run`` (and ``torchrun`` for the multi-GPU configs), on BrainSynth with a small network:
stage 1 with validation, TensorBoard and checkpoints, bit-exact resumption after a kill (augmentation on),
fine-tuning of weights in the released layout on a paired dataset with swapped parts, inference with the trained
weights and instance optimisation followed by evaluate.yaml's table, stage 2 from stage 1 on two processes,
two-process evaluation, the paper's defaults, and refused settings (misspelt keys: tests/engines, and the other
bundles' tests, as check_overrides is shared)."""

from __future__ import annotations

import csv
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
from monai_unireg.networks.nets import UniGradICON, load_unigradicon
from monai_unireg.networks.nets.unigradicon import published_key_prefixes

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "unigradicon"
_RUNNER = BundleRunner(BUNDLE)
run_bundle = _RUNNER.run
parse = _RUNNER.parse
TRAIN = ["configs/train.yaml"]
MULTI_GPU_TRAIN = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
#: A network small enough for a CPU test: 32^3 working size, three UNet levels of 4, 8, 8 channels.
SMALL_NETWORK = {"input_size": 32, "down_channels": "[4, 8, 8]", "up_channels": "[4, 8, 8]"}
SMALL = {"input_size": 32, "down_channels": [4, 8, 8], "up_channels": [4, 8, 8]}
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)


@pytest.fixture(scope="module")
def brainsynth(shared_data) -> Path:
    return shared_data / "BrainSynth" / "BrainSynth_dataset.json"


def train_overrides(dataset: Path, output_dir: Path, **overrides: object) -> dict:
    """Small, quick training (2 random pairs per epoch, one iteration per pair, batch 1, the small network)."""
    return {
        "datasets": f"['{dataset}']",
        "output_dir": output_dir,
        "pairs_per_dataset": 2,
        "batch_size": 1,
        "max_iterations_per_epoch": 2,
        **SMALL_NETWORK,
        **overrides,
    }


def parameter_names(network: torch.nn.Module) -> set[str]:
    """The trained weights (not BatchNorm's running statistics, which change in any training forward pass)."""
    return {name for name, _ in network.named_parameters()}


@pytest.fixture(scope="module")
def stage_one(brainsynth, tmp_path_factory) -> tuple[Path, str]:
    """Stage 1 for 2 epochs (augmentation on), validated on the first registration_val pair; its folder and log."""
    output_dir = tmp_path_factory.mktemp("stage1")
    overrides = train_overrides(brainsynth, output_dir, epochs=2, validation_json=brainsynth, max_validation_pairs=1)
    return output_dir, run_bundle(TRAIN, **overrides)


def test_stage_one_trains_validates_logs_and_checkpoints(stage_one):
    output_dir, log = stage_one
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint_epoch=2.pt").is_file()
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard is on by default
    assert "train_loss: " in log and "val_dice" in log and "Saved checkpoint at epoch: 2" in log
    state = read_checkpoint(output_dir)
    assert state["trainer"]["iteration"] == 4 and state["pairs"]["epoch"] == 1
    assert len(state["augmentation"]["states"]) == 2  # the Compose and RandomPairAugmentationd
    group = state["optimizer"]["param_groups"][0]  # Adam at the paper's constant 5e-5
    assert group["lr"] == 5e-5 and "betas" in group
    assert set(final_weights(output_dir)) == set(UniGradICON(include_step2=False, **SMALL).state_dict())
    # model.pt carries the network's config: the command line's loader (--weights) rebuilds this 3-step network
    network = load_unigradicon(output_dir / "model.pt")
    assert len(network.unets) == 3 and network.config == state["config"]
    assert_same_weights(network.state_dict(), final_weights(output_dir))


def test_resume_after_a_kill_is_bit_exact(brainsynth, stage_one, tmp_path):
    """Killed right after the first epoch's checkpoint (os._exit, no clean-up), the same command again finishes
    the run: the network equals the uninterrupted run's bit for bit (pairs, augmentation and jitter restored)."""
    output_dir = tmp_path / "killed"
    overrides = train_overrides(brainsynth, output_dir, epochs=2, validation_json=brainsynth, max_validation_pairs=1)
    _RUNNER.resume_after_a_kill(TRAIN, overrides, output_dir)
    assert_same_weights(final_weights(output_dir), final_weights(stage_one[0]))


def test_fine_tuning_released_layout_weights_with_swapped_parts(shared_data, tmp_path):
    """init_weights in the reference code's key layout (as Step_2_final.trch) at stage 2 on a paired dataset, with
    the optimiser, the augmentation and a handler swapped by overrides; learning rate 0 keeps the file's weights."""
    torch.manual_seed(0)
    released = UniGradICON(include_step2=True, **SMALL)
    for parameter in released.parameters():
        parameter.data.normal_(std=0.01)
    prefixes = published_key_prefixes(4)
    steps = [key.split(".", 2) for key in released.state_dict()]  # unets.<k>.<rest> -> <prefix k><rest>
    layout = {prefixes[int(k)] + rest: released.state_dict()[f"unets.{k}.{rest}"] for _, k, rest in steps}
    torch.save(layout, tmp_path / "released.trch")
    prostate = shared_data / "ProstateMRUS" / "ProstateMRUS_dataset.json"
    output_dir = tmp_path / "finetuned"
    overrides = train_overrides(prostate, output_dir, stage=2, init_weights=tmp_path / "released.trch", epochs=1)
    overrides.update(max_iterations_per_epoch=1, learning_rate=0.0, tensorboard=False)
    overrides["optimizer#_target_"] = "torch.optim.SGD"
    overrides["train#preprocessing#transforms#5"] = (  # MONAI's RandFlipd instead of the reference augmentation
        "{'_target_': 'RandFlipd', 'keys': ['moving_image', 'fixed_image'], 'prob': 0.5, 'spatial_axis': 0}"
    )
    overrides["train#handlers#1#tag_name"] = "objective"
    log = run_bundle(TRAIN, **overrides)
    assert "objective: " in log and "train_loss" not in log and not (output_dir / "tensorboard").exists()
    state = read_checkpoint(output_dir)
    assert "momentum" in state["optimizer"]["param_groups"][0]
    tuned = final_weights(output_dir)
    assert all(torch.equal(tuned[name], value) for name, value in released.named_parameters())


def test_inference_with_weights_and_instance_optimisation_then_evaluation(brainsynth, stage_one, tmp_path):
    output_dir = tmp_path / "evaluation"
    log = run_bundle(
        EVALUATE,
        dataset_json=brainsynth,
        **{"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:2]"},
        output_dir=output_dir,
        weights=stage_one[0] / "model.pt",
        include_step2=False,
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


@needs_gloo
def test_multi_gpu_stage_two_from_stage_one_on_two_cpu_processes(brainsynth, stage_one, tmp_path):
    """Stage 2 from the stage-1 model.pt over 2 processes at learning rate 0: the first three UNets are stage 1's,
    the new fourth one the identity; rank 0 alone logs and writes."""
    output_dir = tmp_path / "distributed"
    overrides = train_overrides(
        brainsynth,
        output_dir,
        stage=2,
        stage1_weights=stage_one[0] / "model.pt",
        epochs=1,
        pairs_per_dataset=4,
        max_iterations_per_epoch=None,
        learning_rate=0.0,
    )
    log = run_bundle(MULTI_GPU_TRAIN, launcher=TORCHRUN, backend="gloo", **overrides)
    # 4 pairs over 2 processes: 2 synchronised steps each; rank 0 alone logs the loss and writes the checkpoint
    assert log.count("Iter: 2/2 -- train_loss") == 1 and log.count("Saved checkpoint at epoch: 1") == 1
    assert sorted(path.name for path in output_dir.glob("*.pt")) == ["checkpoint_epoch=1.pt", "model.pt"]
    assert read_checkpoint(output_dir)["trainer"]["iteration"] == 2
    stage_one_weights, weights = final_weights(stage_one[0]), final_weights(output_dir)
    assert {key.split(".")[1] for key in weights} == {"0", "1", "2", "3"}
    trained = parameter_names(UniGradICON(include_step2=False, **SMALL))
    assert trained < set(weights) and all(torch.equal(weights[key], stage_one_weights[key]) for key in trained)
    assert not weights["unets.3.lastConv.weight"].any()  # the new fourth UNet starts as the identity


@needs_gloo
def test_multi_gpu_evaluate_on_two_cpu_processes(brainsynth, stage_one, tmp_path):
    """3 pairs over 2 processes (2 + 1): each writes its pairs' folders, rank 0 the one merged table."""
    output_dir = tmp_path / "distributed_evaluation"
    configs = [*EVALUATE, "configs/multi_gpu_evaluate.yaml"]
    subset = {"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:3]"}
    overrides = {"dataset_json": brainsynth, "output_dir": output_dir, "weights": stage_one[0] / "model.pt"}
    run_bundle(configs, launcher=TORCHRUN, backend="gloo", include_step2=False, **subset, **overrides, **SMALL_NETWORK)
    assert_merged_evaluation(
        output_dir, [pair_name(pair) for pair in load_learn2reg(brainsynth, "registration_val")[:3]]
    )


def test_paper_defaults():
    train = parse(TRAIN)
    expected = {
        "stage": 1,
        "epochs": 800,
        "pairs_per_dataset": 1000,
        "batch_size": 4,
        "learning_rate": 5e-5,
        "lam": 1.5,
        "lncc_sigma": 5.0,
        "squared_lncc": False,
        "augmentation_noise_std": 0.05,
        "permute_flip": True,
        "input_size": 175,
        "include_step2": False,
        "down_channels": [16, 32, 64, 256, 512],
        "up_channels": [16, 32, 64, 128, 256],
        "ct_window": [-1000, 1000],
        "tensorboard": True,
        "mlflow": False,
    }
    assert {key: train.get_parsed_content(key) for key in expected} == expected
    assert train.get_parsed_content("output_dir") == f"{BUNDLE}/models/stage1"
    stage_two = parse(TRAIN, stage=2)
    assert stage_two.get_parsed_content("epochs") == 200 and stage_two.get_parsed_content("include_step2") is True
    assert train.get("train")["trainer"]["_target_"] == "SupervisedTrainer"
    network = parse(MULTI_GPU_TRAIN).get("network")
    assert network["_target_"] == "torch.nn.parallel.DistributedDataParallel" and network["static_graph"] is True


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"stage": 3}, ValueError, "stage must be one of [1, 2], got 3"),
        ({"stage": 2}, ValueError, "stage 2 needs stage1_weights"),
        ({"stage1_weights": "/nowhere/model.pt"}, ValueError, "stage1_weights initialises stage 2"),
        ({"stage": 2, "stage1_weights": "a.pt", "init_weights": "b.pt"}, ValueError, "not both"),
        ({"init_weights": "/nowhere/model.pt"}, FileNotFoundError, "init_weights names '/nowhere/model.pt'"),
        ({"epochs": "ten"}, ValueError, "epochs must be a whole number >= 1, got 'ten'"),
        ({"squared_lncc": "yes"}, ValueError, "squared_lncc must be True or False"),
        ({"augmentation_noise_std": [0.05]}, ValueError, "augmentation_noise_std must be a number"),
        ({"down_channels": [4, 0, 8]}, ValueError, "down_channels must be one size or a list of sizes"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(brainsynth, tmp_path, overrides, error, message):
    parser = parse(TRAIN, **train_overrides(brainsynth, tmp_path / "out", **{**SMALL, **overrides}))
    with pytest.raises(RuntimeError, match="Failed to evaluate") as raised:  # the config's expression fails
        parser.get_parsed_content("checks")
    assert isinstance(raised.value.__cause__, error) and message in str(raised.value.__cause__)
    assert not (tmp_path / "out").exists()


def test_a_misspelt_key_is_refused():
    from monai_unireg.engines.bundle import check_overrides

    argv = ["monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.yaml"), "--stage1_weight", "a.pt"]
    with pytest.raises(ValueError, match="--stage1_weight is not a key .* did you mean 'stage1_weights'"):
        check_overrides(argv)
