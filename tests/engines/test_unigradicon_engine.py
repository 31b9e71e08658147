"""uniGradICON's objective, augmentation, starting weights and instance optimisation on small configurations (the
bundle's train.yaml trains with them in tests/bundles/test_unigradicon_bundle.py)."""

from __future__ import annotations

import json

import pytest
import torch

from monai_unireg import spatial
from monai_unireg.data import load_learn2reg
from monai_unireg.engines import (
    GradICONObjective,
    RandomPairAugmentationd,
    StartingWeights,
    instance_optimise,
    read_volume,
    stage_two_from_stage_one,
)
from monai_unireg.losses import LNCCLoss
from monai_unireg.networks.nets import UniGradICON

SMALL = {"input_size": 32, "down_channels": (4, 8, 8), "up_channels": (4, 8, 8)}


def small_network(include_step2: bool = False, seed: int = 0) -> UniGradICON:
    torch.manual_seed(seed)
    return UniGradICON(include_step2=include_step2, **SMALL)


def test_objective_of_the_identity_network_is_the_similarity_alone(generator):
    a, b = torch.rand(2, 1, 32, 32, 32, generator=generator), torch.rand(2, 1, 32, 32, 32, generator=generator)
    terms = GradICONObjective()(small_network(), a, b)
    assert float(terms.gradicon.detach()) == 0.0
    expected = LNCCLoss(sigma=5.0)(a, b) + LNCCLoss(sigma=5.0)(b, a)
    torch.testing.assert_close(terms.total, expected)


def _randomised(network: UniGradICON) -> UniGradICON:
    """``network`` with its zero-initialised last convolutions drawn at random, so every step moves."""
    with torch.no_grad():
        for unet in network.unets:
            for parameter in unet.parameters():
                if parameter.ndim == 5 and float(parameter.abs().max()) == 0.0:
                    parameter.normal_(0.0, 0.05)
    return network


def test_objective_composes_the_steps_at_the_sample_points_and_warps_with_zero_padding(generator):
    from monai_unireg.losses import GradICONLoss
    from monai_unireg.spatial import warp

    network = _randomised(small_network())
    a, b = torch.rand(1, 1, 32, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, 32, generator=generator)
    terms = GradICONObjective(seed=5)(network, a, b)
    ddf_ab, steps_ab = network(a, b), network.pop_steps()
    ddf_ba, steps_ba = network(b, a), network.pop_steps()
    assert len(steps_ab) == 3 and [tuple(s.shape[2:]) for s in steps_ab] == [(8,) * 3, (16,) * 3, (32,) * 3]
    torch.testing.assert_close(terms.gradicon, GradICONLoss(seed=5)(steps_ab, steps_ba))
    collapsed = GradICONLoss(seed=5)(ddf_ab, ddf_ba)
    assert abs(float((terms.gradicon - collapsed).detach())) > 0.01 * float(terms.gradicon.detach())
    similarity = LNCCLoss(sigma=5.0)(warp(a, ddf_ab, padding_mode="zeros"), b) + LNCCLoss(sigma=5.0)(
        warp(b, ddf_ba, padding_mode="zeros"), a
    )
    torch.testing.assert_close(terms.similarity, similarity)
    with pytest.raises(ValueError, match="no step fields to hand over"):
        network.pop_steps()


def _orientations(image: torch.Tensor) -> list[torch.Tensor]:
    """The 48 axis permutations with flips of a ``[D, H, W]`` cube."""
    return [
        image.permute(*order).flip([axis for axis, flip in enumerate(flips) if flip])
        for order in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
        for flips in [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
    ]


def test_augmentation_without_noise_is_one_shared_permutation_and_flip(generator):
    a = torch.rand(1, 6, 6, 6, generator=generator)
    b = torch.rand(1, 6, 6, 6, generator=generator)
    pair = {"moving_image": a, "fixed_image": b}
    for seed in (3, 4):
        out = RandomPairAugmentationd(noise_std=0.0).set_random_state(seed=seed)(pair)
        match = [k for k, c in enumerate(_orientations(a[0])) if torch.allclose(out["moving_image"][0], c, atol=1e-5)]
        assert len(match) == 1
        assert torch.allclose(out["fixed_image"][0], _orientations(b[0])[match[0]], atol=1e-5)
        again = RandomPairAugmentationd(noise_std=0.0).set_random_state(seed=seed)(pair)
        assert torch.equal(out["moving_image"], again["moving_image"])


def test_objective_reads_the_steps_through_the_trainers_wrappers(generator):
    """Called as the bundle's RegistrationStep calls it (a call whose ``module`` is the PairInput network), the
    objective composes the cascade's steps exactly as when it is given the network itself."""
    from monai_unireg.engines.bundle import _PairCall
    from monai_unireg.networks.nets import PairInput

    network = _randomised(small_network())
    a, b = torch.rand(1, 1, 32, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, 32, generator=generator)
    direct = GradICONObjective(seed=3)(network, a, b)
    wrapped = GradICONObjective(seed=3)(_PairCall(PairInput(network)), {"moving": a, "fixed": b})
    torch.testing.assert_close(wrapped.total, direct.total)
    torch.testing.assert_close(wrapped.gradicon, direct.gradicon)


def test_dictionary_augmentation_is_seeded_by_its_random_state(generator):
    """RandomPairAugmentationd: the draws from its ``R`` (so set_random_state and TransformRandomState reproduce
    them), other keys untouched."""
    from monai.transforms import Compose

    from monai_unireg.engines.bundle import TransformRandomState

    pair = {"moving_image": torch.rand(1, 6, 6, 6, generator=generator), "fixed_image": torch.rand(1, 6, 6, 6)}
    pair["dataset"] = "name"
    augment = Compose([RandomPairAugmentationd(noise_std=0.0)]).set_random_state(seed=4)
    saved = TransformRandomState(augment).state_dict()
    first, second = augment(pair), augment(pair)
    assert first["dataset"] == "name" and first["moving_image"].shape == (1, 6, 6, 6)
    assert not torch.equal(first["moving_image"], second["moving_image"])  # a new draw per pair (48 orientations)
    TransformRandomState(augment).load_state_dict(saved)
    again = augment(pair)
    assert all(torch.equal(first[key], again[key]) for key in ("moving_image", "fixed_image"))
    off = RandomPairAugmentationd(noise_std=0.0, prob=0.0)(pair)
    assert off["moving_image"] is pair["moving_image"]
    with pytest.raises(ValueError, match="two images"):
        RandomPairAugmentationd(keys=["moving_image"])
    with pytest.raises(ValueError, match="random transforms"):
        TransformRandomState(Compose([])).load_state_dict(saved)


def test_starting_weights_of_stage_two_and_of_fine_tuning(tmp_path):
    stage_one = _randomised(small_network())
    torch.save(stage_one.state_dict(), tmp_path / "stage1.pt")  # what train.yaml's CheckpointSaver writes
    stage_two = small_network(include_step2=True, seed=1)
    StartingWeights(stage_two, stage1_weights=tmp_path / "stage1.pt")()
    assert all(torch.equal(a, b) for a, b in zip(stage_one.unets.parameters(), stage_two.unets[:3].parameters()))
    assert not stage_two.unets[3].lastConv.weight.any()
    fine_tuned = small_network(include_step2=True, seed=2)
    StartingWeights(fine_tuned, init_weights=tmp_path / "stage1.pt")  # checked when training starts
    with pytest.raises(ValueError, match="init_weights: .*Missing key.*the network has 4 UNets.*needs --stage 2"):
        StartingWeights(fine_tuned, init_weights=tmp_path / "stage1.pt")()
    with pytest.raises(ValueError, match="stage 2 needs stage1_weights"):
        StartingWeights(fine_tuned)
    with pytest.raises(FileNotFoundError, match="stage1_weights names"):
        StartingWeights(fine_tuned, stage1_weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="must be a UniGradICON"):
        StartingWeights(torch.nn.Conv3d(1, 1, 1))


@pytest.fixture()
def brainsynth(shared_data):
    json_path = shared_data / "BrainSynth" / "BrainSynth_dataset.json"
    labels = json.loads(json_path.read_text())["dice_top30_labels"]
    return json_path, labels


def test_stage_two_keeps_stage_one_and_adds_an_identity_step(generator):
    stage_one = small_network()
    for parameter in stage_one.parameters():
        parameter.data.normal_(std=0.01, generator=generator)
    stage_two = stage_two_from_stage_one(stage_one)
    assert len(stage_two.unets) == 4
    moving, fixed = torch.rand(1, 1, 32, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, 32, generator=generator)
    stage_one.eval(), stage_two.eval()
    torch.testing.assert_close(stage_two(moving, fixed), stage_one(moving, fixed))
    with pytest.raises(ValueError, match="3-step"):
        stage_two_from_stage_one(stage_two)


def _working_image(path: str) -> torch.Tensor:
    """A ``[1, 1, 32, 32, 32]`` image in [0, 1]."""
    image = spatial.resize_image(read_volume(path, "image")[0].float(), (32, 32, 32))
    return (image - image.min()) / (image.max() - image.min())


def test_instance_optimisation_improves_the_objective_and_restores_the_weights(brainsynth):
    json_path, _ = brainsynth
    pair = load_learn2reg(json_path, "registration_val")[0]
    moving, fixed = (_working_image(pair[f"{role}_image"]) for role in ("moving", "fixed"))
    network = small_network(include_step2=True)
    network.train()
    before = {name: value.clone() for name, value in network.state_dict().items()}
    messages: list[str] = []
    ddf, losses = instance_optimise(network, moving, fixed, iterations=10, learning_rate=1e-3, log=messages.append)
    assert len(losses) == 11 and losses[-1] < losses[0]
    assert ddf.shape == (1, 3, 32, 32, 32) and ddf.abs().max() > 0
    assert network.training
    assert all(torch.equal(before[name], value) for name, value in network.state_dict().items())
    assert messages and messages[-1].startswith("instance optimisation 10/10")


def test_bad_instance_optimisation_arguments_are_refused():
    with pytest.raises(ValueError, match="iterations"):
        instance_optimise(small_network(), torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32), iterations=-1)
