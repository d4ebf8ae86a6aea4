"""Mixture-of-experts: sort-based dispatch against a per-token reference loop, capacity, aux losses,
upcycling, BERT layer replacement and the zoo's MoE transformer."""

import math

import pytest
import torch
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model
from dynets.core.serialization import load, save
from dynets.width.moe import (
    FeedForward,
    MoE,
    MoEConfig,
    collect_moe_stats,
    load_balancing_loss,
    moe_aux_loss,
    moe_from_dense,
    plan_dispatch,
    replace_bert_ffn_with_moe,
    router_z_loss,
)

D, FF = 8, 16


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    return MoE(MoEConfig(D, FF, **{"num_experts": 4, **kw}))


def _reference(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loop with an independent capacity rule: (output (N, d), expert ids (N, k), -1 dropped).

    Assignments are granted in priority order (every token's first choice in token order, then
    every second choice, ...) while the chosen expert has free slots.
    """
    c = moe.config
    h = x.reshape(-1, D)
    N = h.shape[0]
    probs = torch.softmax(h @ moe.router.proj.weight.t(), dim=-1)
    top_p, top_i = probs.topk(c.k, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True) if c.gates_normalized else top_p
    cap = math.inf if c.dropless else c.capacity(N, moe.training)
    used = [0] * c.num_experts
    ids = torch.full((N, c.k), -1)
    for j in range(c.k):
        for n in range(N):
            e = int(top_i[n, j])
            if used[e] < cap:
                used[e] += 1
                ids[n, j] = e
    out = torch.zeros_like(h)
    for n in range(N):
        for j in range(c.k):
            e = int(ids[n, j])
            if e >= 0:
                out[n] += gates[n, j] * moe.experts[e](h[n : n + 1])[0]
    return out, ids


@pytest.mark.parametrize(
    "kw",
    [
        dict(k=1, capacity_factor=1.0),
        dict(k=2, capacity_factor=1.0),
        dict(k=2, capacity_factor=0.5),
        dict(k=1, dropless=True),
        dict(k=3, dropless=True, normalize_gates=False),
    ],
)
def test_dispatch_equals_per_token_reference(kw):
    moe = _moe(**kw).eval()
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    y, stats = moe(x, return_stats=True)
    assert y.shape == x.shape
    ref, ids = _reference(moe, x)
    torch.testing.assert_close(y.reshape(-1, D), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(stats.expert_index.reshape(-1, moe.config.k), ids)
    assert stats.expert_index.shape == (3, 7, moe.config.k)
    assert stats.dropped_assignments == int((ids < 0).sum())
    assert int(stats.tokens_per_expert.sum()) == int((ids >= 0).sum())
    # gradients reach the router (through the gates) and every expert that ran
    moe.train()
    y = moe(x)
    (y.square().sum() + moe.last_stats.aux_loss).backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0
    for e, expert in enumerate(moe.experts):
        if moe.last_stats.tokens_per_expert[e] > 0:
            assert expert.fc1.weight.grad.abs().sum() > 0


def test_capacity_drops_are_counted_and_zero():
    moe = _moe(k=1, capacity_factor=0.25).eval()
    x = torch.randn(40, D)
    y, stats = moe(x, return_stats=True)
    assert stats.capacity == math.ceil(0.25 * 40 / 4)
    assert (stats.tokens_per_expert <= stats.capacity).all()
    assert stats.dropped_assignments == 40 - int(stats.tokens_per_expert.sum()) > 0
    dropped = stats.expert_index[:, 0] < 0
    assert stats.dropped_tokens == int(dropped.sum())
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))  # dropped tokens get a zero update
    assert (y[~dropped].abs().sum(1) > 0).all()
    assert moe.counters["dropped_tokens"] == stats.dropped_tokens and moe.counters["tokens"] == 40
    moe(x)
    assert moe.counters["dropped_assignments"] == 2 * stats.dropped_assignments
    # capacity priority: every first choice before any second choice, then token order
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    plan = plan_dispatch(ids, torch.ones(3, 2), 2, capacity=2)
    # expert 0: first choices of tokens 0, 2 fill it (token 1's second choice is dropped);
    # expert 1: token 1's first choice, then token 0's second choice; token 2's is dropped
    assert plan.kept.tolist() == [[True, True], [True, False], [True, False]]
    assert plan.counts.tolist() == [2, 2] and plan.token.tolist() == [0, 2, 1, 0]


def test_dropless_never_drops():
    moe = _moe(k=2, dropless=True, capacity_factor=0.0)
    x = torch.randn(64, D) * 5  # skewed routing
    x[:32] = x[0]  # half the tokens identical: one expert pair gets them all
    _, stats = moe(x, return_stats=True)
    assert stats.capacity is None and stats.dropped_assignments == 0 and stats.dropped_tokens == 0
    assert int(stats.tokens_per_expert.sum()) == 128
    assert int(stats.tokens_per_expert.max()) >= 32


def test_k2_combine_weights():
    moe = _moe(k=2, dropless=True).eval()
    x = torch.randn(10, D)
    y, stats = moe(x, return_stats=True)
    torch.testing.assert_close(stats.gates.sum(-1), torch.ones(10))  # GShard: renormalised over the two
    probs = torch.softmax(x @ moe.router.proj.weight.t(), -1)
    top = probs.topk(2, -1)
    torch.testing.assert_close(stats.gates, top.values / top.values.sum(-1, keepdim=True))
    for n in range(10):
        e0, e1 = stats.expert_index[n].tolist()
        g0, g1 = stats.gates[n].tolist()
        want = g0 * moe.experts[e0](x[n]) + g1 * moe.experts[e1](x[n])
        torch.testing.assert_close(y[n], want, atol=1e-6, rtol=1e-5)
    # k=1 (Switch) keeps the raw router probability as the gate
    s1 = _moe(k=1, dropless=True).eval()
    _, st = s1(x, return_stats=True)
    p1 = torch.softmax(x @ s1.router.proj.weight.t(), -1).max(-1).values
    torch.testing.assert_close(st.gates[:, 0], p1)


def test_aux_losses_on_hand_made_router_probs():
    probs = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]]
    )
    balanced = probs.argmax(1, keepdim=True)
    assert load_balancing_loss(probs, balanced, 4).item() == pytest.approx(1.0)  # f = P = 1/4
    collapsed = torch.zeros(4, 1, dtype=torch.long)  # everyone to expert 0: f = (1, 0, 0, 0)
    assert load_balancing_loss(probs, collapsed, 4).item() == pytest.approx(4 * 0.25)
    skewed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert load_balancing_loss(skewed, torch.zeros(2, 1, dtype=torch.long), 2).item() == pytest.approx(2.0)
    # k=2: f counts both choices, over k*N assignments
    two = torch.tensor([[0, 1], [0, 1]])
    half = torch.full((2, 2), 0.5)
    assert load_balancing_loss(half, two, 2).item() == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5))
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want)
    # the balance loss pushes probability away from the over-used expert
    p = probs.clone().requires_grad_(True)
    load_balancing_loss(p, collapsed, 4).backward()
    assert p.grad[:, 0].min() > 0 and p.grad[:, 1:].abs().max() == 0
    # the module's weighted sum
    moe = _moe(k=1, balance_weight=0.5, z_loss_weight=0.25)
    _, s = moe(torch.randn(12, D), return_stats=True)
    torch.testing.assert_close(s.aux_loss, 0.5 * s.balance_loss + 0.25 * s.z_loss)


def test_training_noise_only_in_training():
    moe = _moe(k=1, router_jitter=0.2, router_noise=1.0, dropless=True)
    x = torch.randn(30, D)
    moe.eval()
    a, b = moe(x), moe(x)
    assert torch.equal(a, b)
    moe.train()
    torch.manual_seed(3)
    c = moe(x)
    torch.manual_seed(4)
    assert not torch.equal(c, moe(x))


def test_moe_from_dense_equals_dense_at_init():
    torch.manual_seed(0)
    dense = FeedForward(D, FF)
    x = torch.randn(2, 5, D)
    for kw in (dict(k=2, dropless=True), dict(k=1, normalize_gates=True, dropless=True)):
        moe = moe_from_dense(dense.fc1, dense.fc2, 4, noise=0.0, **kw)
        torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)
    noisy = moe_from_dense(
        dense.fc1, dense.fc2, 4, k=2, noise=0.05, generator=torch.Generator().manual_seed(0)
    )
    w = [e.fc1.weight for e in noisy.experts]
    assert not torch.equal(w[0], w[1])
    assert (w[0] - dense.fc1.weight).abs().max() < 0.5 * dense.fc1.weight.abs().max()
    with pytest.raises(ValueError, match="ffn_linear2"):
        moe_from_dense(dense.fc1, nn.Linear(FF, D + 1), 4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(k=5), "k: expected an int in \\[1, num_experts=4\\]"),
        (dict(k=0), "k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(eval_capacity_factor=0.0), "eval_capacity_factor"),
        (dict(activation="tanh"), "activation"),
        (dict(router_jitter=1.5), "router_jitter"),
        (dict(num_experts=0), "num_experts"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(D, FF, **{"num_experts": 4, **kw})


def test_bad_input_and_empty_batch():
    moe = _moe()
    with pytest.raises(ValueError, match=r"MoE input: expected shape \(B, T, 8\)"):
        moe(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="floating-point"):
        moe(torch.ones(4, D, dtype=torch.long))
    y, stats = moe(torch.zeros(0, D), return_stats=True)
    assert y.shape == (0, D) and stats.dropped_assignments == 0
    MoEConfig(D, FF, capacity_factor=0.0, dropless=True)  # allowed when dropless is explicit


def test_bert_layer_replacement_runs_and_equals_dense_at_init(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
    )
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 40, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    moes = replace_bert_ffn_with_moe(bert, num_experts=4, k=2, layers=[1], noise=0.0)
    assert list(moes) == [1] and moes[1].config.dropless and moes[1].config.activation == "gelu"
    out = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert moes[1].last_stats.expert_index.shape == (3, 9, 2)
    assert len(collect_moe_stats(bert)) == 1 and moe_aux_loss(bert).requires_grad
    bert.train()
    loss = bert(input_ids=ids, attention_mask=mask).last_hidden_state.sum() + moe_aux_loss(bert)
    loss.backward()
    assert moes[1].router.proj.weight.grad is not None
    with pytest.raises(ValueError, match="already has an MoE"):
        replace_bert_ffn_with_moe(bert, 4, 2, layers=[1])
    with pytest.raises(ValueError, match="layers"):
        replace_bert_ffn_with_moe(bert, 4, 2, layers=[5])

    # inside a DynamicBert: the same exits' logits at init, dynamic execution runs, FLOPs re-measured
    import json

    from dynets.policies.exit_policies import ConfidencePolicy
    from dynets.text import DynamicBert, DynamicBertConfig

    enc = json.loads(json.dumps(cfg.to_dict(), default=str))
    enc["max_position_embeddings"] = 64  # DynamicBert fits its FLOPs at lengths up to 32
    db = DynamicBert(DynamicBertConfig(encoder=enc, num_labels=2, labels=["a", "b"])).eval()
    ref_exits = db.all_exit_logits(ids)
    ref_dyn = db(ids, ConfidencePolicy(0.6))
    replace_bert_ffn_with_moe(db, num_experts=4, k=2, noise=0.0)
    for a, b in zip(db.all_exit_logits(ids), ref_exits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    dyn = db(ids, ConfidencePolicy(0.6))
    assert torch.equal(dyn.exit_index, ref_dyn.exit_index)
    assert (dyn.flops > ref_dyn.flops).all()  # k=2 experts of the dense FFN's size per token

    # the MoE layers are in the saved config: dynets.load rebuilds them, outputs identical
    with torch.no_grad():  # experts that differ, so a load into dense or wrong layers would show
        for moe in (m for m in db.modules() if isinstance(m, MoE)):
            for e in moe.experts:
                e.fc1.weight.add_(0.1 * torch.randn_like(e.fc1.weight))
    save(db, tmp_path / "moe-bert")
    back = load(tmp_path / "moe-bert").eval()
    assert back.config.moe["num_experts"] == 4 and back.config.moe["layers"] == [0, 1]
    for a, b in zip(back.all_exit_logits(ids), db.all_exit_logits(ids)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(back(ids, ConfidencePolicy(0.6)).flops, db(ids, ConfidencePolicy(0.6)).flops)
    with pytest.raises(ValueError, match="one MoE setting"):
        replace_bert_ffn_with_moe(back, num_experts=8, k=1, layers=[0])
    with pytest.raises(ValueError, match="expected width 1.0"):
        back.set_subnet(width=0.5)


# ------------------------------------------------------------------------- the zoo's transformer
TINY = dict(vocab_size=30, d_model=16, n_heads=2, n_layers=2, d_ff=32, num_experts=4, dropout=0.0)


def _ids() -> torch.Tensor:
    x = torch.randint(1, 30, (5, 9), generator=torch.Generator().manual_seed(2))
    x[0, 4:] = 0
    x[2, 1:] = 0
    return x


def test_moe_transformer_eval_decisions_flops_and_reference():
    torch.manual_seed(0)
    model = create_model("moe_transformer", **TINY, moe_layers=[1], eval_capacity_factor=0.6).eval()
    x = _ids()
    out = model(x)
    assert isinstance(out, DynamicOutput) and out.logits.shape == (5, 2) and out.exit_index is None
    experts = out.decisions["expert"]
    assert experts.shape == (5, 9, 1)
    lengths = torch.tensor([4, 9, 1, 9, 9])
    valid = torch.arange(9)[None] < lengths[:, None]
    assert (experts[~valid] == -1).all()  # padding never reaches an expert
    dropped = out.decisions["dropped"]
    assert int(dropped.sum()) == int((experts[valid] < 0).sum()) > 0  # counted per sample
    # FLOPs: every sample pays its own length; each expert run adds one expert's measured cost
    u = model.unit_costs()
    ran = (experts >= 0).sum((1, 2)).double()
    want = model.sample_flops(lengths, ran)
    assert torch.equal(out.flops, want)
    assert torch.all(
        out.flops[ran < lengths.double()]
        < model.sample_flops(lengths, lengths.double())[ran < lengths.double()]
    )
    assert u["expert"] == 2 * 2 * 16 * 32 and u["router"] == 2 * 16 * 4
    assert model.moe_blocks[0].config.eval_capacity_factor == 0.6


def test_moe_transformer_batch_equals_per_sample_loop():
    # dropless: a sentence's result cannot depend on its batch, so the compacted batched run must equal
    # each sentence run alone at its own length (no padding at all)
    torch.manual_seed(0)
    model = create_model("moe_transformer", **TINY, k=2, dropless=True).eval()
    x = _ids()
    out = model(x)
    lengths = [4, 9, 1, 9, 9]
    for b, L in enumerate(lengths):
        solo = model(x[b : b + 1, :L])
        torch.testing.assert_close(solo.logits[0], out.logits[b], atol=1e-5, rtol=1e-4)
        assert torch.equal(solo.decisions["expert"][0], out.decisions["expert"][b, :, :L])
        assert solo.flops[0] == out.flops[b]
    assert int(out.decisions["dropped"].sum()) == 0
    assert torch.equal(out.flops, model.full_cost(torch.tensor(lengths)))


def test_moe_transformer_training_output_and_aux_loss():
    torch.manual_seed(0)
    model = create_model("moe_transformer", **TINY)
    x = _ids().float()  # the train loop feeds float ids
    out = model(x)
    assert isinstance(out, MultiExitOutput) and out.logits.shape == (5, 2)
    stats = collect_moe_stats(model)
    assert len(stats) == 2
    torch.testing.assert_close(out.aux["loss"], stats[0].aux_loss + stats[1].aux_loss)
    out.aux["loss"].backward()
    assert model.blocks[0].ffn.router.proj.weight.grad is not None
    dense = create_model("dense_transformer", **TINY).eval()
    d = dense(_ids())
    assert d.decisions == {} and not dense.moe_blocks
    # equal compute per token: dense FFN = one expert (k=1), plus the router
    moe_eval = model.eval()(_ids())
    assert (moe_eval.flops >= d.flops).all()
    assert ((moe_eval.flops - d.flops) <= 2 * 9 * model.unit_costs()["router"]).all()


def test_moe_transformer_features_input_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = create_model("moe_transformer", input_size=3, d_model=16, n_heads=2, d_ff=32, num_experts=4, k=2)
    model.eval()
    x = torch.randn(4, 6, 3)
    out = model(x)
    assert out.decisions["expert"].shape == (4, 2, 6, 2)  # two MoE blocks
    save(model, tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.config == model.config
    o2 = again(x)
    assert torch.equal(o2.logits, out.logits) and torch.equal(o2.decisions["expert"], out.decisions["expert"])
    tok = create_model("moe_transformer", **TINY).eval()
    save(tok, tmp_path / "t")
    assert torch.equal(load(tmp_path / "t")(_ids()).logits, tok(_ids()).logits)


@pytest.mark.parametrize(
    "kw, x, match",
    [
        (TINY, torch.randint(0, 30, (2, 3, 1)), "token ids of shape"),
        (TINY, torch.full((2, 3), 30), r"token ids in \[0, 30\)"),
        (TINY, torch.rand(2, 3), "whole numbers"),
        (dict(input_size=3), torch.randn(2, 4, 2), r"features of shape \(B, T, 3\)"),
        (dict(input_size=3), torch.full((1, 4, 3), float("nan")), "finite"),
    ],
)
def test_moe_transformer_bad_input(kw, x, match):
    model = create_model("moe_transformer", **kw).eval()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_moe_transformer_bad_config_and_empty_batch():
    with pytest.raises(ValueError, match="k: expected"):
        create_model("moe_transformer", **{**TINY, "k": 5})
    with pytest.raises(ValueError, match="capacity_factor"):
        create_model("moe_transformer", **{**TINY, "capacity_factor": 0.0})
    with pytest.raises(ValueError, match="moe_layers"):
        create_model("moe_transformer", **{**TINY, "moe_layers": [2]})
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        create_model("moe_transformer", vocab_size=10, input_size=3)
    model = create_model("moe_transformer", **TINY).eval()
    out = model(torch.zeros(0, 5, dtype=torch.long))
    assert out.logits.shape == (0, 2) and out.flops.shape == (0,)
