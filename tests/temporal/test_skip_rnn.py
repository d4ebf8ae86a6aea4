"""Skip-RNN: dynamic execution vs independent references, real skipping, costs, training, knobs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynets import create_model, load, save
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.temporal.skip_rnn import calibrate_update_threshold

CELLS = ["lstm", "gru"]


def _model(cell: str, *, skip: bool = True, bias: float = -0.7, layers: int = 2, **kw) -> nn.Module:
    torch.manual_seed(0)
    name = ("skip_" if skip else "static_") + cell
    m = create_model(name, input_size=3, hidden=12, layers=layers, num_classes=4, seq_len=15, **kw).eval()
    if skip:
        with torch.no_grad():  # a gate that mixes updates and skips
            m.gate.weight.normal_(0, 0.6)
            m.gate.bias.fill_(bias)
    return m


def _data(b: int = 9, t: int = 15, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, generator=g), torch.randint(1, t + 1, (b,), generator=g)


def _reference(m: nn.Module, x: torch.Tensor, steps: int, thr: float) -> tuple[torch.Tensor, list[bool]]:
    """One sample, written out from the paper with torch.nn cells holding the model's weights."""
    cfg = m.config
    rnn = m.stack.rnn
    cells = []
    for k in range(cfg.layers):
        cell = (nn.LSTMCell if cfg.cell == "lstm" else nn.GRUCell)(
            rnn.input_size if k == 0 else cfg.hidden, cfg.hidden
        )
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data.copy_(getattr(rnn, f"{name}_l{k}"))
        cells.append(cell)
    h = [torch.zeros(1, cfg.hidden) for _ in cells]
    c = [torch.zeros(1, cfg.hidden) for _ in cells]
    u_tilde, delta, marks = torch.tensor(1.0), torch.tensor(0.0), []
    for t in range(steps):
        update = bool(u_tilde >= thr)
        marks.append(update)
        if update:
            inp = x[t : t + 1]
            for k, cell in enumerate(cells):
                if cfg.cell == "lstm":
                    h[k], c[k] = cell(inp, (h[k], c[k]))
                else:
                    h[k] = cell(inp, h[k])
                inp = h[k]
            memory = c[-1] if cfg.cell == "lstm" else h[-1]
            delta = torch.sigmoid(m.gate(memory))[0, 0]
            u_tilde = delta
        else:
            u_tilde = torch.clamp(u_tilde + delta, max=1.0)
    marks += [False] * (x.shape[0] - steps)
    return m.head(h[-1])[0], marks


@pytest.mark.parametrize("cell", CELLS)
def test_open_gates_equal_the_plain_rnn(cell):
    m = _model(cell, bias=50.0)  # every update probability is 1: every step updates
    x, lengths = _data()
    with torch.no_grad():
        out = m(x)
        y, _ = m.stack.rnn(x)  # torch's own nn.LSTM / nn.GRU with the same weights
        torch.testing.assert_close(out.logits, m.head(y[:, -1]), atol=1e-6, rtol=1e-5)
        assert bool(out.decisions["updated"].all())
        static = _model(cell, skip=False)
        static.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("gate")})
        ref = static(x, lengths)
        dyn = m(x, lengths)
    torch.testing.assert_close(dyn.logits, ref.logits, atol=1e-6, rtol=1e-5)
    assert torch.equal(dyn.decisions["updated"], ref.decisions["updated"])
    loop = static.run_loop(x, lengths)  # the per-step executor with every update
    torch.testing.assert_close(loop.logits, ref.logits, atol=1e-6, rtol=1e-5)
    assert torch.equal(loop.flops, ref.flops)
    assert torch.equal(dyn.decisions["num_updates"], lengths)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("layers", [1, 2])  # a one-layer LSTM takes the executor's own step (lstm1_step)
def test_dynamic_equals_dense_and_per_sample_reference(cell, with_lengths, layers):
    m = _model(cell, layers=layers)
    x, lengths = _data()
    lengths = lengths if with_lengths else None
    out = m(x, lengths)
    dense = m.run_dense(x, lengths)
    upd = out.decisions["updated"]
    assert 0.1 < upd.float().mean() < 0.9  # the gate really mixes updates and skips
    assert torch.equal(upd, dense.decisions["updated"])
    torch.testing.assert_close(out.logits, dense.logits, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for i in range(x.shape[0]):
            steps = x.shape[1] if lengths is None else int(lengths[i])
            logits, marks = _reference(m, x[i], steps, m.threshold)
            assert upd[i].tolist() == marks
            torch.testing.assert_close(out.logits[i], logits, atol=1e-5, rtol=1e-5)
            single = m(x[i : i + 1], None if lengths is None else lengths[i : i + 1])  # batch-1 path
            assert single.decisions["updated"][0].tolist() == marks
            torch.testing.assert_close(single.logits[0], logits, atol=1e-5, rtol=1e-5)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))  # input order is kept
    shuffled = m(x[perm], None if lengths is None else lengths[perm])
    torch.testing.assert_close(shuffled.logits, out.logits[perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_skipped_steps_are_not_computed_and_flops_are_units_run(cell, monkeypatch):
    m = _model(cell)
    x, lengths = _data()
    m.unit_costs()  # measured once (a batch-1 step), before counting
    rows = []
    step = m.stack.step
    monkeypatch.setattr(m.stack, "step", lambda xt, s, *w: rows.append(xt.shape[0]) or step(xt, s, *w))
    out = m(x, lengths)
    n = out.decisions["num_updates"]
    assert sum(rows) == int(n.sum()) < int(lengths.sum())  # only updating rows ever reach the cell
    cell_cls = nn.LSTMCell if cell == "lstm" else nn.GRUCell
    one_step = sum(
        _flops(cell_cls(i, 12), torch.zeros(1, i)) for i in (3, 12)
    )  # two layers, measured independently
    gate, head = 2 * 12, 2 * 12 * 4
    torch.testing.assert_close(out.flops, n.double() * (one_step + gate) + head)
    monkeypatch.undo()
    counter = FlopCounterMode(display=False)
    with counter:
        m(x, lengths)
    assert counter.get_total_flops() == int(out.flops.sum())  # every FLOP spent is accounted for
    static = _model(cell, skip=False)
    assert torch.equal(static(x, lengths).flops, lengths.double() * one_step + head)


def test_one_layer_lstm_step_runs_only_updating_rows_and_matches_the_cell(monkeypatch):
    m = _model("lstm", layers=1)
    x, lengths = _data()
    rows = []
    step = m.stack.lstm1_step
    monkeypatch.setattr(
        m.stack, "lstm1_step", lambda xt, h, c, w: rows.append(xt.shape[0]) or step(xt, h, c, w)
    )
    out = m(x, lengths)
    assert sum(rows) == int(out.decisions["num_updates"].sum()) < int(lengths.sum())
    assert max(rows) == x.shape[0] and len(rows) == int(out.decisions["num_updates"].max())  # rounds
    monkeypatch.undo()
    cell = nn.LSTMCell(3, 12)  # the fast step against torch's own cell with the same weights
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data.copy_(getattr(m.stack.rnn, f"{name}_l0"))
    h, c = torch.randn(5, 12), torch.randn(5, 12)
    with torch.no_grad():
        got = m.stack.lstm1_step(x[:5, 0], h, c, m.stack.lstm1_weights())
        want = cell(x[:5, 0], (h, c))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="one-layer LSTM, got 2-layer lstm"):
        _model("lstm").stack.lstm1_weights()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 2])
def test_pooled_equals_dynamic_per_batch(cell, layers):
    m = _model(cell, layers=layers)
    x, lengths = _data(b=23, seed=5)
    ref = m(x, lengths)
    for bs in (1, 4, 8, 64):  # continuous batching with at most bs live sequences
        out = m.run_pooled(x, bs, lengths)
        assert torch.equal(out.decisions["updated"], ref.decisions["updated"])
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
        assert torch.equal(out.flops, ref.flops)
    out = m.run_pooled(x, 5, threshold=0.9)
    assert torch.equal(out.decisions["updated"], m(x, threshold=0.9).decisions["updated"])
    assert m.run_pooled(x[:0], 4).logits.shape == (0, 4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size: expected an int >= 1, got {bad!r}"):
            m.run_pooled(x, bad)
    with pytest.raises(ValueError, match="threshold"):
        m.run_pooled(x, 4, threshold=0.0)
    with pytest.raises(ValueError, match="static model"):
        _model(cell, skip=False).run_pooled(x, 4)
    with pytest.raises(ValueError, match="x: expected shape"):
        m.run_pooled(x[0], 4)


@pytest.mark.parametrize("layers", [1, 2])
def test_sleep_is_exact_at_rounding_edges_on_every_path(layers):
    """Δũ = float32(0.14999999), threshold 0.9: 6 Δũ < 0.9 <= 7 Δũ exactly, though float32(0.9 / Δũ) is 6;
    a saturated gate (Δũ = 0) with a tiny threshold sleeps to the end instead of failing."""
    from fractions import Fraction

    m = _model("lstm", layers=layers)
    x, lengths = _data(b=3, t=15)
    for bias, thr in ((-1.7346011400222778, 0.9), (-200.0, 1e-300)):
        with torch.no_grad():
            m.gate.weight.zero_()
            m.gate.bias.fill_(bias)
            delta = float(torch.sigmoid(m.gate.bias.detach())[0])
        k = 1
        while delta > 0 and k * Fraction(delta) < Fraction(thr):  # exact arithmetic
            k += 1
        want = [t % k == 0 if delta > 0 else t == 0 for t in range(15)]
        assert k == (7 if delta else 1)
        if delta:  # the edge is real: a float32 division would say 6
            assert math.ceil(torch.tensor(0.9) / torch.tensor(delta)) == 6
        paths = {
            "dynamic": m(x, threshold=thr),
            "pooled": m.run_pooled(x, 2, threshold=thr),
            "dense": m.run_dense(x, threshold=thr),
            "batch 1": m(x[:1], threshold=thr),
        }
        for name, out in paths.items():
            for row in out.decisions["updated"].tolist():
                assert row == want, name
        short = m(x, lengths, threshold=thr).decisions["updated"]
        for i, n in enumerate(lengths.tolist()):
            assert short[i].tolist() == [w and t < n for t, w in enumerate(want)]
    with pytest.raises(ValueError, match="threshold"):
        m.run_dynamic(x, threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        m.run_dense(x, threshold=0.0)


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def test_budget_loss_reduces_updates_on_a_toy_task():
    torch.manual_seed(0)
    m = create_model("skip_gru", input_size=1, hidden=8, num_classes=2, budget_weight=2.0)
    x = torch.randn(64, 16, 1)
    y = (x[:, :4, 0].mean(1) > 0).long()

    def fraction() -> float:
        m.eval()
        return float(m(x).decisions["updated"].float().mean())

    before = fraction()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m.train()
    for _ in range(25):
        out = m(x)
        assert isinstance(out, MultiExitOutput) and out.aux["loss"].dim() == 0
        loss = nn.functional.cross_entropy(out.logits, y) + out.aux["loss"]
        opt.zero_grad()
        loss.backward()
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
        opt.step()
        m.train()
    after = fraction()
    assert before > 0.9 and after < before - 0.3


def test_threshold_knob_and_calibration():
    m = _model("lstm", bias=0.0)
    x, _ = _data(b=24)
    fractions = [float(m(x, threshold=t).decisions["updated"].float().mean()) for t in (0.2, 0.5, 0.9)]
    assert fractions[0] > fractions[1] > fractions[2]
    thr = calibrate_update_threshold(m, x, budget=0.5)
    assert m.threshold == thr and 0 < thr <= 1
    assert float(m(x).decisions["updated"].float().mean()) <= 0.5
    assert float(m(x, threshold=thr * 0.9).decisions["updated"].float().mean()) > 0.45  # near the budget
    with pytest.raises(ValueError, match="budget"):
        calibrate_update_threshold(m, x, budget=0.01)
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="threshold"):
            m(x, threshold=bad)
        with pytest.raises(ValueError, match="threshold"):
            m.threshold = bad
    with pytest.raises(ValueError, match="threshold"):
        create_model("skip_lstm", threshold=2.0)


@pytest.mark.parametrize("name", ["skip_lstm", "static_gru"])
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    m = create_model(name, input_size=3, hidden=8, num_classes=3).eval()
    if m.config.skip:
        m.threshold = 0.7
    x, lengths = _data()
    before = m(x, lengths)
    save(m, tmp_path / name)
    back = load(tmp_path / name)
    after = back(x, lengths)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.flops, after.flops)
    assert back.threshold == m.threshold


def test_bad_input_and_empty_batch():
    m = _model("lstm")
    x, lengths = _data()
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, F=3\), got \(9, 15, 2\)"):
        m(x[..., :2])
    with pytest.raises(ValueError, match="x: expected shape"):
        m(x[0])
    with pytest.raises(ValueError, match="NaN"):
        m(torch.where(x > 2, float("nan"), x))
    with pytest.raises(ValueError, match="at least one step"):
        m(x[:, :0])
    with pytest.raises(ValueError, match="variable-length sequences"):
        m([x[0, :5], x[1, :7]])
    with pytest.raises(ValueError, match=r"lengths: expected values in \[1, T=15\]"):
        m(x, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths[:3])
    with pytest.raises(TypeError, match="floating-point"):
        m(x.long())
    for model in (m, _model("gru", skip=False)):
        out = model(x[:0])
        assert isinstance(out, DynamicOutput) and out.logits.shape == (0, 4) and out.flops.shape == (0,)
        assert out.decisions["updated"].shape == (0, 15)
    with pytest.raises(ValueError, match="cell"):
        create_model("skip_lstm", cell="rnn")
    assert math.isfinite(float(m.full_cost()))
