"""Field-based instance optimisation: refine a network's displacement field on one pair by gradient descent.

The UniReg paper (``shared/papers/unireg.txt``, Table 3, "UniReg + IO") refines the network's prediction on an
unseen task by instance optimisation (IO), as SAME does: the displacement field itself is the variable, started
from the network's field and moved by Adam on ``similarity(moving o phi, fixed) + lambda * diffusion(phi)``.
Unlike uniGradICON's IO (:func:`~monai_unireg.engines.instance_optimise`, which fine-tunes the weights), this needs
nothing from the network but its field, so it refines the output of any registration network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from monai_unireg import spatial
from monai_unireg.losses import diffusion_regularisation
from monai_unireg.validation import check_ddf, check_image_pair, check_integer, check_positive, check_same_spatial_shape

#: A progress printer (``print`` or the command line's log); a type only, so the trainers need not be imported.
Log = Callable[[str], None]

__all__ = ["FieldOptimised", "adam_descent", "adam_on_field", "optimise_field"]

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``objective(field) -> (loss, parts)``: the scalar loss and its named terms.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
#: ``on_step(step, loss, parts)``: called with the objective before each Adam step and after the last.
StepCallback = Callable[[int, float, dict[str, torch.Tensor]], None]


def optimise_field(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    initial_ddf: torch.Tensor,
    similarity: Similarity,
    smoothness: float = 1.0,
    iterations: int = 50,
    learning_rate: float = 0.1,
    log: Log | None = print,
) -> tuple[torch.Tensor, list[float]]:
    r"""Minimise ``similarity(warp(moving, u), fixed) + smoothness * diffusion(u)`` over the field ``u`` with Adam.

    .. math::

        u^* = \arg\min_u \; L_{sim}(I_m \circ (\mathrm{Id} + u), I_f) + \lambda L_{reg}(u)

    from ``u = initial_ddf``, with :func:`~monai_unireg.losses.diffusion_regularisation` as ``L_reg``. The images
    carry no gradient; only ``u`` is optimised.

    Args:
        moving: ``[B, C, *S]`` moving image (normalised as for the network).
        fixed: ``[B, C, *S]`` fixed image on the same grid.
        initial_ddf: ``[B, 3, *S]`` starting field in voxels (e.g. the network's prediction).
        similarity: ``similarity(warped, fixed) -> scalar`` loss (e.g. ``LNCCLoss``, ``MINDSSCLoss``).
        smoothness: ``lambda`` (>= 0).
        iterations: Adam steps (0 returns the initial field).
        learning_rate: Adam step size, in voxels.
        log: progress output every 10 steps (``None``: silent).

    Returns:
        the optimised ``[B, 3, *S]`` field (no gradient) and the objective before each step and after the last
        (``iterations + 1`` values).
    """
    check_image_pair(moving, fixed, 3)
    check_ddf(initial_ddf, "initial_ddf")
    check_same_spatial_shape(moving, initial_ddf, "moving", "initial_ddf")
    check_integer(iterations, "iterations", 0)
    smoothness = float(check_positive(smoothness, "smoothness", allow_zero=True))
    check_positive(learning_rate, "learning_rate")
    moving, fixed = moving.detach(), fixed.detach()

    def objective(field: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        similarity_value = similarity(spatial.warp(moving, field), fixed)
        regularisation = diffusion_regularisation(field)
        parts = {"similarity": similarity_value, "diffusion": regularisation}
        return similarity_value + smoothness * regularisation, parts

    def report(step: int, loss: float, parts: dict[str, torch.Tensor]) -> None:
        if log is not None and (step % 10 == 0 or step == iterations):
            log(
                f"instance optimisation {step}/{iterations}: loss {loss:.5f} similarity "
                f"{float(parts['similarity']):.5f} diffusion {float(parts['diffusion']):.5f}"
            )

    return adam_on_field(initial_ddf, objective, iterations, learning_rate, report)


def adam_on_field(
    initial: torch.Tensor,
    objective: Objective,
    iterations: int,
    learning_rate: float,
    on_step: StepCallback | None = None,
    eps: float = 1e-8,
    schedule: Callable[[int], float] | None = None,
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Adam on a field with the gradient of ``objective`` from autograd: :func:`adam_descent` for
    :func:`optimise_field` (the refinement stage, :func:`~monai_unireg.engines.refinement.refine_field`, writes
    its gradient by hand and calls :func:`adam_descent` itself).

    The only variable is a copy of ``initial``; whatever ``objective`` closes over (images, features) is treated as
    constant.

    Args:
        initial: ``[B, n, *S]`` starting field (any floating tensor; it is copied, not modified).
        objective: ``objective(field) -> (loss, parts)``: the scalar loss to minimise and named scalar terms of it
            (for ``on_step``; may be empty).
        iterations: Adam steps (0 returns a copy of ``initial``).
        learning_rate: Adam step size, in the field's units.
        on_step: ``on_step(step, loss, parts)`` with the objective before step ``step`` (``0..iterations``; the last
            call is after the last step), parts detached.
        eps, schedule, after_step: as :func:`adam_descent`.

    Returns:
        the optimised ``[B, n, *S]`` field (no gradient) and the loss before each step and after the last
        (``iterations + 1`` values).
    """
    losses: list[float] = []

    def evaluate(field: torch.Tensor) -> torch.Tensor:
        loss, parts = objective(field)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(len(losses) - 1, losses[-1], {name: value.detach() for name, value in parts.items()})
        return loss

    def gradient(field: torch.Tensor) -> torch.Tensor:
        variable = field.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(evaluate(variable), variable)
        return grad

    field = adam_descent(initial, gradient, iterations, learning_rate, eps, schedule, after_step)
    with torch.enable_grad():  # the objective after the last step (objectives may need autograd to run)
        evaluate(field.detach().requires_grad_(True))
    return field, losses


def adam_descent(
    initial: torch.Tensor,
    gradient: Callable[[torch.Tensor], torch.Tensor],
    iterations: int,
    learning_rate: float,
    eps: float = 1e-8,
    schedule: Callable[[int], float] | None = None,
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Adam steps on a field: the loop shared by :func:`adam_on_field` (autograd) and the refinement stage
    (:func:`~monai_unireg.engines.refinement.refine_field`, gradients written out).

    Deterministic on the CPU for a given thread count: Adam's update is elementwise.

    Args:
        initial: ``[B, n, *S]`` starting field (any floating tensor; it is copied, not modified).
        gradient: ``gradient(field) -> [B, n, *S]``, the objective's gradient at ``field`` (called once per step,
            without gradients recorded; it must not keep or change ``field``).
        iterations: Adam steps (0 returns a copy of ``initial``).
        learning_rate: Adam step size, in the field's units.
        eps: Adam's ``epsilon`` (PyTorch's default ``1e-8``): where the gradient is much smaller, a step is
            ``learning_rate * gradient / eps`` instead of about ``learning_rate``.
        schedule: ``schedule(step) -> factor``: step ``step`` (``0..iterations - 1``) uses ``learning_rate *
            factor``; ``None``: constant. Adam with a constant rate does not settle: near the optimum it keeps
            stepping by about the learning rate (its steps are normalised), so a rate decayed to 0 is what lets
            the field come to rest.
        after_step: ``after_step(field)`` after every Adam step, without gradients, free to change the field in
            place (e.g. smooth it); ``None``: nothing.

    Returns:
        the ``[B, n, *S]`` field after the last step, without gradient.
    """
    check_integer(iterations, "iterations", 0)
    check_positive(learning_rate, "learning_rate")
    field = initial.detach().clone()
    optimizer = _Adam(field, eps=float(check_positive(eps, "eps")))
    with torch.no_grad():
        for step in range(iterations):
            optimizer.step(gradient(field), learning_rate * (1.0 if schedule is None else float(schedule(step))))
            if after_step is not None:
                after_step(field)
    return field


class _Adam:
    """Adam (Kingma and Ba, ICLR 2015) on one tensor, ``torch.optim.Adam(fused=True)``'s kernel called directly
    (``torch._fused_adam_``: the same values bit for bit, ``tests/engines/test_instance_optimisation.py``), betas
    (0.9, 0.999), no weight decay.

    Not ``torch.optim.Adam`` itself: constructing any ``torch.optim`` optimiser imports ``torch._dynamo``, 0.9 s of
    the command line's start (``python -X importtime``) for one elementwise update. The fused kernel reads and
    writes each state tensor once per step: 0.9 ms instead of 4.2 ms for the single-tensor arithmetic (seven
    elementwise passes) on a ``[1, 3, 80, 96, 112]`` field with 2 threads, 70 ms of the command line's 20
    full-resolution refinement steps on a 2 mm brain.
    """

    def __init__(self, parameter: torch.Tensor, eps: float = 1e-8, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.parameter, self.eps, self.betas = parameter, eps, betas
        self.exp_avg = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        self.steps = torch.zeros((), dtype=torch.float32, device=parameter.device)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, learning_rate: float) -> None:
        """One update of the parameter, in place, from its gradient ``grad`` with step size ``learning_rate``."""
        beta1, beta2 = self.betas
        self.steps.add_(1)
        torch._fused_adam_(
            [self.parameter],
            [grad],
            [self.exp_avg],
            [self.exp_avg_sq],
            [],
            [self.steps],
            lr=learning_rate,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )


class FieldOptimised(nn.Module):
    """A registration network followed by field instance optimisation (:func:`optimise_field`) on every pair.

    ``forward(moving, fixed) -> ddf``: the network's field, refined. The network runs without gradients.

    Args:
        network: ``network(moving, fixed) -> ddf`` (e.g. ``UniReg.conditioned(task, reg_type)``).
        similarity: the IO similarity loss.
        smoothness: ``lambda`` of the diffusion term (e.g. the task's regularisation prior).
        iterations: Adam steps per pair.
        learning_rate: Adam step size in voxels.
        log: progress output (``None``: silent).
    """

    def __init__(
        self,
        network: nn.Module,
        similarity: Similarity,
        smoothness: float = 1.0,
        iterations: int = 50,
        learning_rate: float = 0.1,
        log: Log | None = print,
    ) -> None:
        super().__init__()
        self.network = network
        self.similarity = similarity
        self.smoothness = float(check_positive(smoothness, "smoothness", allow_zero=True))
        self.iterations = check_integer(iterations, "iterations", 0)
        self.learning_rate = float(check_positive(learning_rate, "learning_rate"))
        self.log = log

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            initial = self.network(moving, fixed)
        ddf, _ = optimise_field(
            moving, fixed, initial, self.similarity, self.smoothness, self.iterations, self.learning_rate, self.log
        )
        return ddf
