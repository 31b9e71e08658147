"""PromptReg's training pieces: the objective's terms against the losses computed directly (also through the
bundle's RegistrationStep call), the domain bookkeeping (prepare_domain_batch), and the bundle's leave-one-out split,
run names, evaluation items and Dice table (the training itself is bundles/promptreg's train.yaml, tested in
tests/bundles)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from ignite.engine import Engine, State

from monai_unireg import spatial
from monai_unireg.engines import DatasetDiceTable, PromptRegObjective
from monai_unireg.engines.promptreg import dataset_pair_items, prepare_domain_batch, run_name, split_held_out
from monai_unireg.losses import MINDSSCLoss, PromptOrthogonalityLoss, TaskSimilarityLoss, diffusion_regularisation
from monai_unireg.networks.nets import PairInput, PromptReg

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


def test_the_objective_reads_the_prompt_of_a_wrapped_network_through_a_plain_call(generator):
    """As the bundle's RegistrationStep calls it: a plain ``model(moving, fixed)`` function of the PairInput, the
    network given to the objective; the same terms as on the network itself."""
    torch.manual_seed(0)
    wrapped = PairInput(PromptReg(**SMALL))
    pair = {
        "moving": torch.rand(1, 1, 16, 16, 16, generator=generator),
        "fixed": torch.rand(1, 1, 16, 16, 16, generator=generator),
        "domain": torch.tensor([1]),
    }
    through_call = PromptRegObjective(network=wrapped)(lambda m, f: wrapped(torch.cat([m, f], 1)), pair)
    direct = PromptRegObjective()(wrapped.network, pair)
    assert set(through_call.parts) == {"similarity", "diffusion", "orthogonality", "task_similarity"}
    for name, value in direct.parts.items():
        torch.testing.assert_close(through_call.parts[name], value)
    assert not list(PromptRegObjective(network=wrapped).parameters())  # a reference, not a submodule
    with pytest.raises(ValueError, match=r"PromptRegObjective\(network=...\)"):
        PromptRegObjective()(lambda m, f: wrapped(torch.cat([m, f], 1)), pair)


def test_prepare_domain_batch_hands_the_domain_to_the_objective():
    batch = {"moving_image": torch.rand(2, 1, 4, 4, 4), "fixed_image": torch.rand(2, 1, 4, 4, 4)}
    image, pair = prepare_domain_batch({**batch, "domain": torch.tensor([1, 0])}, "cpu")
    assert image.shape == (2, 2, 4, 4, 4) and pair["domain"].tolist() == [1, 0]
    assert pair["domain"].dtype == torch.int64
    assert "domain" not in prepare_domain_batch(batch, "cpu")[1]  # validation pairs need none


def test_leave_one_out_split_and_run_names(tiny_datasets):
    labelled, unlabelled = str(tiny_datasets["labelled"]), str(tiny_datasets["unlabelled"])
    assert split_held_out([labelled, unlabelled]) == ([labelled, unlabelled], None)
    assert split_held_out([labelled, unlabelled], "TinyNoLabels") == ([labelled], unlabelled)  # by name
    assert split_held_out([labelled, unlabelled], labelled) == ([unlabelled], labelled)  # by path
    assert run_name([labelled, unlabelled]) == "promptreg"
    assert run_name([labelled, unlabelled], "Tiny", use_prompt=False) == "promptreg_no_rpg_without_Tiny"
    with pytest.raises(ValueError, match="datasets must be a non-empty list"):
        split_held_out(labelled)
    with pytest.raises(ValueError, match=r"held_out 'Other' must name exactly one of datasets.*\(Tiny, TinyNoLabels\)"):
        split_held_out([labelled, unlabelled], "Other")
    with pytest.raises(ValueError, match="leaves no training dataset"):
        split_held_out([labelled], "Tiny")


def test_evaluation_items_and_the_dice_table(tiny_datasets, tmp_path):
    labelled, unlabelled = tiny_datasets["labelled"], tiny_datasets["unlabelled"]
    items = dataset_pair_items([labelled, unlabelled])
    assert [item["dataset"] for item in items] == ["Tiny", "TinyNoLabels"]
    assert items[0]["pair"].startswith("Tiny/") and items[1]["pair"].startswith("TinyNoLabels/")
    with pytest.raises(ValueError, match="two datasets have the same name"):
        dataset_pair_items([labelled, labelled])
    empty = labelled.parent / "Empty_dataset.json"  # beside the cases it names
    empty.write_text(json.dumps({**json.loads(labelled.read_text()), "name": "Empty", "registration_val": []}))
    with pytest.raises(ValueError, match="Empty_dataset.json has no registration_val pairs to evaluate"):
        dataset_pair_items([labelled, empty])
    empty.unlink()
    with pytest.raises(ValueError, match="dice_spread"):
        DatasetDiceTable(tmp_path, ["Tiny"], spread="variance")

    engine = Engine(lambda engine, batch: None)
    engine.state = State()
    engine.state.registration_rows = [
        {"pair": "Tiny/a", "dataset": "Tiny", "dice_mean": 0.5, "sdlogj": 0.1},
        {"pair": "Tiny/b", "dataset": "Tiny", "dice_mean": 0.7, "sdlogj": 0.1},
        {"pair": "TinyNoLabels/c", "dataset": "TinyNoLabels", "sdlogj": 0.2},  # no labels: no Dice
    ]
    lines = []
    DatasetDiceTable(tmp_path, ["Tiny", "TinyNoLabels"], "w/o X", "sem", log=lines.append)(engine)
    with open(tmp_path / "dice_table.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [["training set", "Tiny", "TinyNoLabels"], ["w/o X", "60.0 ± 10.0", "n/a"]]
    assert engine.state.dice_table["Tiny"] == pytest.approx({"mean": 60.0, "sem": 10.0, "n": 2})
    assert "standard error" in (tmp_path / "dice_table.md").read_text(encoding="utf-8")
    with open(tmp_path / "Tiny" / "metrics.csv", newline="") as handle:
        assert [row["pair"] for row in csv.DictReader(handle)] == ["Tiny/a", "Tiny/b"]
    assert (tmp_path / "TinyNoLabels" / "summary.json").is_file()
    assert lines == ["Dice (%) per dataset, w/o X: Tiny 60.0 ± 10.0, TinyNoLabels n/a"]
    del engine.state.registration_rows
    with pytest.raises(ValueError, match="needs a RegistrationWriter"):
        DatasetDiceTable(tmp_path, ["Tiny"])(engine)
