"""Inference-only graph rewrites with torch.fx: fold BatchNorm into convolutions, then call the
common layers as functions instead of submodules.

At batch 1 on a CPU most of a small layer's time is fixed overhead rather than arithmetic, and an
`nn.Module` call adds its own (hooks, `__call__` dispatch) on top of the operator's. A conv exit head
(conv, ReLU, pool, flatten, linear) spends more time in that overhead than in its FLOPs, which is
time an early-exit network pays and its static twin does not. `lower_to_functional` rewrites a
traced graph so that Conv2d / Linear / ReLU / AdaptiveAvgPool2d(1) / Flatten become direct calls
of `torch` functions on the same parameters (pool + flatten become one mean), with the same
results. Modules it does not know stay module calls; graphs torch.fx cannot trace stay as they were.

`DirectGraph` then calls the rewritten graph's code as a plain Python function on the graph's
tensors: a GraphModule's own call reads every weight through `nn.Module.__getattr__` and wraps the
call in fx's error reporting, ~10 us for a two-conv exit head at batch 1 (of ~80 us).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["DirectGraph", "fold_and_lower", "lower_to_functional"]


def _functional_call(g: fx.Graph, node: fx.Node, mod: nn.Module) -> fx.Node | None:
    """The function-call node that replaces `node` (a call of `mod`), or None to keep it."""
    if len(node.args) != 1 or node.kwargs:
        return None
    x = node.args[0]

    def attr(name: str) -> fx.Node:
        return g.get_attr(f"{node.target}.{name}")

    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return None
        bias = attr("bias") if mod.bias is not None else None
        args = (x, attr("weight"), bias, mod.stride, mod.padding, mod.dilation, mod.groups)
        return g.call_function(F.conv2d, args)
    if isinstance(mod, nn.Linear):
        return g.call_function(F.linear, (x, attr("weight"), attr("bias") if mod.bias is not None else None))
    if isinstance(mod, nn.ReLU):
        return g.call_function(torch.relu_ if mod.inplace else torch.relu, (x,))
    if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
        return g.call_function(torch.mean, (x, (-2, -1)), {"keepdim": True})
    if isinstance(mod, nn.Flatten):
        return g.call_function(torch.flatten, (x, mod.start_dim, mod.end_dim))
    return None


def lower_to_functional(gm: nn.Module) -> nn.Module:
    """Rewrite a `torch.fx.GraphModule` in place (see the module docstring); other modules are
    returned unchanged. Parameters stay where they were, so the result computes the same values."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module":
            continue
        with g.inserting_before(node):
            new = _functional_call(g, node, gm.get_submodule(node.target))
        if new is None:
            continue
        node.replace_all_uses_with(new)
        g.erase_node(node)
    # Peephole: a pooled (B, C, 1, 1) map flattened from dim 1 -> one mean over dims 2 and 3 (a 4-D
    # map, as AdaptiveAvgPool2d + Flatten(1) in a batched model always sees).
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is torch.flatten and node.args[1:] == (1, -1):
            src = node.args[0]
            if (
                isinstance(src, fx.Node)
                and src.op == "call_function"
                and src.target is torch.mean
                and src.kwargs.get("keepdim")
                and len(src.users) == 1
            ):
                with g.inserting_before(node):
                    new = g.call_function(torch.mean, (src.args[0], (2, 3)))
                node.replace_all_uses_with(new)
                g.erase_node(node)
                g.erase_node(src)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


class DirectGraph(nn.Module):
    """Runs a `torch.fx.GraphModule` (kept as the child `graph_module`, which owns the parameters,
    so `state_dict`, `.to()` and copies behave as usual) by calling its generated code as a plain
    function on a namespace of the same tensors and submodules. Same results as calling the
    GraphModule; for inference copies only (forward hooks on the inner module's layers are not run
    by the inner graph anyway once they are functions)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        if not isinstance(gm, fx.GraphModule):
            raise TypeError(f"DirectGraph: expected a torch.fx.GraphModule, got {type(gm).__name__}")
        self.graph_module = gm

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def _function(self) -> Callable[..., Any]:
        fn = self.__dict__.get("_fn")
        if fn is None:
            gm = self.graph_module
            code = gm.graph.python_code(root_module="self")
            scope = dict(code.globals)
            exec(compile(code.src, f"<dynets.DirectGraph {type(gm).__name__}>", "exec"), scope)
            ns = _namespace(gm)
            forward = scope["forward"]

            def fn(*args: Any) -> Any:
                return forward(ns, *args)

            self.__dict__["_fn"] = fn
        return fn

    def forward(self, *args: Any) -> Any:
        return self._function()(*args)

    def _apply(self, fn, recurse=True):  # tensors may be replaced: rebuild the namespace
        self.__dict__.pop("_fn", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_fn", None)
        return state


def _namespace(gm: fx.GraphModule) -> types.SimpleNamespace:
    """Plain attributes for what the generated code reads from `self`: the submodules the graph
    calls and the tensors it fetches (`get_attr`), under the same dotted paths."""
    root = types.SimpleNamespace()
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    nodes.sort(key=lambda n: n.op != "call_module")  # called modules first
    for node in nodes:
        *parents, leaf = node.target.split(".")
        ns, mod = root, gm
        for name in parents:
            mod = getattr(mod, name)
            if not isinstance(getattr(ns, name, None), types.SimpleNamespace):
                if hasattr(ns, name):  # a called module: its own attributes serve the rest
                    break
                setattr(ns, name, types.SimpleNamespace())
            ns = getattr(ns, name)
        else:
            setattr(ns, leaf, getattr(mod, leaf))
    return root


def fold_and_lower(module: nn.Module) -> nn.Module:
    """BatchNorm folded into the preceding convolutions (torch.fx's `fuse`, eval mode), then
    `lower_to_functional`, then wrapped in `DirectGraph`. A module torch.fx cannot trace
    (data-dependent control flow, list-valued features) is returned as it was."""
    from torch.fx.experimental.optimization import fuse

    try:
        traced = fuse(module)
    except Exception:  # not traceable by torch.fx: keep as is
        return module
    return DirectGraph(lower_to_functional(traced))
