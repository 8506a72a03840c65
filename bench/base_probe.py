"""Bench: how far apart pretraining seeds leave the base, per template, on a probe large enough to tell.

A base records its held-out exact match on ``data.pretrain-heldout`` samples (default 800: 100
per template). At 100 samples the binomial standard error of an accuracy near 50% is 5 points
(95% interval ±10), so the per-template spread between bases that the base issue bounds (≤ 3
points) cannot be seen there: two equal bases differ by more than that one time in two. This
bench pretrains (or finds cached) the bases of the pretraining seeds ``--seeds`` under the
default config and scores each on a fresh **probe** of ``--per-template`` samples per template —
made by the held-out generator from another seed, never trained on — and reports per template
each base's accuracy with its 95% (Wilson) interval, and the spread (max − min) over bases.

    .venv/bin/python bench/base_probe.py --out runs/bench/base_probe.json [--seeds 0,1,2]

Targets: spread ≤ 3 points on every template (the base issue's bar).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import finish  # noqa: E402
from protocol.manifest import Sample  # noqa: E402

PROBE_SEED = 7_919  # not a data seed: the probe shares no stream with the training data


def probe_samples(per_template: int, image_size: int) -> list[Sample]:
    from simulation.benchmark.generate import AUDIO_RATE
    from simulation.benchmark.tasks import PRETRAIN_HELDOUT, PRETRAIN_TEMPLATES

    rng = np.random.default_rng(PROBE_SEED)
    n = per_template * len(PRETRAIN_TEMPLATES)  # balanced: template i gets every 8th sample
    out = []
    for i, (instruction, answer, array) in enumerate(PRETRAIN_HELDOUT.generate(rng, n, "test",
                                                                             image_size)):
        image = array if array is not None and array.ndim == 3 else None
        audio = array if array is not None and array.ndim == 1 else None
        out.append(Sample(f"probe-{i:05d}", "pretrain", instruction, answer, image=image,
                          audio=audio, audio_rate=AUDIO_RATE if audio is not None else None))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion (percent)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2", help="pretraining seeds (pretrain.seed)")
    ap.add_argument("--per-template", type=int, default=500)
    ap.add_argument("--config", type=Path, default=ROOT / "conf" / "default.toml")
    args = ap.parse_args()
    from mole.backbone import load_backbone, read_base_info
    from mole.batching import Encoder
    from protocol.config import load_config
    from simulation.base import ensure_base, heldout_accuracy
    from simulation.benchmark.tasks import pretrain_template

    base_cfg = load_config(args.config)
    samples = probe_samples(args.per_template, base_cfg.data.image_size)
    counts = {t: 0 for t in {pretrain_template(s.instruction) for s in samples}}
    for s in samples:
        counts[pretrain_template(s.instruction)] += 1
    bases: dict[str, Any] = {}
    for seed in (int(x) for x in args.seeds.split(",")):
        cfg = dataclasses.replace(base_cfg, pretrain=dataclasses.replace(base_cfg.pretrain, seed=seed))
        t0 = time.perf_counter()
        path = ensure_base(cfg, None, progress=False)
        model, tok = load_backbone(path)
        enc = Encoder.for_any(tok, model, cfg.model.max_length)
        acc = heldout_accuracy(model, enc, samples, cfg.train.eval_batch_size,
                               cfg.train.max_new_tokens)
        info = read_base_info(path)
        bases[str(seed)] = {
            "weights_sha256": info.get("weights_sha256"), "heldout": info.get("heldout"),
            "probe": acc,
            "probe_interval": {t: wilson(round(a * counts[t] / 100), counts[t]) for t, a in acc.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(seed, acc, flush=True)
    templates = sorted(counts)
    spread = {t: max(b["probe"][t] for b in bases.values()) - min(b["probe"][t] for b in bases.values())
              for t in templates}
    res = {"config": str(args.config), "per_template": counts, "probe_seed": PROBE_SEED,
           "bases": bases, "spread": spread,
           "heldout_spread": {t: max(b["heldout"][t] for b in bases.values())
                              - min(b["heldout"][t] for b in bases.values()) for t in templates}}
    print("spread over bases (points):", spread, flush=True)
    # one base has no spread to speak of: a miss, not a pass
    finish(res, args.out, {f"spread_{t}": (round(spread[t], 1) if len(bases) > 1 else None, "<=", 3.0)
                           for t in templates})


if __name__ == "__main__":
    main()
