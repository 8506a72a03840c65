from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Media(_message.Message):
    __slots__ = ("shape", "dtype", "data", "sample_rate")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    sample_rate: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("id", "text", "media")
    class MediaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Media
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Media, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    media: _containers.MessageMap[str, Media]
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., media: _Optional[_Mapping[str, Media]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("inputs", "max_new_tokens")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    max_new_tokens: int
    def __init__(self, inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("id", "answer", "route")
    ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    id: str
    answer: str
    route: str
    def __init__(self, id: _Optional[str] = ..., answer: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "bundle_id", "global_round")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    bundle_id: str
    global_round: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., bundle_id: _Optional[str] = ..., global_round: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("bundle_id", "global_round", "tasks", "modalities", "image_size", "audio_sample_rate", "max_audio_samples", "max_batch", "max_text_tokens", "precision", "versions")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIO_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    global_round: int
    tasks: _containers.RepeatedScalarFieldContainer[str]
    modalities: _containers.RepeatedScalarFieldContainer[str]
    image_size: int
    audio_sample_rate: int
    max_audio_samples: int
    max_batch: int
    max_text_tokens: int
    precision: str
    versions: _containers.ScalarMap[str, str]
    def __init__(self, bundle_id: _Optional[str] = ..., global_round: _Optional[int] = ..., tasks: _Optional[_Iterable[str]] = ..., modalities: _Optional[_Iterable[str]] = ..., image_size: _Optional[int] = ..., audio_sample_rate: _Optional[int] = ..., max_audio_samples: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_text_tokens: _Optional[int] = ..., precision: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ...) -> None: ...
