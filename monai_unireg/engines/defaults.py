"""One home for each method's defaults: what the command line, the bundles and the trainers share.

Each method defines one :class:`MethodDefaults` next to its engine (``SACBNET_DEFAULTS`` in
:mod:`monai_unireg.engines.sacbnet`, ``UNIGRADICON_DEFAULTS`` in :mod:`~monai_unireg.engines.unigradicon`,
``PROMPTREG_DEFAULTS`` in :mod:`~monai_unireg.engines.promptreg`, ``UNIREG_DEFAULTS`` in
:mod:`~monai_unireg.engines.unireg`, ``VOXELOPT_DEFAULTS`` here, VoxelOpt having no trainer);
``monai_unireg.engines.METHOD_DEFAULTS`` lists them by method name. The bundles' configs read their CT window,
intensity range and working size from these (``$monai_unireg.engines.METHOD_DEFAULTS['sacbnet'].ct_window``), so a
value changes in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodDefaults", "VOXELOPT_DEFAULTS"]


@dataclass(frozen=True)
class MethodDefaults:
    """A method's preprocessing and run settings, with their sources.

    Attributes:
        name: the method's name (command line ``--method``, bundle folder).
        working_size: the size both images are resized to before the network (``None``: the pair's own grid).
        size_multiple: every axis of a working size must be a multiple of this.
        ct_window: HU window ``(a_min, a_max)`` of CT images, mapped to ``intensity_range``.
        intensity_range: the range both images are normalised to (MRI: [min, 99th percentile] -> this range).
        load_weights: ``load_weights(path) -> network``, the method's weights loader (``None``: no weights).
        io_iterations: instance-optimisation steps of the paper's "+ IO" setting (``0``: none).
        io_learning_rate: the step size of that instance optimisation.
        sources: where each value comes from (paper section, reference code, ours).
    """

    name: str
    working_size: tuple[int, int, int] | None
    size_multiple: int
    ct_window: tuple[float, float]
    intensity_range: tuple[float, float] = (0.0, 1.0)
    load_weights: Callable[[Any], Any] | None = None
    io_iterations: int = 0
    io_learning_rate: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)


#: VoxelOpt (training-free): the pair's own grid, HU [-800, 500] -> [0, 1] (paper Sec. 3.1).
VOXELOPT_DEFAULTS = MethodDefaults(
    name="voxelopt",
    working_size=None,
    size_multiple=1,
    ct_window=(-800.0, 500.0),
    sources={"ct_window": "paper Sec. 3.1", "working_size": "ours: the pair's own grid"},
)
