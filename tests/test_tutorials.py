"""Every tutorial runs end to end; the foundation tour's outputs are complete and its figures make sense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
TOUR_OUTPUTS = {
    "fixed.nii.gz", "moving.nii.gz", "warped.nii.gz", "fixed_label.nii.gz", "moving_label.nii.gz",
    "ddf.nii.gz", "metrics.json", "overview.png",
}  # fmt: skip


def test_foundation_tour(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TUTORIALS / "foundation_tour.py"), "--out", str(tmp_path / "tour")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[5/5]" in result.stdout
    out = tmp_path / "tour"
    assert {path.name for path in out.iterdir()} == TOUR_OUTPUTS
    assert nib.load(str(out / "ddf.nii.gz")).shape == (64, 72, 64, 1, 3)
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["no_registration"], metrics["true_field"]
    assert after["dice_mean"] > 0.97 > before["dice_mean"]
    assert after["hd95_mm_mean"] < before["hd95_mm_mean"]
    assert after["lncc_loss"] < before["lncc_loss"] and after["mind_ssc_loss"] < before["mind_ssc_loss"]
    assert after["folding_percent"] == 0.0 and before["sdlogj"] == 0.0
    assert metrics["gradicon_true_pair"] < 1e-2
    assert metrics["network_size_round_trip_max_error_mm"] < 0.5


def test_every_tutorial_is_covered():
    assert sorted(path.name for path in TUTORIALS.glob("*.py")) == ["foundation_tour.py"]
