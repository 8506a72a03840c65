"""The field's instruction-data format (LLaVA, CoIN, MCITlib, FCIT, D-MoLE): read and checked.

A data file is a JSON list (``.json``) or one JSON object per line (``.jsonl``) of records::

    {"id": "vqa-000123",
     "image": "coco/val2014/COCO_val2014_000000000123.jpg",      # or a list of paths, or absent
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat is on the table?"},
        {"from": "gpt",   "value": "A plate of food."},
        {"from": "human", "value": "What colour is the plate?"},   # multi-turn allowed
        {"from": "gpt",   "value": "White."}],
     "audio": "clips/000123.wav"}                                   # optional

Image paths are relative to an image root (or absolute); PNG, JPEG and WebP are read (as RGB),
WAV and FLAC for audio. Only the index is kept in memory: :func:`read_records` parses the text
and checks every path exists, and :func:`load_image` decodes pixels when a sample is used, so a
client with 100k records holds 100k short records, not their pixels.

Checked, with the file, the record and what to do in every message: unreadable JSON (with the
line for ``.jsonl``), a record that is not an object, a missing or duplicate id (``id``, or
``question_id`` as some releases name it), turns that do not alternate human → gpt starting
with human and ending with gpt, a turn without a string ``value``, an ``<image>`` marker count
that differs from the number of images (a marker without an image, or an image without its
marker), a missing or unsupported image or audio file. ``on_error = "fail"`` raises at the first
bad record; ``"skip"`` drops it and reports why (the run's ``metrics.json`` counts them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from protocol.manifest import ManifestError, Sample, load_audio

IMAGE_MARKER = "<image>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ON_ERROR = ("fail", "skip")


class DataError(ValueError):
    """A data file or record is unusable; the message names the file, the record and the fix."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str  # the turn's text with the <image> markers removed


@dataclass(frozen=True)
class Record:
    """One conversation: its id, image and audio paths, and its turns (user first, alternating)."""

    id: str
    turns: tuple[Turn, ...]
    images: tuple[Path, ...] = ()
    audio: Path | None = None
    # Where each image's marker stood: the index of the user turn it belongs to (a chat template
    # puts the image content part in that turn).
    image_turns: tuple[int, ...] = ()
    source: str = ""  # "file:line" or "file#index", for messages
    # Several reference answers (the optional `answers` field: VQAv2's ten annotators); scored
    # instead of the last gpt turn when present.
    answers: tuple[str, ...] = ()

    @property
    def instruction(self) -> str:
        """The first user turn (single-turn tasks: the question)."""
        return self.turns[0].text

    @property
    def answer(self) -> str:
        """The last assistant turn (what generation is scored against)."""
        return self.turns[-1].text


@dataclass
class ReadResult:
    records: list[Record]
    skipped: list[str] = field(default_factory=list)  # one message per dropped record
    renamed: int = 0  # records whose id repeated an earlier one's (kept as "id#k")


def _entries(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed record) for every record of a .json list or .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {str(path)!r}: {e}") from e
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e}); fix the line or remove "
                                "it") from e
        return
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DataError(f"data file {str(path)!r} is not valid JSON ({e}); a .json data file "
                        "is one list of records (use .jsonl for one record per line)") from e
    if not isinstance(data, list):
        raise DataError(f"data file {str(path)!r} holds a {type(data).__name__}, not a list of "
                        "records")
    for i, d in enumerate(data):
        yield f"{path}#{i}", d


References = dict[str, list[str]]  # record id or image file name → reference answers


def _as_answer(v: Any) -> str | None:
    """A reference answer: a string, or a box/list written as its text ("[x1, y1, x2, y2]")."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(x, int | float) for x in v):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return None


def _question_turns(d: dict[str, Any], at: str, n_images: int, refs: References | None
                    ) -> list[dict[str, Any]]:
    """An evaluation question record (LLaVA's model_vqa format, CoIN and UCIT test files):
    ``text`` is the prompt, its image implied (``<image>`` added when the text has none), the
    reference from ``answer``, ``answers``, ``answer_bbox`` (grounding) or the task's
    references file."""
    text = d["text"]
    if n_images and IMAGE_MARKER not in text:
        text = f"{IMAGE_MARKER * n_images}\n{text}"
    answer = None
    for key in ("answer", "answer_bbox"):
        if key in d:
            answer = _as_answer(d[key])
            if answer is None:
                raise DataError(f"{at}: `{key}` must be a string (or a list of numbers for a "
                                f"box), got {d[key]!r:.80}")
            break
    if answer is None and isinstance(d.get("answers"), list) and d["answers"]:
        answer = _as_answer(d["answers"][0])
    if answer is None and refs and (found := _lookup(refs, d)):
        answer = found[0]
    if answer is None:
        raise DataError(f"{at}: a question record (`text`) needs its reference: `answer`, "
                        "`answers`, `answer_bbox`, or a `references` file for the task in the "
                        "stream (TextVQA's answers file, COCO caption annotations)")
    return [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]


def _lookup(refs: References, d: dict[str, Any]) -> list[str] | None:
    rid = str(d.get("id", d.get("question_id")))
    if rid in refs:
        return refs[rid]
    image = d.get("image")
    if isinstance(image, str):
        return refs.get(f"file:{Path(image).name}")
    return None


def read_references(path: str | Path) -> References:
    """Reference answers kept beside a test file, by record id or image file name:

    * ``{"data": [{"question_id": …, "answers": [...]}]}`` — TextVQA's answers file;
    * COCO caption annotations ``{"images": [{"id", "file_name"}], "annotations":
      [{"image_id", "caption"}]}`` — UCIT's / COCO's ``val_coco_type_*.json`` (joined by the
      record image's file name);
    * a JSON object ``{id: answer | [answers]}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"references file {str(path)!r} cannot be read as JSON ({e})") from e
    out: References = {}
    if isinstance(raw, dict) and isinstance(raw.get("data"), list):
        for q in raw["data"]:
            if isinstance(q, dict) and "question_id" in q and isinstance(q.get("answers"), list):
                out[str(q["question_id"])] = [str(a) for a in q["answers"]]
    elif isinstance(raw, dict) and isinstance(raw.get("images"), list) and isinstance(
            raw.get("annotations"), list):
        names = {im["id"]: Path(str(im["file_name"])).name for im in raw["images"]
                 if isinstance(im, dict) and "id" in im and "file_name" in im}
        for a in raw["annotations"]:
            if isinstance(a, dict) and a.get("image_id") in names and isinstance(
                    a.get("caption"), str):
                out.setdefault(f"file:{names[a['image_id']]}", []).append(a["caption"])
    elif isinstance(raw, dict):
        for k, v in raw.items():
            vals = [v] if isinstance(v, str) else v
            if isinstance(vals, list) and all(isinstance(x, str) for x in vals):
                out[str(k)] = list(vals)
    if not out:
        raise DataError(f"references file {str(path)!r} holds no references in a known layout "
                        "(TextVQA's {\"data\": [{question_id, answers}]}, COCO captions "
                        "{images, annotations}, or {id: answers})")
    return out


def _record(d: Any, where: str, image_root: Path, refs: References | None = None) -> Record:
    if not isinstance(d, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(d).__name__}")
    rid = d.get("id", d.get("question_id"))
    if rid is None or (isinstance(rid, str) and not rid.strip()) or isinstance(rid, bool | dict | list):
        raise DataError(f"{where}: the record has no `id` (or `question_id`); give every record "
                        "a unique id")
    rid = str(rid)
    at = f"{where} (id {rid!r})"
    raw = d.get("image")
    paths = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"{at}: `image` must be a path, a list of paths or absent, got {raw!r}")
    images = tuple(_file(image_root, p, IMAGE_SUFFIXES, "image", at) for p in paths)
    audio = d.get("audio")
    if audio is not None and not (isinstance(audio, str) and audio):
        raise DataError(f"{at}: `audio` must be a path or absent, got {audio!r}")
    audio_path = None if audio is None else _file(image_root, audio, AUDIO_SUFFIXES, "audio", at)
    conv = d.get("conversations")
    if conv is None and isinstance(d.get("text"), str):
        conv = _question_turns(d, at, len(paths), refs)
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f"{at}: `conversations` must be a list of at least one human and one gpt "
                        f"turn, got {conv!r:.80}")
    turns: list[Turn] = []
    image_turns: list[int] = []
    for k, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise DataError(f"{at}: turn {k} must be {{\"from\": ..., \"value\": \"text\"}}, "
                            f"got {t!r:.80}")
        role = ROLES.get(str(t.get("from", "")).lower())
        want = "user" if k % 2 == 0 else "assistant"
        if role != want:
            raise DataError(
                f"{at}: turn {k} is from {t.get('from')!r}, expected "
                f"{'human' if want == 'user' else 'gpt'}: turns alternate human, gpt, … starting "
                "with human")
        value: str = t["value"]
        if role == "assistant" and IMAGE_MARKER in value:
            raise DataError(f"{at}: turn {k} (gpt) holds an {IMAGE_MARKER} marker; images belong "
                            "to human turns")
        n_markers = value.count(IMAGE_MARKER)
        image_turns.extend([len(turns)] * n_markers)
        text = " ".join(value.replace(IMAGE_MARKER, " ").split())
        if not text and role == "assistant":
            raise DataError(f"{at}: turn {k} (gpt) is empty; nothing to learn or score")
        turns.append(Turn(role, text))
    if turns[-1].role != "assistant":
        raise DataError(f"{at}: the last turn is from human; a conversation ends with gpt's answer")
    if len(image_turns) != len(images):
        what = ("an <image> marker without an image" if len(image_turns) > len(images)
                else "an image without its <image> marker")
        raise DataError(f"{at}: {len(image_turns)} {IMAGE_MARKER} markers for {len(images)} "
                        f"images ({what}); put one marker per image in the human turn it "
                        "belongs to")
    answers = d.get("answers", ())
    if refs and (found := _lookup(refs, d)):
        answers = found  # the references file is the scorer's source (TextVQA's 10 answers)
    if not isinstance(answers, list | tuple) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{at}: `answers` must be a list of reference answer strings or absent, "
                        f"got {answers!r:.80}")
    return Record(rid, tuple(turns), images, audio_path, tuple(image_turns), where,
                  tuple(answers))


def _file(root: Path, rel: str, suffixes: Sequence[str], kind: str, at: str) -> Path:
    p = Path(rel) if Path(rel).is_absolute() else root / rel
    if p.suffix.lower() not in suffixes:
        raise DataError(f"{at}: {kind} {rel!r} is not one of {', '.join(suffixes)}; convert it")
    if not p.is_file():
        raise DataError(f"{at}: {kind} file {str(p)!r} does not exist; check the path and the "
                        "stream's image root")
    return p


def read_records(path: str | Path, image_root: str | Path | None = None,
                 on_error: str = "fail", references: str | Path | None = None) -> ReadResult:
    """Index a data file: every record parsed and checked, no pixels read.

    ``image_root`` defaults to the data file's folder. ``on_error``: ``fail`` raises
    :class:`DataError` at the first bad record, ``skip`` drops it and lists why.
    ``references``: a file of reference answers for question records without their own
    (:func:`read_references`). An id used again in a file (UCIT's training files give one
    image's several captions one question id) is kept as ``id#2``, ``id#3``, … and counted in
    ``renamed``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"data file {str(path)!r} must be .json (a list) or .jsonl (a record "
                        "per line)")
    refs = read_references(references) if references is not None else None
    out = ReadResult([])
    seen: dict[str, int] = {}
    for where, d in _entries(path):
        try:
            rec = _record(d, where, root, refs)
        except DataError as e:
            if on_error == "fail":
                raise
            out.skipped.append(str(e))
            continue
        if rec.id in seen:
            seen[rec.id] += 1
            rec = dataclasses.replace(rec, id=f"{rec.id}#{seen[rec.id]}")
            out.renamed += 1
        seen.setdefault(rec.id, 1)
        out.records.append(rec)
    if not out.records:
        raise DataError(f"data file {str(path)!r} holds no usable record"
                        + (f" ({len(out.skipped)} skipped; first: {out.skipped[0]})"
                           if out.skipped else ""))
    return out


def load_image(path: Path, where: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (decoded on demand)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{where or path}: image {str(path)!r} cannot be decoded ({e}); replace "
                        "the file") from e


def _load_audio(path: Path, where: str) -> tuple[np.ndarray, int | None]:
    """(T,) float32 mono in [-1, 1] and its rate: WAV (16-bit PCM) or FLAC (any bit depth)."""
    if path.suffix.lower() == ".flac":
        try:
            import soundfile
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise DataError(f"{where}: reading FLAC needs the `soundfile` package "
                            "(`pip install soundfile`), or convert the file to WAV") from e
        try:
            audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
            raise DataError(f"{where}: audio {str(path)!r} cannot be decoded ({e}); replace "
                            "the file") from e
        if audio.shape[1] != 1:
            raise DataError(f"{where}: audio {str(path)!r} has {audio.shape[1]} channels; "
                            "convert it to mono (e.g. `ffmpeg -i IN -ac 1 OUT.flac`)")
        return np.ascontiguousarray(audio[:, 0]), int(rate)
    try:
        return load_audio(path, where)
    except ManifestError as e:
        why = str(e).split(": ", 1)[-1].split("; ", 1)[0]  # the reason, without its advice
        raise DataError(f"{where}: {why}; convert it to mono 16-bit PCM WAV (e.g. `ffmpeg -i IN "
                        "-ac 1 -c:a pcm_s16le OUT.wav`) or FLAC") from e


def sample_of(rec: Record, task: str) -> Sample:
    """Decode one record's files into a :class:`~protocol.manifest.Sample`."""
    where = rec.source or rec.id
    images = tuple(load_image(p, f"{where} (id {rec.id!r})") for p in rec.images)
    audio, rate = ((None, None) if rec.audio is None
                   else _load_audio(rec.audio, f"{where} (id {rec.id!r})"))
    multi = len(rec.turns) > 2
    return Sample(
        id=rec.id, task=task, instruction=rec.instruction, answer=rec.answer,
        image=images[0] if images else None, audio=audio, audio_rate=rate,
        turns=tuple((t.role, t.text) for t in rec.turns) if multi else (),
        more_images=images[1:],
        image_turns=rec.image_turns if (multi or len(images) > 1) else (),
        refs=rec.answers)


class TaskSamples(Sequence[Sample]):
    """One task's samples, read lazily: the records (text and paths) stay in memory, and an
    item's image and audio are decoded each time it is taken. A client with 100k records holds
    100k short records; what it keeps decoded is only what it keeps (a replay buffer, a cache).

    ``skipped`` lists the records dropped under ``on_error = "skip"`` (file, id and reason)."""

    def __init__(self, task: str, records: Sequence[Record], skipped: Sequence[str] = (),
                 renamed: int = 0):
        self.task = task
        self.records = list(records)
        self.skipped = list(skipped)
        self.renamed = renamed

    @classmethod
    def read(cls, task: str, path: str | Path, image_root: str | Path | None = None,
             on_error: str = "fail", references: str | Path | None = None) -> TaskSamples:
        res = read_records(path, image_root, on_error, references)
        return cls(task, res.records, res.skipped, res.renamed)

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [sample_of(r, self.task) for r in self.records[i]]
        return sample_of(self.records[int(i)], self.task)

    @property
    def has_image(self) -> bool:
        return any(r.images for r in self.records)

    @property
    def has_audio(self) -> bool:
        return any(r.audio is not None for r in self.records)

    def modalities(self) -> list[str]:
        """The modalities this task's records carry, from the index (no file is decoded)."""
        return ["image"] * self.has_image + ["audio"] * self.has_audio + ["text"]


def ids_of(samples: Sequence[Sample]) -> list[str]:
    """Every sample's id, off the index when ``samples`` is a :class:`TaskSamples`."""
    if isinstance(samples, TaskSamples):
        return [r.id for r in samples.records]
    return [s.id for s in samples]


def references_of(samples: Sequence[Sample]) -> list[str | tuple[str, ...]]:
    """What each sample's answer is scored against; read off the index when ``samples`` is a
    :class:`TaskSamples` (no image decoded just to learn the answers)."""
    if isinstance(samples, TaskSamples):
        return [r.answers or r.answer for r in samples.records]
    return [s.references for s in samples]


def record_json(rid: str, instruction: str, answer: str, image: str | None = None,
                audio: str | None = None) -> dict[str, Any]:
    """A single-turn record in the field's format (the image's marker leads the question)."""
    d: dict[str, Any] = {"id": rid}
    if image is not None:
        d["image"] = image
    if audio is not None:
        d["audio"] = audio
    value = f"{IMAGE_MARKER}\n{instruction}" if image is not None else instruction
    d["conversations"] = [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return d


def record_to_json(rec: Record, images: Sequence[str], audio: str | None) -> dict[str, Any]:
    """``rec`` in the field's format again, its files at ``images`` / ``audio`` (each image's
    marker at the head of its user turn)."""
    d: dict[str, Any] = {"id": rec.id}
    if images:
        d["image"] = images[0] if len(images) == 1 else list(images)
    if audio is not None:
        d["audio"] = audio
    conv = []
    for k, t in enumerate(rec.turns):
        marks = f"{IMAGE_MARKER}\n" * rec.image_turns.count(k)
        conv.append({"from": "human" if t.role == "user" else "gpt", "value": marks + t.text})
    d["conversations"] = conv
    if rec.answers:
        d["answers"] = list(rec.answers)
    return d


def write_records(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write records as a ``.json`` list or ``.jsonl`` lines, atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            if path.suffix == ".jsonl":
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                json.dump(list(records), f, ensure_ascii=False)
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
