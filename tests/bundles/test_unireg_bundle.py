"""The UniReg bundle beyond the conformance test, each config run as a user would, with ``python -m monai.bundle
run`` (and ``torchrun`` for the multi-GPU configs), on the shared datasets with a 16^3 network: training on BrainSynth
(brain, inter-subject) and ProstateMRUS (given as the alias prostate, intra-subject) with label supervision and
per-dataset validation, bit-exact resumption after a kill, swapping the optimiser, a transform and a handler (and the
static-head ablation with a feature module of the user's), inference with the trained weights on an unseen task
(lung -> chest) with instance optimisation, evaluate.yaml's per-dataset table (ProstateMRUS and a tiny generated
dataset), two-process training and evaluation, the paper's geometry (2 mm, 192x192x160, RAI) in training and
inference, the paper's defaults and refused values; plus the method's pieces in-process (conditioned registration,
dataset entries, objective set-up)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import TORCHRUN, BundleRunner, assert_same_weights, final_weights, read_checkpoint

from monai_unireg import io
from monai_unireg.data import load_learn2reg, pair_name
from monai_unireg.engines import unireg_objective, unireg_registration
from monai_unireg.engines.bundle import NetworkConfig
from monai_unireg.engines.instance_optimisation import FieldOptimised
from monai_unireg.engines.unireg import dataset_entries
from monai_unireg.networks.nets import PromptReg, ResizedRegistration, UniReg, load_unireg

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = PROJECT_ROOT / "bundles" / "unireg"
_RUNNER = BundleRunner(BUNDLE)
run_bundle = _RUNNER.run
parse = _RUNNER.parse
TRAIN = ["configs/train.yaml"]
MULTI_GPU_TRAIN = ["configs/train.yaml", "configs/multi_gpu_train.yaml"]
INFERENCE = ["configs/inference.yaml"]
EVALUATE = ["configs/inference.yaml", "configs/evaluate.yaml"]
#: A network small enough for a CPU test: 16^3 working size, encoder channels 4, 8, 8, 8.
SMALL_NETWORK = {"input_size": "[16, 16, 16]", "channels": "[4, 8, 8, 8]"}
GLOO = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torchrun needs torch.distributed with the Gloo backend for CPU processes",
)


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
    """Small, quick training (2 random pairs per dataset, 2 iterations per epoch, 1 validation pair per dataset)."""
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
    """train.yaml on BrainSynth and ProstateMRUS for two short epochs; the run's folder and log."""
    output_dir = tmp_path_factory.mktemp("unireg")
    return output_dir, run_bundle(TRAIN, **train_overrides(entries, output_dir, epochs=2))


def test_training_with_conditions_priors_label_supervision_and_validation(trained):
    output_dir, log = trained
    assert (output_dir / "model.pt").is_file() and (output_dir / "checkpoint_epoch=2.pt").is_file()
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard is on by default
    assert "train_loss: " in log and "val_dice" in log and "Saved checkpoint at epoch: 2" in log
    assert "ProstateMRUS: 1 labelled registration_val pairs, task prostate (nearest region pelvis), intra" in log
    model = torch.load(output_dir / "model.pt", map_location="cpu", weights_only=True)
    config = model["config"]  # the network's configuration beside its weights: load_unireg rebuilds it
    assert config["input_size"] == [16, 16, 16] and config["channels"] == [4, 8, 8, 8]
    assert config["dynamic_head"] is True and config["feature_extractor"] is None
    assert load_unireg(output_dir / "model.pt").tasks == ("head_neck", "chest", "abdomen", "liver", "brain", "pelvis")
    state = read_checkpoint(output_dir)
    assert state["pairs"]["datasets"] == ["BrainSynth", "ProstateMRUS"] and state["trainer"]["iteration"] == 4
    backbone, head = state["optimizer"]["param_groups"]  # SGD with momentum 0.99, the head at 30x the rate
    assert (backbone["lr"], head["lr"], head["momentum"]) == (5e-5, 30 * 5e-5, 0.99)
    assert "momentum_buffer" in str(state["optimizer"]["state"]) and state["lr_scheduler"]["last_epoch"] == 2


def test_resume_after_a_kill_is_bit_exact(entries, trained, tmp_path):
    """Killed right after the first epoch's checkpoint (os._exit, no clean-up), the same command again finishes
    the run: the network equals the uninterrupted run's bit for bit."""
    output_dir = tmp_path / "killed"
    overrides = train_overrides(entries, output_dir, epochs=2)
    _RUNNER.resume_after_a_kill(TRAIN, overrides, output_dir)
    assert_same_weights(final_weights(output_dir), final_weights(trained[0]))
    # resuming with other network settings is refused, naming them (the checkpoint's first entry, NetworkConfig)
    static = NetworkConfig(UniReg((16, 16, 16), channels=(4, 8, 8, 8), dynamic_head=False))
    with pytest.raises(ValueError, match=r"written for a network with dynamic_head=True \(now False\).*--resume False"):
        static.load_state_dict(read_checkpoint(output_dir)["config"])


def test_swapping_the_optimiser_a_transform_and_a_handler_with_a_static_head_and_a_feature_module(data, tmp_path):
    """One run: Adam instead of SGD, MONAI's ScaleIntensityd instead of ours, a handler's tag, TensorBoard off, the
    Table 6 static head and a feature module of the user's (MIND-SSC by a config expression, standing in for the
    paper's SAM); inference.yaml with the same module then loads every key of its model.pt."""
    output_dir = tmp_path / "swapped"
    brain = [{"json": str(data["BrainSynth"]), "task": "brain", "reg_type": "inter"}]
    module = {"feature_extractor": "$monai_unireg.losses.MINDSSC(radius=1, dilation=1)", "extractor_channels": 12}
    overrides = train_overrides(brain, output_dir, max_iterations_per_epoch=1, max_validation_pairs=0, **module)
    overrides["optimizer"] = (
        "{'_target_': 'torch.optim.Adam', 'params': '$@network.parameters()', 'lr': '@learning_rate'}"
    )
    overrides["train#preprocessing#transforms#2"] = (
        "{'_target_': 'ScaleIntensityd', 'keys': ['fixed_image', 'moving_image'], 'minv': -1.0, 'maxv': 1.0}"
    )
    overrides["train#handlers#3#tag_name"] = "objective"
    overrides["tensorboard"] = False
    overrides["dynamic_head"] = False
    log = run_bundle(TRAIN, **overrides)
    assert "objective: " in log and "train_loss" not in log and "val_dice" not in log
    state = read_checkpoint(output_dir)
    assert "betas" in state["optimizer"]["param_groups"][0] and not (output_dir / "tensorboard").exists()
    config = state["config"]
    assert config["dynamic_head"] is False and config["feature_extractor"] == "module" and config["correlation"]
    assert not any("controller" in name for name in state["model"])
    transforms = parse(TRAIN, **{"train#preprocessing#transforms#2": {"_target_": "ScaleIntensityd", "keys": ["x"]}})
    assert type(transforms.get_parsed_content("train#preprocessing").transforms[2]).__name__ == "ScaleIntensityd"
    assert parse(TRAIN, dynamic_head=False).get_parsed_content("output_dir") == f"{BUNDLE}/models/unireg_static_head"
    small = {"input_size": [16, 16, 16], "channels": [4, 8, 8, 8], "dynamic_head": False, **module}
    inference = parse(INFERENCE, weights=str(output_dir / "model.pt"), device="$torch.device('cpu')", **small)
    import ignite.engine

    inference.get_parsed_content("checkpoint_loader")(ignite.engine.Engine(lambda engine, batch: None))  # strict


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
    assert f"Restored all variables from {trained[0] / 'model.pt'}" in log and "untrained" not in log
    assert "task lung (nearest region chest), intra-subject; instance optimisation: 2 steps of lncc + 1 x diff" in log
    folder = tmp_path / pair_name(pair)
    assert {path.name for path in folder.iterdir()} == {
        "ddf.nii.gz", "warped.nii.gz", "warped_label.nii.gz", "metrics.json", "overview.png"
    }  # fmt: skip
    field, fixed = nib.load(str(folder / "ddf.nii.gz")), nib.load(pair["fixed_image"])
    assert field.shape == (*fixed.shape, 1, 3) and np.isfinite(field.get_fdata()).all()
    np.testing.assert_allclose(field.affine, fixed.affine, atol=1e-4)
    assert np.abs(field.get_fdata()).max() > 0
    assert 0 <= json.loads((folder / "metrics.json").read_text())["dice_mean"] <= 1


def _check_table(output_dir: Path, datasets: list[tuple[str, Path, int]]) -> None:
    """The per-dataset metrics.csv and the Table 2 files of evaluate.yaml (name, json and pairs of each dataset)."""
    for name, dataset, pairs in datasets:
        expected = [pair_name(pair) for pair in load_learn2reg(dataset, "registration_val")[:pairs]]
        for pair in load_learn2reg(dataset, "registration_val")[:pairs]:
            field = nib.load(str(output_dir / name / pair_name(pair) / "ddf.nii.gz"))
            assert field.shape == (*nib.load(pair["fixed_image"]).shape, 1, 3)
        with open(output_dir / name / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["pair"] for row in rows] == expected and all(0 < float(row["dice_mean"]) <= 1 for row in rows)
    with open(output_dir / "evaluation_table.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["dataset", "task", "reg_type", "pairs", "DSC (%)", "HD95 (mm)", "SDlogJ", "folding (%)"]
    results = json.loads((output_dir / "evaluation.json").read_text())
    assert list(results["datasets"]) == [name for name, _, _ in datasets]
    for row, result, (_, _, pairs) in zip(rows, results["datasets"].values(), datasets):
        mean = float(row[4].split(" ± ")[0])
        assert mean == pytest.approx(result["dice_percent"]["mean"], abs=0.01) and 0 < mean <= 100
        assert float(row[6]) >= 0 and 0 <= float(row[7]) <= 100 and result["hd95_mm"]["n"] == result["pairs"] == pairs


def test_evaluation_table_per_dataset(data, entries, trained, tiny_dataset, tmp_path):
    """evaluate.yaml on the conformance test's tiny dataset (as abdomen, inter) and ProstateMRUS (prostate, intra)."""
    datasets = [{"json": str(tiny_dataset), "task": "abdomen", "reg_type": "inter"}, entries[1]]
    overrides = {"datasets": str(datasets), "max_pairs": 1, "output_dir": tmp_path, "weights": trained[0] / "model.pt"}
    log = run_bundle(EVALUATE, **overrides, **SMALL_NETWORK)
    assert "ProstateMRUS: 1 registration_val pairs, task prostate (nearest region pelvis), intra-subject" in log
    _check_table(tmp_path, [("Tiny", tiny_dataset, 1), ("ProstateMRUS", data["ProstateMRUS"], 1)])
    with open(tmp_path / "evaluation_table.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    assert [row[:4] for row in rows] == [
        ["Tiny", "abdomen", "inter", "1"],
        ["ProstateMRUS", "prostate (pelvis)", "intra", "1"],
    ]
    assert json.loads((tmp_path / "evaluation.json").read_text())["method"] == "UniReg"
    table = (tmp_path / "evaluation_table.md").read_text(encoding="utf-8")
    assert f"| {' | '.join(rows[1])} |" in table and "UniReg on the registration_val pairs" in table


@GLOO
def test_multi_gpu_train_on_two_cpu_processes(entries, tmp_path):
    overrides = train_overrides(entries, tmp_path, max_iterations_per_epoch=None, max_validation_pairs=0)
    log = run_bundle(MULTI_GPU_TRAIN, launcher=TORCHRUN, backend="gloo", **overrides)
    # 4 pairs over 2 processes: 2 synchronised steps each; rank 0 alone logs the loss and writes the checkpoint
    assert log.count("Iter: 2/2 -- train_loss") == 1 and log.count("Saved checkpoint at epoch: 1") == 1
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["checkpoint_epoch=1.pt", "model.pt"]
    assert read_checkpoint(tmp_path)["trainer"]["iteration"] == 2


@GLOO
def test_multi_gpu_evaluate_on_two_cpu_processes(data, tiny_dataset, trained, tmp_path):
    """3 pairs (2 Tiny + 1 ProstateMRUS) over 2 processes: each writes its pairs' folders, rank 0 the tables."""
    datasets = [{"json": str(tiny_dataset), "task": "abdomen", "reg_type": "inter"},
                {"json": str(data["ProstateMRUS"]), "task": "pelvis", "reg_type": "intra"}]  # fmt: skip
    configs = [*EVALUATE, "configs/multi_gpu_evaluate.yaml"]
    subset = {"dataset#data": f"$({parse(EVALUATE).get('dataset#data')[1:]})[:3]"}
    overrides = {"datasets": str(datasets), "output_dir": tmp_path, "weights": trained[0] / "model.pt"}
    run_bundle(configs, launcher=TORCHRUN, backend="gloo", **subset, **overrides, **SMALL_NETWORK)
    _check_table(tmp_path, [("Tiny", tiny_dataset, 2), ("ProstateMRUS", data["ProstateMRUS"], 1)])


def _phantom(path: Path, affine: np.ndarray, shape=(30, 34, 26)) -> None:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    image = (np.linalg.norm(grid - 0.1, axis=0) < 0.7).astype(np.float32) + 0.1 * grid[0]
    io.save_nifti(image, affine, path)


def test_the_papers_geometry_in_training_and_inference(tiny_dataset, tmp_path):
    """geometry: paper: a 1.5 mm phantom stored LPS (and one stored RAS) comes out at 2 mm, 192x192x160, oriented
    LPS (ITK's RAI, the paper's); inference with it writes the field on the input grid."""
    lps, ras = np.diag([-1.5, -1.5, 1.5, 1.0]), np.diag([1.5, 1.5, 1.5, 1.0])
    for name, affine in (("lps", lps), ("ras", ras)):
        _phantom(tmp_path / f"{name}.nii.gz", affine)
    tiny = [{"json": str(tiny_dataset), "task": "abdomen", "reg_type": "inter"}]
    preprocessing = parse(TRAIN, geometry="paper", datasets=tiny).get_parsed_content("train#preprocessing")
    preprocessing = preprocessing.transforms[:4]  # reading, intensities and the geometry
    from monai.transforms import Compose

    for name in ("lps", "ras"):
        path = str(tmp_path / f"{name}.nii.gz")
        item = Compose(preprocessing)({"fixed_image": path, "moving_image": path})
        image = item["fixed_image"]
        assert tuple(image.shape) == (1, 192, 192, 160)
        affine = np.asarray(image.affine)
        assert nib.aff2axcodes(affine) == ("L", "P", "S")
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
        assert float(image.min()) == -1.0  # padded with the background of [-1, 1]
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for side in ("fixed", "moving"):
        _phantom(pairs / f"case_{side}.nii.gz", ras, (28, 30, 24))
    overrides = {"pairs_dir": str(pairs), "output_dir": str(tmp_path / "out"), "geometry": "paper",
                 "input_size": [16, 24, 16], "channels": [4, 8, 8, 8], "device": "$torch.device('cpu')"}  # fmt: skip
    parser = parse(INFERENCE, **overrides)
    parser.get_parsed_content("evaluator").run()
    field = nib.load(str(tmp_path / "out" / "case_fixed__case_moving" / "ddf.nii.gz"))
    assert field.shape == (28, 30, 24, 1, 3) and np.isfinite(field.get_fdata()).all()
    np.testing.assert_allclose(field.affine, ras, atol=1e-5)


def test_paper_defaults():
    train = parse(TRAIN)
    lambdas = {"head_neck": 0.05, "chest": 1.0, "abdomen": 0.1, "liver": 10.0, "brain": 1.0, "pelvis": 1.0}
    expected = {
        "lambdas": lambdas,
        "supervised_tasks": None,
        "dice_weight": 1.0,
        "similarity": "lncc",
        "learning_rate": 5e-5,
        "momentum": 0.99,
        "batch_size": 1,
        "input_size": [192, 192, 160],
        "channels": [16, 32, 32, 32],
        "tasks": ["head_neck", "chest", "abdomen", "liver", "brain", "pelvis"],
        "dynamic_head": True,
        "feature_extractor": None,
        "ct_window": [-800, 400],
        "intensity_range": [-1, 1],
        "geometry": "resize",
        "paper_spacing": [2.0, 2.0, 2.0],
        "paper_orientation": "LPS",
        "tensorboard": True,
        "mlflow": False,
    }
    assert {key: train.get_parsed_content(key) for key in expected} == expected
    assert train.get_parsed_content("output_dir") == f"{BUNDLE}/models/unireg"
    assert train.get("train")["trainer"]["_target_"] == "SupervisedTrainer"
    assert train.get("optimizer")["_target_"] == "torch.optim.SGD"
    datasets = train.get_parsed_content("datasets")
    assert [(Path(d["json"]).name, d["task"], d["reg_type"]) for d in datasets] == [
        ("BrainSynth_dataset.json", "brain", "inter"),
        ("ProstateMRUS_dataset.json", "pelvis", "intra"),
    ]
    assert (
        Path(datasets[0]["json"]).resolve()
        == (PROJECT_ROOT / ".." / "shared" / "data" / "BrainSynth" / "BrainSynth_dataset.json").resolve()
    )
    assert parse(MULTI_GPU_TRAIN).get("network")["_target_"] == "torch.nn.parallel.DistributedDataParallel"
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
        "geometry": "resize",
    }
    assert {key: inference.get_parsed_content(key) for key in expected} == expected
    cuda_when_available = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert inference.get_parsed_content("device") == train.get_parsed_content("device") == cuda_when_available
    evaluate = parse(EVALUATE, dataset_json="/data/X/X_dataset.json", task="liver", reg_type="intra")
    assert evaluate.get_parsed_content("datasets") == [
        {"json": "/data/X/X_dataset.json", "task": "liver", "reg_type": "intra"}
    ]


def test_bad_overrides_are_refused(entries, tmp_path):
    log = run_bundle(TRAIN, succeed=False, **train_overrides([{**entries[0], "task": "elbow"}], tmp_path / "a"))
    assert "datasets[0]['task']: unknown task 'elbow'" in log and "give the nearest region" in log
    log = run_bundle(TRAIN, succeed=False, pairs_per_datset=3, epochs="ten", output_dir=tmp_path / "a")
    assert "--pairs_per_datset is not a key of the bundle's configs" in log and "'pairs_per_dataset'" in log
    assert not (tmp_path / "a").exists()
    for key, value, message in (
        ("epochs", "ten", "epochs must be a whole number >= 1, got 'ten'"),
        ("dynamic_head", "false", "dynamic_head must be True or False, got 'false'"),
        ("geometry", "native", "geometry must be one of"),
        ("momentum", None, "momentum must be a number, got None"),
    ):
        assert message in refused(parse(TRAIN, **{key: value}), "checks")
    inference = parse(INFERENCE, reg_type="longitudinal", device="$torch.device('cpu')", input_size=[16, 16, 16])
    assert "reg_type must be one of" in refused(inference, "registration_network")


def refused(parser, config_id: str) -> str:
    """The message of the ValueError that resolving ``config_id`` raised (MONAI wraps it in a RuntimeError)."""
    with pytest.raises(RuntimeError) as caught:
        parser.get_parsed_content(config_id)
    error = caught.value
    while not isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ValueError), caught.value
    return str(error)


def test_dataset_entries_and_the_objective_are_checked(entries):
    network = UniReg((16, 16, 16), channels=(4, 8, 8, 8))
    brain = entries[0]
    cases = [
        ([{"json": brain["json"], "reg_type": "inter"}], r"datasets\[0\] .* has no \['task'\]"),
        ([{**brain, "reg_type": "longitudinal"}], r"datasets\[0\]\['reg_type'\] must be one of"),
        ([{**brain, "modality": "MR"}], r"unknown keys \['modality'\]"),
        ([brain["json"]], r"datasets\[0\] must be a mapping"),
        (brain["json"], "datasets must be a non-empty list"),
        ([brain, brain], "two entries are the same dataset"),
    ]
    for datasets, message in cases:
        with pytest.raises(ValueError, match=message):
            dataset_entries(datasets, network)
    with pytest.raises(ValueError, match="no regularisation prior for the region 'brain'"):
        unireg_objective(network, [brain], lambdas={"chest": 1.0})
    with pytest.raises(ValueError, match=r"supervised_tasks\[0\]: unknown task 'elbow'"):
        unireg_objective(network, [brain], supervised_tasks=["elbow"])
    objective = unireg_objective(network, entries)  # the datasets' regions, supervised by default
    assert objective.lambdas == {"brain": 1.0, "pelvis": 1.0} and objective.supervised == {"brain", "pelvis"}


def test_the_conditioned_inference_network(tmp_path):
    network = UniReg((16, 16, 16), channels=(4, 8, 8, 8))
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
    loaded = load_unireg(tmp_path / "model.pt")  # the file's configuration
    assert loaded.input_size == (16, 24, 32) and loaded.config == static.config
    with pytest.raises(ValueError, match="unknown task 'brain'"):
        unireg_registration(loaded)  # the default task is not among this network's regions
    with pytest.raises(ValueError, match="no regularisation prior for the region 'liver'"):
        unireg_registration(loaded, "liver", "intra", io_iterations=1, lambdas={"chest": 1.0})
    prompt = PromptReg((16, 16, 16), num_domains=2, channels=2)
    torch.save({"config": prompt.config, "model": prompt.state_dict()}, tmp_path / "promptreg.pt")
    with pytest.raises(ValueError, match="not a UniReg checkpoint"):
        load_unireg(tmp_path / "promptreg.pt")
