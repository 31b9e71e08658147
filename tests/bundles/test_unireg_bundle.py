"""The UniReg bundle beyond the conformance test, each config run as a user would, with ``python -m monai.bundle
run`` (and ``torchrun`` for multi_gpu_train.yaml), on the shared datasets with a 16^3 network: training on BrainSynth
(brain, inter-subject) and ProstateMRUS (given as the alias prostate, intra-subject) with label supervision and
per-dataset validation, inference with the trained weights on an unseen task (lung -> chest) with instance
optimisation, evaluate.yaml's per-dataset table (ProstateMRUS and a tiny generated dataset), the static-head
ablation, two-process training, the paper's defaults and refused values; plus the workflow functions in-process (the
network of inference.yaml, the checks of the dataset entries, the training set-up and the evaluation)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import BundleRunner, read_checkpoint

from monai_unireg.data import load_learn2reg, pair_name
from monai_unireg.engines import build_unireg, evaluate_unireg, train_unireg_workflow, unireg_registration
from monai_unireg.engines.instance_optimisation import FieldOptimised
from monai_unireg.networks.nets import PromptReg, ResizedRegistration, UniReg

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "unireg"
_RUNNER = BundleRunner(BUNDLE)
bundle_command = _RUNNER.command
run_bundle = _RUNNER.run
parse = _RUNNER.parse
TRAIN = ["configs/train.yaml"]
MULTI_GPU_TRAIN = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]
INFERENCE = ["configs/inference.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
#: A network small enough for a CPU test: 16^3 working size, encoder channels 4, 8, 8, 8.
SMALL_NETWORK = {"input_size": "[16, 16, 16]", "channels": "[4, 8, 8, 8]"}


@pytest.fixture(scope="module")
def data(shared_data) -> dict[str, Path]:
    """Dataset json by name: BrainSynth (brain MRI, inter-subject) and ProstateMRUS (MR-US of one patient)."""
    return {name: shared_data / name / f"{name}_dataset.json" for name in ("BrainSynth", "ProstateMRUS")}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """The conformance test's dataset (``tests/test_bundles.py``, loaded by path: tests are not a package): 3 cases
    of 24x28x32 voxels with labels 1 and 2, two registration_val pairs."""
    spec = importlib.util.spec_from_file_location("_bundle_conformance", PROJECT_ROOT / "tests" / "test_bundles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_dataset(tmp_path_factory.mktemp("tiny_learn2reg"))


@pytest.fixture(scope="module")
def entries(data) -> list[dict[str, str]]:
    """The two datasets with their conditions; the prostate is given by its alias (nearest region: pelvis)."""
    return [
        {"json": str(data["BrainSynth"]), "task": "brain", "reg_type": "inter"},
        {"json": str(data["ProstateMRUS"]), "task": "prostate", "reg_type": "intra"},
    ]


def train_overrides(entries: list[dict[str, str]], output_dir: Path, **overrides: object) -> dict:
    """Small, quick training (2 random pairs per dataset, 2 iterations, 1 epoch, 1 validation pair per dataset)."""
    return {
        "datasets": str(entries),
        "output_dir": output_dir,
        "epochs": 1,
        "pairs_per_dataset": 2,
        "max_iterations_per_epoch": 2,
        "max_validation_pairs": 1,
        **SMALL_NETWORK,
        **overrides,
    }


@pytest.fixture(scope="module")
def trained(entries, tmp_path_factory) -> tuple[Path, str]:
    """train.yaml on BrainSynth and ProstateMRUS for one short epoch; the run's folder and log."""
    output_dir = tmp_path_factory.mktemp("unireg")
    return output_dir, run_bundle(TRAIN, **train_overrides(entries, output_dir))


def test_training_with_conditions_priors_and_label_supervision(trained):
    output_dir, log = trained
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint.pt").is_file()
    state = read_checkpoint(output_dir)
    config = state["config"]
    assert config["input_size"] == [16, 16, 16] and config["channels"] == [4, 8, 8, 8]
    assert config["dynamic_head"] is True and config["feature_extractor"] is None
    assert config["tasks"] == ["head_neck", "chest", "abdomen", "liver", "brain", "pelvis"]
    assert state["sampler"]["datasets"] == ["BrainSynth", "ProstateMRUS"]
    (record,) = state["history"]
    assert record["epoch"] == 1 and record["dice"] > 0 and record["smoothness"] >= 0 and "learning_rate" not in record
    assert 0 < record["validation_dice"] <= 1  # one registration_val pair of each dataset, with its own condition
    assert "momentum_buffer" in str(state["optimizer"]["state"])  # SGD with momentum
    assert "BrainSynth (task brain, inter-subject), ProstateMRUS (task prostate (nearest region pelvis)" in log
    assert (
        "lambdas brain 1, pelvis 1; Dice (weight 1) on ['brain', 'pelvis']; lncc, sgd at 5e-05 (momentum 0.99)" in log
    )
    assert "validation on 2 registration_val pairs" in log and "epoch 1/1 iteration 2/2" in log


def test_inference_on_an_unseen_task_with_instance_optimisation(data, trained, tmp_path):
    """--task lung --reg_type intra: the nearest region (chest) conditions the network (paper Table 3)."""
    prostate = data["ProstateMRUS"]
    pair = load_learn2reg(prostate, "registration_val")[0]
    log = run_bundle(
        INFERENCE,
        dataset_json=prostate,
        **{"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:1]"},
        output_dir=tmp_path,
        weights=trained[0] / "model.pt",
        task="lung",
        reg_type="intra",
        io_iterations=2,
        **SMALL_NETWORK,
    )
    assert f"Restored all variables from {trained[0] / 'model.pt'}" in log
    assert "untrained" not in log
    assert "task lung (nearest region chest), intra-subject; instance optimisation: 2 steps of lncc + 1 x diff" in log
    assert "instance optimisation 2/2" in log
    folder = tmp_path / pair_name(pair)
    assert {path.name for path in folder.iterdir()} == {
        "ddf.nii.gz", "warped.nii.gz", "warped_label.nii.gz", "metrics.json", "overview.png"
    }  # fmt: skip
    field, fixed = nib.load(str(folder / "ddf.nii.gz")), nib.load(pair["fixed_image"])
    assert field.shape == (*fixed.shape, 1, 3) and np.isfinite(field.get_fdata()).all()
    np.testing.assert_allclose(field.affine, fixed.affine, atol=1e-4)
    assert np.abs(field.get_fdata()).max() > 0
    assert 0 <= json.loads((folder / "metrics.json").read_text())["dice_mean"] <= 1


def test_evaluation_table_per_dataset(data, entries, trained, tiny_dataset, tmp_path):
    """evaluate.yaml on the conformance test's tiny dataset (as abdomen, inter) and ProstateMRUS (prostate, intra)."""
    datasets = [{"json": str(tiny_dataset), "task": "abdomen", "reg_type": "inter"}, entries[1]]
    log = run_bundle(
        EVALUATE,
        datasets=str(datasets),
        max_pairs=1,
        output_dir=tmp_path,
        weights=trained[0] / "model.pt",
        **SMALL_NETWORK,
    )
    assert "ProstateMRUS: 1 registration_val pairs, task prostate (nearest region pelvis), intra-subject" in log
    for name, dataset in (("Tiny", tiny_dataset), ("ProstateMRUS", data["ProstateMRUS"])):
        (pair,) = load_learn2reg(dataset, "registration_val")[:1]
        field = nib.load(str(tmp_path / name / pair_name(pair) / "ddf.nii.gz"))
        assert field.shape == (*nib.load(pair["fixed_image"]).shape, 1, 3)
        with open(tmp_path / name / "metrics.csv", newline="") as handle:
            (row,) = list(csv.DictReader(handle))
        assert row["pair"] == pair_name(pair) and 0 < float(row["dice_mean"]) <= 1
    with open(tmp_path / "evaluation_table.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["dataset", "task", "reg_type", "pairs", "DSC (%)", "HD95 (mm)", "SDlogJ", "folding (%)"]
    assert [row[:4] for row in rows] == [
        ["Tiny", "abdomen", "inter", "1"],
        ["ProstateMRUS", "prostate (pelvis)", "intra", "1"],
    ]
    results = json.loads((tmp_path / "evaluation.json").read_text())
    assert results["method"] == "UniReg" and list(results["datasets"]) == ["Tiny", "ProstateMRUS"]
    for row, result in zip(rows, results["datasets"].values()):
        mean, spread = (float(value) for value in row[4].split(" ± "))
        assert mean == pytest.approx(result["dice_percent"]["mean"], abs=0.01) and 0 < mean <= 100 and spread == 0
        assert float(row[6]) >= 0 and 0 <= float(row[7]) <= 100 and result["hd95_mm"]["n"] == 1
    table = (tmp_path / "evaluation_table.md").read_text(encoding="utf-8")
    assert f"| {' | '.join(rows[1])} |" in table and "UniReg on the registration_val pairs" in table


def test_the_static_head_ablation_trains_in_process(entries, tmp_path, caplog):
    """--dynamic_head False (paper Table 6) through the config, run in-process: a static head, its own folder."""
    overrides = {
        "datasets": entries[:1],
        "output_dir": str(tmp_path),
        "epochs": 1,
        "pairs_per_dataset": 1,
        "max_validation_pairs": 0,
        "input_size": [16, 16, 16],
        "channels": [4, 8, 8, 8],
        "device": "cpu",
        "dynamic_head": False,
    }
    parser = parse(TRAIN, **overrides)
    assert parse(TRAIN, dynamic_head=False).get_parsed_content("output_dir") == f"{BUNDLE}/models/unireg_static_head"
    with caplog.at_level(logging.INFO, logger="unireg"):
        history = parser.get_parsed_content("training")
    assert "static head (ablation)" in caplog.text and len(history) == 1
    state = read_checkpoint(tmp_path)
    assert state["config"]["dynamic_head"] is False and not any("controller" in name for name in state["model"])


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)
def test_multi_gpu_train_on_two_cpu_processes(entries, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    overrides = train_overrides(entries, tmp_path, max_validation_pairs=0)
    log = run_bundle(MULTI_GPU_TRAIN, launcher=torchrun, **overrides)
    assert "process 0 of 2 (gloo) on cpu" in log and "process 1 of 2 (gloo) on cpu" in log
    assert "batch 1 per process on 2 processes" in log
    assert "epoch 1/1 iteration 2/2" in log  # a second synchronised step: every parameter got its gradient
    assert log.count("epoch 1/1 done") == 1  # rank 0 alone logs and writes the checkpoint
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt", "model.pt"]


def test_paper_defaults():
    train = parse(TRAIN)
    lambdas = {"head_neck": 0.05, "chest": 1.0, "abdomen": 0.1, "liver": 10.0, "brain": 1.0, "pelvis": 1.0}
    expected = {
        "lambdas": lambdas,
        "supervised_tasks": None,
        "dice_weight": 1.0,
        "similarity": "lncc",
        "optimizer": "sgd",
        "learning_rate": 5e-5,
        "momentum": 0.99,
        "batch_size": 1,
        "input_size": [192, 192, 160],
        "channels": [16, 32, 32, 32],
        "tasks": ["head_neck", "chest", "abdomen", "liver", "brain", "pelvis"],
        "dynamic_head": True,
        "feature_extractor": None,
        "ct_window": [-800, 400],
        "distributed": None,
    }
    assert {key: train.get_parsed_content(key) for key in expected} == expected
    assert train.get_parsed_content("output_dir") == f"{BUNDLE}/models/unireg"
    datasets = train.get_parsed_content("datasets")
    assert [(Path(d["json"]).name, d["task"], d["reg_type"]) for d in datasets] == [
        ("BrainSynth_dataset.json", "brain", "inter"),
        ("ProstateMRUS_dataset.json", "pelvis", "intra"),
    ]
    assert (
        Path(datasets[0]["json"]).resolve()
        == (PROJECT_ROOT / ".." / "shared" / "data" / "BrainSynth" / "BrainSynth_dataset.json").resolve()
    )
    assert train.get("training")["_target_"] == "monai_unireg.engines.unireg_workflows.train_workflow"
    assert parse(MULTI_GPU_TRAIN).get_parsed_content("distributed") is True
    inference = parse(INFERENCE)
    expected = {
        "weights": None,
        "task": "brain",
        "reg_type": "inter",
        "io_iterations": 0,
        "similarity": "lncc",
        "lambdas": lambdas,
        "ct_window": [-800, 400],
        "intensity_range": [-1, 1],
        "input_size": [192, 192, 160],
        "dynamic_head": True,
        "modality": "auto",
    }
    assert {key: inference.get_parsed_content(key) for key in expected} == expected
    cuda_when_available = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert inference.get_parsed_content("device") == train.get_parsed_content("device") == cuda_when_available
    evaluate = parse(EVALUATE, dataset_json="/data/X/X_dataset.json", task="liver", reg_type="intra")
    assert evaluate.get_parsed_content("datasets") == [
        {"json": "/data/X/X_dataset.json", "task": "liver", "reg_type": "intra"}
    ]


def test_bad_values_are_refused_on_the_command_line(entries, tmp_path):
    unknown = [{**entries[0], "task": "elbow"}]
    log = run_bundle(TRAIN, succeed=False, **train_overrides(unknown, tmp_path / "a"))
    assert "datasets[0]['task']: unknown task 'elbow'" in log and "give the nearest region" in log
    overrides = {"dataset_json": entries[0]["json"], "output_dir": tmp_path / "b", "reg_type": "longitudinal"}
    log = run_bundle(INFERENCE, succeed=False, **SMALL_NETWORK, **overrides)
    assert "reg_type must be one of" in log and "longitudinal" in log
    assert not any((tmp_path / name).exists() for name in "ab")


def test_dataset_entries_and_training_set_up_are_checked(entries, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = {"output_dir": tmp_path / "out", "device": "cpu", "input_size": 16, "channels": [4, 8, 8, 8]}
    brain = entries[0]
    cases = [
        ([{"json": brain["json"], "reg_type": "inter"}], r"datasets\[0\] .* has no \['task'\]"),
        ([{**brain, "reg_type": "longitudinal"}], r"datasets\[0\]\['reg_type'\] must be one of"),
        ([{**brain, "modality": "MR"}], r"unknown keys \['modality'\]"),
        ([brain["json"]], r"datasets\[0\] must be a mapping"),
        (brain["json"], "datasets must be a non-empty list"),
        ([brain, brain], "two entries are the same dataset"),
    ]
    with pytest.raises(ValueError, match="dynamic_head must be a bool, got 'false'"):  # YAML's false on the CLI
        train_unireg_workflow([brain], dynamic_head="false", **common)
    for datasets, message in cases:
        with pytest.raises(ValueError, match=message):
            train_unireg_workflow(datasets, **common)
    with pytest.raises(ValueError, match="no regularisation prior for the region 'brain'"):
        train_unireg_workflow([brain], lambdas={"chest": 1.0}, **common)
    with pytest.raises(ValueError, match=r"supervised_tasks\[0\]: unknown task 'elbow'"):
        train_unireg_workflow([brain], supervised_tasks=["elbow"], **common)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_unireg_workflow([brain], optimizer="rmsprop", **common)
    with pytest.raises(ValueError, match="not started by torchrun"):
        train_unireg_workflow([brain], distributed=True, **common)
    assert not (tmp_path / "out").exists()


def test_resuming_another_run_is_refused(entries, trained, tmp_path):
    common = {"output_dir": trained[0], "device": "cpu", "input_size": 16, "channels": [4, 8, 8, 8], "epochs": 2}
    with pytest.raises(ValueError, match=r"written for a network with dynamic_head=True.*--resume False"):
        train_unireg_workflow(entries, dynamic_head=False, **common)
    with pytest.raises(ValueError, match=r"trained on the datasets \['BrainSynth', 'ProstateMRUS'\].*--resume False"):
        train_unireg_workflow(entries[:1], **common)


def test_the_inference_network_with_and_without_weights(tmp_path, caplog):
    small = {"input_size": 16, "channels": [4, 8, 8, 8]}
    with caplog.at_level(logging.WARNING, logger="unireg"):
        network = build_unireg(None, **small)
    assert any(r.levelno == logging.WARNING and "untrained" in r.message for r in caplog.records)
    assert isinstance(network, UniReg) and network.input_size == (16, 16, 16)
    again = build_unireg(None, **small)  # the initial weights come from the seed
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values()))
    messages = []
    registration = unireg_registration(network, "kidney", "inter", io_iterations=1, log=messages.append)
    assert isinstance(registration, ResizedRegistration) and isinstance(registration.network, FieldOptimised)
    assert registration.network.smoothness == 0.1  # abdomen's prior (paper Table 8)
    assert messages[0].startswith("UniReg condition: task kidney (nearest region abdomen), inter-subject")
    moving, fixed = torch.rand(1, 1, 20, 24, 28), torch.rand(1, 1, 20, 24, 28)
    with torch.no_grad():
        assert registration.eval()(moving, fixed).shape == (1, 3, 20, 24, 28)
    static = UniReg((16, 24, 32), tasks=("chest", "liver"), channels=(4, 8, 8, 8), dynamic_head=False)
    torch.save({"config": static.config, "model": static.state_dict()}, tmp_path / "model.pt")
    loaded = build_unireg(tmp_path / "model.pt", **small, dynamic_head=True)  # the file's configuration wins
    assert loaded.input_size == (16, 24, 32) and loaded.config == static.config
    with pytest.raises(ValueError, match="unknown task 'brain'"):
        unireg_registration(loaded)  # the default task is not among this network's regions
    with pytest.raises(ValueError, match="no regularisation prior for the region 'liver'"):
        unireg_registration(loaded, "liver", "intra", io_iterations=1, lambdas={"chest": 1.0})
    prompt = PromptReg((16, 16, 16), num_domains=2, channels=2)
    torch.save({"config": prompt.config, "model": prompt.state_dict()}, tmp_path / "promptreg.pt")
    with pytest.raises(ValueError, match="not a UniReg checkpoint"):
        build_unireg(tmp_path / "promptreg.pt")
    with pytest.raises(ValueError, match="does not exist"):
        build_unireg(tmp_path / "missing.pt")


def test_the_evaluation_is_checked(data, tmp_path):
    network = build_unireg(None, input_size=16, channels=[4, 8, 8, 8])
    brain = {"json": str(data["BrainSynth"]), "task": "brain", "reg_type": "inter"}
    with pytest.raises(ValueError, match=r"datasets\[0\] .* has no \['reg_type'\]"):
        evaluate_unireg(network, [{"json": brain["json"], "task": "brain"}], tmp_path)
    ct = {"json": str(data["BrainSynth"].parents[1] / "CTTotalSeg" / "CTTotalSeg_dataset.json"), "task": "abdomen"}
    with pytest.raises(ValueError, match=r"datasets\[1\]: .*CTTotalSeg_dataset.json has no registration_val pairs"):
        evaluate_unireg(network, [brain, {**ct, "reg_type": "inter"}], tmp_path)
    with pytest.raises(ValueError, match="io_iterations"):
        evaluate_unireg(network, [brain], tmp_path, io_iterations=-1)
    assert not any(tmp_path.iterdir())


def test_a_feature_module_of_the_users_is_chosen_in_the_yaml(data, entries, tmp_path):
    """--feature_extractor names any module (here MIND-SSC built by a config expression, standing in for the paper's
    SAM); the trained model.pt records it and inference with the same module loads every key."""
    module = {"feature_extractor": "$monai_unireg.losses.MINDSSC(radius=1, dilation=1)", "extractor_channels": 12}
    output_dir = tmp_path / "train"
    run_bundle(TRAIN, **train_overrides(entries, output_dir, max_validation_pairs=0), **module)
    config = read_checkpoint(output_dir)["config"]
    assert config["feature_extractor"] == "module" and config["extractor_channels"] == 12 and config["correlation"]
    prostate = data["ProstateMRUS"]
    log = run_bundle(
        INFERENCE,
        dataset_json=prostate,
        **{"dataset#data": "$monai_unireg.engines.bundle.pair_items(@dataset_json, @section)[:1]"},
        output_dir=tmp_path / "inference",
        weights=output_dir / "model.pt",
        task="pelvis",
        reg_type="intra",
        **SMALL_NETWORK,
        **module,
    )
    assert f"Restored all variables from {output_dir / 'model.pt'}" in log
