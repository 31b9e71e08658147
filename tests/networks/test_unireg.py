"""UniReg: the dynamic head's 171 parameters and per-sample convolutions, the control vector (Eq. 3-5), the
static-head ablation, tasks and aliases, feature extractors, any batch, weights files and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_unireg.networks.blocks import DynamicDeformationHead, head_parameter_count
from monai_unireg.networks.nets import ResizedRegistration, UniReg, UniRegBackbone, load_unireg

SIZE = (16, 16, 16)
TASKS = ("head_neck", "chest", "abdomen", "liver", "brain", "pelvis")


def _network(**kwargs) -> UniReg:
    torch.manual_seed(0)
    return UniReg(input_size=SIZE, **kwargs)


def _randomise_controller(network: UniReg, generator: torch.Generator) -> None:
    """Give the controller non-zero weights, as training does (a new one is zero: the static head)."""
    with torch.no_grad():
        weight = network.head.controller.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)


def test_head_has_171_parameters_and_the_controller_generates_them():
    assert head_parameter_count((8, 8, 8, 3)) == 8 * 8 * 2 + 8 * 3 + 8 * 2 + 3 == 171
    head = DynamicDeformationHead(condition_channels=16)
    assert head.num_parameters == 171
    assert head.controller.out_features == 171
    assert sum(p.numel() for p in head.parameters()) == (16 + 1) * 171
    assert head.head_parameters(torch.zeros(5, 16)).shape == (5, 171)


def test_head_applies_each_samples_generated_convolutions(generator):
    head = DynamicDeformationHead(condition_channels=6).double()  # float64: compared with a float64 reference
    with torch.no_grad():
        head.controller.weight.copy_(torch.randn(171, 6, generator=generator))
    features = torch.randn(2, 8, 3, 4, 5, generator=generator, dtype=torch.float64)
    condition = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    out = head(features, condition)
    omega = head.controller.weight @ condition.T + head.controller.bias[:, None]  # [171, B]
    for i in range(2):  # independent check: three F.conv3d calls with sample i's weights
        x, offset = features[i : i + 1], 0
        for layer, (c_in, c_out) in enumerate([(8, 8), (8, 8), (8, 3)]):
            weight = omega[offset : offset + c_in * c_out, i].view(c_out, c_in, 1, 1, 1)
            offset += c_in * c_out
            bias = omega[offset : offset + c_out, i]
            offset += c_out
            x = F.conv3d(x, weight, bias)
            x = F.leaky_relu(x, 0.2) if layer < 2 else x
        torch.testing.assert_close(out[i : i + 1], x, rtol=1e-10, atol=1e-10)


def test_untrained_dynamic_head_is_a_static_head_and_the_ablation_ignores_the_condition(generator):
    torch.manual_seed(3)
    dynamic = DynamicDeformationHead(condition_channels=4)
    torch.manual_seed(3)
    static = DynamicDeformationHead(condition_channels=4, dynamic=False)
    assert sum(p.numel() for p in static.parameters()) == 171
    assert not hasattr(static, "controller")
    torch.testing.assert_close(dynamic.controller.bias, static.static_parameters)
    features = torch.randn(2, 8, 4, 4, 4, generator=generator)
    a, b = torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator)
    torch.testing.assert_close(dynamic(features, a), dynamic(features, b))
    torch.testing.assert_close(dynamic(features, a), static(features, b))
    # last layer starts at N(0, 1e-5): the new head predicts an almost zero field
    assert static(features, a).abs().max() < 1e-3


def test_control_vector_follows_eqs_3_to_5(generator):
    network = _network()
    features = torch.randn(3, 8, 4, 4, 4, generator=generator)
    control = network.control_vector(features, ["chest", "liver", "lung"], ["inter", "intra", "intra"])
    assert control.shape == (3, len(TASKS) + 2 + 8)
    torch.testing.assert_close(control[:, : len(TASKS)], F.one_hot(torch.tensor([1, 3, 1]), len(TASKS)).float())
    torch.testing.assert_close(control[:, len(TASKS) : len(TASKS) + 2], torch.tensor([[0.0, 1], [1, 0], [1, 0]]))
    torch.testing.assert_close(control[:, -8:], F.normalize(features.mean(dim=(2, 3, 4)), dim=1))
    by_index = network.control_vector(features, torch.tensor([1, 3, 1]), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(by_index, control)


def test_backbone_is_the_documented_encoder_decoder():
    backbone = UniRegBackbone(in_channels=2)

    def conv(c_in: int, c_out: int) -> int:
        return 27 * c_in * c_out + c_out

    expected = conv(2, 16) + 2 * conv(16, 16)  # full resolution: conv + residual block
    expected += sum(conv(a, b) + 2 * conv(b, b) for a, b in [(16, 32), (32, 32), (32, 32)])  # strided + residual
    expected += conv(64, 32) + conv(64, 32) + conv(48, 16)  # decoder: upsampled + skip
    expected += conv(16, 16) + conv(16, 8)  # features E
    assert sum(p.numel() for p in backbone.parameters()) == expected == 391_832
    assert backbone(torch.zeros(1, 2, 16, 24, 8)).shape == (1, 8, 16, 24, 8)


def test_forward_gives_a_near_zero_field_for_any_batch_and_per_sample_conditions(generator):
    network = _network()
    correlation_fusion = 27 * (32 + 27) * 32 + 32  # the 27 correlations joined at 1/2 (paper Table 7)
    assert sum(p.numel() for p in network.parameters()) == 391_832 + correlation_fusion + (len(TASKS) + 2 + 8 + 1) * 171
    moving, fixed = torch.rand(3, 1, 16, 24, 8, generator=generator), torch.rand(3, 1, 16, 24, 8, generator=generator)
    ddf = network(moving, fixed, ["brain", "pelvis", "lung"], "inter")
    assert ddf.shape == (3, 3, 16, 24, 8) and ddf.abs().max() < 1e-3
    single = network(moving[1:2], fixed[1:2], "pelvis", "inter")
    torch.testing.assert_close(ddf[1:2], single, rtol=1e-4, atol=1e-7)


def test_changing_the_task_or_type_changes_the_field_and_an_alias_is_its_region(generator):
    network = _network()
    _randomise_controller(network, generator)
    moving, fixed = torch.rand(1, 1, *SIZE, generator=generator), torch.rand(1, 1, *SIZE, generator=generator)
    with torch.no_grad():
        chest = network(moving, fixed, "chest", "intra")
        assert (network(moving, fixed, "abdomen", "intra") - chest).abs().max() > 1e-4
        assert (network(moving, fixed, "chest", "inter") - chest).abs().max() > 1e-4
        torch.testing.assert_close(network(moving, fixed, "lung", "intra"), chest)  # unseen: nearest region
        torch.testing.assert_close(network.conditioned("lung", "intra")(moving, fixed), chest)


def test_static_head_ablation_ignores_task_and_type(generator):
    network = _network(dynamic_head=False)
    assert not network.dynamic_head and network.config["dynamic_head"] is False
    with torch.no_grad():
        network.head.static_parameters.normal_(generator=generator)
    moving, fixed = torch.rand(1, 1, *SIZE, generator=generator), torch.rand(1, 1, *SIZE, generator=generator)
    torch.testing.assert_close(network(moving, fixed, "chest", "intra"), network(moving, fixed, "brain", "inter"))


def test_gradients_reach_backbone_and_controller(generator):
    network = _network()
    moving, fixed = torch.rand(2, 1, *SIZE, generator=generator), torch.rand(2, 1, *SIZE, generator=generator)
    network(moving, fixed, "brain", ["inter", "intra"]).square().sum().backward()
    assert network.head.controller.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in network.backbone.parameters())


def test_tasks_and_aliases_are_configuration():
    network = _network(tasks=("thorax", "brain"), task_aliases={"lung": "thorax"})
    assert network.config["tasks"] == ["thorax", "brain"] and network.resolve_task("lung") == 0
    assert network.head.controller.in_features == 2 + 2 + 8
    assert _network(tasks=("brain", "pelvis")).task_aliases == {"prostate": "pelvis", "bladder": "pelvis"}
    with pytest.raises(ValueError, match="task_aliases"):
        _network(tasks=("brain",), task_aliases={"lung": "chest"})
    with pytest.raises(ValueError, match="distinct"):
        _network(tasks=("brain", "brain"))


def test_mind_and_module_feature_extractors(generator, tmp_path):
    moving, fixed = torch.rand(1, 1, *SIZE, generator=generator), torch.rand(1, 1, *SIZE, generator=generator)
    mind = _network(feature_extractor="mind")
    assert mind.backbone.encoder[0][0][0].in_channels == 2 * (1 + 12)
    assert mind(moving, fixed, "brain", "inter").shape == (1, 3, *SIZE)

    class HalfResolution(nn.Module):
        """A learned extractor whose features are at half resolution (as the paper's SAM fine features)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, stride=2, padding=1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.conv(image)

    extractor = HalfResolution()
    network = _network(feature_extractor=extractor, extractor_channels=4)
    network(moving, fixed, "brain", "inter").square().sum().backward()
    assert extractor.conv.weight.grad is None  # frozen by default
    trained = _network(feature_extractor=HalfResolution(), extractor_channels=4, train_extractor=True)
    trained(moving, fixed, "brain", "inter").square().sum().backward()
    assert trained.extractor.conv.weight.grad is not None

    path = tmp_path / "model.pt"
    torch.save({"config": network.config, "model": network.state_dict()}, path)
    with pytest.raises(ValueError, match="feature_extractor"):
        load_unireg(path)
    reloaded = load_unireg(path, feature_extractor=HalfResolution())
    torch.testing.assert_close(reloaded(moving, fixed, "brain", "inter"), network(moving, fixed, "brain", "inter"))


def test_weights_file_round_trip_and_resized_registration(generator, tmp_path):
    network = _network(tasks=("brain", "pelvis"))
    _randomise_controller(network, generator)
    path = tmp_path / "model.pt"
    torch.save({"config": network.config, "model": network.state_dict()}, path)
    reloaded = load_unireg(path)
    assert reloaded.config == network.config
    moving, fixed = torch.rand(1, 1, 20, 18, 22, generator=generator), torch.rand(1, 1, 20, 18, 22, generator=generator)
    a = ResizedRegistration(network.conditioned("pelvis", "intra"), SIZE)(moving, fixed)
    b = ResizedRegistration(reloaded.conditioned("prostate", "intra"), SIZE)(moving, fixed)
    assert a.shape == (1, 3, 20, 18, 22)
    torch.testing.assert_close(a, b)
    torch.save({"model": network.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a UniReg checkpoint"):
        load_unireg(tmp_path / "bare.pt")
    torch.save({"config": {"num_domains": 2}, "model": {}}, tmp_path / "other.pt")  # another network's file
    with pytest.raises(ValueError, match="not a UniReg checkpoint"):
        load_unireg(tmp_path / "other.pt")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda n, m, f: n(m, f, "foot", "inter"), "unknown task 'foot'"),
        (lambda n, m, f: n(m, f, "brain", "longitudinal"), "reg_type"),
        (lambda n, m, f: n(m, f, ["brain"], "inter"), "one name or 2 names"),
        (lambda n, m, f: n(m, f, torch.tensor([0.0, 1.0]), "inter"), "integer indices"),
        (lambda n, m, f: n(m, f, torch.tensor([0, 9]), "inter"), r"indices must lie in \[0, 6\)"),
        (lambda n, m, f: n(m[..., :12], f[..., :12], "brain", "inter"), "divisible by 8"),
        (lambda n, m, f: n(m, f[:, :, :8], "brain", "inter"), "same shape"),
        (lambda n, m, f: n(torch.cat([m, m], 1), torch.cat([f, f], 1), "brain", "inter"), "1 channel"),
        (lambda n, m, f: n(m * float("nan"), f, "brain", "inter"), "finite"),
        (lambda n, m, f: n.conditioned("foot", "inter"), "unknown task"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message, generator):
    network = _network()
    moving, fixed = torch.rand(2, 1, *SIZE, generator=generator), torch.rand(2, 1, *SIZE, generator=generator)
    with pytest.raises(ValueError, match=message):
        call(network, moving, fixed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_size": (16, 16, 12)}, "divisible by 8"),
        ({"feature_extractor": "sam"}, "feature_extractor"),
        ({"feature_extractor": nn.Identity()}, "extractor_channels"),
        ({"feature_extractor": 3}, "feature_extractor"),
        ({"channels": (16,)}, "at least 2 levels"),
    ],
)
def test_bad_construction_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UniReg(**{"input_size": SIZE, **kwargs})


def test_correlation_layer_against_a_float64_loop_and_a_known_shift(generator):
    from monai_unireg.networks.blocks import NEIGHBOUR_OFFSETS
    from monai_unireg.networks.nets.unireg import feature_correlation

    fixed = torch.rand(1, 3, 12, 10, 8, generator=generator, dtype=torch.float64)
    moving = torch.roll(fixed, shifts=(2, -2, 0), dims=(2, 3, 4))  # one voxel at 1/2 resolution: (+1, -1, 0)
    correlation = feature_correlation(fixed, moving)
    assert correlation.shape == (1, 27, 6, 5, 4)
    pooled = [torch.nn.functional.avg_pool3d(x, 2) for x in (fixed, moving)]
    f, m = [(x - x.mean((2, 3, 4), keepdim=True)) / (x.std((2, 3, 4), keepdim=True) + 1e-5) for x in pooled]
    for k, (dz, dy, dx) in enumerate(NEIGHBOUR_OFFSETS.long().tolist()):
        for z, y, x in [(0, 0, 0), (3, 2, 1), (5, 4, 3), (2, 1, 2)]:
            zz, yy, xx = z + dz, y + dy, x + dx
            inside = 0 <= zz < 6 and 0 <= yy < 5 and 0 <= xx < 4
            expected = float((f[0, :, z, y, x] * m[0, :, zz, yy, xx]).mean()) if inside else 0.0
            assert abs(float(correlation[0, k, z, y, x]) - expected) < 1e-10
    best = correlation[0, :, 1:-1, 1:-1, 1:-1].mean(dim=(1, 2, 3)).argmax()
    assert NEIGHBOUR_OFFSETS[best].tolist() == [1.0, -1.0, 0.0]


def test_checkpoint_without_the_correlation_layer_still_loads(tmp_path):
    old = UniReg(input_size=(16, 16, 16), tasks=TASKS, correlation=False)
    config = {k: v for k, v in old.config.items() if k != "correlation"}
    torch.save({"model": old.state_dict(), "config": config, "method": "UniReg"}, tmp_path / "old.pt")
    loaded = load_unireg(tmp_path / "old.pt")
    assert not loaded.correlation and loaded.backbone.correlation_fusion is None
