"""The model-family interface and its registry, keyed by the checkpoint's ``config.model_type``.

A *family* is what FedMoLE must know about one kind of Hugging Face VLM to train, route,
federate and serve it without assuming the project's own model:

* how to load a local checkpoint folder (its own model class and processor, ``local_files_only``)
  and check that what was loaded is what the folder holds (:meth:`Family.load`);
* how a sample becomes model inputs through the checkpoint's own processor and chat template,
  with the loss on assistant turns only (:meth:`Family.encoder`);
* which modules are candidate LoRA targets, per modality (:attr:`Family.modalities`);
* the family-specific pieces of a forward pass (:class:`VisionAdapter`): where the image
  features come from, which module is the language model, and the position ids it needs
  (M-RoPE for Qwen2-VL). ``mole.model.MoleModel`` does the rest (placeholder scatter, the
  optional audio tower, loss, greedy decoding, router features) the same way for every family.

Adding a family = one module in ``mole/families/`` that subclasses :class:`Family` and calls
:func:`register_family`; nothing else in the code names a family.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mole.modality import ModalitySpec
    from mole.model import MoleModel


class CheckpointError(ValueError):
    """A base checkpoint folder is missing, incomplete, corrupt or of an unsupported kind."""


class VisionAdapter(ABC):
    """The family-specific steps of a forward pass through a Hugging Face VLM ``hf``.

    Images of a batch arrive as ``pixel_values`` plus ``extras`` (whatever else the family's
    processor returns per image: ``image_grid_thw`` for Qwen2-VL, ``pixel_attention_mask`` for
    Idefics3), in sample order.
    """

    image_token_id: int
    # Ids that belong to an image in the prompt (placeholders and the markers around them);
    # the router's instruction features drop them to see the instruction text alone.
    image_marker_ids: tuple[int, ...]

    @abstractmethod
    def image_features(self, hf: nn.Module, pixel_values: torch.Tensor,
                       extras: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One (P_i, d) tensor of projected features per image, in order; ΣP_i = #placeholders."""

    @abstractmethod
    def language_model(self, hf: nn.Module) -> nn.Module:
        """The decoder stack (takes ``inputs_embeds``, returns ``last_hidden_state``)."""

    def positions(self, hf: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids (B, T) that skip left padding: 0 at each sample's first real token."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def next_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The position of the token after the last one, for greedy decoding: (B, 1) (or (3, B, 1))."""
        return positions.amax(dim=-1, keepdim=True) + 1


class Family(ABC):
    """One kind of checkpoint. Subclasses set the class attributes and implement the methods."""

    name: str  # shown to users (the README's family table, errors)
    model_types: tuple[str, ...]  # config.model_type values this family loads

    @property
    @abstractmethod
    def modalities(self) -> Sequence[ModalitySpec]:
        """Candidate LoRA modules per modality (regexes over names relative to ``MoleModel``)."""

    @abstractmethod
    def load(self, path: Path, device: torch.device) -> tuple[MoleModel, Any]:
        """(model, processor-or-tokenizer) from a checked local folder; raises CheckpointError."""

    @abstractmethod
    def encoder(self, model: MoleModel, processor: Any, max_length: int) -> Any:
        """The sample → tensors encoder for this model (``train_batch``/``prompt_batch``/``decode``)."""

    def hf_class(self) -> type[nn.Module]:
        """The family's own transformers class (what a user loads the PEFT experts onto)."""
        raise NotImplementedError


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for t in family.model_types:
        if t in _FAMILIES and _FAMILIES[t] is not family:
            raise ValueError(f"model type {t!r} already belongs to family {_FAMILIES[t].name!r}")
        _FAMILIES[t] = family
    return family


def known_model_types() -> list[str]:
    return sorted(_FAMILIES)


def read_model_type(path: Path) -> str:
    """``config.model_type`` of a checkpoint folder (clear errors for a missing/broken config)."""
    if not path.is_dir():
        raise CheckpointError(f"base checkpoint {str(path)!r} is not a folder; check `model.base-path`")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(
            f"base checkpoint {str(path)!r} has no config.json; it must be a save_pretrained folder")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"config.json of base checkpoint {str(path)!r} is unreadable: {e}") from e
    return str(model_type)


def family_for(model_type: str, path: Path | str = "?") -> Family:
    """The registered family of ``model_type``; an unknown type names the known ones."""
    fam = _FAMILIES.get(model_type)
    if fam is None:
        raise CheckpointError(
            f"base checkpoint {str(path)!r} is a {model_type!r} model; the model types supported "
            f"are: {', '.join(known_model_types())}. Point `model.base-path` at a checkpoint of "
            "one of them, or leave it empty for the cached base (a family is added as a module "
            "in mole/families/, see docs/families.md)")
    return fam


def check_loading_report(path: Path, cls_name: str, report: dict) -> None:
    """Refuse a load that left any tensor at its random init or dropped any stored tensor."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in report.get(kind) or []]
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (first: {', '.join(keys[:3])})")
    if problems:
        raise CheckpointError(
            f"base checkpoint {str(path)!r} does not match {cls_name}: {'; '.join(problems)}. "
            "Training it would start from random tensors; restore the checkpoint's weight files, "
            "or delete a cached base to rebuild it")


def load_checked(cls: Any, path: Path) -> Any:
    """``cls.from_pretrained(path)`` offline, refusing any tensor left at random or dropped."""
    try:
        hf, report = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:  # safetensors, json and torch each raise their own types
        raise CheckpointError(
            f"cannot load base checkpoint {str(path)!r} as {cls.__name__}: {e}; restore the "
            "folder's weight files, or delete a cached base to rebuild it") from e
    check_loading_report(path, cls.__name__, report)
    return hf


def check_tokens(path: Path, tok: Any, hf: Any, needed: dict[str, int]) -> None:
    """The tokenizer fits the embedding, has an eos, and maps each needed token to its id."""
    if tok.eos_token is None:
        raise CheckpointError(f"tokenizer of {str(path)!r} has no eos token; answers could not end")
    vocab = hf.get_input_embeddings().weight.shape[0]
    if len(tok) > vocab:
        raise CheckpointError(
            f"tokenizer of {str(path)!r} has {len(tok)} tokens but the model's embedding has "
            f"{vocab} rows: the extra tokens would get untrained rows; save the tokenizer that "
            "belongs to these weights")
    for token, want in needed.items():
        got = tok.convert_tokens_to_ids(token)
        if got != want or want >= vocab:
            raise CheckpointError(
                f"tokenizer of {str(path)!r} maps {token!r} to {got}, but the model's config "
                f"expects {want} (vocabulary {vocab}): tokenizer and weights do not belong together")


def starts_with_bos(tok: Any, text: str) -> bool:
    """A rendered chat that already begins with the BOS must not get a second one (the rule the
    families' processors apply when they tokenise a template's output)."""
    return tok.bos_token is not None and text.startswith(tok.bos_token)


def chat_template_of(path: Path, tok: Any, proc: Any = None) -> None:
    """Make sure the tokenizer carries the checkpoint's chat template (a processor may hold it)."""
    if not getattr(tok, "chat_template", None) and proc is not None:
        tok.chat_template = getattr(proc, "chat_template", None)
    if not getattr(tok, "chat_template", None):
        raise CheckpointError(
            f"base checkpoint {str(path)!r} has no chat template (tokenizer_config.json, "
            "chat_template.jinja or chat_template.json): its prompts cannot be built the way it "
            "was trained; save it with its processor / tokenizer")


def context_length(model: Any) -> int:
    """The language model's context window: the sequence limit of a checkpoint family (its
    samples are refused above it; ``model.max-length`` sizes only the project's own base)."""
    return int(model.vlm.config.get_text_config().max_position_embeddings)


def require_edge_bundle(model: Any, base: str | Path) -> None:
    """The edge's ONNX bundle (mole.onnx_graph) is built for LLaVA-layout bases (the project's
    own and LLaVA checkpoints such as the SmolLM2 base: a fixed-resolution tower, one run of
    placeholders per image); other families are refused before any work instead of failing
    half-way."""
    if model.family.name == "llava" and model.n_image_tokens > 0:
        return
    raise CheckpointError(
        f"the edge ONNX bundle supports LLaVA-layout bases so far; {str(base)!r} is a "
        f"{model.family.name} checkpoint (dynamic image resolution). Its experts are written as "
        "PEFT adapters (RUN/peft, or `fedmole export --peft`) for PeftModel.from_pretrained on "
        "its own Hugging Face class; drop `app.registry-dir` / the bundle export for this base")
