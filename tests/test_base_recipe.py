"""The base's pretraining recipe: the colour–shape binding loss (simulation/base.py)."""

from __future__ import annotations

import pytest
import torch

from protocol.config import ConfigError, parse_config

# A text model deep and wide enough for the binding loss (3 heads of layer 1, layer 2 read).
DEEP = {"model.text-layers": 3, "model.text-heads": 4, "model.text-kv-heads": 2,
        "data.pretrain-size": 240, "pretrain.binding-aux-weight": 1.0}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_cfg):
    return parse_config({"data.cache-dir": str(tmp_path_factory.mktemp("cache")), **DEEP},
                        base=tiny_cfg)


@pytest.fixture(scope="module")
def split(cfg):
    """(model, encoder, the pretraining split, indices of its shape/exists records)."""
    from mole.backbone import build_backbone
    from mole.batching import Encoder
    from mole.tokenizer import build_word_tokenizer
    from protocol.llava_format import TaskSamples
    from simulation.base import _vocabulary_texts
    from simulation.benchmark import ensure_benchmark
    from simulation.benchmark.generate import PRETRAIN_FILE
    from simulation.benchmark.tasks import pretrain_template

    root = ensure_benchmark(cfg.data)
    tok = build_word_tokenizer(_vocabulary_texts(root))
    torch.manual_seed(0)
    model = build_backbone(cfg.model, tok, cfg.data.image_size, init_seed=0)
    enc = Encoder.for_model(tok, model, cfg.model.max_length)
    samples = TaskSamples.read("pretrain", root / PRETRAIN_FILE)
    rows = [i for i, r in enumerate(samples.records)
            if r.images and pretrain_template(r.instruction) in ("shape", "exists")]
    assert len(rows) >= 20
    return model, enc, samples, rows


def test_patch_labels_read_off_the_pixels_agree_with_every_shape_and_exists_record(split):
    from simulation.base import _patch_pairs
    from simulation.benchmark.shapes import COLOR_NAMES, SHAPES

    _, enc, samples, rows = split
    batch = enc.train_batch([samples[i] for i in rows])
    labels = _patch_pairs(batch.pixel_values)  # (N, P)
    assert labels.shape == (len(rows), batch.pixel_values.shape[-1] ** 2 // 64)
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    for i, lab in zip(rows, labels, strict=True):
        record = samples.records[i]
        drawn = {pairs[int(v) - 1] for v in lab if v > 0}
        assert drawn, record.instruction
        words = record.instruction.split()
        if words[:3] == ["is", "there", "a"]:  # exists: "is there a <colour> <shape>"
            assert record.answer == ("yes" if (words[3], words[4]) in drawn else "no"), (record, drawn)
        else:  # shape: one object, its shape is the answer
            assert {s for _, s in drawn} == {record.answer}, (record, drawn)


def test_the_binding_loss_trains_and_leaves_no_hooks(split):
    from simulation.base import _binding_aux

    model, enc, samples, rows = split
    lm = model.adapter.language_model(model.vlm)
    last = list(rows)
    loss_fn, heads, hooks = _binding_aux(model, samples, enc, 1.0, last)
    batch = enc.train_batch([samples[i] for i in rows])
    params = [p for p in model.parameters()] + heads
    for p in params:
        p.requires_grad = True
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    try:
        for _ in range(100):
            model(**batch.model_inputs(), labels=batch.labels)  # the hooks see this forward
            loss = loss_fn(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        # On shape rows alone the loss is the word term: it moves the image tokens (the
        # projector), never the word embeddings through the tied head (those moved, `repeat`
        # fell on 2 bases of 3).
        shape_rows = [i for i in rows if not samples.records[i].instruction.startswith("is there")]
        last[:] = shape_rows
        batch = enc.train_batch([samples[i] for i in shape_rows])
        opt.zero_grad(set_to_none=True)
        model(**batch.model_inputs(), labels=batch.labels)
        loss_fn(batch).backward()
        emb = model.get_input_embeddings().weight
        assert emb.grad is None or not emb.grad.any()
        projector = model.llava.model.multi_modal_projector
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    finally:
        for h in hooks:
            h.remove()
    assert losses[-1] < 0.5 * losses[0], losses
    assert not lm.layers[0]._forward_pre_hooks and not lm.layers[0]._forward_hooks


def test_the_binding_loss_needs_three_layers_and_three_heads(tiny_cfg, tmp_path):
    from simulation.base import pretrain_base
    from simulation.benchmark import ensure_benchmark

    cfg = parse_config({"data.cache-dir": str(tmp_path), "pretrain.binding-aux-weight": 1.0},
                       base=tiny_cfg)  # the tiny LM: 2 layers of 2 heads
    with pytest.raises(ConfigError, match="pretrain.binding-aux-weight = 1 .* 2 layers of 2 heads"):
        pretrain_base(cfg, ensure_benchmark(cfg.data), progress=False)


def test_the_binding_loss_needs_a_whole_number_of_image_tokens_per_grid_cell(cfg, tmp_path):
    from simulation.base import pretrain_base
    from simulation.benchmark import ensure_benchmark

    odd = parse_config({"model.patch-size": 16, "data.cache-dir": cfg.data.cache_dir}, base=cfg)
    with pytest.raises(ConfigError, match="model.patch-size 16 gives 2 tokens a side: make it a "
                                          "multiple of 4"):
        pretrain_base(odd, ensure_benchmark(odd.data), progress=False)


def test_finer_patches_take_their_cells_label(split):
    """8 tokens a side (data.image-size 64, the default patch of 8): each of a cell's 2 × 2
    patches carries the cell's label, row-major as SigLIP lays the image tokens out."""
    from simulation.base import _patch_pairs

    _, enc, samples, rows = split
    pv = enc.train_batch([samples[i] for i in rows[:8]]).pixel_values
    cells = _patch_pairs(pv)  # (8, 16)
    fine = _patch_pairs(pv, side=8).view(-1, 8, 8)
    for r in range(8):
        for c in range(8):
            assert torch.equal(fine[:, r, c], cells[:, (r // 2) * 4 + c // 2])


def test_the_recipe_without_the_binding_loss_keeps_the_base_key(tiny_cfg):
    """Cached bases made before the key existed are the same recipe: their key must not move."""
    from simulation.base import base_key

    on = parse_config({"pretrain.binding-aux-weight": 1.0}, base=tiny_cfg)
    off = parse_config({"pretrain.binding-aux-weight": 0.0}, base=tiny_cfg)
    assert base_key(off) == base_key(tiny_cfg) != base_key(on)
