"""Text evaluation helpers: length-sorted batching, dynamic runs scattered back to input order
against the all-exits reference, replayed policy costs against measured ones, and the grid."""

from __future__ import annotations

import pytest
import torch

from dynets.bench.text_eval import collect_text, run_text, static_logits, subnet_grid, sweep_text
from dynets.policies import ConfidencePolicy, PatiencePolicy
from dynets.text.data import length_batches

transformers = pytest.importorskip("transformers")

WORDS = "good bad great awful fun dull the a movie film plot is was not very and but it".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from dynets.text import DynamicBert

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=4, intermediate_size=32,
        vocab_size=len(VOCAB), max_position_embeddings=32,
    )  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(d)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    m = DynamicBert.from_pretrained_encoder(d, ["neg", "pos"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # loud heads, so exits disagree and confidences spread out
        for head in m.heads:
            head.classifier.weight.copy_(3 * torch.randn(head.classifier.weight.shape, generator=gen))
    yield m.eval()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(model):
    gen = torch.Generator().manual_seed(2)
    texts = [
        " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=gen))
        for n in torch.randint(1, 15, (23,), generator=gen)
    ]
    x = model.encode(texts)
    return torch.cat([x, torch.zeros(x.shape[0], 2, dtype=torch.long)], 1), torch.arange(23) % 2


def test_length_batches_sort_trim_and_cover(data):
    x, _ = data
    batches = length_batches(x, 5)
    lengths = ((x != 0) * torch.arange(1, x.shape[1] + 1)).amax(1)
    assert sorted(torch.cat([i for i, _ in batches]).tolist()) == list(range(x.shape[0]))
    maxima = [int(lengths[i].max()) for i, _ in batches]
    assert maxima == sorted(maxima, reverse=True)  # longest first
    for idx, xb in batches:
        assert xb.shape[1] == int(lengths[idx].max()) and torch.equal(xb, x[idx][:, : xb.shape[1]])
    unsorted = length_batches(x, 5, sort=False)
    assert torch.cat([i for i, _ in unsorted]).tolist() == list(range(x.shape[0]))
    with pytest.raises(ValueError, match="batch_size"):
        length_batches(x, 0)


def midway(values: torch.Tensor) -> float:
    """A threshold between two neighbouring observed values near the median: no ties."""
    v = torch.unique(values.double())
    return float((v[v.numel() // 2 - 1] + v[v.numel() // 2]) / 2)


@pytest.mark.parametrize("kind", ["confidence", "patience"])
def test_run_text_matches_the_all_exits_reference(model, data, kind):
    x, y = data
    outs = collect_text(model, x, y, batch_size=4)
    with torch.no_grad():
        ref = model.all_exit_logits(x)  # one unsorted batch, every exit: the independent reference
    for k in range(3):
        torch.testing.assert_close(outs.exit_logits[k], ref[k], atol=1e-5, rtol=1e-5)
    probe = ConfidencePolicy(0.5)
    policy = (
        ConfidencePolicy([midway(probe.score(ref[k])) for k in range(2)])
        if kind == "confidence"
        else PatiencePolicy(1)
    )
    got = run_text(model, x, policy, batch_size=3)
    want = outs.exits(policy)
    assert torch.equal(got["exit_index"], want)
    if kind == "confidence":
        assert len(set(want.tolist())) >= 2  # sentences really leave at different exits
    chosen = torch.stack([ref[k][i] for i, k in enumerate(want.tolist())])
    torch.testing.assert_close(got["logits"], chosen, atol=1e-5, rtol=1e-5)
    lengths = model.lengths(x)
    assert torch.equal(got["flops"], model.sample_flops(lengths, want))
    r = outs.evaluate(policy)
    assert r["mean_flops"] == pytest.approx(float(got["flops"].mean()))
    assert r["mean_layers"] == pytest.approx(float((want + 1).double().mean()))
    torch.testing.assert_close(static_logits(model, x, batch_size=4), ref[-1], atol=1e-5, rtol=1e-5)


def test_sweep_rows_and_errors(model, data):
    outs = collect_text(model, *data)
    rows = sweep_text(outs, ["patience", "entropy"])
    assert {r["policy"] for r in rows} == {"patience", "entropy"}
    assert [r["value"] for r in rows if r["policy"] == "patience"] == [1, 2]  # patience <= K - 1
    assert all(0 < r["flops_ratio"] <= 1.01 for r in rows)
    with pytest.raises(ValueError, match="unknown policy kind"):
        sweep_text(outs, ["magic"])
    with pytest.raises(ValueError, match="N >= 1"):
        collect_text(model, data[0][:0], data[1][:0])


def test_subnet_grid_restores_the_full_network(model, data):
    x, y = data
    grid = subnet_grid(model, x, y, [0.5, 1.0], [0.5, 1.0], policy=PatiencePolicy(1))
    assert model.subnet == (1.0, 1.0)
    full = next(g for g in grid if g["width"] == 1.0 and g["depth"] == 1.0)
    assert full["flops_ratio"] == pytest.approx(1.0)
    assert full["accuracy"] == float((static_logits(model, x).argmax(-1) == y).double().mean())
    assert all(g["flops_ratio"] < 1.0 for g in grid if g is not full)
