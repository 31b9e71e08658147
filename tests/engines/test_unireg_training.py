"""UniReg's objective against the losses computed directly (per-task priors, Dice only for supervised tasks), and
field instance optimisation (the training itself is bundles/unireg's train.yaml, tested in tests/bundles)."""

from __future__ import annotations

import pytest
import torch

from monai_unireg import spatial
from monai_unireg.data.synthetic import make_synthetic_pair
from monai_unireg.engines import UNIREG_LAMBDAS, FieldOptimised, UniRegObjective, optimise_field
from monai_unireg.losses import LNCCLoss, MINDSSCLoss, diffusion_regularisation, soft_dice_loss
from monai_unireg.networks.nets import UniReg

SIZE = (16, 16, 16)
TASKS = ("brain", "pelvis")


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
