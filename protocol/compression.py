"""Wire compression of expert factors (``federation.compression``): none, fp16, int8.

LoRA factors are small dense matrices; the edge may shrink its upload:

* ``fp16`` — each tensor cast to float16 (half the bytes; relative error ≈ 2⁻¹¹ per value);
* ``int8`` — symmetric per-row absmax: row i of X (float32, (rows, cols)) becomes
  q_i = round(127 · X_i / max|X_i|) as int8 plus one float32 scale max|X_i|/127 per row, sent under
  ``"<key>::scale"`` with shape (rows, 1). A quarter of the bytes plus 4 bytes a row.

:func:`decompress` turns any of these back into float32 tensors under the original keys, so the
cloud validates and aggregates one representation whatever the client chose (its float64
accumulation is unchanged). Malformed pairs (a scale without its tensor, mismatched shapes,
non-finite scales) raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

COMPRESSIONS = ("none", "fp16", "int8")
SCALE_SUFFIX = "::scale"


def compress(tensors: Mapping[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Float tensors (any shape with ndim ≥ 1) → the wire dict for ``mode``."""
    if mode not in COMPRESSIONS:
        raise ValueError(f"unknown compression {mode!r}; use one of {', '.join(COMPRESSIONS)}")
    out: dict[str, np.ndarray] = {}
    for k, x in tensors.items():
        x = np.asarray(x, dtype=np.float32)
        if mode == "none":
            out[k] = x
        elif mode == "fp16":
            out[k] = x.astype(np.float16)
        else:
            rows = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # (rows, cols); -1 fails on 0 rows
            scale = np.abs(rows).max(axis=1, keepdims=True) / 127.0  # (rows, 1)
            safe = np.where(scale > 0, scale, 1.0)
            out[k] = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8).reshape(x.shape)
            out[k + SCALE_SUFFIX] = scale.astype(np.float32)
    return out


def decompress(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The wire dict → float32 tensors under the original keys."""
    out: dict[str, np.ndarray] = {}
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in arrays.items() if k.endswith(SCALE_SUFFIX)}
    for k in scales:
        if k not in arrays:
            raise ValueError(f"{k + SCALE_SUFFIX!r} has no tensor {k!r} to scale")
    for k, x in arrays.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        if k in scales:
            s = np.asarray(scales[k])
            if x.dtype != np.int8 or x.ndim < 1 or s.shape != (x.shape[0], 1):
                rows = x.shape[0] if x.ndim else "?"
                raise ValueError(f"int8 tensor {k!r} must be int8 with a ({rows}, 1) scale, got "
                                 f"dtype {x.dtype} and scale shape {s.shape}")
            if not np.issubdtype(s.dtype, np.floating) or not np.isfinite(s).all() or (s < 0).any():
                raise ValueError(f"scale of {k!r} must be finite floats >= 0")
            rows = x.reshape(x.shape[0], math.prod(x.shape[1:])).astype(np.float32) * s.astype(np.float32)
            out[k] = rows.reshape(x.shape)
        elif x.dtype == np.int8:
            raise ValueError(f"int8 tensor {k!r} arrived without its {k + SCALE_SUFFIX!r}")
        elif np.issubdtype(x.dtype, np.floating):
            out[k] = x.astype(np.float32)
        else:
            out[k] = x  # the validator names non-float dtypes
    return out
