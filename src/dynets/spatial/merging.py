"""ToMe token merging (Bolya et al., 2023): fewer tokens per block, no training needed.

In every block, between attention and MLP, r tokens are merged away by bipartite soft matching:
tokens alternate into sets A and B; each A token finds its most similar B token (cosine of the
attention keys, averaged over heads); the r A tokens with the most similar partners are merged
into them (size-weighted average), the rest stay. The class token is never merged. Each token
carries its size (how many patches it stands for) and attention is proportional: log(size) is
added to the attention logits of each key, so a merged token weighs as much as its patches did.

`tome_forward(vit, x, r)` runs any trained `ViT` (the static vit_tiny included) this way; the
registered `ToMeViT` (`tome_vit_tiny`, or `tome(static_vit, r)`) is the same with r in its config
and the DynamicOutput contract. r is the run-time knob (`model.merge_r = 8` or
`model(x, r=8)`); r = 0 is exactly the static ViT. Every sample merges the same number of tokens,
so the batch stays rectangular and batching costs nothing.

decisions: "tokens" (B, depth) int64, tokens left after each block (the same for every sample);
with `record=True` also "owner" (B, 1 + N) int64, the index of the final token each original
token was merged into (class token first), for pictures of the merged groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.core.tensors import take_tokens
from dynets.models.vit import ViT, ViTConfig, check_token_multiple, nearest_multiple, vit_config


def check_r(r: object) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r: expected an int >= 0 (tokens merged per block), got {r!r}")
    return r


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, *, positions: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge r tokens of x (B, T, D) with sizes (B, T); metric (B, T, d) the similarity features.

    Token 0 (the class token) is protected. Returns merged x (B, T - r, D), sizes (B, T - r), and
    newpos (B, T): the new index of every old token (where it went, merged or not), or None when
    positions=False (it costs a few small ops per block, which batch 1 notices).
    """
    B, T, D = x.shape
    metric = F.normalize(metric, dim=-1)  # cosine similarity (the scale of metric does not matter)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, Ta, Tb)
    Ta, Tb = scores.shape[1:]
    node_max, node_idx = scores.max(-1)  # (B, Ta): best B partner of each A token
    node_max[:, 0] = float("-inf")  # the class token (A's first) is never merged
    edge_idx = node_max.argsort(-1, descending=True)
    unm_idx = edge_idx[:, r:].sort(-1).values  # (B, Ta - r) A tokens kept, in order (class first)
    src_idx = edge_idx[:, :r]  # (B, r) A tokens merged away
    dst_idx = node_idx.gather(1, src_idx)  # (B, r) their B partners
    n_unm, N = Ta - r, T - r
    # The new sequence is the kept A tokens then every B token, taken as whole rows (`take_tokens`).
    # Each merged B token then gets its sources by the identity (s_b x_b + sum_i s_i x_i) / S =
    # x_b + sum_i (s_i / S) (x_i - x_b), S = s_b + sum_i s_i, added in place from r rows per sample:
    # the other rows are only copied, and nothing walks the sequence element by element.
    b_idx = (2 * torch.arange(Tb, device=x.device) + 1).expand(B, -1)
    new_x = take_tokens(x, torch.cat([2 * unm_idx, b_idx], 1))  # (B, N, D)
    sa, sb = size[:, ::2], size[:, 1::2]
    s_src = sa.gather(1, src_idx)  # (B, r)
    sb_new = sb.scatter_add(1, dst_idx, s_src)  # (B, Tb)
    diff = take_tokens(x, 2 * src_idx) - take_tokens(x, 2 * dst_idx + 1)  # (B, r, D)
    add = diff * (s_src / sb_new.gather(1, dst_idx))[..., None]  # (B, r, D)
    if torch.onnx.is_in_onnx_export():  # ONNX's index_add keeps one of repeated rows; scatter_add sums
        new_x = new_x.scatter_add(1, (n_unm + dst_idx)[..., None].expand(-1, -1, D), add)
    else:  # 4x faster than scatter_add on CPU
        rows = n_unm + dst_idx + N * torch.arange(B, device=x.device)[:, None]  # rows of the flat new_x
        new_x = new_x.view(B * N, D).index_add_(0, rows.view(-1), add.view(-1, D)).view(B, N, D)
    new_size = torch.cat([sa.gather(1, unm_idx), sb_new], 1)  # (B, T - r)
    if not positions:
        return new_x, new_size, None
    pos_a = torch.empty(B, Ta, dtype=torch.long, device=x.device)
    pos_a.scatter_(1, unm_idx, torch.arange(n_unm, device=x.device).expand(B, -1))
    pos_a.scatter_(1, src_idx, n_unm + dst_idx)
    newpos = torch.empty(B, T, dtype=torch.long, device=x.device)
    newpos[:, ::2] = pos_a
    newpos[:, 1::2] = n_unm + torch.arange(Tb, device=x.device)
    return new_x, new_size, newpos


def merge_schedule(num_tokens: int, depth: int, r: int, multiple: int = 1) -> list[int]:
    """Tokens merged in each block: r, clipped so that at least the class token and one more remain.

    multiple m > 1: the same total pace (num_tokens - r * (l + 1) tokens left after block l), but
    each block merges only to land on a sequence length that is a multiple of m (the nearest one to
    that pace, where it is at least m), and only when that merges at least m / 2 tokens; the other
    blocks merge nothing. Fewer, larger merges on kernel-friendly lengths: PyTorch's CPU attention
    runs 48 tokens twice as fast as 46, and every merge step has a fixed cost."""
    check_token_multiple(multiple)
    out, T = [], num_tokens
    for layer in range(depth):
        if multiple == 1:
            k = r
        else:
            pace = num_tokens - r * (layer + 1)
            target = nearest_multiple(pace, multiple) if pace >= multiple else pace
            k = T - target if T - target >= multiple / 2 else 0
        k = max(0, min(k, (T - 1) // 2))
        out.append(k)
        T -= k
    return out


def tome_forward(
    vit: ViT, x: torch.Tensor, r: int, *, track: bool = True, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a ViT with ToMe merging of r tokens per block (`merge_schedule(..., multiple)`); returns
    logits (B, C) and, with track, owner (B, 1 + N): the final token each original token ended in."""
    t = vit.embed(x)
    B, T, _ = t.shape
    size = t.new_ones(B, T)
    owner = torch.arange(T, device=x.device).expand(B, T) if track else None
    merged = False
    # the schedule from the config, not from t.shape (a traced tensor under ONNX export)
    schedule = merge_schedule(vit.num_patches + 1, len(vit.blocks), check_r(r), multiple)
    for blk, k in zip(vit.blocks, schedule):
        bias = size.log()[:, None, None, :] if merged else None  # proportional attention
        if k == 0:  # no merge here: no similarity metric to compute
            t = blk.mlp_part(t + blk.attn(blk.norm1(t), bias))
            continue
        h, keys = blk.attn(blk.norm1(t), bias, return_keys=True)
        t, size, newpos = bipartite_merge(t + h, size, keys, k, positions=track)
        owner = newpos.gather(1, owner) if track else None
        merged = True
        t = blk.mlp_part(t)
    return vit.forward_head(vit.norm(t)), owner


def tome_cost(vit: ViT, r: int, multiple: int = 1) -> float:
    """FLOPs per sample of `tome_forward(vit, ., r, multiple=multiple)`: blocks at their token counts
    plus the matching."""
    if ("tome", r, multiple) not in vit._costs:
        vit._costs[("tome", r, multiple)] = _tome_cost(vit, r, multiple)
    return vit._costs[("tome", r, multiple)]


def _tome_cost(vit: ViT, r: int, multiple: int) -> float:
    T = vit.num_patches + 1
    total = vit.embed_cost() + vit.head_cost()
    for k in merge_schedule(T, vit.config.depth, r, multiple):
        total += vit.attn_cost(T) + vit.mlp_cost(T - k)
        if k > 0:
            total += _merge_cost(vit, T, k)
        T -= k
    return float(total)


def _merge_cost(vit: ViT, T: int, k: int) -> int:
    hd = vit.config.dim // vit.config.heads
    metric = torch.zeros(1, T, hd, device=vit.pos_embed.device)
    return vit._measure(
        ("merge", T, k),
        lambda t: bipartite_merge(t, torch.ones(1, T, device=t.device), metric + 1, k, positions=False),
        vit._tokens(T),
    )


@dataclass
class ToMeViTConfig(ViTConfig):
    merge_r: int = 8  # tokens merged away in every block (run-time knob)
    token_multiple: int = 1  # > 1: the same pace, merged only onto lengths that are multiples of it

    def __post_init__(self) -> None:
        super().__post_init__()
        check_r(self.merge_r)
        check_token_multiple(self.token_multiple)


@register_architecture
class ToMeViT(ViT):
    config_class = ToMeViTConfig

    @property
    def merge_r(self) -> int:
        return self.config.merge_r

    @merge_r.setter
    def merge_r(self, r: int) -> None:
        self.config.merge_r = check_r(r)

    def forward(
        self,
        x: torch.Tensor,
        r: int | None = None,
        *,
        token_multiple: int | None = None,
        record: bool = False,
    ) -> DynamicOutput | MultiExitOutput:
        """record=True adds decisions["owner"] (which final token each patch was merged into);
        token_multiple overrides config.token_multiple for this call (see `merge_schedule`)."""
        self.check_input(x)
        r = self.merge_r if r is None else check_r(r)
        m = check_token_multiple(self.config.token_multiple if token_multiple is None else token_multiple)
        if self.training:  # ToMe needs no training; training runs the merged model as it is used
            return MultiExitOutput([tome_forward(self, x, r, track=False, multiple=m)[0]])
        B, T = x.shape[0], self.num_patches + 1
        with torch.no_grad():
            logits, owner = (
                tome_forward(self, x, r, track=record, multiple=m)
                if B
                else (x.new_zeros(0, self.num_classes), None)
            )
        schedule = merge_schedule(T, self.config.depth, r, m)
        left = torch.tensor([T - sum(schedule[: i + 1]) for i in range(len(schedule))])
        decisions = {"tokens": left.expand(B, -1)}
        if record:
            decisions["owner"] = owner if owner is not None else torch.zeros(0, T, dtype=torch.long)
        flops = torch.full((B,), tome_cost(self, r, m), dtype=torch.float64)
        return DynamicOutput(logits, flops=flops, decisions=decisions)


def tome(vit: ViT, r: int = 8) -> ToMeViT:
    """A ToMeViT with the weights of a trained ViT (no training needed)."""
    return ToMeViT.from_static(vit, merge_r=check_r(r))


@register_model
def tome_vit_tiny(**kw: object) -> ToMeViT:
    """vit_tiny with ToMe token merging (r tokens merged per block, no training needed)."""
    return ToMeViT(vit_config(ToMeViTConfig, kw))
