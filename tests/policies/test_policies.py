"""Each policy's decision rule on hand-made logits, ranges, and (de)serialisation."""

import math

import pytest
import torch

from dynets.policies import (
    ConfidencePolicy,
    EntropyPolicy,
    LearnedPolicy,
    NeverExitPolicy,
    PatiencePolicy,
    make_policy,
    policy_from_dict,
)
from dynets.policies.replay import replay_exits

SURE = torch.tensor([[10.0, 0.0, 0.0]])  # p_max ~ 1, entropy ~ 0
UNSURE = torch.tensor([[0.0, 0.0, 0.0]])  # p_max = 1/3, entropy = log 3


def test_confidence_rule():
    p = ConfidencePolicy(0.9)
    logits = torch.cat([SURE, UNSURE])
    stop, _ = p.step(0, logits, {})
    assert stop.tolist() == [True, False]
    assert ConfidencePolicy(1 / 3).step(0, UNSURE, {})[0].item()  # >= is inclusive


def test_confidence_per_exit_thresholds():
    p = ConfidencePolicy([0.99, 0.2])
    mid = torch.tensor([[1.0, 0.0, 0.0]])  # p_max ~ 0.576
    assert not p.step(0, mid, {})[0].item()
    assert p.step(1, mid, {})[0].item()
    with pytest.raises(ValueError, match="per-exit thresholds"):
        p.step(2, mid, {})


def test_entropy_rule_is_normalised():
    p = EntropyPolicy(0.5)
    stop, _ = p.step(0, torch.cat([SURE, UNSURE]), {})
    assert stop.tolist() == [True, False]
    logp = torch.tensor([0.7, 0.2, 0.1]).log()
    h = float(-(logp.exp() * logp).sum() / math.log(3))
    assert EntropyPolicy(h + 1e-4).step(0, logp[None], {})[0].item()
    assert not EntropyPolicy(h - 1e-4).step(0, logp[None], {})[0].item()


def test_patience_counts_consecutive_agreement():
    p = PatiencePolicy(2)
    a, b = torch.tensor([[5.0, 0, 0]]), torch.tensor([[0, 5.0, 0]])
    # predictions per exit: a, a, b, b, b -> counts 0, 1, 0, 1, 2 -> exits at k=4
    exits = replay_exits(p, [a, a, b, b, b, b])
    assert exits.tolist() == [4]
    assert replay_exits(PatiencePolicy(1), [a, a, b]).tolist() == [1]
    assert replay_exits(PatiencePolicy(3), [a, b, a, b]).tolist() == [3]  # never agrees: last exit


def test_learned_rule_and_missing_scores():
    p = LearnedPolicy(0.7)
    stop, _ = p.step(0, torch.cat([SURE, SURE]), {}, torch.tensor([0.8, 0.6]))
    assert stop.tolist() == [True, False]
    with pytest.raises(ValueError, match="learned-exit scores"):
        p.step(0, SURE, {}, None)


def test_never_exit():
    assert not NeverExitPolicy().step(0, SURE, {})[0].item()


@pytest.mark.parametrize(
    "cls, bad",
    [
        (ConfidencePolicy, 1.5),
        (ConfidencePolicy, -0.1),
        (EntropyPolicy, 2.0),
        (LearnedPolicy, -1.0),
        (ConfidencePolicy, float("nan")),
        (ConfidencePolicy, [0.5, 1.2]),
    ],
)
def test_threshold_out_of_range(cls, bad):
    with pytest.raises(ValueError, match=r"threshold must lie in \[0.0, 1.0\]"):
        cls(bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_patience_out_of_range(bad):
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        PatiencePolicy(bad)


@pytest.mark.parametrize(
    "policy",
    [
        ConfidencePolicy(0.8),
        EntropyPolicy([0.1, 0.2]),
        PatiencePolicy(3),
        LearnedPolicy(0.6),
        NeverExitPolicy(),
    ],
)
def test_round_trip(policy):
    again = policy_from_dict(policy.to_dict())
    assert type(again) is type(policy) and again.to_dict() == policy.to_dict()


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy 'foo'"):
        make_policy("foo", 0.5)
    with pytest.raises(ValueError, match="unknown policy kind"):
        policy_from_dict({"kind": "bar"})
    assert isinstance(make_policy("patience", 2.0), PatiencePolicy)


@pytest.mark.parametrize("scale", [3.0, 60.0])  # 60: softmax terms underflow to 0 in float32
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_step_single_decides_as_step_does(num_classes, scale):
    """The batch-1 decision (scalar maths for small class counts) equals the batched one."""
    torch.manual_seed(num_classes)
    logits = torch.randn(200, num_classes) * scale
    learned = torch.rand(200)
    policies = [
        ConfidencePolicy([0.3, 0.6, 0.9]),
        EntropyPolicy([0.8, 0.5, 0.2]),
        LearnedPolicy(0.5),
        PatiencePolicy(2),
        NeverExitPolicy(),
    ]
    for policy in policies:
        for k in range(3):
            state = policy.init_state(200, logits.device)
            if isinstance(policy, PatiencePolicy):  # half the samples agreed at the previous exit
                state["prev"] = torch.where(torch.arange(200) % 2 == 0, logits.argmax(-1), -1)
                state["count"] = torch.ones(200, dtype=torch.long)
            lg = learned if policy.needs_learned else None
            stop, new = policy.step(k, logits, state, lg)
            for i in range(0, 200, 7):
                one_state = {n: v[i : i + 1] for n, v in state.items()}
                one, one_new = policy.step_single(
                    k, logits[i : i + 1], one_state, None if lg is None else lg[i : i + 1]
                )
                assert isinstance(one, bool) and one == bool(stop[i]), (policy, k, i)
                if isinstance(policy, (ConfidencePolicy, EntropyPolicy)):  # the scores agree too
                    ref = float(policy.score(logits[i : i + 1], None)[0])
                    assert policy.score_single(logits[i : i + 1]) == pytest.approx(ref, abs=1e-5)
                assert all(torch.equal(one_new[n], new[n][i : i + 1]) for n in new)
