"""The shared training loop: exact resume, learning-rate schedule, atomic checkpoints, batches, errors."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.data import PairSampler, load_learn2reg
from monai_unireg.engines import LossTerms, PairLoader, polynomial_decay, train_registration

SIZE = (16, 16, 16)


class RecordingObjective(nn.Module):
    """``factor * MSE(warp(moving, ddf), fixed) + 0.1 * mean(ddf^2)``, ``factor`` drawn from its own generator (so
    an exact resume needs the per-epoch :meth:`reseed`); records the keys of every batch and the optimiser's rate."""

    def __init__(self, optimizers: list[torch.optim.Optimizer] | None = None) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(123)
        self.optimizers = optimizers
        self.keys: list[list[str]] = []
        self.rates: list[float] = []

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def forward(self, network: nn.Module, batch: dict[str, torch.Tensor]) -> LossTerms:
        self.keys.append(sorted(batch))
        if self.optimizers:
            self.rates.append(self.optimizers[0].param_groups[0]["lr"])
        ddf = network(batch["moving"], batch["fixed"])
        similarity = (spatial.warp(batch["moving"], ddf) - batch["fixed"]).square().mean()
        smoothness = ddf.square().mean()
        factor = 1.0 + 0.1 * float(torch.rand((), generator=self.generator))
        return LossTerms(factor * similarity + 0.1 * smoothness, similarity=similarity, smoothness=smoothness)


def add_noise(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """An augmentation drawing from the loop's generator."""
    return {**batch, "moving": batch["moving"] + 0.01 * torch.randn(batch["moving"].shape, generator=generator)}


def train(network: nn.Module, datasets: list[Path], output: Path, epochs: int, **settings: Any) -> list[dict]:
    arguments = {
        "objective": RecordingObjective(),
        "sampler": PairSampler(datasets, 4, seed=1),
        "loader": PairLoader(SIZE),
        "batch_size": 2,
        "learning_rate": 1e-2,
        "log": lambda _: None,
        **settings,
    }
    return train_registration(network, output_dir=output, epochs=epochs, **arguments)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality of (nested) state dictionaries; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


class Interrupted(Exception):
    """A crash in the middle of training."""


def interrupt_in_epoch_two(message: str) -> None:
    if message.startswith("epoch 2/"):
        raise Interrupted(message)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_resume_is_exact(tmp_path, tiny_datasets, tiny_network):
    datasets = [tiny_datasets["labelled"]]
    settings = {"scheduler_factory": functools.partial(polynomial_decay, power=0.9), "augmentation": add_noise}
    straight = tiny_network()
    history = train(straight, datasets, tmp_path / "straight", 2, **settings)
    assert [record["epoch"] for record in history] == [1, 2]
    assert {"loss", "similarity", "smoothness", "learning_rate", "seconds"} <= set(history[0])

    with pytest.raises(Interrupted):  # the same run, stopped during epoch 2 (the schedule spans both epochs)
        train(tiny_network(), datasets, tmp_path / "resumed", 2, log=interrupt_in_epoch_two, **settings)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    messages: list[str] = []
    resumed = tiny_network(seed=5)  # a different start: everything must come from the checkpoint
    history_resumed = train(resumed, datasets, tmp_path / "resumed", 2, log=messages.append, **settings)
    assert messages[0].startswith("resumed from") and "at epoch 1" in messages[0]
    assert_same(straight.state_dict(), resumed.state_dict(), "model")
    assert without_seconds(history) == without_seconds(history_resumed)
    one = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    other = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for key in ("config", "model", "optimizer", "scheduler", "sampler", "epoch"):
        assert_same(one[key], other[key], key)
    assert other["epoch"] == 2 and other["sampler"]["epoch"] == 1


def test_learning_rate_follows_the_polynomial_schedule(tmp_path, tiny_datasets, tiny_network):
    optimizers: list[torch.optim.Optimizer] = []

    def adam(parameters, lr: float) -> torch.optim.Optimizer:
        optimizers.append(torch.optim.Adam(parameters, lr=lr))
        return optimizers[-1]

    objective = RecordingObjective(optimizers)
    history = train(
        tiny_network(),
        [tiny_datasets["labelled"]],
        tmp_path,
        3,
        objective=objective,
        batch_size=1,
        optimizer_factory=adam,
        scheduler_factory=functools.partial(polynomial_decay, power=0.9),
        max_iterations_per_epoch=3,
    )
    total = 3 * 3  # epochs x iterations per epoch (capped)
    expected = [1e-2 * (1 - iteration / total) ** 0.9 for iteration in range(total)]
    torch.testing.assert_close(torch.tensor(objective.rates), torch.tensor(expected), rtol=1e-12, atol=0.0)
    after_epochs = [1e-2 * (1 - 3 * epoch / total) ** 0.9 for epoch in (1, 2, 3)]
    torch.testing.assert_close(torch.tensor([r["learning_rate"] for r in history]), torch.tensor(after_epochs))
    assert history[-1]["learning_rate"] == 0.0


def test_polynomial_decay_matches_torch_polynomial_lr():
    rates = []
    for make in (
        lambda optimizer: polynomial_decay(optimizer, 10, power=0.9),
        lambda optimizer: torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=10, power=0.9),
    ):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler = make(optimizer)
        steps = []
        for _ in range(12):
            steps.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        rates.append(steps)
    torch.testing.assert_close(torch.tensor(rates[0]), torch.tensor(rates[1]))


def test_checkpoints_are_written_atomically(tmp_path, tiny_datasets, tiny_network, monkeypatch):
    network = tiny_network()
    train(network, [tiny_datasets["labelled"]], tmp_path, 1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(checkpoint) == {"method", "config", "model", "optimizer", "sampler", "epoch", "history"}
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(model) == {"method", "config", "model"} and model["method"] == type(network).__name__
    rebuilt = type(network)(**model["config"])
    rebuilt.load_state_dict(model["model"])
    assert_same(rebuilt.state_dict(), network.state_dict())
    saved = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def failing_save(obj: Any, path: Any) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 2)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == saved


def test_a_killed_save_is_cleaned_and_a_truncated_checkpoint_refused(tmp_path, tiny_datasets, tiny_network):
    train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 1)
    leftover = tmp_path / ".checkpoint.pt.k1ll3d.partial.pt"  # what a kill during torch.save leaves
    leftover.write_bytes(b"half a checkpoint")
    train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 2)
    assert not leftover.exists()
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match="checkpoint to resume .* is truncated or corrupt"):
        train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 3)


def test_batches_hold_labels_only_when_every_pair_has_them(tmp_path, tiny_datasets, tiny_network):
    datasets = [tiny_datasets["labelled"], tiny_datasets["unlabelled"]]
    objective = RecordingObjective()
    train(tiny_network(), datasets, tmp_path / "single", 1, objective=objective, batch_size=1)
    pairs = PairSampler(datasets, 4, seed=1).pairs_for_epoch(0)
    labelled = ["fixed", "fixed_label", "moving", "moving_label"]
    expected = [labelled if "fixed_label" in pair else ["fixed", "moving"] for pair in pairs]
    assert objective.keys == expected
    assert labelled in expected and ["fixed", "moving"] in expected

    mixed = RecordingObjective()
    train(tiny_network(), datasets, tmp_path / "mixed", 1, objective=mixed, batch_size=8)
    assert mixed.keys == [["fixed", "moving"]]


def test_validation_dice_is_recorded(tmp_path, tiny_datasets, tiny_network):
    validation = load_learn2reg(tiny_datasets["labelled"], "registration_val")
    history = train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 1, validation_pairs=validation)
    assert 0.0 < history[0]["validation_dice"] <= 1.0


def test_a_non_finite_loss_stops_training(tmp_path, tiny_datasets, tiny_network):
    def diverging(network: nn.Module, batch: dict[str, torch.Tensor]) -> LossTerms:
        return LossTerms(network(batch["moving"], batch["fixed"]).sum() * float("nan"))

    with pytest.raises(FloatingPointError, match="epoch 1, iteration 1"):
        train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 1, objective=diverging)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"max_iterations_per_epoch": 0}, "max_iterations_per_epoch"),
        ({"seed": -1}, "seed"),
        ({"amp": "yes"}, "amp"),
        ({"resume": 1}, "resume"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, tiny_datasets, tiny_network, settings, name):
    settings = dict(settings)
    epochs = settings.pop("epochs", 1)
    with pytest.raises(ValueError, match=name):
        train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, epochs, **settings)


def test_a_network_without_config_or_a_changed_schedule_is_refused(tmp_path, tiny_datasets, tiny_network):
    with pytest.raises(ValueError, match="config"):
        train(nn.Conv3d(2, 3, 1), [tiny_datasets["labelled"]], tmp_path, 1)
    train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 1)
    with pytest.raises(ValueError, match="scheduler"):
        train(tiny_network(), [tiny_datasets["labelled"]], tmp_path, 2, scheduler_factory=polynomial_decay)


def test_polynomial_decay_and_loss_terms_check_their_arguments():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="total_iterations"):
        polynomial_decay(optimizer, 0)
    with pytest.raises(ValueError, match="power"):
        polynomial_decay(optimizer, 10, power=0.0)
    terms = LossTerms(torch.tensor(3.0), similarity=torch.tensor(1.0), regulariser=torch.tensor(2.0))
    assert terms.similarity == 1.0 and terms.as_floats() == {"loss": 3.0, "similarity": 1.0, "regulariser": 2.0}
    with pytest.raises(AttributeError, match="dice"):
        _ = terms.dice
    with pytest.raises(ValueError, match="loss"):
        LossTerms(torch.tensor(1.0), loss=torch.tensor(1.0))


def test_pair_loader_resizes_images_and_labels(tiny_datasets):
    pair = load_learn2reg(tiny_datasets["labelled"], "registration_val")[0]
    item = PairLoader(SIZE)(pair)
    assert set(item) == {"moving", "fixed", "moving_label", "fixed_label"}
    assert item["moving"].shape == (1, *SIZE) and item["moving"].dtype == torch.float32
    assert 0.0 <= float(item["moving"].min()) and float(item["moving"].max()) <= 1.0
    assert item["fixed_label"].dtype == torch.int64
    assert set(item["fixed_label"].unique().tolist()) <= {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="size"):
        PairLoader((16, 16))
    with pytest.raises(ValueError, match="ct_window"):
        PairLoader(SIZE, ct_window=(1000.0, -1000.0))
