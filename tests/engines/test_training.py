"""What the training objectives return (``engines/training.py``): :class:`LossTerms`."""

from __future__ import annotations

import pytest
import torch

from monai_unireg.engines import LossTerms


def test_loss_terms_give_their_parts_and_refuse_a_part_named_loss():
    terms = LossTerms(torch.tensor(3.0), similarity=torch.tensor(1.0), regulariser=torch.tensor(2.0))
    assert terms.similarity == 1.0 and terms.as_floats() == {"loss": 3.0, "similarity": 1.0, "regulariser": 2.0}
    with pytest.raises(AttributeError, match="dice"):
        _ = terms.dice
    with pytest.raises(ValueError, match="loss"):
        LossTerms(torch.tensor(1.0), loss=torch.tensor(1.0))
