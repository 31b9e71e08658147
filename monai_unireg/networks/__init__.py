"""Registration networks and their building blocks."""

from monai_unireg._lazy import lazy_attributes

__all__ = ["blocks", "nets"]

__getattr__, __dir__ = lazy_attributes(globals(), {}, __all__)
