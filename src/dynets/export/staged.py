"""Export an early-exit network as one graph per stage block and per exit head (ONNX or torch.export).

A dynamic model cannot be one static graph with compaction inside: which rows continue is data-
dependent. So the graph is cut where decisions happen, and a small runtime (`runtime.py`, copied
into the export) applies the policy between the pieces and compacts the batch, exactly as the
eager executor does. The exported directory:

    manifest.json        blocks (stage graphs then the exit head, per exit), costs, policy, shapes
    stage_*.onnx|.pt2    the stages between two exits (granularity "block", the default), or one
                         graph per stage (granularity "stage")
    head_*.onnx|.pt2     exit head k: features -> logits (and the learned-exit score, if any)
    dynets_runtime.py    the runtime (NumPy + onnxruntime; torch for .pt2)

Stages with no exit between them are merged by default: no decision falls between them, so
merging changes nothing about what runs, and saves one call per stage. Multi-scale features (MSDNet
passes lists of tensors) are flattened into several graph inputs and outputs. Every graph has a
dynamic batch dimension.

ONNX export uses the TorchScript-based exporter (`dynamo=False`): the dynamo exporter needs
onnxscript, which the `export` extra does not install; if the legacy exporter is gone from a
future torch, the dynamo one is tried.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dynets.core.serialization import _atomic_dir_write
from dynets.export import runtime
from dynets.serve.optional import require

FORMATS = ("onnx", "torch")
SUFFIX = {"onnx": ".onnx", "torch": ".pt2"}


class FlatUnit(nn.Module):
    """A module over flat tensor arguments: unflatten -> module -> flatten, so list-valued
    features (multi-scale) become several graph inputs and outputs."""

    def __init__(self, module: nn.Module, in_spec: Any) -> None:
        super().__init__()
        self.module, self.in_spec = module, in_spec

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(tree_unflatten(list(flat), self.in_spec))
        return tuple(tree_flatten(out)[0])


class HeadUnit(nn.Module):
    """An exit head (and its learned-exit predictor, if the model has one for this exit)."""

    def __init__(self, head: nn.Module, predictor: nn.Module | None, in_spec: Any) -> None:
        super().__init__()
        self.head, self.predictor, self.in_spec = head, predictor, in_spec

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.head(tree_unflatten(list(flat), self.in_spec))
        if self.predictor is None:
            return (logits,)
        return logits, self.predictor(logits)


def _check_model(model: nn.Module) -> None:
    if not all(hasattr(model, a) for a in ("stages", "heads", "exit_stages", "input_shape")):
        raise TypeError(
            f"export_staged: expected an EarlyExitNetwork (stages, heads, exit_stages; e.g. ee_resnet, "
            f"msdnet), got {type(model).__name__}; dynets.export.export_model takes the other families"
        )
    if getattr(model, "inference_only", False):
        raise TypeError("export: expected the original model, got an optimize_for_inference copy")


def _export_onnx(
    unit: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    axes: list[dict[int, str]] | None = None,
    out_axes: list[dict[int, str]] | None = None,
    bounds: dict[str, int] | None = None,
) -> None:
    """`axes` / `out_axes`: the dynamic dimensions of each input / output (default: dim 0, "batch")."""
    require("onnx", "dynets export --format onnx")
    n_out = len(unit(*args))
    names_in = [f"in{i}" for i in range(len(args))]
    names_out = [f"out{i}" for i in range(n_out)]
    axes = axes or [{0: "batch"}] * len(args)
    out_axes = out_axes or [{0: "batch"}] * n_out
    dyn = {**dict(zip(names_in, axes)), **dict(zip(names_out, out_axes))}
    kw: dict[str, Any] = dict(input_names=names_in, output_names=names_out, opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
                raise TypeError("no dynamo switch")
            torch.onnx.export(unit, args, str(path), dynamic_axes=dyn, dynamo=False, **kw)
        except TypeError:  # a torch without the legacy exporter: the dynamo one (needs onnxscript)
            shapes = _torch_dims(axes, bounds)
            torch.onnx.export(unit, args, str(path), dynamic_shapes=shapes, dynamo=True, **kw)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


MAX_DIM = 1 << 20


def _torch_dims(axes: list[dict[int, str]], bounds: dict[str, int] | None = None) -> list[dict[int, Any]]:
    """torch.export dims for named dynamic axes (one Dim per name, shared across inputs);
    `bounds[name]`: the largest size of that axis (default MAX_DIM)."""
    dims: dict[str, Any] = {}
    for a in axes:
        for name in a.values():
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=1, max=(bounds or {}).get(name, MAX_DIM))
    return [{d: dims[n] for d, n in a.items()} for a in axes]


def _export_torch(
    unit: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    axes: list[dict[int, str]] | None = None,
    bounds: dict[str, int] | None = None,
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # modules that keep their last decisions as attributes (for the eager model's report)
        # assign them while tracing; the graph does not need them
        warnings.filterwarnings("ignore", message="The tensor attribute")
        shapes = (tuple(_torch_dims(axes or [{0: "batch"}] * len(args), bounds)),)  # the *flat varargs
        ep = torch.export.export(unit, args, dynamic_shapes=shapes)
    torch.export.save(ep, str(path))


def export_staged(
    model: nn.Module,
    out: str | Path,
    *,
    format: str = "onnx",
    granularity: str = "block",
    opset: int = 17,
    example_batch: int = 2,
    whole_graph: bool = False,
) -> Path:
    """Write the staged export of an early-exit `model` to directory `out` (atomically); returns it."""
    _check_model(model)
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if granularity not in ("block", "stage"):
        raise ValueError(f"granularity: expected 'block' or 'stage', got {granularity!r}")
    if example_batch < 2:
        raise ValueError(
            f"example_batch: expected >= 2 (so the batch dimension stays symbolic), got {example_batch}"
        )
    model.eval()
    K = model.num_exits
    gen = torch.Generator().manual_seed(0)
    h: Any = torch.rand((example_batch, *model.input_shape), generator=gen)
    units: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = []
    blocks: list[dict[str, Any]] = []
    s = 0
    with torch.no_grad():
        for k, last in enumerate(model.exit_stages):
            names: list[str] = []
            group = list(range(s, last + 1))
            pieces = [[i] for i in group] if granularity == "stage" else [group]
            for piece in pieces:
                flat, spec = tree_flatten(h)
                mod = (
                    nn.Sequential(*[model.stages[i] for i in piece])
                    if len(piece) > 1
                    else model.stages[piece[0]]
                )
                name = f"stage_{piece[0]}" if len(piece) == 1 else f"stage_{piece[0]}-{piece[-1]}"
                units.append((name, FlatUnit(mod, spec).eval(), tuple(flat)))
                names.append(name)
                h = mod(h)
            s = last + 1
            flat, spec = tree_flatten(h)
            pred = model.exit_predictors[k] if k < len(getattr(model, "exit_predictors", [])) else None
            units.append((f"head_{k}", HeadUnit(model.heads[k], pred, spec).eval(), tuple(flat)))
            blocks.append({"exit": k, "units": names, "head": f"head_{k}", "learned": pred is not None})
    policy = model.policy.to_dict() if getattr(model, "policy", None) is not None else {"kind": "never"}
    has_learned = len(getattr(model, "exit_predictors", [])) > 0
    manifest = {
        "format": format,
        "kind": "early_exit",
        "dynets_export_version": 1,
        "architecture": type(model).__name__,
        "granularity": granularity,
        "input_shape": list(model.input_shape),
        "num_classes": int(model.num_classes),
        "num_exits": K,
        "blocks": blocks,
        "units": {name: {"file": name + SUFFIX[format], "inputs": len(args)} for name, _, args in units},
        "exit_costs": model.exit_costs(False).tolist(),
        "exit_costs_learned": model.exit_costs(has_learned).tolist(),
        "full_cost": float(model.full_cost()),
        "policy": policy,
        "opset": opset if format == "onnx" else None,
        "whole_graph": None,
    }

    def whole(tmp: Path) -> None:
        if whole_graph:
            from dynets.export.whole_graph import export_whole_graph

            manifest["whole_graph"] = export_whole_graph(model, tmp, format=format, opset=opset)

    return write_export(out, units, manifest, format=format, opset=opset, extra=whole)


def write_export(
    out: str | Path,
    units: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]],
    manifest: dict[str, Any],
    *,
    format: str,
    opset: int,
    extra: Any = None,
    axes: dict[str, tuple[list[dict[int, str]], list[dict[int, str]]]] | None = None,
    bounds: dict[str, int] | None = None,
) -> Path:
    """Export each (name, unit, example args) graph, copy the runtime, write the manifest, all into
    a temporary directory renamed to `out` at the end. `extra(tmp)` may add files (and manifest
    entries) before the manifest is written. `axes[name]`: the unit's dynamic input and output
    dimensions, where more than the batch dimension varies."""

    def write(tmp: Path) -> None:
        for name, unit, args in units:
            path = tmp / (name + SUFFIX[format])
            ins, outs = (axes or {}).get(name, (None, None))
            if format == "onnx":
                _export_onnx(unit, args, path, opset, ins, outs, bounds)
            else:
                _export_torch(unit, args, path, ins, bounds)
        if extra is not None:
            extra(tmp)
        shutil.copyfile(runtime.__file__, tmp / "dynets_runtime.py")
        (tmp / runtime.MANIFEST).write_text(json.dumps(manifest, indent=2))

    _atomic_dir_write(Path(out), write)
    return Path(out)


def export_model_dir(model_dir: str | Path, out: str | Path, **kw: Any) -> Path:
    """Load a saved model directory and export it (what `dynets export` runs), whatever its family."""
    from dynets.core.serialization import load
    from dynets.export.families import export_model

    return export_model(load(model_dir), out, **kw)
