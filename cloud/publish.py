"""Publishing the global model after each task: export → sign → install into the registry folder.

The ServerApp calls :func:`publish_task` once a task's evaluation round is checkpointed (when
``app.registry-dir`` is set). The bundle (mole/export.py) is written into a hidden
``.incoming-*`` folder inside the registry folder, signed with ``app.signing-key``, and renamed
to ``<registry-dir>/<bundle id>`` in one ``os.replace`` — the registry process (cloud/registry.py)
re-scans its folder and verifies each signature before it lists a bundle, so a half-written or
unsigned folder is never served. Bundle ids are ``<task index>-<task>-r<global round>``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from protocol.config import RunConfig
from protocol.state import GlobalState

log = logging.getLogger(__name__)


def bundle_id(task_index: int, task: str, global_round: int) -> str:
    return f"t{task_index:02d}-{task}-r{global_round:05d}"


def publish_task(cfg: RunConfig, state: GlobalState, task_index: int, task: str,
                 registry_dir: Path, signing_key: Path) -> Path:
    """Export and install the bundle of ``state`` (the global model after ``task``)."""
    from mole.export import export_bundle, global_model_from_state

    t0 = time.perf_counter()
    registry_dir.mkdir(parents=True, exist_ok=True)
    bid = bundle_id(task_index, task, state.round)
    final = registry_dir / bid
    if final.exists():
        log.info("bundle %s is already published", bid)
        return final
    work = registry_dir / f".incoming-{bid}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        gm = global_model_from_state(cfg, state, Path(cfg.model.base_path), "the cloud state")
        export_bundle(gm, work, signing_key, bundle_id=bid)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("published bundle %s in %.1f s", final, time.perf_counter() - t0)
    return final
