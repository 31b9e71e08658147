"""Tests of the seeded multi-dataset pair sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_unireg.data import EpochPairDataset, PairSampler, read_learn2reg


def _write_dataset(root: Path, name: str, n_cases: int, paired: bool = False) -> Path:
    """A synthetic Learn2Reg folder of tiny 2x2x2 NIfTI files; paired datasets get one (fixed, moving) pair per case."""
    (root / name / "imagesTr").mkdir(parents=True)
    (root / name / "labelsTr").mkdir()
    training, pairs = [], []
    tiny = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    for case in range(1, n_cases + 1):
        images = [f"./imagesTr/{name}_{case:04d}_{m:04d}.nii.gz" for m in ((0, 1) if paired else (0,))]
        for image in images:
            nib.save(tiny, root / name / image)
            nib.save(tiny, root / name / image.replace("imagesTr", "labelsTr"))
            training.append({"image": image, "label": image.replace("imagesTr", "labelsTr")})
        if paired:
            pairs.append({"fixed": images[0], "moving": images[1]})
    raw = {
        "name": name,
        "pairings": "paired" if paired else "unpaired",
        "numTraining": len(training),
        "training": training,
        "numPairedTraining": len(pairs),
        "training_paired_images": pairs,
        "registration_val": [],
        "registration_test": [],
    }
    json_path = root / name / f"{name}_dataset.json"
    json_path.write_text(json.dumps(raw))
    return json_path


@pytest.fixture
def toy(tmp_path) -> dict[str, Path]:
    return {
        "Unpaired": _write_dataset(tmp_path, "Unpaired", 4),
        "Paired": _write_dataset(tmp_path, "Paired", 3, paired=True),
        "Two": _write_dataset(tmp_path, "Two", 2),
        "Single": _write_dataset(tmp_path, "Single", 1),
    }


def _key(pairs: list[dict]) -> list[tuple]:
    return [(p["dataset"], p["domain"], p["fixed_image"], p["moving_image"]) for p in pairs]


def test_same_seed_and_epoch_give_the_same_pairs(toy):
    datasets = [toy["Unpaired"], toy["Paired"]]
    first = PairSampler(datasets, pairs_per_dataset=50, seed=7).pairs_for_epoch(3)
    second = PairSampler(datasets, pairs_per_dataset=50, seed=7).pairs_for_epoch(3)
    assert first == second


def test_different_epochs_and_seeds_give_different_pairs(toy):
    sampler = PairSampler([toy["Unpaired"], toy["Paired"]], pairs_per_dataset=50, seed=7)
    assert _key(sampler.pairs_for_epoch(0)) != _key(sampler.pairs_for_epoch(1))
    other_seed = PairSampler([toy["Unpaired"], toy["Paired"]], pairs_per_dataset=50, seed=8)
    assert _key(sampler.pairs_for_epoch(0)) != _key(other_seed.pairs_for_epoch(0))


def test_n_pairs_per_dataset_and_domain_ids(toy):
    sampler = PairSampler([toy["Unpaired"], toy["Paired"], toy["Two"]], pairs_per_dataset=40, seed=0)
    pairs = sampler.pairs_for_epoch(2)
    assert len(pairs) == len(sampler) == 120
    assert Counter(p["dataset"] for p in pairs) == {"Unpaired": 40, "Paired": 40, "Two": 40}
    assert sampler.domains == {"Unpaired": 0, "Paired": 1, "Two": 2}
    assert all(isinstance(p["domain"], int) and p["domain"] == sampler.domains[p["dataset"]] for p in pairs)
    assert len({p["domain"] for p in pairs[:10]}) > 1  # shuffled across datasets
    unshuffled = PairSampler([toy["Unpaired"], toy["Paired"]], pairs_per_dataset=5, shuffle=False).pairs_for_epoch(0)
    assert [p["domain"] for p in unshuffled] == [0] * 5 + [1] * 5


def test_unpaired_pairs_are_distinct_cases_covering_all_ordered_pairs(toy):
    pairs = PairSampler([toy["Unpaired"]], pairs_per_dataset=600, seed=1).pairs_for_epoch(0)
    ordered = Counter((p["fixed_image"], p["moving_image"]) for p in pairs)
    assert all(fixed != moving for fixed, moving in ordered)
    assert len(ordered) == 4 * 3 and min(ordered.values()) > 20  # all 12 ordered pairs, roughly uniform
    assert all(p["fixed_label"].endswith(Path(p["fixed_image"]).name) and "labelsTr" in p["fixed_label"] for p in pairs)


def test_paired_datasets_draw_only_listed_pairs_balanced(toy):
    given = read_learn2reg(toy["Paired"]).pairs("training_paired_images")
    listed = {(p["fixed_image"], p["moving_image"]) for p in given}
    pairs = PairSampler([toy["Paired"]], pairs_per_dataset=10, seed=3).pairs_for_epoch(4)
    counts = Counter((p["fixed_image"], p["moving_image"]) for p in pairs)
    assert set(counts) == listed and sorted(counts.values()) == [3, 3, 4]
    assert all(p["fixed_image"].endswith("_0000.nii.gz") and p["moving_image"].endswith("_0001.nii.gz") for p in pairs)


def test_adding_a_dataset_does_not_change_the_draws_of_the_others(toy):
    alone = PairSampler([toy["Unpaired"]], pairs_per_dataset=20, seed=5, shuffle=False).pairs_for_epoch(1)
    together = PairSampler([toy["Unpaired"], toy["Paired"]], pairs_per_dataset=20, seed=5, shuffle=False)
    assert _key(together.pairs_for_epoch(1)[:20]) == _key(alone)


def test_state_dict_round_trip_reproduces_the_next_epoch(toy):
    datasets = [toy["Unpaired"], toy["Paired"]]
    original = PairSampler(datasets, pairs_per_dataset=30, seed=11)
    original.set_epoch(5)
    state = original.state_dict()
    resumed = PairSampler(datasets, pairs_per_dataset=2, seed=0, shuffle=False)
    resumed.load_state_dict(state)
    assert list(resumed) == list(original) == original.pairs_for_epoch(5)
    assert resumed.pairs_for_epoch(6) == original.pairs_for_epoch(6)
    assert resumed.state_dict() == state
    restored = PairSampler(datasets, seed=0)
    restored.load_state_dict(torch.load(_saved(state, toy["Unpaired"].parent.parent), weights_only=True))
    assert restored.pairs_for_epoch(6) == original.pairs_for_epoch(6)


def _saved(state: dict, folder: Path) -> Path:
    path = folder / "sampler.pt"
    torch.save(state, path)
    return path


def test_load_state_dict_checks_datasets_and_keys(toy):
    state = PairSampler([toy["Unpaired"], toy["Paired"]]).state_dict()
    with pytest.raises(ValueError, match="datasets"):
        PairSampler([toy["Paired"], toy["Unpaired"]]).load_state_dict(state)
    del state["seed"]
    with pytest.raises(ValueError, match="seed"):
        PairSampler([toy["Unpaired"], toy["Paired"]]).load_state_dict(state)


def test_single_case_dataset_raises_or_is_skipped(toy):
    with pytest.raises(ValueError, match="Single.*skip_unpairable"):
        PairSampler([toy["Unpaired"], toy["Single"]])
    with pytest.warns(UserWarning, match="Single"):
        sampler = PairSampler(
            [toy["Single"], toy["Unpaired"], toy["Paired"]], pairs_per_dataset=4, skip_unpairable=True
        )
    assert sampler.domains == {"Unpaired": 0, "Paired": 1} and len(sampler) == 8
    with pytest.raises(ValueError, match="datasets"), pytest.warns(UserWarning):
        PairSampler([toy["Single"]], skip_unpairable=True)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"pairs_per_dataset": 0}, "pairs_per_dataset"),
        ({"pairs_per_dataset": 2.5}, "pairs_per_dataset"),
        ({"seed": -1}, "seed"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_arguments(toy, kwargs, name):
    with pytest.raises(ValueError, match=name):
        PairSampler([toy["Unpaired"]], **kwargs)


def test_bad_epoch_and_datasets(toy):
    sampler = PairSampler([toy["Unpaired"]])
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match="epoch"):
        sampler.pairs_for_epoch(1.5)
    with pytest.raises(ValueError, match="datasets"):
        PairSampler([])
    with pytest.raises(ValueError, match="datasets"):
        PairSampler(str(toy["Unpaired"]))
    with pytest.raises(ValueError, match="twice"):
        PairSampler([toy["Unpaired"], toy["Unpaired"]])


def test_epoch_pair_dataset_with_dataloader(toy):
    sampler = PairSampler([toy["Unpaired"], toy["Paired"]], pairs_per_dataset=3, seed=2)
    dataset = EpochPairDataset(sampler, transform=lambda pair: {**pair, "name": Path(pair["fixed_image"]).name})
    assert len(dataset) == 6 and dataset.data == sampler.pairs_for_epoch(0)
    dataset.set_epoch(4)
    assert sampler.epoch == 4 and dataset.data == sampler.pairs_for_epoch(4)
    assert dataset[0]["name"] == Path(sampler.pairs_for_epoch(4)[0]["fixed_image"]).name
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=3))
    assert [len(b["dataset"]) for b in batches] == [3, 3]
    assert torch.cat([b["domain"] for b in batches]).tolist() == [p["domain"] for p in sampler.pairs_for_epoch(4)]


def test_shared_datasets(shared_data):
    jsons = sorted(shared_data.glob("*/*_dataset.json"))
    with pytest.raises(ValueError, match="BrainVXM"):
        PairSampler(jsons, pairs_per_dataset=10)
    with pytest.warns(UserWarning, match="BrainVXM"):
        sampler = PairSampler(jsons, pairs_per_dataset=100, seed=0, skip_unpairable=True)
    assert set(sampler.domains) == {"BrainSynth", "CTTotalSeg", "ProstateMRUS"}
    pairs = sampler.pairs_for_epoch(0)
    assert Counter(p["dataset"] for p in pairs) == {name: 100 for name in sampler.domains}
    for pair in pairs:
        assert pair["fixed_image"] != pair["moving_image"]
        if pair["dataset"] == "ProstateMRUS":  # intra-patient pairs only
            assert pair["fixed_image"].replace("_0000.nii.gz", "") == pair["moving_image"].replace("_0001.nii.gz", "")
        paths = [pair[k] for k in ("fixed_image", "moving_image", "fixed_label", "moving_label") if k in pair]
        assert all(Path(path).is_file() for path in paths)


def test_one_pass_visits_every_ordered_pair_once_per_epoch_and_resumes(tmp_path):
    unpaired = _write_dataset(tmp_path, "Brains", 5)
    paired = _write_dataset(tmp_path, "Prostates", 3, paired=True)
    sampler = PairSampler([unpaired, paired], pairs_per_dataset=7, seed=4, one_pass=True)
    assert len(sampler) == 5 * 4 + 3
    epochs = [sampler.pairs_for_epoch(e) for e in (0, 1)]
    for pairs in epochs:
        assert len(pairs) == len(sampler)
        brains = [(p["fixed_image"], p["moving_image"]) for p in pairs if p["dataset"] == "Brains"]
        assert len(set(brains)) == 20 and all(fixed != moving for fixed, moving in brains)
        assert len({p["moving_image"] for p in pairs if p["dataset"] == "Prostates"}) == 3
    assert [p["fixed_image"] for p in epochs[0]] != [p["fixed_image"] for p in epochs[1]]
    resumed = PairSampler([unpaired, paired], seed=0)
    resumed.load_state_dict({**sampler.state_dict(), "epoch": 1})
    assert resumed.one_pass and resumed.pairs_for_epoch(1) == epochs[1]
