"""Boolean masks of 1-D tensors on the CPU, through numpy: the positions they select, and how many.

On the CPU torch's ``mask.nonzero()``, ``t[mask]`` and ``mask.any()`` cost several times what numpy's
``flatnonzero`` + ``index_select`` cost for the same work (docs/lookahead.md, session 24). The look-ahead
worker makes dozens of such selections per step, so its storage code selects through these. Tensors on
other devices take torch's own ops.
"""

from __future__ import annotations

import numpy as np
import torch


def where(mask: torch.Tensor) -> torch.Tensor:
    """int64 [k]: the positions where the 1-D ``mask`` is True (of another dtype: nonzero), increasing
    (``mask.nonzero().squeeze(1)``)."""
    if mask.device.type == "cpu":
        a = mask.numpy()
        return torch.from_numpy(np.flatnonzero(a if a.dtype == np.bool_ else a != 0))  # numpy's is slow on ints
    return mask.nonzero().squeeze(1)


def count(mask: torch.Tensor) -> int:
    """How many elements of the bool ``mask`` are True (``int(mask.sum())``)."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return int(mask.sum())


def any_true(mask: torch.Tensor) -> bool:
    """Whether any element of the bool ``mask`` is True (``bool(mask.any())``)."""
    return count(mask) > 0 if mask.device.type == "cpu" else bool(mask.any())


def select(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``tensors`` (first dimension = ``mask``'s length) at the positions ``mask`` selects: ``t[mask]``
    for each, with the positions found once."""
    at = where(mask)
    return tuple(t.index_select(0, at.to(t.device)) for t in tensors)
