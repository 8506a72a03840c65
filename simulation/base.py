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
from simulation.benchmark.tasks import PRETRAIN_TEMPLATES, pretrain_template

BASE_VERSION = "3"  # 2: held-out bar, pretrain.seed; 3: SigLIP init of the vision tower
log = logging.getLogger(__name__)


def base_key(cfg: RunConfig) -> str:
    parts = {
        "version": BASE_VERSION,
        # The data's own key carries the generator version: new data → a new base.
        "data": benchmark_key(cfg.data),
        # `model.lm` at its default ("": the own LM) is left out, so adding the key kept the
        # keys (and the cached bases) of every existing configuration.
        "model": {k: v for k, v in cfg.to_flat().items()
                  if k.startswith("model.") and (k, v) != ("model.lm", "")},
        # `pretrain.threads` at its default (2, what the reference bases were made with) is
        # left out for the same reason.
        "pretrain": {k: v for k, v in cfg.to_flat().items()
                     if k.startswith("pretrain.") and (k, v) != ("pretrain.threads", 2)},
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
    tmpl = []
    records = samples.records  # the index: no image is decoded here
    for r in records:
        try:
            tmpl.append(pretrain_template(r.instruction) if r.images else None)
        except ValueError:
            tmpl.append(None)
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

    last: list[int] = []  # the current batch's sample indices, for the auxiliary loss
    aux_loss, aux_params = _vision_aux(model, samples, pc.vision_aux_weight, last)

    def next_batch(_: int):
        idx = rng.integers(0, len(samples), bs)
        last[:] = [int(i) for i in idx]
        return enc.train_batch([samples[i] for i in idx])

    def measure() -> dict[str, float]:
        return heldout_accuracy(model, enc, heldout, cfg.train.eval_batch_size,
                                cfg.train.max_new_tokens)

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
            model, next_batch, n, pc.lr * pc.extend_lr_factor, schedule=cosine_schedule(warm, n),
            desc=f"pretrain base (+{n}, below {pc.target:g}%)", progress=progress,
            aux_loss=aux_loss, aux_params=aux_params))
        done += n
        acc = measure()
        history.append({"steps": done, "heldout": acc})
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
