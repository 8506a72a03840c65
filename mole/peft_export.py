"""Experts as PEFT adapters of the family's own Hugging Face class — the format users load.

Inside FedMoLE an expert's modules are named relative to ``MoleModel`` (``vlm.<hf module>`` for
the VLM, ``audio_tower.<module>`` for the optional audio tower), and a PEFT adapter saved from
the wrapper names them ``base_model.model.vlm.…``: onto a stock
``LlavaForConditionalGeneration`` not one of its tensors would load (PEFT only warns). This
module writes every expert the way ``PeftModel.from_pretrained(<family class>, folder)`` expects:

    FOLDER/adapter_config.json          LoraConfig: r, lora_alpha, target_modules = the exact
                                        module names of the HF class, base_model_name_or_path
    FOLDER/adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, d_in)
                                        base_model.model.<module>.lora_B.weight   (d_out, r)
    FOLDER/audio_tower/…                the same for experts on the audio tower (a separate
                                        model: ``PeftModel.from_pretrained(tower, FOLDER/audio_tower)``)

The factors come from wherever an expert lives (a centralized run's PEFT model, the cloud's
global state); before writing, every target module is checked to exist in the family's class
(built on the meta device from the checkpoint's config: no weights are read) with the factors'
shapes, so a folder that would load partly is never written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

VLM_PREFIX = "vlm."
AUDIO_PREFIX = "audio_tower."
AUDIO_DIR = "audio_tower"
PEFT_KEY = "base_model.model.{module}.{kind}.weight"

Factors = Mapping[str, "np.ndarray | torch.Tensor"]  # "<module>.lora_A" / "<module>.lora_B"


class PeftExportError(ValueError):
    """The experts cannot be written as an adapter that would load completely."""


@lru_cache(maxsize=4)
def _linear_shapes(base: str) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every Linear of the base's own HF class, built on the meta device."""
    from transformers import AutoConfig

    from mole.families import family_for, read_model_type

    path = Path(base)
    cls: Any = family_for(read_model_type(path), path).hf_class()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        hf = cls._from_config(config)
    return {n: (m.out_features, m.in_features) for n, m in hf.named_modules()
            if isinstance(m, nn.Linear)}


def _audio_shapes(base: str) -> dict[str, tuple[int, int]]:
    from mole.audio import AUDIO_CONFIG, AudioTower

    desc = Path(base) / AUDIO_CONFIG
    if not desc.is_file():
        return {}
    with torch.device("meta"):
        tower = AudioTower.from_description(json.loads(desc.read_text()))
    return {n: (m.out_features, m.in_features) for n, m in tower.named_modules()
            if isinstance(m, nn.Linear)}


def _pairs(factors: Factors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in factors.items():
        module, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not module:
            raise PeftExportError(f"factor key {key!r} is not '<module>.lora_A' / '<module>.lora_B'")
        t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(
            np.asarray(value))
        found.setdefault(module, {})[kind] = t.to(torch.float32).contiguous()
    broken = [m for m, p in found.items() if len(p) != 2]
    if broken:
        raise PeftExportError(f"modules {broken[:3]} have only one of lora_A / lora_B")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in sorted(found.items())}


def _write(folder: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
           shapes: dict[str, tuple[int, int]], rank: int, alpha: float, base: str,
           what: str) -> None:
    for m, (a, b) in pairs.items():
        if m not in shapes:
            raise PeftExportError(f"{what} has no Linear module {m!r}: the expert does not belong "
                                  f"to the base {base!r}")
        d_out, d_in = shapes[m]
        if tuple(a.shape) != (rank, d_in) or tuple(b.shape) != (d_out, rank):
            raise PeftExportError(
                f"expert factors of {m!r} are {tuple(a.shape)} / {tuple(b.shape)}; the module "
                f"is {d_out}×{d_in} and the rank {rank}")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]  # peft types it int lora_dropout=0.0, bias="none",
                     target_modules=list(pairs), base_model_name_or_path=base)
    cfg.save_pretrained(str(folder))
    tensors = {}
    for m, (a, b) in pairs.items():
        tensors[PEFT_KEY.format(module=m, kind="lora_A")] = a
        tensors[PEFT_KEY.format(module=m, kind="lora_B")] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_peft_expert(base_path: str | Path, factors: Factors, alpha: float, folder: Path,
                      rank: int | None = None) -> Path:
    """Write one expert (factors keyed by MoleModel module names) as a stock PEFT adapter.

    The rank is the factors' (one per expert, as every expert here has); ``folder`` is replaced
    whole; experts on the audio tower go to ``folder/audio_tower``."""
    base = str(Path(base_path).resolve())
    pairs = _pairs(factors)
    ranks = sorted({int(a.shape[0]) for a, _ in pairs.values()})
    if len(ranks) > 1 or (rank is not None and ranks and ranks != [rank]):
        raise PeftExportError(f"the expert's factors have ranks {ranks}, expected one rank "
                              f"{rank if rank is not None else ''}".rstrip())
    rank = ranks[0] if ranks else 0
    vlm = {m[len(VLM_PREFIX):]: p for m, p in pairs.items() if m.startswith(VLM_PREFIX)}
    audio = {m[len(AUDIO_PREFIX):]: p for m, p in pairs.items() if m.startswith(AUDIO_PREFIX)}
    other = sorted(set(pairs) - {VLM_PREFIX + m for m in vlm} - {AUDIO_PREFIX + m for m in audio})
    if other:
        raise PeftExportError(f"expert modules {other[:3]} are neither in the VLM ({VLM_PREFIX}…) "
                              f"nor in the audio tower ({AUDIO_PREFIX}…)")
    if not pairs:
        raise PeftExportError("the expert has no factors to write")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if vlm:
        _write(tmp, vlm, _linear_shapes(base), rank, alpha, base, "the base's model class")
    else:  # an audio-only expert: the VLM folder holds its config, pointing at the tower's
        tmp.mkdir(parents=True)
    if audio:
        shapes = _audio_shapes(base)
        if not shapes:
            raise PeftExportError(f"the expert has audio-tower modules but the base {base!r} has "
                                  "no audio tower")
        _write(tmp / AUDIO_DIR, audio, shapes, rank, alpha, base, "the base's audio tower")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def write_peft_experts(base_path: str | Path, experts: Mapping[str, Factors],
                       alphas: Mapping[str, float], out_dir: Path) -> list[Path]:
    """Every expert ``name → factors`` as ``out_dir/<name>`` (see :func:`write_peft_expert`)."""
    return [write_peft_expert(base_path, factors, float(alphas[name]), out_dir / name)
            for name, factors in experts.items() if factors]


def write_plan_experts(base_path: str | Path, experts: Mapping[str, Factors], plan: Any,
                       default_alpha: float, out_dir: Path) -> list[Path]:
    """Experts of a federated run (an ``ExpertPlan`` gives each task's alpha; the one shared
    adapter of a Seq-LoRA run, which has no plan entry, gets ``default_alpha``)."""
    alphas = {e.task: float(e.alpha) for e in plan.experts}
    return write_peft_experts(base_path, experts,
                              {t: alphas.get(t, float(default_alpha)) for t in experts}, out_dir)
