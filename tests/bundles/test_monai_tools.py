"""MONAI's own bundle tools on every bundle, in-process and on tiny networks (32^3):

- ``ConfigWorkflow(...).check_properties()``: every required property of MONAI's inference workflow (and, for the
  bundles that train with MONAI parts, of its train workflow) is present;
- ``verify_net_in_out``: ``network_def`` takes the 2-channel ``[moving, fixed]`` ``image`` of the metadata and gives
  the 3-channel ``pred``;
- ``ckpt_export`` (traced) of the learned networks: the TorchScript gives the eager network's field (max |diff| <=
  1e-4 voxel) and a trained ``model.pt`` loads into the config's network with every key matched, strictly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLES = PROJECT_ROOT / "bundles"
#: Settings of a network small enough for a CPU test, per bundle (config ids of inference.yaml).
SMALL = {
    "sacbnet": {"input_size": [32, 32, 32], "channels": [4, 8, 8, 8, 8], "num_clusters": 3, "kmeans_iterations": 3},
    "unigradicon": {"input_size": 32, "down_channels": [4, 8, 8], "up_channels": [4, 8, 8]},
    "promptreg": {"input_size": [32, 32, 32], "channels": 4},
    "unireg": {"input_size": [32, 32, 32], "channels": [4, 8, 8, 8]},
    "voxelopt": {"num_levels": 2},
}
LEARNED = ("sacbnet", "unigradicon", "promptreg", "unireg")
TINY_SHAPE = [32, 32, 32]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bundle_conformance", PROJECT_ROOT / "tests" / "test_bundles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_dataset(tmp_path_factory.mktemp("tiny_learn2reg"))


def configs(method: str, name: str = "inference.yaml") -> dict[str, str]:
    folder = BUNDLES / method / "configs"
    return {"config_file": str(folder / name), "meta_file": str(folder / "metadata.json")}


@pytest.mark.parametrize("method", sorted(SMALL))
def test_inference_workflow_properties(method, tiny_dataset):
    workflow = ConfigWorkflow(
        workflow_type="inference",
        bundle_root=str(BUNDLES / method),
        dataset_json=str(tiny_dataset),
        **configs(method),
        **SMALL[method],
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    for name in ("bundle_root", "device", "dataset_dir", "dataset", "evaluator", "network_def", "inferer"):
        assert getattr(workflow, name) is not None, name


#: Bundles that train: every train.yaml is made of MONAI parts (SupervisedTrainer & co.).
MONAI_TRAINING = ("promptreg", "sacbnet", "unigradicon", "unireg")


def _training_data(method: str, dataset: Path) -> dict:
    """The train.yaml settings naming ``dataset`` as the training and validation data."""
    if method == "unireg":  # datasets with their conditions; every dataset validated
        return {"datasets": [{"json": str(dataset), "task": "abdomen", "reg_type": "inter"}]}
    return {"datasets": [str(dataset)], "validation_json": str(dataset)}


@pytest.mark.parametrize("method", MONAI_TRAINING)
def test_train_workflow_properties(method, tiny_dataset, tmp_path):
    workflow = ConfigWorkflow(
        workflow_type="train",
        bundle_root=str(BUNDLES / method),
        output_dir=str(tmp_path),
        **_training_data(method, tiny_dataset),
        **configs(method, "train.yaml"),
        **SMALL[method],
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    for name in ("trainer", "max_epochs", "train_dataset", "train_inferer", "evaluator", "val_interval"):
        assert getattr(workflow, name) is not None, name


@pytest.mark.parametrize("method", sorted(SMALL))
def test_verify_net_in_out(method):
    shape = {"_meta_#network_data_format#inputs#image#spatial_shape": TINY_SHAPE}
    verify_net_in_out(net_id="network_def", device="cpu", **configs(method), **SMALL[method], **shape)


def _parse(method: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs(method)["config_file"])
    parser.update({"bundle_root": str(BUNDLES / method), "device": "$torch.device('cpu')", **overrides})
    return parser


@pytest.mark.parametrize("method", LEARNED)
def test_ckpt_export_gives_the_eager_field_and_weights_load_strictly(method, tiny_dataset, tmp_path):
    torch.manual_seed(0)
    network = _parse(method, **SMALL[method]).get_parsed_content("network_def").eval()
    for parameter in network.parameters():  # non-trivial weights (some heads start at zero)
        parameter.data.add_(torch.randn_like(parameter) * 1e-2)
    weights = tmp_path / "model.pt"
    torch.save({"model": network.state_dict()}, weights)  # the trainers' model.pt layout
    exported = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(weights),
        key_in_ckpt="model",
        use_trace=True,
        input_shape=[1, 2, *TINY_SHAPE],
        bundle_root=str(BUNDLES / method),
        **configs(method),
        **SMALL[method],
    )
    scripted = torch.jit.load(str(exported))
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 2, *TINY_SHAPE, generator=generator)
    image[:, 1] = torch.roll(image[:, 0], shifts=2, dims=1)  # a pair with something to register
    with torch.no_grad():
        eager, traced = network(image), scripted(image)
    assert traced.shape == eager.shape == (1, 3, *TINY_SHAPE)
    difference = float((traced - eager).abs().max())
    print(f"{method}: ckpt_export max |traced - eager| = {difference:.3g} voxel")
    assert difference <= 1e-4

    # the config's network takes the file with every key matched; a missing key fails loudly
    data = {"dataset_json": str(tiny_dataset), "weights": str(weights)}
    parser = _parse(method, **data, **SMALL[method])
    loaded = parser.get_parsed_content("network")
    loader = parser.get_parsed_content("handlers")[0]
    loader(parser.get_parsed_content("evaluator"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), network.state_dict().values()))
    state = network.state_dict()
    state.pop(next(iter(state)))
    torch.save({"model": state}, weights)
    parser = _parse(method, **data, **SMALL[method])
    with pytest.raises(RuntimeError, match="Missing key"):
        parser.get_parsed_content("handlers")[0](parser.get_parsed_content("evaluator"))


def test_voxelopt_has_no_weights_to_load():
    assert _parse("voxelopt").get_parsed_content("handlers")[0] is None
