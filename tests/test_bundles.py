"""Bundle conformance: every folder under ``bundles/`` must meet the contract of ``bundles/README.md``.

For each bundle: the required files exist, ``configs/metadata.json`` validates against MONAI's published schema
(``meta_schema_20240725.json``, shipped unchanged in ``monai_unireg/resources`` so that MONAI's own
``verify_metadata`` runs offline) and declares the network as MONAI's tools drive it (one 2-channel ``[moving,
fixed]`` input ``image``, a 3-channel output ``pred``), and ``python -m monai.bundle run`` on its ``inference.yaml``
registers a tiny Learn2Reg dataset, writing one displacement field per pair on the fixed grid. New bundles are
covered without changing this file. The checks themselves are exercised on a minimal fixture bundle and on broken
metadata.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata

from monai_unireg import io
from monai_unireg.data import load_learn2reg, pair_name

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(path for path in (PROJECT_ROOT / "bundles").glob("*") if (path / "configs").is_dir())
FIXTURE_BUNDLE = PROJECT_ROOT / "tests" / "fixtures" / "bundles" / "no_registration"
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.yaml", "configs/logging.conf", "docs/README.md")
TINY_SHAPE = (24, 28, 32)
#: Small networks for the inference run (config keys of each bundle): the paper-sized untrained networks took
#: minutes on a CPU and test nothing more about conformance. A bundle not listed runs with its own defaults.
SMALL_NETWORKS: dict[str, dict[str, str]] = {
    "promptreg": {"input_size": "[32, 32, 32]", "channels": "4"},
    "sacbnet": {"input_size": "[32, 32, 32]", "channels": "[4, 8, 8, 8, 8]", "kmeans_iterations": "5"},
    "unigradicon": {"input_size": "32", "down_channels": "[4, 8, 8]", "up_channels": "[4, 8, 8]"},
    "unireg": {"input_size": "[32, 32, 32]", "channels": "[4, 8, 8, 8]"},
}


SCHEMA = "resources/meta_schema_20240725.json"


def metadata_schema() -> dict:
    return json.loads(resources.files("monai_unireg").joinpath(SCHEMA).read_text())


def check_layout(bundle: Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (bundle / name).is_file()]
    assert not missing, f"bundle {bundle.name} lacks {missing}"


def check_metadata(metadata: dict) -> None:
    """Validate against the schema, and check that the version has a changelog entry."""
    jsonschema.validate(instance=metadata, schema=metadata_schema())
    assert metadata["version"] in metadata["changelog"], "metadata version must have a changelog entry"
    assert metadata["schema"].endswith("/meta_schema_20240725.json"), "metadata must name MONAI's schema"
    data_format = metadata["network_data_format"]
    assert set(data_format["inputs"]) == {"image"}, "the network input is one 2-channel [moving, fixed] 'image'"
    assert data_format["inputs"]["image"]["num_channels"] == 2, "image stacks the moving and the fixed image"
    assert set(data_format["outputs"]) == {"pred"}, "the network output is 'pred', the displacement field"
    assert data_format["outputs"]["pred"]["num_channels"] == 3, "pred is a 3-channel displacement field"
    for tensor in (data_format["inputs"]["image"], data_format["outputs"]["pred"]):
        assert tensor["dtype"] == "float32", "the network's input and output are float32"


def write_tiny_dataset(root: Path) -> Path:
    """Three 24x28x32 cases (2 mm, non-trivial origin) with labels and two registration_val pairs."""
    generator = torch.Generator().manual_seed(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-23.0, -27.0, -31.0]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in TINY_SHAPE], indexing="ij"), 0).astype(np.float32)
    cases = []
    for case in range(1, 4):
        centre = np.array(TINY_SHAPE) / 2 + torch.randn(3, generator=generator).numpy()
        radius = np.linalg.norm((grid - centre.reshape(3, 1, 1, 1)) / np.array([7, 8, 9]).reshape(3, 1, 1, 1), axis=0)
        label = (radius < 1).astype(np.uint8) + (radius < 0.5).astype(np.uint8)
        image = label / 2 + 0.05 * torch.rand(TINY_SHAPE, generator=generator).numpy()
        name = f"Tiny_{case:04d}_0000.nii.gz"
        io.save_nifti(image.astype(np.float32), affine, root / "imagesTr" / name)
        io.save_nifti(label, affine, root / "labelsTr" / name)
        cases.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    pairs = [{"fixed": cases[i]["image"], "moving": cases[i + 1]["image"]} for i in range(2)]
    description = {
        "name": "Tiny",
        "modality": {"0": "MR"},
        "tensorImageShape": {"0": list(TINY_SHAPE)},
        "registration_direction": {"fixed": 0, "moving": 1},
        "labels": {"0": {"0": "background", "1": "outer", "2": "inner"}},
        "numTraining": 3,
        "training": cases,
        "numPairedTraining": 0,
        "training_paired_images": [],
        "numRegistration_val": 2,
        "registration_val": pairs,
        "numRegistration_test": 0,
        "registration_test": [],
    }
    path = root / "Tiny_dataset.json"
    path.write_text(json.dumps(description, indent=1))
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_learn2reg"))


def run_inference(bundle: Path, dataset_json: Path, output_dir: Path) -> None:
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(bundle / "configs" / "inference.yaml"),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--logging_file", str(bundle / "configs" / "logging.conf"),
        "--bundle_root", str(bundle),
        "--dataset_json", str(dataset_json),
        "--section", "registration_val",
        "--output_dir", str(output_dir),
        "--device", "$torch.device('cpu')",
        *[item for key, value in SMALL_NETWORKS.get(bundle.name, {}).items() for item in (f"--{key}", value)],
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bundle), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=bundle)
    assert result.returncode == 0, (
        f"bundle {bundle.name} inference failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def check_outputs(dataset_json: Path, output_dir: Path) -> None:
    """One finite displacement field per pair, ``[X, Y, Z, 1, 3]`` on the fixed image's grid and affine."""
    for pair in load_learn2reg(dataset_json, "registration_val"):
        path = output_dir / pair_name(pair) / "ddf.nii.gz"
        assert path.is_file(), f"missing {path}"
        field, fixed = nib.load(str(path)), nib.load(pair["fixed_image"])
        assert field.shape == (*fixed.shape, 1, 3), f"{path} has shape {field.shape}"
        np.testing.assert_allclose(field.affine, fixed.affine, atol=1e-4)
        assert np.isfinite(field.get_fdata()).all()


def verify_metadata_with_monai(bundle: Path, folder: Path) -> None:
    """MONAI's own ``verify_metadata``, offline: the schema file is already where it would download it to."""
    schema = folder / "meta_schema_20240725.json"
    schema.write_text(resources.files("monai_unireg").joinpath(SCHEMA).read_text())
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))


def check_bundle(bundle: Path, dataset_json: Path, output_dir: Path) -> None:
    check_layout(bundle)
    check_metadata(json.loads((bundle / "configs" / "metadata.json").read_text()))
    verify_metadata_with_monai(bundle, output_dir.parent)
    run_inference(bundle, dataset_json, output_dir)
    check_outputs(dataset_json, output_dir)


@pytest.mark.parametrize("bundle", BUNDLES, ids=[bundle.name for bundle in BUNDLES])
def test_bundle_conforms(bundle, tiny_dataset, tmp_path):
    check_bundle(bundle, tiny_dataset, tmp_path / "outputs")


def test_checks_pass_on_the_minimal_fixture_bundle(tiny_dataset, tmp_path):
    check_bundle(FIXTURE_BUNDLE, tiny_dataset, tmp_path / "outputs")


@pytest.mark.parametrize(
    "breakage",
    [
        lambda meta: meta.pop("network_data_format"),
        lambda meta: meta.pop("authors"),
        lambda meta: meta.update(version="one"),
        lambda meta: meta.update(changelog={"9.9.9": "other"}),
        lambda meta: meta["network_data_format"]["outputs"]["pred"].update(dtype="complex"),
        lambda meta: meta["network_data_format"]["outputs"]["pred"].update(value_range=[None, None]),
        lambda meta: meta["network_data_format"]["inputs"]["image"].update(num_channels=1),
        lambda meta: meta["network_data_format"].update(inputs={}),
    ],
)
def test_metadata_check_rejects_broken_metadata(breakage):
    metadata = json.loads((FIXTURE_BUNDLE / "configs" / "metadata.json").read_text())
    broken = copy.deepcopy(metadata)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        check_metadata(broken)


def test_output_check_rejects_missing_fields(tiny_dataset, tmp_path):
    with pytest.raises(AssertionError, match="missing"):
        check_outputs(tiny_dataset, tmp_path)
