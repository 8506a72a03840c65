"""Audio in the benchmark: .wav reading/writing, the audio tasks' answers, and their files.

The answer checks are physical: they measure the waveform (FFT peak, energy envelope, frame
RMS) instead of trusting the generator's own parameters, so a synthesis bug that makes a label
wrong shows up here.
"""

from __future__ import annotations

import json
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from protocol.config import DataConfig
from protocol.llava_format import DataError, TaskSamples, record_json, write_records
from protocol.manifest import (
    ManifestError,
    Sample,
    SampleRecord,
    load_samples,
    write_manifest,
    write_wav,
)
from protocol.stream import load_stream, open_task
from simulation.benchmark import (
    AUDIO_RATE,
    AUDIO_TEXT,
    GENERATOR_VERSION,
    MAX_SECONDS,
    PRETRAIN,
    TASKS,
    TaskSpec,
    ensure_benchmark,
    generate_benchmark,
)
from simulation.benchmark.audio import NOTES, PEAK, note_freq, spaced_onsets
from simulation.benchmark.generate import PRETRAIN_FILE, STREAM_TOML

N = 400  # samples per task for the distribution and physics checks
MAX_T = int(AUDIO_RATE * MAX_SECONDS)


@cache
def examples(task: str, n: int = N, seed: int = 0) -> tuple[tuple[str, str, np.ndarray], ...]:
    """``n`` examples of ``task`` (cached: several tests measure the same clips)."""
    out = TASKS[task].generate(np.random.default_rng(seed), n, "train", 32)
    assert all(a is not None for _, _, a in out)
    return tuple(out)  # type: ignore[arg-type]


PRETRAIN_N = 600


@pytest.fixture(scope="module")
def pretrain_audio() -> list[tuple[str, str, np.ndarray]]:
    ex = PRETRAIN.generate(np.random.default_rng(0), PRETRAIN_N, "pretrain", 32)
    return [(q, a, x) for q, a, x in ex if x is not None and x.ndim == 1]


# --- measurements ----------------------------------------------------------------------------

def peak_freq(x: np.ndarray) -> float:
    """Frequency (Hz) of the largest FFT magnitude, zero-padded to ~0.5 Hz bins."""
    n = 32768
    mag = np.abs(np.fft.rfft(x.astype(np.float64), n=n))  # (n/2 + 1,)
    mag[: int(50 * n / AUDIO_RATE)] = 0  # ignore DC and rumble below 50 Hz
    return float(np.argmax(mag)) * AUDIO_RATE / n


def envelope(x: np.ndarray, ms: float = 10.0) -> np.ndarray:
    """Moving average of |x| over ``ms`` milliseconds → (T,)."""
    k = int(AUDIO_RATE * ms / 1000)
    c = np.concatenate([[0.0], np.cumsum(np.abs(x.astype(np.float64)))])  # (T + 1,)
    return (c[k:] - c[:-k]) / k  # (T - k + 1,): window i covers x[i:i + k]


def active(x: np.ndarray) -> np.ndarray:
    """The part of ``x`` between the first and last sample where the envelope is ≥ 30% of max."""
    env = envelope(x)
    on = np.flatnonzero(env >= 0.3 * env.max())
    return x[on[0]:on[-1] + 1]


def count_onsets(x: np.ndarray) -> int:
    """Number of onsets: the envelope rises above 30% of its max after falling below 15%.

    The hysteresis keeps noise on a fade (where the envelope crosses 30% slowly) from counting
    one beep twice.
    """
    env = envelope(x)
    state = np.where(env >= 0.3 * env.max(), 1, np.where(env < 0.15 * env.max(), 0, -1))
    known = np.flatnonzero(state >= 0)  # in between, the state holds (forward fill)
    held = state[known]  # (K,) 0/1 at each sample where the state is decided
    return int(held[0]) + int(np.count_nonzero(np.diff(held) == 1))


def max_frame_rms(x: np.ndarray, ms: float = 20.0) -> float:
    k = int(AUDIO_RATE * ms / 1000)
    frames = x[: len(x) // k * k].astype(np.float64).reshape(-1, k)  # (F, k)
    return float(np.sqrt((frames ** 2).mean(axis=1)).max())


def nearest_note(freq: float) -> str:
    return min(NOTES, key=lambda n: abs(np.log2(freq / note_freq(n))))


# --- .wav in the manifest --------------------------------------------------------------------

def audio_record(rid: str, path: str) -> SampleRecord:
    return SampleRecord(id=rid, task="t", modalities=AUDIO_TEXT, instruction="q", answer="a",
                        split="train", image=None, audio=path)


def test_wav_round_trip_keeps_samples_and_rate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    audio = rng.uniform(-1, 1, size=1234).astype(np.float32)
    audio[:3] = (-1.0, 0.0, 0.999)
    (tmp_path / "audio").mkdir()
    write_wav(tmp_path / "audio" / "a.wav", audio, 8000)
    np.save(tmp_path / "audio" / "b.npy", audio)
    write_manifest(tmp_path, [audio_record("a", "audio/a.wav"), audio_record("b", "audio/b.npy")])
    a, b = load_samples(tmp_path)
    assert a.audio is not None and a.audio.dtype == np.float32 and a.audio.shape == (1234,)
    assert np.max(np.abs(a.audio - audio)) <= 1 / 32768
    assert a.audio_rate == 8000  # from the header, not assumed
    assert b.audio is not None and np.array_equal(b.audio, audio) and b.audio_rate is None
    assert a.image is None and a.task == "t"


def test_write_wav_clips_and_rejects_bad_input(tmp_path: Path) -> None:
    write_wav(tmp_path / "c.wav", np.array([2.0, -3.0, 1.0], np.float32), AUDIO_RATE)
    with wave.open(str(tmp_path / "c.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, AUDIO_RATE)
        assert np.frombuffer(w.readframes(3), "<i2").tolist() == [32767, -32768, 32767]
    with pytest.raises(ValueError, match=r"1-D float.*\(10, 2\)"):
        write_wav(tmp_path / "s.wav", np.zeros((10, 2), np.float32), AUDIO_RATE)
    with pytest.raises(ValueError, match=r"1-D float.*int16"):
        write_wav(tmp_path / "i.wav", np.zeros(10, np.int16), AUDIO_RATE)
    with pytest.raises(ValueError, match=r"rate.*0"):
        write_wav(tmp_path / "r.wav", np.zeros(10, np.float32), 0)


def _raw_wav(path: Path, channels: int, width: int, frames: int = 100) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(AUDIO_RATE)
        w.writeframes(bytes(frames * channels * width))


def _truncate_data(path: Path) -> None:
    write_wav(path, np.zeros(1000, np.float32), AUDIO_RATE)
    path.write_bytes(path.read_bytes()[:-500])


def _truncate_header(path: Path) -> None:
    write_wav(path, np.zeros(1000, np.float32), AUDIO_RATE)
    path.write_bytes(path.read_bytes()[:30])


@pytest.mark.parametrize("make, pattern", [
    (lambda p: _raw_wav(p, 2, 2), r"mono 16-bit PCM, found 2 channel\(s\) of 16-bit"),
    (lambda p: _raw_wav(p, 1, 1), r"found 1 channel\(s\) of 8-bit"),
    (lambda p: _raw_wav(p, 1, 3), r"found 1 channel\(s\) of 24-bit"),
    (_truncate_data, r"truncated: its header announces 1000 samples, found 750"),
    (_truncate_header, r"not a readable PCM \.wav"),
    (lambda p: p.write_bytes(b"RIFF0000WAVEjunk"), r"not a readable PCM \.wav"),
])
def test_bad_wav_names_the_record_the_file_and_the_fix(
        tmp_path: Path, make: Callable[[Path], None], pattern: str) -> None:
    make(tmp_path / "x.wav")
    write_manifest(tmp_path, [audio_record("rec-7", "x.wav")])
    with pytest.raises(ManifestError, match=pattern) as e:
        load_samples(tmp_path)
    msg = str(e.value)
    assert "'rec-7'" in msg and str(tmp_path / "x.wav") in msg and "ffmpeg" in msg


def test_missing_wav_names_the_file(tmp_path: Path) -> None:
    write_manifest(tmp_path, [audio_record("r", "audio/gone.wav")])
    with pytest.raises(ManifestError, match=r"'r'.*cannot read audio file.*gone\.wav"):
        load_samples(tmp_path)


# --- .wav in the field's format (what the benchmark writes) ----------------------------------

def test_wav_round_trip_through_the_llava_reader(tmp_path: Path) -> None:
    audio = np.random.default_rng(1).uniform(-1, 1, size=777).astype(np.float32)
    (tmp_path / "audio").mkdir()
    write_wav(tmp_path / "audio" / "a.wav", audio, 8000)
    write_records(tmp_path / "train.json", [record_json("a", "q", "x", audio="audio/a.wav")])
    ts = TaskSamples.read("t", tmp_path / "train.json", tmp_path)
    assert ts.modalities() == ["audio", "text"] and ts.records[0].audio == tmp_path / "audio/a.wav"
    (a,) = list(ts)
    assert a.audio is not None and a.audio.dtype == np.float32 and a.audio.shape == (777,)
    assert np.max(np.abs(a.audio - audio)) <= 1 / 32768 and a.audio_rate == 8000
    assert a.image is None and a.task == "t" and (a.instruction, a.answer) == ("q", "x")


def test_bad_or_missing_wav_in_the_llava_format_names_the_record(tmp_path: Path) -> None:
    _raw_wav(tmp_path / "x.wav", 2, 2)
    write_records(tmp_path / "train.json", [record_json("rec-7", "q", "a", audio="x.wav")])
    ts = TaskSamples.read("t", tmp_path / "train.json", tmp_path)  # the index reads no audio
    with pytest.raises(DataError, match=r"mono 16-bit PCM, found 2 channel\(s\)") as e:
        ts[0]
    msg = str(e.value)  # where the record is (file#index), which file, and the fix
    assert f"{tmp_path / 'train.json'}#0" in msg and str(tmp_path / "x.wav") in msg
    assert "ffmpeg" in msg
    write_records(tmp_path / "test.json", [record_json("r", "q", "a", audio="audio/gone.wav")])
    with pytest.raises(DataError, match=r"'r'.*audio file.*gone\.wav.*does not exist"):
        TaskSamples.read("t", tmp_path / "test.json", tmp_path)


# --- the audio tasks: answer sets, balance, determinism --------------------------------------

ANSWERS = {
    "pitch": set(NOTES),
    "beats": {str(i) for i in range(1, 7)},
    "sweep": {"up", "down", "flat", "loud", "soft"},
}


def test_audio_tasks_are_registered_after_the_vision_tasks() -> None:
    assert list(TASKS)[-3:] == ["pitch", "beats", "sweep"]
    for name in ANSWERS:
        assert TASKS[name].modalities == AUDIO_TEXT == ("audio", "text")
        assert TASKS[name].metrics == ("exact",)
    assert PRETRAIN.modalities == ("image", "audio", "text")


@pytest.mark.parametrize("task", list(ANSWERS))
def test_answers_are_in_the_answer_set_and_balanced(task: str) -> None:
    ex = examples(task)
    by_question: dict[str, Counter[str]] = {}
    for q, a, x in ex:
        assert a in ANSWERS[task], (q, a)
        by_question.setdefault(q, Counter())[a] += 1
        assert x.ndim == 1 and x.dtype == np.float32 and 0 < len(x) <= MAX_T
        assert float(np.max(np.abs(x))) <= PEAK + 1e-6
    assert len(by_question) == 2
    for q, counts in by_question.items():
        assert 0.3 < sum(counts.values()) / N < 0.7, q  # both phrasings / questions occur
        expected = sum(counts.values()) / len(counts)
        assert all(0.6 * expected < c < 1.4 * expected for c in counts.values()), (q, counts)
    if task == "sweep":
        assert {a for a in by_question["does the pitch go up or down"]} == {"up", "down", "flat"}
        assert {a for a in by_question["is the sound loud or soft"]} == {"loud", "soft"}
    else:
        assert set().union(*by_question.values()) == ANSWERS[task]


@pytest.mark.parametrize("task", list(ANSWERS))
def test_same_seed_same_clips_other_seed_other_clips(task: str) -> None:
    a, b, c = examples(task, 20), examples(task, 20), examples(task, 20, seed=1)
    for (qa, aa, xa), (qb, ab, xb) in zip(a, b, strict=True):
        assert (qa, aa) == (qb, ab) and xa.dtype == xb.dtype and np.array_equal(xa, xb)
    assert not all(len(xa) == len(xc) and np.array_equal(xa, xc)
                   for (_, _, xa), (_, _, xc) in zip(a, c, strict=True))


def test_clips_are_faded_and_noisy() -> None:
    for _, _, x in examples("pitch", 50):
        assert abs(float(x[0])) < 1e-3 and abs(float(x[-1])) < 1e-3  # no click at the edges
        assert float(np.std(x[100:400])) > 0  # background noise, not digital silence


# --- the audio tasks: the answers are physically right ---------------------------------------

def test_pitch_answer_is_the_dominant_frequency() -> None:
    for q, a, x in examples("pitch"):
        f = peak_freq(x)
        assert nearest_note(f) == a, (q, a, f)
        assert abs(12 * np.log2(f / note_freq(a))) < 0.3  # detune ≤ 15 cents (+ FFT bin)


def test_beats_answer_is_the_number_of_onsets() -> None:
    for _, a, x in examples("beats"):
        assert count_onsets(x) == int(a), a


def _direction(x: np.ndarray) -> str:
    """Compare the FFT peaks of the first and last quarter of the sounding part."""
    sound = active(x)
    q = len(sound) // 4
    ratio = peak_freq(sound[-q:]) / peak_freq(sound[:q])
    return "up" if ratio > 1.1 else "down" if ratio < 1 / 1.1 else "flat"


def test_sweep_answers_match_direction_and_loudness() -> None:
    rms: dict[str, list[float]] = {"loud": [], "soft": []}
    for q, a, x in examples("sweep"):
        if q == "does the pitch go up or down":
            assert _direction(x) == a, a
        else:
            rms[a].append(max_frame_rms(x))
    assert min(rms["loud"]) > 0.2 > max(rms["soft"]), (min(rms["loud"]), max(rms["soft"]))


def test_pretrain_audio_primitives(pretrain_audio: list[tuple[str, str, np.ndarray]]) -> None:
    counts = Counter(q for q, _, _ in pretrain_audio)
    assert set(counts) == {"is the tone high or low", "is there a sound",
                           "are there more than three beeps"}
    assert 0.2 < len(pretrain_audio) / PRETRAIN_N < 0.3  # audio ≈ 25% of the pretraining mix
    task_questions = {q for t in ANSWERS for q, _, _ in examples(t, 40)}
    assert not set(counts) & task_questions
    sound_rms: dict[str, list[float]] = {"yes": [], "no": []}
    for q, a, x in pretrain_audio:
        if q == "is the tone high or low":
            assert ("high" if peak_freq(x) > 440 else "low") == a
        elif q == "is there a sound":
            sound_rms[a].append(max_frame_rms(x))
        else:
            assert ("yes" if count_onsets(x) > 3 else "no") == a
    assert min(sound_rms["yes"]) > 2 * max(sound_rms["no"])


def test_spaced_onsets_fit_and_keep_gaps() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = [int(v) for v in rng.integers(800, 1440, size=int(rng.integers(1, 7)))]
        onsets = spaced_onsets(rng, lengths, MAX_T, 640, 320)
        assert onsets[0] >= 320 and onsets[-1] + lengths[-1] <= MAX_T - 320
        for i in range(1, len(onsets)):
            assert onsets[i] - (onsets[i - 1] + lengths[i - 1]) >= 640
    with pytest.raises(ValueError, match=r"more than the clip's 1000"):
        spaced_onsets(rng, [600, 600], 1000, 10, 0)


# --- the generated benchmark -----------------------------------------------------------------

def tiny(tmp_path: Path, **kw: object) -> DataConfig:
    base = DataConfig(tasks=("pitch",), train_per_task=8, test_per_task=4, pretrain_size=40,
                      cache_dir=str(tmp_path / "cache"))
    return replace(base, **kw)  # type: ignore[arg-type]


def test_generated_benchmark_writes_wav_files(tmp_path: Path) -> None:
    root = ensure_benchmark(tiny(tmp_path))
    stream = json.loads((root / "stream.json").read_text())
    assert stream["generator_version"] == GENERATOR_VERSION == "4"
    assert stream["audio_rate"] == AUDIO_RATE
    assert stream["task_info"]["pitch"]["modalities"] == ["audio", "text"]
    (spec,) = load_stream(root / STREAM_TOML, None).tasks
    assert spec.name == "pitch" and spec.modalities == ("audio", "text")
    wavs = sorted((root / "pitch" / "audio").glob("*.wav"))
    assert [p.name for p in wavs][:2] == ["pitch-test-00000.wav", "pitch-test-00001.wav"]
    assert len(wavs) == 12 and not (root / "pitch" / "images").exists()
    data = open_task(spec)
    assert set(data.modalities()) == {"audio", "text"} and data.skipped == 0
    assert (len(data.train), len(data.test)) == (8, 4)
    samples: list[Sample] = [*data.train, *data.test]
    assert sorted({r.audio for r in data.train.records + data.test.records}) == wavs
    for s in samples:
        assert s.image is None and s.audio is not None and s.audio_rate == AUDIO_RATE
        assert s.audio.dtype == np.float32 and 0 < len(s.audio) <= MAX_T
        assert s.answer in NOTES
    kinds = Counter("audio" if s.audio is not None else "image" if s.image is not None else "text"
                    for s in TaskSamples.read("pretrain", root / PRETRAIN_FILE))
    assert set(kinds) == {"audio", "image", "text"}, kinds
    assert (root / "pretrain" / "audio").is_dir() and (root / "pretrain" / "images").is_dir()


@pytest.mark.parametrize("array, pattern", [
    (np.zeros((100, 2), np.float32), r"\(100, 2\) float32"),
    (np.zeros(MAX_T + 1, np.float32), r"\(16001,\) float32"),
    (np.zeros(100, np.float64), r"\(100,\) float64"),
    (np.zeros((16, 16, 3), np.uint8), r"\(16, 16, 3\) uint8.*data\.image-size = 32"),
])
def test_generator_rejects_malformed_arrays_naming_the_task(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, array: np.ndarray, pattern: str) -> None:
    spec = TaskSpec("broken", "test", AUDIO_TEXT, ("exact",),
                    lambda rng, n, split, size: [("q", "a", array)] * n)
    monkeypatch.setitem(TASKS, "broken", spec)
    with pytest.raises(ValueError, match=r"task 'broken'.*'broken-train-00000'.*" + pattern):
        generate_benchmark(tmp_path, tiny(tmp_path, tasks=("broken",), pretrain_size=1))


def test_generator_rejects_audio_from_an_image_task(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TaskSpec("mislabelled", "test", ("image", "text"), ("exact",),
                    lambda rng, n, split, size: [("q", "a", np.zeros(10, np.float32))] * n)
    monkeypatch.setitem(TASKS, "mislabelled", spec)
    with pytest.raises(ValueError, match=r"task 'mislabelled' generated audio.*add 'audio'"):
        generate_benchmark(tmp_path, tiny(tmp_path, tasks=("mislabelled",), pretrain_size=1))
