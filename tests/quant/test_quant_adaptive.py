"""Input-adaptive quantization: int8 blocks run, the adaptive routing equals the reference selection
(replaying the policy on every int8 exit's logits without compaction), the fp32 re-run equals the
fp32 model on those inputs, and costs add up."""

from __future__ import annotations

import pytest
import torch

import dynets
from dynets.policies import ConfidencePolicy, EntropyPolicy, NeverExitPolicy, PatiencePolicy
from dynets.quant import AdaptivePrecisionNetwork, quantize_early_exit, replay_int8_acceptance

# The project's CPU wheel ships the x86 engine; without it int8 cannot run at all. Elsewhere that
# skips; in CI tests/conftest.py turns every skip into a failure, so it cannot pass unnoticed.
if "x86" not in torch.backends.quantized.supported_engines:  # pragma: no cover
    pytest.skip("the x86 quantized engine is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = dynets.create_model(
        "ee_resnet",
        in_channels=1,
        image_size=8,
        num_classes=10,
        widths=(8, 16, 32),
        blocks=(1, 1, 1),
        exits=(0, 1),
        stem_stride=1,
    ).eval()
    with torch.no_grad():
        for head in model.heads:
            head[-1].weight.mul_(30.0)
    x = torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model.policy = ConfidencePolicy(0.6)
    q = quantize_early_exit(model, x[:48], policy=ConfidencePolicy(0.6))
    yield model, q, x[48:]
    torch.set_num_threads(n)


def between(scores: torch.Tensor, q: float) -> float:
    v = scores.sort().values
    i = max(1, min(v.numel() - 1, int(q * v.numel())))
    return float((v[i - 1] + v[i]) / 2)


def test_adaptive_routing_equals_the_reference_selection(setup):
    model, q, x = setup
    int8_logits = q.int8_exit_logits(x)
    conf = [lg.softmax(-1).amax(-1) for lg in int8_logits]
    best = torch.stack(conf).amax(0)  # a row is accepted somewhere iff its best confidence clears t
    for policy in (
        ConfidencePolicy(between(best, 0.5)),
        ConfidencePolicy([between(conf[0], 0.7), 1.0, between(conf[2], 0.7)]),
    ):
        out = q(x, policy=policy)
        want = replay_int8_acceptance(policy, int8_logits)  # -1: re-run in fp32
        int8_rows, fp32_rows = want >= 0, want < 0
        assert 0 < int(int8_rows.sum()) < x.shape[0]  # both paths taken
        assert torch.equal(out.decisions["precision"], fp32_rows.long())
        assert torch.equal(out.exit_index[int8_rows], want[int8_rows])
        for k in range(q.num_int8_exits):  # int8 rows carry the int8 logits of their exit
            rows = want == k
            torch.testing.assert_close(out.logits[rows], int8_logits[k][rows], rtol=1e-5, atol=1e-5)
        ref = model(x[fp32_rows])  # fp32 rows: the fp32 model, its own policy, on those inputs
        assert torch.equal(out.exit_index[fp32_rows], ref.exit_index)
        torch.testing.assert_close(out.logits[fp32_rows], ref.logits, rtol=1e-4, atol=1e-5)
        costs = model.exit_costs()
        int8_cost = torch.where(int8_rows, costs[want.clamp(min=0)], costs[q.num_int8_exits - 1])
        torch.testing.assert_close(out.decisions["int8_flops"], int8_cost)
        torch.testing.assert_close(out.flops[fp32_rows], int8_cost[fp32_rows] + ref.flops)


def test_int8_model_runs_and_agrees_with_fp32_mostly(setup):
    model, q, x = setup
    int8 = q.forward_int8(x)  # every exit in int8, no early exit: the static int8 model
    assert torch.equal(int8.exit_index, torch.full((x.shape[0],), model.num_exits - 1))
    torch.testing.assert_close(int8.logits, q.int8_exit_logits(x)[-1])
    with torch.no_grad():
        fp32 = model.forward_static(x)
    assert (int8.logits.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.6  # a random, untrained net
    assert (int8.logits - fp32).abs().mean() < 0.1 * fp32.abs().max()
    assert q.forward_int8(x[:0]).logits.shape == (0, 10) and q(x[:0]).logits.shape == (0, 10)
    early = q.forward_int8(x, ConfidencePolicy(0.5))  # int8 with early exits
    assert set(early.exit_index.tolist()) <= {0, 1, 2}


def test_all_int8_accepted_or_all_rerun(setup):
    model, q, x = setup
    assert bool((q(x, policy=ConfidencePolicy(0.0)).decisions["precision"] == 0).all())
    out = q(x, policy=ConfidencePolicy(1.0))
    assert bool((out.decisions["precision"] == 1).all())
    torch.testing.assert_close(out.logits, model(x).logits, rtol=1e-4, atol=1e-5)
    one_block = quantize_early_exit(
        model, x[:16], num_exits=1, policy=EntropyPolicy(0.5), fp32_policy=NeverExitPolicy()
    )
    o = one_block(x)
    rerun = o.decisions["precision"] == 1
    assert torch.equal(o.exit_index[rerun], torch.full((int(rerun.sum()),), model.num_exits - 1))


def test_bad_arguments(setup):
    model, q, x = setup
    with pytest.raises(TypeError, match="threshold policy"):
        q(x, policy=PatiencePolicy(1))
    with pytest.raises(ValueError, match="expected 1 or 3 thresholds"):
        q(x, policy=ConfidencePolicy([0.5, 0.5]))
    with pytest.raises(ValueError, match="num_exits"):
        quantize_early_exit(model, x, num_exits=9)
    with pytest.raises(ValueError, match="expected shape"):
        q(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="q_stages / q_heads"):
        AdaptivePrecisionNetwork(model, q.q_stages[:1], q.q_heads)
