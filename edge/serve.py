"""The edge inference service: gRPC ``fedmole.v1.Inference`` over a verified bundle in onnxruntime.

``fedmole serve --bundle DIR --port N --trusted-key PUB`` (or ``python -m edge.serve …``).

* **Requests** are decoded by protocol.inference_codec (shape, dtype, size, text, modality
  checks); a bad one is answered INVALID_ARGUMENT with the codec's message and nothing else
  happens. Many requests run at once (a thread pool; onnxruntime sessions are thread-safe).
* **Hot swap**: :meth:`ModelHolder.swap` verifies a new bundle (Ed25519 signature and every
  file's sha256, protocol.bundle), loads it, and runs a smoke check — a batch with one input per
  modality through routing, prefill and decoding — before it replaces the served model with one
  reference assignment. A request takes the current model once, at its start, and finishes on
  it, so in-flight requests never fail across a swap; the old sessions are freed when the last
  of them ends. A bundle that fails any step is refused, logged, and the old one keeps serving.
* **Updates** come from a bundle registry (``--registry HOST:PORT``, cloud/registry.py): a
  watcher thread follows WatchBundles, downloads each newer bundle (resumably, verified) into
  ``--bundles-dir`` and swaps. It reconnects with back-off when the registry goes away.
* **Health**: the standard grpc.health.v1 service reports SERVING once a model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge.ort_runtime import OrtModel
from mole.export import PRECISIONS
from protocol.bundle import BundleError, verify_bundle
from protocol.inference_codec import InputError, InputLimits, decode_request
from protocol.manifest import Sample
from protocol.proto import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "fedmole.v1.Inference"
DEFAULT_PORT = 50051
TRANSPORT_LIMIT = 64 << 20  # gRPC's own cap, above the codec's: oversize → INVALID_ARGUMENT


@dataclass(frozen=True)
class Served:
    model: OrtModel
    bundle_id: str
    global_round: int
    limits: InputLimits


def limits_for(model: OrtModel, max_batch: int, max_request_bytes: int) -> InputLimits:
    s = model.spec
    audio = model.audio
    return InputLimits(
        # a checkpoint's processor resizes any image itself (0: any size)
        image_size=0 if model.resizes_images else s.image_size,
        audio_rate=None if audio is None else audio.rate,
        max_audio_samples=0 if audio is None else audio.max_samples, max_batch=max_batch,
        max_request_bytes=max_request_bytes)


def smoke_samples(model: OrtModel) -> list[Sample]:
    """One input per modality the model takes: text, image + text, audio + text."""
    s = model.spec
    rng = np.random.default_rng(0)
    out = [Sample("smoke-text", "", "what is 1 plus 2", ""),
           Sample("smoke-image", "", "what color is the shape", "",
                  image=rng.integers(0, 256, (s.image_size, s.image_size, 3), dtype=np.uint8))]
    if model.audio is not None:
        n = model.audio.max_samples // 2
        out.append(Sample("smoke-audio", "", "which note is played", "",
                          audio=(0.3 * np.sin(np.arange(n) / 8.0)).astype(np.float32)))
    return out


class NoModel(RuntimeError):
    """No bundle has been loaded yet (UNAVAILABLE to clients)."""


class ModelHolder:
    """The served model; replaced whole, only after verification and a smoke check."""

    def __init__(self, trusted_key: Path | None, precision: str = "int8", threads: int = 1,
                 max_batch: int = 64, max_request_bytes: int = 16 << 20):
        self.trusted_key = trusted_key
        self.precision = precision
        self.threads = threads
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self._current: Served | None = None
        self._swap_lock = threading.Lock()  # one swap at a time; requests never take it
        self.swaps = 0
        self.refused = 0
        self.on_swap: Callable[[], None] | None = None  # e.g. report SERVING on the first one

    @property
    def current(self) -> Served:
        served = self._current
        if served is None:
            raise NoModel("no bundle loaded yet: the service is waiting for the registry's first "
                          "bundle; retry later")
        return served

    @property
    def current_id(self) -> str:
        return "" if self._current is None else self._current.bundle_id

    def load(self, folder: Path) -> Served:
        """Verify, load and smoke-check ``folder`` (raises; serves nothing by itself)."""
        if self.trusted_key is not None:
            manifest = verify_bundle(folder, self.trusted_key)
        else:
            from protocol.bundle import read_manifest

            manifest = read_manifest(folder)
            log.warning("serving %s without signature verification (no trusted key given)", folder)
        model = OrtModel(folder, self.precision, threads=self.threads)
        smoke = smoke_samples(model)
        answers = model.answer(smoke, max_new_tokens=2)
        if len(answers) != len(smoke) or not all(isinstance(a.answer, str) for a in answers):
            raise BundleError(f"bundle {str(folder)!r} failed its smoke check: "
                              f"{len(answers)} answers")
        return Served(model, manifest.bundle_id, manifest.global_round,
                      limits_for(model, self.max_batch, self.max_request_bytes))

    def swap(self, folder: Path) -> bool:
        """Serve ``folder`` if it verifies and passes the smoke check; else keep the old one."""
        with self._swap_lock:
            old = self._current
            try:
                new = self.load(folder)
            except Exception as e:  # any failure (bad signature, hash, ONNX, smoke) → refuse
                self.refused += 1
                log.error("refused bundle %s: %s; still serving %s", folder, e,
                          old.bundle_id if old else "nothing")
                return False
            if old is not None and new.global_round < old.global_round:
                self.refused += 1
                log.error("refused bundle %s: round %d is older than the served %s (round %d)",
                          new.bundle_id, new.global_round, old.bundle_id, old.global_round)
                return False
            self._current = new  # one reference assignment: requests see old or new, whole
            self.swaps += 1
            if self.on_swap is not None:
                self.on_swap()
            log.info("now serving bundle %s (round %d)", new.bundle_id, new.global_round)
            return True


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not the message the method takes (kept to answer with)."""

    message: str
    error: str


def _lenient(message_cls):
    """A request deserializer that never raises: bytes that do not parse become
    :class:`Undecodable`, so the method answers INVALID_ARGUMENT instead of gRPC's own
    ``INTERNAL: Exception deserializing request!``."""
    def parse(raw: bytes):
        try:
            return message_cls.FromString(raw)
        except Exception as e:  # protobuf's DecodeError, and whatever a C++ parser raises
            return Undecodable(message_cls.DESCRIPTOR.full_name, f"{type(e).__name__}: {e}")
    return parse


def add_inference_servicer(servicer: InferenceServicer, server: grpc.Server) -> None:
    """``add_InferenceServicer_to_server`` with lenient request parsing (same method names)."""
    pb = inference_pb2
    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(
            servicer.Predict, request_deserializer=_lenient(pb.PredictRequest),
            response_serializer=pb.PredictResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_lenient(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _refuse_undecodable(request: object, context: grpc.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request bytes are not a valid {request.message} ({request.error}); "
                      "build it with the stubs in protocol/proto")


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, holder: ModelHolder):
        self.holder = holder

    def _served(self, context: grpc.ServicerContext) -> Served:
        try:
            return self.holder.current  # taken once: a swap mid-request does not affect it
        except NoModel as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            raise

    def Predict(self, request: inference_pb2.PredictRequest, context: grpc.ServicerContext
                ) -> inference_pb2.PredictResponse:
        _refuse_undecodable(request, context)
        served = self._served(context)
        try:
            samples, max_new = decode_request(request, served.limits)
            answers = served.model.answer(samples, max_new_tokens=max_new or None)
        except (InputError, ValueError) as e:  # the encoder's checks (e.g. too many tokens) too
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort raises; this keeps type checkers informed
        except Exception as e:  # the server stays up; the client learns what happened
            log.exception("predict failed")
            context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {type(e).__name__}: {e}")
            raise
        return inference_pb2.PredictResponse(
            predictions=[inference_pb2.Prediction(id=inp.id, answer=a.answer, route=a.route or "")
                         for inp, a in zip(request.inputs, answers, strict=True)],
            bundle_id=served.bundle_id, global_round=served.global_round)

    def GetModelInfo(self, request: inference_pb2.ModelInfoRequest, context: grpc.ServicerContext
                     ) -> inference_pb2.ModelInfo:
        _refuse_undecodable(request, context)
        served = self._served(context)
        m, lim = served.model, served.limits
        return inference_pb2.ModelInfo(
            bundle_id=served.bundle_id, global_round=served.global_round, tasks=m.tasks,
            modalities=["text", *lim.modalities], image_size=lim.image_size,
            audio_sample_rate=lim.audio_rate or 0, max_audio_samples=lim.max_audio_samples,
            max_batch=lim.max_batch, max_text_tokens=m.enc.max_length, precision=m.precision,
            versions={k: str(v) for k, v in m.manifest.get("versions", {}).items()})


@dataclass
class RunningService:
    server: grpc.Server
    port: int
    holder: ModelHolder
    health: health.HealthServicer
    watcher: BundleWatcher | None = None

    def mark_serving(self) -> None:
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 2.0) -> None:
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.watcher is not None:
            self.watcher.stop()
        self.server.stop(grace).wait()


def start_service(bundle: Path | None, trusted_key: Path | None, host: str = "127.0.0.1",
                  port: int = 0, precision: str = "int8", workers: int = 8, threads: int = 1,
                  max_batch: int = 64, max_request_bytes: int = 16 << 20) -> RunningService:
    """Load ``bundle`` (refusing it if it does not verify) and serve on host:port (0 → free).
    Without a bundle the service answers UNAVAILABLE until a watcher swaps one in."""
    holder = ModelHolder(trusted_key, precision, threads, max_batch, max_request_bytes)
    if bundle is not None and not holder.swap(Path(bundle)):
        raise BundleError(f"cannot serve bundle {str(bundle)!r}: it failed verification or its "
                          "smoke check (see the log); pass a bundle signed by the trusted key")
    opts = [("grpc.max_receive_message_length", TRANSPORT_LIMIT),
            ("grpc.max_send_message_length", TRANSPORT_LIMIT), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=opts)
    add_inference_servicer(InferenceServicer(holder), server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the inference service to {host}:{port}: the port is in use "
                      "or the address is not local; pick another --port")
    server.start()
    svc = RunningService(server, bound, holder, hs)
    holder.on_swap = svc.mark_serving
    if holder.current_id:
        svc.mark_serving()
    log.info("inference service on %s:%d serving %s", host, bound,
             holder.current_id or "nothing yet (waiting for a bundle)")
    return svc


class BundleWatcher:
    """Follows a registry's WatchBundles; downloads, verifies and swaps in each newer bundle."""

    def __init__(self, holder: ModelHolder, registry: str, bundles_dir: Path, trusted_key: Path,
                 retry_s: float = 2.0):
        self.holder, self.registry, self.dir, self.key = holder, registry, bundles_dir, trusted_key
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._watch: Any = None
        self.thread = threading.Thread(target=self._run, name="bundle-watcher", daemon=True)

    def start(self) -> BundleWatcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.cancel()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        from edge.bundle_client import RegistryClient

        while not self._stop.is_set():
            try:
                with RegistryClient(self.registry) as client:
                    # From the latest: the served bundle may have come from a local folder.
                    self._watch = client.watch(after="")
                    for info in self._watch:
                        if self._stop.is_set():
                            return
                        if info.bundle_id == self.holder.current_id:
                            continue
                        folder = client.download(info.bundle_id, self.dir, self.key)
                        self.holder.swap(folder)
            except Exception as e:  # registry down, download cut, bad bundle: retry later
                if not self._stop.is_set():
                    log.warning("bundle watch on %s: %s; retrying in %.0f s", self.registry, e,
                                self.retry_s)
            self._stop.wait(self.retry_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help="bundle folder to serve first (optional with --registry: wait for one)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--trusted-key", type=Path, default=Path("keys/bundle.pub"),
                    help="Ed25519 public key bundles must be signed with")
    ap.add_argument("--precision", choices=PRECISIONS, default="int8")
    ap.add_argument("--registry", default="", help="HOST:PORT of a bundle registry to follow")
    ap.add_argument("--bundles-dir", type=Path, default=Path("bundles"),
                    help="where bundles from the registry are downloaded")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per request")
    args = ap.parse_args(argv)
    # A long-running service logs its swaps and refusals (force: the fedmole CLI set WARNING).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        force=True)
    if args.bundle is None and not args.registry:
        ap.error("pass --bundle DIR, or --registry HOST:PORT to serve the registry's bundles")
    if not args.trusted_key.is_file():
        ap.error(f"--trusted-key {args.trusted_key} does not exist; pass the public key the cloud "
                 "signs bundles with (fedmole keys writes one)")
    svc = start_service(args.bundle, args.trusted_key, args.host, args.port, args.precision,
                        args.workers, args.threads)
    if args.registry:
        svc.watcher = BundleWatcher(svc.holder, args.registry, args.bundles_dir,
                                    args.trusted_key).start()
    print(f"serving {svc.holder.current_id or '(waiting for a bundle)'} on {args.host}:{svc.port}",
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
