"""The on-disk sample contract: a task folder with ``manifest.jsonl`` and its array files.

One JSON object per line (docs/design.md §3)::

    {"id": "color-train-00012", "task": "color", "modalities": ["image", "text"],
     "instruction": "what color is the shape", "answer": "red", "split": "train",
     "image": "images/color-train-00012.png", "audio": null}

Array paths are relative to the task folder. Images are ``.png`` (read as RGB) or ``.npy``
(H, W, 3) uint8. Audio is ``.wav`` (mono 16-bit PCM, read as float32 in [-1, 1) with the sample
rate from its header; other layouts are rejected rather than silently downmixed or rescaled) or
``.npy`` float32 1-D (no rate: taken to be at the model's rate already). The benchmark generator
writes this format (:func:`write_wav` for its audio) and edge clients read it, so nothing here
imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
import wave
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.jsonl"
MODALITIES = ("image", "text", "audio")
WAV_SAMPWIDTH = 2  # bytes: 16-bit PCM, the only sample width read and written
WAV_SCALE = 32768.0  # int16 full scale: sample / WAV_SCALE is in [-1, 1)
SPLITS = ("train", "test", "pretrain")

_FIX = "fix the record or regenerate the folder (delete it and rerun to rebuild the benchmark)"


class ManifestError(ValueError):
    """A manifest or one of its array files is missing or invalid; the message says where."""


def _field(d: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in d:
        raise ManifestError(f"{where}: missing field `{name}`; {_FIX}")
    return d[name]


def _bad(where: str, name: str, rule: str, value: Any) -> ManifestError:
    return ManifestError(f"{where}: field `{name}` must be {rule}, got {value!r}; {_FIX}")


def _rel_path(d: Mapping[str, Any], name: str, where: str) -> str | None:
    value = d.get(name)
    if value is None:
        return None
    p = PurePosixPath(value) if isinstance(value, str) else None
    if p is None or not value or p.is_absolute() or ".." in p.parts:
        raise _bad(where, name, "null or a relative path inside the task folder", value)
    return str(value)


@dataclass(frozen=True)
class SampleRecord:
    """One manifest line: a sample's text and the paths of its arrays."""

    id: str
    task: str
    modalities: tuple[str, ...]
    instruction: str
    answer: str
    split: str
    image: str | None = None
    audio: str | None = None
    # Multi-turn / multi-image samples (see Sample): written only when present, so a
    # single-turn line is what it always was.
    turns: tuple[tuple[str, str], ...] = ()
    more_images: tuple[str, ...] = ()
    image_turns: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "task": self.task, "modalities": list(self.modalities),
            "instruction": self.instruction, "answer": self.answer, "split": self.split,
            "image": self.image, "audio": self.audio,
        }
        if self.turns:
            d["turns"] = [list(t) for t in self.turns]
        if self.more_images:
            d["more_images"] = list(self.more_images)
        if self.image_turns:
            d["image_turns"] = list(self.image_turns)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> SampleRecord:
        """Validate one parsed line; ``where`` (e.g. ``"…/manifest.jsonl:12"``) prefixes errors."""
        if not isinstance(d, Mapping):
            raise ManifestError(f"{where}: expected a JSON object, got {d!r}; {_FIX}")
        strings = {}
        for name in ("id", "task", "instruction", "answer", "split"):
            v = _field(d, name, where)
            if not isinstance(v, str) or (name in ("id", "task") and not v):
                raise _bad(where, name, "a non-empty string" if name in ("id", "task")
                           else "a string", v)
            strings[name] = v
        if strings["split"] not in SPLITS:
            raise _bad(where, "split", f"one of {', '.join(SPLITS)}", strings["split"])
        mods = _field(d, "modalities", where)
        # the names are checked before set(): a list may hold unhashable values
        if (not isinstance(mods, list) or not mods
                or not all(isinstance(m, str) and m in MODALITIES for m in mods)
                or len(set(mods)) != len(mods)):
            raise _bad(where, "modalities", f"a non-empty list without repeats of "
                       f"{', '.join(MODALITIES)}", mods)
        image, audio = _rel_path(d, "image", where), _rel_path(d, "audio", where)
        for name, path in (("image", image), ("audio", audio)):
            if (name in mods) != (path is not None):
                raise _bad(where, name, f"a path exactly when `modalities` lists {name!r} "
                           f"(modalities={mods})", path)
        turns = d.get("turns", [])
        if not isinstance(turns, list) or not all(
                isinstance(t, list) and len(t) == 2 and t[0] in ("user", "assistant")
                and isinstance(t[1], str) for t in turns):
            raise _bad(where, "turns", 'absent or a list of ["user"|"assistant", text] pairs',
                       turns)
        more = d.get("more_images", [])
        if not isinstance(more, list):
            raise _bad(where, "more_images", "absent or a list of relative paths", more)
        more_paths = [_rel_path({"more_images": m}, "more_images", where) for m in more]
        if image is None and more_paths:
            raise _bad(where, "more_images", "absent when `image` is null", more)
        at = d.get("image_turns", [])
        if not isinstance(at, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                               and 0 <= i < max(1, len(turns)) for i in at):
            raise _bad(where, "image_turns", "absent or a list of turn indices", at)
        return cls(modalities=tuple(mods), image=image, audio=audio,
                   turns=tuple((str(r), str(t)) for r, t in turns),
                   more_images=tuple(p for p in more_paths if p is not None),
                   image_turns=tuple(at), **strings)


def write_manifest(folder: Path, records: Iterable[SampleRecord]) -> Path:
    """Write ``folder/manifest.jsonl`` atomically (temp file + ``os.replace``); return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MANIFEST_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest(folder: Path, split: str | None = None) -> list[SampleRecord]:
    """Parse and validate ``folder/manifest.jsonl``; keep only ``split`` when given."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no manifest at {str(path)!r}; point to a task folder that holds "
                            f"{MANIFEST_NAME} (generate the benchmark with ensure_benchmark)")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    records: list[SampleRecord] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(f"{where}: not UTF-8 text ({e}); {_FIX}") from e
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except (ValueError, RecursionError) as e:  # bad JSON, a 4300+-digit int, nesting too deep
                raise ManifestError(f"{where}: not valid JSON ({e}); {_FIX}") from e
            rec = SampleRecord.from_json(d, where)
            if rec.id in seen:
                raise _bad(where, "id", f"unique (also on line {seen[rec.id]})", rec.id)
            seen[rec.id] = lineno
            if split is None or rec.split == split:
                records.append(rec)
    return records


@dataclass(frozen=True)
class Sample:
    """A record with its arrays loaded: image (H, W, 3) uint8, audio (T,) float32.

    ``audio_rate`` is the sample rate in Hz from a ``.wav`` header; None for ``.npy`` audio (and
    for samples without audio), meaning "already at the model's rate".
    """

    id: str
    task: str
    instruction: str
    answer: str
    image: np.ndarray | None = None
    audio: np.ndarray | None = None
    audio_rate: int | None = None
    # A multi-turn conversation (protocol.llava_format): every turn as (role, text), role
    # "user" | "assistant", user first, ending with the assistant's ``answer``; () for a
    # single-turn sample (``instruction`` → ``answer``).
    turns: tuple[tuple[str, str], ...] = ()
    # Images after the first, (H, W, 3) uint8 each, and for every image (``image`` first) the
    # index in ``turns`` of the user turn it belongs to; () when a sample has at most one image
    # in its first turn.
    more_images: tuple[np.ndarray, ...] = ()
    image_turns: tuple[int, ...] = ()
    # Reference answers to score against when there are several (VQAv2's ten annotators);
    # () means ``answer`` alone.
    refs: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[np.ndarray, ...]:
        return () if self.image is None else (self.image, *self.more_images)

    @property
    def conversation(self) -> tuple[tuple[str, str], ...]:
        """Every turn as (role, text), a single-turn sample included."""
        return self.turns or (("user", self.instruction), ("assistant", self.answer))

    @property
    def references(self) -> str | tuple[str, ...]:
        return self.refs or self.answer


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """Write ``audio`` (T,) float in [-1, 1] as a mono 16-bit PCM ``.wav`` at ``rate`` Hz.

    Values are scaled by 32768, rounded and clipped to int16, so reading the file back (which
    divides by 32768) returns the input within half a step (1/65536), except a full-scale +1.0,
    which becomes 32767/32768.
    """
    arr = np.asarray(audio)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"write_wav: audio must be a 1-D float array (T,), got {arr.shape} "
                         f"{arr.dtype}; pass one mono channel of float samples in [-1, 1]")
    if not isinstance(rate, int | np.integer) or rate <= 0:
        raise ValueError(f"write_wav: rate must be a positive integer number of Hz, got {rate!r}")
    pcm = np.clip(np.rint(arr.astype(np.float64) * WAV_SCALE), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(WAV_SAMPWIDTH)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())


def _read_wav(path: Path, rec_id: str) -> tuple[np.ndarray, int]:
    """(audio (T,) float32 in [-1, 1), rate in Hz) of a mono 16-bit PCM ``.wav``."""
    what_to_do = ("convert it to mono 16-bit PCM (e.g. `ffmpeg -i IN -ac 1 -c:a pcm_s16le "
                  "OUT.wav`) or store a float32 1-D .npy array, or regenerate the folder")
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            n = w.getnframes()
            if channels != 1 or width != WAV_SAMPWIDTH:
                raise ManifestError(
                    f"record {rec_id!r}: audio {str(path)!r} must be mono 16-bit PCM, found "
                    f"{channels} channel(s) of {8 * width}-bit samples; {what_to_do}")
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ManifestError(f"record {rec_id!r}: audio {str(path)!r} is not a readable PCM .wav "
                            f"({type(e).__name__}: {e}); {what_to_do}") from e
    if len(raw) != n * WAV_SAMPWIDTH:
        raise ManifestError(f"record {rec_id!r}: audio {str(path)!r} is truncated: its header "
                            f"announces {n} samples, found {len(raw) // WAV_SAMPWIDTH}; "
                            f"{what_to_do}")
    if rate <= 0:
        raise ManifestError(f"record {rec_id!r}: audio {str(path)!r} has sample rate {rate} Hz; "
                            f"{what_to_do}")
    pcm = np.frombuffer(raw, dtype="<i2")  # (T,) int16, little-endian as in every .wav
    return (pcm.astype(np.float32) / np.float32(WAV_SCALE)), int(rate)


def load_image(path: Path, rec_id: str) -> np.ndarray:
    from PIL import Image

    if path.suffix == ".png":
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    elif path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        raise ManifestError(f"record {rec_id!r}: image {str(path)!r} must be .png or .npy")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ManifestError(f"record {rec_id!r}: image {str(path)!r} must be (H, W, 3) uint8, "
                            f"got {arr.shape} {arr.dtype}")
    return arr


def load_audio(path: Path, rec_id: str) -> tuple[np.ndarray, int | None]:
    """(audio (T,) float32, rate in Hz from a .wav header or None for .npy)."""
    if path.suffix == ".wav":
        return _read_wav(path, rec_id)
    if path.suffix != ".npy":
        raise ManifestError(f"record {rec_id!r}: audio {str(path)!r} must be .wav or .npy")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 1 or arr.dtype != np.float32:
        raise ManifestError(f"record {rec_id!r}: audio {str(path)!r} must be (T,) float32, "
                            f"got {arr.shape} {arr.dtype}")
    return arr, None


def load_samples(folder: Path, split: str | None = None) -> list[Sample]:
    """Read the manifest of ``folder`` and load every record's arrays."""
    folder = Path(folder)
    out: list[Sample] = []
    for rec in read_manifest(folder, split):
        image: np.ndarray | None = None
        audio: np.ndarray | None = None
        rate: int | None = None
        for name, rel in (("image", rec.image), ("audio", rec.audio)):
            if rel is None:
                continue
            path = folder / rel
            try:
                if name == "image":
                    image = load_image(path, rec.id)
                else:
                    audio, rate = load_audio(path, rec.id)
            except ManifestError:
                raise
            except (OSError, ValueError) as e:
                raise ManifestError(f"record {rec.id!r}: cannot read {name} file {str(path)!r} "
                                    f"({type(e).__name__}: {e}); regenerate the folder") from e
        out.append(Sample(id=rec.id, task=rec.task, instruction=rec.instruction,
                          answer=rec.answer, image=image, audio=audio, audio_rate=rate))
    return out
