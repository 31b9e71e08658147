"""uniGradICON: monai_unireg's ``UniGradICON`` against the reference ``icon_registration`` network (not run by CI).

Builds the reference registration network exactly as the ``unigradicon`` package does (three ``tallUNet2`` steps
at 1/4, 1/2 and full resolution, a fourth full-resolution step, wrapped in ``GradientICONSparse`` with LNCC and
``lmbda=1.5``) and our ``UniGradICON(input_size=N)``, gives ours random weights (random convolutions, last
convolutions ``normal(0, LAST_CONV_STD)`` so the field is a few voxels, random BatchNorm statistics and affine
parameters), copies them into the reference through :func:`published_key_prefixes` (the key sets must match; the
state dict is loaded strictly) and registers two random smooth images ``1 x 1 x N^3`` in [0, 1] with both
networks in ``eval()`` mode under ``torch.no_grad()``.

Two things are compared.

**The field** of one inference direction, timed:

- reference: ``phi = net.regis_net(moving, fixed); phi(net.identity_map)`` with the identity map tagged as
  ``GradientICONSparse.forward`` tags it -- the lines of that forward computing ``phi_AB_vectorfield`` (the
  forward also computes the other direction and the loss). The map is in [0, 1] coordinates, channel ``i`` along
  tensor axis ``i + 2``; ``(map - identity) * (N - 1)`` is the displacement in voxels.
- ours: ``UniGradICON.working_field(moving, fixed)``, a displacement in voxels, channel ``i`` along tensor axis
  ``i + 2`` (MONAI ``Warp`` convention).

Printed: the field's mean and max magnitude (voxels, for scale), the max and mean absolute difference between the
two fields (voxels; target <= 1e-4), and the median wall time of ``--repeats`` calls per network after one warm-up
call each, the networks taking turns in the same process, with ``--threads`` torch threads.

**The training loss** (paper Eq. 1) at ``--loss-size`` (80 by default, the smallest grid the published cascade
can pool) for ``--loss-trials`` random networks and
image pairs: the reference's ``GradientICONSparse.forward`` (both LNCC terms, ``lmbda * GradICON``), against our
:class:`~monai_unireg.engines.GradICONObjective` at the *same jittered sample points* (the reference draws its
jitter from torch's global generator; the same draw, in voxels, is handed to our loss). Printed per trial: each
part of both losses and their relative difference (target <= 1e-4), and, for the record, the GradICON term of the
cascade collapsed into one field on the grid first (what this project computed before composing the steps; the
issue measured 0.41-0.62x the reference).

Nothing is downloaded. The reference needs ``icon_registration``, kept in its own virtual environment (it pins
old dependencies); from the repository root::

    python -m venv --system-site-packages venv-icon
    venv-icon/bin/pip install --no-deps icon-registration
    venv-icon/bin/python benchmarks/unigradicon_reference.py [--size 175] [--repeats 3] [--threads 2] [--seed 0]
        [--loss-size 48] [--loss-trials 3]

``--no-deps``: the parts used here (networks, losses) need only torch and matplotlib, which the system site
packages give; its declared torchvision pulls another torch. (``monai_unireg`` must be importable there: the system
site packages, or ``venv-icon/bin/pip install -e . --no-deps``.) At 175^3 on 2 CPU threads a run takes a few
minutes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import icon_registration as icon
import icon_registration.losses as icon_losses
import icon_registration.networks as icon_networks
import torch
import torch.nn.functional as F
from icon_registration.losses import GradientICONSparse

from monai_unireg.engines import GradICONObjective
from monai_unireg.losses import GradICONLoss
from monai_unireg.networks.nets import UniGradICON, published_key_prefixes

#: Standard deviation of every last-convolution weight and bias: a field of a few voxels at 175^3.
LAST_CONV_STD = 5e-3


def reference_network(size: int) -> GradientICONSparse:
    """The published uniGradICON network of ``icon_registration`` (``unigradicon.make_network``, last step on)."""
    inner = icon.FunctionFromVectorField(icon_networks.tallUNet2(dimension=3))
    for _ in range(2):
        inner = icon.TwoStepRegistration(
            icon.DownsampleRegistration(inner, dimension=3),
            icon.FunctionFromVectorField(icon_networks.tallUNet2(dimension=3)),
        )
    inner = icon.TwoStepRegistration(inner, icon.FunctionFromVectorField(icon_networks.tallUNet2(dimension=3)))
    net = GradientICONSparse(inner, icon.LNCC(sigma=5), lmbda=1.5)
    net.assign_identity_map([1, 1, size, size, size])
    return net


def randomise(net: UniGradICON, generator: torch.Generator) -> None:
    """Random weights of a reasonable scale: the default convolutions, plus random last convolutions and BatchNorms.

    The default (Kaiming-uniform) convolution weights keep the activations O(1) through the residual encoder; the
    zero-initialised last convolutions get ``normal(0, LAST_CONV_STD)``; each BatchNorm gets running mean
    ``normal(0, 0.1)``, running variance ``uniform(0.5, 1.5)``, weight ``uniform(0.8, 1.2)``, bias ``normal(0, 0.1)``.
    """
    with torch.no_grad():
        for unet in net.unets:
            for tensor in (unet.lastConv.weight, unet.lastConv.bias):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * LAST_CONV_STD)
            for norm in unet.batchNorms:
                channels = norm.num_features
                norm.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                norm.weight.copy_(torch.rand(channels, generator=generator) * 0.4 + 0.8)
                norm.bias.copy_(torch.randn(channels, generator=generator) * 0.1)


def copy_weights(ours: UniGradICON, reference: GradientICONSparse) -> None:
    """Load our weights into the reference ``regis_net`` under the published keys, checking the key sets match."""
    prefixes = published_key_prefixes(len(ours.unets))
    state = {}
    for key, value in ours.state_dict().items():
        _, step, rest = key.split(".", 2)  # "unets.<step>.<rest>"
        state[prefixes[int(step)] + rest] = value
    expected = set(reference.regis_net.state_dict())
    if set(state) != expected:
        raise AssertionError(
            f"key sets differ: only ours {sorted(set(state) - expected)[:5]}, "
            f"only reference {sorted(expected - set(state))[:5]}"
        )
    reference.regis_net.load_state_dict(state, strict=True)


def smooth_image(size: int, generator: torch.Generator) -> torch.Tensor:
    """``[1, 1, size^3]`` image in [0, 1]: 12^3 uniform noise upsampled trilinearly (corner-aligned)."""
    coarse = torch.rand((1, 1, 12, 12, 12), generator=generator)
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)


def reference_field(net: GradientICONSparse, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """One direction of the reference: ``phi_AB(identity)`` minus the identity, in voxels ``[1, 3, N, N, N]``."""
    net.identity_map.isIdentity = True  # as GradientICONSparse.forward does: the shortcut of the full-grid steps
    phi = net.regis_net(moving, fixed)
    return (phi(net.identity_map) - net.identity_map) * (moving.shape[2] - 1)


class LossAtGivenPoints(GradICONLoss):
    """:class:`GradICONLoss` at sample points given in advance (``[B, 3, *P]`` voxel coordinates), not its jitter."""

    def __init__(self, points: torch.Tensor) -> None:
        super().__init__()
        self.points = points

    def _sample_points(self, batch: int, shape: torch.Size, voxel: torch.Tensor) -> torch.Tensor:
        return self.points.to(voxel)


def reference_loss(net: GradientICONSparse, image_a: torch.Tensor, image_b: torch.Tensor, zero_boundary: bool):
    """The reference's loss of the pair and its jitter draw ``[1, 3, N, N, N]`` (torch's global generator, recorded).

    ``zero_boundary``: the similarity's warps pad with zeros, as the authors' training script does (uniGradICON's
    ``training/train.py`` defines its own ``GradientICONSparse`` whose warps pass ``zero_boundary=True``), instead of
    the library class's border padding; the GradICON term is the same in both.
    """
    drawn: list[torch.Tensor] = []
    draw, warp = torch.randn, icon_losses.compute_warped_image_multiNC

    def recording_draw(*args, **kwargs) -> torch.Tensor:
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    torch.randn = recording_draw
    icon_losses.compute_warped_image_multiNC = functools.partial(warp, zero_boundary=zero_boundary)
    try:
        loss = net(image_a, image_b)
    finally:
        torch.randn, icon_losses.compute_warped_image_multiNC = draw, warp
    if len(drawn) != 1:
        raise AssertionError(f"expected one jitter draw in GradientICONSparse.forward, saw {len(drawn)}")
    return loss, drawn[0]


def compare_losses(size: int, seed: int) -> dict[str, float]:
    """Both losses of one random network and image pair at ``size^3``, at the reference's sample points."""
    torch.manual_seed(seed)  # the convolutions' default initialisation
    generator = torch.Generator().manual_seed(seed)
    ours = UniGradICON(input_size=size)
    randomise(ours, generator)
    reference = reference_network(size)
    copy_weights(ours, reference)
    ours.eval().requires_grad_(False)  # gradients stay enabled (the cascade keeps its steps), no graph is built
    reference.eval()
    image_a, image_b = smooth_image(size, generator), smooth_image(size, generator)
    with torch.no_grad():
        library, _ = reference_loss(reference, image_a, image_b, zero_boundary=False)
        expected, noise = reference_loss(reference, image_a, image_b, zero_boundary=True)
    identity = reference.identity_map
    points = (identity + 2 * noise / identity.shape[-1])[:, :, ::2, ::2, ::2] * (size - 1)
    objective = GradICONObjective(lam=reference.lmbda, sigma=5.0)
    objective.regulariser = LossAtGivenPoints(points)
    terms = objective(ours, image_a, image_b)
    collapsed = LossAtGivenPoints(points)(ours(image_a, image_b), ours(image_b, image_a))
    return {
        "similarity": float(terms.similarity),
        "ref similarity": float(expected.similarity_loss),
        "library similarity": float(library.similarity_loss),
        "gradicon": float(terms.gradicon),
        "ref gradicon": float(expected.inverse_consistency_loss),
        "total": float(terms.total),
        "ref total": float(expected.all_loss),
        "collapsed gradicon": float(collapsed),
    }


def print_losses(size: int, trials: int, seed: int) -> None:
    """The loss table: our parts, the reference's, their relative differences, the collapsed-field GradICON and the
    library class's (border-padded) LNCC."""
    print(
        f"\ntraining loss (Eq. 1, lambda 1.5, LNCC sigma 5) at 1x1x{size}^3, the reference's jitter points; ref = the"
        " authors' training loss (zero-padded warps), border = icon_registration's GradientICONSparse as shipped"
    )
    header = ["trial", "LNCC ours", "LNCC ref", "rel", "GradICON ours", "GradICON ref", "rel", "total rel"]
    print(" ".join(f"{h:>13}" for h in header) + f" {'collapsed/ref':>13} {'LNCC border':>13}")
    for trial in range(trials):
        row = compare_losses(size, seed + trial)
        cells = [str(trial)]
        for part in ("similarity", "gradicon"):
            ours, ref = row[part], row[f"ref {part}"]
            cells += [f"{ours:.6f}", f"{ref:.6f}", f"{abs(ours - ref) / abs(ref):.1e}"]
        cells.append(f"{abs(row['total'] - row['ref total']) / abs(row['ref total']):.1e}")
        cells.append(f"{row['collapsed gradicon'] / row['ref gradicon']:.3f}")
        cells.append(f"{row['library similarity']:.6f}")
        print(" ".join(f"{c:>13}" for c in cells))


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Wall time of one call (seconds) and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=175, help="working size N of the N^3 images (175 published)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per network (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    parser.add_argument("--loss-size", type=int, default=80, help="grid size of the loss comparison (>= 80)")
    parser.add_argument("--loss-trials", type=int, default=3, help="random networks of the loss comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    ours = UniGradICON(input_size=args.size)
    randomise(ours, generator)
    reference = reference_network(args.size)
    copy_weights(ours, reference)
    ours.eval()
    reference.eval()
    moving, fixed = smooth_image(args.size, generator), smooth_image(args.size, generator)

    contenders: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: ours.working_field(moving, fixed),
        "reference": lambda: reference_field(reference, moving, fixed),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    fields: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, fn in contenders.items():  # warm-up, not timed
            fields[name] = fn()
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                seconds, fields[name] = timed(fn)
                times[name].append(seconds)

    magnitude = fields["reference"].norm(dim=1)
    difference = (fields["ours"] - fields["reference"]).abs()
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"uniGradICON one direction at 1x1x{args.size}^3, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, seed {args.seed}; median of {args.repeats} after a warm-up"
    )
    print(f"reference field |u|: mean {magnitude.mean():.3f} voxels, max {magnitude.max():.3f} voxels")
    print(f"{'ours s':>8} {'reference s':>12} {'ours/ref':>9} {'max |diff| vox':>15} {'mean |diff| vox':>16}")
    print(
        f"{median['ours']:8.2f} {median['reference']:12.2f} {median['ours'] / median['reference']:9.3f} "
        f"{difference.max():15.2e} {difference.mean():16.2e}"
    )
    print_losses(args.loss_size, args.loss_trials, args.seed)


if __name__ == "__main__":
    main()
