"""A short UniReg training on two shared datasets: does the loss fall and the validation Dice rise on both?

Trains UniReg (shared encoder-decoder, control vector [task one-hot, registration type, pooled features], dynamic
1x1x1 head 8 -> 8 -> 8 -> 3) with the paper's objective (Eq. 6: NCC + lambda_task x diffusion, plus the Dice loss of
the tasks with labels) on random training pairs of two tasks: BrainSynth as "brain" / inter-subject and
ProstateMRUS as "pelvis" / intra-subject (MR to ultrasound of one patient), both with label supervision and
lambda 1. Per epoch it reports the mean training loss and its parts and the mean Dice of each dataset's
``registration_val`` pairs at the working size, with that dataset's condition: BrainSynth over its 30 largest
structures, ProstateMRUS over the prostate gland (label 1). Row 0 is the untrained network (the objective on the
pairs of epoch 1, without gradients); its head starts near zero, so its Dice is the identity map's. After training
it prints how much the field changes when only the task code (or only the registration type) is changed, on the
first validation pair of each dataset. ``--static-head`` trains the paper's Table 6 ablation.

The paper trains at 192 x 192 x 160 for 120k iterations with SGD (momentum 0.99, learning rate 5e-5). To take
minutes on 2 CPU cores the images are resized to a small working size (default 48^3, trilinear; labels nearest)
and the run is a few hundred iterations with Adam (the paper's option) at 1e-4 and the head at 30 times that rate
(``head_learning_rate_scale`` of ``train_unireg``). Validation pairs are images the training also draws from: this
shows that training works, not how it generalises. The settings are printed with the results.

    python benchmarks/unireg_short_training.py [--size 48 48 48] [--epochs 5] [--pairs 30]
        [--learning-rate 1e-4] [--head-scale 30] [--static-head] [--threads 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from monai_unireg.data import PairSampler, load_learn2reg
from monai_unireg.engines import UniRegObjective, UniRegPairLoader, train_unireg, validation_dice
from monai_unireg.networks.nets import UniReg

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
#: Training datasets, their condition and the key of their JSON that lists the labels to score.
DATASETS = (
    ("BrainSynth", ("brain", "inter"), "dice_top30_labels"),
    ("ProstateMRUS", ("pelvis", "intra"), "evaluation_labels"),
)
CONDITIONS = {name: condition for name, condition, _ in DATASETS}
LAMBDAS = {"brain": 1.0, "pelvis": 1.0}
PARTS = ("similarity", "smoothness", "dice")
CPU = torch.device("cpu")
Validation = dict[str, tuple[list[dict[str, str]], list[int]]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(48, 48, 48), help="working size, each divisible by 8")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=30, help="training pairs per dataset and epoch")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="Adam rate of the backbone")
    parser.add_argument("--head-scale", type=float, default=30.0, help="the head's rate / the backbone's")
    parser.add_argument("--static-head", action="store_true", help="the Table 6 ablation: one static head")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def validate(network: UniReg, validation: Validation, loader: UniRegPairLoader) -> dict[str, float]:
    """Mean Dice of each dataset's validation pairs (its own labels and condition) at the working size."""
    return {
        name: validation_dice(network, pairs, loader, CPU, labels, ("task", "reg_type"))
        for name, (pairs, labels) in validation.items()
    }


def untrained_terms(network: UniReg, sampler: PairSampler, loader: UniRegPairLoader) -> dict[str, float]:
    """Mean objective (and parts) of ``network`` over the pairs of epoch 1 (one at a time, without gradients)."""
    objective = UniRegObjective(network.tasks, LAMBDAS, supervised_tasks=tuple(LAMBDAS))
    totals: dict[str, float] = {}
    pairs = sampler.pairs_for_epoch(0)
    with torch.no_grad():
        for pair in pairs:
            batch = {key: value[None] for key, value in loader(pair).items()}
            for name, value in objective(network, batch).as_floats().items():
                totals[name] = totals.get(name, 0.0) + value
    return {name: value / len(pairs) for name, value in totals.items()}


def condition_effect(network: UniReg, validation: Validation, loader: UniRegPairLoader) -> str:
    """Mean |change| of the field (voxels) on each dataset's first validation pair when the task or type changes."""
    lines = []
    with torch.no_grad():
        for name, (pairs, _) in validation.items():
            item = loader(pairs[0])
            moving, fixed = item["moving"][None], item["fixed"][None]
            task, kind = CONDITIONS[name]
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


def row(epoch: int, record: dict[str, float], dice: dict[str, float]) -> str:
    """One line of the table."""
    parts = " ".join(f"{record[name]:>11.5f}" if name in record else f"{'':>11}" for name in PARTS)
    scores = " ".join(f"{dice[name]:>12.4f}" for name, _, _ in DATASETS)
    return f"{epoch:>5} {record['loss']:8.5f} {parts} {scores}"


def main() -> None:
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(arguments.seed)
    jsons = [DATA / name / f"{name}_dataset.json" for name, _, _ in DATASETS]
    validation: Validation = {
        name: (
            [dict(pair, dataset=name) for pair in load_learn2reg(path, "registration_val")],
            json.loads(path.read_text())[key],
        )
        for (name, _, key), path in zip(DATASETS, jsons)
    }
    network = UniReg(arguments.size, tasks=tuple(LAMBDAS), dynamic_head=not arguments.static_head)
    sampler = PairSampler(jsons, arguments.pairs, seed=arguments.seed)
    loader = UniRegPairLoader(network, CONDITIONS)
    size = "x".join(str(s) for s in network.input_size)
    print(
        f"BrainSynth (brain, inter) + ProstateMRUS (pelvis, intra), {size}, UniReg "
        f"({sum(p.numel() for p in network.parameters()):,} parameters, "
        f"{'static' if arguments.static_head else 'dynamic'} head), {arguments.pairs} pairs per dataset and epoch, "
        f"batch 1, Adam {arguments.learning_rate} (head x{arguments.head_scale:g}), lambdas {LAMBDAS}, Dice "
        f"supervision on both, {arguments.threads} threads"
    )
    started = time.perf_counter()
    initial_dice = validate(network, validation, loader)
    initial = untrained_terms(network, sampler, loader)
    print(
        f"epoch 0 (untrained): loss {initial['loss']:.5f}, validation Dice "
        + ", ".join(f"{k} {v:.4f}" for k, v in initial_dice.items())
    )
    dice: list[dict[str, float]] = []

    def log(message: str) -> None:
        if " done: " in message:
            dice.append(validate(network, validation, loader))
            print(message + "; validation Dice " + ", ".join(f"{k} {v:.4f}" for k, v in dice[-1].items()), flush=True)

    with tempfile.TemporaryDirectory() as output:
        history = train_unireg(
            network,
            sampler,
            output,
            arguments.epochs,
            CONDITIONS,
            LAMBDAS,
            supervised_tasks=tuple(LAMBDAS),
            optimizer="adam",
            learning_rate=arguments.learning_rate,
            head_learning_rate_scale=arguments.head_scale,
            seed=arguments.seed,
            log=log,
        )
    heading = " ".join(f"{name:>11}" for name in PARTS)
    print(f"\n{'epoch':>5} {'loss':>8} {heading} " + " ".join(f"{name:>12}" for name, _, _ in DATASETS))
    print(row(0, initial, initial_dice))
    for record, scores in zip(history, dice):
        print(row(int(record["epoch"]), record, scores))
    final_loss = history[-1]["loss"]
    print(
        f"loss {initial['loss']:.5f} -> {final_loss:.5f} ({'fell' if final_loss < initial['loss'] else 'DID NOT FALL'})"
        + "".join(
            f"; {name} Dice {initial_dice[name]:.4f} -> {dice[-1][name]:.4f} "
            f"({'rose' if dice[-1][name] > initial_dice[name] else 'DID NOT RISE'})"
            for name, _, _ in DATASETS
        )
        + f"; {time.perf_counter() - started:.0f} s"
    )
    print("condition: " + condition_effect(network, validation, loader))


if __name__ == "__main__":
    main()
