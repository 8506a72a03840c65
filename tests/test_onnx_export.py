"""Export of the global model to ONNX and answering in onnxruntime (mole.onnx_graph/export/ort_runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_cfg):
    from edge.runtime import load_local_data
    from mole.export import export_bundle, load_run

    root = tmp_path_factory.mktemp("export")
    run = build_tiny_run(root, tiny_cfg)
    gm = load_run(run)
    bundle = export_bundle(gm, root / "bundle", signing_key=None)
    data = load_local_data(run / "clients" / "client-01", gm.tasks)
    samples = [s for t in gm.tasks for s in data.test[t]]
    return gm, bundle, samples


def _torch_answers(gm, samples):
    from mole.inference import routed_answers
    from mole.router import router_features

    d = gm.cfg.dmole
    z = router_features(gm.em.experts, gm.em.enc, samples, 64,
                        weights=[d.router_vision_weight, 1.0, d.router_audio_weight])
    routes = gm.router.route(z)
    return routed_answers(gm.em.experts, gm.em.enc, samples, routes, gm.tasks, gm.partners, 64,
                          gm.cfg.train.max_new_tokens), routes


def test_graph_matches_peft_model_logits_for_every_expert_set(exported):
    from mole.export import build_graph

    gm, _, samples = exported
    g = build_graph(gm)
    spec = g.spec
    b = gm.em.enc.prompt_batch(samples)
    n = b.input_ids.shape[0]
    has_img = (b.input_ids == spec.image_token_id).any(1)
    has_aud = (b.input_ids == spec.audio_token_id).any(1)
    img_row = torch.zeros(n, dtype=torch.long)
    img_row[has_img] = torch.arange(1, int(has_img.sum()) + 1)
    aud_row = torch.zeros(n, dtype=torch.long)
    aud_row[has_aud] = torch.arange(1, int(has_aud.sum()) + 1)
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    past = [torch.zeros(n, spec.kv_heads, 0, spec.head_dim)] * (2 * spec.layers)
    for active in ([], [gm.tasks[0]], [gm.tasks[2], *gm.partners[gm.tasks[2]]], [gm.tasks[3]]):
        gate = torch.zeros(n, len(spec.tasks))
        for t in active:
            gate[:, spec.tasks.index(t)] = 1
        with gm.em.experts.only(active), torch.no_grad():
            ref, _ = gm.em.model(b.input_ids, b.attention_mask, b.pixel_values, None,
                                 b.input_features)
            out = g(b.input_ids, b.attention_mask, pos, gate, b.pixel_values, img_row,
                    b.input_features, aud_row, *past)
        assert torch.allclose(out[0], ref[:, -1], atol=1e-4), active
        if active:  # the experts really change the output (the test would catch a dead gate)
            assert (ref[:, -1] - out[0]).abs().max() < 1e-4 < (ref[:, -1]).abs().max()


def test_onnx_answers_and_routes_equal_torch(exported):
    from edge.ort_runtime import OrtModel

    gm, bundle, samples = exported
    ref, routes = _torch_answers(gm, samples)
    assert len(set(routes)) > 2, "the tiny routers should spread samples over several tasks"
    fp32 = OrtModel(bundle, "fp32", threads=1).answer(samples)
    assert [a.route for a in fp32] == routes
    assert [a.answer for a in fp32] == ref
    int8 = OrtModel(bundle, "int8", threads=1).answer(samples)
    agree = np.mean([a.answer == r for a, r in zip(int8, ref, strict=True)])
    assert agree >= 0.9  # the bench measures it on a trained model (target 0.99)


def test_kv_cache_decode_equals_recomputing_the_prefix(exported):
    """Two decoder-graph steps on the KV cache give the logits of recomputing the whole
    sequence with the full graph (mixed tasks and media, left padding, routed gates)."""
    from edge.ort_runtime import OrtModel, positions

    gm, bundle, samples = exported
    m = OrtModel(bundle, "fp32", threads=1)
    routes = [a.route for a in m.answer(samples)]
    batch = m.enc.prompt_batch(samples)
    ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
    s = m.spec
    pix, img_row = m._media((ids == s.image_token_id).any(1), batch.pixel_values.numpy(),
                            (3, s.image_size, s.image_size))
    feats, aud_row = m._media((ids == s.audio_token_id).any(1), batch.input_features.numpy(),
                              s.audio_shape)
    gate = m._gate(routes)
    media = {"pixel_values": pix, "image_row": img_row, "input_features": feats,
             "audio_row": aud_row}

    def full(ids, mask):
        return m.full.run(None, {"input_ids": ids, "attention_mask": mask,
                                 "position_ids": positions(mask), "gate": gate, **media,
                                 **m._empty_past(len(samples))})

    out = full(ids, mask)
    cache = out[2:]
    names = [f"past.{i}.{k}" for i in range(s.layers) for k in ("key", "value")]
    pos = positions(mask)[:, -1:]
    # Words, not placeholders: a generated <image> would be a media slot in the full graph.
    for word in (m.enc._words("red")[0], m.enc._words("what")[0]):
        nxt = np.full((len(samples), 1), word, dtype=np.int64)
        ids = np.concatenate([ids, nxt], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        pos = pos + 1
        dec = m.decoder.run(None, {"input_ids": nxt, "attention_mask": mask, "position_ids": pos,
                                   "gate": gate, **dict(zip(names, cache, strict=True))})
        cache = dec[1:]
        np.testing.assert_allclose(dec[0], full(ids, mask)[0], atol=1e-4)
        assert cache[0].shape[2] == ids.shape[1]


def test_export_refuses_a_run_without_experts_or_a_baseline(tmp_path, exported):
    import json
    import shutil

    from mole.export import ExportError, load_run
    from protocol.state import load_checkpoint, save_checkpoint

    gm, bundle, _ = exported
    with pytest.raises(ExportError, match="metrics.json"):
        load_run(tmp_path)
    run = bundle.parent / "run"
    bad = tmp_path / "shared"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("clients"))
    state = load_checkpoint(bad)
    state.method = "fedavg-seq-lora"
    save_checkpoint(state, bad)
    with pytest.raises(ExportError, match="fedavg-seq-lora"):
        load_run(bad)
    meta = json.loads((bad / "metrics.json").read_text())
    meta["config"]["model.base-path"] = str(tmp_path / "nowhere")
    (bad / "metrics.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="--base"):
        load_run(bad)


def test_bundle_lists_every_file_with_its_hash(exported):
    from protocol.bundle import read_manifest, sha256_file

    gm, bundle, _ = exported
    man = read_manifest(bundle)
    for name in ("model.onnx", "model_int8.onnx", "decoder.onnx", "decoder_int8.onnx",
                 "weights.onnx_data", "weights_int8.onnx_data"):
        assert man.files[name].sha256 == sha256_file(Path(bundle) / name)
    # each precision's two graphs keep their weights in one shared file: the decoder's copy of
    # the language model is not stored a second time
    for data in ("weights.onnx_data", "weights_int8.onnx_data"):
        shared = man.extra["shared_weights"][data]
        assert shared["saved"] > 0 and shared["unique"] < shared["tensors"]
        assert shared["bytes"] == man.files[data].size
    assert any(p.startswith("tokenizer/") for p in man.files)
    assert any(p.startswith("processor/") for p in man.files)
    assert list(man.tasks) == gm.tasks and man.global_round == 7
    assert set(man.thresholds) == set(gm.tasks)
    assert man.extra["opset"] == 17 and man.versions["onnxruntime"]


def test_int8_graph_keeps_the_lm_head_fp32_and_stores_the_embedding_as_int8(exported):
    import onnx
    from onnx import TensorProto

    _, bundle, _ = exported
    m = onnx.load(str(Path(bundle) / "model_int8.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert "MatMulNBits" in ops
    inits = {i.name: i for i in m.graph.initializer}
    gathers = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    embedding = [w for w in gathers if w in dq]  # the token table, int8 per row
    assert embedding and all(inits[dq[w].input[0]].data_type == TensorProto.INT8 for w in embedding)
    assert any(n.op_type == "MatMul" and n.name.startswith("/lm_head/") for n in m.graph.node)
