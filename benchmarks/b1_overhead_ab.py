"""Batch-1 overhead A/B (session 11, issues 2 and 4): the numbers quoted in benchmarks/README.md for
the batch-1 executor changes. Each comparison alternates its variants in one process (medians of 9-11
rounds, 2 threads); the "before" variants are copies of the code as it was.

  ee_executor:  early exit, batch-1 path before/after (fewer Python operations between layers),
                on the cached wide (headline) and default-width conv2 (30 + 15) models;
  direct_graph: both models' inference copies with GraphModule calls vs DirectGraph;
  width_sweep:  random-weight early-exit ResNets at widths 32/48/64 at the headline exit fractions;
  skip:         skip_resnet batch-1 path before/after (random weights, thresholds at the gate medians).

Needs the models cached by benchmarks/early_exit_cifar10.sh and the 30 + 15 conv2 run (see README).
Usage: .venv/bin/python benchmarks/b1_overhead_ab.py  -> benchmarks/results/b1_overhead_ab.{json,md}
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
import types
import warnings

import torch
from torch import nn

from dynets.core.inference import DirectGraph
from dynets.core.outputs import DynamicOutput
from dynets.core.registry import create_model
from dynets.core.serialization import atomic_write_bytes, load
from dynets.core.tensors import take_rows
from dynets.data import cache_dir, load_dataset
from dynets.depth.skipping import SkipPolicy
from dynets.policies.exit_policies import ConfidencePolicy, EntropyPolicy

warnings.filterwarnings("ignore")
BENCH = cache_dir() / "bench"
MODELS = {  # (static, early exit, policy at the 50% operating point of its committed run)
    "wide_conv2_12+10": (
        "early_exit_cifar10-static_finetune-7ae9dbd2d820",
        "early_exit_cifar10-finetune-7d44e6a92e70",
        ConfidencePolicy([0.9553951025009155, 0.8232063055038452, 0.5864269733428955]),
    ),
    "narrow_conv2_30+15": (
        "early_exit_cifar10-static_finetune-d8baa1a7376c",
        "early_exit_cifar10-finetune-647b3e72495c",
        EntropyPolicy([0.08809739351272583, 0.18963772058486938, 0.3613612651824951]),
    ),
}


def alternate(fns: dict, inputs: list, rounds: int = 11) -> dict[str, float]:
    """Median microseconds per input of each variant, the variants alternating every round."""
    with torch.inference_mode():
        for f in fns.values():
            for a in inputs[:30]:
                f(a)
        res: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for a in inputs:
                    f(a)
                res[k].append((time.perf_counter() - t0) / len(inputs) * 1e6)
    return {k: statistics.median(v) for k, v in res.items()}


# ---- the code as it was before session 11 (for the "before" variants)
def _old_softmax(logits):
    z = logits[0].tolist()
    m = max(z)
    e = [math.exp(v - m) for v in z]
    t = sum(e)
    return [v / t for v in e]


class _OldConfidence(ConfidencePolicy):
    def score_single(self, logits, learned=None):
        return max(_old_softmax(logits))


class _OldEntropy(EntropyPolicy):
    def step_single(self, k, logits, state, learned=None):
        p = _old_softmax(logits)
        h = -sum(q * math.log(q) for q in p if q > 0)
        return h <= self.threshold_at(k) * math.log(max(len(p), 2)), state


def _old_run_single(self, x, policy, costs):
    state = policy.init_state(1, x.device)
    h = self._prepare(x)
    s, K = 0, self.num_exits
    for k, last_stage in enumerate(self.exit_stages):
        while s <= last_stage:
            h = self.stages[s](h)
            s += 1
        logits = self.heads[k](h)
        if k < K - 1:
            learned = self.exit_predictors[k](logits) if policy.needs_learned else None
            stop, state = policy.step_single(k, logits, state, learned)
            if not stop:
                continue
        exit_index = torch.full((1,), k, dtype=torch.long, device=logits.device)
        return DynamicOutput(logits, exit_index, costs[k : k + 1].clone())


def _unwrap(m):
    """The inference copy as before DirectGraph: the lowered GraphModules called directly."""
    m2 = copy.deepcopy(m)
    m2.stages = nn.ModuleList(s.graph_module if isinstance(s, DirectGraph) else s for s in m2.stages)
    m2.heads = nn.ModuleList(s.graph_module if isinstance(s, DirectGraph) else s for s in m2.heads)
    return m2


def _old_skip(self, x, policy):  # SkipNetwork.run_dynamic's batched loop at B=1 (no record)
    B, G = x.shape[0], self.num_gated
    blocks_run = torch.zeros(B, G, dtype=torch.bool)
    h = self.stem(x)
    if h.data_ptr() == x.data_ptr():
        h = h.clone()
    gi = 0
    for i, block in enumerate(self.blocks):
        if not self.gated[i]:
            h = block(h)
            continue
        run = torch.sigmoid(self.gates[gi](h).float()) >= policy.threshold_at(gi)
        blocks_run[:, gi] = run.cpu()
        n = int(run.sum())
        if n == B:
            h = block(h)
        elif n > 0:
            idx = run.nonzero().squeeze(1)
            h.index_copy_(0, idx, block(take_rows(h, idx)))
        gi += 1
    return DynamicOutput(self.head(h), flops=self.flops_of(blocks_run), decisions={"blocks_run": blocks_run})


def checked(m):
    """The static path behind the same input check as the dynamic model's forward."""

    def run(a):
        m.check_input(a)
        return m.forward_static(a)

    return run


def main() -> None:
    torch.set_num_threads(2)
    x = load_dataset("cifar10", "test", limit=500).x
    xs = [x[i : i + 1] for i in range(500)]
    out: dict = {"ee_executor": {}, "direct_graph": {}, "width_sweep": [], "skip": {}}
    for name, (s_key, d_key, policy) in MODELS.items():
        st = load(BENCH / s_key).eval().optimize_for_inference()
        dy = load(BENCH / d_key).eval().optimize_for_inference()
        dy.policy = policy
        old_cls = _OldConfidence if isinstance(policy, ConfidencePolicy) else _OldEntropy
        dy_old = copy.deepcopy(dy)
        dy_old._run_single = types.MethodType(_old_run_single, dy_old)
        dy_old.policy = old_cls(policy.thresholds)
        with torch.inference_mode():
            for a in xs[:100]:
                o, n = dy_old(a), dy(a)
                assert torch.equal(o.logits, n.logits) and int(o.exit_index) == int(n.exit_index)
            fl = float(torch.cat([dy(a).flops for a in xs]).mean()) / st.full_cost()

        t = alternate({"static": checked(st), "before": dy_old, "after": dy}, xs)
        out["ee_executor"][name] = {
            "flops_ratio": fl,
            "us": t,
            "realization_before": t["static"] / t["before"] * fl,
            "realization_after": t["static"] / t["after"] * fl,
        }
        if name.startswith("wide"):
            st0, dy0 = _unwrap(st), _unwrap(dy_old)
            t = alternate(
                {
                    "static_graphmodule": checked(st0),
                    "dynamic_graphmodule": dy0,
                    "static_direct": checked(st),
                    "dynamic_direct": dy_old,
                },
                xs,
                rounds=9,
            )
            out["direct_graph"] = {
                "us": t,
                "realization_graphmodule": t["static_graphmodule"] / t["dynamic_graphmodule"] * fl,
                "realization_direct": t["static_direct"] / t["dynamic_direct"] * fl,
            }
        print(name, json.dumps(out["ee_executor"][name]), flush=True)

    fractions = [0.45, 0.28, 0.17, 0.10]
    one = torch.randn(1, 3, 32, 32)
    for widths in ((32, 64, 128), (48, 96, 192), (64, 128, 256)):
        kw = dict(widths=widths, head={"kind": "conv2"})
        st = create_model("static_resnet", widths=widths).eval().optimize_for_inference()
        dy = create_model("ee_resnet", **kw).eval().optimize_for_inference()
        K = dy.num_exits
        forced = [ConfidencePolicy([1.0] * k + [0.0] * (K - 1 - k)) for k in range(K)]  # exit at k
        fns = {"static": st.forward_static}
        fns.update({f"exit{k}": (lambda a, p=p, m=dy: m(a, p)) for k, p in enumerate(forced)})
        t = alternate(fns, [one] * 300, rounds=7)
        costs = dy.exit_costs().tolist()
        T = sum(f * t[f"exit{k}"] for k, f in enumerate(fractions))
        F = sum(f * c for f, c in zip(fractions, costs))
        out["width_sweep"].append(
            {
                "widths": widths,
                "flops_ratio": F / st.full_cost(),
                "realization": t["static"] / T * F / st.full_cost(),
            }
        )
        print(out["width_sweep"][-1], flush=True)

    torch.manual_seed(0)
    m = create_model("skip_resnet").eval().to(memory_format=torch.channels_last)
    for g in m.gates:
        nn.init.normal_(g.net[-1].weight, std=0.5)
    xc = [a.contiguous(memory_format=torch.channels_last) for a in xs[:300]]
    with torch.inference_mode():
        probs = m(torch.cat(xc[:128]), 0.0, record=True).record["gate_probs"]
        policy = SkipPolicy([min(max(v, 0.0), 1.0) for v in probs.median(0).values.tolist()])
        for a in xc[:50]:
            assert torch.equal(
                _old_skip(m, a, policy).decisions["blocks_run"], m(a, policy).decisions["blocks_run"]
            )
        fl = float(torch.cat([m(a, policy).flops for a in xc]).mean()) / m.full_cost()
    t = alternate(
        {
            "static": m.forward_static,
            "before": lambda a: _old_skip(m, a, policy),
            "after": lambda a: m._run_single(a, policy),
        },
        xc,
        rounds=9,
    )
    out["skip"] = {
        "flops_ratio": fl,
        "us": t,
        "speedup_before": t["static"] / t["before"],
        "speedup_after": t["static"] / t["after"],
    }
    print("skip", json.dumps(out["skip"]), flush=True)

    atomic_write_bytes("benchmarks/results/b1_overhead_ab.json", json.dumps(out, indent=2).encode())
    lines = ["# Batch-1 overhead A/B (session 11)", "", "| comparison | before | after |", "|---|---:|---:|"]
    for name, r in out["ee_executor"].items():
        lines.append(
            f"| early exit {name}: b1 realization (FLOPs {r['flops_ratio']:.3f}) | "
            f"{r['realization_before']:.3f} | {r['realization_after']:.3f} |"
        )
    d = out["direct_graph"]
    lines.append(
        f"| GraphModule -> DirectGraph, wide model: b1 realization (static "
        f"{d['us']['static_graphmodule']:.0f} -> {d['us']['static_direct']:.0f} us) | "
        f"{d['realization_graphmodule']:.3f} | {d['realization_direct']:.3f} |"
    )
    s = out["skip"]
    lines.append(
        f"| skip_resnet (random weights, FLOPs {s['flops_ratio']:.3f}): b1 speed-up over static | "
        f"{s['speedup_before']:.2f}x | {s['speedup_after']:.2f}x |"
    )
    lines += ["", "Random-weight early-exit ResNets (conv2 heads, exit fractions 0.45/0.28/0.17/0.10):", ""]
    lines += [f"- widths {w['widths']}: b1 realization {w['realization']:.3f}" for w in out["width_sweep"]]
    atomic_write_bytes("benchmarks/results/b1_overhead_ab.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
