"""Dynamic BERT export (ONNX and torch.export): the runtime on token ids takes the eager model's
exits for every policy kind, with sentences leaving the batch and the padding re-trimmed, at any
width x depth sub-network, at batch 1 and for an empty batch; same logits and per-sample FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynets.depth.learned import fit_learned_exits
from dynets.export import TextRuntime, export_model, load_runtime
from dynets.policies import ConfidencePolicy, EntropyPolicy, LearnedPolicy, NeverExitPolicy, PatiencePolicy

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTENCES = [  # lengths 1 to 14 words, so padding is trimmed as sentences leave
    "fun",
    "a smart and funny movie",
    "the acting was awful but the story was not very dull and it was quite fun",
    "i hated every minute",
    "really great",
    "this film is silly",
    "the cast was good and the plot was smart but the film is boring",
    "not bad",
]


def between(values: torch.Tensor) -> float:
    """A threshold in the widest gap of the middle half of `values` (no float-noise flips)."""
    v = values.flatten().sort().values
    lo, hi = v.numel() // 4, 3 * v.numel() // 4
    i = lo + int(torch.argmax(v[lo + 1 : hi + 1] - v[lo:hi])) + 1
    return float((v[i - 1] + v[i]) / 2)


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    from dynets.text import DynamicBert

    model = DynamicBert.from_pretrained_encoder(tiny_bert_dir, ["neg", "pos", "mixed"]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # exit heads whose confidences spread out (not saturated)
        for head in model.heads:
            head.classifier.weight.copy_(0.2 * torch.randn(head.classifier.weight.shape, generator=gen))
    x = model.encode(SENTENCES)
    x = torch.cat([x, torch.zeros(x.shape[0], 2, dtype=torch.long)], 1)  # extra padding columns
    with torch.no_grad():
        lg = model.all_exit_logits(x)
    fit_learned_exits(model, lg, lg[-1].argmax(-1), steps=30)
    model.policy = ConfidencePolicy(between(lg[0].softmax(-1).amax(-1)))
    return model, x


def policies(model, x) -> list:
    with torch.no_grad():
        lg = model.all_exit_logits(x)
    conf = [between(v.softmax(-1).amax(-1)) for v in lg[:-1]]
    learned = model.learned_scores(lg)
    return [
        None,  # the policy saved in the export
        ConfidencePolicy(conf),
        EntropyPolicy(0.8),
        PatiencePolicy(1),
        LearnedPolicy(between(learned[:, 0])),
        NeverExitPolicy(),
    ]


def check(rt: TextRuntime, model, x: torch.Tensor, policy) -> np.ndarray:
    ref = model(x, policy=policy)
    got = rt.run(x.numpy(), None if policy is None else policy.to_dict())
    np.testing.assert_array_equal(got["exit_index"], ref.exit_index.numpy())
    np.testing.assert_array_equal(got["exit_layer"], ref.decisions["exit_layer"].numpy())
    np.testing.assert_allclose(got["logits"], ref.logits.numpy(), rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(got["flops"], ref.flops.numpy())
    return got["exit_index"]


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_text_export_exits_like_the_eager_model(bert, tmp_path, fmt):
    model, x = bert
    rt = load_runtime(export_model(model, tmp_path / "e", format=fmt))
    assert isinstance(rt, TextRuntime) and rt.labels == ["neg", "pos", "mixed"]
    import transformers  # the exported tokenizer turns texts into the same ids, without dynets

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "e" / rt.manifest["tokenizer"])
    assert tok(SENTENCES[1])["input_ids"] == model.encode([SENTENCES[1]])[0].tolist()
    exits = check(rt, model, x, None)
    assert 0 < (exits == 0).sum() < len(exits)  # the saved threshold splits the batch at exit 0
    for policy in policies(model, x)[1:]:
        check(rt, model, x, policy)
    for i in range(3):  # batch 1 at several lengths, including the eager model's no-mask path
        check(rt, model, x[i : i + 1], None)
    check(rt, model, x[:, :1], None)  # one token ([CLS]) per sentence
    empty = rt.run(np.zeros((0, 5), np.int64))
    assert empty["logits"].shape == (0, 3) and empty["flops"].shape == (0,)


def test_text_export_of_a_narrow_shallow_subnetwork(bert, tmp_path):
    model, x = bert
    model.set_subnet(width=0.5, depth=0.5)
    try:
        rt = load_runtime(export_model(model, tmp_path / "e", format="onnx"))
        assert rt.num_exits == model.num_exits == 2
        assert rt.manifest["subnet"] == {"width": 0.5, "depth": 0.5}
        for policy in (ConfidencePolicy(0.5), NeverExitPolicy()):
            check(rt, model, x, policy)
    finally:
        model.set_subnet(1.0, 1.0)


def test_text_runtime_rejects_bad_token_ids(bert, tmp_path):
    model, x = bert
    rt = load_runtime(export_model(model, tmp_path / "e", format="onnx"))
    with pytest.raises(ValueError, match="expected token ids in \\[0, 100\\), got values in \\[100, 100\\]"):
        rt.run(np.full((1, 3), 100))
    with pytest.raises(ValueError, match="expected token ids \\(B, L\\) of an integer dtype"):
        rt.run(x.numpy().astype(np.float32))
    with pytest.raises(ValueError, match="at most 64 tokens"):
        rt.run(np.ones((1, 70), np.int64))
