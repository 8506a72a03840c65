"""D-MoLE allocation (budget, curriculum split, top modules) and the expert plan it accumulates."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from cloud.allocator import (
    AllocationError,
    all_modules_allocation,
    allocate,
    budget_of,
    equal_param_rank,
    split_budget,
    weighted_mean_scores,
)
from protocol.plan import ExpertPlan, PlanError, TaskAllocation


def mmap(vision: int = 8, language: int = 16, audio: int = 0) -> dict[str, str]:
    """Candidate modules named like the real ones (layer index inside), vision first."""
    out: dict[str, str] = {}
    for prefix, mod, n in (("vision_tower", "vision", vision), ("language_model", "language", language),
                           ("audio_tower", "audio", audio)):
        for i in range(n):
            out[f"{prefix}.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj"] = mod
    return out


def scores_by_modality(modality_of: dict[str, str], **per: float) -> dict[str, float]:
    return {m: per[mod] for m, mod in modality_of.items()}


def same(a: TaskAllocation, b: TaskAllocation) -> bool:
    return dataclasses.replace(a, seconds=0.0) == dataclasses.replace(b, seconds=0.0)


# --- budget ----------------------------------------------------------------------------------


def test_budget_for_the_real_default_model():
    """|M| = 4 projections × (2 vision + 4 language + 2 audio layers) = 32 → B = 16 at κ = 0.5."""
    from mole.backbone import build_backbone
    from mole.modality import modality_map
    from mole.tokenizer import build_word_tokenizer
    from protocol.config import RunConfig

    cfg = RunConfig()
    model = build_backbone(cfg.model, build_word_tokenizer(["what color is it"]), cfg.data.image_size)
    modality_of = modality_map(model)
    m = cfg.model
    assert len(modality_of) == 4 * (m.vision_layers + m.text_layers + m.audio_layers) == 32
    assert budget_of(len(modality_of), 0.5) == 16
    alloc = allocate("color", dict.fromkeys(modality_of, 1.0), modality_of)
    assert alloc.budget == len(alloc.modules) == 16
    assert alloc.per_modality == {"audio": 4, "language": 8, "vision": 4}  # π = 8/32, 16/32, 8/32


def test_absent_modality_gets_no_floor():
    """A text-only task sends no gradient into the vision/audio towers: no experts there."""
    mmap = {f"v{i}": V for i in range(4)} | {f"l{i}": L for i in range(8)} | {f"a{i}": A for i in range(4)}
    text_only = {m: (1.0 + int(m[1:]) if mmap[m] == L else 0.0) for m in mmap}
    alloc = allocate("arith", text_only, mmap, kappa=0.5, floor=0.25)
    assert alloc.per_modality == {A: 0, L: 8, V: 0}
    # An image task: audio absent (no floor), vision present keeps its floor ⌊0.25·8⌋ = 2.
    image = {m: (0.0 if mmap[m] == A else 0.01 if mmap[m] == V else 1.0) for m in mmap}
    assert allocate("color", image, mmap, kappa=0.5, floor=0.25).per_modality == {A: 0, L: 6, V: 2}
    # The uniform ablation splits over the modalities in use, not the absent ones.
    assert allocate("color", image, mmap, uniform=True).per_modality == {A: 0, L: 4, V: 4}


@pytest.mark.parametrize("n,kappa,expected", [(24, 0.5, 12), (96, 0.5, 48), (5, 0.5, 3), (3, 0.1, 1),
                                              (10, 1.0, 10), (100, 0.29, 29)])
def test_budget_rounds_half_up_and_is_at_least_one(n, kappa, expected):
    assert budget_of(n, kappa) == expected


# --- the split: hand-computed cases ------------------------------------------------------------

V, L, A = "vision", "language", "audio"


@pytest.mark.parametrize(
    "budget,shares,caps,floor,expected",
    [
        # D-MoLE's two-tower case, no floor binding: round(3.6)=4, round(8.4)=8.
        (12, {V: 0.3, L: 0.7}, {V: 12, L: 12}, 0.25, {V: 4, L: 8}),
        # vision's mass is tiny: the floor ⌊0.25·12⌋ = 3 holds, language gives back the surplus.
        (12, {V: 0.01, L: 0.99}, {V: 12, L: 12}, 0.25, {V: 3, L: 9}),
        # ... and symmetrically language keeps its floor when vision dominates.
        (12, {V: 0.99, L: 0.01}, {V: 12, L: 12}, 0.25, {V: 9, L: 3}),
        # both 2.5 round up to 3 (Σ = 6 > 5); equal surpluses: "language" sorts first and gives one.
        (5, {V: 0.5, L: 0.5}, {V: 5, L: 5}, 0.25, {V: 3, L: 2}),
        # three modalities, exact: targets 2, 5, 3 over floors of 2.
        (10, {A: 0.2, L: 0.5, V: 0.3}, {A: 4, L: 16, V: 8}, 0.25, {A: 2, L: 5, V: 3}),
        # three equal shares: 3.33 → 3 each (Σ = 9); equal deficits: "audio" sorts first and gets one.
        (10, {A: 1 / 3, L: 1 / 3, V: 1 / 3}, {A: 8, L: 8, V: 8}, 0.25, {A: 4, L: 3, V: 3}),
        # vision capped at its 2 candidates; what it could not take goes to language.
        (6, {V: 0.9, L: 0.1}, {V: 2, L: 10}, 0.25, {V: 2, L: 4}),
        # tiny B: the floor ⌊0.25·2⌋ = 0, so audio (target 0.1) gets nothing.
        (2, {A: 0.05, L: 0.6, V: 0.35}, {A: 4, L: 4, V: 4}, 0.25, {A: 0, L: 1, V: 1}),
        # no floor at all: pure rounding of the targets.
        (12, {V: 0.01, L: 0.99}, {V: 12, L: 12}, 0.0, {V: 0, L: 12}),
        # floor larger than a modality's candidates: capped there.
        (16, {V: 0.01, L: 0.99}, {V: 2, L: 30}, 0.25, {V: 2, L: 14}),
        # a modality with no gradient mass is absent from the task: no floor.
        (16, {V: 0.0, L: 1.0}, {V: 2, L: 30}, 0.25, {V: 0, L: 16}),
    ],
)
def test_split_budget_cases(budget, shares, caps, floor, expected):
    assert split_budget(budget, shares, caps, floor) == expected


def test_vision_keeps_a_quarter_even_with_tiny_gradient_mass():
    modality_of = mmap(vision=8, language=16)
    alloc = allocate("count", scores_by_modality(modality_of, vision=1e-6, language=5.0), modality_of)
    assert alloc.budget == 12 and alloc.per_modality == {"language": 9, "vision": 3}
    assert alloc.shares["vision"] < 1e-6 and math.isclose(sum(alloc.shares.values()), 1.0)


def test_sum_is_the_budget_for_many_random_score_vectors():
    rng = random.Random(1234)
    for trial in range(400):
        k = 2 + trial % 2
        counts = {"vision": rng.randint(1, 12), "language": rng.randint(1, 24)}
        if k == 3:
            counts["audio"] = rng.randint(1, 12)
        modality_of = mmap(**counts)
        kappa = rng.choice([0.05, 0.1, 0.25, 0.5, 0.75, 1.0])
        floor = rng.choice([0.0, 0.1, 0.25, 1 / k])
        # scores spanning orders of magnitude, some exactly zero, some ties
        scores = {m: rng.choice([0.0, 1.0, rng.random(), 10 ** rng.uniform(-6, 3)]) for m in modality_of}
        alloc = allocate("t", scores, modality_of, kappa=kappa, floor=floor)
        assert alloc.budget == budget_of(len(modality_of), kappa)
        assert sum(alloc.per_modality.values()) == alloc.budget == len(alloc.modules)
        assert len(set(alloc.modules)) == len(alloc.modules)
        for mod, n in alloc.per_modality.items():
            cands = [m for m in modality_of if modality_of[m] == mod]
            present = alloc.shares[mod] > 0 or not any(alloc.shares.values())
            floor_n = math.floor(floor * alloc.budget + 1e-9) if present else 0
            assert min(len(cands), floor_n) <= n <= len(cands)
            chosen = [m for m in alloc.modules if modality_of[m] == mod]
            assert len(chosen) == n
            rest = [scores[m] for m in cands if m not in chosen]
            if chosen and rest:  # the top-n by score
                assert min(scores[m] for m in chosen) >= max(rest)


# --- determinism ---------------------------------------------------------------------------------


def test_ties_are_broken_by_natural_module_order():
    modality_of = {f"language_model.layers.{i}.self_attn.q_proj": "language" for i in (10, 2, 1, 3)}
    modality_of["vision_tower.layers.0.self_attn.q_proj"] = "vision"
    alloc = allocate("t", dict.fromkeys(modality_of, 1.0), modality_of, kappa=0.6, floor=0.0)
    # B = 3, language gets round(3·4/5) = 2: layers 1 and 2 (not 10, which sorts before 2 as text).
    assert alloc.modules == ("language_model.layers.1.self_attn.q_proj",
                             "language_model.layers.2.self_attn.q_proj",
                             "vision_tower.layers.0.self_attn.q_proj")


def test_permuted_dict_orders_give_the_same_allocation():
    rng = random.Random(7)
    modality_of = mmap(vision=8, language=16, audio=4)
    # few distinct values → many ties inside every modality
    scores = {m: rng.choice([0.5, 1.0, 2.0, 1e-3]) for m in modality_of}
    ref = allocate("t", scores, modality_of)
    for _ in range(20):
        keys = list(modality_of)
        rng.shuffle(keys)
        perm_map = {m: modality_of[m] for m in keys}
        rng.shuffle(keys)
        perm_scores = {m: scores[m] for m in keys}
        assert same(allocate("t", perm_scores, perm_map), ref)


# --- modalities, ablations, degenerate scores ---------------------------------------------------


def test_a_third_modality_gets_its_share():
    modality_of = mmap(vision=8, language=16, audio=8)  # |M| = 32, B = 16, floors 4
    scores = scores_by_modality(modality_of, vision=1.0, language=1.0, audio=4.0)
    # S = 8, 16, 32 → π = 1/7, 2/7, 4/7 → targets 2.29, 4.57, 9.14 → vision 4 (floor), language 5,
    # audio 8 (capped from 9): Σ = 17 > 16. Above their floors: language (surplus +0.43) and audio
    # (−1.14) → language gives one back.
    alloc = allocate("hear", scores, modality_of)
    assert alloc.budget == 16
    assert alloc.per_modality == {"audio": 8, "language": 4, "vision": 4}
    assert alloc.shares == pytest.approx({"audio": 4 / 7, "language": 2 / 7, "vision": 1 / 7})
    assert all(modality_of[m] in alloc.per_modality for m in alloc.modules)


def test_a_modality_is_capped_at_its_candidates():
    modality_of = mmap(vision=2, language=14)  # B = 8
    alloc = allocate("t", scores_by_modality(modality_of, vision=100.0, language=0.01), modality_of)
    assert alloc.per_modality == {"language": 6, "vision": 2}


def test_uniform_ablation_splits_equally_and_reports_measured_shares():
    modality_of = mmap(vision=8, language=16)
    scores = scores_by_modality(modality_of, vision=0.01, language=9.0)
    alloc = allocate("t", scores, modality_of, uniform=True)
    assert alloc.per_modality == {"language": 6, "vision": 6}
    assert alloc.shares["language"] > 0.99  # measured, not the uniform split


def test_all_zero_scores_mean_uniform_shares():
    modality_of = mmap(vision=8, language=16, audio=8)
    alloc = allocate("t", dict.fromkeys(modality_of, 0.0), modality_of)
    assert alloc.shares == {"audio": 1 / 3, "language": 1 / 3, "vision": 1 / 3}
    # B = 16, targets 5.33 → 5 each, Σ = 15; equal deficits → "audio" (first by name) gets one.
    assert alloc.per_modality == {"audio": 6, "language": 5, "vision": 5}
    # with no score to go by, each modality takes its first modules in natural order
    vt = "vision_tower.layers.{}.self_attn.{}_proj"
    assert [m for m in alloc.modules if modality_of[m] == "vision"] == [
        vt.format(0, "k"), vt.format(0, "o"), vt.format(0, "q"), vt.format(0, "v"), vt.format(1, "k")]


def test_all_modules_ablation_and_equal_param_rank():
    modality_of = mmap(vision=8, language=16)
    alloc = all_modules_allocation("t", modality_of)
    assert alloc.budget == 24 and set(alloc.modules) == set(modality_of)
    assert alloc.per_modality == {"language": 16, "vision": 8}
    assert alloc.shares == {"language": 16 / 24, "vision": 8 / 24}
    scored = all_modules_allocation("t", modality_of, scores_by_modality(modality_of, vision=3.0,
                                                                         language=0.0))
    assert scored.shares == {"language": 0.0, "vision": 1.0}
    ExpertPlan.empty(modality_of).with_task(alloc, rank=equal_param_rank(8, 12, 24), alpha=16)


@pytest.mark.parametrize("rank,n_budgeted,n_all,expected", [
    (8, 12, 24, 4), (8, 48, 96, 4), (8, 24, 24, 8), (8, 1, 100, 1), (4, 3, 8, 2), (8, 5, 16, 3),
])
def test_equal_param_rank(rank, n_budgeted, n_all, expected):
    assert equal_param_rank(rank, n_budgeted, n_all) == expected


@pytest.mark.parametrize("args,fragment", [
    ((0, 12, 24), "`rank` must be an integer >= 1, got 0"),
    ((8, 25, 24), "`n_budgeted` must be <= `n_all`=24, got 25"),
    ((8, 12, 2.5), "`n_all` must be an integer >= 1, got 2.5"),
])
def test_equal_param_rank_errors(args, fragment):
    with pytest.raises(AllocationError) as e:
        equal_param_rank(*args)
    assert fragment in str(e.value)


# --- validation ----------------------------------------------------------------------------------

M2 = {"v.0": "vision", "v.1": "vision", "l.0": "language", "l.1": "language"}
S2 = dict.fromkeys(M2, 1.0)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"scores": {"v.0": 1.0, "v.1": 1.0, "l.0": 1.0}}, "scores are missing for candidate modules ['l.1']"),
    ({"scores": {**S2, "x.9": 1.0}}, "scores given for unknown modules ['x.9']"),
    ({"scores": {**S2, "l.0": -0.5}}, "score of 'l.0' must be a finite number >= 0, got -0.5"),
    ({"scores": {**S2, "l.0": math.nan}}, "score of 'l.0' must be a finite number >= 0, got nan"),
    ({"scores": {**S2, "v.1": math.inf}}, "score of 'v.1' must be a finite number >= 0, got inf"),
    ({"scores": {**S2, "v.1": True}}, "score of 'v.1' must be a finite number >= 0, got True"),
    ({"scores": {**S2, "v.1": "1.0"}}, "score of 'v.1' must be a finite number >= 0, got '1.0'"),
    ({"kappa": 0.0}, "`kappa` (budget fraction) must be in (0, 1], got 0.0"),
    ({"kappa": 1.5}, "`kappa` (budget fraction) must be in (0, 1], got 1.5"),
    ({"kappa": math.nan}, "`kappa` (budget fraction) must be in (0, 1], got nan"),
    ({"floor": -0.1}, "`floor` (per-modality floor) must be a number >= 0, got -0.1"),
    ({"floor": 0.6}, "`floor` × number of modalities must be <= 1, got 0.6 × 2 = 1.2"),
    ({"modality_of": {}, "scores": {}}, "no candidate modules: `modality_of` is empty"),
    ({"modality_of": {"v.0": ""}, "scores": {"v.0": 1.0}}, "must map module names to modality names"),
    ({"task": ""}, "`task` must be a non-empty string, got ''"),
])
def test_allocate_rejects_bad_input(kwargs, fragment):
    args = {"task": "t", "scores": S2, "modality_of": M2, **kwargs}
    with pytest.raises(AllocationError) as e:
        allocate(**args)
    assert fragment in str(e.value)


def test_floor_check_counts_the_modalities_present():
    m3 = {**M2, "a.0": "audio"}
    allocate("t", dict.fromkeys(m3, 1.0), m3, floor=1 / 3)  # 1/3 × 3 = 1 is allowed
    with pytest.raises(AllocationError, match="0.4 × 3"):
        allocate("t", dict.fromkeys(m3, 1.0), m3, floor=0.4)


# --- federated proxy aggregation ----------------------------------------------------------------


def test_weighted_mean_scores_by_hand():
    a = ({"v.0": 1.0, "l.0": 4.0, "l.1": 0.0}, 1)
    b = ({"l.1": 2.0, "v.0": 3.0, "l.0": 0.0}, 3)  # key order may differ between clients
    assert weighted_mean_scores([a, b]) == {"v.0": 2.5, "l.0": 1.0, "l.1": 1.5}
    assert weighted_mean_scores([a]) == a[0]


@pytest.mark.parametrize("clients,fragment", [
    ([], "no client scores to aggregate"),
    ([({"a": 1.0}, 2), ({"a": 1.0, "b": 2.0}, 2)], "client 1: score keys differ from client 0's: "
                                                   "missing [] (0 in all), extra ['b']"),
    ([({"a": 1.0, "b": 1.0}, 2), ({"a": 1.0}, 2)], "client 1: score keys differ from client 0's: "
                                                   "missing ['b']"),
    ([({"a": 1.0}, 2), ({"a": 1.0}, 0)], "client 1: sample count must be an integer > 0, got 0"),
    ([({"a": 1.0}, True)], "client 0: sample count must be an integer > 0, got True"),
    ([({"a": 1.0}, 2.0)], "client 0: sample count must be an integer > 0, got 2.0"),
    ([({"a": 1.0}, 1), ({"a": math.nan}, 1)], "client 1: score of 'a' must be a finite number >= 0"),
    ([({"a": -1.0}, 1)], "client 0: score of 'a' must be a finite number >= 0, got -1.0"),
    ([({}, 1)], "client 0: sent no scores"),
    ([({"a": 1.0},)], "client 0: expected a (scores, sample_count) pair"),
])
def test_weighted_mean_scores_errors_name_the_client(clients, fragment):
    with pytest.raises(AllocationError) as e:
        weighted_mean_scores(clients)
    assert fragment in str(e.value)


# --- the expert plan ---------------------------------------------------------------------------


def three_task_plan() -> tuple[ExpertPlan, dict[str, str]]:
    modality_of = mmap(vision=4, language=8)  # B = 6
    shared = "language_model.layers.0.self_attn.q_proj"
    plan = ExpertPlan.empty(modality_of)
    for task, hot in (("t1", shared), ("t2", "language_model.layers.1.self_attn.o_proj"), ("t3", shared)):
        scores = {m: (10.0 if m == hot else 1.0 + i * 0.01 * (task == "t2"))
                  for i, m in enumerate(modality_of)}
        plan = plan.with_task(allocate(task, scores, modality_of), rank=8, alpha=16)
    return plan, modality_of


def test_plan_accumulates_over_three_tasks():
    plan, modality_of = three_task_plan()
    shared = "language_model.layers.0.self_attn.q_proj"
    assert plan.tasks == ("t1", "t2", "t3")
    assert len(plan.experts) == 18 and len(plan.allocations) == 3
    assert shared in plan.modules_of("t1") and shared in plan.modules_of("t3")
    assert shared not in plan.modules_of("t2")
    assert plan.tasks_at(shared) == ["t1", "t3"]
    unused = [m for m in modality_of if not plan.tasks_at(m)]
    assert unused  # a module no task chose gets no LoRA at all
    assert plan.experts_per_modality("t2") == plan.allocations[1].per_modality
    assert all(e.rank == 8 and e.alpha == 16 for e in plan.experts)
    with pytest.raises(ValueError, match="task 't2' is already in the plan"):
        plan.with_task(plan.allocations[1], rank=8, alpha=16)
    with pytest.raises(ValueError, match="task 'nope' is not in the plan"):
        plan.modules_of("nope")
    with pytest.raises(ValueError, match="not a candidate module"):
        plan.tasks_at("mlp.fc1")


def test_plan_json_round_trip(tmp_path):
    plan, _ = three_task_plan()
    assert ExpertPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    path = plan.save(tmp_path / "plans" / "plan.json")
    assert ExpertPlan.load(path) == plan
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left behind


def _mutate(edit):
    plan, _ = three_task_plan()
    d = json.loads(json.dumps(plan.to_json()))
    edit(d)
    return d


@pytest.mark.parametrize("edit,fragment", [
    (lambda d: d.update(extra=1), "plan field `<plan>` has unknown keys ['extra']"),
    (lambda d: d.pop("experts"), "plan field `<plan>` is missing keys ['experts']"),
    (lambda d: d.update(version=2), "plan field `version` must be 1"),
    (lambda d: d.update(tasks="t1"), "plan field `tasks` must be a list, got 't1'"),
    (lambda d: d.update(tasks=["t1", "t1", "t3"]), "plan field `tasks` must be a list without repeats"),
    (lambda d: d["experts"][0].update(color="red"), "plan field `experts[0]` has unknown keys ['color']"),
    (lambda d: d["experts"][1].update(rank=0), "plan field `experts[1].rank` must be an integer > 0, got 0"),
    (lambda d: d["experts"][1].update(rank="8"),
     "plan field `experts[1].rank` must be an integer > 0, got '8'"),
    (lambda d: d["experts"][2].update(alpha=-16), "plan field `experts[2].alpha` must be an integer > 0"),
    (lambda d: d["experts"][0].update(module="mlp.fc1"),
     "plan field `experts[0].module` must be a candidate module listed in `modality_of`, got 'mlp.fc1'"),
    (lambda d: d["experts"][0].update(modality="audio"), "plan field `experts[0].modality` must be"),
    (lambda d: d["experts"][0].update(task="t9"), "plan field `experts[0].task` must be one of the plan's"),
    (lambda d: d["experts"].append(dict(d["experts"][0])), "must be unique per (module, task)"),
    (lambda d: d["allocations"].pop(), "plan field `allocations` must be one per task, in task order"),
    (lambda d: d["allocations"][0].update(budget=7), "plan field `allocations[0].budget` must be"),
    (lambda d: d["allocations"][0]["shares"].update(vision=1.5),
     "plan field `allocations[0].shares.vision` must be a number in [0, 1], got 1.5"),
    (lambda d: d.update(modality_of={}), "plan field `modality_of` must be a non-empty object"),
    (lambda d: d["experts"].pop(), "plan field `allocations[2].modules` must be the modules of task 't3'"),
])
def test_plan_errors_name_the_field_and_value(edit, fragment):
    with pytest.raises(PlanError) as e:
        ExpertPlan.from_json(_mutate(edit))
    assert fragment in str(e.value)


def test_plan_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(PlanError, match="none.json.*cannot be read"):
        ExpertPlan.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="bad.json.*not valid JSON"):
        ExpertPlan.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(_mutate(lambda d: d["experts"][0].update(rank=0))))
    with pytest.raises(PlanError, match=r"wrong.json.*`experts\[0\].rank`"):
        ExpertPlan.load(wrong)


def test_with_task_validates_rank_and_modules():
    plan = ExpertPlan.empty(M2)
    alloc = allocate("t", S2, M2)
    with pytest.raises(PlanError, match="`experts.rank` must be an integer > 0, got 0"):
        plan.with_task(alloc, rank=0, alpha=16)
    foreign = dataclasses.replace(alloc, modules=("x.0", *alloc.modules[1:]))
    with pytest.raises(PlanError, match="must be candidate modules listed in `modality_of`, got 'x.0'"):
        plan.with_task(foreign, rank=8, alpha=16)


def test_choose_partner_is_the_one_rule_of_the_learner_and_the_cloud():
    from cloud.allocator import choose_partner

    # the most-voted older task, if it holds >= share of the new task's samples
    assert choose_partner({"a": 6, "b": 3}, 10, 0.5) == "a"
    assert choose_partner({"a": 4, "b": 3}, 10, 0.5) is None
    assert choose_partner({"a": 6}, 10, 0.0) is None  # share 0: co-activation off
    assert choose_partner({}, 10, 0.5) is None
    # ties go to the earlier task of the stream, whatever order the votes came in
    assert choose_partner({"b": 5, "a": 5}, 10, 0.5, order=["a", "b"]) == "a"
    assert choose_partner({"a": 5, "b": 5}, 10, 0.5, order=["b", "a"]) == "b"
