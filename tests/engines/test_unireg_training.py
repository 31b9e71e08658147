"""UniReg training: the objective against the losses computed directly (per-task priors, Dice only for supervised
tasks), the loader's conditions and CT window, training over two tasks (the loss falls, the Dice rises, the task
code matters, exact resume), and field instance optimisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monai_unireg import io, spatial
from monai_unireg.data import PairSampler, load_learn2reg
from monai_unireg.data.synthetic import make_synthetic_pair
from monai_unireg.engines import (
    UNIREG_LAMBDAS,
    FieldOptimised,
    UniRegObjective,
    UniRegPairLoader,
    optimise_field,
    train_unireg,
    validation_dice,
)
from monai_unireg.losses import LNCCLoss, MINDSSCLoss, diffusion_regularisation, soft_dice_loss
from monai_unireg.networks.nets import UniReg

SHARED = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
SIZE = (16, 16, 16)
TASKS = ("brain", "pelvis")
CONDITIONS = {"Tiny": ("brain", "inter"), "TinyNoLabels": ("prostate", "intra")}


def _network(seed: int = 0, **kwargs) -> UniReg:
    torch.manual_seed(seed)
    return UniReg(SIZE, tasks=TASKS, channels=(4, 8, 8, 8), **kwargs)


def _visible_field(network: UniReg, generator: torch.Generator) -> None:
    """Controller weights and a last layer large enough for a field of about a voxel (a new one is ~0)."""
    with torch.no_grad():
        network.head.controller.weight.copy_(torch.randn(network.head.controller.weight.shape, generator=generator))
        network.head.controller.weight.mul_(0.05)
        network.head.controller.bias[-27:].normal_(std=0.3, generator=generator)


def test_objective_is_the_per_sample_sum_with_each_tasks_prior(generator):
    network = _network()
    _visible_field(network, generator)
    shape = (2, 1, *SIZE)
    batch = {
        "moving": torch.rand(shape, generator=generator),
        "fixed": torch.rand(shape, generator=generator),
        "moving_label": torch.randint(0, 3, shape, generator=generator),
        "fixed_label": torch.randint(0, 3, shape, generator=generator),
        "task": torch.tensor([0, 1]),
        "reg_type": torch.tensor([0, 1]),
    }
    objective = UniRegObjective(TASKS, {"brain": 0.5, "pelvis": 10.0}, supervised_tasks=("brain",), dice_weight=2.0)
    terms = objective(network, batch)
    ddf = network(batch["moving"], batch["fixed"], ["brain", "pelvis"], ["inter", "intra"])
    expected = 0.0
    for i, lam in enumerate([0.5, 10.0]):
        moving, fixed, field = batch["moving"][i : i + 1], batch["fixed"][i : i + 1], ddf[i : i + 1]
        similarity = LNCCLoss(kernel_type="box", kernel_size=9)(spatial.warp(moving, field), fixed)
        expected = expected + (similarity + lam * diffusion_regularisation(field)) / 2
    dice = soft_dice_loss(batch["moving_label"][:1], batch["fixed_label"][:1], ddf[:1])
    expected = expected + 2.0 * dice / 2  # only the supervised sample (brain) has the Dice term
    torch.testing.assert_close(terms.total, expected)
    torch.testing.assert_close(terms.dice, dice)
    assert set(terms.as_floats()) == {"loss", "similarity", "smoothness", "dice"}
    mind = UniRegObjective(TASKS, {"brain": 1.0, "pelvis": 1.0}, similarity="mind")(network, batch)
    torch.testing.assert_close(
        mind.similarity, MINDSSCLoss(reduction="none")(spatial.warp(batch["moving"], ddf), batch["fixed"]).mean()
    )
    assert "dice" not in mind.parts


def test_objective_refuses_bad_configuration_and_batches(generator):
    network = _network()
    pair = {"moving": torch.rand(1, 1, *SIZE, generator=generator), "fixed": torch.rand(1, 1, *SIZE)}
    with pytest.raises(ValueError, match="'task'"):
        UniRegObjective(TASKS, {"brain": 1.0})(network, pair)
    with pytest.raises(ValueError, match="no regularisation prior for task 'pelvis'"):
        UniRegObjective(TASKS, {"brain": 1.0})(
            network, {**pair, "task": torch.tensor([1]), "reg_type": torch.tensor([0])}
        )
    with pytest.raises(ValueError, match=r"\['liver'\]"):
        UniRegObjective(TASKS, {"liver": 10.0})
    with pytest.raises(ValueError, match="similarity"):
        UniRegObjective(TASKS, {}, similarity="ssd")
    with pytest.raises(ValueError, match="lambdas"):
        UniRegObjective(TASKS, {"brain": -1.0})
    assert UNIREG_LAMBDAS == {"head_neck": 0.05, "chest": 1.0, "abdomen": 0.1, "liver": 10.0}  # paper Table 8


def test_loader_gives_conditions_and_maps_the_ct_window_to_minus_one_one(tiny_datasets, tmp_path):
    network = _network()
    loader = UniRegPairLoader(network, CONDITIONS)
    sampler = PairSampler([tiny_datasets["labelled"], tiny_datasets["unlabelled"]], pairs_per_dataset=1, seed=0)
    items = {pair["dataset"]: loader(pair) for pair in sampler.pairs_for_epoch(0)}
    assert (int(items["Tiny"]["task"]), int(items["Tiny"]["reg_type"])) == (0, 0)
    assert (int(items["TinyNoLabels"]["task"]), int(items["TinyNoLabels"]["reg_type"])) == (1, 1)  # prostate -> pelvis
    assert items["Tiny"]["moving"].min() == -1.0 and items["Tiny"]["moving"].max() == 1.0  # MRI percentiles -> [-1, 1]
    ct = torch.tensor([-1000.0, -800.0, -200.0, 400.0, 900.0]).repeat_interleave(16 * 16 * 16 // 5 + 1)[: 16**3]
    io.save_nifti(ct.view(16, 16, 16), torch.eye(4), tmp_path / "ct.nii.gz")
    ct_pair = {"fixed_image": tmp_path / "ct.nii.gz", "moving_image": tmp_path / "ct.nii.gz"}
    item = loader({**ct_pair, "task": "bladder", "reg_type": "intra"})  # its own condition, an alias of pelvis
    assert (int(item["task"]), int(item["reg_type"])) == (1, 1)
    values = torch.unique(item["fixed"]).tolist()
    assert min(values) == -1.0 and max(values) == 1.0 and any(abs(v) < 1e-6 for v in values)
    with pytest.raises(ValueError, match="dataset 'Other'"):
        loader({**ct_pair, "dataset": "Other"})
    with pytest.raises(ValueError, match="reg_type"):
        UniRegPairLoader(network, {"Tiny": ("brain", "longitudinal")})
    with pytest.raises(ValueError, match="unknown task 'foot'"):
        UniRegPairLoader(network, {"Tiny": ("foot", "inter")})


class Interrupted(Exception):
    """Raised by a log function to stop a training run part-way."""


def _validation(tiny_datasets) -> list[dict]:
    """The labelled dataset's pairs, tagged with its name (so they are validated as its task)."""
    sampler = PairSampler([tiny_datasets["labelled"]], pairs_per_dataset=3, seed=5)
    return [{k: v for k, v in pair.items() if k != "domain"} for pair in sampler.pairs_for_epoch(0)]


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared data (../shared/data) are absent")
def test_short_training_on_two_shared_datasets_lowers_the_loss_raises_dice_and_makes_the_task_matter(tmp_path):
    """BrainSynth (brain, inter) + ProstateMRUS (pelvis, intra) at 32^3, 48 Adam steps: the objective on a fixed set
    of training pairs falls, the prostate Dice of the validation pairs rises, and the trained controller makes the
    field depend on the task code and the registration type (a new one is the static head: it does not)."""
    torch.manual_seed(0)
    network = UniReg((32, 32, 32), tasks=("brain", "pelvis"))
    jsons = [SHARED / name / f"{name}_dataset.json" for name in ("BrainSynth", "ProstateMRUS")]
    conditions = {"BrainSynth": ("brain", "inter"), "ProstateMRUS": ("pelvis", "intra")}
    lambdas = {"brain": 1.0, "pelvis": 1.0}
    sampler = PairSampler(jsons, pairs_per_dataset=12, seed=0)
    loader = UniRegPairLoader(network, conditions)
    validation = [dict(pair, dataset="ProstateMRUS") for pair in load_learn2reg(jsons[1], "registration_val")]
    objective = UniRegObjective(network.tasks, lambdas, supervised_tasks=("brain", "pelvis"))
    probe = [{key: value[None] for key, value in loader(pair).items()} for pair in sampler.pairs_for_epoch(7)[::3]]

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(objective(network, batch).total) for batch in probe) / len(probe)

    def prostate_dice() -> float:
        return validation_dice(network, validation, loader, torch.device("cpu"), [1], ("task", "reg_type"))

    item = loader(validation[0])
    moving, fixed = item["moving"][None], item["fixed"][None]
    with torch.no_grad():
        assert torch.equal(network(moving, fixed, "brain", "inter"), network(moving, fixed, "pelvis", "intra"))
    loss_before, dice_before = mean_loss(), prostate_dice()
    train_unireg(
        network,
        sampler,
        tmp_path,
        2,
        conditions,
        lambdas,
        supervised_tasks=("brain", "pelvis"),
        optimizer="adam",
        learning_rate=1e-4,
        head_learning_rate_scale=30.0,
        log=lambda _: None,
    )
    loss_after, dice_after = mean_loss(), prostate_dice()
    assert loss_after < loss_before, (loss_before, loss_after)
    assert dice_after > dice_before, (dice_before, dice_after)
    with torch.no_grad():
        pelvis = network(moving, fixed, "pelvis", "intra")
        assert (network(moving, fixed, "brain", "intra") - pelvis).norm(dim=1).mean() > 0.01
        assert (network(moving, fixed, "pelvis", "inter") - pelvis).norm(dim=1).mean() > 0.01


def test_training_resumes_exactly_and_checks_its_configuration(tiny_datasets, tmp_path):
    datasets = [tiny_datasets["labelled"], tiny_datasets["unlabelled"]]

    def stop_in_epoch_two(line: str) -> None:
        if line.startswith("epoch 2/2 iteration"):
            raise Interrupted

    def run(folder, log=lambda _: None, **kwargs):
        network = _network(**kwargs)
        sampler = PairSampler(datasets, pairs_per_dataset=2, seed=0)
        history = train_unireg(
            network,
            sampler,
            folder,
            2,
            CONDITIONS,
            {"brain": 1.0, "pelvis": 1.0},
            supervised_tasks=("brain",),
            learning_rate=1e-3,
            validation_pairs=_validation(tiny_datasets),
            log=log,
        )
        return network, history

    straight, history = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", stop_in_epoch_two)
    resumed, resumed_history = run(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "model.pt").is_file() and len(history) == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in history] == [r["loss"] for r in resumed_history]
    state = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert "momentum_buffer" in str(state["optimizer"]["state"])  # SGD with momentum, the paper's optimiser
    backbone, head = state["optimizer"]["param_groups"]
    assert (backbone["lr"], head["lr"], head["momentum"]) == (1e-3, 30 * 1e-3, 0.99)  # the head at 30x the rate
    static, _ = run(tmp_path / "static", dynamic_head=False)
    assert static.config["dynamic_head"] is False
    sampler = PairSampler(datasets, pairs_per_dataset=2, seed=0)
    with pytest.raises(ValueError, match=r"\['TinyNoLabels'\]"):
        train_unireg(_network(), sampler, tmp_path / "bad", 1, {"Tiny": ("brain", "inter")}, {"brain": 1.0})
    with pytest.raises(ValueError, match="no regularisation prior for task 'pelvis'"):
        train_unireg(_network(), sampler, tmp_path / "bad", 1, CONDITIONS, {"brain": 1.0})
    with pytest.raises(ValueError, match="optimizer"):
        train_unireg(
            _network(), sampler, tmp_path / "bad", 1, CONDITIONS, {"brain": 1.0, "pelvis": 1.0}, optimizer="lbfgs"
        )


def test_validation_scores_each_pairs_own_evaluation_labels(tiny_datasets):
    network = _network()
    _visible_field(network, torch.Generator().manual_seed(0))
    loader = UniRegPairLoader(network, CONDITIONS)
    pairs = _validation(tiny_datasets)
    cpu, conditions = torch.device("cpu"), ("task", "reg_type")
    for labels in ([1], [2, 3]):
        tagged = [{**pair, "evaluation_labels": labels} for pair in pairs]
        expected = validation_dice(network, pairs, loader, cpu, labels, conditions)
        assert validation_dice(network, tagged, loader, cpu, None, conditions) == expected
        assert validation_dice(network, tagged, loader, cpu, [1, 2, 3, 4], conditions) == validation_dice(
            network, pairs, loader, cpu, [1, 2, 3, 4], conditions
        )  # an explicit list wins


def test_field_instance_optimisation_recovers_a_known_deformation():
    pair = make_synthetic_pair((24, 24, 24), max_displacement=2.0, seed=3)
    moving, fixed = pair.moving / pair.moving.max(), pair.fixed / pair.fixed.max()
    similarity = LNCCLoss(kernel_type="box", kernel_size=5)
    zero = torch.zeros(1, 3, 24, 24, 24)
    ddf, losses = optimise_field(moving, fixed, zero, similarity, smoothness=0.5, iterations=60, log=None)
    assert len(losses) == 61 and losses[-1] < 0.8 * losses[0]
    error_before = (pair.true_ddf - zero).norm(dim=1).mean()
    error_after = (pair.true_ddf - ddf).norm(dim=1).mean()
    assert error_after < 0.8 * error_before, (float(error_before), float(error_after))
    same, only = optimise_field(moving, fixed, ddf, similarity, iterations=0, log=None)
    assert torch.equal(same, ddf) and len(only) == 1

    class Constant(torch.nn.Module):
        def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
            return zero

    refined = FieldOptimised(Constant(), similarity, smoothness=0.5, iterations=60, log=None)
    with torch.no_grad():  # IO works where inference runs without gradients
        torch.testing.assert_close(refined(moving, fixed), ddf)
    with pytest.raises(ValueError, match="initial_ddf"):
        optimise_field(moving, fixed, zero[:, :2], similarity, log=None)
    with pytest.raises(ValueError, match="iterations"):
        optimise_field(moving, fixed, zero, similarity, iterations=-1, log=None)
