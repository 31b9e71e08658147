"""A short UniReg training on two shared datasets: does the loss fall and the validation Dice rise on both?

Trains UniReg (shared encoder-decoder, control vector [task one-hot, registration type, pooled features], dynamic
1x1x1 head 8 -> 8 -> 8 -> 3) through the bundle's own ``bundles/unireg/configs/train.yaml`` (MONAI's
``SupervisedTrainer`` with the paper's objective, Eq. 6: NCC + lambda_task x diffusion, plus the Dice loss of the
tasks with labels) on random training pairs of two tasks: BrainSynth as "brain" / inter-subject and ProstateMRUS as
"pelvis" / intra-subject (MR to ultrasound of one patient), both with label supervision and lambda 1. The config's
validation (``SupervisedEvaluator`` + ``LabelDice``, each pair with its dataset's condition) scores both datasets'
``registration_val`` pairs at the working size after every epoch; each dataset's mean is taken over its own labels:
BrainSynth's 30 largest structures, ProstateMRUS's prostate gland (label 1). It prints, per epoch, the mean
training loss and its parts and the two Dice. Row 0 is the untrained network; its head starts near zero, so its
Dice is the identity map's. The verdict compares the loss of the first and the last epoch. After training it prints
how much the field changes when only the task code (or only the registration type) is changed, on the first
validation pair of each dataset. ``--static-head`` trains the paper's Table 6 ablation.

The paper trains at 192 x 192 x 160 for 120k iterations with SGD (momentum 0.99, learning rate 5e-5). To take
minutes on 2 CPU cores the images are resized to a small working size (default 48^3, trilinear; labels nearest)
and the run is a few hundred iterations with Adam (the paper's option; the config's ``optimizer`` is overridden,
as a user would swap it) at 1e-4 and the head at 30 times that rate (``head_learning_rate_scale``). Validation
pairs are images the training also draws from: this shows that training works, not how it generalises. The
settings are printed with the results.

    python benchmarks/unireg_short_training.py [--size 48 48 48] [--epochs 5] [--pairs 30]
        [--learning-rate 1e-4] [--head-scale 30] [--static-head] [--validation-pairs N] [--threads 2] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
from bundle_training import Result, add_shared_arguments, datasets, run_benchmark

#: Training datasets and their condition.
CONDITIONS = {"BrainSynth": ("brain", "inter"), "ProstateMRUS": ("pelvis", "intra")}
LAMBDAS = {"brain": 1.0, "pelvis": 1.0}
PARTS = ("similarity", "smoothness", "dice")
#: Adam instead of the config's SGD, over the same parameter groups (the head at its own rate).
ADAM = {
    "_target_": "torch.optim.Adam",
    "params": "$@unireg.parameter_groups(@learning_rate, @head_learning_rate_scale)",
    "lr": "@learning_rate",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(48, 48, 48), help="working size, each divisible by 8")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=30, help="training pairs per dataset and epoch")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="Adam rate of the backbone")
    parser.add_argument("--head-scale", type=float, default=30.0, help="the head's rate / the backbone's")
    parser.add_argument("--static-head", action="store_true", help="the Table 6 ablation: one static head")
    add_shared_arguments(parser)
    return parser.parse_args()


def condition_effect(result: Result) -> str:
    """Mean |change| of the field (voxels) on each dataset's first validation pair when the task or type changes."""
    network = result.workflow.parser.get_parsed_content("unireg").eval()
    dataset = result.workflow.parser.get_parsed_content("validate#dataset")
    lines = []
    with torch.no_grad():
        for name, (task, kind) in CONDITIONS.items():
            item = dataset[next(i for i, pair in enumerate(dataset.data) if pair["dataset"] == name)]
            moving, fixed = item["moving_image"].as_tensor()[None], item["fixed_image"].as_tensor()[None]
            other_task = next(t for t in LAMBDAS if t != task)
            other_kind = "intra" if kind == "inter" else "inter"
            ddf = network(moving, fixed, task, kind)
            by_task = (network(moving, fixed, other_task, kind) - ddf).norm(dim=1).mean()
            by_kind = (network(moving, fixed, task, other_kind) - ddf).norm(dim=1).mean()
            lines.append(
                f"{name}: mean |ddf| {float(ddf.norm(dim=1).mean()):.3f} voxel; changing the task to {other_task} "
                f"moves it by {float(by_task):.3f}, the type to {other_kind} by {float(by_kind):.3f} voxel"
            )
    return "; ".join(lines)


def main() -> None:
    arguments = parse_args()
    paths, labels = datasets(list(CONDITIONS))
    print(
        f"BrainSynth (brain, inter) + ProstateMRUS (pelvis, intra), {'x'.join(map(str, arguments.size))}, UniReg "
        f"({'static' if arguments.static_head else 'dynamic'} head), {arguments.pairs} pairs per dataset and epoch, "
        f"batch 1, Adam {arguments.learning_rate} (head x{arguments.head_scale:g}), lambdas {LAMBDAS}, Dice "
        f"supervision on both, {arguments.threads} threads; bundles/unireg/configs/train.yaml"
    )
    settings = {
        "datasets": [
            {"json": str(paths[name]), "task": task, "reg_type": kind} for name, (task, kind) in CONDITIONS.items()
        ],
        "tasks": list(LAMBDAS),
        "lambdas": LAMBDAS,
        "max_validation_pairs": arguments.validation_pairs,
        "input_size": list(arguments.size),
        "dynamic_head": not arguments.static_head,
        "optimizer": ADAM,
        "head_learning_rate_scale": arguments.head_scale,
    }
    result = run_benchmark("unireg", arguments, settings, labels, PARTS)
    print("condition: " + condition_effect(result))


if __name__ == "__main__":
    main()
