"""PromptReg regularisers: orthogonality of the knowledge base and task similarity of the weighted prompt."""

from __future__ import annotations

import math

import pytest
import torch

from monai_unireg.losses import PromptOrthogonalityLoss, TaskSimilarityLoss


def orthogonal_prompts(generator: torch.Generator, count: int = 4) -> torch.Tensor:
    """``[count, 2, 3, 2, 2]`` prompts whose flattened rows are orthogonal with different norms."""
    q, _ = torch.linalg.qr(torch.randn(24, count, generator=generator, dtype=torch.float64))
    scales = torch.arange(1, count + 1, dtype=torch.float64).view(-1, 1)
    return (q.t() * scales).reshape(count, 2, 3, 2, 2)


@pytest.mark.parametrize("normalize", [False, True])
def test_orthogonality_zero_for_orthogonal_prompts(normalize, generator):
    assert PromptOrthogonalityLoss(normalize)(orthogonal_prompts(generator)).item() == pytest.approx(0.0, abs=1e-12)
    assert PromptOrthogonalityLoss(normalize)(torch.randn(1, 5, generator=generator)).item() == 0.0


def test_orthogonality_value_for_two_prompts():
    prompts = torch.tensor([[3.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    # Off-diagonal Gram entries are <b1, b2> = 3 twice: Frobenius norm sqrt(2) * 3.
    assert PromptOrthogonalityLoss()(prompts).item() == pytest.approx(math.sqrt(2) * 3.0)
    cosine = 3.0 / (3.0 * math.sqrt(5.0))
    assert PromptOrthogonalityLoss(normalize=True)(prompts).item() == pytest.approx(math.sqrt(2) * cosine)


def test_orthogonality_scaling(generator):
    prompts = torch.randn(3, 4, 2, 2, 2, generator=generator, dtype=torch.float64)
    plain, normalised = PromptOrthogonalityLoss(), PromptOrthogonalityLoss(normalize=True)
    assert plain(prompts) > 0 and normalised(prompts) > 0
    assert torch.allclose(plain(5.0 * prompts), 25.0 * plain(prompts))
    assert torch.allclose(normalised(5.0 * prompts), normalised(prompts))


def test_orthogonality_gradient_and_dtype(generator):
    prompts = torch.randn(3, 4, 2, 2, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PromptOrthogonalityLoss(), (prompts,))
    assert torch.autograd.gradcheck(PromptOrthogonalityLoss(normalize=True), (prompts,))
    assert PromptOrthogonalityLoss()(prompts.detach().half()).dtype == torch.float32


def test_task_similarity_values(generator):
    task = torch.randn(3, 4, 2, 2, 2, generator=generator)
    loss = TaskSimilarityLoss(reduction="none")
    assert torch.allclose(loss(task, task), torch.zeros(3), atol=1e-6)
    assert torch.allclose(loss(2.5 * task, task), torch.zeros(3), atol=1e-6)
    assert torch.allclose(loss(-task, task), torch.full((3,), 4.0), atol=1e-6)
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    second = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    expected = torch.tensor([1.0, (1.0 - 1.0 / math.sqrt(2.0)) ** 2])
    assert torch.allclose(loss(first, second), expected)
    assert TaskSimilarityLoss()(first, second).item() == pytest.approx(expected.mean().item())
    assert TaskSimilarityLoss(reduction="sum")(first, second).item() == pytest.approx(expected.sum().item())


def test_task_similarity_with_knowledge_base_lookup(generator):
    knowledge_base = orthogonal_prompts(generator)
    task_index = torch.tensor([2, 0, 3])
    weighted = knowledge_base[task_index].clone().requires_grad_()
    value = TaskSimilarityLoss()(weighted, knowledge_base[task_index])
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    other = TaskSimilarityLoss(reduction="none")(knowledge_base[torch.tensor([1, 1, 1])], knowledge_base[task_index])
    assert torch.allclose(other, torch.ones(3, dtype=torch.float64))
    mixed = (0.5 * knowledge_base[0] + 0.5 * knowledge_base[1]).unsqueeze(0).requires_grad_()
    TaskSimilarityLoss()(mixed, knowledge_base[:1]).backward()
    assert torch.isfinite(mixed.grad).all() and mixed.grad.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="knowledge_base"):
        PromptOrthogonalityLoss()(torch.randn(4))
    with pytest.raises(ValueError, match="knowledge_base"):
        PromptOrthogonalityLoss()(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="knowledge_base"):
        PromptOrthogonalityLoss()(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="knowledge_base"):
        PromptOrthogonalityLoss()(torch.ones(0, 3))
    loss = TaskSimilarityLoss()
    with pytest.raises(ValueError, match="weighted_prompt and task_prompt"):
        loss(torch.randn(2, 3, 4), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="task_prompt"):
        loss(torch.randn(2, 3), torch.tensor([[1.0, float("inf"), 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="weighted_prompt"):
        loss([1.0, 2.0], torch.randn(1, 2))


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: TaskSimilarityLoss(reduction="foo"), "reduction"),
        (lambda: PromptOrthogonalityLoss(normalize="yes"), "normalize"),
    ],
)
def test_bad_options(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(generator):
    knowledge_base = torch.randn(4, 3, 2, 2, 2, generator=generator)
    weighted = torch.randn(2, 3, 2, 2, 2, generator=generator)
    for normalize in (False, True):
        expected = PromptOrthogonalityLoss(normalize)(knowledge_base)
        assert torch.allclose(PromptOrthogonalityLoss(normalize)(knowledge_base.cuda()).cpu(), expected, rtol=1e-5)
    expected = TaskSimilarityLoss()(weighted, knowledge_base[:2])
    assert torch.allclose(TaskSimilarityLoss()(weighted.cuda(), knowledge_base[:2].cuda()).cpu(), expected, rtol=1e-5)
