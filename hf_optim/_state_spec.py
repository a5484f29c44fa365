"""What one state entry of a parameter must be (:class:`StateSpec`): the vocabulary between the optimizers, the
precision module (stored forms) and the checked state loader. A leaf module, so all three can import it."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StateSpec(NamedTuple):
    """What one state entry of a parameter must be."""

    shape: tuple[int, ...] | None  # None: the step counter (a number or a 1-element tensor)
    like_param: bool = False  # a moment in the parameter's own space: complex exactly when the parameter is
    optional: bool = False  # may be None (torch.optim.SGD writes momentum_buffer=None without momentum)
    required: bool = False  # a non-empty state must hold it (the class does not create it lazily)
    dtype: torch.dtype | None = None  # exactly this dtype (quantised state: uint8 codes, float32 scales)


STEP = StateSpec(None)
