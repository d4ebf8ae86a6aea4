"""Kernel micro-benchmarks behind session 13's choices (issue 5), 2 CPU threads, random inputs.

  attention: scaled_dot_product_attention time vs sequence length at batch 64, dim 128, 4 heads (the
             benchmark ViT's shape), without and with a key mask -- why DynamicViT / ToMe round their
             sequence lengths to multiples of 16 (`token_multiple`);
  merge:     one ToMe merge step (`bipartite_merge`) at batch 1 and 64, 57 tokens, r = 8;
  block:     one whole ViT block (the benchmark ViT's: dim 128, 4 heads, MLP x2) vs sequence length at
             batch 1 and 64, as a share of its time at 65 tokens (the static ViT's length) next to the
             share of its FLOPs -- why pruning or merging tokens saves time at batch 64 but hardly
             at batch 1, where a 45-token block costs nearly what a 65-token one does;
  lstm:      per-step cost at batch 64, hidden 256, input 1 (ECG5000's shape): the fused nn.LSTM
             (oneDNN) over 140 steps, one `torch.lstm_cell`, and its matrix multiply alone -- why
             skipping 41-58% of the Skip-RNN's updates does not beat the fused kernel.

Medians of repeated calls (timeit-style, no alternation: each number is one kernel on its own).
Usage: .venv/bin/python benchmarks/kernel_micro.py [NAME] -> benchmarks/results/NAME.{json,md}
(NAME defaults to kernel_micro: session 13's host; session 17's AMD EPYC host: kernel_micro_epyc).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from dynets.bench.common import cpu_model
from dynets.core.serialization import atomic_write_bytes
from dynets.models.vit import vit_tiny
from dynets.spatial.merging import bipartite_merge

LENGTHS = (16, 23, 24, 31, 32, 33, 40, 46, 48, 57, 64, 65, 66)
BLOCK_LENGTHS = (
    65,
    48,
    46,
    32,
    23,
    16,
)  # the static length (the reference), DynamicViT's 0.7 stages, roundings


def median_us(fn, n: int = 60, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


@torch.inference_mode()
def main() -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    out: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "attention": [],
    }
    for T in LENGTHS:
        q, k, v = torch.randn(64, T, 3, 4, 32).permute(2, 0, 3, 1, 4)  # the model's (B, H, T, d) views
        mask = torch.zeros(64, 1, 1, T)
        mask[..., -3:] = float("-inf")
        out["attention"].append(
            {
                "tokens": T,
                "plain_us": median_us(partial(F.scaled_dot_product_attention, q, k, v)),
                "masked_us": median_us(partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)),
            }
        )
    out["merge"] = []
    for B in (1, 64):
        x, size, metric = torch.randn(B, 57, 128), torch.rand(B, 57) + 1, torch.randn(B, 57, 32)
        us = median_us(partial(bipartite_merge, x, size, metric, 8, positions=False), n=200)
        out["merge"].append({"batch": B, "tokens": 57, "r": 8, "us": us})
    vit = vit_tiny(dim=128, depth=6, heads=4, mlp_ratio=2.0).eval()
    blk, full = vit.blocks[0], vit.num_patches + 1
    out["block"] = []
    for B in (1, 64):
        us = {
            T: median_us(partial(blk, torch.randn(B, T, 128)), n=200 if B == 1 else 60) for T in BLOCK_LENGTHS
        }
        out["block"] += [
            {
                "batch": B,
                "tokens": T,
                "us": us[T],
                "time_share": us[T] / us[full],
                "flops_share": vit.block_cost(T) / vit.block_cost(full),
            }
            for T in BLOCK_LENGTHS
        ]
    H, T, B = 256, 140, 64
    lstm = torch.nn.LSTM(1, H, batch_first=True)
    w = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    xs, h, c = torch.randn(B, T, 1), torch.randn(B, H), torch.randn(B, H)
    out["lstm"] = {
        "batch": B,
        "hidden": H,
        "fused_per_step_us": median_us(lambda: lstm(xs), n=30) / T,
        "lstm_cell_us": median_us(lambda: torch.lstm_cell(xs[:, 0], (h, c), *w)),
        "matmul_only_us": median_us(lambda: torch.addmm(w[3], h, w[1].t())),
    }
    return out


def markdown(r: dict) -> str:
    lines = [
        "# Kernel micro-benchmarks (2 threads)",
        "",
        f"`.venv/bin/python benchmarks/kernel_micro.py {r.get('name', '')}`; medians of repeated calls"
        f"{' on ' + r['cpu'] if r.get('cpu') else ''}.",
        "",
        "## scaled_dot_product_attention, batch 64, 4 heads x 32",
        "",
        "| tokens | plain (us) | key mask (us) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {a['tokens']} | {a['plain_us']:.0f} | {a['masked_us']:.0f} |" for a in r["attention"]]
    lines += ["", "## ToMe merge step (57 tokens, dim 128, r = 8)", "", "| batch | us |", "|---:|---:|"]
    lines += [f"| {m['batch']} | {m['us']:.0f} |" for m in r["merge"]]
    lines += [
        "",
        "## One ViT block (dim 128, 4 heads, MLP x2) vs tokens: share of its 65-token time and FLOPs",
        "",
        "| batch | tokens | us | time share | FLOPs share |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {b['batch']} | {b['tokens']} | {b['us']:.0f} | {b['time_share']:.2f} | {b['flops_share']:.2f} |"
        for b in r.get("block", [])
    ]
    s = r["lstm"]
    lines += [
        "",
        f"## LSTM step, batch {s['batch']}, hidden {s['hidden']}",
        "",
        f"fused nn.LSTM per step {s['fused_per_step_us']:.0f} us; "
        f"torch.lstm_cell {s['lstm_cell_us']:.0f} us; "
        f"its matrix multiply alone {s['matmul_only_us']:.0f} us.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "kernel_micro"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"NAME: expected letters, digits, '_' or '-' (a file stem), got {name!r}")
    res = {**main(), "name": name}
    dst = Path(__file__).parent / "results"
    atomic_write_bytes(dst / f"{name}.json", json.dumps(res, indent=2).encode())
    atomic_write_bytes(dst / f"{name}.md", markdown(res).encode())
    print(markdown(res))
