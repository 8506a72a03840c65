"""The continual task stream: a registry of tasks and their per-sample generators.

Every task turns a seeded ``np.random.Generator`` into ``(instruction, answer, array | None)``
examples, the array being an image (S, S, 3) uint8 or an audio clip (T,) float32 (told apart by
``ndim``; see :mod:`simulation.benchmark.audio`). Instructions have two phrasings per task (the
audio QA task ``sweep`` has two questions instead), lowercase words without punctuation (the
model's word-level tokenizer is built from the data); answers are lowercase words, numbers as
numerals. The six vision/text tasks come first and the three audio tasks after them, so in the
default stream audio arrives mid-stream as a new modality. The pretraining mixture
(:data:`PRETRAIN`) uses different templates, so the base model learns perception (audio
included) and word/number primitives but scores low zero-shot on the tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from protocol.config import ConfigError
from simulation.benchmark.audio import (
    AUDIO_RATE,
    MAX_SECONDS,
    NOTES,
    beeps,
    finish,
    noise_only,
    note_freq,
    place,
    samples,
    sweep,
    tone,
)
from simulation.benchmark.shapes import (
    COLOR_NAMES,
    GRID,
    SHAPES,
    Obj,
    random_objs,
    render,
    render_intensity,
)

# (instruction, answer, image (S, S, 3) uint8 | audio (T,) float32 with T ≤ MAX_SAMPLES | None)
Example = tuple[str, str, np.ndarray | None]
Generate = Callable[[np.random.Generator, int, str, int], list[Example]]
IMAGE_TEXT: tuple[str, ...] = ("image", "text")
AUDIO_TEXT: tuple[str, ...] = ("audio", "text")


@dataclass(frozen=True)
class TaskSpec:
    """A task of the stream; ``generate(rng, n, split, image_size)`` makes ``n`` examples."""

    name: str
    description: str
    modalities: tuple[str, ...]
    metrics: tuple[str, ...]
    generate: Generate


def _repeat(one: Callable[[np.random.Generator, str, int], Example]) -> Generate:
    def generate(rng: np.random.Generator, n: int, split: str, image_size: int) -> list[Example]:
        return [one(rng, split, image_size) for _ in range(n)]
    return generate


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# --- digits: scikit-learn's bundled 8×8 handwritten digits, split once into disjoint pools ---

DIGITS_TRAIN_FRACTION = 0.8
_DIGITS_SPLIT_SEED = 20240  # fixed: the pools are the same for every run seed


@lru_cache(maxsize=1)
def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in [0, 1], labels (1797,) int), read-only."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float64)
    labels = d.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


@lru_cache(maxsize=1)
def digits_pools() -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) index pools, 80/20 stratified by label, sorted."""
    _, labels = digits_data()
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    train, test = [], []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(labels == label))
        k = int(round(len(idx) * DIGITS_TRAIN_FRACTION))
        train.append(idx[:k])
        test.append(idx[k:])
    pools = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    for p in pools:
        p.flags.writeable = False
    return pools


def digit_image(rng: np.random.Generator, split: str, size: int) -> tuple[int, np.ndarray]:
    """A digit from the pool of ``split`` (pretrain → train pool), scaled and shifted."""
    images, labels = digits_data()
    train, test = digits_pools()
    pool = test if split == "test" else train
    i = int(pool[rng.integers(len(pool))])  # with replacement; the shift makes repeats differ
    scale = size // 8
    big = np.kron(images[i], np.ones((scale, scale)))  # (S, S) nearest upscale
    m = size // 16  # ±2 px at 32, ±4 px at 64
    dy, dx = (int(v) for v in rng.integers(-m, m + 1, size=2))
    padded = np.pad(big, m)
    shifted = padded[m - dy:m - dy + size, m - dx:m - dx + size]
    return int(labels[i]), render_intensity(shifted, rng)


# --- the continual tasks ---

def _color(rng: np.random.Generator, split: str, size: int) -> Example:
    objs = random_objs(rng, 1)
    q = _pick(rng, ("what color is the shape", "name the color of the object"))
    return q, objs[0].color, render(objs, size, rng)


def _count(rng: np.random.Generator, split: str, size: int) -> Example:
    objs = random_objs(rng, int(rng.integers(1, 7)))
    q = _pick(rng, ("how many shapes are there", "count the objects"))
    return q, str(len(objs)), render(objs, size, rng)


def _ground(rng: np.random.Generator, split: str, size: int) -> Example:
    n = int(rng.integers(2, 4))
    quadrants = rng.choice(4, size=n, replace=False)
    pairs = random_objs(rng, n, distinct_pairs=True)  # only their (shape, colour) are used
    objs = []
    for q, p in zip(quadrants, pairs, strict=True):
        r, c = divmod(int(q), 2)
        dr, dc = (int(v) for v in rng.integers(0, 2, size=2))
        objs.append(Obj(p.shape, p.color, (2 * r + dr) * GRID + 2 * c + dc))
    target = objs[int(rng.integers(n))]
    name = f"{target.color} {target.shape}"
    q = _pick(rng, (f"where is the {name}", f"in which part is the {name}"))
    return q, target.quadrant, render(objs, size, rng)


def _caption(rng: np.random.Generator, split: str, size: int) -> Example:
    objs = sorted(random_objs(rng, 2), key=lambda o: o.cell)  # row-major reading order
    q = _pick(rng, ("describe the image", "what does the picture show"))
    answer = " and ".join(f"a {o.color} {o.shape}" for o in objs)
    return q, answer, render(objs, size, rng)


def _digits(rng: np.random.Generator, split: str, size: int) -> Example:
    label, image = digit_image(rng, split, size)
    q = _pick(rng, ("what digit is written", "read the handwritten digit"))
    return q, str(label), image


def _arith(rng: np.random.Generator, split: str, size: int) -> Example:
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    if rng.integers(2):
        op, result = "plus", a + b
    else:
        a, b = max(a, b), min(a, b)  # never negative
        op, result = "minus", a - b
    q = _pick(rng, (f"what is {a} {op} {b}", f"calculate {a} {op} {b}"))
    return q, str(result), None


# --- the audio tasks ---

def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A frequency spread evenly in pitch (log scale) over [lo, hi] Hz."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _clip(rng: np.random.Generator, sound: np.ndarray,
          gain: tuple[float, float] | None = None) -> np.ndarray:
    """``sound`` at a random onset in a clip of random length ≤ MAX_SECONDS → float32 (T,).

    The onset and the trailing silence vary so neither "where" nor "how long" gives the answer
    away; the clip length varies so the model's padding to one second is exercised.
    """
    seconds = len(sound) / AUDIO_RATE
    onset = float(rng.uniform(0.02, MAX_SECONDS - seconds - 0.02))
    total = samples(min(MAX_SECONDS, onset + seconds + float(rng.uniform(0.02, 0.1))))
    clip = place(sound, samples(onset), total)
    return finish(rng, clip) if gain is None else finish(rng, clip, gain)


def _pitch(rng: np.random.Generator, split: str, size: int) -> Example:
    note = _pick(rng, NOTES)
    freq = note_freq(note, octave=4, cents=float(rng.uniform(-15, 15)))  # 258–498 Hz
    sound = tone(rng, freq, float(rng.uniform(0.3, 0.9)))
    q = _pick(rng, ("which note is played", "name the note of the tone"))
    return q, note, _clip(rng, sound)


BEEP_COUNTS = range(1, 7)


def _beats(rng: np.random.Generator, split: str, size: int) -> Example:
    count = int(rng.integers(BEEP_COUNTS.start, BEEP_COUNTS.stop))
    signal, _ = beeps(rng, count, _log_uniform(rng, 300, 1500), samples(MAX_SECONDS))
    q = _pick(rng, ("how many beeps do you hear", "count the beeps"))
    return q, str(count), finish(rng, signal)


DIRECTIONS: tuple[str, ...] = ("up", "down", "flat")
LOUDNESS: dict[str, tuple[float, float]] = {"loud": (0.6, 0.9), "soft": (0.05, 0.15)}  # peak


def _glide(rng: np.random.Generator, direction: str, seconds: float) -> np.ndarray:
    """A sweep going ``direction`` over 1.6–2.5× in frequency, or a steady tone ("flat")."""
    if direction == "flat":
        return tone(rng, _log_uniform(rng, 250, 1000), seconds)
    low = _log_uniform(rng, 200, 500)
    high = low * float(rng.uniform(1.6, 2.5))  # ≤ 1250 Hz
    return sweep(rng, *((low, high) if direction == "up" else (high, low)), seconds)


def _sweep(rng: np.random.Generator, split: str, size: int) -> Example:
    seconds = float(rng.uniform(0.4, 0.9))
    if rng.integers(2):
        direction = _pick(rng, DIRECTIONS)
        return "does the pitch go up or down", direction, _clip(rng, _glide(rng, direction,
                                                                            seconds))
    level = _pick(rng, tuple(LOUDNESS))
    sound = _glide(rng, _pick(rng, DIRECTIONS), seconds)  # any shape: only the level counts
    return "is the sound loud or soft", level, _clip(rng, sound, LOUDNESS[level])


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("color", "name the colour of the single shape", IMAGE_TEXT, ("exact",),
                 _repeat(_color)),
        TaskSpec("count", "count 1 to 6 shapes", IMAGE_TEXT, ("exact",), _repeat(_count)),
        TaskSpec("ground", "say which quadrant holds the named object", IMAGE_TEXT, ("exact",),
                 _repeat(_ground)),
        TaskSpec("caption", "describe two objects in reading order", IMAGE_TEXT,
                 ("exact", "f1"), _repeat(_caption)),
        TaskSpec("digits", "read a handwritten digit", IMAGE_TEXT, ("exact",),
                 _repeat(_digits)),
        TaskSpec("arith", "add or subtract two one-digit numbers", ("text",), ("exact",),
                 _repeat(_arith)),
        TaskSpec("pitch", "name the note (c to b, octave 4) of a tone", AUDIO_TEXT, ("exact",),
                 _repeat(_pitch)),
        TaskSpec("beats", "count 1 to 6 beeps", AUDIO_TEXT, ("exact",), _repeat(_beats)),
        TaskSpec("sweep", "say whether a sound goes up, down or stays flat, or is loud or soft",
                 AUDIO_TEXT, ("exact",), _repeat(_sweep)),
    )
}


# --- the pretraining mixture (base model only; task field "pretrain") ---

_WORDS: tuple[str, ...] = COLOR_NAMES + SHAPES + tuple(str(i) for i in range(10))


def _pre_shape(rng: np.random.Generator, split: str, size: int) -> Example:
    objs = random_objs(rng, 1)
    return "what shape is this", objs[0].shape, render(objs, size, rng)


def _pre_exists(rng: np.random.Generator, split: str, size: int) -> Example:
    """"is there a red circle": the negatives are hard, they differ from a present object in
    exactly its colour or exactly its shape.

    With random negatives (generator version 2) a "no" was mostly decided by the shape alone, so
    how well the base's vision tower told red from orange or yellow depended on the pretraining
    run, and the colour task downstream swung between ~20% and ~95% with it.
    """
    objs = random_objs(rng, int(rng.integers(1, 4)))
    present = {(o.color, o.shape) for o in objs}
    o = objs[int(rng.integers(len(objs)))]
    if rng.integers(2):
        return f"is there a {o.color} {o.shape}", "yes", render(objs, size, rng)
    swap_color = bool(rng.integers(2))
    while (pair := ((_pick(rng, COLOR_NAMES), o.shape) if swap_color
                    else (o.color, _pick(rng, SHAPES)))) in present:
        pass
    return f"is there a {pair[0]} {pair[1]}", "no", render(objs, size, rng)


def _pre_repeat(rng: np.random.Generator, split: str, size: int) -> Example:
    words = " ".join(_pick(rng, _WORDS) for _ in range(int(rng.integers(1, 4))))
    return f"repeat {words}", words, None


def _pre_successor(rng: np.random.Generator, split: str, size: int) -> Example:
    n = int(rng.integers(0, 9))
    return f"what number comes after {n}", str(n + 1), None


def _pre_digit_gt(rng: np.random.Generator, split: str, size: int) -> Example:
    label, image = digit_image(rng, "train", size)  # never the digits test pool
    return "is the digit greater than four", "yes" if label > 4 else "no", image


def _pre_high_low(rng: np.random.Generator, split: str, size: int) -> Example:
    # A gap around 440 Hz keeps the labels unambiguous.
    answer = _pick(rng, ("high", "low"))
    freq = _log_uniform(rng, 480, 1000) if answer == "high" else _log_uniform(rng, 200, 400)
    return "is the tone high or low", answer, _clip(rng, tone(rng, freq,
                                                              float(rng.uniform(0.3, 0.9))))


def _pre_sound(rng: np.random.Generator, split: str, size: int) -> Example:
    if rng.integers(2):
        return "is there a sound", "no", noise_only(rng, samples(float(rng.uniform(0.4, 1.0))))
    if rng.integers(2):
        sound = tone(rng, _log_uniform(rng, 200, 1000), float(rng.uniform(0.3, 0.9)))
        return "is there a sound", "yes", _clip(rng, sound)
    signal, _ = beeps(rng, int(rng.integers(1, 4)), _log_uniform(rng, 300, 1500),
                      samples(MAX_SECONDS))
    return "is there a sound", "yes", finish(rng, signal)


def _pre_many_beeps(rng: np.random.Generator, split: str, size: int) -> Example:
    count = int(rng.integers(BEEP_COUNTS.start, BEEP_COUNTS.stop))
    signal, _ = beeps(rng, count, _log_uniform(rng, 300, 1500), samples(MAX_SECONDS))
    return "are there more than three beeps", "yes" if count > 3 else "no", finish(rng, signal)


# The pretraining templates by name (the base's held-out accuracy is reported per template);
# the vision/text kinds keep equal shares of 75% of the mix, the audio kinds share 25%.
AUDIO_PRETRAIN_SHARE = 0.25
_VISION_TEXT_KINDS: dict[str, Callable[[np.random.Generator, str, int], Example]] = {
    "shape": _pre_shape, "exists": _pre_exists, "repeat": _pre_repeat,
    "successor": _pre_successor, "digit-gt": _pre_digit_gt,
}
_AUDIO_KINDS: dict[str, Callable[[np.random.Generator, str, int], Example]] = {
    "high-low": _pre_high_low, "sound": _pre_sound, "many-beeps": _pre_many_beeps,
}
PRETRAIN_KINDS = {**_VISION_TEXT_KINDS, **_AUDIO_KINDS}
PRETRAIN_TEMPLATES: tuple[str, ...] = tuple(PRETRAIN_KINDS)
_PRETRAIN_FNS = tuple(PRETRAIN_KINDS.values())
_PRETRAIN_WEIGHTS = np.array(
    [(1 - AUDIO_PRETRAIN_SHARE) / len(_VISION_TEXT_KINDS)] * len(_VISION_TEXT_KINDS)
    + [AUDIO_PRETRAIN_SHARE / len(_AUDIO_KINDS)] * len(_AUDIO_KINDS))
# instruction prefix → template; "is there a sound" is checked before "is there a".
_TEMPLATE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("what shape is this", "shape"), ("is there a sound", "sound"), ("is there a ", "exists"),
    ("repeat ", "repeat"), ("what number comes after", "successor"),
    ("is the digit greater than four", "digit-gt"), ("is the tone high or low", "high-low"),
    ("are there more than three beeps", "many-beeps"),
)


def pretrain_template(instruction: str) -> str:
    """The pretraining template an instruction was made from (raise on a foreign one)."""
    for prefix, name in _TEMPLATE_PREFIXES:
        if instruction.startswith(prefix):
            return name
    raise ValueError(f"{instruction!r} is not a pretraining instruction; templates: "
                     f"{', '.join(PRETRAIN_TEMPLATES)}")


def _pretrain_one(rng: np.random.Generator, split: str, size: int) -> Example:
    kind = int(rng.choice(len(_PRETRAIN_FNS), p=_PRETRAIN_WEIGHTS))
    return _PRETRAIN_FNS[kind](rng, split, size)


def _pretrain_heldout(rng: np.random.Generator, n: int, split: str, size: int) -> list[Example]:
    """``n`` held-out examples balanced over the templates (template i gets n // 8 or one more)."""
    return [_PRETRAIN_FNS[i % len(_PRETRAIN_FNS)](rng, split, size) for i in range(n)]


PRETRAIN = TaskSpec("pretrain", "perception and word/number primitives for the base model",
                    ("image", "audio", "text"), ("exact",), _repeat(_pretrain_one))
# The same templates, balanced, from the "test" stream of task "pretrain" (never in training):
# the base's held-out accuracy per template.
PRETRAIN_HELDOUT = TaskSpec("pretrain", PRETRAIN.description, PRETRAIN.modalities, ("exact",),
                            _pretrain_heldout)


def list_tasks() -> list[str]:
    """Names of the continual tasks, in registry order."""
    return list(TASKS)


def check_tasks(names: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`ConfigError` (a ``ValueError``) naming the first unknown task and the known ones."""
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r} in config key `data.tasks`; "
                             f"known tasks: {', '.join(TASKS)}")


def get_task(name: str) -> TaskSpec:
    check_tasks([name])
    return TASKS[name]


def task_metrics(name: str) -> tuple[str, ...]:
    """Metrics to report for task ``name`` ("exact", plus "f1" for caption)."""
    return get_task(name).metrics
