"""The ``federation.*`` section of the run config: clients, participation and the non-IID scenario.

Keys are kebab-case under ``federation.`` (``federation.dirichlet-alpha``,
``federation.no-audio-fraction`` …), validated like every other section of
:mod:`protocol.config`: an error names the key, the rule and the bad value. The scenario built
from it (which client holds which modality and which share of each task) lives in
:mod:`simulation.scenario`; the cloud and the edge read only the participation and round keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.config import ConfigError, _check

__all__ = ["ConfigError", "FederationConfig", "round_half_up"]


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (Python's ``round`` goes half to even)."""
    return int(math.floor(x + 0.5))


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
    # Probability that a sampled client drops out of a round (no reply).
    dropout: float = 0.0
    rounds_per_task: int = 3
    # Optimiser steps each client takes per round.
    local_steps: int = 25
    seed: int = 0
    # A client gets a task only if its Dirichlet share gives it at least this many training
    # samples; smaller shares are handed to the other eligible clients.
    min_samples: int = 8

    def n_lacking(self, modality: str) -> int:
        """How many clients lack ``modality`` ("image" or "audio"; every client has text)."""
        fractions = {"image": self.no_image_fraction, "audio": self.no_audio_fraction}
        if modality not in fractions:
            raise ValueError(f"only image and audio can be missing on a client, got {modality!r}")
        return round_half_up(fractions[modality] * self.clients)

    def validate(self) -> None:
        _check(self.clients >= 1, "federation.clients", ">= 1", self.clients)
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
        _check(self.seed >= 0, "federation.seed", ">= 0", self.seed)
        _check(self.min_samples >= 1, "federation.min-samples", ">= 1", self.min_samples)
