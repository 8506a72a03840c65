"""Small value checks shared by the protocol's decoders (no third-party imports)."""

from __future__ import annotations

import math
from typing import Any


def finite_number(v: Any) -> bool:
    """An int or float, not a bool, that converts to a finite float (an int may be too large)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False
