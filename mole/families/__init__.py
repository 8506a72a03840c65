"""Model families, keyed by ``config.model_type`` (see base.py and docs/families.md)."""

from mole.families import idefics3, llava, qwen2_vl  # noqa: F401  (each registers itself)
from mole.families.base import (
    CheckpointError,
    Family,
    VisionAdapter,
    family_for,
    known_model_types,
    read_model_type,
    register_family,
)

__all__ = ["CheckpointError", "Family", "VisionAdapter", "family_for", "known_model_types",
           "read_model_type", "register_family"]
