"""A short SACB-Net training on a shared dataset: does the loss fall and the validation Dice rise?

Trains a SACB-Net (the paper's channels, 7 clusters) with the paper's unsupervised objective (Eq. 1: squared
LNCC on a 9^3 box + lambda x diffusion, lambda = 1 as for brain inter-subject registration) on BrainSynth training
pairs, and reports, per epoch, the mean training loss and the mean Dice (30 largest structures) of the BrainSynth
``registration_val`` pairs at the working size, starting from the untrained network. The row of epoch 0 gives the
objective of the untrained network on the pairs of epoch 1; its field is not the identity (the soft matching of
random features moves up to a voxel per level), so the Dice of the identity map (the affinely aligned pairs) is
printed too.

The images (80x96x96 at 2 mm) are resized to a working size divisible by 16 (default 48x64x64, so that a run
takes a few minutes on 2 CPU cores; ``--size 80 96 96`` trains at the data's own resolution). A few dozen
iterations are far from the paper's 300 epochs, so the learning rate is raised (1e-3 instead of 1e-4; polynomial
decay with power 0.9 over the run, as the reference code). The settings are printed with the results.

    python benchmarks/sacbnet_short_training.py [--size 48 64 64] [--epochs 4] [--pairs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from monai_unireg.data import PairSampler, load_learn2reg
from monai_unireg.engines import PairLoader, SACBNetObjective, train_sacbnet, validation_dice
from monai_unireg.networks.nets.sacbnet import SACBNet

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(48, 64, 64), help="working size, each divisible by 16")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=20, help="training pairs per epoch")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lam", type=float, default=1.0, help="diffusion weight (SACBNET_LAMBDAS: LPBA 1)")
    parser.add_argument("--clusters", type=int, default=7, help="K-Means clusters per SACB (paper: 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class ZeroField(torch.nn.Module):
    """The identity map (zero displacement): the Dice of the affinely aligned pairs at the working size."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return moving.new_zeros(moving.shape[0], 3, *moving.shape[2:])


def untrained_loss(network: SACBNet, sampler: PairSampler, loader: PairLoader, lam: float) -> float:
    """Mean objective of ``network`` over the pairs of epoch 1 (one at a time, without gradients)."""
    objective = SACBNetObjective(lam=lam)
    values = []
    with torch.no_grad():
        for pair in sampler.pairs_for_epoch(0):
            item = loader(pair)
            values.append(
                float(objective(network, {"moving": item["moving"][None], "fixed": item["fixed"][None]}).total)
            )
    return sum(values) / len(values)


def main() -> None:
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(arguments.seed)
    dataset_json = DATA / "BrainSynth" / "BrainSynth_dataset.json"
    labels = json.loads(dataset_json.read_text())["dice_top30_labels"]
    validation = load_learn2reg(dataset_json, "registration_val")
    network = SACBNet(input_size=arguments.size, num_clusters=arguments.clusters, seed=arguments.seed)
    loader = PairLoader(network.input_size)
    sampler = PairSampler([dataset_json], arguments.pairs, seed=arguments.seed)
    size = "x".join(str(s) for s in network.input_size)
    print(
        f"BrainSynth, {size}, SACB-Net ({sum(p.numel() for p in network.parameters()):,} parameters, "
        f"{arguments.clusters} clusters), {arguments.pairs} pairs/epoch, batch {arguments.batch_size}, "
        f"lr {arguments.learning_rate} (polynomial decay 0.9), lambda {arguments.lam}, {arguments.threads} threads"
    )
    started = time.perf_counter()
    identity_dice = validation_dice(ZeroField(), validation, loader, torch.device("cpu"), labels)
    initial_dice = validation_dice(network, validation, loader, torch.device("cpu"), labels)
    initial_loss = untrained_loss(network, sampler, loader, arguments.lam)
    print(f"identity map: validation Dice {identity_dice:.4f}")
    print(f"epoch 0: loss {initial_loss:.4f}, validation Dice {initial_dice:.4f} (untrained)")
    with tempfile.TemporaryDirectory() as output:
        history = train_sacbnet(
            network,
            sampler,
            output,
            epochs=arguments.epochs,
            lam=arguments.lam,
            learning_rate=arguments.learning_rate,
            batch_size=arguments.batch_size,
            validation_pairs=validation,
            validation_labels=labels,
            seed=arguments.seed,
            log=lambda message: print(message) if "done" in message else None,
        )
    print(f"\n{'epoch':>5} {'loss':>8} {'similarity':>10} {'diffusion':>9} {'lr':>9} {'val Dice':>8}")
    print(f"{0:>5} {initial_loss:8.4f} {'':>10} {'':>9} {arguments.learning_rate:9.2e} {initial_dice:8.4f}")
    for record in history:
        print(
            f"{record['epoch']:>5} {record['loss']:8.4f} {record['similarity']:10.4f} {record['diffusion']:9.4f} "
            f"{record['learning_rate']:9.2e} {record['validation_dice']:8.4f}"
        )
    final_loss, final_dice = history[-1]["loss"], history[-1]["validation_dice"]
    print(
        f"loss {initial_loss:.4f} -> {final_loss:.4f} ({'fell' if final_loss < initial_loss else 'DID NOT FALL'}); "
        f"validation Dice {initial_dice:.4f} -> {final_dice:.4f} "
        f"({'rose' if final_dice > initial_dice else 'DID NOT RISE'}; identity map {identity_dice:.4f}); "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
