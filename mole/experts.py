"""LoRA experts as named PEFT adapters on an explicit module set.

One adapter per expert group (per task in D-MoLE, one shared adapter in Seq-LoRA). Any set of
adapters can be active at once: LoRA layers sum the active experts' B·A·x, each scaled by
alpha/rank, onto the frozen base output, which is exactly D-MoLE's layer rule (no gate).
Adapters live in the model in place, so ``MoleModel``'s own forward/generate see them.

PEFT detail that matters: ``set_adapter`` marks every active adapter trainable; we re-freeze
everything but the one expert being trained (older experts must stay bit-identical).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from mole.model import MoleModel
from protocol.config import LoraConfig


class ExpertModel:
    """A ``MoleModel`` plus its named LoRA experts (a PEFT model once the first is added)."""

    def __init__(self, model: MoleModel):
        self.model = model
        self.peft: PeftModel | None = None
        self._active: list[str] = []

    @property
    def experts(self) -> list[str]:
        return [] if self.peft is None else [n for n in self.peft.peft_config]

    def add_expert(self, name: str, modules: Sequence[str], lora: LoraConfig) -> None:
        """Attach a new expert ``name`` on exactly ``modules`` (names relative to the model)."""
        if not modules:
            raise ValueError(f"expert {name!r} needs at least one target module")
        if name in self.experts:
            raise ValueError(f"expert {name!r} already exists; experts: {self.experts}")
        cfg = PeftLoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(modules), bias="none",
        )
        if self.peft is None:
            self.peft = get_peft_model(self.model, cfg, adapter_name=name)
        else:
            self.peft.add_adapter(name, cfg)
        self.activate(self._active)

    def modules_of(self, name: str) -> set[str]:
        """The modules expert ``name`` is attached to."""
        if self.peft is None or name not in self.experts:
            raise ValueError(f"no expert {name!r}; experts: {self.experts}")
        # Read off the model, not the LoraConfig: PEFT rewrites a long target_modules list as
        # the shortest suffixes that select the same modules ("q_proj", …).
        return {n for n, m in self.model.named_modules()
                if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and name in m.lora_A}

    def remove_expert(self, name: str) -> None:
        """Detach expert ``name`` (e.g. a stale adapter whose plan changed)."""
        if self.peft is None or name not in self.experts:
            raise ValueError(f"no expert {name!r} to remove; experts: {self.experts}")
        self._active = [n for n in self._active if n != name]
        self.activate([])  # PEFT refuses to delete an active adapter
        self.peft.delete_adapter(name)
        self.activate(self._active)

    def activate(self, names: Sequence[str], trainable: str | None = None) -> None:
        """Make exactly ``names`` active (empty → base model only); only ``trainable`` learns."""
        unknown = [n for n in names if n not in self.experts]
        if unknown:
            raise ValueError(f"unknown experts {unknown}; known: {self.experts}")
        if trainable is not None and trainable not in names:
            raise ValueError(f"trainable expert {trainable!r} must be among the active {list(names)}")
        self._active = list(names)
        if self.peft is not None:
            lora: Any = self.peft.base_model  # a LoraModel; typed as a plain Module by peft
            if names:
                lora.set_adapter(list(names))
                lora.enable_adapter_layers()
            else:
                lora.disable_adapter_layers()
        for pname, p in self.model.named_parameters():
            p.requires_grad = trainable is not None and f".{trainable}." in pname and "lora_" in pname

    @property
    def active(self) -> list[str]:
        return list(self._active)

    @contextmanager
    def only(self, names: Sequence[str]) -> Iterator[None]:
        """Temporarily switch the active set (e.g. ``[]`` for base-model features)."""
        saved = self._active
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.activate(names)
        try:
            yield
        finally:
            self.activate(saved)
            for n, p in self.model.named_parameters():
                p.requires_grad = n in trainable

    def trainable_parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save_expert(self, name: str, out_dir: Path) -> Path:
        """PEFT adapter folder ``out_dir/name`` (adapter_config.json + adapter_model.safetensors)."""
        if self.peft is None or name not in self.experts:
            raise ValueError(f"no expert {name!r} to save; experts: {self.experts}")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.peft.save_pretrained(str(out_dir), selected_adapters=[name])
        # PEFT writes a non-"default" adapter into a subfolder named after it.
        return out_dir / name

    def factors(self, name: str) -> dict[str, Any]:
        """``{"<module>.lora_A": (r, d_in), "<module>.lora_B": (d_out, r)}`` of expert ``name``."""
        out: dict[str, Any] = {}
        for module in sorted(self.modules_of(name)):
            layer: Any = self.model.get_submodule(module)
            for kind in ("lora_A", "lora_B"):
                out[f"{module}.{kind}"] = getattr(layer, kind)[name].weight.detach()
        return out

    def save_peft(self, name: str, base_path: str | Path, folder: Path) -> Path:
        """Expert ``name`` as an adapter of the base's own HF class (mole.peft_export)."""
        from mole.peft_export import write_peft_expert

        cfg: Any = self.peft.peft_config[name] if self.peft is not None else None
        if cfg is None or name not in self.experts:
            raise ValueError(f"no expert {name!r} to save; experts: {self.experts}")
        return write_peft_expert(base_path, self.factors(name), float(cfg.lora_alpha), folder,
                                 rank=int(cfg.r))

    def load_expert(self, name: str, folder: Path) -> None:
        """Load a PEFT adapter folder as expert ``name``; a broken folder raises clearly."""
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"{str(folder)!r} is not a PEFT adapter folder (no adapter_config.json)")
        weights = folder / "adapter_model.safetensors"
        try:
            load_file(str(weights))  # validates the file before PEFT touches the model
        except Exception as e:  # safetensors raises several types for corrupt files
            raise ValueError(f"adapter weights {str(weights)!r} are unreadable: {e}") from e
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name,
                                                  is_trainable=False)
        else:
            self.peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        self.activate(self._active)
