"""Datasets: Learn2Reg ``*_dataset.json`` reader and seeded multi-dataset pair sampling."""

from monai_unireg.data.learn2reg import (
    PAIR_SECTIONS,
    Learn2RegDataset,
    find_learn2reg_datasets,
    label_path_for,
    load_learn2reg,
    make_pair,
    pair_name,
    read_learn2reg,
)
from monai_unireg.data.sampler import EpochPairDataset, PairSampler

__all__ = [
    "PAIR_SECTIONS",
    "EpochPairDataset",
    "Learn2RegDataset",
    "PairSampler",
    "find_learn2reg_datasets",
    "label_path_for",
    "load_learn2reg",
    "make_pair",
    "pair_name",
    "read_learn2reg",
]
