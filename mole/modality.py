"""The modality map: which candidate LoRA module belongs to which modality.

D-MoLE's candidate modules are the attention projections of every layer of every tower (MLPs
get no experts). Each modality is a registered regex over module names of the unwrapped model;
the allocator splits the expert budget by modality, and the cloud aggregates experts per
modality, so every candidate must map to exactly one modality. New modalities (audio, …)
register a spec here; nothing else changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModalitySpec:
    """``pattern`` must match a full module name and capture the layer index as ``layer``."""

    name: str
    pattern: str

    def match(self, module_name: str) -> re.Match[str] | None:
        return re.search(self.pattern, module_name)


_REGISTRY: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec, *, replace: bool = False) -> None:
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"modality {spec.name!r} is already registered; pass replace=True")
    if "(?P<layer>" not in spec.pattern:
        raise ValueError(f"modality pattern {spec.pattern!r} must capture the layer as (?P<layer>...)")
    _REGISTRY[spec.name] = spec


def known_modalities() -> list[str]:
    return list(_REGISTRY)


def get_modality(name: str) -> ModalitySpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# SigLIP/CLIP towers name the attention output `out_proj`; Qwen2/Llama use `o_proj`.
register_modality(ModalitySpec(
    "vision",
    r"(?:^|\.)vision_tower\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)$",
))
register_modality(ModalitySpec(
    "audio",  # mole.audio's Whisper encoder (out_proj, like SigLIP)
    r"(?:^|\.)audio_tower\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)$",
))
register_modality(ModalitySpec(
    "language",
    r"(?:^|\.)language_model\.(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$",
))


def modality_map(model: nn.Module) -> dict[str, str]:
    """Candidate module name → modality, over the model's ``nn.Linear`` modules, in model order.

    Names are relative to ``model`` (call it on the unwrapped model, not a PeftModel). A
    ``MoleModel`` brings its family's specs (plus the audio tower's); other modules use the
    registered ones.
    """
    family = getattr(model, "family", None)
    specs = list(_REGISTRY.values()) if family is None else [
        *family.modalities, *([_REGISTRY["audio"]] if getattr(model, "audio_tower", None) else [])]
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        hits = [s.name for s in specs if s.match(name)]
        if len(hits) > 1:
            raise ValueError(f"module {name!r} matches several modalities: {hits}")
        if hits:
            out[name] = hits[0]
    return out


def layer_of(module_name: str, modality: str) -> int:
    m = get_modality(modality).match(module_name)
    if m is None:
        raise ValueError(f"module {module_name!r} is not a {modality} candidate")
    return int(m.group("layer"))


def modules_by_modality(mmap: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, mod in mmap.items():
        out.setdefault(mod, []).append(name)
    return out


def module_dims(model: nn.Module, modules: list[str]) -> dict[str, tuple[int, int]]:
    """Module → (d_in, d_out) of its base linear (before or after PEFT wrapped it)."""
    out: dict[str, tuple[int, int]] = {}
    for m in modules:
        layer = model.get_submodule(m)
        base: nn.Linear = getattr(layer, "base_layer", layer)  # type: ignore[assignment,arg-type]
        out[m] = (int(base.in_features), int(base.out_features))
    return out
