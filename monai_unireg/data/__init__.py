"""Datasets: Learn2Reg ``*_dataset.json`` reader and seeded multi-dataset pair sampling."""

from monai_unireg.data.learn2reg import (
    PAIR_FOLDER_SUFFIXES,
    PAIR_SECTIONS,
    Learn2RegDataset,
    find_learn2reg_datasets,
    label_path_for,
    load_learn2reg,
    load_pair_folder,
    make_pair,
    pair_name,
    read_learn2reg,
)
from monai_unireg.data.sampler import EpochPairDataset, PairSampler

__all__ = [
    "PAIR_FOLDER_SUFFIXES",
    "PAIR_SECTIONS",
    "EpochPairDataset",
    "Learn2RegDataset",
    "PairSampler",
    "find_learn2reg_datasets",
    "label_path_for",
    "load_learn2reg",
    "load_pair_folder",
    "make_pair",
    "pair_name",
    "read_learn2reg",
]
