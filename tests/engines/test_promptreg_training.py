"""PromptReg training: the objective's terms against the losses computed directly, the domain bookkeeping, and
train_promptreg over two datasets (one domain each) with resume."""

from __future__ import annotations

import pytest
import torch

from monai_unireg import spatial
from monai_unireg.data import PairSampler
from monai_unireg.engines import DomainPairLoader, PromptRegObjective, train_promptreg
from monai_unireg.losses import MINDSSCLoss, PromptOrthogonalityLoss, TaskSimilarityLoss, diffusion_regularisation
from monai_unireg.networks.nets import PromptReg

SMALL = {"input_size": (16, 16, 16), "num_domains": 2, "channels": 2}


def test_objective_is_the_weighted_sum_of_the_paper_terms(generator):
    torch.manual_seed(0)
    net = PromptReg(**SMALL)
    for head in net.heads:
        torch.nn.init.normal_(head.weight, std=1e-2)  # a visible field, so every term is non-trivial
    batch = {
        "moving": torch.rand(2, 1, 16, 16, 16, generator=generator),
        "fixed": torch.rand(2, 1, 16, 16, 16, generator=generator),
        "domain": torch.tensor([1, 0]),
    }
    terms = PromptRegObjective()(net, batch)
    out = net.register(batch["moving"], batch["fixed"])
    similarity = MINDSSCLoss(2, 2)(spatial.warp(batch["moving"], out.ddf), batch["fixed"])
    orthogonality = PromptOrthogonalityLoss()(out.prompt.knowledge_base)
    task = TaskSimilarityLoss()(out.prompt.weighted_prompt, out.prompt.knowledge_base[[1, 0]])
    diffusion = diffusion_regularisation(out.ddf)
    torch.testing.assert_close(terms.similarity, similarity)
    torch.testing.assert_close(terms.orthogonality, orthogonality)
    torch.testing.assert_close(terms.task_similarity, task)
    expected = similarity + 0.1 * diffusion + 1e-3 * orthogonality + 1e-3 * task
    torch.testing.assert_close(terms.total, expected)
    assert diffusion > 0 and task > 0


def test_ablation_has_no_prompt_terms_and_domains_are_checked(generator):
    torch.manual_seed(0)
    pair = {"moving": torch.rand(1, 1, 16, 16, 16, generator=generator), "fixed": torch.rand(1, 1, 16, 16, 16)}
    terms = PromptRegObjective()(PromptReg(**SMALL, use_prompt=False), pair)
    assert set(terms.as_floats()) == {"loss", "similarity", "diffusion"}
    with pytest.raises(ValueError, match="domain"):
        PromptRegObjective()(PromptReg(**SMALL), pair)
    with pytest.raises(ValueError, match="num_domains"):
        PromptRegObjective()(PromptReg(**SMALL), {**pair, "domain": torch.tensor([2])})
    with pytest.raises(ValueError, match="smoothness"):
        PromptRegObjective(smoothness=-1.0)


def test_loader_adds_the_domain(tiny_datasets):
    sampler = PairSampler([tiny_datasets["labelled"], tiny_datasets["unlabelled"]], pairs_per_dataset=2, seed=0)
    pairs = sampler.pairs_for_epoch(0)
    items = [DomainPairLoader((16, 16, 16))(pair) for pair in pairs]
    assert sorted(int(item["domain"]) for item in items) == [0, 0, 1, 1]
    validation_pair = {key: value for key, value in pairs[0].items() if key != "domain"}
    assert "domain" not in DomainPairLoader((16, 16, 16))(validation_pair)  # validation pairs need none


class Interrupted(Exception):
    """Raised by a log function to stop a training run part-way."""


def test_training_over_two_domains_resumes_exactly(tiny_datasets, tmp_path):
    datasets = [tiny_datasets["labelled"], tiny_datasets["unlabelled"]]

    def stop_in_epoch_two(line: str) -> None:
        if line.startswith("epoch 2/2 iteration"):
            raise Interrupted

    validation = [  # labelled pairs without a domain, as a held-out dataset's
        {key: value for key, value in pair.items() if key != "domain"}
        for pair in PairSampler([tiny_datasets["labelled"]], pairs_per_dataset=1, seed=1).pairs_for_epoch(0)
    ]

    def run(folder, log=lambda _: None):
        torch.manual_seed(0)
        net = PromptReg(**SMALL)
        sampler = PairSampler(datasets, pairs_per_dataset=2, seed=0)
        return net, train_promptreg(net, sampler, folder, 2, learning_rate=1e-3, validation_pairs=validation, log=log)

    straight, history = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", stop_in_epoch_two)
    resumed, resumed_history = run(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "model.pt").is_file() and len(history) == 2
    assert {"orthogonality", "task_similarity", "learning_rate", "validation_dice"} <= set(history[0])
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in history] == [r["loss"] for r in resumed_history]
    saved = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert all(group["amsgrad"] for group in saved["optimizer"]["param_groups"])  # the authors' Adam(amsgrad=True)
    with pytest.raises(ValueError, match="num_domains=3"):
        train_promptreg(
            PromptReg(**{**SMALL, "num_domains": 3}), PairSampler(datasets, 2), tmp_path / "bad", 1, log=print
        )
