"""Tests of the Learn2Reg dataset.json reader on every shared dataset and on small synthetic layouts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_unireg.data import (
    PAIR_SECTIONS,
    find_learn2reg_datasets,
    label_path_for,
    load_learn2reg,
    load_pair_folder,
    pair_name,
    read_learn2reg,
)

PAIR_KEYS = {"fixed_image", "moving_image", "fixed_label", "moving_label", "dataset"}
SECTION_COUNTS = {
    "registration_val": "numRegistration_val",
    "registration_test": "numRegistration_test",
    "training_paired_images": "numPairedTraining",
}


def _shared_jsons(shared_data: Path) -> list[Path]:
    paths = find_learn2reg_datasets(shared_data)
    assert {p.parent.name for p in paths} >= {"BrainSynth", "BrainVXM1mm", "BrainVXM2mm", "ProstateMRUS", "CTTotalSeg"}
    return paths


def _check_pair(pair: dict, name: str) -> None:
    assert set(pair) <= PAIR_KEYS and pair["dataset"] == name
    for side in ("fixed", "moving"):
        image = Path(pair[f"{side}_image"])
        assert image.is_absolute() and image.is_file()
        label = label_path_for(image)
        assert (f"{side}_label" in pair) == label.is_file()  # labels found exactly where they exist
        if f"{side}_label" in pair:
            assert Path(pair[f"{side}_label"]) == label


def test_every_shared_dataset_reads(shared_data):
    for json_path in _shared_jsons(shared_data):
        raw = json.loads(json_path.read_text())
        dataset = read_learn2reg(json_path)
        assert dataset.name == raw["name"] == json_path.parent.name
        assert len(dataset.cases) == raw["numTraining"]
        for case, entry in zip(dataset.cases, raw["training"]):
            assert Path(case["image"]).is_file()
            assert Path(case["image"]) == (json_path.parent / entry["image"]).resolve()
            assert ("label" in case) == ("label" in entry)
            assert "label" not in case or Path(case["label"]).is_file()
        for section, count_key in SECTION_COUNTS.items():
            pairs = load_learn2reg(json_path, section)
            assert len(pairs) == raw[count_key]
            for pair, entry in zip(pairs, raw[section]):
                _check_pair(pair, dataset.name)
                assert Path(pair["fixed_image"]) == (json_path.parent / entry["fixed"]).resolve()
                assert Path(pair["moving_image"]) == (json_path.parent / entry["moving"]).resolve()


def test_shared_dataset_specifics(shared_data):
    brain = read_learn2reg(shared_data / "BrainSynth" / "BrainSynth_dataset.json")
    assert brain.spacing == (2.0, 2.0, 2.0) and brain.modality == {"0": "MR"} and not brain.paired
    assert 3 in brain.evaluation_labels and 0 not in brain.evaluation_labels and brain.labels[2].startswith("left")
    val = brain.pairs("registration_val")
    assert len(val) == 10 and all("fixed_label" in p and "moving_label" in p for p in val)
    assert val[-1]["fixed_image"].endswith("BrainSynth_0010_0000.nii.gz")
    assert val[-1]["moving_image"].endswith("BrainSynth_0001_0000.nii.gz")

    prostate = read_learn2reg(shared_data / "ProstateMRUS" / "ProstateMRUS_dataset.json")
    assert prostate.paired and prostate.modality == {"0": "US", "1": "MR"} and prostate.evaluation_labels == (1,)
    paired = prostate.pairs("training_paired_images")
    assert len(paired) == 25 and len(prostate.pairs("registration_val")) == 5
    assert all(p["fixed_image"].endswith("_0000.nii.gz") and p["moving_image"].endswith("_0001.nii.gz") for p in paired)

    ct = read_learn2reg(shared_data / "CTTotalSeg" / "CTTotalSeg_dataset.json")
    assert "label" in ct.cases[0] and "label" not in ct.cases[1]  # case 0002 has no label
    unpaired = ct.pairs("training_unpaired")
    assert len(unpaired) == 2
    assert "fixed_label" in unpaired[0] and "moving_label" not in unpaired[0]
    assert "moving_label" in unpaired[1] and "fixed_label" not in unpaired[1]


def test_training_unpaired_is_all_ordered_pairs(shared_data):
    for json_path in _shared_jsons(shared_data):
        dataset = read_learn2reg(json_path)
        if dataset.paired:
            with pytest.raises(ValueError, match="training_paired_images"):
                dataset.pairs("training_unpaired")
            continue
        pairs = load_learn2reg(json_path, "training_unpaired")
        n = len(dataset.cases)
        assert len(pairs) == n * (n - 1)  # 0 for the single-case BrainVXM datasets
        ordered = {(p["fixed_image"], p["moving_image"]) for p in pairs}
        assert len(ordered) == len(pairs) and all(fixed != moving for fixed, moving in ordered)
        for pair in pairs:
            _check_pair(pair, dataset.name)


def _make_dataset(root: Path, n_cases: int = 3, labels: tuple[int, ...] = (1, 2), **overrides) -> Path:
    """A synthetic Learn2Reg folder (tiny 2x2x2 NIfTI files) with ``n_cases`` cases; returns the JSON path."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = [f"Toy_{i:04d}_0000.nii.gz" for i in range(1, n_cases + 1)]
    tiny = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    for i, name in enumerate(names, start=1):
        nib.save(tiny, root / "imagesTr" / name)
        if i in labels:
            nib.save(tiny, root / "labelsTr" / name)
    raw = {
        "name": "Toy",
        "numTraining": n_cases,
        "training": [{"image": f"./imagesTr/{name}"} for name in names],
        "numPairedTraining": 0,
        "training_paired_images": [],
        "numRegistration_val": 1,
        "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[-1]}"}],
        "numRegistration_test": 0,
        "registration_test": [],
    }
    raw.update(overrides)
    json_path = root / "Toy_dataset.json"
    json_path.write_text(json.dumps(raw))
    return json_path


def test_synthetic_dataset_labels_found_by_rule(tmp_path):
    json_path = _make_dataset(tmp_path / "Toy", n_cases=3, labels=(1,))
    (pair,) = load_learn2reg(json_path)
    assert pair["fixed_label"] == str(tmp_path / "Toy" / "labelsTr" / "Toy_0001_0000.nii.gz")
    assert "moving_label" not in pair and pair["dataset"] == "Toy"
    dataset = read_learn2reg(json_path)
    assert [("label" in case) for case in dataset.cases] == [True, False, False]
    assert dataset.evaluation_labels == () and dataset.spacing is None


def test_label_path_rule():
    assert label_path_for("/d/X/imagesTr/a.nii.gz") == Path("/d/X/labelsTr/a.nii.gz")
    assert label_path_for("/d/X/imagesTs/a.nii.gz") == Path("/d/X/labelsTs/a.nii.gz")
    assert label_path_for("/d/X/scans/a.nii.gz") is None


def test_unknown_section(tmp_path):
    json_path = _make_dataset(tmp_path / "Toy")
    with pytest.raises(ValueError, match="section"):
        load_learn2reg(json_path, "validation")
    with pytest.raises(ValueError, match="section"):
        read_learn2reg(json_path).pairs("training")
    expected = {"registration_val", "registration_test", "training_paired_images", "training_unpaired"}
    assert set(PAIR_SECTIONS) == expected


def test_missing_json_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="json_path"):
        load_learn2reg(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "Toy", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_learn2reg(broken)
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_learn2reg(not_object)


def test_missing_image_file(tmp_path):
    json_path = _make_dataset(tmp_path / "Toy")
    (tmp_path / "Toy" / "imagesTr" / "Toy_0003_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="Toy_0003_0000"):
        read_learn2reg(json_path)


def test_missing_declared_label_file(tmp_path):
    json_path = _make_dataset(
        tmp_path / "Toy",
        numTraining=1,
        training=[{"image": "./imagesTr/Toy_0001_0000.nii.gz", "label": "./labelsTr/nope.nii.gz"}],
    )
    with pytest.raises(FileNotFoundError, match="training\\[0\\].label"):
        read_learn2reg(json_path)


@pytest.mark.parametrize("drop", ["name", "training", "registration_val"])
def test_missing_key(tmp_path, drop):
    json_path = _make_dataset(tmp_path / "Toy")
    raw = json.loads(json_path.read_text())
    del raw[drop]
    json_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=drop):
        load_learn2reg(json_path, "registration_val")


def test_pair_entry_without_moving(tmp_path):
    json_path = _make_dataset(tmp_path / "Toy", registration_val=[{"fixed": "./imagesTr/Toy_0001_0000.nii.gz"}])
    with pytest.raises(ValueError, match="'moving'.*registration_val\\[0\\]"):
        load_learn2reg(json_path)


def test_count_mismatch(tmp_path):
    json_path = _make_dataset(tmp_path / "Toy", numRegistration_val=4)
    with pytest.raises(ValueError, match="numRegistration_val"):
        load_learn2reg(json_path)


def test_pair_name_from_paths_and_loaded_images(tmp_path):
    pair = {"fixed_image": "/d/X/imagesTr/X_0001_0000.nii.gz", "moving_image": Path("/d/X/imagesTr/X_0002_0000.nii")}
    assert pair_name(pair) == "X_0001_0000__X_0002_0000"
    reverse = {"fixed_image": pair["moving_image"], "moving_image": pair["fixed_image"]}
    assert pair_name(reverse) != pair_name(pair)
    loaded = {**pair, "fixed_image": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": pair["fixed_image"]})}
    assert pair_name(loaded) == pair_name(pair)
    with pytest.raises(ValueError, match="moving_image"):
        pair_name({"fixed_image": pair["fixed_image"]})
    with pytest.raises(ValueError, match="fixed_image"):
        pair_name({**pair, "fixed_image": torch.zeros(1, 2, 2, 2)})


def test_pair_names_are_unique_in_every_shared_section(shared_data):
    for json_path in find_learn2reg_datasets(shared_data):
        dataset = read_learn2reg(json_path)
        for section in ("registration_val", "training_paired_images"):
            pairs = dataset.pairs(section)
            assert len({pair_name(p) for p in pairs}) == len(pairs)


def test_load_pair_folder(tmp_path):
    for name in ("b_fixed", "b_moving", "a_fixed", "a_moving", "a_fixed_label", "notes"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    pairs = load_pair_folder(tmp_path)
    assert [Path(p["fixed_image"]).name for p in pairs] == ["a_fixed.nii.gz", "b_fixed.nii.gz"]
    assert set(pairs[0]) == {"fixed_image", "moving_image", "fixed_label"} and "fixed_label" not in pairs[1]
    with pytest.raises(ValueError, match="no"):
        load_pair_folder(tmp_path / "a_fixed_label.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_pair_folder(empty)
    (tmp_path / "c_fixed.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="c_moving"):
        load_pair_folder(tmp_path)


@pytest.mark.parametrize("content, suffix", [(b"not an image", ".nii.gz"), (b"a,b\n1,2\n", ".csv")])
def test_entry_naming_a_non_image_file_is_refused_naming_the_entry(tmp_path, content, suffix):
    json_path = _make_dataset(tmp_path)
    (tmp_path / "imagesTr" / f"notes{suffix}").write_bytes(content)
    raw = json.loads(json_path.read_text())
    raw["registration_val"][0]["moving"] = f"./imagesTr/notes{suffix}"
    json_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"registration_val\[0\]\.moving .*notes.*(not an image file|not a readable)"):
        load_learn2reg(json_path)
