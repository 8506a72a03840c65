"""The server-round schedule: one probe round and R training rounds per task."""

from __future__ import annotations

import pytest


def test_round_schedule_covers_every_task_with_probe_train_and_one_evaluation():
    from cloud.schedule import round_plan, total_rounds

    tasks = ["color", "arith", "pitch"]
    plans = [round_plan(r, tasks, 2) for r in range(1, total_rounds(3, 2) + 1)]
    assert [(p.task, p.phase, p.train_round) for p in plans[:3]] == [
        ("color", "probe", 0), ("color", "train", 1), ("color", "train", 2)]
    assert [p.task for p in plans if p.phase == "probe"] == tasks
    assert [p.server_round for p in plans if p.evaluate] == [3, 6, 9]
    with pytest.raises(ValueError, match="outside 1..9"):
        round_plan(10, tasks, 2)
