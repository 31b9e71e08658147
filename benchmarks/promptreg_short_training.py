"""A short PromptReg training on two shared datasets: does the loss fall and the validation Dice rise on both?

Trains PromptReg (the RDP backbone with the Registration Prompt Generator, one knowledge-base prompt per dataset)
with the paper's objective (Eq. 6: MIND-SSC + 0.1 x diffusion + 0.001 x orthogonality + 0.001 x task similarity;
Adam, polynomial learning-rate decay with power 0.9 per iteration, batch 1) on random training pairs of BrainSynth
(inter-subject brain MR, domain 0) and ProstateMRUS (intra-patient MR to ultrasound, domain 1), and reports, per
epoch, the mean training loss and its parts and the mean Dice of each dataset's ``registration_val`` pairs at the
working size: BrainSynth over its 30 largest structures, ProstateMRUS over the prostate gland (label 1). The row
of epoch 0 is the untrained network (the objective on the pairs of epoch 1, without gradients); its velocity heads
start at N(0, 1e-5), so its field is close to the identity, whose Dice (the input pairs: affinely aligned brains,
the MR resized onto the ultrasound grid) is printed too. ``--no-prompt`` trains the backbone alone (the paper's
"w/o RPG" ablation: no prompt losses). ``train_promptreg`` scores one set of validation pairs with one label list
(and reads them with its training loader, which needs a domain per pair), so the two datasets' Dice are computed
here, after every epoch, from its progress callback.

The paper trains at 160^3 with base channels 16 for 300 epochs of 100 pairs per dataset at a learning rate of
1e-4. To take about 8 minutes on 2 idle CPU cores the images are resized to a working size divisible by 8 (default
48^3, trilinear, as the paper resizes everything to 160^3; labels nearest), the base channels are halved (8; the
time per iteration hardly depends on them) and the run is 300 iterations, so the learning rate is raised, but only
to 2e-4 (polynomial decay to 0 over the run). Measured with 4 epochs of 30 pairs per dataset, final BrainSynth /
ProstateMRUS Dice against 0.546 / 0.544 untrained: 1e-4 gives 0.544 / 0.611, 2e-4 0.561 / 0.603, 3e-4 0.561 /
0.584; 1e-3 diverges (one Adam step moves the velocity heads so that the field jumps to about 11 voxels mean
displacement; loss 0.137 -> 0.151 and Dice 0.00 after epoch 1). The BrainSynth Dice first falls (to 0.35-0.48 in
the first 2-3 epochs, also with the paper's 1e-4 and without the prompt) and climbs above the untrained network's
only in the last epochs, as the rate decays; ProstateMRUS gains within the first epoch. Validation pairs are
images the training also draws from (BrainSynth's 10 cases; ProstateMRUS's first 5 of its 25 training pairs): this
shows that training works, not how it generalises. The settings are printed with the results.

    python benchmarks/promptreg_short_training.py [--size 48 48 48] [--channels 8] [--epochs 5] [--pairs 30]
        [--learning-rate 2e-4] [--no-prompt] [--threads 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from monai_unireg.data import PairSampler, load_learn2reg
from monai_unireg.engines import (
    DomainPairLoader,
    PairLoader,
    PromptRegObjective,
    train_promptreg,
    validation_dice,
)
from monai_unireg.networks.nets import PromptReg

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
#: The training datasets (domain = position) and the key of their JSON that lists the labels to score.
DATASETS = (("BrainSynth", "dice_top30_labels"), ("ProstateMRUS", "evaluation_labels"))
PARTS = ("similarity", "diffusion", "orthogonality", "task_similarity")
CPU = torch.device("cpu")
Validation = dict[str, tuple[list[dict[str, str]], list[int]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(48, 48, 48), help="working size, each divisible by 8")
    parser.add_argument("--channels", type=int, default=8, help="base channels (paper: 16)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=30, help="training pairs per dataset and epoch (paper: 100)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="initial Adam rate (paper: 1e-4)")
    parser.add_argument("--no-prompt", action="store_true", help="the backbone alone (the 'w/o RPG' ablation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class ZeroField(torch.nn.Module):
    """The identity map (zero displacement): the Dice of the input pairs at the working size."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return moving.new_zeros(moving.shape[0], 3, *moving.shape[2:])


def validate(network: torch.nn.Module, validation: Validation, loader: PairLoader) -> dict[str, float]:
    """Mean Dice of each dataset's validation pairs (its own labels) at the working size."""
    return {name: validation_dice(network, pairs, loader, CPU, labels) for name, (pairs, labels) in validation.items()}


def untrained_terms(network: PromptReg, sampler: PairSampler, loader: DomainPairLoader) -> dict[str, float]:
    """Mean objective (and parts) of ``network`` over the pairs of epoch 1 (one at a time, without gradients)."""
    objective = PromptRegObjective()
    totals: dict[str, float] = {}
    pairs = sampler.pairs_for_epoch(0)
    with torch.no_grad():
        for pair in pairs:
            item = loader(pair)
            batch = {key: value[None] for key, value in item.items()}
            for name, value in objective(network, batch).as_floats().items():
                totals[name] = totals.get(name, 0.0) + value
    return {name: value / len(pairs) for name, value in totals.items()}


def row(epoch: int, record: dict[str, float], dice: dict[str, float]) -> str:
    """One line of the table (parts absent without the prompt are left blank)."""
    parts = " ".join(f"{record[name]:>15.5f}" if name in record else f"{'':>15}" for name in PARTS)
    scores = " ".join(f"{dice[name]:>12.4f}" for name, _ in DATASETS)
    return f"{epoch:>5} {record['loss']:8.5f} {parts} {record['learning_rate']:9.2e} {scores}"


def main() -> None:
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(arguments.seed)
    jsons = [DATA / name / f"{name}_dataset.json" for name, _ in DATASETS]
    validation: Validation = {
        name: (load_learn2reg(path, "registration_val"), json.loads(path.read_text())[key])
        for (name, key), path in zip(DATASETS, jsons)
    }
    network = PromptReg(
        arguments.size, num_domains=len(DATASETS), channels=arguments.channels, use_prompt=not arguments.no_prompt
    )
    sampler = PairSampler(jsons, arguments.pairs, seed=arguments.seed)
    loader = PairLoader(network.input_size)
    size = "x".join(str(s) for s in network.input_size)
    print(
        f"BrainSynth + ProstateMRUS, {size}, PromptReg ({sum(p.numel() for p in network.parameters()):,} "
        f"parameters, channels {arguments.channels}, prompt generator {'off' if arguments.no_prompt else 'on'}), "
        f"{arguments.pairs} pairs per dataset and epoch, batch 1, lr {arguments.learning_rate} (polynomial decay "
        f"0.9), {arguments.threads} threads"
    )
    started = time.perf_counter()
    identity = validate(ZeroField(), validation, loader)
    initial_dice = validate(network, validation, loader)
    initial = untrained_terms(network, sampler, DomainPairLoader(network.input_size))
    print("identity map: validation Dice " + ", ".join(f"{k} {v:.4f}" for k, v in identity.items()))
    print(
        f"epoch 0 (untrained): loss {initial['loss']:.5f}, validation Dice "
        + ", ".join(f"{k} {v:.4f}" for k, v in initial_dice.items())
    )
    dice: list[dict[str, float]] = []

    def log(message: str) -> None:
        if " done: " in message:
            dice.append(validate(network, validation, loader))
            print(message + "; validation Dice " + ", ".join(f"{k} {v:.4f}" for k, v in dice[-1].items()))

    with tempfile.TemporaryDirectory() as output:
        history = train_promptreg(
            network,
            sampler,
            output,
            epochs=arguments.epochs,
            learning_rate=arguments.learning_rate,
            seed=arguments.seed,
            log=log,
        )
    heading = " ".join(f"{name:>15}" for name in PARTS)
    print(f"\n{'epoch':>5} {'loss':>8} {heading} {'lr':>9} " + " ".join(f"{name:>12}" for name, _ in DATASETS))
    print(row(0, {**initial, "learning_rate": arguments.learning_rate}, initial_dice))
    for record, scores in zip(history, dice):
        print(row(int(record["epoch"]), record, scores))
    final_loss = history[-1]["loss"]
    print(
        f"loss {initial['loss']:.5f} -> {final_loss:.5f} ({'fell' if final_loss < initial['loss'] else 'DID NOT FALL'})"
        + "".join(
            f"; {name} Dice {initial_dice[name]:.4f} -> {dice[-1][name]:.4f} "
            f"({'rose' if dice[-1][name] > initial_dice[name] else 'DID NOT RISE'}; identity {identity[name]:.4f})"
            for name, _ in DATASETS
        )
        + f"; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
