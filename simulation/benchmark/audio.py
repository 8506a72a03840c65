"""Synthesising the benchmark's audio: tones, beeps, sweeps and noise as float32 waveforms.

Every clip is mono float32 at :data:`AUDIO_RATE` Hz and at most :data:`MAX_SECONDS` long (the
model pads or cuts to one second). Each sound event gets a raised-cosine fade in and out so it
starts and ends without a click (a click is broadband and would smear the spectrum the tasks are
about); the whole clip gets light background noise of a random level and a random gain, and its
peak never exceeds :data:`PEAK` so the 16-bit ``.wav`` files never clip.

Tones are a fundamental plus two weaker harmonics with random amplitudes and phases: not a bare
sine (the timbre varies from clip to clip) but the fundamental always dominates the spectrum, so
"which pitch" stays well defined. Everything draws from the ``np.random.Generator`` it is
given, so a clip depends only on that stream.
"""

from __future__ import annotations

import numpy as np

AUDIO_RATE = 16000  # Hz; the model's audio-sample-rate
MAX_SECONDS = 1.0  # the model's audio-seconds: every clip is at most this long
MAX_SAMPLES = int(AUDIO_RATE * MAX_SECONDS)  # 16000
PEAK = 0.9  # no clip's |sample| exceeds this
NOISE_STD = (0.002, 0.012)  # background noise level, drawn uniformly per clip
GAIN = (0.25, 0.9)  # default peak of the sound (before noise), drawn uniformly per clip
HARMONICS = ((0.15, 0.5), (0.05, 0.25))  # amplitude ranges of the 2nd and 3rd partials
TONE_FADE_S = 0.01  # fade of a tone or sweep
BEEP_FADE_S = 0.005  # fade of a beep (a beep is only 50–90 ms)
CLIP_FADE_S = 0.005  # fade of the whole clip, noise included

NOTES: tuple[str, ...] = ("c", "d", "e", "f", "g", "a", "b")
_SEMITONES_FROM_A4 = {"c": -9, "d": -7, "e": -5, "f": -4, "g": -2, "a": 0, "b": 2}


def note_freq(note: str, octave: int = 4, cents: float = 0.0) -> float:
    """Equal-temperament frequency in Hz of ``note`` (c … b) in ``octave``, A4 = 440 Hz."""
    if note not in _SEMITONES_FROM_A4:
        raise ValueError(f"unknown note {note!r}; known notes: {', '.join(NOTES)}")
    semis = _SEMITONES_FROM_A4[note] + 12 * (octave - 4) + cents / 100.0
    return 440.0 * 2.0 ** (semis / 12.0)


def samples(seconds: float) -> int:
    """Number of samples in ``seconds`` at AUDIO_RATE (rounded)."""
    return int(round(seconds * AUDIO_RATE))


def fade(n: int, fade_s: float) -> np.ndarray:
    """(n,) envelope: raised-cosine ramps of ``fade_s`` (at most a third of n) at both ends."""
    k = min(samples(fade_s), n // 3)
    env = np.ones(n, dtype=np.float64)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)  # (k,) from ~0 to ~1
        env[:k] = ramp
        env[n - k:] = ramp[::-1]
    return env


def _partials(rng: np.random.Generator, phase: np.ndarray) -> np.ndarray:
    """Fundamental + two weaker harmonics of the phase track ``phase`` (n,), random timbre."""
    out = np.sin(phase + rng.uniform(0, 2 * np.pi))
    for k, (lo, hi) in enumerate(HARMONICS, start=2):
        out += rng.uniform(lo, hi) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def tone(rng: np.random.Generator, freq: float, seconds: float,
         fade_s: float = TONE_FADE_S) -> np.ndarray:
    """A steady tone at ``freq`` Hz with harmonics, faded, peak-normalised → float64 (n,)."""
    n = samples(seconds)
    phase = 2 * np.pi * freq * np.arange(n) / AUDIO_RATE  # (n,)
    return _normalise(_partials(rng, phase) * fade(n, fade_s))


def sweep(rng: np.random.Generator, f_start: float, f_end: float, seconds: float,
          fade_s: float = TONE_FADE_S) -> np.ndarray:
    """A tone gliding exponentially from ``f_start`` to ``f_end`` Hz → float64 (n,), peak 1.

    Exponential so the glide is even on the (log-like) pitch/mel scale the model hears; the
    phase is the integral of the instantaneous frequency, so the glide has no discontinuities.
    """
    n = samples(seconds)
    t = np.arange(n) / AUDIO_RATE  # (n,)
    if np.isclose(f_start, f_end):
        phase = 2 * np.pi * f_start * t
    else:
        k = np.log(f_end / f_start) / seconds  # f(t) = f_start · e^{k t}
        phase = 2 * np.pi * f_start * np.expm1(k * t) / k
    return _normalise(_partials(rng, phase) * fade(n, fade_s))


def _normalise(x: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return x / peak if peak > 0 else x


def spaced_onsets(rng: np.random.Generator, lengths: list[int], total: int, min_gap: int,
                  margin: int) -> list[int]:
    """Random sorted onsets for segments of ``lengths`` samples in ``total`` samples.

    Segments keep ``min_gap`` samples between them and ``margin`` samples from both clip edges.
    The free time is split at uniformly random points, so every valid arrangement can occur and
    placement never needs retries.
    """
    need = sum(lengths) + min_gap * (len(lengths) - 1) + 2 * margin
    slack = total - need
    if slack < 0:
        raise ValueError(f"segments of {lengths} samples with gaps of {min_gap} and margins of "
                         f"{margin} need {need} samples, more than the clip's {total}; "
                         "use fewer or shorter segments")
    cuts = np.sort(rng.integers(0, slack + 1, size=len(lengths)))  # extra space before each
    onsets, pos, prev = [], margin, 0
    for length, cut in zip(lengths, cuts, strict=True):
        pos += int(cut) - prev
        prev = int(cut)
        onsets.append(pos)
        pos += length + min_gap
    return onsets


def beeps(rng: np.random.Generator, count: int, freq: float, total: int,
          seconds: tuple[float, float] = (0.05, 0.09), min_gap_s: float = 0.04,
          margin_s: float = 0.02) -> tuple[np.ndarray, list[int]]:
    """``count`` short tones at ``freq`` Hz at random non-overlapping times in ``total`` samples.

    Returns (signal float64 (total,) with peak 1, onsets in samples). Each beep has its own
    length (``seconds`` range) and a level of 0.7–1.0, so beeps are not copies of one another.
    """
    lengths = [samples(float(rng.uniform(*seconds))) for _ in range(count)]
    onsets = spaced_onsets(rng, lengths, total, samples(min_gap_s), samples(margin_s))
    out = np.zeros(total, dtype=np.float64)
    for onset, length in zip(onsets, lengths, strict=True):
        out[onset:onset + length] += rng.uniform(0.7, 1.0) * tone(rng, freq, length / AUDIO_RATE,
                                                                   BEEP_FADE_S)
    return _normalise(out), onsets


def place(sound: np.ndarray, onset: int, total: int) -> np.ndarray:
    """``sound`` (n,) at sample ``onset`` of a silent (total,) clip."""
    if onset < 0 or onset + len(sound) > total:
        raise ValueError(f"a sound of {len(sound)} samples at onset {onset} does not fit in a clip "
                         f"of {total} samples; shorten it or move it earlier")
    out = np.zeros(total, dtype=np.float64)
    out[onset:onset + len(sound)] = sound
    return out


def finish(rng: np.random.Generator, signal: np.ndarray,
           gain: tuple[float, float] = GAIN) -> np.ndarray:
    """Scale ``signal`` (n,) to a random peak in ``gain``, add light noise → float32 (n,).

    The noise level is drawn from NOISE_STD; the clip is faded at both ends and, should signal
    plus noise exceed PEAK, scaled down to it (no hard clipping).
    """
    n = len(signal)
    if not 0 < n <= MAX_SAMPLES:
        raise ValueError(f"a clip must have 1 to {MAX_SAMPLES} samples ({MAX_SECONDS} s at "
                         f"{AUDIO_RATE} Hz), got {n}; shorten the sound")
    x = _normalise(np.asarray(signal, dtype=np.float64)) * rng.uniform(*gain)
    x = x + rng.normal(0.0, rng.uniform(*NOISE_STD), size=n)
    x *= fade(n, CLIP_FADE_S)
    peak = float(np.max(np.abs(x)))
    if peak > PEAK:
        x *= PEAK / peak
    return x.astype(np.float32)


def noise_only(rng: np.random.Generator, n: int) -> np.ndarray:
    """A clip of ``n`` samples with background noise and nothing else → float32 (n,)."""
    return finish(rng, np.zeros(n), gain=(0.0, 0.0))
