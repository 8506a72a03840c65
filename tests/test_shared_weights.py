"""mole/shared_weights.py: two graphs holding the same weights (under different names) store
them once in a shared file, and onnxruntime gives the same outputs as from the inline graphs."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mole.shared_weights import share_weights


class Two(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear, extra: bool):
        super().__init__()
        self.lin, self.extra = lin, extra
        self.bias2 = torch.nn.Parameter(torch.randn(64))

    def forward(self, x):
        y = self.lin(x)
        return y + self.bias2 if self.extra else y * 2


def test_two_graphs_share_one_copy_of_their_common_weights(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)  # a 32 KB weight both graphs hold
    x = torch.randn(3, 128)
    inline = tmp_path / "inline"
    inline.mkdir()
    for name, extra in (("a.onnx", True), ("b.onnx", False)):
        torch.onnx.export(Two(lin, extra), (x,), str(inline / name), input_names=["x"],
                          output_names=["y"], dynamo=False)
    shared = tmp_path / "shared"
    shutil.copytree(inline, shared)
    graphs = [shared / "a.onnx", shared / "b.onnx"]
    info = share_weights(graphs, "weights.bin")
    # each graph's copy of the weight goes out, one content; a's 256-byte bias stays inline
    assert info["tensors"] == 2 and info["unique"] == 1 and info["saved"] == 128 * 64 * 4
    assert info["bytes"] == 128 * 64 * 4
    for g in graphs:
        assert g.stat().st_size < 4096  # the graphs hold no weights any more
        onnx.checker.check_model(str(g))
    for name in ("a.onnx", "b.onnx"):
        want = ort.InferenceSession(str(inline / name)).run(None, {"x": x.numpy()})[0]
        got = ort.InferenceSession(str(shared / name)).run(None, {"x": x.numpy()})[0]
        np.testing.assert_array_equal(got, want)
    # done again on already-shared graphs: the same result (idempotent)
    again = share_weights(graphs, "weights.bin")
    assert again == info
