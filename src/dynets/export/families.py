"""Export of the dynamic families beyond early exit, cut where their decisions are taken:

    block skipping (SkipNetwork, e.g. skip_resnet)   stem, one graph per block, one per gate
                                                     (-> the execute probability), head
    routing (RoutedResNet, routed_resnet)            trunk, the router's gate, one graph per branch
    dynamic width (SlimmableNetwork, slimmable_resnet) one graph per width; the smallest also gives
                                                     the confidence the width chooser reads
    dynamic parameters (dyconv_resnet, hyper_mlp)    one graph: the per-sample kernel mixture or
                                                     predicted weights have static shapes
    glance and focus (glance_focus)                  the glance graph (features, logits) and the focus
                                                     graph (patch choice, crop, focus logits); the
                                                     runtime focuses only the samples not yet sure
    skip-update RNNs (skip_lstm, skip_gru)           one graph per time step (cell + update gate) and
                                                     the classifier; the runtime computes each step
                                                     for the rows that update only
    token pruning / merging (dynamicvit, tome)       one graph at the current keep ratio or merge
                                                     count (each sample keeps its own tokens; the
                                                     kept indices are graph outputs)
    Dynamic BERT (DynamicBert)                       embeddings, one graph per kept layer and per
                                                     exit head, dynamic in batch and length; the
                                                     current width x depth sub-network is exported
    MoE transformer (moe_transformer)                embedding, each block's attention, each MoE
                                                     block's router (top-k experts and gates), one
                                                     graph per expert (dynamic in its token count),
                                                     each dense FFN, the pooled head; the runtime
                                                     groups the tokens by expert with the eager
                                                     capacity rule and runs each expert on its own
    ACT RNN (act_rnn)                                one ponder pass (cell + halting probability) and
                                                     the classifier; the runtime ponders each step
                                                     only for the rows that have not halted
    frame skipping (frameskip_rnn)                   one read (cell + skip length) and the classifier
                                                     (+ its confidence, for early stops); the runtime
                                                     reads each frame for the rows due to read only
    A-ViT halting (avit_tiny)                        embedding, per block its qkv, attention core and
                                                     rest (+ halting scores), head; the runtime keeps
                                                     the active tokens of all samples packed, as the
                                                     eager executor does, and drops halted ones

The runtimes in `runtime.py` (copied into every export) run the gates between the graphs and each
block or branch on its own rows only, as the eager executors do. `export_model` picks the
exporter for any of these and for early-exit networks (`staged.export_staged`). The file runs past
400 lines because each family's exporter is short and they share the helpers above them.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynets.export.staged import FORMATS, SUFFIX, export_staged, write_export

SUPPORTED = (
    "early exit (EarlyExitNetwork: ee_resnet, msdnet, ...)",
    "Dynamic BERT (DynamicBert)",
    "block skipping (SkipNetwork: skip_resnet)",
    "routing (RoutedResNet: routed_resnet)",
    "dynamic width (SlimmableNetwork: slimmable_resnet)",
    "dynamic parameters (dyconv_resnet, hyper_mlp)",
    "token pruning and merging at a fixed keep ratio / merge count (dynamicvit_tiny, tome_vit_tiny)",
    "skip-update RNNs (SkipRNN: skip_lstm, skip_gru)",
    "glance and focus (GlanceFocusNet: glance_focus)",
    "mixture-of-experts transformers (MoETransformer: moe_transformer, dense_transformer)",
    "adaptive computation time RNNs (ACTRNN: act_rnn)",
    "frame skipping RNNs (FrameSkipRNN: frameskip_rnn)",
    "A-ViT token halting (HaltingViT: avit_tiny)",
)


class _Graph(nn.Module):
    """One exported graph: `fn(*tensors)` -> a tensor or a tuple of tensors (returned as a tuple, as
    the graph writers expect). `owner` holds the modules `fn` uses and no more: torch.export saves
    every weight of the module it exports, so a layer's graph must not own the whole model."""

    def __init__(self, owner: nn.Module, fn: Any) -> None:
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(*xs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _graph(owner: nn.Module, fn: Any = None) -> _Graph:
    return _Graph(owner, owner if fn is None else fn).eval()


def _at_width(model: nn.Module, wi: int, x: torch.Tensor) -> Any:
    """A slimmable network at width index `wi`; the smallest width also returns the max softmax
    confidence the width chooser compares with its thresholds."""
    logits = model.forward_width(x, wi)
    return logits if wi else (logits, logits.float().softmax(-1).amax(-1))


def _focus(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, glance features) -> (focus logits, the chosen candidate patch index)."""
    choice = model.select(g)
    return model.run_focus(x, g, choice), choice


def _rnn_step(model: nn.Module, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a recurrent model for the rows that compute it: (x_t (n, F), state (n, R, H)) ->
    (new state, the decision input read from it): a Skip-RNN's update gate Δũ (n,), an ACT pass's
    halting probability (n,) (x_t then carries the first-pass flag), a frame skipper's skip length
    (n,) int64 (the argmax of its policy at the model's skip bias and cap)."""
    from dynets.temporal.act import ACTRNN
    from dynets.temporal.frame_skip import FrameSkipRNN

    new = model.stack.step(x_t, state, model.stack.prepare())
    if isinstance(model, ACTRNN):
        return new, model._halting(new)
    if isinstance(model, FrameSkipRNN):  # the saved skip bias and cap are constants of the graph
        return new, model.skip_lengths(model.stack.top(new), (model.skip_bias, model.skip_cap))
    return new, torch.sigmoid(model.gate(model.stack.memory(new))).squeeze(1)


def _rnn_head(model: nn.Module, confidence: bool, state: torch.Tensor) -> Any:
    """state (n, R, H) -> logits (n, C) [, their top softmax probability, for early stops]."""
    logits = model.head(model.stack.top(state))
    return (logits, logits.softmax(1).amax(1)) if confidence else logits


def _one_graph(model: nn.Module) -> tuple[Any, list[str], dict[str, Any]]:
    """(fn, output names, settings) of a model whose adaptation has static shapes at inference."""
    from dynets.spatial.merging import ToMeViT, tome_forward
    from dynets.spatial.token_pruning import DynamicViT

    if isinstance(model, DynamicViT):
        rho = model.keep_ratio
        S = len(model.predictors)

        def pruned(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits, kept = model.forward_pruned(x, rho)
            return (logits, *kept)

        settings = {"keep_ratio": rho, "token_multiple": model.token_multiple}
        return pruned, ["logits", *[f"kept_idx_{s}" for s in range(S)]], settings
    if isinstance(model, ToMeViT):
        r, m = model.merge_r, model.config.token_multiple
        return (
            (lambda x: (tome_forward(model, x, r, track=False, multiple=m)[0],)),
            ["logits"],
            {"merge_r": r, "token_multiple": m},
        )
    return (lambda x: (model.logits(x),)), ["logits"], {}


def _text_layer(model: nn.Module, i: int, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder layer `i` of a DynamicBert at its current width; the attention mask is built in the
    graph from the validity mask, in the additive form every attention implementation takes."""
    mask = (1.0 - valid[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    out = model._layer(i, h, mask)
    return out[0] if isinstance(out, tuple) else out


def _text_head(head: nn.Module, pred: nn.Module | None, h: torch.Tensor, valid: torch.Tensor) -> Any:
    """Exit head (and learned-exit predictor): (hidden, valid) -> logits[, score]."""
    logits = head(h, valid)
    return logits if pred is None else (logits, pred(logits))


def _coefficients(cost: Any) -> list[float]:
    return [float(cost.constant), float(cost.linear), float(cost.quadratic)]


def export_text(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """Embeddings, layers and exit heads of a DynamicBert's current sub-network (kind "text")."""
    BL = {0: "batch", 1: "length"}  # ids, validity and hidden states vary in both
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.vocab_size, (example_batch, 7), generator=gen)
    valid = torch.ones(example_batch, 7, dtype=torch.bool)
    valid[-1, 4:] = False
    units: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = []
    axes: dict[str, Any] = {"embeddings": ([BL], [BL])}
    blocks = []
    kept = model.active_layers
    with torch.no_grad():
        emb = model.embeddings
        units.append(("embeddings", _graph(emb, lambda t: emb(input_ids=t)), (ids,)))
        h = emb(input_ids=ids)
        for k, i in enumerate(kept):
            layer = _graph(model.layers[i], partial(_text_layer, model, i))
            units.append((f"layer_{i}", layer, (h, valid)))
            axes[f"layer_{i}"] = ([BL, BL], [BL])
            h = layer(h, valid)[0]
            pred = model.exit_predictors[i] if (k < len(kept) - 1 and len(model.exit_predictors)) else None
            head = model.heads[i]
            owner = nn.ModuleList([head] if pred is None else [head, pred])
            units.append((f"head_{i}", _graph(owner, partial(_text_head, head, pred)), (h, valid)))
            axes[f"head_{i}"] = ([BL, BL], [{0: "batch"}] * (1 if pred is None else 2))
            blocks.append({"exit": k, "layer": i, "learned": pred is not None})
    u = model.unit_costs()
    manifest = _manifest(model, "text", format, opset, units)
    manifest.update(
        input_shape=None,
        num_classes=int(model.config.num_labels),
        labels=list(model.config.labels),
        pad_token_id=int(model.config.pad_token_id),
        vocab_size=int(model.vocab_size),
        max_positions=int(model.max_positions),
        subnet={"width": model.config.width, "depth": model.config.depth},
        blocks=blocks,
        costs={
            "embeddings": _coefficients(u["embeddings"]),
            "layer": _coefficients(model.layer_cost()),
            "head": _coefficients(u["head"]),
            "predictor": float(u["predictor"]) if len(model.exit_predictors) else 0.0,
        },
        policy=model.policy.to_dict(),
    )
    bounds = {"length": int(model.max_positions)}
    tokenizer = getattr(model, "tokenizer", None)

    def save_tokenizer(tmp: Path) -> None:  # so a deployment can turn text into ids without dynets
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            manifest["tokenizer"] = "tokenizer"

    return write_export(
        out, units, manifest, format=format, opset=opset, axes=axes, bounds=bounds, extra=save_tokenizer
    )


def _example(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.rand((batch, *model.input_shape), generator=torch.Generator().manual_seed(0))


def _manifest(model: nn.Module, kind: str, format: str, opset: int, units: list) -> dict[str, Any]:
    return {
        "format": format,
        "kind": kind,
        "dynets_export_version": 1,
        "architecture": type(model).__name__,
        "input_shape": list(getattr(model, "input_shape", None) or []),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "units": {name: {"file": name + SUFFIX[format], "inputs": len(args)} for name, _, args in units},
        "opset": opset if format == "onnx" else None,
    }


def export_skip(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """Stem, blocks, gates and head of a SkipNetwork as separate graphs (kind "skip")."""
    units: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = []
    program = []
    with torch.no_grad():
        x = _example(model, example_batch)
        units.append(("stem", _graph(model.stem), (x,)))
        h = model.stem(x)
        gi = 0
        for i, block in enumerate(model.blocks):
            gate = None
            if model.gated[i]:
                gate = f"gate_{gi}"
                g = model.gates[gi]  # the execute probability in the graph, compared as in eager
                units.append((gate, _graph(g, lambda t, g=g: torch.sigmoid(g(t).float())), (h,)))
                gi += 1
            units.append((f"block_{i}", _graph(block), (h,)))
            program.append({"block": f"block_{i}", "gate": gate})
            h = block(h)
        units.append(("head", _graph(model.head), (h,)))
    u = model.unit_costs()
    manifest = _manifest(model, "skip", format, opset, units)
    manifest.update(
        program=program,
        min_cost=float(model.min_cost()),
        gated_costs=[float(c) for c, g in zip(u["blocks"], model.gated) if g],
        full_cost=float(model.full_cost()),
        policy={"threshold": model.skip_policy.to_dict()["threshold"]},
    )
    return write_export(out, units, manifest, format=format, opset=opset)


def export_route(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """Trunk, router gate and branches of a RoutedResNet as separate graphs (kind "route")."""
    router = model.router
    with torch.no_grad():
        x = _example(model, example_batch)
        h = model.trunk(x)
        units = [("trunk", _graph(model.trunk), (x,)), ("gate", _graph(router.gate), (h,))]
        names = [f"branch_{k}" for k in range(router.num_branches)]
        units += [(n, _graph(b), (h,)) for n, b in zip(names, router.branches)]
    b = router.costs()["branches"]
    manifest = _manifest(model, "route", format, opset, units)
    manifest.update(
        branches=names,
        branch_costs=model.branch_costs().tolist(),
        relative_costs=(b / b.max()).tolist(),
        route_bias=router.route_bias.tolist(),
        penalty=float(router.cost_penalty),
        full_cost=float(model.full_cost()),
    )
    return write_export(out, units, manifest, format=format, opset=opset)


def export_width(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """One graph per width of a SlimmableNetwork (kind "width")."""
    x = _example(model, example_batch)
    units = [
        (f"width_{k}", _graph(model, partial(_at_width, model, k)), (x,)) for k in range(model.num_widths)
    ]
    manifest = _manifest(model, "width", format, opset, units)
    manifest.update(
        width_mults=list(model.width_mults),
        width_costs=model.width_costs().tolist(),
        full_cost=float(model.width_costs()[-1]),
        policy={"thresholds": list(model.width_policy.thresholds)},
    )
    return write_export(out, units, manifest, format=format, opset=opset)


def export_single(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """A model whose per-sample adaptation has static shapes (at its current setting: a DynamicViT's
    keep ratio, a ToMe merge count), as one graph with its decisions as extra outputs (kind "single")."""
    fn, names, settings = _one_graph(model)
    x = _example(model, example_batch)
    with torch.no_grad():
        flops = model(x).flops
    if not bool((flops == flops[0]).all()):
        raise ValueError(f"export: expected the same FLOPs for every sample of a {type(model).__name__}")
    units = [("model", _graph(model, fn), (x,))]
    manifest = _manifest(model, "single", format, opset, units)
    manifest.update(
        outputs=names, settings=settings, flops=float(flops[0]), full_cost=float(model.full_cost())
    )
    return write_export(out, units, manifest, format=format, opset=opset)


def export_glance(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """Glance and focus graphs of a GlanceFocusNet; the exit policy runs between them (kind "glance")."""
    x = _example(model, example_batch)
    with torch.no_grad():
        g, _ = model.run_glance(x)
    units = [
        ("glance", _graph(model, model.run_glance), (x,)),
        ("focus", _graph(model, partial(_focus, model)), (x, g)),
    ]
    manifest = _manifest(model, "glance", format, opset, units)
    manifest.update(
        exit_costs=model.exit_costs().tolist(),
        full_cost=float(model.full_cost()),
        positions=model.pos.tolist(),
        policy=model.policy.to_dict(),
    )
    return write_export(out, units, manifest, format=format, opset=opset)


def export_rnn(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """A recurrent model's step (cell stack + its decision input) and classifier as graphs: kind
    "skip_rnn" (SkipRNN), "act_rnn" (ACTRNN, the step is one ponder pass) or "frame_skip"
    (FrameSkipRNN, the classifier also gives its confidence)."""
    from dynets.temporal.act import ACTRNN
    from dynets.temporal.frame_skip import FrameSkipRNN

    c, u = model.config, model.unit_costs()
    if isinstance(model, ACTRNN):
        kind, decide, extra = "act_rnn", model.halt, {"pass_cost": float(model.pass_cost())}
        extra.update(max_ponder=c.max_ponder, epsilon=c.epsilon)
    elif isinstance(model, FrameSkipRNN):
        kind, decide, extra = "frame_skip", model.skip_policy, {"read_cost": float(u["step"] + u["policy"])}
        extra["policy"] = {"stop_confidence": c.stop_confidence}
        extra["skip_knob"] = {"skip_bias": c.skip_bias, "skip_cap": c.skip_cap}  # baked into the step graph
    else:
        kind, decide = "skip_rnn", model.gate
        extra = {"update_cost": float(model.update_cost()), "full_cost": float(model.full_cost())}
        extra["policy"] = {"threshold": float(model.threshold)}
    gen = torch.Generator().manual_seed(0)
    x_t = torch.rand(example_batch, model.stack.input_size, generator=gen)
    state = torch.rand(example_batch, model.stack.state_rows, c.hidden, generator=gen)
    head = _graph(model.head, partial(_rnn_head, model, kind == "frame_skip"))
    units = [
        ("step", _graph(nn.ModuleList([model.stack, decide]), partial(_rnn_step, model)), (x_t, state)),
        ("head", head, (state,)),
    ]
    manifest = _manifest(model, kind, format, opset, units)
    manifest.update(
        input_size=c.input_size,
        state_shape=[model.stack.state_rows, c.hidden],
        head_cost=float(u["head"]),
        **extra,
    )
    return write_export(out, units, manifest, format=format, opset=opset)


def _moe_attention(block: nn.Module, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """h + attention(ln1(h)) for (B, L, d), padded keys masked as in the eager model."""
    from dynets.models.moe_transformer import key_bias

    return h + block.attn(block.ln1(h), key_bias(valid, h.dtype))


def _moe_route(block: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Valid tokens z (N, d) -> (ln2(z), the expert input; top-k experts (N, k); gates (N, k))."""
    zn = block.ln2(z)
    return (zn, *block.ffn.router(zn)[2:])


def _moe_head(model: nn.Module, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens of ln_f(h), then the classifier: (B, L, d) -> (B, C)."""
    return model.head(model.pool(h, valid))


def export_moe(model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int) -> Path:
    """Embedding, attention, router, expert and FFN graphs of an MoETransformer (kind "moe")."""
    from dynets.width.moe import MoE

    c = model.config
    BL = {0: "batch", 1: "length"}
    gen = torch.Generator().manual_seed(0)
    if model.tokens_mode:
        x = torch.randint(0, c.vocab_size, (example_batch, 7), generator=gen)
    else:
        x = torch.rand(example_batch, 7, c.input_size, generator=gen)
    valid = torch.ones(example_batch, 7, dtype=torch.bool)
    valid[-1, 4:] = False
    z = torch.rand(3 * example_batch, c.d_model, generator=gen)  # tokens, for the per-token graphs
    units: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = [
        ("embed", _graph(model.embed, model.embed_positions), (x,))
    ]
    axes: dict[str, Any] = {"embed": ([BL], [BL])}
    with torch.no_grad():
        h = model.embed_positions(x)
    for i, b in enumerate(model.blocks):
        owner = nn.ModuleList([b.ln1, b.attn])
        units.append((f"attn_{i}", _graph(owner, partial(_moe_attention, b)), (h, valid)))
        axes[f"attn_{i}"] = ([BL, BL], [BL])
        if isinstance(b.ffn, MoE):
            route = _graph(nn.ModuleList([b.ln2, b.ffn.router]), partial(_moe_route, b))
            units.append((f"router_{i}", route, (z,)))
            units += [(f"expert_{i}_{e}", _graph(ex), (z,)) for e, ex in enumerate(b.ffn.experts)]
        else:
            ffn = nn.Sequential(b.ln2, b.ffn)
            units.append((f"ffn_{i}", _graph(ffn), (z,)))
    head = _graph(nn.ModuleList([model.ln_f, model.head]), partial(_moe_head, model))
    units.append(("head", head, (h, valid)))
    axes["head"] = ([BL, BL], [{0: "batch"}])
    u, moe = model.unit_costs(), [isinstance(b.ffn, MoE) for b in model.blocks]
    cf = c.capacity_factor if c.eval_capacity_factor is None else c.eval_capacity_factor
    manifest = _manifest(model, "moe", format, opset, units)
    manifest.update(
        moe_layers=moe,
        num_experts=c.num_experts,
        k=c.k,
        capacity_factor=None if c.dropless else float(cf),
        d_model=c.d_model,
        vocab_size=c.vocab_size,
        pad_token_id=c.pad_token_id,
        input_size=c.input_size,
        costs={
            "attention": _coefficients(u["attention"]),
            "per_token": u["embed"] + (len(moe) - sum(moe)) * u["ffn"] + sum(moe) * u["router"],
            "expert": u["expert"],
            "head": u["head"],
        },
    )
    return write_export(out, units, manifest, format=format, opset=opset, axes=axes)


def _avit_attention(heads: int, grid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The attention core of one A-ViT block on the live samples' qkv laid out per sample:
    grid (n, L, 3D), valid (n, L) (False: padding, not a key) -> (n, L, D)."""
    from dynets.models.vit import attention_core

    n, L, D = grid.shape[0], grid.shape[1], grid.shape[2] // 3
    q, k, v = grid.reshape(n, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # each (n, H, L, d)
    bias = torch.zeros_like(grid[..., 0]).masked_fill(~valid, float("-inf"))[:, None, None, :]
    return attention_core(q, k, v, bias).transpose(1, 2).reshape(n, L, D)


def _avit_rest(model: nn.Module, i: int, xp: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rest of block i on packed tokens: xp + proj(o), then the MLP; and the halting scores."""
    blk = model.blocks[i]
    xp = xp + blk.attn.proj(o)
    xp = xp + blk.mlp(blk.norm2(xp))
    return xp, model.halting_score(xp, i)


def export_halting_vit(
    model: nn.Module, out: str | Path, *, format: str, opset: int, example_batch: int
) -> Path:
    """Embedding, per-block qkv / attention core / rest (+ halting) and head graphs of an A-ViT
    (kind "halting_vit"); the runtime packs the active tokens between them."""
    x = _example(model, example_batch)
    embed = nn.Module()  # only what ViT.embed reads, so the graph does not carry the whole model
    embed.normalize, embed.patch_embed = model.normalize, model.patch_embed
    embed.cls_token, embed.pos_embed = model.cls_token, model.pos_embed
    BL = {0: "batch", 1: "length"}
    units: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = [
        ("embed", _graph(embed, partial(type(model).embed, embed)), (x,))
    ]
    axes: dict[str, Any] = {}
    with torch.no_grad():
        t = model.embed(x)
        B, T, D = t.shape
        xp = t.reshape(B * T, D)
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[-1, T // 2 :] = False
        for i, blk in enumerate(model.blocks):
            qkv_unit = _graph(nn.Sequential(blk.norm1, blk.attn.qkv))
            qkv = qkv_unit(xp)[0]
            core = _graph(nn.Module(), partial(_avit_attention, blk.attn.heads))
            rest = _graph(nn.ModuleList([blk.attn.proj, blk.norm2, blk.mlp]), partial(_avit_rest, model, i))
            units += [
                (f"qkv_{i}", qkv_unit, (xp,)),
                (f"attn_{i}", core, (qkv.reshape(B, T, 3 * D), valid)),
                (f"rest_{i}", rest, (xp, xp.flip(0))),  # two tensors: torch.export merges aliases
            ]
            axes[f"attn_{i}"] = ([BL, BL], [BL])
        head = _graph(nn.ModuleList([model.norm, model.head]), lambda c: model.head(model.norm(c)))
        units.append(("head", head, (t[:, 0],)))  # the ACT-weighted class tokens (B, D) -> logits
    manifest = _manifest(model, "halting_vit", format, opset, units)
    manifest.update(
        depth=len(model.blocks),
        dim=D,
        tokens=T,
        base_cost=float(model.embed_cost() + model.head_cost()),
        block_costs=model._block_cost_table().tolist(),
        full_cost=float(model.full_cost()),
        policy={"threshold": float(model.threshold)},
    )
    return write_export(out, units, manifest, format=format, opset=opset, axes=axes)


def export_model(
    model: nn.Module,
    out: str | Path,
    *,
    format: str = "onnx",
    granularity: str = "block",
    opset: int = 17,
    example_batch: int = 2,
    whole_graph: bool = False,
) -> Path:
    """Export `model` so that it stays dynamic (see the module docstring); returns `out`.
    `granularity` and `whole_graph` apply to early-exit networks only."""
    from dynets.depth.skipping import SkipNetwork
    from dynets.models.dynamic_params import DyConvResNet, HyperMLP
    from dynets.models.moe_transformer import MoETransformer
    from dynets.models.routing import RoutedResNet
    from dynets.spatial.glance import GlanceFocusNet
    from dynets.spatial.halting import HaltingViT
    from dynets.spatial.merging import ToMeViT
    from dynets.spatial.token_pruning import DynamicViT
    from dynets.temporal.act import ACTRNN
    from dynets.temporal.frame_skip import FrameSkipRNN
    from dynets.temporal.skip_rnn import SkipRNN
    from dynets.text.bert import DynamicBert  # imports transformers only when a model is built
    from dynets.width.slimmable import SlimmableNetwork

    if all(hasattr(model, a) for a in ("stages", "heads", "exit_stages")):
        return export_staged(
            model,
            out,
            format=format,
            granularity=granularity,
            opset=opset,
            example_batch=example_batch,
            whole_graph=whole_graph,
        )
    if isinstance(model, SkipNetwork):
        exporter = export_skip
    elif isinstance(model, RoutedResNet):
        exporter = export_route
    elif isinstance(model, DynamicBert):
        exporter = export_text
    elif isinstance(model, SlimmableNetwork):
        exporter = export_width
    elif isinstance(model, GlanceFocusNet):
        exporter = export_glance
    elif isinstance(model, (ACTRNN, FrameSkipRNN)) or (isinstance(model, SkipRNN) and model.config.skip):
        exporter = export_rnn
    elif isinstance(model, MoETransformer):
        exporter = export_moe
    elif isinstance(model, HaltingViT):
        exporter = export_halting_vit
    elif isinstance(model, (DyConvResNet, HyperMLP, DynamicViT, ToMeViT)):
        exporter = export_single
        if isinstance(model, DyConvResNet) and format == "onnx":
            raise ValueError(
                "format: dynamic convolution runs as one grouped convolution with groups = batch size, "
                "which ONNX's Conv cannot take with a dynamic batch; expected 'torch' for dyconv_resnet, "
                "got 'onnx'"
            )
    else:
        raise TypeError(
            f"export: expected a model of an exportable family ({'; '.join(SUPPORTED)}), "
            f"got {type(model).__name__}"
        )
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if granularity != "block" or whole_graph:
        raise ValueError(
            f"granularity / whole_graph: options of early-exit exports; expected 'block' / False for a "
            f"{type(model).__name__}, got {granularity!r} / {whole_graph!r}"
        )
    if example_batch < 2:
        raise ValueError(
            f"example_batch: expected >= 2 (so the batch dimension stays symbolic), got {example_batch}"
        )
    if getattr(model, "inference_only", False):
        raise TypeError("export: expected the original model, got an optimize_for_inference copy")
    model.eval()
    return exporter(model, out, format=format, opset=opset, example_batch=example_batch)
