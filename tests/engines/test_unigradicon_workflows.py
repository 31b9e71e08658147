"""The uniGradICON bundle's training workflow in-process: the training set-up's refusals, and one distributed
(Gloo, single-process) training step. (The inference network is built by inference.yaml from MONAI parts, see
tests/bundles/test_monai_tools.py.)"""

from __future__ import annotations

import logging
import shutil
import socket

import pytest
import torch
import torch.distributed as dist

from monai_unireg.engines import load_validation_pairs, train_workflow
from monai_unireg.networks.nets import UniGradICON

SMALL = {"input_size": 32, "down_channels": [4, 8, 8], "up_channels": [4, 8, 8]}


@pytest.fixture()
def brainsynth(shared_data):
    return shared_data / "BrainSynth" / "BrainSynth_dataset.json"


def test_training_set_up_is_checked(brainsynth, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = {"datasets": [brainsynth], "output_dir": tmp_path / "out", "device": "cpu", **SMALL}
    with pytest.raises(ValueError, match="stage must be one of"):
        train_workflow(stage=3, **common)
    with pytest.raises(ValueError, match="stage 2 needs stage1_weights"):
        train_workflow(stage=2, **common)
    with pytest.raises(ValueError, match="stage1_weights initialises stage 2"):
        train_workflow(stage=1, stage1_weights=tmp_path / "model.pt", **common)
    with pytest.raises(ValueError, match="not both"):
        train_workflow(stage=2, stage1_weights=tmp_path / "a.pt", init_weights=tmp_path / "b.pt", **common)
    with pytest.raises(ValueError, match="datasets must be a non-empty list"):
        train_workflow(**{**common, "datasets": str(brainsynth)})
    with pytest.raises(ValueError, match="not started by torchrun"):
        train_workflow(distributed=True, **common)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="distributed is false"):
        train_workflow(distributed=False, **common)
    stage_two = UniGradICON(include_step2=True, **SMALL)
    torch.save({"config": stage_two.config, "model": stage_two.state_dict()}, tmp_path / "stage2.pt")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="pass --stage 2 to fine-tune it"):
        train_workflow(init_weights=tmp_path / "stage2.pt", **common)
    with pytest.raises(ValueError, match="stage1_weights .* holds a 4-UNet"):
        train_workflow(stage=2, stage1_weights=tmp_path / "stage2.pt", **common)
    assert not (tmp_path / "out").exists()


def test_validation_pairs_must_have_labels(brainsynth, tmp_path):
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


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed (Gloo)")
def test_distributed_training_on_one_gloo_process(brainsynth, tmp_path, monkeypatch, caplog):
    """What torchrun --nproc_per_node 1 with multi_gpu_train.yaml does: a process group of one, DDP, a checkpoint."""
    environment = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**environment, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.INFO, logger="unigradicon"):
        history = train_workflow(
            [brainsynth], tmp_path, epochs=1, pairs_per_dataset=1, batch_size=1, device="cpu", distributed=True, **SMALL
        )
    assert [record["epoch"] for record in history] == [1] and (tmp_path / "model.pt").is_file()
    assert "process 0 of 1 (gloo) on cpu" in caplog.text
    assert not dist.is_initialized()  # the group it started is ended


def test_fine_tuning_continues_from_given_weights_on_a_new_dataset(shared_data, tmp_path, monkeypatch):
    """uniGradICON's fine-tuning (paper Sec. 3.3): a trained network, the same objective, a new dataset."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.manual_seed(0)
    trained = UniGradICON(include_step2=True, **SMALL)
    for unet in trained.unets:
        torch.nn.init.normal_(unet.lastConv.weight, std=1e-3)
    torch.save({"config": trained.config, "model": trained.state_dict()}, tmp_path / "trained.pt")
    prostate = shared_data / "ProstateMRUS" / "ProstateMRUS_dataset.json"
    history = train_workflow(
        datasets=[prostate],
        output_dir=tmp_path / "finetuned",
        stage=2,
        init_weights=tmp_path / "trained.pt",
        epochs=1,
        pairs_per_dataset=2,
        batch_size=1,
        learning_rate=1e-3,
        validation_json=prostate,
        max_validation_pairs=1,
        device="cpu",
        max_iterations_per_epoch=2,
    )
    assert len(history) == 1 and 0.0 <= history[0]["validation_dice"] <= 1.0
    tuned = torch.load(tmp_path / "finetuned" / "model.pt", weights_only=True)
    assert tuned["config"] == trained.config
    changed = [name for name, value in trained.state_dict().items() if not torch.equal(value, tuned["model"][name])]
    assert any(name.endswith("lastConv.weight") for name in changed)
