"""Frame skipping: dynamic reads vs independent references, skipped frames cost nothing, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynets import create_model, load, save
from dynets.core.outputs import DynamicOutput, MultiExitOutput


def _model(cell: str = "gru", **kw) -> nn.Module:
    torch.manual_seed(0)
    m = create_model("frameskip_rnn", cell=cell, input_size=3, hidden=12, num_classes=4, max_skip=3, **kw)
    with torch.no_grad():
        m.skip_policy.weight.normal_(0, 3.0)  # skip choices that vary with the state
        m.skip_policy.bias.zero_()
    return m.eval()


def _data(b: int = 8, t: int = 14, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, generator=g), torch.randint(1, t + 1, (b,), generator=g)


def _reference(
    m: nn.Module, x: torch.Tensor, steps: int, conf: float | None, bias: float = 0.0, cap: int | None = None
) -> tuple[torch.Tensor, list[int]]:
    """One sample: read a frame, jump over the chosen number of frames (skip length k costing bias * k
    on its logit), maybe stop; plain loop."""
    cfg = m.config
    cell = (nn.LSTMCell if cfg.cell == "lstm" else nn.GRUCell)(cfg.input_size, cfg.hidden)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data.copy_(getattr(m.stack.rnn, f"{name}_l0"))
    h, c = torch.zeros(1, cfg.hidden), torch.zeros(1, cfg.hidden)
    t, reads = 0, []
    while t < steps:
        if cfg.cell == "lstm":
            h, c = cell(x[t : t + 1], (h, c))
        else:
            h = cell(x[t : t + 1], h)
        reads.append(t)
        logits = m.head(h)[0]
        if conf is not None and float(logits.softmax(0).max()) >= conf:
            return logits, reads
        scores = [float(v) - bias * k for k, v in enumerate(m.skip_policy(h)[0])]
        k = max(range(len(scores)), key=lambda k: (scores[k], -k))  # the first best, as argmax
        t += 1 + (k if cap is None else min(k, cap))  # a longer skip than the cap is cut to it
    return m.head(h)[0], reads


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("conf", [None, 0.3])
def test_dynamic_equals_dense_and_per_sample_reference(cell, with_lengths, conf):
    m = _model(cell)
    x, lengths = _data()
    lengths = lengths if with_lengths else None
    out = m(x, lengths, stop_confidence=conf)
    dense = m.run_dense(x, lengths, conf)
    read = out.decisions["read"]
    assert torch.equal(read, dense.decisions["read"])
    assert torch.equal(out.decisions["stop_step"], dense.decisions["stop_step"])
    torch.testing.assert_close(out.logits, dense.logits, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for i in range(x.shape[0]):
            steps = x.shape[1] if lengths is None else int(lengths[i])
            logits, reads = _reference(m, x[i], steps, conf)
            assert read[i].nonzero().squeeze(1).tolist() == reads
            torch.testing.assert_close(out.logits[i], logits, atol=1e-5, rtol=1e-5)
            single = m(x[i : i + 1], None if lengths is None else lengths[i : i + 1], stop_confidence=conf)
            assert torch.equal(single.decisions["read"][0], read[i])  # the batch-1 path jumps
            assert torch.equal(single.flops, out.flops[i : i + 1])
            torch.testing.assert_close(single.logits[0], logits, atol=1e-5, rtol=1e-5)
    if lengths is None and conf is None:
        assert 0.2 < read.float().mean() < 0.9  # the policy really skips some frames


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("conf", [None, 0.3])
def test_pooled_equals_dynamic(cell, conf):
    m = _model(cell)
    x, lengths = _data(b=19, seed=4)
    ref = m(x, lengths, stop_confidence=conf)
    for bs in (1, 3, 8, 32):  # continuous batching with at most bs live sequences
        out = m.run_pooled(x, bs, lengths, conf)
        for key in ("read", "stop_step", "num_reads"):
            assert torch.equal(out.decisions[key], ref.decisions[key])
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
        assert torch.equal(out.flops, ref.flops)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        m.run_pooled(x, 0)
    with pytest.raises(ValueError, match="stop_confidence"):
        m.run_pooled(x, 4, stop_confidence=1.5)


def test_skipped_frames_cost_nothing_and_flops_are_units_run(monkeypatch):
    m = _model()
    x, lengths = _data()
    m.unit_costs()
    rows = []
    step = m.stack.step
    monkeypatch.setattr(m.stack, "step", lambda xt, s, *w: rows.append(xt.shape[0]) or step(xt, s, *w))
    for conf in (None, 0.3):
        rows.clear()
        out = m(x, lengths, stop_confidence=conf)
        n = out.decisions["num_reads"]
        assert sum(rows) == int(n.sum()) < int(lengths.sum())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            nn.GRUCell(3, 12)(torch.zeros(1, 3))
        per_read = counter.get_total_flops() + 2 * 12 * 4 + (2 * 12 * 4 if conf else 0)  # cell, policy, head
        stopped = (out.decisions["stop_step"] >= 0).double()
        torch.testing.assert_close(out.flops, n.double() * per_read + (1 - stopped) * 2 * 12 * 4)
    assert bool((out.decisions["stop_step"] >= 0).any())  # with conf 0.3 some rows stop early
    monkeypatch.undo()
    counter = FlopCounterMode(display=False)
    with counter:
        out = m(x, lengths, stop_confidence=0.3)
    assert counter.get_total_flops() == int(out.flops.sum())


def test_budget_loss_reduces_reads_and_early_exits_train():
    torch.manual_seed(0)
    m = create_model("frameskip_rnn", input_size=1, hidden=8, budget_weight=3.0, early_exit=True)
    x = torch.randn(48, 16, 1)
    y = (x[:, :4, 0].mean(1) > 0).long()
    m.eval()
    before = float(m(x).decisions["read"].float().mean())
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m.train()
    for _ in range(20):
        out = m(x)
        assert isinstance(out, MultiExitOutput) and len(out.exit_logits) == 4  # 1/4, 1/2, 3/4, end
        loss = sum(nn.functional.cross_entropy(z, y) for z in out.exit_logits) / 4 + out.aux["loss"]
        opt.zero_grad()
        loss.backward()
        assert m.skip_policy.weight.grad.abs().sum() > 0  # the policy learns through Gumbel-softmax
        opt.step()
    m.eval()
    after = float(m(x).decisions["read"].float().mean())
    assert after < before - 0.2


def test_save_load_knob_bad_input_and_empty_batch(tmp_path):
    m = _model("lstm")
    m.stop_confidence = 0.3
    x, lengths = _data()
    before = m(x, lengths)
    save(m, tmp_path / "fs")
    back = load(tmp_path / "fs")
    after = back(x, lengths)
    assert back.stop_confidence == 0.3 and torch.equal(before.logits, after.logits)
    assert torch.equal(before.decisions["read"], after.decisions["read"])
    for bad in (0.0, 1.01, -1):
        with pytest.raises(ValueError, match="stop_confidence"):
            m(x, stop_confidence=bad)
    with pytest.raises(ValueError, match=r"expected shape \(B, T, F=3\)"):
        m(x[..., :2])
    with pytest.raises(ValueError, match="at least one step"):
        m(x[:, :0])
    out = m(x[:0])
    assert (
        isinstance(out, DynamicOutput)
        and out.logits.shape == (0, 4)
        and out.decisions["read"].shape == (0, 14)
    )
    with pytest.raises(ValueError, match="max_skip"):
        create_model("frameskip_rnn", max_skip=0)


def test_init_from_a_trained_rnn_copies_the_cell_and_classifier():
    static = create_model("static_lstm", input_size=3, hidden=12, num_classes=4)
    m = _model("lstm").init_from(static)
    for name in ("stack", "head"):
        ours, theirs = getattr(m, name).state_dict(), getattr(static, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bias, cap", [(-2.0, None), (1.5, None), (0.0, 1), (-2.0, 2), (0.0, 0)])
def test_skip_knobs_equal_dense_and_per_sample_reference(cell, bias, cap):
    m = _model(cell)
    x, lengths = _data(b=12, seed=7)
    out = m(x, lengths, skip_bias=bias, skip_cap=cap)
    dense = m.run_dense(x, lengths, skip_bias=bias, skip_cap=cap)
    assert torch.equal(out.decisions["read"], dense.decisions["read"])
    torch.testing.assert_close(out.logits, dense.logits, atol=1e-6, rtol=1e-5)
    pooled = m.run_pooled(x, 5, lengths, skip_bias=bias, skip_cap=cap)
    assert torch.equal(pooled.decisions["read"], out.decisions["read"]) and torch.equal(
        pooled.flops, out.flops
    )
    with torch.no_grad():
        for i in range(x.shape[0]):
            logits, reads = _reference(m, x[i], int(lengths[i]), None, bias, cap)
            assert out.decisions["read"][i].nonzero().squeeze(1).tolist() == reads
            torch.testing.assert_close(out.logits[i], logits, atol=1e-5, rtol=1e-5)
            single = m(x[i : i + 1], lengths[i : i + 1], skip_bias=bias, skip_cap=cap)
            assert torch.equal(single.decisions["read"][0], out.decisions["read"][i])
    assert not torch.equal(out.decisions["read"], m(x, lengths).decisions["read"])  # the knob acts


def test_skip_bias_trades_reads_and_is_saved(tmp_path):
    m = _model()
    x, lengths = _data(b=16, seed=3)
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    fractions = [float(m(x, lengths, skip_bias=b).decisions["num_reads"].sum()) for b in (-50, -1, 0, 1, 50)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]
    assert torch.equal(
        m(x, lengths, skip_bias=1e4).decisions["read"], valid
    )  # every frame: the full RNN's work
    every = m(x, lengths, skip_bias=-1e4).decisions["read"]  # the longest skip after every read
    assert torch.equal(every, valid & (torch.arange(x.shape[1]) % (m.config.max_skip + 1) == 0))
    m.skip_bias = 1.5
    ref = m(x, lengths, skip_bias=1.5)
    save(m, tmp_path / "fs")
    back = load(tmp_path / "fs")
    assert back.skip_bias == 1.5 and torch.equal(back(x, lengths).decisions["read"], ref.decisions["read"])
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(
            ValueError, match=r"skip_bias: expected a finite number \(0: the trained policy\), got"
        ):
            m(x, lengths, skip_bias=bad)
        with pytest.raises(ValueError, match="skip_bias: expected a finite number"):
            m.skip_bias = bad
    with pytest.raises(ValueError, match="skip_bias"):
        create_model("frameskip_rnn", skip_bias=float("nan"))


def test_skip_cap_binds_whatever_the_logits_and_is_saved(tmp_path):
    m = _model()
    with torch.no_grad():
        m.skip_policy.weight.zero_()
        m.skip_policy.bias.copy_(torch.tensor([0.0, 10.0, 20.0, 100.0]))  # the longer the better: skip 3
    # (any bias small next to these logits would not move it; the cap does)
    x, lengths = _data(b=9, seed=2)
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    steps = torch.arange(x.shape[1])
    for cap in (0, 1, 2, 3, None):
        read = m(x, lengths, skip_cap=cap).decisions["read"]
        every = (m.config.max_skip if cap is None else cap) + 1
        assert torch.equal(read, valid & (steps % every == 0))
    with torch.no_grad():  # second choice: read every frame; the cap still cuts the first choice, 3, to 1
        m.skip_policy.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 100.0]))
    assert torch.equal(m(x, lengths, skip_cap=1).decisions["read"], valid & (steps % 2 == 0))
    m.skip_cap = 1
    save(m, tmp_path / "fs")
    back = load(tmp_path / "fs")
    assert back.skip_cap == 1 and torch.equal(back(x, lengths).decisions["read"], valid & (steps % 2 == 0))
    assert torch.equal(back(x, lengths, skip_cap=None).decisions["read"], valid & (steps % 4 == 0))
    for bad in (-1, 4, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"skip_cap: expected None or an int in \[0, max_skip=3\], got"):
            m(x, lengths, skip_cap=bad)
        with pytest.raises(ValueError, match="skip_cap: expected None or an int"):
            m.skip_cap = bad
    with pytest.raises(ValueError, match="skip_cap"):
        create_model("frameskip_rnn", max_skip=2, skip_cap=3)
    with pytest.raises(ValueError, match="train_caps: expected a bool, got 1"):
        create_model("frameskip_rnn", train_caps=1)


def test_train_caps_draws_a_cap_per_sequence_and_keeps_gradients_finite():
    m = _model(train_caps=True)
    with torch.no_grad():
        m.skip_policy.weight.zero_()
        m.skip_policy.bias.copy_(torch.tensor([0.0, 50.0, 100.0, 150.0]))  # always the longest allowed
    x, lengths = _data(b=200, t=12, seed=4)
    m.train()
    torch.manual_seed(0)
    out = m(x, None)
    reads = (out.aux["read_fraction"] * x.shape[1]).round().long()  # frames read per sequence
    # cap c: frames 0, c+1, 2(c+1), ... -> ceil(12 / (c+1)) reads; every cap 0..3 drawn
    assert set(reads.tolist()) == {12, 6, 4, 3}
    y = torch.zeros(200, dtype=torch.long)
    (nn.functional.cross_entropy(out.exit_logits[-1], y) + out.aux["loss"]).backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
