"""The MoE benchmark's character language model: causal, equal-shaped dense and MoE, trainable."""

from __future__ import annotations

import math

import pytest
import torch

from dynets.bench.moe_lm import CharLM, CharLMConfig, bits_per_char, compare, encode_chars

TINY = dict(d_model=16, n_heads=2, n_layers=2, d_ff=32, num_experts=4, seq_len=12, batch_size=4)


@pytest.mark.parametrize("moe", [False, True])
def test_the_model_is_causal(moe):
    torch.manual_seed(0)
    model = CharLM(11, CharLMConfig(**TINY), moe=moe).eval()
    x = torch.randint(0, 11, (3, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 11  # change the future only
    with torch.no_grad():
        a, aux_a = model(x)
        b, _ = model(y)
    assert a.shape == (3, 12, 11)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    assert (float(aux_a) > 0) == moe  # only the MoE has a balance / z loss


def test_encode_chars_maps_unseen_characters_to_zero():
    train, dev, vocab = encode_chars(["ab", "ba"], ["abz"])
    assert vocab == 4  # unknown, newline, a, b
    assert train.tolist() == [2, 3, 1, 3, 2, 1] and dev.tolist() == [2, 3, 0, 1]


def test_compare_trains_both_models_identically_and_reports_bits_per_char():
    texts = ["a good film", "a bad film", "the plot is dull", "the cast is fine"] * 20
    c = CharLMConfig(**TINY, steps=5, eval_chars=200)
    r = compare(texts, texts[:10], c, seed=0, log=lambda m: None)
    for name in ("dense", "moe"):
        assert 0 < r[name]["dev_bits_per_char"] < math.log2(r["vocab"]) + 1
    assert r["moe"]["params"] > r["dense"]["params"]
    assert isinstance(r["moe_beats_dense_loss"], bool)
    # the same seed gives the same dense model and so the same held-out number
    again = compare(texts, texts[:10], c, seed=0, log=lambda m: None)
    assert again["dense"]["dev_bits_per_char"] == r["dense"]["dev_bits_per_char"]


def test_bits_per_char_of_a_uniform_model_is_log2_of_the_vocabulary():
    model = CharLM(8, CharLMConfig(**TINY), moe=False)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    assert bits_per_char(model, torch.randint(0, 8, (100,)), 12) == pytest.approx(3.0, abs=1e-5)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="CharLMConfig.steps"):
        CharLMConfig(steps=0)
