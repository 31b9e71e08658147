"""Bad input at the library's boundaries: every case ends in one clear ``ValueError``/``FileNotFoundError`` that
names the argument, key or file and says what was expected (the command line's own cases are in
``tests/test_cli_bad_input.py``)."""

from __future__ import annotations

import gzip
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_unireg.io import check_image_file
from monai_unireg.transforms import CheckPaird
from monai_unireg.validation import check_informative_image

STRUCTURED = torch.rand(1, 12, 12, 12, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "image, detail",
    [
        (torch.zeros(1, 12, 12, 12), "every voxel equals 0"),
        (torch.full((1, 12, 12, 12), 1000.0), "every voxel equals 1000"),
        (7.0 + 1e-8 * STRUCTURED, "every voxel equals 7"),
        (torch.zeros(1, 12, 12, 12).index_put_((torch.tensor([0]),) * 4, torch.tensor(5.0)), "only 1 of 1728"),
    ],
    ids=["zeros", "constant", "constant-plus-rounding", "one-stray-voxel"],
)
def test_constant_or_nearly_constant_image_is_refused(image, detail):
    with pytest.raises(ValueError, match=f"moving image is constant or nearly so \\({detail}"):
        check_informative_image(image, "moving image")


def test_sparse_but_real_structure_is_accepted():
    image = torch.zeros(1, 32, 32, 32)
    image[:, 12:20, 12:20, 12:20] = 1.0  # a small object on an exactly flat background (1.6 % of voxels)
    check_informative_image(image, "fixed image")
    check_informative_image(-image, "fixed image")


def test_pair_check_names_the_key_and_the_file_of_a_constant_image(tmp_path):
    blank = MetaTensor(torch.zeros(1, 12, 12, 12), meta={"filename_or_obj": str(tmp_path / "blank.nii.gz")})
    with pytest.raises(ValueError, match=r"data\['fixed_image'\] \(.*blank\.nii\.gz\) is constant"):
        CheckPaird()({"fixed_image": blank, "moving_image": STRUCTURED})
    CheckPaird()({"fixed_image": STRUCTURED, "moving_image": STRUCTURED.flip(1)})


def test_image_file_check_reads_only_headers_and_names_the_entry(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), good)
    assert check_image_file(good, "entry 1") == good
    text = tmp_path / "notes.nii.gz"
    with gzip.open(text, "wb") as handle:
        handle.write(b"not a NIfTI header at all" * 20)
    with pytest.raises(ValueError, match=r"entry 2 names .*notes\.nii\.gz.*not a readable \.nii\.gz image"):
        check_image_file(text, "entry 2")
    with pytest.raises(ValueError, match=r"entry 3 names .*table\.csv.*not an image file \(expected \.nii\.gz"):
        (tmp_path / "table.csv").write_text("a,b\n")
        check_image_file(tmp_path / "table.csv", "entry 3")
    with pytest.raises(FileNotFoundError, match=r"entry 4 names .*missing\.nii.*does not exist"):
        check_image_file(tmp_path / "missing.nii", "entry 4")


@pytest.mark.parametrize("side, value", [("moving", 0.0), ("fixed", 1.0)])
def test_command_refuses_a_constant_image_before_registering(tmp_path, capsys, side, value):
    from monai_unireg.cli import main

    structured = (np.random.default_rng(1).random((24, 24, 24)) > 0.5).astype(np.float32)
    paths = {}
    for name in ("fixed", "moving"):
        data = np.full((24, 24, 24), value, np.float32) if name == side else structured
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), paths[name])
    out = tmp_path / "out"
    arguments = ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--out", str(out)]
    assert main([*arguments, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{side} image" in err[0] and f"{side}.nii.gz" in err[0] and "constant" in err[0]
    assert not any(out.glob("*.nii.gz"))


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--dataset_jsn", "x.json"], "--dataset_jsn is not a key of the bundle's configs"),
        (["--num_levels", "five"], "num_levels must be a whole number >= 1, got 'five'"),
    ],
    ids=["misspelt-key", "word-for-a-number"],
)
def test_bundle_names_the_config_key_of_a_bad_override(override, expected):
    import subprocess
    import sys
    from pathlib import Path

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "voxelopt"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
        "--meta_file", "configs/metadata.json", *override,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=bundle)
    assert result.returncode != 0 and f"ValueError: {expected}" in result.stderr


@pytest.mark.parametrize(
    "method, key, value, expected",
    [
        ("sacbnet", "num_clusters", "seven", "num_clusters must be a whole number >= 1, got 'seven'"),
        ("sacbnet", "kmeans_tolerance", "tiny", "kmeans_tolerance must be a number, got 'tiny'"),
        ("unigradicon", "io_iterations", 2.5, "io_iterations must be a whole number >= 0, got 2.5"),
        ("unigradicon", "include_step2", "yes", "include_step2 must be True or False, got 'yes'"),
        ("promptreg", "input_size", [160, 0, 160], "input_size must be one size or a list of sizes"),
        ("promptreg", "num_domains", 0, "num_domains must be a whole number >= 1, got 0"),
        ("unireg", "dynamic_head", 1, "dynamic_head must be True or False, got 1"),
        ("voxelopt", "beta", "high", "beta must be a number, got 'high'"),
    ],
)
def test_inference_config_names_the_key_of_a_value_of_the_wrong_kind(method, key, value, expected):
    from pathlib import Path

    from monai.bundle import create_workflow

    configs = Path(__file__).resolve().parents[1] / "bundles" / method / "configs"
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps what an expression raises, "from" it
        create_workflow(  # which initialises the workflow
            config_file=str(configs / "inference.yaml"),
            meta_file=str(configs / "metadata.json"),
            workflow_type="inference",
            **{key: value},
        )
    causes = []
    error: BaseException | None = raised.value
    while error is not None:
        causes.append(error)
        error = error.__cause__
    assert any(isinstance(e, ValueError) and re.search(re.escape(expected), str(e)) for e in causes), causes
