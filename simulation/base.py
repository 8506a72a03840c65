"""The cloud's foundation model: pretrained once on the benchmark's pretraining split, cached.

The base learns perception and word/number primitives (what shape, is there a red circle,
repeat words, the next number, is the digit > 4; high/low tones, is there a sound, more than
three beeps) with instruction templates that the continual tasks do not use, so it is
competent but scores near zero zero-shot on the stream — the continual tasks are new skills,
as in continual instruction tuning.

**A base that is good enough every time.** How well the stream can be learnt depends on the
base (the colour task swung from ~20% to ~95% between bases pretrained on two machines), so
pretraining is held to a bar: after ``pretrain.steps`` the mean over the templates of the
held-out exact match must reach ``pretrain.target``; below it, another round of
``pretrain.extend-steps`` (a warmup + cosine restart at a lower rate), until the bar is met or
``pretrain.max-steps`` is spent (then the base is kept, flagged ``target_met: false``, and a
warning says so).

**Knowing the base.** ``fedmole_base.json`` records the sha256 of the weights, the sha256 of
the data it was trained on, the held-out accuracy per template, the zero-shot row on the
stream's tasks, the pretraining history and the machine (torch's CPU kernel level, threads,
library versions): what differs between two machines that pretrained under the same key.
Loading a cached base recomputes the weights' digest and refuses a base that does not match.

The cache key hashes everything the weights depend on (data, model sizes, pretraining schedule
and seed); the folder is written beside its final place and renamed in, so an interrupted
pretraining never leaves a half checkpoint that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mole.audio import AUDIO_CONFIG
from mole.backbone import (
    CheckpointError,
    build_backbone,
    load_backbone,
    pick_device,
    pick_dtype,
    read_base_info,
    save_backbone,
    weights_digest,
)
from mole.batching import Encoder, SampleEncoder
from mole.families import family_for, read_model_type
from mole.model import MoleModel
from mole.steps import TrainStats, cosine_schedule, evaluate, generate_answers, train_steps
from mole.tokenizer import build_word_tokenizer
from protocol.config import ConfigError, RunConfig
from protocol.llava_format import TaskSamples, read_records
from protocol.manifest import Sample
from protocol.stream import TaskData, load_stream
from simulation.benchmark import benchmark_key, cache_root, ensure_benchmark
from simulation.benchmark.generate import HELDOUT_FILE, PRETRAIN_FILE, STREAM_TOML
from simulation.benchmark.shapes import COLOR_NAMES, COLORS, FILL, GRID, SHAPES, shape_mask
from simulation.benchmark.tasks import PRETRAIN_TEMPLATES, pretrain_template

BASE_VERSION = "3"  # 2: held-out bar, pretrain.seed; 3: SigLIP init of the vision tower
# (the binding loss came as a config key, pretrain.binding-aux-weight, not a version)
log = logging.getLogger(__name__)


# Pretraining keys left out of the base key at these values, so adding a key kept the keys
# (and the cached bases) of every configuration made before it: `threads` 2 is what the
# reference bases were made with; `binding-aux-weight` 0 is the recipe without that loss.
_KEYLESS_DEFAULTS = {("pretrain.threads", 2), ("pretrain.binding-aux-weight", 0.0)}


def base_key(cfg: RunConfig) -> str:
    parts = {
        "version": BASE_VERSION,
        # The data's own key carries the generator version: new data → a new base.
        "data": benchmark_key(cfg.data),
        # `model.lm` at its default ("": the own LM) is left out, so adding the key kept the
        # keys (and the cached bases) of every existing configuration.
        "model": {k: v for k, v in cfg.to_flat().items()
                  if k.startswith("model.") and (k, v) != ("model.lm", "")},
        "pretrain": {k: v for k, v in cfg.to_flat().items()
                     if k.startswith("pretrain.") and (k, v) not in _KEYLESS_DEFAULTS},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _vocabulary_texts(data_root: Path) -> list[str]:
    """Every instruction and answer of the benchmark (the pretraining split and every task):
    the word-level vocabulary's source."""
    stream = load_stream(data_root / STREAM_TOML, None)
    files = [data_root / PRETRAIN_FILE] + [f for t in stream.tasks for f in (t.train, t.test)]
    texts: list[str] = []
    for f in files:
        for r in read_records(f).records:
            texts += [t.text for t in r.turns]
    return texts


def data_digest(data_root: Path) -> str:
    """sha256 over every file of the benchmark folder (relative path + bytes, in path order).

    Recorded with the base: equal digests on two machines mean the data bytes are not what
    differs between their bases.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in data_root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(data_root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def machine_info() -> dict:
    """What can make the same pretraining differ between machines (README: reproducibility)."""
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "machine": platform.machine(), "cpu": cpu,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def heldout_accuracy(model: MoleModel, enc: SampleEncoder, samples: Sequence[Sample], batch_size: int,
                     max_new_tokens: int) -> dict[str, float]:
    """Exact match (%) per pretraining template on the held-out pretraining samples."""
    preds = generate_answers(model, enc, samples, batch_size, max_new_tokens)
    right: dict[str, list[bool]] = {t: [] for t in PRETRAIN_TEMPLATES}
    for s, p in zip(samples, preds, strict=True):
        right[pretrain_template(s.instruction)].append(p.strip() == s.answer)
    return {t: round(100.0 * sum(v) / len(v), 1) for t, v in right.items() if v}


def zero_shot_row(model: MoleModel, enc: SampleEncoder, data_root: Path, cfg: RunConfig
                  ) -> dict[str, float]:
    """The base's score (%, each task's primary metric) on the test split of every task."""
    row = {}
    for t in load_stream(data_root / STREAM_TOML, None).select(cfg.data.tasks).tasks:
        test = TaskSamples.read(t.name, t.test, t.image_root)
        row[t.name] = round(evaluate(model, enc, test, t.metrics, cfg.train.eval_batch_size,
                                     t.max_new_tokens or cfg.train.max_new_tokens)[t.primary], 1)
    return row


def _mean(acc: dict[str, float]) -> float:
    return sum(acc.values()) / len(acc)


# Pretraining templates whose answer is a function of the image alone (no question to read).
_AUX_TEMPLATES = ("shape", "digit-gt")


def _image_templates(samples: TaskSamples) -> list[str | None]:
    """Per record: its pretraining template when it has an image, else None."""
    out: list[str | None] = []
    for r in samples.records:
        try:
            out.append(pretrain_template(r.instruction) if r.images else None)
        except ValueError:
            out.append(None)
    return out


def _vision_aux(model: MoleModel, samples: TaskSamples, weight: float, last: list[int]):
    """Deep supervision of the vision tower: a linear head on its mean-pooled patch states
    predicts the answer of the image-only templates (shape, digit > 4), added to the LM loss
    with ``weight``; the head is dropped after pretraining.

    Why: the tower alone learns shape in ~400 steps at every seed, but through the projector and
    the LM it learned it in 1 of 3 seeds within 4,000 steps (shape at chance, 23-29%, in the
    others): the LM's gradient reaches the tower too weakly to start it. Returns
    (loss fn or None, head parameters)."""
    if weight <= 0:
        return None, []
    records = samples.records  # the index: no image is decoded here
    tmpl = _image_templates(samples)
    words = sorted({r.answer for r, t in zip(records, tmpl, strict=True) if t in _AUX_TEMPLATES})
    if not words:
        return None, []
    label = [words.index(r.answer) if t in _AUX_TEMPLATES else -100
             for r, t in zip(records, tmpl, strict=True)]
    has_image = [bool(r.images) for r in records]
    tower = model.llava.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(words)).to(model.device)

    def loss(batch) -> torch.Tensor:
        # Labels of the batch's image rows, in pixel_values order: (N_img,)
        y = torch.tensor([label[i] for i in last if has_image[i]],
                         device=model.device)
        if batch.pixel_values is None or not (y >= 0).any():
            return torch.zeros((), device=model.device)
        pooled = tower(pixel_values=batch.pixel_values).last_hidden_state.mean(1)  # (N_img, d_v)
        return weight * F.cross_entropy(head(pooled), y, ignore_index=-100)

    return loss, list(head.parameters())


def _patch_pairs(pixel_values: torch.Tensor, side: int = GRID) -> torch.Tensor:
    """(N, 3, S, S) pixel values in [-1, 1] → (N, side²) per-patch labels, row-major: 0 = empty,
    1 + colour · |SHAPES| + shape for the object drawn in the patch's cell of the generator's
    GRID × GRID grid (shapes.py). ``side`` patches a side, a multiple of GRID: each cell's label
    goes to its (side / GRID)² patches.

    Read off the pixels: a pixel brighter than 100 in some channel is an object's (the
    background is 20 ± 8), its colour the nearest of ``COLORS`` to their mean, its shape the
    best match of ``shape_mask`` over the box's possible offsets. On the 9,593 shape/exists
    images of the pretraining split every label agreed with the instruction and answer."""
    img = torch.round((pixel_values.detach().float().cpu() * 0.5 + 0.5) * 255).permute(0, 2, 3, 1).numpy()
    n, size = img.shape[0], img.shape[1]
    cell = size // GRID
    box = max(2, round(cell * FILL))
    rgb = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float64)
    masks = []  # (shape index, (cell, cell) mask) for every offset of the box
    for si, s in enumerate(SHAPES):
        for oy in range(cell - box + 1):
            for ox in range(cell - box + 1):
                m = np.zeros((cell, cell), dtype=bool)
                m[oy:oy + box, ox:ox + box] = shape_mask(s, box)
                masks.append((si, m))
    out = np.zeros((n, GRID * GRID), dtype=np.int64)
    for i in range(n):
        for k in range(GRID * GRID):
            r, c = divmod(k, GRID)
            p = img[i, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            bright = p.max(-1) > 100
            if not bright.any():
                continue
            col = int(np.argmin(((p[bright].mean(0) - rgb) ** 2).sum(-1)))
            shape = max(masks, key=lambda sm: int((sm[1] == bright).sum()))[0]
            out[i, k] = 1 + col * len(SHAPES) + shape
    k = side // GRID
    cells = torch.from_numpy(out).view(n, GRID, GRID)
    return cells.repeat_interleave(k, 1).repeat_interleave(k, 2).reshape(n, side * side)


# The LM layer whose attention the binding loss supervises; its heads 0/1/2 look up the cells of
# the asked colour / shape / pair, and the "parts" probe reads the layer after it.
_BINDING_LAYER = 1
_BINDING_TEMPLATES = ("shape", "exists")


def _binding_aux(model: MoleModel, samples: TaskSamples, enc: Encoder, weight: float,
                 last: list[int]):
    """Deep supervision of colour–shape binding (the `exists` template, "is there a red
    circle") inside the LM, added to the LM loss with ``weight``; heads and hooks are dropped
    after pretraining.

    Why: trained on the yes/no answer alone the LM learnt to check the asked *shape* only
    (`exists` 48-60% on 3 seeds; colour-swapped negatives with one object 12% right), even with
    a tower that bound colour and shape: at <sep> the asked colour was decodable 73% of the time
    and the image's colours were never looked up. Four losses on the batch's shape/exists rows,
    from per-patch labels read off the pixels (:func:`_patch_pairs`):

    - word: each object's image token at the LM input predicts its colour and shape words
      through the LM head, whose (tied) weights are detached here: the image tokens move toward
      the words, and the word embeddings stay where the text templates need them (undetached,
      `repeat` fell to 87-93% on 2 of 3 seeds);
    - question: <sep> after layer 0 predicts the asked (colour, shape) pair;
    - attention: at layer ``_BINDING_LAYER``, <sep>'s attention over the image tokens goes, in
      head 0, to the cells of the asked colour, head 1 the asked shape, head 2 the asked pair
      (the decisive part: without it `exists` stayed at 57-84%);
    - parts: <sep> after the next layer predicts [colour present, shape present, pair present].

    Returns (loss fn or None, head parameters, hook handles to remove after pretraining)."""
    if weight <= 0:
        return None, [], []
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    lm: Any = model.adapter.language_model(model.vlm)  # the HF Qwen2 text model
    head: Any = model.vlm.lm_head
    if len(lm.layers) < _BINDING_LAYER + 2 or lm.config.num_attention_heads < 3:
        raise ConfigError(
            f"pretrain.binding-aux-weight = {weight:g} supervises 3 attention heads of LM layer "
            f"{_BINDING_LAYER} and reads layer {_BINDING_LAYER + 1}, but this LM has "
            f"{len(lm.layers)} layers of {lm.config.num_attention_heads} heads: set "
            f"model.text-layers >= {_BINDING_LAYER + 2} and model.text-heads >= 3, or "
            "pretrain.binding-aux-weight = 0")
    vlm_config: Any = model.vlm.config
    vision = vlm_config.vision_config
    side = vision.image_size // vision.patch_size  # image tokens a side
    if side % GRID:
        raise ConfigError(
            f"pretrain.binding-aux-weight = {weight:g} labels the image tokens by the cell of the "
            f"generator's {GRID}×{GRID} grid they lie in, but data.image-size {vision.image_size} "
            f"/ model.patch-size {vision.patch_size} gives {side} tokens a side: make it a "
            f"multiple of {GRID}, or set pretrain.binding-aux-weight = 0")

    records = samples.records
    tmpl = _image_templates(samples)
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]  # label v > 0 is pairs[v - 1]
    word_ids = torch.tensor([[int(enc.tok.convert_tokens_to_ids(c)),
                              int(enc.tok.convert_tokens_to_ids(s))] for c, s in pairs],
                            device=model.device)  # (24, 2): colour word, shape word
    att = lm.layers[_BINDING_LAYER].self_attn
    hidden = lm.config.hidden_size
    q_head = torch.nn.Linear(hidden, len(pairs)).to(model.device)
    part_head = torch.nn.Linear(hidden, 3).to(model.device)
    seen: dict[str, Any] = {}  # what the hooks saw in the current forward

    def keep(name: str):
        return lambda m, i, o: seen.__setitem__(name, o)

    handles = [
        lm.layers[0].register_forward_pre_hook(
            lambda m, args, kw: seen.__setitem__("emb", args[0] if args else kw["hidden_states"]),
            with_kwargs=True),
        lm.layers[0].register_forward_hook(keep("l0")),
        att.register_forward_pre_hook(
            lambda m, args, kw: seen.__setitem__("att", (kw["hidden_states"],
                                                         kw["position_embeddings"])),
            with_kwargs=True),
        lm.layers[_BINDING_LAYER + 1].register_forward_hook(keep("next")),
    ]

    def loss(batch) -> torch.Tensor:
        rows = [r for r, i in enumerate(last) if tmpl[i] in _BINDING_TEMPLATES]
        if batch.pixel_values is None or not rows:
            return torch.zeros((), device=model.device)
        with_image = [r for r, i in enumerate(last) if records[i].images]  # pixel_values order
        sel = [with_image.index(r) for r in rows]
        lab = _patch_pairs(batch.pixel_values[sel], side).to(model.device)  # (R, P = side²)
        is_img = batch.input_ids == enc.image_id  # (B, T)
        emb = seen["emb"][is_img].view(len(with_image), -1, hidden)[sel]  # (R, P, d)
        obj = lab > 0
        lp = F.log_softmax(F.linear(lm.norm(emb[obj]), head.weight.detach()).float(), -1)
        total = -0.5 * lp.gather(1, word_ids[lab[obj] - 1]).sum(1).mean()  # (K, V) → mean NLL
        ex = [r for r in rows if tmpl[last[r]] == "exists"]
        if not ex:
            return weight * total
        sep = (batch.input_ids[ex] == enc.sep_id).float().argmax(1)  # (E,)
        asked, parts, targets = [], [], []
        for r in ex:
            words = records[last[r]].instruction.split()  # "is there a <colour> <shape>"
            cells = [pairs[int(v) - 1] if v > 0 else ("", "") for v in lab[rows.index(r)]]
            col = torch.tensor([c == words[3] for c, _ in cells], device=model.device)  # (P,)
            shp = torch.tensor([s == words[4] for _, s in cells], device=model.device)
            asked.append(pairs.index((words[3], words[4])))
            parts.append([float(col.any()), float(shp.any()), float((col & shp).any())])
            targets.append((col, shp, col & shp))
        total = total + F.cross_entropy(q_head(seen["l0"][ex, sep]),
                                        torch.tensor(asked, device=model.device))
        total = total + F.binary_cross_entropy_with_logits(
            part_head(seen["next"][ex, sep]), torch.tensor(parts, device=model.device))
        # <sep>'s attention logits at the supervised layer, recomputed from its input: (B, H, T, hd)
        hs, (cos, sin) = seen["att"]
        b, t, _ = hs.shape
        q = att.q_proj(hs).view(b, t, -1, att.head_dim).transpose(1, 2)
        k = att.k_proj(hs).view(b, t, -1, att.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped kv → per head
        terms = []
        for j, r in enumerate(ex):
            img_pos = is_img[r].nonzero()[:, 0]
            scores = (q[r, :3, sep[j]][:, None] * k[r, :3, img_pos]).sum(-1) * att.scaling  # (3, P)
            lp_att = F.log_softmax(scores, -1)
            # −log of the attention mass on the target cells, per head with a target
            terms += [-torch.logsumexp(lp_att[h][tgt], 0) for h, tgt in enumerate(targets[j])
                      if tgt.any()]
        if terms:
            total = total + torch.stack(terms).mean()
        return weight * total

    return loss, [*q_head.parameters(), *part_head.parameters()], handles


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads (restored after): torch splits float sums by thread
    count, so a pretraining's weights depend on it — pinned, a base does not depend on whoever
    pretrained it first (a bench child with OMP_NUM_THREADS=1 made a different base)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain_base(cfg: RunConfig, data_root: Path, progress: bool = True
                  ) -> tuple[MoleModel, object, dict]:
    """Build the backbone from configs and train all its weights until the held-out bar, on
    ``pretrain.threads`` torch threads."""
    with torch_threads(cfg.pretrain.threads):
        return _pretrain_base(cfg, data_root, progress)


def _pretrain_base(cfg: RunConfig, data_root: Path, progress: bool) -> tuple[MoleModel, object, dict]:
    pc = cfg.pretrain
    tok = build_word_tokenizer(_vocabulary_texts(data_root))
    device = pick_device(cfg.train.device)
    model = build_backbone(cfg.model, tok, cfg.data.image_size, init_seed=pc.seed).to(device)
    enc = Encoder.for_model(tok, model, cfg.model.max_length)
    samples = TaskSamples.read("pretrain", data_root / PRETRAIN_FILE)
    heldout = TaskSamples.read("pretrain", data_root / HELDOUT_FILE)
    rng = np.random.default_rng(pc.seed)
    torch.manual_seed(pc.seed)
    for p in model.parameters():
        p.requires_grad = True
    bs = pc.batch_size

    last: list[int] = []  # the current batch's sample indices, for the auxiliary losses
    vision_loss, vision_params = _vision_aux(model, samples, pc.vision_aux_weight, last)
    binding_loss, binding_params, hooks = _binding_aux(model, samples, enc,
                                                       pc.binding_aux_weight, last)
    aux_params = [*vision_params, *binding_params]
    losses = [f for f in (vision_loss, binding_loss) if f is not None]

    def summed(batch) -> torch.Tensor:
        total = losses[0](batch)
        for f in losses[1:]:
            total = total + f(batch)
        return total

    aux_loss = summed if losses else None

    def next_batch(_: int):
        idx = rng.integers(0, len(samples), bs)
        last[:] = [int(i) for i in idx]
        return enc.train_batch([samples[i] for i in idx])

    def measure() -> dict[str, float]:
        return heldout_accuracy(model, enc, heldout, cfg.train.eval_batch_size,
                                cfg.train.max_new_tokens)

    try:
        # Round 0: the planned schedule. Then restarts while the mean is below the bar.
        stages: list[TrainStats] = [train_steps(
            model, next_batch, pc.steps, pc.lr, warmup_fraction=pc.warmup_fraction,
            desc="pretrain base", progress=progress, aux_loss=aux_loss, aux_params=aux_params)]
        acc = measure()
        history = [{"steps": pc.steps, "heldout": acc}]
        done = pc.steps
        while _mean(acc) < pc.target and done < pc.max_steps:
            n = min(pc.extend_steps, pc.max_steps - done)
            warm = max(1, int(pc.warmup_fraction * n))
            stages.append(train_steps(
                model, next_batch, n, pc.lr * pc.extend_lr_factor,
                schedule=cosine_schedule(warm, n),
                desc=f"pretrain base (+{n}, below {pc.target:g}%)", progress=progress,
                aux_loss=aux_loss, aux_params=aux_params))
            done += n
            acc = measure()
            history.append({"steps": done, "heldout": acc})
    finally:
        for h in hooks:
            h.remove()
    for p in model.parameters():
        p.requires_grad = False
    model.eval()
    met = _mean(acc) >= pc.target
    if not met:
        log.warning("the base missed the held-out bar (mean %.1f%% < %g%%) after %d steps, %s: "
                    "the stream's results on this base are not comparable to the README's",
                    _mean(acc), pc.target, done, acc)
    info = {
        "key": base_key(cfg), "seed": pc.seed, "steps": done, "target": pc.target,
        "target_met": met, "heldout": acc, "heldout_mean": round(_mean(acc), 2), "history": history,
        "first_loss": stages[0].first_loss, "final_loss": stages[-1].last_loss,
        "seconds": round(sum(s.seconds for s in stages), 1),
        "params": sum(p.numel() for p in model.parameters()),
        "zero_shot": zero_shot_row(model, enc, data_root, cfg),
        "data_sha256": data_digest(data_root), "machine": machine_info(), "config": cfg.to_flat(),
    }
    return model, tok, info


def check_towers(cfg: RunConfig, tasks: dict[str, TaskData]) -> None:
    """Every task's modalities have a tower in the base, or the run stops before any work.

    The base's towers are known without loading it: an audio tower is ``audio_tower.json`` in a
    checkpoint folder, or ``model.audio-hidden`` > 0 for the base pretraining would build; every
    family has a vision tower. A task's modalities come from its stream entry or its records."""
    if cfg.model.base_path:
        base = Path(cfg.model.base_path)
        family_for(read_model_type(base), base)  # an unsupported checkpoint is the first problem
        has_audio, where = (base / AUDIO_CONFIG).is_file(), f"base checkpoint {str(base)!r}"
    elif cfg.model.lm:
        has_audio, where = False, f"the `model.lm = {cfg.model.lm!r}` base"
    else:
        has_audio, where = cfg.model.audio_hidden > 0, "the base `model.audio-hidden = 0` builds"
    if has_audio:
        return
    audio = [t for t, d in tasks.items() if "audio" in d.modalities()]
    if audio:
        raise ConfigError(
            f"tasks {audio} carry audio, but {where} has no audio tower: remove them from "
            "`data.tasks`, or use a base with an audio tower (the project's own base with "
            "`model.audio-hidden` > 0)")


def ensure_base(cfg: RunConfig, tasks: dict[str, TaskData] | None, progress: bool = True
                ) -> Path:
    """Path of the base checkpoint: ``model.base-path`` if set, else the cached one pretrained
    on the embedded benchmark. ``tasks`` (the run's): checked against the base's towers first."""
    if tasks is not None:
        check_towers(cfg, tasks)
    if cfg.model.base_path:
        return Path(cfg.model.base_path)
    if cfg.model.lm:  # a real pretrained LM behind a pretrained vision side
        from simulation.smol_base import ensure_smol_base

        return ensure_smol_base(cfg, progress)
    data_root = ensure_benchmark(cfg.data)
    final = cache_root(cfg.data) / "bases" / base_key(cfg)
    if (final / "config.json").is_file():
        return final
    t0 = time.perf_counter()
    model, tok, info = pretrain_base(cfg, data_root, progress)
    model = model.cpu()
    info["weights_sha256"] = weights_digest(model)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_backbone(model, tok, tmp, info)  # type: ignore[arg-type]
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a concurrent run finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def load_base(cfg: RunConfig, tasks: dict[str, TaskData] | None, progress: bool = True):
    path = ensure_base(cfg, tasks, progress)
    model, tok = load_backbone(path, pick_device(cfg.train.device))
    recorded = read_base_info(path).get("weights_sha256")
    if recorded and (got := weights_digest(model)) != recorded:
        raise CheckpointError(
            f"base checkpoint {str(path)!r} holds weights with sha256 {got[:16]}… but its "
            f"fedmole_base.json records {recorded[:16]}…: the folder was changed or corrupted; "
            "delete it to pretrain the base again")
    model.to(pick_dtype(cfg.model.dtype, model.device))  # after the digest: it is of the files
    for p in model.parameters():
        p.requires_grad = False
    return model, tok, path


def base_summary(path: Path) -> dict:
    """What every run report shows of its base: identity, quality bar, held-out accuracy."""
    info = read_base_info(path)
    keys = ("key", "seed", "steps", "heldout_mean", "final_loss", "params", "wall_s", "weights_sha256",
            "data_sha256", "target", "target_met", "heldout", "zero_shot", "machine")
    return {"path": str(path), **{k: info[k] for k in keys if k in info}}


def describe_base(path: Path) -> str:
    """Human-readable lines for ``fedmole pretrain``: the base's identity and quality."""
    info = read_base_info(path)
    lines = [f"base: {path}"]
    if not info:
        return "\n".join(lines + ["  (no fedmole_base.json: a base from elsewhere)"])
    m = info.get("machine", {})
    lines += [
        f"  weights sha256: {info.get('weights_sha256', '?')}",
        f"  data sha256:    {info.get('data_sha256', '?')}",
        f"  pretraining:    seed {info.get('seed', '?')}, {info.get('steps', '?')} steps, "
        f"{info.get('wall_s', '?')} s, final loss {info.get('final_loss', float('nan')):.4f}",
        f"  machine:        {m.get('cpu', '?')} ({m.get('cpu_capability', '?')}, "
        f"{m.get('threads', '?')} threads), torch {m.get('torch', '?')}",
    ]
    held = info.get("heldout", {})
    if held:
        bar = info.get("target")
        flag = "" if info.get("target_met", True) else f"  MEAN BELOW THE BAR OF {bar:g}%"
        lines.append("  held-out (%):   " + ", ".join(f"{t} {a:.1f}" for t, a in held.items())
                     + flag)
    zs = info.get("zero_shot", {})
    if zs:
        lines.append("  zero-shot (%):  " + ", ".join(f"{t} {a:.1f}" for t, a in zs.items()))
    return "\n".join(lines)
