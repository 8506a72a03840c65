"""federation.client-optimizer = keep: AdamW's moments carried between a client's rounds."""

from __future__ import annotations

import logging

import torch

from edge.local import _load_optimizer, _save_optimizer
from mole.steps import train_steps


class _Batch:
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.labels = x, y

    def to(self, device: torch.device) -> _Batch:
        return self

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"x": self.x}


class _Linear(torch.nn.Module):
    """The interface train_steps drives (parameters, device, forward → (out, loss))."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.device = torch.device("cpu")

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        out = self.lin(x)
        return out, torch.nn.functional.mse_loss(out, labels)


def _batches(n: int) -> list[_Batch]:
    g = torch.Generator().manual_seed(1)
    return [_Batch(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def _train(model: _Linear, batches: list[_Batch], **kw):
    return train_steps(model, lambda s: batches[s], len(batches), 0.05, progress=False,
                       schedule=lambda s: 1.0, **kw)  # type: ignore[arg-type]


def test_kept_state_makes_two_rounds_one_run():
    batches = _batches(6)
    whole = _Linear()
    _train(whole, batches)
    kept = _Linear()
    first = _train(kept, batches[:3], keep_state=True)
    assert first.optimizer_state is not None and first.optimizer_state["state"][0]["step"] == 3
    _train(kept, batches[3:], optimizer_state=first.optimizer_state)
    reset = _Linear()
    _train(reset, batches[:3])
    _train(reset, batches[3:])
    for a, b, c in zip(whole.parameters(), kept.parameters(), reset.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)  # the moments carried: the same trajectory
        assert not torch.allclose(a, c, atol=1e-4)  # a fresh AdamW per round moves elsewhere
    assert _train(_Linear(), batches[:1]).optimizer_state is None  # only when asked


def test_saved_state_loads_only_where_it_fits(tmp_path, caplog):
    model = _Linear()
    state = _train(model, _batches(2), keep_state=True).optimizer_state
    assert state is not None
    params = list(model.parameters())
    path = tmp_path / "optimizer" / "e.pt"
    _save_optimizer(path, "color", state)
    back = _load_optimizer(path, "color", params)
    assert back is not None and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert _load_optimizer(tmp_path / "none.pt", "color", params) is None  # never saved: fresh
    with caplog.at_level(logging.WARNING):
        assert _load_optimizer(path, "count", params) is None  # another expert's
        assert _load_optimizer(path, "color", [torch.nn.Parameter(torch.zeros(2, 2))] * 2) is None
        path.write_bytes(b"not a torch file")
        assert _load_optimizer(path, "color", params) is None  # damaged: fresh, said in the log
    assert "does not fit" in caplog.text and "unreadable" in caplog.text
