"""`dynets bench NAME ...` for the benchmarks that own their argument parsers.

`early-exit` and `bert` are parsed by cli.py itself; every other benchmark module has a
`main(argv)` with its own options (`--quick`, `--json PATH`, ...), and `dynets bench NAME ARGS`
hands ARGS to it unchanged, so `dynets bench moe --help` shows that benchmark's options.
"""

from __future__ import annotations

import importlib

# name on the command line -> (module, what it measures)
EXTERNAL_BENCHES: dict[str, tuple[str, str]] = {
    "moe": ("dynets.bench.moe", "MoE capacity: 8-expert top-1 MoE vs dense FFN time, and a real task"),
    "skip-width": ("dynets.bench.skip_width", "block skipping and slimmable widths on CIFAR-10"),
    "routing-params": ("dynets.bench.routing_params", "routed ResNet and dynamic convolution on CIFAR-10"),
    "temporal": ("dynets.bench.temporal", "Skip-RNN on UCR sets and spoken digits"),
    "spatial": ("dynets.bench.spatial", "ViT token pruning / halting / merging and glance-and-focus"),
    "serving": ("dynets.bench.serving", "budget-adaptive server vs a fixed operating point under load"),
    "deploy": ("dynets.bench.deploy", "export (ONNX, torch.export) and input-adaptive int8 quantization"),
    # the names issue 5 gives: `vit` is the spatial benchmark's ViT part, `skiprnn` the temporal one
    "vit": ("dynets.bench.spatial", "ViT token pruning / halting / merging only (spatial --parts vit)"),
    "skiprnn": ("dynets.bench.temporal", "Skip-RNN on UCR sets and spoken digits (same as temporal)"),
}
# arguments put before the user's own (a later --parts of the user's overrides it)
DEFAULT_ARGS: dict[str, list[str]] = {"vit": ["--parts", "vit"]}


def bench_names() -> list[str]:
    return ["early-exit", "bert", *EXTERNAL_BENCHES]


def run_external(name: str, argv: list[str]) -> int:
    """Run benchmark `name` with its own argument list; returns its exit status."""
    if name not in EXTERNAL_BENCHES:
        raise SystemExit(f"bench: expected one of {bench_names()}, got {name!r}")
    module = importlib.import_module(EXTERNAL_BENCHES[name][0])
    status = module.main([*DEFAULT_ARGS.get(name, []), *argv])
    return int(status or 0)
