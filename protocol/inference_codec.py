"""Inference requests on the wire (protocol/proto/inference.proto) ↔ ``Sample`` objects.

``decode_request`` is the one gate every request passes before it reaches a model: it checks
the batch size, the payload size, each input's text and each media array against the model's
:class:`InputLimits` and raises :class:`InputError` (a ``ValueError``) naming the input, the
offending value and what to send instead. The service answers that as INVALID_ARGUMENT.
Nothing here trusts a length or a shape it was sent: the byte count must equal
prod(shape) × itemsize before a single byte is reinterpreted.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocol.manifest import Sample
from protocol.proto import inference_pb2

MODALITIES = ("image", "audio")
_DTYPES: dict[str, np.dtype] = {"image": np.dtype(np.uint8), "audio": np.dtype("<f4")}


class InputError(ValueError):
    """A request the model cannot take; the message names the value and what to do."""


@dataclass(frozen=True)
class InputLimits:
    image_size: int  # 0: any (H, W, 3) — the bundle's own image processor resizes it
    audio_rate: int | None  # None: the model has no audio tower
    max_audio_samples: int
    max_batch: int = 64
    max_request_bytes: int = 16 << 20
    max_text_chars: int = 2000
    max_new_tokens: int = 64

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "audio") if self.audio_rate is not None else ("image",)


def _media(inp: inference_pb2.Input, i: int, kind: str, limits: InputLimits) -> np.ndarray:
    m = inp.media[kind]
    where = f"input {i} ({inp.id or 'no id'}) {kind}"
    want = _DTYPES[kind]
    if m.dtype != want.name:
        raise InputError(f"{where}: dtype {m.dtype!r}; send {want.name} "
                         f"({'(H, W, 3) pixels' if kind == 'image' else 'mono samples in [-1, 1]'})")
    shape = tuple(int(d) for d in m.shape)
    if kind == "image" and not limits.image_size:
        if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
            raise InputError(f"{where}: shape {shape}; send (H, W, 3) uint8 RGB pixels")
    elif kind == "image":
        expect = (limits.image_size, limits.image_size, 3)
        if shape != expect:
            raise InputError(f"{where}: shape {shape}; the model takes {expect} uint8: resize the "
                             f"image to {limits.image_size}×{limits.image_size} RGB")
    else:
        if len(shape) != 1 or shape[0] < 1:
            raise InputError(f"{where}: shape {shape}; send one mono channel, shape (T,) with T ≥ 1")
        if shape[0] > limits.max_audio_samples:
            raise InputError(f"{where}: {shape[0]} samples, over the model's window of "
                             f"{limits.max_audio_samples}: cut the clip")
        assert limits.audio_rate is not None
        if m.sample_rate not in (0, limits.audio_rate):
            raise InputError(f"{where}: sample rate {m.sample_rate} Hz; the model takes "
                             f"{limits.audio_rate} Hz: resample the clip")
    n = int(np.prod(shape)) * want.itemsize
    if len(m.data) != n:
        raise InputError(f"{where}: {len(m.data)} bytes of data for shape {shape} {want.name} "
                         f"(needs {n}); send the array's raw row-major bytes")
    arr = np.frombuffer(m.data, dtype=want).reshape(shape).copy()
    if kind == "audio" and not np.isfinite(arr).all():
        raise InputError(f"{where}: the clip has NaN or infinite samples")
    return arr


def decode_request(req: inference_pb2.PredictRequest, limits: InputLimits
                   ) -> tuple[list[Sample], int]:
    """(samples in request order, max_new_tokens (0 → the model's default)), or InputError."""
    size = req.ByteSize()
    if size > limits.max_request_bytes:
        raise InputError(f"request is {size} bytes, over the limit of {limits.max_request_bytes}: "
                         "send fewer inputs per request")
    n = len(req.inputs)
    if n == 0:
        raise InputError("request has no inputs; send at least one Input")
    if n > limits.max_batch:
        raise InputError(f"request has {n} inputs, over max_batch {limits.max_batch}: split it")
    if req.max_new_tokens > limits.max_new_tokens:
        raise InputError(f"max_new_tokens {req.max_new_tokens} is over the limit of "
                         f"{limits.max_new_tokens}")
    samples = []
    for i, inp in enumerate(req.inputs):
        if not inp.text.strip():
            raise InputError(f"input {i} ({inp.id or 'no id'}): empty text; send the instruction")
        if len(inp.text) > limits.max_text_chars:
            raise InputError(f"input {i}: text of {len(inp.text)} characters, over "
                             f"{limits.max_text_chars}")
        unknown = sorted(set(inp.media) - set(limits.modalities))
        if unknown:
            raise InputError(f"input {i} ({inp.id or 'no id'}): unknown modality "
                             f"{', '.join(map(repr, unknown))}; this model takes "
                             f"{', '.join(limits.modalities)} (and text)")
        image = _media(inp, i, "image", limits) if "image" in inp.media else None
        audio = _media(inp, i, "audio", limits) if "audio" in inp.media else None
        # A fresh id: feature memos are keyed by (task, id), and request ids are not unique.
        samples.append(Sample(id=f"req-{uuid.uuid4().hex}", task="", instruction=inp.text,
                              answer="", image=image, audio=audio,
                              audio_rate=limits.audio_rate if audio is not None else None))
    return samples, int(req.max_new_tokens)


def encode_input(text: str, image: np.ndarray | None = None, audio: np.ndarray | None = None,
                 audio_rate: int = 0, id: str = "") -> inference_pb2.Input:
    """A client's side: arrays → an Input message (raw row-major bytes)."""
    inp = inference_pb2.Input(id=id, text=text)
    if image is not None:
        a = np.ascontiguousarray(image)
        inp.media["image"].CopyFrom(inference_pb2.Media(shape=list(a.shape), dtype=a.dtype.name,
                                                        data=a.tobytes()))
    if audio is not None:
        a = np.ascontiguousarray(audio, dtype="<f4")
        inp.media["audio"].CopyFrom(inference_pb2.Media(shape=list(a.shape), dtype="float32",
                                                        data=a.tobytes(), sample_rate=audio_rate))
    return inp


def encode_request(inputs: Sequence[inference_pb2.Input], max_new_tokens: int = 0
                   ) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(inputs=list(inputs), max_new_tokens=max_new_tokens)
