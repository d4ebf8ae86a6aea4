"""DynaBERT (Hou et al. 2020): width and depth of a Dynamic BERT chosen at run time.

Width w keeps the first round(w * heads) attention heads and round(w * I) feed-forward neurons
of every layer; depth d keeps round(d * layers) layers on an even schedule. One set of
parameters serves every sub-network: a narrow layer runs on *slices* (views) of the full
weights, so its matrices really are smaller (nothing is zeroed or masked):

  Q, K, V    weight[: h'*d_head]         (h'*d_head, H)   rows of the kept heads
  attn out   weight[:, : h'*d_head]      (H, h'*d_head)   their columns
  FFN in     weight[: n']                (n', H)          rows of the kept neurons
  FFN out    weight[:, : n']             (H, n')          their columns

Which heads and neurons come first is decided once by importance-based rewiring (Michel et al.
2019; DynaBERT section 3.1): the gradient of the task loss w.r.t. a per-head mask and a per-neuron
mask, accumulated in absolute value over labelled batches, ranks them; each layer is then permuted
so the most important come first. Heads and neurons are unordered sets in a transformer, so the
full-width function is unchanged by the permutation (up to float summation order).

Depth schedule: keep layer floor(j * L / n) for j < n, n = round(d * L). The first layer is
always kept and the dropped ones are spread evenly; for L = 12 this is exactly DynaBERT's rule
(d = 0.75 drops layers 4, 8, 12 counting from 1; d = 0.5 every second one). The exits of a
sub-network are the exit heads after its kept layers, so early exit composes with width and depth.

Typical order: fine-tune (recipes.train_text), `rewire(model, data)`, then
`train_dynabert(model, data, config)`: the sandwich rule (the largest and the smallest sub-net
plus random ones each step), each sub-net distilled from a frozen copy of the full model (KL on
logits at every exit of the sub-net, MSE between its hidden states and the teacher's at the same
layers; the hidden size never changes with width, so every layer can be matched).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.outputs import MultiExitOutput
from dynets.train.loop import TrainConfig, TrainResult, train
from dynets.train.losses import exit_weights

if TYPE_CHECKING:
    from dynets.text.bert import DynamicBert

__all__ = [
    "DEPTHS",
    "WIDTHS",
    "Rewiring",
    "check_depth",
    "check_width",
    "estimate_importance",
    "kept_layers",
    "narrow_layer",
    "rewire",
    "train_dynabert",
]

WIDTHS = (0.25, 0.5, 0.75, 1.0)
DEPTHS = (0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------- sub-network shapes
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_width(width: Any) -> float:
    """The width multiplier as one of WIDTHS, or a ValueError naming the allowed set."""
    if _is_number(width):
        for w in WIDTHS:
            if abs(float(width) - w) < 1e-9:
                return w
    raise ValueError(f"width: expected one of {list(WIDTHS)}, got {width!r}")


def check_depth(depth: Any) -> float:
    """The depth multiplier as a float in (0, 1], or a ValueError."""
    if not _is_number(depth) or not 0.0 < float(depth) <= 1.0:
        raise ValueError(f"depth: expected a float in (0, 1] (the fraction of layers kept), got {depth!r}")
    return float(depth)


def _scaled(n: int, m: float) -> int:
    return max(1, math.floor(n * m + 0.5))


def kept_layers(num_layers: int, depth: float) -> list[int]:
    """Indices of the layers a depth multiplier keeps: n = round(depth * L), evenly spread."""
    n = _scaled(num_layers, check_depth(depth))
    return [(j * num_layers) // n for j in range(n)]


def layer_sizes(layer: nn.Module) -> tuple[int, int, int]:
    """(heads, head_dim, FFN neurons) of a BERT-style layer, or a ValueError if it is not one."""
    try:
        att = layer.attention.self
        for m in (att.query, att.key, att.value, layer.attention.output.dense, layer.intermediate.dense):
            assert isinstance(m, nn.Linear)
        assert isinstance(layer.output.dense, nn.Linear) and callable(layer.intermediate.intermediate_act_fn)
        assert getattr(att, "position_embedding_type", "absolute") == "absolute"
        assert not getattr(layer, "add_cross_attention", False)
        return (
            int(att.num_attention_heads),
            int(att.attention_head_size),
            layer.intermediate.dense.out_features,
        )
    except (AttributeError, AssertionError) as e:
        raise ValueError(
            f"width < 1 needs BERT-style layers (attention.self.query/key/value with absolute positions, "
            f"attention.output.dense, intermediate.dense, output.dense), got a {type(layer).__name__}"
        ) from e


def subnet_sizes(layer: nn.Module, width: float) -> tuple[int, int]:
    """(heads, neurons) that width `width` keeps in `layer`."""
    heads, _, neurons = layer_sizes(layer)
    return _scaled(heads, width), _scaled(neurons, width)


# ---------------------------------------------------------------------------- the narrow layer
def _linear(
    x: torch.Tensor, lin: nn.Linear, rows: int | None = None, cols: int | None = None
) -> torch.Tensor:
    """x @ W'^T + b' with W' = W[:rows, :cols] (a view) and b' = b[:rows]."""
    w = lin.weight if rows is None else lin.weight[:rows]
    w = w if cols is None else w[:, :cols]
    b = lin.bias if (lin.bias is None or rows is None) else lin.bias[:rows]
    return F.linear(x, w, b)


def narrow_layer(
    layer: nn.Module,
    h: torch.Tensor,
    mask: torch.Tensor | None,
    heads: int,
    neurons: int,
    *,
    eager: bool = False,
    head_mask: torch.Tensor | None = None,
    neuron_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Hugging Face BertLayer run with its first `heads` heads and first `neurons` FFN neurons.

    h: (B, L, H); mask: what `hf.attention_mask` builds (bool, True = attend, or additive float),
    or None. With all heads and neurons it computes what the HF layer computes (same ops, same
    order). eager=True spells attention out as two matmuls so FlopCounterMode counts it on CPU.
    head_mask (heads,) / neuron_mask (neurons,) multiply each head's context / each neuron's
    activation: only for importance estimation, never for execution.
    """
    att, att_out = layer.attention.self, layer.attention.output
    B, L, _ = h.shape
    d = att.attention_head_size
    hd = heads * d

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, h'*d) -> (B, h', L, d)
        return t.view(B, L, heads, d).transpose(1, 2)

    q, k, v = (split(_linear(h, lin, rows=hd)) for lin in (att.query, att.key, att.value))
    p = att.dropout.p if att.training else 0.0
    scale = float(getattr(att, "scaling", d**-0.5))
    if eager:
        scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, h', L, L)
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                if mask.dtype == torch.bool
                else scores + mask
            )
        ctx = torch.matmul(F.dropout(scores.softmax(-1), p, att.training), v)  # (B, h', L, d)
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    if head_mask is not None:
        ctx = ctx * head_mask[:, None, None]
    ctx = ctx.transpose(1, 2).reshape(B, L, hd)  # (B, L, h'*d)
    a = att_out.LayerNorm(att_out.dropout(_linear(ctx, att_out.dense, cols=hd)) + h)  # (B, L, H)
    inter = layer.intermediate.intermediate_act_fn(_linear(a, layer.intermediate.dense, rows=neurons))
    if neuron_mask is not None:
        inter = inter * neuron_mask  # (B, L, n')
    out = layer.output
    return out.LayerNorm(out.dropout(_linear(inter, out.dense, cols=neurons)) + a)  # (B, L, H)


# ---------------------------------------------------------------------------- importance and rewiring
@dataclasses.dataclass
class Rewiring:
    """What `rewire` found: importance per (layer, head) and (layer, neuron) in the *old* order, and
    the permutation applied (new position i holds old head / neuron order[layer, i])."""

    head_importance: torch.Tensor  # (K, heads) float64
    neuron_importance: torch.Tensor  # (K, neurons) float64
    head_order: torch.Tensor  # (K, heads) int64
    neuron_order: torch.Tensor  # (K, neurons) int64


def _ids_labels(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != 2:
        raise TypeError(f"{name}: expected an object with tensors .x (N, L) token ids and .y (N,) labels")
    if y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(
            f"{name}: expected .x (N, L) and .y (N,) with N > 0, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    return x.long(), y.long()


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    return v


def estimate_importance(
    model: DynamicBert, data: Any, *, batches: int = 8, batch_size: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, heads) and (K, neurons) importance: sum over batches of |d loss / d mask|.

    The loss is the cross-entropy of the final exit of the full model (width 1, depth 1), in eval
    mode; `batches` batches of `batch_size` examples are drawn from `data` with `seed`. Only the
    masks' gradients are computed (the parameters' .grad stay untouched).
    """
    x, y = _ids_labels(data, "data")
    batches, batch_size = _positive_int(batches, "batches"), _positive_int(batch_size, "batch_size")
    K = len(model.layers)
    nh, _, ni = layer_sizes(model.layers[0])
    dev = model.heads[0].classifier.weight.device
    hm = torch.ones(K, nh, device=dev, requires_grad=True)
    nm = torch.ones(K, ni, device=dev, requires_grad=True)
    imp_h = torch.zeros(K, nh, dtype=torch.float64)
    imp_n = torch.zeros(K, ni, dtype=torch.float64)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: batches * batch_size]
    was_training = model.training
    model.eval()
    try:
        for idx in order.split(batch_size):
            ids, valid, _ = model._prepare(x[idx].to(dev))
            h = model.embeddings(input_ids=ids)  # (B, L, H)
            mask = model._mask(valid, h)
            for li, layer in enumerate(model.layers):
                h = narrow_layer(layer, h, mask, nh, ni, head_mask=hm[li], neuron_mask=nm[li])
            loss = F.cross_entropy(model.heads[-1](h), y[idx].to(dev))
            gh, gn = torch.autograd.grad(loss, (hm, nm))
            imp_h += gh.abs().double().cpu()
            imp_n += gn.abs().double().cpu()
    finally:
        model.train(was_training)
    return imp_h, imp_n


@torch.no_grad()
def permute_layer(layer: nn.Module, head_order: torch.Tensor, neuron_order: torch.Tensor) -> None:
    """Reorder a layer's heads and FFN neurons in place: new head i = old head head_order[i]."""
    _, d, _ = layer_sizes(layer)
    att = layer.attention.self
    rows = (head_order[:, None] * d + torch.arange(d)).reshape(-1).to(att.query.weight.device)
    for lin in (att.query, att.key, att.value):
        lin.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[rows])
    dense = layer.attention.output.dense
    dense.weight.copy_(dense.weight[:, rows])
    neurons = neuron_order.to(dense.weight.device)
    inter, out = layer.intermediate.dense, layer.output.dense
    inter.weight.copy_(inter.weight[neurons])
    if inter.bias is not None:
        inter.bias.copy_(inter.bias[neurons])
    out.weight.copy_(out.weight[:, neurons])


def rewire(
    model: DynamicBert, data: Any, *, batches: int = 8, batch_size: int = 32, seed: int = 0
) -> Rewiring:
    """Permute every layer's heads and neurons so the most important come first (in place).

    The full-width model computes the same function afterwards; narrow widths then keep the most
    important heads and neurons. Sets model.config.rewired; do it before train_dynabert (an
    optimizer's state would no longer match the permuted weights).
    """
    imp_h, imp_n = estimate_importance(model, data, batches=batches, batch_size=batch_size, seed=seed)
    head_order = torch.argsort(imp_h, dim=1, descending=True, stable=True)
    neuron_order = torch.argsort(imp_n, dim=1, descending=True, stable=True)
    for li, layer in enumerate(model.layers):
        permute_layer(layer, head_order[li], neuron_order[li])
    model.config.rewired = True
    return Rewiring(imp_h, imp_n, head_order, neuron_order)


# ---------------------------------------------------------------------------- training
class _Sandwich(nn.Module):
    """The train loop's model: each training step runs the teacher once and several sub-nets.

    Returns MultiExitOutput with the largest sub-net's exits (for the loop's train accuracy) and
    everything the loss needs in aux. Sub-nets are drawn with the global RNG, which the loop seeds
    (and checkpoints), so a run is deterministic given config.seed.
    """

    def __init__(
        self, model: DynamicBert, teacher: DynamicBert, subnets: list[tuple[float, float]], n_random: int
    ):
        super().__init__()
        self.model = model
        self.__dict__["teacher"] = teacher  # not a submodule: never trained, never checkpointed
        self.subnets, self.n_random = subnets, n_random

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        ids = x.long()
        largest, smallest = self.subnets[0], self.subnets[-1]
        if not torch.is_grad_enabled():  # the loop's evaluation: the largest sub-net's exits
            self.model.set_subnet(*largest)
            return MultiExitOutput(self.model.all_exit_logits(ids))
        with torch.no_grad():
            t_logits, t_hidden, _ = self.teacher.exits_and_hidden(ids)
        pool = self.subnets[1:-1]
        picks = [largest] + ([smallest] if smallest != largest else [])
        picks += [pool[i] for i in torch.randperm(len(pool))[: self.n_random].tolist()]
        runs = []
        for w, d in picks:
            self.model.set_subnet(w, d)
            logits, hidden, valid = self.model.exits_and_hidden(ids)
            runs.append((self.model.active_layers, logits, hidden))
        aux = {"runs": runs, "teacher_logits": t_logits[-1], "teacher_hidden": t_hidden, "valid": valid}
        return MultiExitOutput(runs[0][1], aux=aux)


def _subnet_loss(
    out: MultiExitOutput, target: torch.Tensor, config: TrainConfig, distill: float, hidden_weight: float
) -> torch.Tensor:
    """Sum over the step's sub-nets of: weighted exits' (1-a) CE + a T^2 KL(teacher || exit), plus
    hidden_weight * the mean over kept layers of the MSE to the teacher's hidden state (real tokens)."""
    T = config.temperature
    teacher = F.log_softmax(out.aux["teacher_logits"] / T, dim=-1)  # (B, C)
    valid = out.aux["valid"][..., None].to(teacher.dtype)  # (B, L, 1)
    denom = valid.sum() * out.aux["teacher_hidden"][0].shape[-1]
    total = teacher.new_zeros(())
    for kept, logits, hidden in out.aux["runs"]:
        w = _exit_weights_for(config.exit_weights, kept, len(out.aux["teacher_hidden"]))
        for k, z in enumerate(logits):
            loss = teacher.new_zeros(())
            if distill < 1.0:
                loss = (1.0 - distill) * F.cross_entropy(z, target, label_smoothing=config.label_smoothing)
            if distill > 0.0:
                kl = F.kl_div(F.log_softmax(z / T, dim=-1), teacher, reduction="batchmean", log_target=True)
                loss = loss + distill * T * T * kl
            total = total + w[k] * loss
        if hidden_weight > 0:
            mse = [
                ((s - out.aux["teacher_hidden"][li]) ** 2 * valid).sum() / denom
                for s, li in zip(hidden, kept)
            ]
            total = total + hidden_weight * torch.stack(mse).mean()
    return total


def _exit_weights_for(scheme: str | list[float], kept: Sequence[int], num_layers: int) -> list[float]:
    """A sub-net's exit weights: a named scheme over its own exits, or the full list's kept entries."""
    if isinstance(scheme, str):
        return exit_weights(len(kept), scheme).tolist()
    if len(scheme) != num_layers:
        raise ValueError(
            f"TrainConfig.exit_weights: expected {num_layers} values (one per layer), got {len(scheme)}"
        )
    try:
        return exit_weights(len(kept), [scheme[i] for i in kept]).tolist()
    except ValueError as e:
        raise ValueError(
            f"TrainConfig.exit_weights {scheme}: the sub-net keeping layers {list(kept)} gets no "
            "positive weight"
        ) from e


def train_dynabert(
    model: DynamicBert,
    data: Any,
    config: TrainConfig,
    *,
    widths: Sequence[float] = WIDTHS,
    depths: Sequence[float] = DEPTHS,
    eval_data: Any = None,
    random_subnets: int = 2,
    distill: float = 1.0,
    hidden_weight: float = 1.0,
    teacher: DynamicBert | None = None,
) -> TrainResult:
    """Train every (width, depth) sub-network of `model` at once, by distillation from the full model.

    Each step (sandwich rule): the largest sub-net (max width, max depth), the smallest, and
    `random_subnets` others drawn from widths x depths; their losses are summed (one backward).
    The teacher is a frozen copy of `model` at width 1, depth 1 taken at the start (or `teacher`).
    distill: weight of the KL term against the labels' cross-entropy (DynaBERT: 1, labels unused);
    hidden_weight: weight of the hidden-state MSE. From `config` this uses the optimiser, schedule,
    epochs, seed, temperature, exit_weights (over each sub-net's own exits) and checkpointing;
    config.distill is not used. Every exit head of each sampled sub-net is trained, so exits work at
    every width. The model's sub-net setting is restored afterwards. eval_data: the largest sub-net's
    per-exit accuracy is recorded each epoch. There is no resume: a restarted run would take its
    teacher from the half-trained model (pass the original as `teacher` to do it by hand).
    """
    from dynets.text.recipes import _as_float  # late import: recipes is the text package's loop glue

    ws = sorted({check_width(w) for w in _nonempty(widths, "widths")}, reverse=True)
    ds = sorted({check_depth(d) for d in _nonempty(depths, "depths")}, reverse=True)
    if isinstance(random_subnets, bool) or not isinstance(random_subnets, int) or random_subnets < 0:
        raise ValueError(f"random_subnets: expected an int >= 0, got {random_subnets!r}")
    for name, v in (("distill", distill), ("hidden_weight", hidden_weight)):
        if not _is_number(v) or v < 0 or (name == "distill" and v > 1):
            raise ValueError(
                f"{name}: expected a float in {'[0, 1]' if name == 'distill' else '[0, inf)'}, got {v!r}"
            )
    # largest first, smallest last, the rest between in a fixed order
    subnets = [(w, d) for w in ws for d in ds]
    subnets = [subnets[0], *sorted(set(subnets[1:-1]) - {subnets[0], subnets[-1]}, reverse=True), subnets[-1]]
    K = len(model.layers)
    for _, d in subnets:  # fail before training starts, not in the middle of it
        _exit_weights_for(config.exit_weights, kept_layers(K, d), K)
    xy, eval_xy = _as_float(data, "data"), _as_float(eval_data, "eval_data")
    before = model.subnet
    if teacher is None:  # the tokenizer is not copied: the teacher shares it (memo maps it to None)
        teacher = copy.deepcopy(model, memo={id(model.tokenizer): None})
    teacher.set_subnet(1.0, 1.0)
    teacher.eval().requires_grad_(False)
    step = _Sandwich(model, teacher, subnets, random_subnets)
    try:
        result = train(
            step,
            xy,
            config,
            eval_data=eval_xy,
            loss_fn=lambda out, y: _subnet_loss(out, y, config, float(distill), float(hidden_weight)),
        )
    finally:
        model.set_subnet(*before)
        model.train()
    return TrainResult(history=result.history, model=model, checkpoint=result.checkpoint)


def _nonempty(values: Any, name: str) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
        raise ValueError(f"{name}: expected a non-empty sequence of multipliers, got {values!r}")
    return list(values)
