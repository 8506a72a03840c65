"""The one training loop and the one evaluation, shared by every runner (centralized, edge).

``train_steps`` optimises whatever parameters currently require grad (the trainable expert, or
the whole base during pretraining) with AdamW and a linear-warmup cosine schedule, drawing each
batch from a callback so callers decide the data mix (current task, replay, union of tasks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mole.batching import Batch, SampleEncoder
from mole.model import MoleModel
from mole.scoring import score_answers
from protocol.llava_format import references_of
from protocol.manifest import Sample


@dataclass(frozen=True)
class TrainStats:
    steps: int
    first_loss: float
    last_loss: float  # mean over the last 10% of steps
    seconds: float
    # AdamW's per-parameter state at the end ({"state": …} of ``Optimizer.state_dict``), only
    # when ``train_steps(keep_state=True)``: what a federated client carries to its next round.
    optimizer_state: dict | None = None


def cosine_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_steps(
    model: MoleModel,
    next_batch: Callable[[int], Batch],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_fraction: float = 0.03,
    desc: str = "train",
    progress: bool = True,
    schedule: Callable[[int], float] | None = None,
    aux_loss: Callable[[Batch], torch.Tensor] | None = None,
    aux_params: Sequence[torch.nn.Parameter] = (),
    optimizer_state: dict | None = None,
    keep_state: bool = False,
) -> TrainStats:
    """``schedule`` (step → lr factor) replaces the default warmup + cosine over ``steps``; a
    federated client passes the slice of its task's schedule that this round covers.
    ``aux_loss`` (batch → scalar) is added to the LM
    loss, and ``aux_params`` (its own head) are trained with the model's parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    params += list(aux_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None:
        # only the moments: the learning rate and its schedule are this call's
        opt.load_state_dict({"state": optimizer_state["state"],
                             "param_groups": opt.state_dict()["param_groups"]})
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, schedule or cosine_schedule(int(warmup_fraction * steps), steps)
    )
    device = model.device
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        batch = next_batch(step).to(device)
        _, loss = model(**batch.model_inputs(), labels=batch.labels)
        assert loss is not None
        if aux_loss is not None:
            loss = loss + aux_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} of {desc}; "
                                     "lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, steps // 10):]
    kept = {"state": opt.state_dict()["state"]} if keep_state else None
    return TrainStats(steps, losses[0], sum(tail) / len(tail), time.perf_counter() - t0, kept)


@torch.no_grad()
def generate_answers(model: MoleModel, enc: SampleEncoder, samples: Sequence[Sample], batch_size: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers, in sample order."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        b = enc.prompt_batch(samples[i: i + batch_size]).to(model.device)
        for ids in model.generate(b.input_ids, b.attention_mask, b.pixel_values, max_new_tokens,
                                  b.input_features, b.extras):
            out.append(enc.decode(ids))
    return out


def evaluate(model: MoleModel, enc: SampleEncoder, samples: Sequence[Sample], metrics: Sequence[str],
             batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """Generate greedy answers and score them (percent per metric)."""
    preds = generate_answers(model, enc, samples, batch_size, max_new_tokens)
    return score_answers(preds, references_of(samples), metrics)
