"""Mixture-of-experts feed-forward block: top-k routing with capacity, sort-based dispatch.

A drop-in replacement of a dense FFN (fc1 -> activation -> fc2): input (B, T, d) or (N, d), output
the same shape. Each call walks five steps:

  1. route:    logits = W_r x in float32 (jitter / noise in training), softmax, top-k experts and
               their gates per token; k=1 keeps the raw probability as gate (Switch), k>1
               renormalises the k gates to sum to 1 (GShard)
  2. plan:     the k*N (token, expert) assignments, all first choices before all second ones, are
               stably sorted by expert; each expert keeps its first `capacity` assignments
               (capacity = ceil(capacity_factor * k * N / E)), the rest are dropped; dropless
               keeps all of them
  3. dispatch: gather the kept tokens into one expert-contiguous (M, d) tensor (index_select)
  4. compute:  one fc1 / fc2 per expert on its contiguous slice: a loop over experts, none over tokens
  5. combine:  scale by the gates and index_add back into token order

A dropped assignment adds nothing (the residual around the block carries the token on). Drops are
counted, never silent: every call leaves an `MoEStats` in `moe.last_stats` (or returns it with
`return_stats=True`) with tokens per expert, dropped assignments and tokens, the per-token expert
ids (-1 where dropped) and the auxiliary losses; `moe.counters` accumulates the counts over calls.

Auxiliary losses: the Switch load-balancing loss E * sum_i f_i * P_i (f_i: the share of the k*N
assignments routed to expert i before capacity, P_i: the mean router probability of i; 1.0 when
perfectly balanced) and the router z-loss mean(logsumexp(logits)^2) (ST-MoE), which keeps the
router logits small. `stats.aux_loss` is their weighted sum, differentiable.

`moe_from_dense` upcycles a dense FFN into an MoE and `replace_bert_ffn_with_moe` does it inside a
BERT encoder. The file runs past 400 lines because those two belong with the block they build.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "DispatchPlan",
    "Expert",
    "FeedForward",
    "MoE",
    "MoEBertOutput",
    "MoEConfig",
    "MoEStats",
    "Router",
    "check_moe_input",
    "collect_moe_stats",
    "load_balancing_loss",
    "make_stats",
    "moe_aux_loss",
    "moe_from_dense",
    "new_counters",
    "plan_dispatch",
    "replace_bert_ffn_with_moe",
    "router_z_loss",
    "run_experts",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class MoEConfig:
    """Everything that defines an MoE block; JSON-serialisable."""

    d_model: int
    d_ff: int  # hidden size of each expert
    num_experts: int = 8
    k: int = 1  # experts per token: 1 = Switch, 2 = GShard
    capacity_factor: float = 1.25  # per-expert slots = ceil(capacity_factor * k * N / num_experts)
    eval_capacity_factor: float | None = None  # in eval mode; None = capacity_factor
    dropless: bool = False  # no capacity: every assignment runs (capacity factors ignored)
    normalize_gates: bool | None = None  # renormalise the k gates to sum 1; None = (k > 1)
    activation: str = "gelu"
    bias: bool = True
    router_jitter: float = 0.0  # training: router input * U(1 - eps, 1 + eps) (Switch)
    router_noise: float = 0.0  # training: N(0, noise^2) added to the router logits
    balance_weight: float = 0.01
    z_loss_weight: float = 0.001

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"MoEConfig.{name}: expected an int >= 1, got {v!r}")
        if not _is_int(self.k) or not 1 <= self.k <= self.num_experts:
            raise ValueError(
                f"MoEConfig.k: expected an int in [1, num_experts={self.num_experts}], got {self.k!r}"
            )
        if not isinstance(self.dropless, bool):
            raise ValueError(f"MoEConfig.dropless: expected a bool, got {self.dropless!r}")
        if not self.dropless:
            for name in ("capacity_factor", "eval_capacity_factor"):
                v = getattr(self, name)
                if v is None and name == "eval_capacity_factor":
                    continue
                if not _is_num(v) or v <= 0:
                    raise ValueError(
                        f"MoEConfig.{name}: expected a finite number > 0 (or dropless=True), got {v!r}"
                    )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MoEConfig.activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not _is_num(self.router_jitter) or not 0 <= self.router_jitter < 1:
            raise ValueError(
                f"MoEConfig.router_jitter: expected a number in [0, 1), got {self.router_jitter!r}"
            )
        for name in ("router_noise", "balance_weight", "z_loss_weight"):
            v = getattr(self, name)
            if not _is_num(v) or v < 0:
                raise ValueError(f"MoEConfig.{name}: expected a finite number >= 0, got {v!r}")
        if self.normalize_gates is not None and not isinstance(self.normalize_gates, bool):
            raise ValueError(
                f"MoEConfig.normalize_gates: expected None or a bool, got {self.normalize_gates!r}"
            )

    @property
    def gates_normalized(self) -> bool:
        return self.k > 1 if self.normalize_gates is None else self.normalize_gates

    def capacity(self, n_tokens: int, training: bool) -> int | None:
        """Slots per expert for n_tokens tokens (None = dropless); never more than n_tokens."""
        if self.dropless:
            return None
        cf = self.capacity_factor
        if not training and self.eval_capacity_factor is not None:
            cf = self.eval_capacity_factor
        return min(n_tokens, math.ceil(cf * self.k * n_tokens / self.num_experts))


# ----------------------------------------------------------------------------------- units
class FeedForward(nn.Module):
    """The dense FFN fc1 -> activation -> fc2; also the shape of one expert."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


Expert = FeedForward


def check_moe_input(x: torch.Tensor, d: int) -> None:
    """An MoE block takes floating-point (B, T, d) or (N, d); anything else fails naming both."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MoE input: expected a torch.Tensor (B, T, {d}) or (N, {d}), got {type(x).__name__}")
    if x.dim() not in (2, 3) or x.shape[-1] != d:
        raise ValueError(f"MoE input: expected shape (B, T, {d}) or (N, {d}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"MoE input: expected a floating-point tensor, got {x.dtype}")


def run_experts(experts: Sequence[nn.Module], xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Expert e runs on rows [sum(counts[:e]), sum(counts[:e+1])) of the expert-contiguous xs (M, d)."""
    # split (not slicing in a loop): its backward is one concatenation of the pieces' gradients,
    # where each slice's backward would write a full-size (M, d) gradient to be summed
    pieces = xs.split(list(counts), dim=0)
    outs = [expert(p) for expert, p in zip(experts, pieces) if p.shape[0]]  # each (n_e, d)
    if not outs:
        return xs.new_zeros(0, xs.shape[-1]) + 0.0 * xs.sum()  # keep the graph for an empty dispatch
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class Router(nn.Module):
    """Token -> top-k experts and gates (float32), with Switch jitter / Gaussian logit noise in training."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.d_model, config.num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)  # small, but not zero: ties would send all to expert 0

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (N, d) -> logits (N, E), probs (N, E), expert_index (N, k) int64, gates (N, k) float32."""
        c = self.config
        if self.training and c.router_jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - c.router_jitter, 1.0 + c.router_jitter)
        logits = F.linear(h.float(), self.proj.weight.float())  # (N, E)
        if self.training and c.router_noise > 0:
            logits = logits + c.router_noise * torch.randn_like(logits)
        probs = logits.softmax(dim=-1)
        top_p, expert_index = probs.topk(c.k, dim=-1)  # (N, k)
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if c.gates_normalized else top_p
        return logits, probs, expert_index, gates


# ------------------------------------------------------------------------------ losses
def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i; probs (N, E), expert_index (N, k).

    f_i is the share of all k*N assignments that chose expert i (before capacity; not
    differentiable), P_i the mean router probability of expert i (differentiable).
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    f = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = f / expert_index.numel()
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; logits (N, E)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ---------------------------------------------------------------------------- dispatch
@dataclass
class DispatchPlan:
    """The kept assignments, sorted by expert (first choices of all tokens before second ones).

    token:    (M,) int64 token of each kept assignment, expert-contiguous
    gate:     (M,) its gate (differentiable w.r.t. the router)
    counts:   (E,) int64 kept assignments per expert (the slice sizes)
    assigned: (E,) int64 assignments per expert before capacity
    kept:     (N, k) bool, whether token n's j-th choice runs
    """

    token: torch.Tensor
    gate: torch.Tensor
    counts: torch.Tensor
    assigned: torch.Tensor
    kept: torch.Tensor


def plan_dispatch(
    expert_index: torch.Tensor, gates: torch.Tensor, num_experts: int, capacity: int | None
) -> DispatchPlan:
    """Sort the k*N assignments by expert and apply the capacity (None = dropless)."""
    N, k = expert_index.shape
    flat_expert = expert_index.t().reshape(-1)  # (k*N,) choice-major: priority to first choices
    order = torch.argsort(flat_expert, stable=True)  # assignment ids, expert-contiguous
    assigned = torch.bincount(flat_expert, minlength=num_experts)  # (E,)
    if capacity is None or capacity >= N:  # an expert gets each token at most once: nothing to drop
        selected, counts = order, assigned
        kept = torch.ones(N, k, dtype=torch.bool, device=expert_index.device)
    else:
        starts = assigned.cumsum(0) - assigned  # (E,) first sorted position of each expert
        rank = torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]
        selected = order[rank < capacity]  # the first `capacity` of each expert, still sorted
        counts = assigned.clamp(max=capacity)
        kept_flat = torch.zeros(k * N, dtype=torch.bool, device=expert_index.device)
        kept_flat[selected] = True
        kept = kept_flat.view(k, N).t()
    return DispatchPlan(
        token=selected % N if k > 1 else selected,
        gate=gates.t().reshape(-1)[selected],
        counts=counts,
        assigned=assigned,
        kept=kept,
    )


@dataclass
class MoEStats:
    """What one MoE call did. Shapes use the input's leading dims (*lead = (B, T) or (N,))."""

    tokens_per_expert: torch.Tensor  # (E,) int64 assignments each expert ran
    assigned_per_expert: torch.Tensor  # (E,) int64 assignments each expert was chosen for
    dropped_assignments: int  # assignments over capacity (their contribution is zero)
    dropped_tokens: int  # tokens none of whose k assignments ran (output exactly zero)
    capacity: int | None  # slots per expert (None: dropless)
    expert_index: torch.Tensor  # (*lead, k) int64 chosen experts, -1 where dropped
    gates: torch.Tensor  # (*lead, k) float32 gates (detached)
    balance_loss: torch.Tensor  # scalar, differentiable
    z_loss: torch.Tensor  # scalar, differentiable
    aux_loss: torch.Tensor  # balance_weight * balance_loss + z_loss_weight * z_loss

    @property
    def num_tokens(self) -> int:
        return int(self.expert_index.numel() // max(self.expert_index.shape[-1], 1))


class MoE(nn.Module):
    """Top-k mixture-of-experts FFN; see the module docstring for the five steps of a call."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = nn.ModuleList(
            FeedForward(config.d_model, config.d_ff, config.activation, config.bias)
            for _ in range(config.num_experts)
        )
        self.last_stats: MoEStats | None = None
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the running totals over calls (tokens, assignments, dropped assignments / tokens)."""
        self.counters = new_counters()

    def check_input(self, x: torch.Tensor) -> None:
        check_moe_input(x, self.config.d_model)

    def route(self, h: torch.Tensor) -> tuple[DispatchPlan, tuple[torch.Tensor, ...]]:
        """Steps 1-2 for tokens h (N, d): the plan and the router's (logits, probs, expert_index, gates)."""
        routed = self.router(h)
        capacity = self.config.capacity(h.shape[0], self.training)
        return plan_dispatch(routed[2], routed[3], self.config.num_experts, capacity), routed

    def forward(
        self, x: torch.Tensor, *, return_stats: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, MoEStats]:
        self.check_input(x)
        c = self.config
        lead = x.shape[:-1]
        h = x.reshape(-1, c.d_model)  # (N, d)
        N = h.shape[0]
        plan, routed = self.route(h)  # 1-2
        xs = h.index_select(0, plan.token)  # 3. (M, d) expert-contiguous
        ys = run_experts(self.experts, xs, plan.counts.tolist())  # 4. (M, d)
        ys = ys * plan.gate.to(ys.dtype).unsqueeze(1)
        out = h.new_zeros(N, c.d_model).index_add(0, plan.token, ys)  # 5. (N, d) token order
        stats = self.make_stats(plan, routed, lead)
        self.last_stats = stats
        out = out.view(*lead, c.d_model)
        return (out, stats) if return_stats else out

    def make_stats(self, plan: DispatchPlan, routed: tuple[torch.Tensor, ...], lead: torch.Size) -> MoEStats:
        """Counts and auxiliary losses of one call (also updates `counters`)."""
        return make_stats(self.config, self.training, plan, routed, lead, self.counters)


def new_counters() -> dict[str, int]:
    return {"tokens": 0, "assignments": 0, "dropped_assignments": 0, "dropped_tokens": 0}


def make_stats(
    config: MoEConfig,
    training: bool,
    plan: DispatchPlan,
    routed: tuple[torch.Tensor, ...],
    lead: torch.Size,
    counters: dict[str, int] | None = None,
) -> MoEStats:
    """The MoEStats of one call from its plan and the router's (logits, probs, expert_index, gates)."""
    c = config
    logits, probs, expert_index, gates = routed
    N = expert_index.shape[0]
    balance = load_balancing_loss(probs, expert_index, c.num_experts)
    z = router_z_loss(logits)
    dropped_assignments = int(N * c.k - plan.token.numel())
    dropped_tokens = int((~plan.kept.any(dim=1)).sum()) if dropped_assignments else 0
    if counters is not None:
        counters["tokens"] += N
        counters["assignments"] += N * c.k
        counters["dropped_assignments"] += dropped_assignments
        counters["dropped_tokens"] += dropped_tokens
    return MoEStats(
        tokens_per_expert=plan.counts,
        assigned_per_expert=plan.assigned,
        dropped_assignments=dropped_assignments,
        dropped_tokens=dropped_tokens,
        capacity=c.capacity(N, training),
        expert_index=expert_index.masked_fill(~plan.kept, -1).view(*lead, c.k),
        gates=gates.detach().view(*lead, c.k),
        balance_loss=balance,
        z_loss=z,
        aux_loss=c.balance_weight * balance + c.z_loss_weight * z,
    )


def collect_moe_stats(model: nn.Module) -> list[MoEStats]:
    """The `last_stats` of every MoE block (MoE or ExpertParallelMoE) in `model` that has run, in order."""
    return [m.last_stats for m in model.modules() if isinstance(getattr(m, "last_stats", None), MoEStats)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses of every MoE in `model` from its latest call (None if none ran).

    For models whose training forward does not return it (e.g. a DynamicBert with MoE layers), add
    this to the task loss after the forward pass.
    """
    stats = collect_moe_stats(model)
    if not stats:
        return None
    return torch.stack([s.aux_loss for s in stats]).sum()


# --------------------------------------------------------------------- upcycling a dense FFN
def moe_from_dense(
    ffn_linear1: nn.Linear,
    ffn_linear2: nn.Linear,
    num_experts: int,
    *,
    k: int = 1,
    activation: str = "gelu",
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    **config: object,
) -> MoE:
    """Sparse upcycling (Komatsuzaki et al. 2023): an MoE whose experts all start as the dense FFN.

    ffn_linear1 (d -> d_ff) and ffn_linear2 (d_ff -> d) are the dense FFN's two linears (the
    activation between them is `activation`). Each expert's weights get Gaussian noise of std
    `noise` times that weight matrix's std, so the experts can drift apart; with noise=0 and
    normalised gates (k > 1, or normalize_gates=True) the MoE equals the dense FFN exactly at
    init, since gates summing to 1 over identical experts give back the dense output. k=1 with
    Switch gates scales each token's output by its router probability instead.
    config: other MoEConfig fields (capacity_factor, dropless, ...).
    """
    if not isinstance(ffn_linear1, nn.Linear) or not isinstance(ffn_linear2, nn.Linear):
        raise TypeError(
            f"ffn_linear1, ffn_linear2: expected nn.Linear modules, got "
            f"{type(ffn_linear1).__name__} and {type(ffn_linear2).__name__}"
        )
    d, d_ff = ffn_linear1.in_features, ffn_linear1.out_features
    if (ffn_linear2.in_features, ffn_linear2.out_features) != (d_ff, d):
        raise ValueError(
            f"ffn_linear2: expected a Linear({d_ff} -> {d}) after ffn_linear1 ({d} -> {d_ff}), got "
            f"Linear({ffn_linear2.in_features} -> {ffn_linear2.out_features})"
        )
    if not _is_num(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite number >= 0, got {noise!r}")
    has_bias = ffn_linear1.bias is not None
    if has_bias != (ffn_linear2.bias is not None):
        raise ValueError("ffn_linear1, ffn_linear2: expected both or neither to have a bias")
    cfg = MoEConfig(
        d_model=d, d_ff=d_ff, num_experts=num_experts, k=k, activation=activation, bias=has_bias, **config
    )
    w = ffn_linear1.weight
    moe = MoE(cfg).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for expert in moe.experts:
            for mine, dense in ((expert.fc1, ffn_linear1), (expert.fc2, ffn_linear2)):
                mine.weight.copy_(dense.weight)
                if noise > 0:
                    scale = noise * float(dense.weight.float().std())
                    draw = torch.randn(dense.weight.shape, generator=generator, dtype=torch.float32)
                    mine.weight.add_(scale * draw.to(device=w.device, dtype=w.dtype))
                if has_bias:
                    mine.bias.copy_(dense.bias)
    return moe


_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


class MoEBertOutput(nn.Module):
    """Stands in for a BERT layer's `output`: LayerNorm(dropout(moe(h)) + residual).

    The layer's `intermediate` becomes nn.Identity, so `h` is the attention output; the call
    signature (hidden_states, input_tensor) and the returned format are BertOutput's.
    """

    def __init__(self, moe: MoE, layer_norm: nn.Module, dropout: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.LayerNorm = layer_norm
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.moe(hidden_states)) + input_tensor)


def _bert_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("layers", "encoder.layer", "bert.encoder.layer"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"model: expected a DynamicBert or a Hugging Face BERT-family model (with encoder.layer), "
        f"got a {type(model).__name__}"
    )


def replace_bert_ffn_with_moe(
    model: nn.Module,
    num_experts: int,
    k: int = 1,
    layers: Sequence[int] | None = None,
    *,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    **config: object,
) -> dict[int, MoE]:
    """Swap the FFN (intermediate + output) of chosen layers of a BERT encoder for upcycled MoEs.

    model: a DynamicBert, a transformers BertModel (or any model with `encoder.layer` / `bert.encoder
    .layer` of BertLayer-like modules). layers: indices (None = all). The activation follows the
    encoder's `hidden_act`. The default here is dropless=True: BERT batches carry padding tokens
    (they are routed too) and DynamicBert measures a layer's FLOPs at batch 1, which is exact only
    when no token is dropped; pass dropless=False, capacity_factor=... to cap experts. The layers
    keep their input and output format. Their auxiliary losses are not part of the model's output:
    add `moe_aux_loss(model)` to the loss. Returns {layer index: its MoE}.
    DynamicBert: the call is recorded in its config (`moe`), so dynets.save / dynets.load round-trip
    the MoE layers; it measures one layer (layer 0) and charges every layer that cost, so replace
    all layers (the default) for exact per-sample FLOPs; narrow DynaBERT widths are refused (they
    slice dense FFNs).
    """
    blocks = _bert_layers(model)
    idx = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    bad = [i for i in idx if not 0 <= i < len(blocks)]
    if bad or len(set(idx)) != len(idx):
        raise ValueError(
            f"layers: expected distinct indices in [0, {len(blocks) - 1}], got {list(layers or [])}"
        )
    hf_config = getattr(model, "hf_config", None) or getattr(model, "config", None)
    if "activation" not in config:
        act = getattr(hf_config, "hidden_act", "gelu")
        if act not in _HF_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {act!r} of the encoder has no MoE equivalent; expected one of "
                f"{sorted(_HF_ACTIVATIONS)} (or pass activation=)"
            )
        config["activation"] = _HF_ACTIVATIONS[act]
    config.setdefault("dropless", True)
    dyn_config = getattr(model, "config", None)
    if hasattr(dyn_config, "moe") and getattr(dyn_config, "width", 1.0) != 1.0:
        raise ValueError(
            f"model: expected a DynamicBert at width 1.0 (narrow widths slice dense FFNs), "
            f"got width {dyn_config.width}"
        )
    prev = getattr(dyn_config, "moe", None)
    if prev and (prev["num_experts"], prev["k"], prev["config"]) != (num_experts, k, config):
        raise ValueError(
            f"a DynamicBert holds one MoE setting (it is saved in its config); expected num_experts="
            f"{prev['num_experts']}, k={prev['k']}, {prev['config']}, got {num_experts}, {k}, {config}"
        )
    out: dict[int, MoE] = {}
    for i in idx:
        layer = blocks[i]
        inter, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        if isinstance(output, MoEBertOutput):
            raise ValueError(f"layers: layer {i} already has an MoE")
        if not isinstance(getattr(inter, "dense", None), nn.Linear) or not isinstance(
            getattr(output, "dense", None), nn.Linear
        ):
            raise ValueError(f"layer {i}: expected a BertLayer with intermediate.dense and output.dense")
        moe = moe_from_dense(
            inter.dense, output.dense, num_experts, k=k, noise=noise, generator=generator, **config
        )
        layer.intermediate = nn.Identity()
        layer.output = MoEBertOutput(moe, output.LayerNorm, output.dropout)
        out[i] = moe
    model.__dict__.pop("_units", None)  # DynamicBert's cached per-layer FLOPs are stale now
    if hasattr(dyn_config, "moe"):  # a DynamicBert: recorded, so that dynets.load rebuilds these layers
        done = sorted(set((dyn_config.moe or {}).get("layers", [])) | set(idx))
        dyn_config.moe = {
            "num_experts": int(num_experts),
            "k": int(k),
            "layers": done,
            "config": dict(config),
        }
    return out
