"""PromptReg: the prompt generator's weights and fusion, the RDP backbone's recursion, the ablation switch, any size
and batch, near-identity start, gradients, weights files and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_unireg.losses import PromptOrthogonalityLoss, TaskSimilarityLoss
from monai_unireg.networks.blocks import RegistrationPromptGenerator
from monai_unireg.networks.nets import PromptReg, RDPNet, load_promptreg

SMALL = {"input_size": (32, 32, 32), "num_domains": 3, "channels": 4}


def test_prompt_weights_sum_to_one_and_follow_eqs_2_to_4(generator):
    torch.manual_seed(0)
    rpg = RegistrationPromptGenerator(8, num_prompts=4, prompt_size=(3, 4, 5), temperature=0.1)
    features = torch.randn(2, 8, 3, 4, 5, generator=generator)
    out = rpg(features)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(2))
    dynamic = rpg.dynamic(torch.cat([features, rpg.template.expand(2, -1, -1, -1, -1)], 1))
    cosine = torch.stack(
        [F.cosine_similarity(dynamic.flatten(1), b.flatten()[None], dim=1) for b in rpg.knowledge_base], 1
    )
    torch.testing.assert_close(out.weights, torch.softmax(cosine / 0.1, dim=1))  # Eqs. 2-3
    expected = sum(out.weights[:, i, None, None, None, None] * rpg.knowledge_base[i] for i in range(4))
    torch.testing.assert_close(out.weighted_prompt, expected)  # Eq. 4
    assert out.prompt.shape == features.shape


def test_prompt_weights_react_to_the_input(generator):
    torch.manual_seed(0)
    rpg = RegistrationPromptGenerator(8, num_prompts=3, prompt_size=(4, 4, 4))
    a = rpg(torch.randn(1, 8, 4, 4, 4, generator=generator)).weights
    b = rpg(torch.randn(1, 8, 4, 4, 4, generator=generator) * 3 + 1).weights
    assert (a - b).abs().max() > 1e-3


def test_prompt_losses_vanish_in_their_ideal_cases():
    basis = torch.eye(4).view(4, 1, 2, 2, 1)  # four mutually orthogonal prompts
    assert PromptOrthogonalityLoss()(basis) == 0
    task = basis[[2, 0]]
    assert TaskSimilarityLoss()(task * 3.0, task) == pytest.approx(0.0, abs=1e-7)


def test_prompt_of_another_size_is_resized(generator):
    torch.manual_seed(0)
    rpg = RegistrationPromptGenerator(4, num_prompts=2, prompt_size=(4, 4, 4))
    out = rpg(torch.randn(3, 4, 6, 5, 7, generator=generator))
    assert out.prompt.shape == (3, 4, 6, 5, 7) and out.knowledge_base.shape == (2, 4, 6, 5, 7)


def test_new_network_is_near_identity_at_any_size_and_batch(generator):
    torch.manual_seed(0)
    net = PromptReg(**SMALL)
    for shape in [(32, 32, 32), (24, 40, 16)]:
        moving = torch.rand(2, 1, *shape, generator=generator)
        fixed = torch.rand(2, 1, *shape, generator=generator)
        ddf = net(moving, fixed)
        assert ddf.shape == (2, 3, *shape)
        assert ddf.abs().max() < 0.05  # velocity heads start at N(0, 1e-5)


def test_recursion_runs_the_published_number_of_steps(generator, monkeypatch):
    """2, 2, 3, 1 refinements at 1/8, 1/4, 1/2, 1: one velocity head call each."""
    torch.manual_seed(0)
    net = RDPNet(channels=4)
    calls = []
    for level, head in enumerate(net.heads):
        head.register_forward_hook(lambda module, args, out, level=level: calls.append(level))
    net(torch.rand(1, 1, 16, 16, 16, generator=generator), torch.rand(1, 1, 16, 16, 16, generator=generator))
    assert calls == [3, 3, 2, 2, 1, 1, 1, 0]


def test_ablation_switch_removes_the_prompt_generator(generator):
    torch.manual_seed(0)
    ablated = PromptReg(**SMALL, use_prompt=False)
    assert not any("prompt" in name for name, _ in ablated.named_parameters())
    backbone = RDPNet(channels=4)
    assert sum(p.numel() for p in ablated.parameters()) == sum(p.numel() for p in backbone.parameters())
    with pytest.raises(ValueError, match="use_prompt"):
        ablated.register(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    full = PromptReg(**SMALL)
    extra = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in ablated.parameters())
    assert extra > full.prompt_generator.knowledge_base.numel()


def test_gradients_reach_the_prompts_through_the_losses(generator):
    torch.manual_seed(0)
    net = PromptReg(**SMALL)
    moving, fixed = torch.rand(1, 1, 32, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, 32, generator=generator)
    out = net.register(moving, fixed)
    loss = out.ddf.square().mean() + PromptOrthogonalityLoss()(out.prompt.knowledge_base)
    loss = loss + TaskSimilarityLoss()(out.prompt.weighted_prompt, out.prompt.knowledge_base[[1]])
    loss.backward()
    assert net.prompt_generator.knowledge_base.grad.abs().sum() > 0
    assert net.prompt_generator.template.grad.abs().sum() > 0
    assert net.heads[0].weight.grad.abs().sum() > 0


def test_weights_round_trip_and_bad_files(tmp_path, generator):
    torch.manual_seed(0)
    net = PromptReg(**SMALL).eval()
    torch.save({"config": net.config, "model": net.state_dict()}, tmp_path / "model.pt")
    loaded = load_promptreg(tmp_path / "model.pt").eval()
    pair = torch.rand(2, 1, 1, 32, 32, 32, generator=generator)
    with torch.no_grad():
        assert torch.equal(loaded(*pair), net(*pair))
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="config"):
        load_promptreg(tmp_path / "bare.pt")


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: PromptReg(input_size=(30, 32, 32)), "divisible by 8"),
        (lambda: PromptReg(num_domains=0), "num_prompts"),
        (lambda: PromptReg(temperature=0.0), "temperature"),
        (lambda: RDPNet(steps=(2, 2, 3)), "4 values"),
    ],
)
def test_bad_configuration_is_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_input_is_refused(generator):
    net = PromptReg(**SMALL)
    image = torch.rand(1, 1, 32, 32, 32, generator=generator)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 1, 30, 32, 32), torch.rand(1, 1, 30, 32, 32))
    with pytest.raises(ValueError, match="same shape"):
        net(image, torch.rand(1, 1, 32, 32, 40))
    with pytest.raises(ValueError, match="NaN|finite"):
        net(image, image.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="channels"):
        net.prompt_generator(torch.rand(1, 5, 4, 4, 4))


def test_a_translation_of_the_coarsest_level_reaches_full_resolution_exactly(generator):
    """Fields move between levels in the half-voxel geometry (x2 grid, x2 values): a constant velocity of 0.25
    voxel at 1/8, two steps there and no other motion, is a translation of 2 * 0.25 * 8 = 4 voxels at full size
    (corner-aligned resizing gave 2 * 0.25 * 31 / 3 = 5.17 at 32^3)."""
    torch.manual_seed(0)
    net = RDPNet(channels=4)
    with torch.no_grad():
        for head in net.heads:
            head.weight.zero_()
            head.bias.zero_()
        net.heads[3].bias.copy_(torch.tensor([0.25, -0.25, 0.125]))
    moving, fixed = torch.rand(2, 1, 1, 32, 32, 32, generator=generator)
    ddf = net(moving, fixed)
    expected = torch.tensor([4.0, -4.0, 2.0]).view(1, 3, 1, 1, 1).expand_as(ddf)
    torch.testing.assert_close(ddf, expected, atol=1e-5, rtol=0)
