"""A short SACB-Net training on a shared dataset: does the loss fall and the validation Dice rise?

Trains through the bundle's own ``bundles/sacbnet/configs/train.yaml`` (MONAI's ``SupervisedTrainer`` with the
paper's unsupervised objective, Eq. 1: squared LNCC on a 9^3 box + lambda x diffusion, lambda = 1 as for brain
inter-subject registration; the paper's channels, 7 clusters) on BrainSynth training pairs, with the config's
validation (``SupervisedEvaluator`` + ``LabelDice``) on the BrainSynth ``registration_val`` pairs at the working size,
over the 30 largest structures. It prints, per epoch, the mean training loss and its parts, the learning rate and
the validation Dice; row 0 is the untrained network, whose field is not the identity (the soft matching of random
features moves up to a voxel per level), so the Dice of the identity map (the affinely aligned pairs) is printed
too. The verdict compares the loss of the first and the last epoch.

The images (80x96x96 at 2 mm) are resized to a working size divisible by 16 (default 48x64x64, so that a run
takes a few minutes on 2 CPU cores; ``--size 80 96 96`` trains at the data's own resolution). A few dozen
iterations are far from the paper's 300 epochs, so the learning rate is raised (1e-3 instead of 1e-4; the bundle's
polynomial decay with power 0.9, stepped every epoch as the reference code). The settings are printed with the
results.

    python benchmarks/sacbnet_short_training.py [--size 48 64 64] [--epochs 4] [--pairs 20] [--threads 2]
        [--validation-pairs N]
"""

from __future__ import annotations

import argparse

from bundle_training import add_shared_arguments, brainsynth, run_benchmark


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(48, 64, 64), help="working size, each divisible by 16")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=20, help="training pairs per epoch")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lam", type=float, default=1.0, help="diffusion weight (SACBNET_LAMBDAS: LPBA 1)")
    parser.add_argument("--clusters", type=int, default=7, help="K-Means clusters per SACB (paper: 7)")
    add_shared_arguments(parser)
    return parser.parse_args()


def main() -> None:
    arguments = parse_args()
    data, labels = brainsynth(arguments)
    print(
        f"BrainSynth, {'x'.join(map(str, arguments.size))}, SACB-Net ({arguments.clusters} clusters), "
        f"{arguments.pairs} pairs/epoch, batch {arguments.batch_size}, lr {arguments.learning_rate} (polynomial decay "
        f"0.9 per epoch), lambda {arguments.lam}, {arguments.threads} threads; bundles/sacbnet/configs/train.yaml"
    )
    settings = {
        **data,
        "input_size": list(arguments.size),
        "num_clusters": arguments.clusters,
        "batch_size": arguments.batch_size,
        "lam": arguments.lam,
    }
    run_benchmark("sacbnet", arguments, settings, labels, ("similarity", "diffusion"), default_dataset="BrainSynth")


if __name__ == "__main__":
    main()
