"""ACT RNN: compacted pondering vs independent references, real savings, ponder cost, round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynets import create_model, load, save
from dynets.core.outputs import DynamicOutput, MultiExitOutput


def _model(cell: str = "gru", halt_bias: float = -1.0, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = create_model("act_rnn", cell=cell, input_size=3, hidden=12, num_classes=4, halt_bias=halt_bias, **kw)
    with torch.no_grad():
        m.halt.weight.normal_(0, 0.5)  # halting that differs between samples and steps
    return m.eval()


def _data(b: int = 7, t: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, generator=g), torch.randint(1, t + 1, (b,), generator=g)


def _reference(m: nn.Module, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """One sample, Graves's algorithm with plain Python floats for the halting arithmetic."""
    cfg = m.config
    rnn = m.stack.rnn
    cell = (nn.LSTMCell if cfg.cell == "lstm" else nn.GRUCell)(cfg.input_size + 1, cfg.hidden)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data.copy_(getattr(rnn, f"{name}_l0"))
    h, c = torch.zeros(1, cfg.hidden), torch.zeros(1, cfg.hidden)
    passes = []
    for t in range(steps):
        total, acc_h, acc_c = 0.0, torch.zeros_like(h), torch.zeros_like(c)
        sh, sc = h, c
        for n in range(1, cfg.max_ponder + 1):
            inp = torch.cat([x[t : t + 1], torch.tensor([[1.0 if n == 1 else 0.0]])], 1)
            if cfg.cell == "lstm":
                sh, sc = cell(inp, (sh, sc))
            else:
                sh = cell(inp, sh)
            p_halt = float(torch.sigmoid(m.halt(sh)))
            if total + p_halt >= 1 - cfg.epsilon or n == cfg.max_ponder:
                weight = 1.0 - total  # the remainder R(t)
                acc_h, acc_c = acc_h + weight * sh, acc_c + weight * sc
                passes.append(n)
                break
            total += p_halt
            acc_h, acc_c = acc_h + p_halt * sh, acc_c + p_halt * sc
        h, c = acc_h, acc_c
    passes += [0] * (x.shape[0] - steps)
    return m.head(h)[0], passes


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_dynamic_equals_dense_and_per_sample_reference(cell, with_lengths):
    m = _model(cell)
    x, lengths = _data()
    lengths = lengths if with_lengths else None
    out = m(x, lengths)
    dense = m.run_dense(x, lengths)
    ponder = out.decisions["ponder"]
    assert len(set(ponder[ponder > 0].tolist())) > 1  # samples really ponder for different times
    assert torch.equal(ponder, dense.decisions["ponder"])
    torch.testing.assert_close(out.logits, dense.logits, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for i in range(x.shape[0]):
            steps = x.shape[1] if lengths is None else int(lengths[i])
            logits, passes = _reference(m, x[i], steps)
            assert ponder[i].tolist() == passes
            torch.testing.assert_close(out.logits[i], logits, atol=1e-5, rtol=1e-4)


def test_halted_rows_leave_the_loop_and_flops_are_passes(monkeypatch):
    m = _model(max_ponder=5)
    x, lengths = _data()
    m.unit_costs()
    rows = []
    step = m.stack.step
    monkeypatch.setattr(m.stack, "step", lambda xt, s, *w: rows.append(xt.shape[0]) or step(xt, s, *w))
    out = m(x, lengths)
    ponder = out.decisions["ponder"]
    assert sum(rows) == int(ponder.sum())  # one row-pass per pass taken, nothing for halted rows
    assert int(ponder.max()) <= 5 and bool((ponder[:, 0] >= 1).all())
    valid = torch.arange(x.shape[1])[None] < lengths[:, None]
    assert bool((ponder[~valid] == 0).all()) and bool((ponder[valid] >= 1).all())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        nn.GRUCell(4, 12)(torch.zeros(1, 4))
    per_pass = counter.get_total_flops() + 2 * 12  # cell + halting unit
    torch.testing.assert_close(out.flops, ponder.sum(1).double() * per_pass + 2 * 12 * 4)
    monkeypatch.undo()
    counter = FlopCounterMode(display=False)
    with counter:
        m(x, lengths)
    assert counter.get_total_flops() == int(out.flops.sum())


def test_ponder_cost_reduces_pondering():
    m = _model(halt_bias=-2.0, ponder_weight=0.5)
    x, _ = _data(b=32)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(0))
    before = float(m(x).decisions["ponder"].float().mean())
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m.train()
    for _ in range(15):
        out = m(x)
        assert isinstance(out, MultiExitOutput) and out.aux["loss"].dim() == 0
        loss = nn.functional.cross_entropy(out.logits, y) + out.aux["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    after = float(m(x).decisions["ponder"].float().mean())
    assert before > 3 and after < before - 1


def test_save_load_bad_input_and_empty_batch(tmp_path):
    m = _model("lstm")
    x, lengths = _data()
    before = m(x, lengths)
    save(m, tmp_path / "act")
    after = load(tmp_path / "act")(x, lengths)
    assert torch.equal(before.logits, after.logits) and torch.equal(
        before.decisions["ponder"], after.decisions["ponder"]
    )
    with pytest.raises(ValueError, match=r"expected shape \(B, T, F=3\)"):
        m(x[..., :1])
    with pytest.raises(ValueError, match="NaN"):
        m(x / 0)
    with pytest.raises(ValueError, match="variable-length"):
        m([x[0], x[1, :4]])
    out = m(x[:0])
    assert (
        isinstance(out, DynamicOutput)
        and out.logits.shape == (0, 4)
        and out.decisions["ponder"].shape == (0, 10)
    )
    with pytest.raises(ValueError, match="max_ponder"):
        create_model("act_rnn", max_ponder=0)
    with pytest.raises(ValueError, match="epsilon"):
        create_model("act_rnn", epsilon=1.5)
