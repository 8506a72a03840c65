"""The ``federation.*`` section of the run config: clients, participation and the non-IID scenario.

Keys are kebab-case under ``federation.`` (``federation.dirichlet-alpha``,
``federation.no-audio-fraction`` …), defined with every other section in
:mod:`protocol.config` (one config source) and re-exported here; an error names the key, the
rule and the bad value. The scenario built from it (which client holds which modality and
which share of each task) lives in :mod:`simulation.scenario`; the cloud and the edge read only
the participation and round keys.
"""

from __future__ import annotations

from protocol.config import ConfigError, FederationConfig, round_half_up

__all__ = ["ConfigError", "FederationConfig", "round_half_up"]
