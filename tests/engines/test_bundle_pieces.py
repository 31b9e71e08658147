"""The registration pieces of the bundles' configs (``monai_unireg.engines.bundle``, ``PairInput``,
``RegistrationIntensityd``, ``MethodDefaults``), in-process and tiny."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from monai_unireg.engines import METHOD_DEFAULTS
from monai_unireg.engines.bundle import (
    RandomState,
    ResizeInferer,
    check_overrides,
    check_settings,
    latest_checkpoint,
    prepare_pair_batch,
)
from monai_unireg.networks.nets import PairInput, SACBNet
from monai_unireg.transforms import RegistrationIntensityd


class _Sum(torch.nn.Module):
    """A registration 'network' whose field is moving + fixed in every component (to see the channel split)."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return (moving - 2 * fixed).expand(-1, 3, *moving.shape[2:]) * scale


def test_pair_input_splits_the_channels_and_keeps_the_state_dict():
    network = PairInput(_Sum(), {"scale": 2.0})
    image = torch.stack([torch.full((4, 4, 4), 3.0), torch.full((4, 4, 4), 1.0)])[None]
    assert torch.equal(network(image), torch.full((1, 3, 4, 4, 4), 2.0))
    with pytest.raises(ValueError, match="even number of channels"):
        network(torch.rand(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        PairInput(lambda m, f: m)
    sacbnet = SACBNet((16, 16, 16), channels=[2, 4, 4, 4, 4], num_clusters=2)
    wrapped = PairInput(sacbnet)
    assert list(wrapped.state_dict()) == list(sacbnet.state_dict())  # no "network." prefix
    wrapped.load_state_dict(sacbnet.state_dict(), strict=True)


def test_resize_inferer_brings_the_field_back_to_the_input_grid():
    seen = []

    def network(image: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(image.shape[2:]))
        return torch.ones(image.shape[0], 3, *image.shape[2:])

    field = ResizeInferer((16, 16, 16))(torch.rand(1, 2, 9, 17, 33), network)
    assert seen == [(16, 16, 16)] and field.shape == (1, 3, 9, 17, 33)
    assert torch.allclose(field[0, :, 0, 0, 0], torch.tensor([8 / 15, 16 / 15, 32 / 15]))  # voxels of the input
    assert ResizeInferer(None)(torch.rand(1, 2, 5, 5, 5), network).shape == (1, 3, 5, 5, 5)


def test_prepare_pair_batch():
    batch = {"moving_image": torch.zeros(1, 1, 2, 2, 2), "fixed_image": torch.ones(1, 1, 2, 2, 2)}
    image, pair = prepare_pair_batch(batch, "cpu")
    assert (
        image.shape == (1, 2, 2, 2, 2) and torch.equal(image[:, 1:], pair["fixed"]) and set(pair) == {"moving", "fixed"}
    )
    labelled = {**batch, "moving_label": torch.zeros(1, 1, 2, 2, 2), "fixed_label": torch.ones(1, 1, 2, 2, 2)}
    assert set(prepare_pair_batch(labelled, "cpu")[1]) == {"moving", "fixed", "moving_label", "fixed_label"}
    with pytest.raises(ValueError, match="'fixed_image'"):
        prepare_pair_batch({"moving_image": batch["moving_image"]}, "cpu")


def test_random_state_round_trip_and_latest_checkpoint(tmp_path):
    state = RandomState()
    path = tmp_path / "state.pt"
    torch.save(state.state_dict(), path)
    expected = (torch.rand(2), np.random.rand(), random.random())
    state.load_state_dict(torch.load(path, weights_only=True))  # what CheckpointLoader reads
    assert (
        torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]
    )
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "absent") is None
    for epoch in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").touch()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")
    assert latest_checkpoint(tmp_path, resume=False) is None


def test_misspelt_overrides_and_wrong_kinds_are_refused_naming_the_key(tmp_path):
    config = tmp_path / "inference.yaml"
    config.write_text("dataset_json: a.json\nnetwork:\n  channels: 4\n")
    argv = ["monai.bundle", "run", "--config_file", str(config), "--meta_file", "m.json"]
    check_overrides([*argv, "--dataset_json", "b.json", "--network#channels", "8", "--_meta_#x", "1"])
    with pytest.raises(ValueError, match=r"--dataset_jsn is not a key .* did you mean 'dataset_json'"):
        check_overrides([*argv, "--dataset_jsn", "b.json"])
    check_overrides(["pytest", "--dataset_jsn"])  # not monai.bundle run: nothing to check
    check_settings(epochs=(3, "positive_int"), cap=(None, "positive_int?"), size=([16, 32, 16], "size"))
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1, got 'ten'"):
        check_settings(epochs=("ten", "positive_int"))
    with pytest.raises(ValueError, match="input_size must be one size or a list of sizes"):
        check_settings(input_size=([16, "x"], "size"))
    with pytest.raises(ValueError, match="resume must be True or False"):
        check_settings(resume=("yes", "bool"))


def test_registration_intensity_and_the_method_defaults():
    ct, mri = torch.full((1, 4, 4, 4), -1000.0), torch.arange(64.0).reshape(1, 4, 4, 4)
    ct[0, 0] = 1000.0
    out = RegistrationIntensityd(["a", "b"], ct_window=(-1000, 1000), output_range=(-1, 1))({"a": ct, "b": mri})
    assert float(out["a"].min()) == -1 and float(out["a"].max()) == 1  # CT: the HU window
    assert float(out["b"].min()) == -1 and float(out["b"].max()) == 1  # MRI: [min, 99th percentile]
    with pytest.raises(ValueError, match="modality"):
        RegistrationIntensityd(["a"], modality="us")
    assert set(METHOD_DEFAULTS) == {"voxelopt", "unigradicon", "sacbnet", "promptreg", "unireg"}
    assert METHOD_DEFAULTS["unireg"].ct_window == (-800.0, 400.0) and METHOD_DEFAULTS["unireg"].intensity_range == (
        -1,
        1,
    )
    assert (
        METHOD_DEFAULTS["sacbnet"].working_size == (160, 192, 224) and METHOD_DEFAULTS["voxelopt"].load_weights is None
    )


def test_validation_pairs_must_have_labels(shared_data, tmp_path):
    import shutil

    from monai_unireg.engines import load_validation_pairs

    brainsynth = shared_data / "BrainSynth" / "BrainSynth_dataset.json"
    assert len(load_validation_pairs(brainsynth, max_pairs=2)) == 2 and load_validation_pairs(None) == []
    unlabelled = tmp_path / "imagesTr"
    unlabelled.mkdir()
    for name in ("a", "b"):
        shutil.copy(brainsynth.parent / "imagesTr" / "BrainSynth_0001_0000.nii.gz", unlabelled / f"{name}.nii.gz")
    json_path = tmp_path / "Unlabelled_dataset.json"
    json_path.write_text(
        '{"name": "Unlabelled", "training": [], "numRegistration_val": 1, '
        '"registration_val": [{"fixed": "./imagesTr/a.nii.gz", "moving": "./imagesTr/b.nii.gz"}]}'
    )
    with pytest.raises(ValueError, match="validation_json .* lacks a label map"):
        load_validation_pairs(json_path)


def test_network_config_entry_and_gathered_rows():
    from monai_unireg.engines.bundle import NetworkConfig, gather_rows
    from monai_unireg.networks.nets import PairInput

    class Configured(torch.nn.Module):
        config = {"input_size": [32, 32, 32], "channels": 4, "temperature": 0.1}

    entry = NetworkConfig(PairInput(Configured()))  # found through the wrapper
    assert entry.state_dict() == {"input_size": [32, 32, 32], "channels": 4, "temperature": 0.1}
    entry.load_state_dict(entry.state_dict())
    with pytest.raises(ValueError, match=r"written for a network with temperature=0.5 \(now 0.1\)"):
        entry.load_state_dict({**entry.state_dict(), "temperature": 0.5})
    with pytest.raises(ValueError, match="network must have a config dict"):
        NetworkConfig(torch.nn.Linear(2, 2))
    rows = [{"pair": "a"}, {"pair": "b"}]
    assert gather_rows(rows) == rows  # no process group: the rows themselves
