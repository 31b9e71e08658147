"""Seeded multi-dataset pair sampling: ``N`` random pairs per dataset per epoch.

uniGradICON trains on 1000 random pairs per dataset per epoch, PromptReg on 100. :class:`PairSampler`
reproduces that scheme: the pairs of an epoch are a pure function of ``(seed, epoch)``, so a run that
is stopped and resumed (``state_dict`` / ``load_state_dict``) sees exactly the pairs it would have seen.

Design: the sampler produces plain lists of pair dictionaries (paths, ``dataset`` name and integer
``domain`` id), the input MONAI expects; :class:`EpochPairDataset` is a ``monai.data.Dataset`` whose list
is redrawn by ``set_epoch``. Typical use::

    sampler = PairSampler(["BrainSynth/BrainSynth_dataset.json", "ProstateMRUS/ProstateMRUS_dataset.json"],
                          pairs_per_dataset=100, seed=0)
    dataset = EpochPairDataset(sampler, transform=preprocessing)
    loader = monai.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=2)
    for epoch in range(start_epoch, num_epochs):
        dataset.set_epoch(epoch)        # before iterating the loader (workers are created per epoch)
        for batch in loader: ...

With ignite / ``SupervisedTrainer``, call ``dataset.set_epoch(engine.state.epoch - 1)`` in an
``Events.EPOCH_STARTED`` handler. ``persistent_workers=True`` would keep the previous epoch's list in the
workers, so leave it off.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from monai.data import Dataset

from monai_unireg.data.learn2reg import Learn2RegDataset, make_pair, read_learn2reg
from monai_unireg.validation import check_bool, check_integer

__all__ = ["PairSampler", "EpochPairDataset"]

DatasetLike = Learn2RegDataset | str | os.PathLike


def _pair_source(dataset: Learn2RegDataset) -> list[dict[str, str]] | tuple[dict[str, str], ...]:
    """What pairs of ``dataset`` are drawn from: its listed training pairs (paired) or its cases (unpaired).

    Raises:
        ValueError: the dataset cannot provide a pair (paired without ``training_paired_images``,
            unpaired with fewer than two cases -- a case registered to itself teaches nothing).
    """
    if dataset.paired:
        pairs = dataset.pairs("training_paired_images")
        if not pairs:
            raise ValueError(f"dataset {dataset.name!r} is paired but lists no training_paired_images.")
        return pairs
    if len(dataset.cases) < 2:
        raise ValueError(
            f"dataset {dataset.name!r} has {len(dataset.cases)} training case(s); unpaired sampling needs at "
            "least 2 distinct cases."
        )
    return dataset.cases


class PairSampler:
    """Draw ``pairs_per_dataset`` random pairs from each of several Learn2Reg datasets per epoch.

    * Paired datasets (``"pairings": "paired"``, e.g. ProstateMRUS) draw from their
      ``training_paired_images``; every listed pair appears ``floor(N / M)`` or ``ceil(N / M)`` times per
      epoch (``M`` listed pairs; concatenated random permutations).
    * Unpaired datasets draw an ordered pair of two distinct training cases ``(i, j)``, ``i != j``,
      uniformly among the ``n (n - 1)`` ordered pairs, independently for each of the ``N`` draws.
    * With ``one_pass`` (SACB-Net's schedule, as its reference code: every training pair once per epoch), each
      dataset instead contributes every one of its pairs exactly once per epoch (the listed pairs, or all
      ``n (n - 1)`` ordered pairs), in an order drawn from ``(seed, epoch)``; ``pairs_per_dataset`` is not used.
    * A dataset that cannot provide a pair (a single case such as BrainVXM1mm: registering a scan to
      itself is useless) raises ``ValueError``, or is skipped with a warning when ``skip_unpairable``.

    Each pair dictionary is ``{"fixed_image", "moving_image", "fixed_label"?, "moving_label"?, "dataset",
    "domain"}``, where ``domain`` is the dataset's index among the datasets kept (``0 .. K-1``, in the
    order given; see :attr:`domains`). The draw of dataset ``k`` in epoch ``e`` depends only on
    ``(seed, e, k)``; with ``shuffle`` the concatenated list is then permuted (also seeded by ``(seed, e)``).

    Args:
        datasets: :class:`Learn2RegDataset` objects or paths of ``*_dataset.json`` files.
        pairs_per_dataset: pairs drawn per dataset per epoch (uniGradICON: 1000, PromptReg: 100).
        seed: non-negative integer seed.
        shuffle: interleave the datasets (otherwise the list is ordered by domain).
        skip_unpairable: warn and skip datasets that cannot provide a pair instead of raising.
        one_pass: every pair of every dataset once per epoch (a seeded permutation) instead of random draws.
    """

    def __init__(
        self,
        datasets: Sequence[DatasetLike],
        pairs_per_dataset: int = 1000,
        seed: int = 0,
        shuffle: bool = True,
        skip_unpairable: bool = False,
        one_pass: bool = False,
    ) -> None:
        if isinstance(datasets, (str, os.PathLike)) or len(datasets) == 0:
            raise ValueError(f"datasets must be a non-empty sequence of datasets or JSON paths, got {datasets!r}.")
        self.pairs_per_dataset = check_integer(pairs_per_dataset, "pairs_per_dataset", 1)
        self.seed = check_integer(seed, "seed", 0)
        self.shuffle = check_bool(shuffle, "shuffle")
        self.one_pass = check_bool(one_pass, "one_pass")
        self.epoch = 0
        self._names: list[str] = []
        self._sources: list[Sequence[dict[str, str]]] = []
        self._paired: list[bool] = []
        for item in datasets:
            self._add(item if isinstance(item, Learn2RegDataset) else read_learn2reg(item), skip_unpairable)
        if not self._names:
            raise ValueError("datasets: none of the datasets can provide a registration pair.")

    def _add(self, dataset: Learn2RegDataset, skip_unpairable: bool) -> None:
        """Register ``dataset`` as the next domain (or skip it when it cannot provide pairs)."""
        if dataset.name in self._names:
            raise ValueError(f"datasets: the dataset name {dataset.name!r} appears twice.")
        try:
            source = _pair_source(dataset)
        except ValueError as err:
            if not skip_unpairable:
                raise ValueError(f"datasets: {err} Pass skip_unpairable=True to skip it.") from err
            warnings.warn(f"PairSampler skips a dataset: {err}", stacklevel=3)
            return
        self._names.append(dataset.name)
        self._sources.append(source)
        self._paired.append(dataset.paired)

    @property
    def domains(self) -> dict[str, int]:
        """Dataset name -> domain id (the ``"domain"`` value of its pairs)."""
        return {name: index for index, name in enumerate(self._names)}

    def __len__(self) -> int:
        """Number of pairs per epoch: ``pairs_per_dataset`` times the number of datasets kept, or with ``one_pass``
        the number of pairs all datasets hold."""
        if self.one_pass:
            return sum(self._pair_count(domain) for domain in range(len(self._names)))
        return self.pairs_per_dataset * len(self._names)

    def _pair_count(self, domain: int) -> int:
        """Distinct pairs dataset ``domain`` holds: its listed pairs, or its ``n (n - 1)`` ordered case pairs."""
        n = len(self._sources[domain])
        return n if self._paired[domain] else n * (n - 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose pairs :meth:`__iter__` yields."""
        self.epoch = check_integer(epoch, "epoch", 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Iterate over the pairs of the current epoch (see :meth:`set_epoch`)."""
        return iter(self.pairs_for_epoch(self.epoch))

    def pairs_for_epoch(self, epoch: int) -> list[dict[str, Any]]:
        """The ``len(self)`` pair dictionaries of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
        epoch = check_integer(epoch, "epoch", 0)
        pairs: list[dict[str, Any]] = []
        for domain in range(len(self._names)):
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch], spawn_key=(0, domain)))
            pairs.extend(self._draw(domain, rng))
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch], spawn_key=(1,))).permutation(
                len(pairs)
            )
            pairs = [pairs[i] for i in order]
        return pairs

    def _draw(self, domain: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """``pairs_per_dataset`` pairs of one dataset, tagged with its name and domain id."""
        source, name, count = self._sources[domain], self._names[domain], self.pairs_per_dataset
        if self.one_pass:
            order = rng.permutation(self._pair_count(domain))
            if self._paired[domain]:
                drawn = [dict(source[i]) for i in order]
            else:  # ordered pair k: fixed i = k // (n - 1), moving the (k % (n - 1))-th of the other cases
                others = len(source) - 1
                fixed, rank = order // others, order % others
                moving = rank + (rank >= fixed)
                drawn = [make_pair(source[i], source[j], name) for i, j in zip(fixed, moving)]
        elif self._paired[domain]:
            repeats = -(-count // len(source))
            indices = np.concatenate([rng.permutation(len(source)) for _ in range(repeats)])[:count]
            drawn = [dict(source[i]) for i in indices]
        else:
            fixed = rng.integers(len(source), size=count)
            moving = (fixed + rng.integers(1, len(source), size=count)) % len(source)
            drawn = [make_pair(source[i], source[j], name) for i, j in zip(fixed, moving)]
        for pair in drawn:
            pair["domain"] = domain
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the next pairs: seed, epoch, pairs per dataset, shuffle, one pass and dataset
        names."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "pairs_per_dataset": self.pairs_per_dataset,
            "shuffle": self.shuffle,
            "one_pass": self.one_pass,
            "datasets": list(self._names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the datasets must be the same (same names, same order)."""
        missing = {"seed", "epoch", "pairs_per_dataset", "shuffle", "datasets"} - set(state)
        if missing:
            raise ValueError(f"state is missing the keys {sorted(missing)}.")
        if list(state["datasets"]) != self._names:
            raise ValueError(
                f"state was saved for datasets {list(state['datasets'])}, but this sampler has {self._names}."
            )
        self.seed = check_integer(state["seed"], "state['seed']", 0)
        self.pairs_per_dataset = check_integer(state["pairs_per_dataset"], "state['pairs_per_dataset']", 1)
        self.shuffle = bool(state["shuffle"])
        self.one_pass = bool(state.get("one_pass", False))  # absent from checkpoints written before one_pass
        self.set_epoch(state["epoch"])


class EpochPairDataset(Dataset):
    """A ``monai.data.Dataset`` over the pairs of one epoch of a :class:`PairSampler`.

    ``set_epoch(epoch)`` redraws the list (``self.data``); items are the sampler's pair dictionaries after
    ``transform`` (e.g. ``LoadImaged`` + intensity normalisation + :class:`~monai_unireg.transforms.ResizePaird`).

    Args:
        sampler: the pair sampler; its current epoch is used at construction.
        transform: MONAI transform applied to each pair dictionary.
        max_pairs: keep only the first pairs of every epoch (quick runs, tests); ``None``: all.
    """

    def __init__(self, sampler: PairSampler, transform: Callable | None = None, max_pairs: int | None = None) -> None:
        self.sampler = sampler
        self.max_pairs = None if max_pairs is None else check_integer(max_pairs, "max_pairs", 1)
        super().__init__(data=self._pairs(sampler.epoch), transform=transform)

    def _pairs(self, epoch: int) -> list[dict[str, Any]]:
        return self.sampler.pairs_for_epoch(epoch)[: self.max_pairs]

    def set_epoch(self, epoch: int) -> None:
        """Draw the pairs of ``epoch`` (also sets the sampler's epoch, so its ``state_dict`` follows)."""
        self.sampler.set_epoch(epoch)
        self.data = self._pairs(epoch)
