"""A tour of the shared pieces on a pair the script makes itself (no data, no GPU, about half a minute).

1. Build a 3D phantom (nested ellipsoids, 2 mm voxels, an oblique affine) and a smooth diffeomorphic
   deformation by integrating a random stationary velocity field (scaling and squaring).
2. Make the moving image with the inverse deformation, so the true registration field is known.
3. Evaluate "no registration" against "the true field": Dice, HD95 (mm), SDlogJ, % folding, LNCC, MIND-SSC
   and the GradICON inverse-consistency of the true forward/backward pair.
4. Resize the pair to a network size and bring a field computed there back to the original grid.
5. Write fixed / moving / warped images, the field as an ITK/ANTs displacement field, metrics.json and an
   overview PNG to ``--out``.

Run:  python tutorials/foundation_tour.py --out tour
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from monai.data import MetaTensor

from monai_unireg import io, spatial
from monai_unireg.data.synthetic import make_synthetic_pair
from monai_unireg.losses import GradICONLoss, LNCCLoss, MINDSSCLoss
from monai_unireg.metrics import HD95Metric, JacobianMetric, LabelDiceMetric, spacing_from_affine
from monai_unireg.transforms import ResizePaird, RestoreDDFd
from monai_unireg.visualize import save_overview

SHAPE = (64, 72, 64)
SPACING = 2.0
NETWORK_SIZE = (48, 48, 48)


def evaluate(name: str, fixed, fixed_labels, moving, moving_labels, ddf, affine) -> dict[str, float]:
    """Warp the moving image and labels with ``ddf`` and measure the result."""
    warped = spatial.warp(moving, ddf)
    warped_labels = spatial.warp_labels(moving_labels, ddf)
    dice = LabelDiceMetric()(warped_labels, fixed_labels)
    hd95 = HD95Metric(spacing=spacing_from_affine(affine).tolist())(warped_labels, fixed_labels)
    jacobian = JacobianMetric()
    jacobian(ddf)
    jacobian_values = jacobian.aggregate()
    result = {
        "dice_mean": float(dice.nanmean()),
        "hd95_mm_mean": float(hd95.nanmean()),
        "sdlogj": float(jacobian_values["sdlogj"]),
        "folding_percent": float(jacobian_values["folding_percent"]),
        "lncc_loss": float(LNCCLoss(sigma=5.0)(warped, fixed)),
        "mind_ssc_loss": float(MINDSSCLoss()(warped, fixed)),
    }
    print(f"  {name:<18}" + "  ".join(f"{key}={value:.4f}" for key, value in result.items()))
    return result


def network_size_round_trip(fixed, moving, ddf, affine) -> float:
    """Resize the pair to a network size, take the field there, restore it; return the max error in mm."""
    pair = {
        "fixed_image": MetaTensor(fixed[0], affine=torch.as_tensor(affine)),
        "moving_image": MetaTensor(moving[0], affine=torch.as_tensor(affine)),
    }
    small = ResizePaird(NETWORK_SIZE)(pair)
    small["ddf"] = spatial.resize_ddf(ddf, NETWORK_SIZE)[0]  # stands in for a network's prediction
    restored = RestoreDDFd()(small)["ddf"]
    error = spatial.ddf_voxel_to_mm(restored.as_tensor()[None] - ddf, torch.as_tensor(affine))
    return float(error.norm(dim=1).max())


def main(out: Path, seed: int) -> dict:
    start = time.perf_counter()
    print(f"[1/5] phantom {SHAPE} at {SPACING} mm and a smooth diffeomorphic deformation (seed {seed})")
    pair = make_synthetic_pair(SHAPE, SPACING, max_displacement=3.0, seed=seed)
    affine, true_ddf, inverse_ddf = pair.affine, pair.true_ddf, pair.inverse_ddf
    fixed, fixed_labels = pair.fixed, pair.fixed_label

    print("[2/5] moving image = fixed warped by the inverse deformation")
    moving, moving_labels = pair.moving, pair.moving_label

    print("[3/5] evaluation")
    metrics = {
        "no_registration": evaluate(
            "no registration", fixed, fixed_labels, moving, moving_labels, torch.zeros_like(true_ddf), affine
        ),
        "true_field": evaluate("true field", fixed, fixed_labels, moving, moving_labels, true_ddf, affine),
    }
    metrics["gradicon_true_pair"] = float(GradICONLoss()(true_ddf, inverse_ddf))
    print(f"  GradICON of the true forward/inverse pair: {metrics['gradicon_true_pair']:.2e}")

    print(f"[4/5] pair resized to {NETWORK_SIZE} and the field restored to {SHAPE}")
    metrics["network_size_round_trip_max_error_mm"] = network_size_round_trip(fixed, moving, true_ddf, affine)
    print(f"  largest restored-field error: {metrics['network_size_round_trip_max_error_mm']:.3f} mm")

    print(f"[5/5] writing results to {out}/")
    warped = spatial.warp(moving, true_ddf)
    for name, volume in (("fixed", fixed), ("moving", moving), ("warped", warped)):
        io.save_nifti(volume[0, 0], affine, out / f"{name}.nii.gz")
    io.save_nifti(fixed_labels[0, 0], affine, out / "fixed_label.nii.gz")
    io.save_nifti(moving_labels[0, 0], affine, out / "moving_label.nii.gz")
    io.save_ddf(true_ddf, affine, out / "ddf.nii.gz")
    save_overview(out / "overview.png", fixed, moving, warped, true_ddf[0], fixed_label=fixed_labels,
                  moving_label=moving_labels, warped_label=spatial.warp_labels(moving_labels, true_ddf),
                  spacing=(SPACING,) * 3, title="foundation tour: moving warped by the true field")  # fmt: skip
    metrics["runtime_s"] = time.perf_counter() - start
    with io.atomic_path(out / "metrics.json") as temporary:
        temporary.write_text(json.dumps(metrics, indent=2))
    print(f"done in {metrics['runtime_s']:.1f} s: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tour"), help="output folder (default: ./tour)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the phantom and deformation")
    arguments = parser.parse_args()
    main(arguments.out, arguments.seed)
