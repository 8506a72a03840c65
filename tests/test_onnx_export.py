"""Export of the global model to ONNX and answering in onnxruntime (mole.onnx_graph/export/ort_runtime)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mole.export import EXPERT, GATE_SELECT
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


def test_graphs_match_peft_model_logits_for_every_expert_set(exported):
    """vision/audio encoders → placeholders → decoder, traced modules in torch, against the
    PEFT model: the same last-position logits for every set of active experts."""
    from mole.export import export_parts

    gm, _, samples = exported
    parts = export_parts(gm)
    spec = parts.spec
    vision, audio = parts.graph("vision_encoder"), parts.graph("audio_encoder")
    embed, dec = parts.graph("embed_tokens"), parts.graph("decoder_model_merged")
    b = gm.em.enc.prompt_batch(samples)
    n = b.input_ids.shape[0]
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    past = [torch.zeros(n, spec.kv_heads, 0, spec.head_dim)] * (2 * spec.layers)
    img_slots = b.input_ids == spec.image_token_id
    aud_slots = b.input_ids == spec.audio_token_id
    img_rows = img_slots.any(1).nonzero()[:, 0]
    aud_rows = aud_slots.any(1).nonzero()[:, 0]
    assert len(img_rows) and len(aud_rows), "the samples should hold images and audio"
    for active in ([], [gm.tasks[0]], [gm.tasks[2], *gm.partners[gm.tasks[2]]], [gm.tasks[3]]):
        gate = torch.zeros(n, len(spec.tasks))
        for t in active:
            gate[:, spec.tasks.index(t)] = 1
        with gm.em.experts.only(active), torch.no_grad():
            ref, _ = gm.em.model(b.input_ids, b.attention_mask, b.pixel_values, None,
                                 b.input_features)
            x = embed(b.input_ids)
            x[img_slots] = vision(b.pixel_values, gate[img_rows]).reshape(-1, x.shape[-1])
            x[aud_slots] = audio(b.input_features, gate[aud_rows]).reshape(-1, x.shape[-1])
            out = dec(x, b.attention_mask, pos, gate, *past)
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
    int4 = OrtModel(bundle, "int4", threads=1).answer(samples)
    # 4-bit weights on a 0.8 M-parameter model (the router graph stays int8, but its text
    # feature comes from the 4-bit decoder): most routes and answers hold
    route4 = np.mean([a.route == r for a, r in zip(int4, routes, strict=True)])
    agree4 = np.mean([a.answer == r for a, r in zip(int4, ref, strict=True)])
    print(f"int4: routes {route4:.3f}, answers {agree4:.3f}")
    assert route4 >= 0.6 and agree4 >= 0.5


def test_kv_cache_decode_equals_recomputing_the_prefix(exported):
    """Two decode steps of the merged decoder on the KV cache give the logits of prefilling the
    whole sequence again (mixed tasks and media, left padding, routed gates)."""
    from edge.ort_runtime import OrtModel, positions

    gm, bundle, samples = exported
    m = OrtModel(bundle, "fp32", threads=1)
    routes = [a.route for a in m.answer(samples)]
    batch = m.enc.prompt_batch(samples)
    gate = m._gate(routes)
    out, pos = m.prefill(batch, gate)
    cache = out[2:]
    pos = pos[:, -1:]
    # Words, not placeholders: a generated <image> would be a media slot in the prefill.
    for word in (m.enc._words("red")[0], m.enc._words("what")[0]):
        nxt = np.full((len(samples), 1), word, dtype=np.int64)
        batch.input_ids = torch.cat([batch.input_ids, torch.from_numpy(nxt)], dim=1)
        batch.attention_mask = torch.cat([batch.attention_mask,
                                          torch.ones_like(batch.attention_mask[:, :1])], dim=1)
        pos = pos + 1
        dec = m.decoder(m.embed(nxt), batch.attention_mask.numpy(), pos, gate, cache)
        cache = dec[2:]
        again, again_pos = m.prefill(batch, gate)
        np.testing.assert_allclose(dec[0], again[0], atol=1e-4)
        assert (again_pos[:, -1:] == pos).all()
        assert cache[0].shape[2] == batch.input_ids.shape[1]
    assert positions(batch.attention_mask.numpy()).shape == batch.input_ids.shape


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


def test_bundle_has_the_field_layout_and_lists_every_file_with_its_hash(exported):
    from mole.export import graph_file
    from protocol.bundle import read_manifest, sha256_file

    gm, bundle, _ = exported
    man = read_manifest(bundle)
    graphs = ["vision_encoder", "audio_encoder", "embed_tokens", "decoder_model_merged", "router"]
    assert man.extra["graphs"]["fp32"] == {g: f"{g}.onnx" for g in graphs}
    assert man.extra["graphs"]["int8"] == {g: f"{g}_int8.onnx" for g in graphs}
    # int4: a file of every graph (4-bit decoder, the others int8), so a device running it
    # stores its own files and weights only
    assert man.extra["graphs"]["int4"] == {g: graph_file(g, "int4") for g in graphs}
    files = {f for m in man.extra["graphs"].values() for f in m.values()}
    for name in files | {"weights.onnx_data", "weights_int8.onnx_data", "weights_q4.onnx_data"}:
        assert man.files[name].sha256 == sha256_file(Path(bundle) / name)
    # every weight of a graph lives in its precision's data file, each distinct tensor once
    for data in ("weights.onnx_data", "weights_int8.onnx_data", "weights_q4.onnx_data"):
        shared = man.extra["shared_weights"][data]
        assert shared["tensors"] > 0 and shared["bytes"] == man.files[data].size
    assert all(man.files[f].size < 200_000 for f in files)  # graphs only
    assert any(p.startswith("tokenizer/") for p in man.files)
    assert any(p.startswith("processor/") for p in man.files)
    assert list(man.tasks) == gm.tasks and man.global_round == 7
    assert set(man.thresholds) == set(gm.tasks)
    assert man.extra["opset"] == 17 and man.versions["onnxruntime"]


def _nbits(node) -> int:
    return next(a.i for a in node.attribute if a.name == "bits")


def test_int8_keeps_the_lm_head_fp32_and_int4_holds_4_bit_layers_with_an_8_bit_head(exported):
    import onnx
    from onnx import TensorProto

    _, bundle, _ = exported
    emb = onnx.load(str(Path(bundle) / "embed_tokens_int8.onnx"))
    inits = {i.name: i for i in emb.graph.initializer}
    # the token table, int8 per row: the lookup gathers int8 rows and their scales (a
    # DequantizeLinear of the whole table would run every call)
    tables = [inits[n.input[0]] for n in emb.graph.node
              if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
              and inits[n.input[0]].dims[1] > 1]  # not the (V, 1) row scales
    assert tables and all(t.data_type == TensorProto.INT8 for t in tables)
    assert not any(n.op_type == "DequantizeLinear" for n in emb.graph.node)
    m8 = onnx.load(str(Path(bundle) / "decoder_model_merged_int8.onnx"))
    assert {_nbits(n) for n in m8.graph.node if n.op_type == "MatMulNBits"} == {8}
    assert any(n.op_type == "MatMul" and n.name.startswith("/lm_head/") for n in m8.graph.node)
    m4 = onnx.load(str(Path(bundle) / "decoder_model_merged_q4.onnx"))
    nb = {n.name: _nbits(n) for n in m4.graph.node if n.op_type == "MatMulNBits"}
    head = [k for k in nb if k.startswith("/lm_head/")]
    experts = [k for k in nb if re.search(EXPERT, k.removesuffix("_Q8").removesuffix("_Q4"))]
    assert head and {nb[k] for k in head} == {8}
    assert experts and {nb[k] for k in experts} == {8}  # rank-r A and B: 8 bits
    assert {v for k, v in nb.items() if k not in head + experts} == {4}
    # the expert paths' gate·select tables stay fp32 in both
    for m in (m8, m4):
        assert any(n.op_type == "MatMul" and re.search(GATE_SELECT, n.name) for n in m.graph.node)


@pytest.fixture(scope="module")
def exported_checkpoint(tmp_path_factory, tiny_cfg):
    """A run on a tiny LLaVA-1.5-layout checkpoint (CLIP tower whose CLS token is dropped, a
    Llama LM, its own LlavaProcessor and chat template), exported and signed."""
    from edge.runtime import load_local_data
    from mole.export import export_bundle, load_run
    from protocol.bundle import generate_keypair
    from tests.vlm_fixtures import build_llava15

    root = tmp_path_factory.mktemp("export-ckpt")
    base = build_llava15(root / "llava15")
    run = build_tiny_run(root, tiny_cfg, {"model.base-path": str(base),
                                          "data.tasks": ["color", "arith", "count"]})
    gm = load_run(run)
    generate_keypair(root / "bundle.key", root / "bundle.pub")
    bundle = export_bundle(gm, root / "bundle", signing_key=root / "bundle.key")
    data = load_local_data(run / "clients" / "client-01", gm.tasks)
    return gm, bundle, [s for t in gm.tasks for s in data.test[t]], root / "bundle.pub"


def test_a_checkpoint_bundle_preprocesses_with_its_own_processor_and_answers_as_torch(
        exported_checkpoint):
    import json

    from edge.ort_runtime import OrtModel
    from mole.chat import ChatEncoder

    gm, bundle, samples, _ = exported_checkpoint
    man = json.loads((Path(bundle) / "manifest.json").read_text())
    assert man["extra"]["encoder"] == "chat" and man["extra"]["family"] == "llava"
    proc = Path(bundle) / "processor"
    assert (proc / "preprocessor_config.json").is_file()
    assert any((proc / f).is_file() for f in ("chat_template.json", "chat_template.jinja",
                                               "tokenizer_config.json"))
    assert "audio_encoder" not in man["extra"]["graphs"]["fp32"]
    m = OrtModel(bundle, "fp32", threads=1)
    assert isinstance(m.enc, ChatEncoder)
    # the bundle's processor encodes exactly as the checkpoint's own did in training
    ours, theirs = m.enc.prompt_batch(samples), gm.em.enc.prompt_batch(samples)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.pixel_values, theirs.pixel_values)
    ref, routes = _torch_answers(gm, samples)
    got = m.answer(samples)
    assert [a.route for a in got] == routes and len(set(routes)) > 1
    assert [a.answer for a in got] == ref


def test_an_int4_checkpoint_bundle_serves_over_grpc(exported_checkpoint):
    import grpc

    from edge.ort_runtime import OrtModel
    from edge.serve import start_service
    from protocol.inference_codec import encode_input, encode_request
    from protocol.proto import inference_pb2, inference_pb2_grpc

    _, bundle, samples, pub = exported_checkpoint
    svc = start_service(bundle, pub, port=0, precision="int4")
    channel = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        some = samples[:4]
        req = encode_request([encode_input(s.instruction, image=s.image, id=s.id) for s in some])
        resp = stub.Predict(req, timeout=60)
        direct = OrtModel(bundle, "int4", threads=1).answer(some)
        assert [p.answer for p in resp.predictions] == [a.answer for a in direct]
        info = stub.GetModelInfo(inference_pb2.ModelInfoRequest(), timeout=10)
        assert info.precision == "int4"
    finally:
        channel.close()
        svc.stop(grace=0)


def test_int8_table_lookup_gathers_rows_then_scales_and_other_readers_see_the_whole_table():
    """An int8 embedding is dequantised per gathered row (not the whole table a call); a
    non-Gather reader of the same table still gets it back through a DequantizeLinear; both
    equal the dequantised table exactly."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mole.export import int8_weight_only

    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 48)).astype(np.float32)  # (V, d)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0, name="lookup"),
             helper.make_node("MatMul", ["x", "table"], ["proj"], name="reader")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["B", "T", 48]),
         helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["N", 48])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert int8_weight_only(model, ("Gather",)) == ["table"]
    onnx.checker.check_model(model)
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("DequantizeLinear") == 1  # for the MatMul reader only
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    deq = inits["table_int8"].astype(np.float32) * inits["table_row_scale"]  # (V, 1) scales
    assert np.abs(deq - table).max() <= np.abs(table).max(axis=1).max() / 127  # one step
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 0, 63], [7, 7, 1]], dtype=np.int64)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    emb, proj = sess.run(None, {"ids": ids, "x": x})
    np.testing.assert_array_equal(emb, deq[ids])
    np.testing.assert_allclose(proj, x @ deq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,float_min,rank_known", [(4, True, True), (8, False, True),
                                                       (4, True, False)])
def test_block_quantize_is_exact_on_weights_already_on_a_gguf_grid(bits, float_min, rank_known,
                                                                   monkeypatch):
    """Weights on GGUF's Q4_1 grid (w = d·q + m per block of 32, fp16 d and m) or Q8_0 grid
    (w = d·q) come back exactly from the MatMulNBits + offset correction; onnxruntime's own
    quantiser (integer zero point) does not, and an off-grid weight still gets a fair 4 bits."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import mole.export
    from mole.export import _nbits, block_quantize

    if not rank_known:  # as for the output of a contrib op, which onnx's shape inference skips
        monkeypatch.setattr(mole.export, "_ranks", lambda model: {})
    rng = np.random.default_rng(1)
    k, n, blk = 128, 48, 32
    d = (rng.uniform(0.002, 0.05, (k // blk, 1, n))).astype(np.float16).astype(np.float32)
    if float_min:
        m = (-rng.uniform(0, 16, (k // blk, 1, n)) * d).astype(np.float16).astype(np.float32)
        q = rng.integers(0, 16, (k // blk, blk, n))
    else:
        m, q = np.zeros_like(d), rng.integers(-127, 128, (k // blk, blk, n))
    # as ggml quantises: a block's minimum is q = 0 and its maximum 15 (Q8_0: |q| = 127 once)
    q[:, 0], q[:, 1] = (0, 15) if float_min else (127, -5)
    w = (d * q + m).astype(np.float32).reshape(k, n)

    def graph(weight: np.ndarray) -> onnx.ModelProto:
        g = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", n])],
            [numpy_helper.from_array(weight, "w")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
        onnx.checker.check_model(model)
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x})[0]

    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    ref = x @ w
    mine = graph(w)
    assert block_quantize(mine, ["/proj/MatMul"], bits, blk, 1, float_min) == ["/proj/MatMul"]
    kinds = [nd.op_type for nd in mine.graph.node]
    assert "MatMulNBits" in kinds
    assert ("ReduceSum" in kinds) == (float_min and rank_known)  # else x·(0/1 matrix)
    # exact but for the fp16 rounding of an offset m + 8·d (2 of SmolLM2's 3.3 M are not fp16)
    err_mine = np.abs(run(mine, x) - ref)
    r_round = np.abs(m + 2 ** (bits - 1) * d) * 2.0 ** -11 if float_min else 0 * d  # (K/32, 1, N)
    bound = np.abs(x).reshape(2, 3, k // blk, blk).sum(-1) @ r_round[:, 0] + 1e-5 * np.abs(ref)
    assert (err_mine <= bound).all()
    theirs = _nbits(graph(w), bits, blk, False, 1)
    err_theirs = np.abs(run(theirs, x) - ref).max()
    assert err_theirs > 20 * err_mine.max()  # the integer zero point leaves the grid
    # off the grid: the float-minimum 4 bits are no worse than the integer zero point's
    if float_min:
        w2 = rng.standard_normal((k, n)).astype(np.float32)
        mine2 = graph(w2)
        block_quantize(mine2, ["/proj/MatMul"], bits, blk, 1, float_min)
        e_mine = np.abs(run(mine2, x) - x @ w2).mean()
        e_theirs = np.abs(run(_nbits(graph(w2), bits, blk, False, 1), x) - x @ w2).mean()
        assert e_mine <= 1.05 * e_theirs


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_the_8_bit_heads_top_candidates_are_rescored_exactly(lead):
    """Accuracy level 4 quantises the head's input to int8 (logits move by ~1e-2); after
    rescore_top_k the k best logits are the 8-bit weights' in fp32, whatever the input's rank."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mole.export import block_quantize, rescore_top_k

    rng = np.random.default_rng(2)
    k, n = 64, 500
    d = rng.uniform(0.001, 0.01, (k // 32, 1, n)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (k // 32, 32, n))
    q[:, 0] = 127
    w = (d * q).astype(np.float32).reshape(k, n)  # on the Q8_0 grid: 8 bits keep it exactly
    shape = [*("ABC"[:len(lead)]), k]
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="/lm_head/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*shape[:-1], n])],
        [numpy_helper.from_array(w, "w")])
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    exact = x @ w
    out = {}
    for rescore in (False, True):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        assert block_quantize(m, ["/lm_head/MatMul"], 8, 32, 4, float_min=False)
        if rescore:
            rescore_top_k(m, "/lm_head/MatMul_Q8", 4)
        onnx.checker.check_model(m)
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        out[rescore] = s.run(None, {"x": x})[0]
    top = np.argsort(-exact, axis=-1)[..., :4]  # (…, 4)
    got = np.take_along_axis(out[True], top, axis=-1)
    want = np.take_along_axis(exact, top, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (out[True].argmax(-1) == exact.argmax(-1)).all()
    # without it the int8 activations move the same logits well past that tolerance
    assert np.abs(np.take_along_axis(out[False], top, axis=-1) - want).max() > 1e-3


def test_int4_quantises_a_head_whose_width_is_not_a_multiple_of_32_with_onnxruntimes_quantiser(
        tmp_path):
    """block_quantize takes K in whole blocks only; such a head still gets its 8 bits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mole.export import INT4, quantize_graph

    w = np.random.default_rng(3).standard_normal((40, 300)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="/lm_head/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 40])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 300])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    quantize_graph(tmp_path / "g.onnx", tmp_path / "q.onnx", INT4, weight_only_ops=())
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [_nbits(n) for n in q.graph.node if n.op_type == "MatMulNBits"] == [8]


def test_fast_projections_take_int8_activations_and_the_others_keep_fp32():
    """QuantRecipe.fast_projections: the matching projections run MatMulNBits at accuracy level
    4, the rest at the recipe's level; both stay on the float-minimum grid."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mole.export import block_quantize

    rng = np.random.default_rng(3)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/o_proj/MatMul"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="/down_proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert len(block_quantize(m, ["/o_proj/MatMul", "/down_proj/MatMul"], 4, 32, 1, True,
                              fast=r"/o_proj")) == 2
    onnx.checker.check_model(m)
    levels = {nd.name: {a.name: a.i for a in nd.attribute}["accuracy_level"]
              for nd in m.graph.node if nd.op_type == "MatMulNBits"}
    assert levels == {"/o_proj/MatMul_Q4": 4, "/down_proj/MatMul_Q4": 1}
    assert [nd.op_type for nd in m.graph.node].count("ReduceSum") == 2  # both corrected


@pytest.mark.parametrize("recipe", ["INT8_LM", "INT4"])
def test_fp32_projections_stay_unquantised_and_compute_exactly(tmp_path, recipe):
    """QuantRecipe.fp32_projections: the matching MatMuls keep their fp32 weights (their output
    is the fp32 graph's), the others become MatMulNBits, in the int8 and the int4 recipe."""
    import dataclasses

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import mole.export as E

    rng = np.random.default_rng(5)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((64, 64), (64, 32)))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/layers.0/mlp/gate_up.0/MatMul"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="/layers.0/mlp/down_proj_0/MatMul")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    r = dataclasses.replace(getattr(E, recipe), fp32_projections=r"/down_proj")
    E.quantize_graph(tmp_path / "g.onnx", tmp_path / "q.onnx", r, weight_only_ops=())
    q = onnx.load(str(tmp_path / "q.onnx"))
    nbits = {n.name for n in q.graph.node if n.op_type == "MatMulNBits"}
    assert nbits == {"/layers.0/mlp/gate_up.0/MatMul_Q" + str(r.bits)}
    assert [n.op_type for n in q.graph.node if n.name == "/layers.0/mlp/down_proj_0/MatMul"] \
        == ["MatMul"]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y, h = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        ["y", "h"], {"x": x})
    np.testing.assert_allclose(y, h @ w2, rtol=1e-5, atol=1e-4)  # down_proj exact on its input
    assert not np.allclose(h, x @ w1, atol=1e-5)  # and gate_up was quantised


def test_smoothing_moves_activation_scales_into_the_weights_and_keeps_the_decoders_function(
        exported, tmp_path, caplog):
    """mole.smoothing: after migrating the calibration maxima into the weights, the decoder
    computes the same logits for every expert set; the projections' inputs are flatter (the
    largest channel max over the median, per site); an int8 bundle records its smoothing in the
    manifest, and without calibration prompts it says so and quantises unsmoothed."""
    import json
    import logging

    from mole.export import INT8_LM, export_bundle, export_parts
    from mole.inference import active_set
    from mole.smoothing import SITES, activation_maxima, smooth_layers

    gm, _, samples = exported
    em = gm.em
    _, routes = _torch_answers(gm, samples)
    maxima = activation_maxima(em.model, em.enc, samples, routes,
                               lambda r: em.experts.only(active_set(r, gm.tasks, gm.partners)))
    layers = len(em.model.llava.model.language_model.layers)
    assert set(maxima) == {(i, s) for i in range(layers) for s in SITES}
    parts = export_parts(gm)
    spec = parts.spec
    before = export_parts(gm).graph("decoder_model_merged")  # its own copy of the weights
    smooth_layers(parts.lm, maxima, 0.5, parts.n_heads, spec.kv_heads)
    after = parts.graph("decoder_model_merged")
    n, t = 3, 5
    x = torch.randn(n, t, spec.hidden)
    mask = torch.ones(n, t, dtype=torch.long)
    pos = torch.arange(t).repeat(n, 1)
    past = [torch.zeros(n, spec.kv_heads, 0, spec.head_dim)] * (2 * spec.layers)
    for k in range(len(spec.tasks) + 1):
        gate = torch.zeros(n, len(spec.tasks))
        if k:
            gate[:, k - 1] = 1
        with torch.no_grad():
            ref, got = before(x, mask, pos, gate, *past)[0], after(x, mask, pos, gate, *past)[0]
        assert torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max())), k
    # the q|k|v input after smoothing is x / s, s = the norm weight before / after: its largest
    # channel stands less far above the median than before, on average over the layers
    def spread(m: torch.Tensor) -> float:
        return float(m.max() / m.median().clamp(min=1e-6))

    raw, flat = [], []
    for i, la in enumerate(parts.lm.layers):
        s = before.lm.layers[i].input_layernorm.weight / la.input_layernorm.weight  # (d,)
        assert not torch.allclose(s, torch.ones_like(s))  # the weights did change
        raw.append(spread(maxima[(i, "qkv")]))
        flat.append(spread(maxima[(i, "qkv")] / s))
    assert np.mean(flat) < np.mean(raw), (raw, flat)

    out = export_bundle(gm, tmp_path / "b", None, recipes={"int8": INT8_LM}, calibration=samples[:8])
    q = json.loads((out / "manifest.json").read_text())["extra"]["quantization"]["int8"]
    assert q["smooth_alpha"] == 0.5 and q["smoothing"]["prompts"] == 8
    assert not list(out.glob(".*"))  # the smoothed fp32 source is not left in the bundle
    with caplog.at_level(logging.WARNING, logger="mole.export"):
        out = export_bundle(gm, tmp_path / "c", None, recipes={"int8": INT8_LM})
    assert "no calibration prompts" in caplog.text  # the own base ships none
    assert json.loads((out / "manifest.json").read_text())["extra"]["quantization"]["int8"][
        "smoothing"] is None
