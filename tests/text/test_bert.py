"""Dynamic BERT: layer-by-layer equivalence with Hugging Face, dynamic execution against the
all-exits reference, measured length-dependent costs, save/load, errors, and training recipes.

Most tests use a tiny randomly initialised BERT (saved with a tiny tokenizer into a temporary
directory); only the end-to-end checks load the real MiniLM from the shared folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dynets
from dynets.core.cost import measure_flops
from dynets.depth.learned import fit_learned_exits
from dynets.policies import (
    ConfidencePolicy,
    EntropyPolicy,
    ExitPolicy,
    LearnedPolicy,
    NeverExitPolicy,
    PatiencePolicy,
)
from dynets.policies.replay import replay_exits
from dynets.text import DynamicBert, encode_table, fit_length_cost, load_text_table, train_text
from dynets.text.bert_costs import eager_copy
from dynets.train.loop import TrainConfig
from dynets.train.losses import multi_exit_loss

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "the movie was good",
    "bad",
    "the film is not very fun and the plot is dull but the cast is smart",
    "i loved every minute of it",
    "awful acting",
    "this story is quite funny",
    "a great cast",
    "boring",
    "the plot was silly and the acting was bad but it was fun",
    "not good",
    "i hated it",
    "really smart and really funny film",
]
MINILM = "models/all-MiniLM-L6-v2"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_dir(tiny_bert_dir) -> Path:
    """A tiny random BERT (4 layers, hidden 32) with a word-level tokenizer, in the HF layout."""
    return tiny_bert_dir


def make_tiny(tiny_dir: Path, **kw) -> DynamicBert:
    """The tiny model with loud exit heads, so exits disagree and confidences spread out."""
    model = DynamicBert.from_pretrained_encoder(tiny_dir, ["neg", "pos", "mixed"], **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in model.heads:
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=gen))
    return model.eval()


@pytest.fixture
def tiny(tiny_dir) -> DynamicBert:
    return make_tiny(tiny_dir)


@pytest.fixture
def batch(tiny) -> torch.Tensor:
    x = tiny.encode(SENTENCES)  # (N, L), right-padded
    return torch.cat([x, torch.zeros(x.shape[0], 3, dtype=torch.long)], 1)  # extra padding columns


@pytest.fixture(scope="module")
def minilm(require_shared):
    return require_shared(MINILM)


def reference(model: DynamicBert, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.all_exit_logits(x)


def check_against_reference(model, x, policy, ref, learned=None) -> torch.Tensor:
    out = model(x, policy=policy)
    want = replay_exits(policy, ref, learned)
    assert torch.equal(out.exit_index, want)
    chosen = torch.stack([ref[k][i] for i, k in enumerate(want.tolist())])
    torch.testing.assert_close(out.logits, chosen, atol=1e-5, rtol=1e-5)
    for i in range(x.shape[0]):  # the batch-1 path's FLOPs and decisions, bit-equal to the batch rules'
        one = model(x[i : i + 1], policy=policy)  # (its exit may differ at a near-tie threshold)
        want_flops = model.sample_flops(model.lengths(x[i : i + 1]), one.exit_index, policy.needs_learned)
        assert torch.equal(one.flops, want_flops)
        assert one.decisions["exit_layer"].tolist() == [model._kept[int(one.exit_index)]]
    return out.exit_index


def midway(values: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring observed values near the median: no ties."""
    v = torch.unique(values.double())
    assert v.numel() >= 2
    i = v.numel() // 2
    return float((v[i - 1] + v[i]) / 2)


# ---------------------------------------------------------------------------- HF equivalence
def _check_layer_by_layer(model: DynamicBert, hf, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = hf(input_ids=x, attention_mask=(x != model.config.pad_token_id).long()).last_hidden_state
        got = model.forward_features(x)  # (B, L', H), trimmed to the longest sentence
    valid = (x != model.config.pad_token_id)[:, : got.shape[1]]
    assert got.shape[1] < x.shape[1]  # the extra padding was trimmed away
    torch.testing.assert_close(got[valid], want[:, : got.shape[1]][valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_by_layer_equals_hf_encoder_tiny(tiny, tiny_dir, batch, attn):
    hf = transformers.AutoModel.from_pretrained(tiny_dir, attn_implementation=attn).eval()
    model = DynamicBert(tiny.config, encoder=hf, tokenizer=tiny.tokenizer).eval()  # shares hf's layers
    assert model.hf_config._attn_implementation == attn
    _check_layer_by_layer(model, hf, batch)


def test_layer_by_layer_equals_hf_encoder_minilm(minilm):
    model = DynamicBert.from_pretrained_encoder(minilm, ["0", "1"]).eval()
    hf = transformers.AutoModel.from_pretrained(minilm).eval()
    x = model.encode(["a gripping, funny film", "dull", "it is neither as funny nor as sharp as it thinks"])
    _check_layer_by_layer(model, hf, torch.cat([x, torch.zeros(3, 2, dtype=torch.long)], 1))


# ---------------------------------------------------------------------------- dynamic execution
class ScriptedPolicy(ExitPolicy):
    """Test policy: row i (input order) leaves at exit plan[i]; its state is the row id, compacted
    with the batch by the executor."""

    kind = "scripted"

    def __init__(self, plan: list[int]) -> None:
        self.plan = torch.tensor(plan)

    def init_state(self, batch_size, device):
        return {"row": torch.arange(batch_size, device=device)}

    def step(self, k, logits, state, learned=None):
        return self.plan[state["row"]] == k, state


def test_compaction_and_retrim_follow_the_plan(tiny, batch):
    lengths = tiny.lengths(batch)
    longest = int(lengths.argmax())
    plan = [i % 4 for i in range(batch.shape[0])]
    plan[longest] = 0  # the longest sentence leaves first, so the survivors get re-trimmed
    widths: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: widths.append(a[0].shape[1])) for layer in tiny.layers
    ]
    try:
        out = tiny(batch, policy=ScriptedPolicy(plan))
    finally:
        for h in hooks:
            h.remove()
    ref = reference(tiny, batch)
    assert out.exit_index.tolist() == plan
    torch.testing.assert_close(
        out.logits, torch.stack([ref[k][i] for i, k in enumerate(plan)]), atol=1e-5, rtol=1e-5
    )
    assert widths[0] == int(lengths.max()) and widths[1] < widths[0]  # padding re-trimmed after exit 0
    assert widths[-1] == int(lengths[[i for i, k in enumerate(plan) if k == 3]].max())


def test_confidence_per_exit_thresholds_match_reference(tiny, batch):
    ref = reference(tiny, batch)
    probe = ConfidencePolicy(0.5)
    thresholds = [midway(probe.score(ref[k])) for k in range(tiny.num_exits - 1)]
    idx = check_against_reference(tiny, batch, ConfidencePolicy(thresholds), ref)
    assert len(set(idx.tolist())) >= 3  # samples really leave at different exits


def test_entropy_and_patience_match_reference(tiny, batch):
    ref = reference(tiny, batch)
    ent = [1.0 - midway(EntropyPolicy(0.5).score(ref[k])) for k in range(tiny.num_exits - 1)]
    assert len(set(check_against_reference(tiny, batch, EntropyPolicy(ent), ref).tolist())) >= 2
    for patience in (1, 2):
        check_against_reference(tiny, batch, PatiencePolicy(patience), ref)
    idx = check_against_reference(tiny, batch, NeverExitPolicy(), ref)
    assert (idx == tiny.num_exits - 1).all()


def test_learned_exits_match_reference(tiny, batch):
    ref = reference(tiny, batch)
    labels = torch.arange(batch.shape[0]) % 3
    fit_learned_exits(tiny, ref, labels, steps=20)
    assert not any(p.requires_grad for p in tiny.exit_predictors.parameters())
    with torch.no_grad():
        learned = tiny.learned_scores(ref)  # (N, K-1)
    assert learned.shape == (batch.shape[0], tiny.num_exits - 1)
    thresholds = [midway(learned[:, k]) for k in range(tiny.num_exits - 1)]
    idx = check_against_reference(tiny, batch, LearnedPolicy(thresholds), ref, learned)
    # learned exits also pay for the predictors they consulted: one per exit passed, none at the last
    pred = measure_flops(tiny.exit_predictors[0], torch.zeros(1, 3))
    plain = tiny.sample_flops(tiny.lengths(batch), idx)
    got = tiny(batch, policy=LearnedPolicy(thresholds)).flops
    assert got.tolist() == (plain + (idx + 1).clamp(max=tiny.num_exits - 1) * pred).tolist()


def test_batch_one_and_permutation_equal_batched(tiny, batch):
    ref = reference(tiny, batch)
    policy = ConfidencePolicy(
        [midway(ConfidencePolicy(0.5).score(ref[k])) for k in range(tiny.num_exits - 1)]
    )
    full = tiny(batch, policy=policy)
    for i in range(batch.shape[0]):
        one = tiny(batch[i : i + 1], policy=policy)
        assert one.exit_index.tolist() == full.exit_index[i : i + 1].tolist()
        torch.testing.assert_close(one.logits, full.logits[i : i + 1], atol=1e-5, rtol=1e-5)
        assert one.flops.tolist() == full.flops[i : i + 1].tolist()
    perm = torch.randperm(batch.shape[0], generator=torch.Generator().manual_seed(3))
    shuffled = tiny(batch[perm], policy=policy)
    assert torch.equal(shuffled.exit_index, full.exit_index[perm])
    torch.testing.assert_close(shuffled.logits, full.logits[perm], atol=1e-5, rtol=1e-5)
    assert torch.equal(shuffled.flops, full.flops[perm])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooled_throughput_mode_equals_reference(tiny_dir, batch, pooling):
    """run_pooled: survivors of consecutive batches share later layers (padded to the longest of
    the group), yet every sentence takes the reference's exit with its logits and FLOPs."""
    model = make_tiny(tiny_dir, exit_pooling=pooling)
    x = torch.cat([batch, batch.flip(0)])  # 24 sentences of mixed lengths, so groups need padding
    ref = reference(model, x)
    for policy in (
        ConfidencePolicy([midway(ConfidencePolicy(0.5).score(ref[k])) for k in range(model.num_exits - 1)]),
        PatiencePolicy(1),
        NeverExitPolicy(),
    ):
        want = replay_exits(policy, ref)
        per_batch = model(x, policy=policy)
        for bs in (1, 5, 8, 24, 100):
            got = model.run_pooled(x, bs, policy)
            assert torch.equal(got.exit_index, want)
            chosen = torch.stack([ref[k][i] for i, k in enumerate(want.tolist())])
            torch.testing.assert_close(got.logits, chosen, atol=1e-5, rtol=1e-5)
            assert torch.equal(got.flops, per_batch.flops)
            assert torch.equal(got.decisions["exit_layer"], per_batch.decisions["exit_layer"])
    assert model.run_pooled(x[:0], 4).logits.shape == (0, 3)
    with pytest.raises(ValueError, match="batch_size"):
        model.run_pooled(x, 0)
    with pytest.raises(ValueError, match="learned exits"):
        make_tiny(tiny_dir, learned_exits=False).run_pooled(x, 4, LearnedPolicy(0.5))


def test_training_mode_returns_every_exit(tiny, batch):
    tiny.train()
    out = tiny(batch)
    assert isinstance(out, dynets.MultiExitOutput) and len(out.exit_logits) == tiny.num_exits
    multi_exit_loss(out.exit_logits, torch.zeros(batch.shape[0], dtype=torch.long)).backward()
    assert tiny.layers[0].attention.self.query.weight.grad is not None


# ---------------------------------------------------------------------------- costs
def test_sample_flops_are_measured_costs_at_own_length(tiny, batch):
    twin = eager_copy(tiny.layers[0])  # the CPU SDPA kernel is invisible to the counter; eager is not
    H = tiny.config.encoder["hidden_size"]

    def measured(L: int, k: int) -> int:
        layer = measure_flops(twin, torch.zeros(1, L, H))
        head = measure_flops(tiny.heads[0], torch.zeros(1, L, H))
        emb = measure_flops(tiny.embeddings, torch.zeros(1, L, dtype=torch.long))
        return emb + (k + 1) * (layer + head)

    out = tiny(batch, policy=ScriptedPolicy([i % 4 for i in range(batch.shape[0])]))
    lengths = tiny.lengths(batch)
    want = [measured(int(L), int(k)) for L, k in zip(lengths, out.exit_index)]
    assert out.flops.tolist() == want
    assert tiny.full_cost(lengths).tolist() == [
        measured(int(L), 3) - 3 * measure_flops(tiny.heads[0], torch.zeros(1, int(L), H)) for L in lengths
    ]


def test_cost_fit_reproduces_other_lengths(tiny):
    twin = eager_copy(tiny.layers[0])
    H = tiny.config.encoder["hidden_size"]

    def layer(L: int) -> int:
        return measure_flops(twin, torch.zeros(1, L, H))

    fit = fit_length_cost(layer, lengths=(4, 12, 20), check=None)
    for L in (1, 7, 33, 64):
        assert fit.at(L) == layer(L)
    assert fit.quadratic > 0  # the attention scores are counted
    assert tiny.unit_costs()["layer"] == fit
    with pytest.raises(RuntimeError, match="not quadratic"):
        fit_length_cost(lambda L: L**3)


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny, batch, tmp_path):
    ref = reference(tiny, batch)
    tiny.policy = ConfidencePolicy([midway(ConfidencePolicy(0.5).score(ref[k])) for k in range(3)])
    before = tiny(batch)
    dynets.save(tiny, tmp_path / "m")
    loaded = dynets.load(tmp_path / "m")
    assert isinstance(loaded, DynamicBert) and loaded.config == tiny.config
    after = loaded(batch)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.exit_index, before.exit_index)
    assert torch.equal(after.flops, before.flops)
    assert loaded.policy.to_dict() == tiny.policy.to_dict()
    assert torch.equal(loaded.encode(SENTENCES), tiny.encode(SENTENCES))  # tokenizer restored


# ---------------------------------------------------------------------------- errors and input
def test_not_a_bert_directory_and_missing_tokenizer(tmp_path, tiny_dir):
    gpt = tmp_path / "gpt2"
    transformers.GPT2Model(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt)
    with pytest.raises(ValueError, match=r"gpt2.*encoder\.layer"):
        DynamicBert.from_pretrained_encoder(gpt, ["a", "b"])
    bare = tmp_path / "no-tokenizer"
    transformers.AutoModel.from_pretrained(tiny_dir).save_pretrained(bare)
    with pytest.raises(ValueError, match=r"no-tokenizer.*no tokenizer"):
        DynamicBert.from_pretrained_encoder(bare, ["a", "b"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DynamicBert.from_pretrained_encoder(tmp_path / "nowhere", ["a", "b"])


def test_missing_transformers_names_the_extra(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install dynets\[text\]"):
        DynamicBert.from_pretrained_encoder(tiny_dir, ["a", "b"])


def test_import_does_not_need_transformers():
    code = "import sys, dynets, dynets.text; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_encode_empty_and_too_long(tiny_dir):
    model = make_tiny(tiny_dir, max_length=6)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        model.encode(["good", "", "bad"])
    with pytest.warns(UserWarning, match="1 of 2 texts"):
        x = model.encode(["good", "the movie was not very good and the plot was dull"])
    assert x.shape == (2, 6) and x[1, -1].item() == 3  # [SEP]: index 3 of the tiny vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(["good"])  # nothing truncated: no warning


def test_bad_inputs_fail_early(tiny, batch):
    with pytest.raises(TypeError, match="int64"):
        tiny(batch.float())
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        tiny(batch[None])
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        tiny(batch + 200)
    empty = tiny(batch[:0])
    assert empty.logits.shape == (0, 3) and empty.exit_index.numel() == 0 and empty.flops.numel() == 0


# ---------------------------------------------------------------------------- training recipes
def test_recipes_freeze_what_they_should(tiny_dir, tmp_path, monkeypatch):
    import dynets.text.dynabert as dynabert
    import dynets.text.recipes as recipes

    model = make_tiny(tiny_dir).train()
    table_path = tmp_path / "t.tsv"
    rows = "".join(f"{s}\t{['neg', 'pos'][i % 2]}\n" for i, s in enumerate(SENTENCES))
    table_path.write_text("sentence\tlabel\n" + rows)
    data = encode_table(model, load_text_table(table_path))
    calls: list[tuple[set[str], object, float]] = []
    lrs: list[float] = []
    snaps: list[torch.Tensor] = []
    teachers: list = []
    real_train = recipes.train

    def spy(net, d, cfg, **kw):
        names = {
            n.split(".")[1] + ("." + n.split(".")[2] if n.startswith("model.heads") else "")
            for n, p in net.named_parameters()
            if p.requires_grad
        }
        calls.append((names, cfg.exit_weights, cfg.distill))
        lrs.append(cfg.lr)
        snaps.append(net.model.layers[0].output.dense.weight.detach().clone())  # the encoder at the start
        teachers.append(net.__dict__.get("teacher"))
        return real_train(net, d, cfg, **kw)

    monkeypatch.setattr(recipes, "train", spy)
    monkeypatch.setattr(dynabert, "train", spy)  # joint_distill's stage 3 distils through train_dynabert
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, optimizer="adamw", progress=False)
    with pytest.raises(ValueError, match="two_stage"):
        train_text(model, data, "deebert", cfg)
    early = {"heads.0", "heads.1", "heads.2"}
    expected = {
        "joint": [({"embeddings", "layers", *early, "heads.3"}, "linear", 0.0)],
        "two_stage": [({"embeddings", "layers", "heads.3"}, [0, 0, 0, 1], 0.0), (early, [1, 1, 1, 0], 0.0)],
        "distill": [({"embeddings", "layers", "heads.3"}, [0, 0, 0, 1], 0.0), (early, [1, 1, 1, 0], 1.0)],
        "joint_distill": [
            ({"embeddings", "layers", "heads.3"}, [0, 0, 0, 1], 0.0),
            (early, [1, 1, 1, 0], 1.0),
            ({"embeddings", "layers", *early, "heads.3"}, [1, 1, 1, 1], 0.0),  # KD weight: train_dynabert's
        ],
    }
    for recipe, want in expected.items():
        calls.clear()
        lrs.clear()
        snaps.clear()
        teachers.clear()
        w0 = model.heads[0].classifier.weight.detach().clone()
        result = train_text(model, data, recipe, cfg, eval_data=data)
        assert calls == want
        if recipe == "joint_distill":  # the joint stage runs at a lower learning rate ...
            assert lrs == [cfg.lr, cfg.lr, pytest.approx(cfg.lr * recipes.JOINT_DISTILL["lr_scale"])]
            # ... taught by the frozen model as stage 1 left it (the encoder stage 2 started from)
            teacher = teachers[-1]
            assert teacher is not None and teacher is not model
            assert torch.equal(teacher.layers[0].output.dense.weight, snaps[1])
            assert not torch.equal(model.layers[0].output.dense.weight, snaps[1])  # the student moved
            assert not any(p.requires_grad for p in teacher.parameters())
        assert [r["stage"] for r in result.history] == list(range(1, len(want) + 1))
        assert "val_acc_per_exit" in result.history[-1]  # the loop's evaluation saw every exit
        assert not torch.equal(model.heads[0].classifier.weight, w0)
    assert all(p.requires_grad for p in model.layers.parameters())  # flags restored afterwards
    assert not any(p.requires_grad for p in model.exit_predictors.parameters())


def test_joint_training_on_sst2_lowers_the_loss(minilm, require_shared):
    table = load_text_table(require_shared("data/sst2/train.tsv"))
    model = DynamicBert.from_pretrained_encoder(minilm, table.classes, max_length=32)
    torch.manual_seed(0)
    idx = torch.randperm(len(table), generator=torch.Generator().manual_seed(0))[:256].tolist()
    table.texts, table.labels = [table.texts[i] for i in idx], [table.labels[i] for i in idx]
    with pytest.warns(UserWarning, match="truncated"):
        data = encode_table(model, table)
    probe_x, probe_y = data.x[:64], data.y[:64]

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(multi_exit_loss(model.all_exit_logits(probe_x), probe_y, weights="linear"))

    before = loss()
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-4, optimizer="adamw", weight_decay=0.01, progress=False)
    result = train_text(model, data, "joint", cfg)
    assert len(result.history) == 1 and result.model is model
    after = loss()
    print(f"multi-exit loss on 64 training sentences: {before:.4f} -> {after:.4f}")
    assert after < before


def test_mean_pooled_exits_match_reference_and_an_independent_mean(tiny_dir, batch):
    """exit_pooling="mean": early exits average the valid tokens (padding excluded, also after the
    batch is compacted and re-trimmed); the last exit stays [CLS]; dynamic = all-exits reference."""
    model = make_tiny(tiny_dir, exit_pooling="mean")
    assert [h.pooling for h in model.heads] == ["mean"] * (len(model.heads) - 1) + ["cls"]
    ref = reference(model, batch)
    probe = ConfidencePolicy(0.5)
    thresholds = [midway(probe.score(ref[k])) for k in range(model.num_exits - 1)]
    idx = check_against_reference(model, batch, ConfidencePolicy(thresholds), ref)
    assert len(set(idx.tolist())) >= 2
    # independent check of exit 0 on one sentence run alone (no padding at all)
    one = batch[1:2, : int(model.lengths(batch[1:2]))]
    with torch.no_grad():
        h = model.embeddings(input_ids=one)
        h = model._layer(model._kept[0], h, None)
        want = model.heads[0].classifier(h.mean(1))
    torch.testing.assert_close(ref[0][1:2], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exit_pooling"):
        make_tiny(tiny_dir, exit_pooling="max")
