"""DynaBERT: width and depth sub-networks of Dynamic BERT, importance rewiring, and their training.

Every check of a sub-network compares against an independent reference: the HF layer itself at
width 1, a copy of the model whose dropped heads and neurons are zeroed (run through the HF layers)
at narrower widths, and a policy replayed on the sub-network's all-exit logits for early exit.
A tiny random BERT is used throughout; the MiniLM check needs the shared folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dynets
from dynets.core.cost import measure_flops
from dynets.policies import ConfidencePolicy, LearnedPolicy, PatiencePolicy
from dynets.policies.replay import replay_exits
from dynets.text import DynamicBert, DynamicBertConfig, TextDataset, encode_table, load_text_table
from dynets.text.bert_costs import eager_copy
from dynets.text.dynabert import (
    DEPTHS,
    WIDTHS,
    estimate_importance,
    kept_layers,
    layer_sizes,
    narrow_layer,
    rewire,
    train_dynabert,
)
from dynets.train.loop import TrainConfig

transformers = pytest.importorskip("transformers")

WORDS = "the a movie film plot cast is was good bad great dull not very fun and but it i loved hated".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
SENTENCES = [
    "the movie was good",
    "bad",
    "the film is not very fun and the plot is dull but the cast is great",
    "i loved it",
    "a dull plot",
    "the cast was very good",
    "great fun",
    "not good and not fun",
    "i hated the movie but the cast was great",
    "dull",
    "it was bad",
    "a very good film",
]
H, HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 8, 64, 4
MINILM = "models/all-MiniLM-L6-v2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-dynabert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=100,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(d)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    return d


def make_tiny(tiny_dir: Path) -> DynamicBert:
    model = DynamicBert.from_pretrained_encoder(tiny_dir, ["neg", "pos", "mixed"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*model.heads.parameters(), *model.exit_predictors.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))  # loud exits, so confidences spread out
    return model.eval()


@pytest.fixture
def tiny(tiny_dir) -> DynamicBert:
    return make_tiny(tiny_dir)


@pytest.fixture
def batch(tiny) -> torch.Tensor:
    x = tiny.encode(SENTENCES)
    return torch.cat([x, torch.zeros(x.shape[0], 2, dtype=torch.long)], 1)  # extra padding columns


@pytest.fixture
def data(tiny, batch) -> TextDataset:
    return TextDataset(batch, torch.arange(batch.shape[0]) % 3, ["neg", "pos", "mixed"])


def midway(values: torch.Tensor) -> float:
    v = torch.unique(values.double())
    i = v.numel() // 2
    return float((v[i - 1] + v[i]) / 2)


def zeroed_reference(model: DynamicBert, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Exit logits and hidden states of the current sub-net computed the slow way: a copy of the
    model at full width whose dropped heads and neurons contribute zero (their output-projection
    columns zeroed), run through the Hugging Face layers that the depth keeps."""
    width, _ = model.subnet
    n_heads, head_dim, n_ffn = layer_sizes(model.layers[0])
    heads, neurons = max(1, round(n_heads * width)), max(1, round(n_ffn * width))
    ref = copy.deepcopy(model).set_subnet(1.0, 1.0)
    with torch.no_grad():
        for layer in ref.layers:
            layer.attention.output.dense.weight[:, heads * head_dim :] = 0.0
            layer.output.dense.weight[:, neurons:] = 0.0
        ids, valid, _ = ref._prepare(x)
        h = ref.embeddings(input_ids=ids)
        mask = ref._mask(valid, h)
        logits, hidden = [], []
        for i in model.active_layers:
            h = ref.layers[i](h, mask)
            hidden.append(h)
            logits.append(ref.heads[i](h))
    return logits, hidden


# ---------------------------------------------------------------------------- width 1, depth 1
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_narrow_layer_at_full_width_equals_hf_layer(tiny, tiny_dir, batch, attn):
    hf = transformers.AutoModel.from_pretrained(tiny_dir, attn_implementation=attn).eval()
    model = DynamicBert(tiny.config, encoder=hf).eval()
    ids, valid, _ = model._prepare(batch)
    h = model.embeddings(input_ids=ids)
    mask = model._mask(valid, h)
    assert mask is not None  # padding inside the batch: the mask is exercised
    with torch.no_grad():
        for layer in model.layers:
            want = layer(h, mask)
            got = narrow_layer(layer, h, mask, HEADS, FFN)
            if attn == "sdpa":  # the same ops in the same order
                assert torch.equal(got, want)
            else:  # HF's eager softmax vs SDPA: equal up to float rounding
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            eager = narrow_layer(layer, h, mask, HEADS, FFN, eager=True)
            torch.testing.assert_close(eager, want, atol=1e-5, rtol=1e-5)
            h = want


def test_full_subnet_is_the_original_model(tiny, tiny_dir, batch):
    fresh = make_tiny(tiny_dir)
    assert tiny.subnet == (1.0, 1.0) and tiny.num_exits == LAYERS
    tiny.set_subnet(0.5, 0.5)
    assert tiny.subnet == (0.5, 0.5) and tiny.num_exits == 2 and tiny.active_layers == [0, 2]
    tiny.set_subnet()  # back to full
    with torch.no_grad():
        for a, b in zip(tiny.all_exit_logits(batch), fresh.all_exit_logits(batch), strict=True):
            assert torch.equal(a, b)
        hf = transformers.AutoModel.from_pretrained(tiny_dir).eval()
        want = hf(input_ids=batch, attention_mask=(batch != 0).long()).last_hidden_state
        got = tiny.forward_features(batch)
    valid = (batch != 0)[:, : got.shape[1]]
    torch.testing.assert_close(got[valid], want[:, : got.shape[1]][valid], atol=1e-5, rtol=1e-5)
    out, ref = tiny(batch), fresh(batch)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.flops, ref.flops)


def test_depth_schedule_is_even_and_matches_dynabert():
    assert kept_layers(12, 0.75) == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # DynaBERT drops layers 4, 8, 12
    assert kept_layers(12, 0.5) == [0, 2, 4, 6, 8, 10]
    assert kept_layers(6, 0.5) == [0, 2, 4] and kept_layers(6, 1.0) == list(range(6))
    assert kept_layers(4, 0.75) == [0, 1, 2] and kept_layers(4, 0.01) == [0]
    assert WIDTHS == (0.25, 0.5, 0.75, 1.0) and DEPTHS == (0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------- narrow sub-networks
@pytest.mark.parametrize("width,depth", [(0.5, 0.5), (0.25, 0.75), (0.75, 1.0), (1.0, 0.5)])
def test_subnet_equals_zeroed_reference(tiny, batch, width, depth):
    tiny.set_subnet(width, depth)
    with torch.no_grad():
        logits, hidden, valid = tiny.exits_and_hidden(batch)
    want_logits, want_hidden = zeroed_reference(tiny, batch)
    assert len(logits) == len(want_logits) == len(kept_layers(LAYERS, depth))
    for a, b in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(hidden, want_hidden, strict=True):
        torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)


class LinearShapes(TorchFunctionMode):
    """Records the weight shape of every F.linear call and the query shape of every SDPA call."""

    def __init__(self):
        super().__init__()
        self.linear, self.sdpa = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.linear.append(tuple(args[1].shape))
        elif func is F.scaled_dot_product_attention:
            self.sdpa.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("width", [0.25, 0.5, 0.75])
def test_narrow_widths_run_smaller_matrices(tiny, batch, width):
    tiny.set_subnet(width, 0.5)
    heads, neurons = round(HEADS * width), round(FFN * width)
    with LinearShapes() as seen, torch.no_grad():
        tiny.all_exit_logits(batch)
    per_layer = [(heads * HEAD_DIM, H)] * 3 + [(H, heads * HEAD_DIM), (neurons, H), (H, neurons)]
    assert seen.linear == (per_layer + [(3, H)]) * 2  # 2 kept layers, each followed by its exit head
    assert [s[1] for s in seen.sdpa] == [heads, heads]  # (B, heads kept, L, head_dim)
    # the weights used are views of the full parameters: one set serves every width
    q = tiny.layers[0].attention.self.query.weight
    assert q[: heads * HEAD_DIM].untyped_storage().data_ptr() == q.untyped_storage().data_ptr()


def test_flops_follow_width_and_depth(tiny, batch):
    lengths = tiny.lengths(batch)
    # the narrow layer's measured cost is exactly the sliced matmuls: QKV, scores, P V, out, FFN
    for width in WIDTHS:
        hd, n = round(HEADS * width) * HEAD_DIM, round(FFN * width)
        for L in (1, 7, 20):
            want = 2 * L * H * 3 * hd + 2 * 2 * L * L * hd + 2 * L * hd * H + 2 * 2 * L * H * n
            assert tiny.layer_cost(width).at(L) == want
    # width 1 through the sliced path costs what the HF layer costs (counted on its eager twin)
    twin = eager_copy(tiny.layers[0])
    assert tiny.layer_cost(1.0).at(13) == measure_flops(twin, torch.zeros(1, 13, H))
    full = tiny.full_cost(lengths)
    previous = None
    for width, depth in [(1.0, 1.0), (0.75, 1.0), (0.5, 0.75), (0.25, 0.5)]:
        tiny.set_subnet(width, depth)
        static = tiny.full_cost(lengths)
        assert previous is None or (static < previous).all()
        previous = static
    assert (previous < 0.3 * full).all()


def test_early_exit_with_narrow_subnet_matches_reference(tiny, batch):
    tiny.set_subnet(0.5, 0.75)  # layers 0, 1, 2 at half width
    K = tiny.num_exits
    with torch.no_grad():
        ref = tiny.all_exit_logits(batch)
    want_ref, _ = zeroed_reference(tiny, batch)
    for a, b in zip(ref, want_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    thresholds = [midway(ConfidencePolicy(0.5).score(ref[k])) for k in range(K - 1)]
    emb = tiny.unit_costs()["embeddings"]
    head = tiny.unit_costs()["head"]
    layer = tiny.layer_cost(0.5)
    for policy in (ConfidencePolicy(thresholds), PatiencePolicy(1)):
        out = tiny(batch, policy=policy)
        want = replay_exits(policy, ref)
        assert torch.equal(out.exit_index, want)
        torch.testing.assert_close(
            out.logits, torch.stack([ref[k][i] for i, k in enumerate(want.tolist())]), atol=1e-5, rtol=1e-5
        )
        assert out.decisions["exit_layer"].tolist() == [tiny.active_layers[k] for k in want.tolist()]
        flops = [
            emb.at(int(L)) + (k + 1) * (layer.at(int(L)) + head.at(int(L)))
            for L, k in zip(tiny.lengths(batch), want)
        ]
        assert out.flops.tolist() == flops
    assert len(set(tiny(batch, policy=ConfidencePolicy(thresholds)).exit_index.tolist())) >= 2
    # batch size 1 takes the same exits
    policy = ConfidencePolicy(thresholds)
    full = tiny(batch, policy=policy)
    for i in range(batch.shape[0]):
        one = tiny(batch[i : i + 1], policy=policy)
        assert one.exit_index.tolist() == full.exit_index[i : i + 1].tolist()
        torch.testing.assert_close(one.logits, full.logits[i : i + 1], atol=1e-5, rtol=1e-5)
    # learned exits: the predictors of the kept layers, shared across widths
    with torch.no_grad():
        learned = tiny.learned_scores(ref)
        direct = torch.stack([tiny.exit_predictors[i](ref[k]) for k, i in enumerate([0, 1])], 1)
    torch.testing.assert_close(learned, direct)
    lp = LearnedPolicy([midway(learned[:, k]) for k in range(K - 1)])
    assert torch.equal(tiny(batch, policy=lp).exit_index, replay_exits(lp, ref, learned))


# ---------------------------------------------------------------------------- rewiring
def test_rewire_keeps_full_width_and_puts_important_first(tiny, batch, data):
    with torch.no_grad():
        before = tiny.all_exit_logits(batch)
    old = [layer.attention.self.query.weight.detach().clone() for layer in tiny.layers]
    old_ffn = [layer.intermediate.dense.weight.detach().clone() for layer in tiny.layers]
    r = rewire(tiny, data, batches=3, batch_size=4)
    assert all(p.grad is None for p in tiny.parameters())  # only the masks' gradients were taken
    assert tiny.config.rewired and r.head_importance.shape == (LAYERS, HEADS)
    assert r.neuron_importance.shape == (LAYERS, FFN)
    with torch.no_grad():
        after = tiny.all_exit_logits(batch)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # new position i holds old head / neuron order[i], most important first
    for li, layer in enumerate(tiny.layers):
        q = layer.attention.self.query.weight.view(HEADS, HEAD_DIM, H)
        assert torch.equal(q, old[li].view(HEADS, HEAD_DIM, H)[r.head_order[li]])
        assert torch.equal(layer.intermediate.dense.weight, old_ffn[li][r.neuron_order[li]])
    assert (r.head_importance.gather(1, r.head_order).diff(dim=1) <= 0).all()
    # importance measured again on the rewired model comes out sorted: the top heads are the first ones
    imp_h, imp_n = estimate_importance(tiny, data, batches=3, batch_size=4)
    torch.testing.assert_close(imp_h, r.head_importance.gather(1, r.head_order), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(imp_n, r.neuron_importance.gather(1, r.neuron_order), rtol=1e-3, atol=1e-9)


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip_keeps_subnet_and_rewiring(tiny, batch, data, tmp_path):
    rewire(tiny, data, batches=2, batch_size=4)
    tiny.set_subnet(0.5, 0.75)
    tiny.policy = PatiencePolicy(1)
    before = tiny(batch)
    dynets.save(tiny, tmp_path / "m")
    loaded = dynets.load(tmp_path / "m")
    assert loaded.subnet == (0.5, 0.75) and loaded.config.rewired and loaded.config == tiny.config
    after = loaded(batch)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.exit_index, before.exit_index)
    assert torch.equal(after.flops, before.flops)
    for m in (loaded, tiny):
        m.set_subnet(1.0, 1.0)
    assert torch.equal(loaded(batch).logits, tiny(batch).logits)


# ---------------------------------------------------------------------------- errors
def test_bad_subnet_arguments_fail_clearly(tiny, data):
    tiny.set_subnet(0.5, 0.75)
    for width in (0.3, 0.0, 1.5, "0.5", True, float("nan"), None):
        with pytest.raises(ValueError, match=r"width: expected one of \[0.25, 0.5, 0.75, 1.0\]"):
            tiny.set_subnet(width=width)
    for depth in (0, -0.5, 1.5, float("nan"), "1"):
        with pytest.raises(ValueError, match=r"depth: expected a float in \(0, 1\]"):
            tiny.set_subnet(1.0, depth)
    assert tiny.subnet == (0.5, 0.75)  # a failed call changes nothing
    cfg = tiny.config.__dict__ | {"width": 0.6}
    with pytest.raises(ValueError, match="width"):
        DynamicBertConfig(**cfg)
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="width"):
        train_dynabert(tiny, data, cfg, widths=(0.5, 0.33))
    with pytest.raises(ValueError, match="depth"):
        train_dynabert(tiny, data, cfg, depths=(0.0, 1.0))
    with pytest.raises(ValueError, match="widths"):
        train_dynabert(tiny, data, cfg, widths=())
    with pytest.raises(ValueError, match="exit_weights"):
        train_dynabert(tiny, data, TrainConfig(epochs=1, exit_weights=[0, 0, 0, 1], progress=False))
    with pytest.raises(ValueError, match="batches"):
        rewire(tiny, data, batches=0)
    with pytest.raises(ValueError, match=r"\.y \(N,\)"):
        rewire(tiny, TextDataset(data.x, data.y[:3], data.classes))


# ---------------------------------------------------------------------------- training
def test_train_dynabert_sandwich_runs_and_is_deterministic(tiny_dir, data, monkeypatch):
    calls: list[tuple[int, float, float]] = []
    real = DynamicBert.set_subnet

    def spy(self, width=1.0, depth=1.0):
        calls.append((id(self), width, depth))
        return real(self, width, depth)

    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, optimizer="adamw", progress=False, seed=3)
    finals = []
    for _ in range(2):
        model = make_tiny(tiny_dir).set_subnet(0.75, 0.5)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        calls.clear()
        monkeypatch.setattr(DynamicBert, "set_subnet", spy)
        result = train_dynabert(model, data, cfg, eval_data=data)
        monkeypatch.setattr(DynamicBert, "set_subnet", real)
        assert result.model is model and model.subnet == (0.75, 0.5)  # the setting is restored
        assert len(result.history) == 1 and len(result.history[0]["val_acc_per_exit"]) == LAYERS
        mine = [(w, d) for i, w, d in calls if i == id(model)]
        steps = [mine[j : j + 4] for j in range(0, 12, 4)]  # 3 steps x (largest, smallest, 2 random)
        for step in steps:
            assert step[0] == (1.0, 1.0) and step[1] == (0.25, 0.5) and len(set(step)) == 4
        state = model.state_dict()
        for name in (
            "layers.0.attention.self.query.weight",
            "layers.3.output.dense.weight",
            "heads.0.classifier.weight",
        ):
            assert not torch.equal(state[name], start[name]), name
        for name in state:
            if name.startswith("exit_predictors."):  # fitted separately, never by training
                assert torch.equal(state[name], start[name]), name
        finals.append(state)
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


# ---------------------------------------------------------------------------- the real encoder
def test_minilm_rewired_subnets(require_shared):
    """MiniLM (12 heads, FFN 1536): rewiring on SST-2 sentences keeps the full model's outputs, and
    the half-width, half-depth sub-net equals its zeroed reference at about a quarter of the FLOPs."""
    model = DynamicBert.from_pretrained_encoder(require_shared(MINILM), ["0", "1"]).eval()
    table = load_text_table(require_shared("data/sst2/dev.tsv"))
    table.texts, table.labels, table.label_ids = table.texts[:16], table.labels[:16], table.label_ids[:16]
    data = encode_table(model, table)
    x = data.x[:6]
    with torch.no_grad():
        before = model.all_exit_logits(x)
    r = rewire(model, data, batches=2, batch_size=8)
    assert r.head_importance.shape == (6, 12) and r.neuron_importance.shape == (6, 1536)
    with torch.no_grad():
        for a, b in zip(before, model.all_exit_logits(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    full = model.full_cost(model.lengths(x))
    model.set_subnet(0.5, 0.5)
    assert model.active_layers == [0, 2, 4]
    with torch.no_grad():
        got = model.all_exit_logits(x)
    for a, b in zip(got, zeroed_reference(model, x)[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    ratio = model.full_cost(model.lengths(x)) / full
    assert ((ratio > 0.2) & (ratio < 0.3)).all()
