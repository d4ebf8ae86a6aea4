"""Transformer sequence classifiers whose feed-forward blocks are mixtures of experts (Switch-style).

moe_transformer: a small pre-LayerNorm encoder whose FFN in the chosen blocks is an `MoE`
(dynets.width.moe); dense_transformer: the same model with dense FFNs of one expert's size, the
baseline of equal compute per token (with k=1) and 1/num_experts of the FFN parameters.

Inputs: token ids (B, T) int64 when vocab_size > 0, right-padded with pad_token_id (float tensors
of whole numbers are accepted too, since the train loop feeds floats), or float features
(B, T, input_size) otherwise (every step valid). Positions are sinusoidal, so any length runs.
Each batch is trimmed to its longest sequence. Only the valid tokens enter the FFN / MoE: they are
gathered with index_select and added back with index_add, so padding costs no FFN compute and
takes no expert capacity. Pooling is the mean over valid tokens.

Eval mode returns DynamicOutput(logits, flops, decisions): "expert" (B, T, k) int64 is each
token's experts (-1 for padding and for assignments dropped by capacity; (B, n_moe_blocks, T, k)
when several blocks are MoE), "dropped" (B,) int64 counts the sample's dropped assignments.
FLOPs per sample, measured with FlopCounterMode: embedding and FFN/router per valid token,
attention at the sample's own length (a quadratic fitted exactly through three lengths), the
experts its tokens actually ran, the head. Training mode returns MultiExitOutput([logits],
aux={"loss": the MoE blocks' balance + z losses, ...}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.config import config_from_dict
from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.core.tensors import all_finite
from dynets.text.bert_costs import LengthCost, fit_length_cost
from dynets.width.moe import ACTIVATIONS, FeedForward, MoE, MoEConfig, MoEStats

__all__ = ["MoETransformer", "MoETransformerConfig", "dense_transformer", "moe_transformer"]


@dataclass
class MoETransformerConfig:
    num_classes: int = 2
    input_size: int = 1  # float features per step (used when vocab_size == 0)
    vocab_size: int = 0  # > 0: token-id input (B, T); input_size is then 0
    pad_token_id: int = 0
    seq_len: int = 32  # reference length: input_shape and cost figures (any T runs)
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512  # the dense FFN's and each expert's hidden size
    moe_layers: tuple[int, ...] | None = None  # blocks with an MoE FFN; None = every block, () = dense
    num_experts: int = 8
    k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float | None = 2.0
    dropless: bool = False
    router_jitter: float = 0.0
    router_noise: float = 0.0
    balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    dropout: float = 0.1
    activation: str = "gelu"

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("num_classes", "seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
            v = getattr(self, name)
            if not is_int(v) or v < (2 if name == "num_classes" else 1):
                low = 2 if name == "num_classes" else 1
                raise ValueError(f"MoETransformerConfig.{name}: expected an int >= {low}, got {v!r}")
        for name in ("input_size", "vocab_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(
                    f"MoETransformerConfig.{name}: expected an int >= 0, got {getattr(self, name)!r}"
                )
        if (self.vocab_size > 0) == (self.input_size > 0):
            raise ValueError(
                f"MoETransformerConfig: expected exactly one of vocab_size (token ids) and input_size "
                f"(float features) > 0, got vocab_size={self.vocab_size}, input_size={self.input_size}"
            )
        if self.vocab_size and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"MoETransformerConfig.pad_token_id: expected an id in [0, {self.vocab_size}), got "
                f"{self.pad_token_id!r}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"MoETransformerConfig.n_heads: expected a divisor of d_model={self.d_model}, "
                f"got {self.n_heads}"
            )
        if self.moe_layers is not None:
            self.moe_layers = tuple(self.moe_layers)
            if len(set(self.moe_layers)) != len(self.moe_layers) or any(
                not is_int(i) or not 0 <= i < self.n_layers for i in self.moe_layers
            ):
                raise ValueError(
                    f"MoETransformerConfig.moe_layers: expected distinct block indices in "
                    f"[0, {self.n_layers - 1}], got {self.moe_layers}"
                )
        if not 0 <= self.dropout < 1:
            raise ValueError(
                f"MoETransformerConfig.dropout: expected a float in [0, 1), got {self.dropout!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MoETransformerConfig.activation: expected one of {sorted(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.moe_block_indices:
            self.moe_config()  # validates k, capacity factors, router settings

    @property
    def moe_block_indices(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers)) if self.moe_layers is None else tuple(sorted(self.moe_layers))

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            d_model=self.d_model,
            d_ff=self.d_ff,
            num_experts=self.num_experts,
            k=self.k,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            dropless=self.dropless,
            activation=self.activation,
            router_jitter=self.router_jitter,
            router_noise=self.router_noise,
            balance_weight=self.balance_weight,
            z_loss_weight=self.z_loss_weight,
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention written with two matmuls, so FlopCounterMode counts it on CPU."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        B, T, d = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # each (B, H, T, dh)
        att = (q @ k.transpose(-2, -1)) * (d // H) ** -0.5  # (B, H, T, T)
        if bias is not None:
            att = att + bias  # (B, 1, 1, T): -inf-like on padded keys
        y = self.drop(att.softmax(dim=-1)) @ v  # (B, H, T, dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-LN block: h + attn(ln1(h)), then h + ffn(ln2(h)) on the valid tokens only."""

    def __init__(self, c: MoETransformerConfig, moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.attn = SelfAttention(c.d_model, c.n_heads, c.dropout)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.ffn = MoE(c.moe_config()) if moe else FeedForward(c.d_model, c.d_ff, c.activation)
        self.drop = nn.Dropout(c.dropout)

    def forward(
        self, h: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor | None
    ) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        h = h + self.drop(self.attn(self.ln1(h), bias))
        flat = h.reshape(-1, h.shape[-1])  # (B*T, d)
        z = flat if tokens is None else flat.index_select(0, tokens)  # (N, d) valid tokens
        f = self.drop(self.ffn(self.ln2(z)))
        flat = flat + f if tokens is None else flat.index_add(0, tokens, f)
        return flat.view_as(h)


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool valid keys -> (B, 1, 1, L) additive attention bias (padded keys at dtype's min)."""
    return (~valid)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


def sinusoid(T: int, d: int, device: torch.device) -> torch.Tensor:
    """(T, d) sinusoidal position codes (Vaswani et al.)."""
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return pe


@register_architecture
class MoETransformer(nn.Module):
    """Encoder classifier with MoE feed-forward blocks; see the module docstring."""

    config_class = MoETransformerConfig

    def __init__(self, config: MoETransformerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tokens_mode = c.vocab_size > 0
        self.embed = (
            nn.Embedding(c.vocab_size, c.d_model) if self.tokens_mode else nn.Linear(c.input_size, c.d_model)
        )
        moe_set = set(c.moe_block_indices)
        self.blocks = nn.ModuleList(Block(c, i in moe_set) for i in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.num_classes)
        self.drop = nn.Dropout(c.dropout)
        self.num_classes = c.num_classes
        self.input_shape = (c.seq_len,) if self.tokens_mode else (c.seq_len, c.input_size)

    @property
    def moe_blocks(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    # ------------------------------------------------------------------ inputs
    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check x and trim it to its longest sequence: (x (B, L[, F]), lengths (B,) int64)."""
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if self.tokens_mode:
            if x.dim() != 2:
                raise ValueError(f"input: expected token ids of shape (B, T), got {tuple(x.shape)}")
            if x.is_floating_point():
                if x.numel() and not bool((x == x.round()).all()):
                    raise ValueError("input: expected token ids (whole numbers), got non-integral floats")
                x = x.long()
            elif x.dtype != torch.int64:
                raise ValueError(f"input: expected token ids of dtype int64, got {x.dtype}")
            if x.shape[0] and x.shape[1] == 0:
                raise ValueError("input: expected at least one token per sequence (T >= 1), got T = 0")
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(
                    f"input: expected token ids in [0, {c.vocab_size}), got values in [{lo}, {hi}]"
                )
            pos = torch.arange(1, x.shape[1] + 1, device=x.device)
            lengths = ((x != c.pad_token_id) * pos).amax(dim=1).clamp(min=1) if x.shape[0] else pos[:0]
        else:
            if x.dim() != 3 or x.shape[-1] != c.input_size:
                raise ValueError(
                    f"input: expected features of shape (B, T, {c.input_size}), got {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise ValueError(f"input: expected floating-point features, got {x.dtype}")
            if x.shape[0] and x.shape[1] == 0:
                raise ValueError("input: expected at least one step per sequence (T >= 1), got T = 0")
            if not all_finite(x):
                raise ValueError("input: expected finite features, got NaN or inf")
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        if x.shape[0]:
            x = x[:, : int(lengths.max())]
        return x, lengths

    # ------------------------------------------------------------------ the network
    def encode(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[MoEStats]]:
        """Trimmed input -> (logits (B, C), valid token positions in the flat (B*L) grid or None, stats)."""
        B, L = x.shape[:2]
        h = self.drop(self.embed_positions(x))  # (B, L, d)
        valid = torch.arange(L, device=x.device)[None, :] < lengths[:, None]  # (B, L)
        if bool(valid.all()):
            bias, tokens = None, None
        else:
            bias = key_bias(valid, h.dtype)
            tokens = valid.reshape(-1).nonzero().squeeze(1)  # (N,)
        stats = []
        for block in self.blocks:
            h = block(h, bias, tokens)
            if isinstance(block.ffn, MoE):
                stats.append(block.ffn.last_stats)
        return self.head(self.drop(self.pool(h, valid))), tokens, stats

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) ids or (B, L, F) features -> (B, L, d) embeddings + sinusoidal positions."""
        return self.embed(x) + sinusoid(x.shape[1], self.config.d_model, x.device)

    def pool(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of ln_f(h) over the valid tokens: (B, L, d), (B, L) bool -> (B, d)."""
        h = self.ln_f(h) * valid[..., None]  # padding out of the mean
        return h.sum(dim=1) / valid.sum(1)[:, None].to(h.dtype)

    def forward(self, x: torch.Tensor) -> DynamicOutput | MultiExitOutput:
        """Training mode: MultiExitOutput([logits], aux). Eval mode: DynamicOutput with decisions."""
        T_in = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
        x, lengths = self.prepare(x)
        if self.training:
            if x.shape[0] == 0:
                return MultiExitOutput([self.head.weight.new_zeros(0, self.num_classes)], aux={})
            logits, _, stats = self.encode(x, lengths)
            aux: dict[str, object] = {}
            if stats:
                aux["balance_loss"] = torch.stack([s.balance_loss for s in stats]).sum()
                aux["z_loss"] = torch.stack([s.z_loss for s in stats]).sum()
                aux["loss"] = torch.stack([s.aux_loss for s in stats]).sum()
                aux["dropped_assignments"] = sum(s.dropped_assignments for s in stats)
            return MultiExitOutput([logits], aux=aux)
        with torch.no_grad():
            return self.run_dynamic(x, lengths, T_in)

    def run_dynamic(self, x: torch.Tensor, lengths: torch.Tensor, T_in: int | None = None) -> DynamicOutput:
        """Eval path on a prepared (trimmed) batch; decisions are padded back to T_in positions."""
        B, L = x.shape[:2]
        T_in = L if T_in is None else T_in
        k, n_moe = self.config.k, len(self.moe_blocks)
        if B == 0:
            empty = torch.zeros(0, dtype=torch.float64)
            return DynamicOutput(self.head.weight.new_zeros(0, self.num_classes), None, empty, decisions={})
        logits, tokens, stats = self.encode(x, lengths)
        ran = torch.zeros(B, dtype=torch.float64)  # expert assignments each sample ran
        dropped = torch.zeros(B, dtype=torch.long)
        flat_tokens = tokens.cpu() if tokens is not None else torch.arange(B * L)
        sample = flat_tokens // L
        per_block = []
        for s in stats:
            idx = s.expert_index.reshape(-1, k).cpu()  # (N, k), -1 = dropped
            grid = torch.full((B * L, k), -1, dtype=torch.long)
            grid[flat_tokens] = idx
            grid = F.pad(grid.view(B, L, k), (0, 0, 0, T_in - L), value=-1)  # (B, T_in, k)
            per_block.append(grid)
            ran.index_add_(0, sample, (idx >= 0).sum(1).to(torch.float64))
            dropped.index_add_(0, sample, (idx < 0).sum(1))
        decisions = {}
        if n_moe:
            decisions["expert"] = per_block[0] if n_moe == 1 else torch.stack(per_block, dim=1)
            decisions["dropped"] = dropped
        flops = self.sample_flops(lengths.cpu(), ran)
        return DynamicOutput(logits, None, flops.to(logits.device), decisions=decisions)

    # ------------------------------------------------------------------ cost accounting
    def unit_costs(self) -> dict[str, int | LengthCost]:
        """Measured FLOPs: per token (embed, dense ffn, router, expert), attention(L) per block, head."""
        if "_units" in self.__dict__:
            return self.__dict__["_units"]
        c, blk = self.config, self.blocks[0]
        dev = self.head.weight.device
        was = self.training
        self.eval()
        try:
            x1 = (
                torch.zeros(1, 1, dtype=torch.long, device=dev)
                if self.tokens_mode
                else torch.zeros(1, 1, c.input_size, device=dev)
            )
            z = torch.zeros(1, c.d_model, device=dev)
            units: dict[str, int | LengthCost] = {
                "embed": measure_flops(self.embed, x1),
                "attention": fit_length_cost(
                    lambda L: measure_flops(
                        lambda h: blk.attn(blk.ln1(h), None), torch.zeros(1, L, c.d_model, device=dev)
                    )
                ),
                "ffn": measure_flops(FeedForward(c.d_model, c.d_ff, c.activation).to(dev), z),
                "router": 0,
                "expert": 0,
                "head": measure_flops(self.head, z),
            }
            if self.moe_blocks:
                moe = self.moe_blocks[0]
                units["router"] = measure_flops(moe.router.proj, z)
                units["expert"] = measure_flops(moe.experts[0], z)
        finally:
            self.train(was)
        self.__dict__["_units"] = units
        return units

    def sample_flops(self, lengths: torch.Tensor, expert_runs: torch.Tensor) -> torch.Tensor:
        """(B,) float64: FLOPs of each sample given its length and the expert assignments it ran."""
        u, c = self.unit_costs(), self.config
        n_moe = len(self.moe_blocks)
        L = lengths.to(torch.float64)
        per_token = u["embed"] + (c.n_layers - n_moe) * u["ffn"] + n_moe * u["router"]
        return c.n_layers * u["attention"](lengths) + L * per_token + expert_runs * u["expert"] + u["head"]

    def full_cost(self, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) FLOPs with every token running k experts in each MoE block (no drops); default seq_len."""
        if lengths is None:
            lengths = torch.tensor([self.config.seq_len])
        runs = lengths.to(torch.float64) * self.config.k * len(self.moe_blocks)
        return self.sample_flops(lengths, runs)


def _config(kw: dict, **defaults: object) -> MoETransformerConfig:
    cfg = kw.pop("config", None)
    if cfg is not None:
        return cfg
    merged = {**defaults, **kw}
    if merged.get("vocab_size") and "input_size" not in kw:
        merged["input_size"] = 0  # token ids: no feature input
    if isinstance(merged.get("moe_layers"), list):
        merged["moe_layers"] = tuple(merged["moe_layers"])
    return config_from_dict(MoETransformerConfig, merged)


@register_model
def moe_transformer(**kw: object) -> MoETransformer:
    """Transformer classifier with top-k mixture-of-experts FFNs (8 experts, k=1: Switch-style)."""
    return MoETransformer(_config(kw))


@register_model
def dense_transformer(**kw: object) -> MoETransformer:
    """The same transformer with dense FFNs of one expert's size: the equal-compute baseline."""
    return MoETransformer(_config(kw, moe_layers=()))
