"""A-ViT-style per-token halting: adaptive computation time over depth, token by token.

After block l every token gets a halting score h = sigmoid(gate_scale * x[..., 0] - gate_center)
read from one channel of its own embedding (no extra parameters, as in A-ViT, Yin et al. 2022);
scores accumulate and a token halts at the first block where the sum reaches `threshold`
(1 - eps); the last block halts everyone. A halted token leaves the computation: later tokens no
longer attend to it. The class token halts too; its output is the ACT mixture of its states
(h_l at each block it ran through, the remainder 1 - sum h at its halting block), and once it has
halted the sample is finished (nothing else can change the prediction), so all of that sample's
tokens stop.

Training: the dense masked computation (halted tokens stay in the tensor but are masked out of
attention as keys); aux["loss"] = ponder_weight * mean(N_k + R_k) (blocks run plus remainder,
per token) + distr_weight * KL(prior || mean halting distribution over blocks), the prior a
Gaussian centred on `target_depth` blocks, + distill_weight * KL to a teacher's logits if set.

Inference: a PACKED execution. The active tokens of all samples sit in one (T_active, D) tensor,
so LayerNorm, qkv, proj and the MLP (about 95% of a block's FLOPs) run only on tokens that are
still active; only the attention core needs a per-sample layout: the live samples are grouped by
active count (buckets of `attn_bucket` = 16 tokens), and each group's qkv is scattered into
(n_group, L_group, 3D), L_group the largest count in the group, with a key-padding mask, then
gathered back. A sample is thus padded to its own bucket, not to the batch's longest (once most
tokens have halted, one slow sample no longer makes every sample pay attention over 65 tokens).
Where a group's counts are all equal the padding step is skipped (batch 1 always). Scatter and
gather go through flat indices (index_copy_ / index_select), and a token's depth is written once,
when it stops. Per-sample FLOPs are the measured block costs at each sample's own active count
(the attention padding is not charged to anyone; it is the price of batching).

decisions: "depth" (B, 1 + N) int64, the number of blocks each token ran (class token first).
`threshold` is a run-time knob (`model.threshold = 0.9` or `model(x, threshold=0.9)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.models.vit import ViT, ViTConfig, attention_core, vit_config


def check_threshold(t: object) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0 < t <= 1:
        raise ValueError(f"threshold: expected a number in (0, 1] (1 - eps), got {t!r}")
    return float(t)


@dataclass
class HaltingViTConfig(ViTConfig):
    gate_scale: float = 5.0
    gate_center: float = 10.0  # h = sigmoid(gate_scale * x[..., 0] - gate_center)
    threshold: float = 0.99  # 1 - eps: halt when the cumulative score reaches it (run-time knob)
    ponder_weight: float = 5e-4
    distr_weight: float = 0.1
    target_depth: float = 4.0  # centre of the halting-depth prior, in blocks
    distill_weight: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_threshold(self.threshold)
        if not 0 < self.target_depth <= self.depth:
            raise ValueError(
                f"target_depth: expected a value in (0, depth={self.depth}], got {self.target_depth}"
            )
        for name in ("ponder_weight", "distr_weight", "distill_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")


@register_architecture
class HaltingViT(ViT):
    config_class = HaltingViTConfig
    # inference: live samples whose active counts fall in the same bucket of this many tokens share
    # one padded attention call (an execution setting, not part of the model; any value >= 1 gives
    # the same outputs)
    attn_bucket: int = 16

    def __init__(self, config: HaltingViTConfig) -> None:
        super().__init__(config)
        self._teacher: list[ViT] = []

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @threshold.setter
    def threshold(self, t: float) -> None:
        self.config.threshold = check_threshold(t)

    def set_teacher(self, teacher: ViT | None) -> HaltingViT:
        self._teacher = [] if teacher is None else [teacher.eval()]
        return self

    def halting_score(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        if layer == self.config.depth - 1:
            return torch.ones_like(t[..., 0])
        return torch.sigmoid(self.config.gate_scale * t[..., 0] - self.config.gate_center)

    # ---------------------------------------------------------------- dense masked path
    def forward_dense(self, x: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
        """Every token in the tensor, halted ones masked out of attention as keys (training and
        the reference for the packed path). Returns logits, depth (B, T), ponder (B, T) and the
        ACT weights per block (L, B, T)."""
        t = self.embed(x)
        B, T, _ = t.shape
        active = torch.ones(B, T, dtype=torch.bool, device=x.device)
        cum = t.new_zeros(B, T)  # sum of h so far (no grad needed for decisions)
        rem = t.new_ones(B, T)  # 1 - sum h, with grad
        ponder = t.new_zeros(B, T)
        depth = torch.zeros(B, T, dtype=torch.long, device=x.device)
        out_cls = t.new_zeros(B, t.shape[-1])
        weights = []
        for i, blk in enumerate(self.blocks):
            bias = None
            if not bool(active.all()):
                bias = torch.zeros(B, 1, 1, T, dtype=t.dtype, device=t.device)
                bias.masked_fill_(~active[:, None, None, :], float("-inf"))
            t = blk(t, bias=bias)
            h = self.halting_score(t, i)  # (B, T)
            a = active.to(t.dtype)
            depth += active.long()
            halt = active & (cum + h.detach() >= threshold)
            halt = halt | (active & halt[:, :1])  # the class token halted: the sample is done
            hf = halt.to(t.dtype)
            w = (hf * rem + (1 - hf) * h) * a  # ACT weight of this block for each token
            weights.append(w)
            out_cls = out_cls + w[:, :1] * t[:, 0]
            ponder = ponder + a + hf * rem
            cum = cum + h.detach() * a
            rem = rem - (1 - hf) * h * a
            active = active & ~halt
        logits = self.forward_head(self.norm(out_cls[:, None]))
        return {"logits": logits, "depth": depth, "ponder": ponder, "weights": torch.stack(weights)}

    def training_loss(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        loss = c.ponder_weight * out["ponder"].mean()
        if c.distr_weight:
            L = c.depth
            dist = out["weights"].mean((1, 2))  # (L,) mean halting distribution over blocks
            dist = dist / dist.sum()
            blocks = torch.arange(1, L + 1, dtype=dist.dtype, device=dist.device)
            prior = torch.exp(-0.5 * (blocks - c.target_depth) ** 2)
            prior = prior / prior.sum()
            loss = loss + c.distr_weight * (prior * (prior.log() - dist.clamp_min(1e-8).log())).sum()
        if self._teacher and c.distill_weight:
            with torch.no_grad():
                t_logits = self._teacher[0].forward_static(x)
            kl = F.kl_div(
                F.log_softmax(out["logits"], -1),
                F.log_softmax(t_logits, -1),
                reduction="batchmean",
                log_target=True,
            )
            loss = loss + c.distill_weight * kl
        return loss

    # ---------------------------------------------------------------- packed path (inference)
    def _attention_groups(self, sid: torch.Tensor, counts: torch.Tensor) -> list[tuple]:
        """The attention layout of packed tokens (sample-major; sid (T,) the live index of each):
        live samples grouped by token count into buckets of `attn_bucket` tokens, so that a sample
        is padded only to the longest count in its group, not in the batch. One entry per group:
        (idx, flat, n, L, bias): idx the group's packed tokens (None: all of them), flat their
        places in the group's (n * L) grid (None: every count is L, and the tokens are that grid
        as a view), bias the key-padding mask (None: no padding)."""
        dev = sid.device
        bucket = torch.div(counts - 1, self.attn_bucket, rounding_mode="floor")
        labels = bucket.unique()
        groups = []
        for b in labels.tolist():
            if labels.numel() == 1:
                idx, c, gsid = None, counts, sid
            else:
                members = bucket == b
                idx = members.index_select(0, sid).nonzero().squeeze(1)  # still sample-major
                c = counts[members]
                local = members.long().cumsum(0) - 1  # live index -> index within the group
                gsid = local.index_select(0, sid.index_select(0, idx))
            n, L = c.shape[0], int(c.max())
            if bool((c == L).all()):
                groups.append((idx, None, n, L, None))
                continue
            starts = c.cumsum(0) - c
            flat = gsid * L + torch.arange(gsid.numel(), device=dev) - starts.index_select(0, gsid)
            bias = torch.zeros(n, 1, 1, L, dtype=self.cls_token.dtype, device=dev)
            bias.masked_fill_(torch.arange(L, device=dev) >= c[:, None, None, None], -math.inf)
            groups.append((idx, flat, n, L, bias))
        return groups

    def _packed_block(self, blk, xp: torch.Tensor, groups: list[tuple]) -> torch.Tensor:
        """One block on packed tokens xp (T, D); the attention core runs group by group (see
        `_attention_groups`), everything else on the packed tokens."""
        D, H = xp.shape[-1], blk.attn.heads
        qkv = blk.attn.qkv(blk.norm1(xp))  # (T, 3D) on active tokens only
        o = None if groups[0][0] is None else xp.new_empty(xp.shape)
        for idx, flat, n, L, bias in groups:
            part = qkv if idx is None else qkv.index_select(0, idx)
            if flat is None:
                grid = part.view(n, L, 3 * D)
            else:
                grid = part.new_zeros(n * L, 3 * D).index_copy_(0, flat, part).view(n, L, 3 * D)
            q, k, v = grid.view(n, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (n, H, L, d)
            og = attention_core(q, k, v, bias).transpose(1, 2).reshape(n * L, D)
            if flat is not None:
                og = og.index_select(0, flat)  # back to packed
            if idx is None:
                o = og
            else:
                o.index_copy_(0, idx, og)
        xp = xp + blk.attn.proj(o)
        return xp + blk.mlp(blk.norm2(xp))

    def forward_packed(
        self, x: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns logits (B, C), depth (B, T) and per-sample FLOPs (B,)."""
        t = self.embed(x)
        B, T, D = t.shape
        dev = x.device
        xp = t.reshape(B * T, D)
        origin = torch.arange(B * T, device=dev)  # sample * T + token of each packed token
        sid = torch.arange(B, device=dev).repeat_interleave(T)  # its live index (live: samples still running)
        live = torch.arange(B, device=dev)
        counts = torch.full((B,), T, dtype=torch.long, device=dev)
        cum, rem = xp.new_zeros(B * T), xp.new_ones(B * T)
        depth = torch.zeros(B * T, dtype=torch.long, device=dev)
        out_cls = xp.new_zeros(B, D)
        table = self._block_cost_table().to(dev)
        flops = torch.full((B,), float(self.embed_cost() + self.head_cost()), dtype=torch.float64, device=dev)
        changed = True  # did the last block halt any token? (else the layout is still valid)
        for i, blk in enumerate(self.blocks):
            if changed:  # the layout of the packed tokens: class-token rows, attention groups, costs
                starts = counts.cumsum(0) - counts  # each live sample's first row: its class token
                groups = self._attention_groups(sid, counts)
                block_flops = table[counts]
            flops.index_add_(0, live, block_flops)
            xp = self._packed_block(blk, xp, groups)
            # halting: ACT weight for the class token, which tokens stop, which samples are done
            h = self.halting_score(xp, i)
            halt = cum + h >= threshold
            w = torch.where(halt, rem, h).index_select(0, starts)
            out_cls.index_add_(0, live, w[:, None] * xp.index_select(0, starts))
            done = halt.index_select(0, starts)  # (n_live,): the class token halted
            keep = ~(halt | done.index_select(0, sid))
            changed = not bool(keep.all())
            if not changed:  # nobody halted (the early blocks): no compaction, the same layout
                cum, rem = cum + h, rem - h
                continue
            kept = keep.nonzero().squeeze(1)
            depth.index_fill_(0, origin[~keep], i + 1)  # the tokens that stop here ran i + 1 blocks
            if kept.numel() == 0:
                break
            xp, origin = xp.index_select(0, kept), origin.index_select(0, kept)
            cum, rem = (cum + h).index_select(0, kept), (rem - h).index_select(0, kept)
            still = ~done
            sid = (still.long().cumsum(0) - 1).index_select(0, sid.index_select(0, kept))
            live = live[still]
            counts = torch.bincount(sid, minlength=live.numel())
        logits = self.forward_head(self.norm(out_cls[:, None]))
        return logits, depth.view(B, T), flops

    def forward_single(
        self, x: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch of one: plain (1, n, D) tensors, halted tokens dropped by a boolean select; no
        packing bookkeeping at all (the same decisions and outputs as `forward_packed`)."""
        t = self.embed(x)  # (1, T, D)
        T = t.shape[1]
        idx = torch.arange(T, device=x.device)  # original index of each active token
        cum, rem = t.new_zeros(T), t.new_ones(T)
        depth = torch.zeros(T, dtype=torch.long, device=x.device)
        table = self._block_cost_table()
        flops = float(self.embed_cost() + self.head_cost())
        out_cls = t.new_zeros(t.shape[-1])
        for i, blk in enumerate(self.blocks):
            flops += float(table[t.shape[1]])
            depth.index_add_(0, idx, torch.ones_like(idx))
            t = blk(t)
            h = self.halting_score(t[0], i)  # (n,)
            halt = cum + h >= threshold
            if bool(halt[0]):  # the class token halts: the sample is finished
                out_cls = out_cls + rem[0] * t[0, 0]
                break
            out_cls = out_cls + h[0] * t[0, 0]
            cum, rem = cum + h, rem - h
            if bool(halt.any()):
                keep = ~halt
                t, idx, cum, rem = t[:, keep], idx[keep], cum[keep], rem[keep]
        logits = self.forward_head(self.norm(out_cls[None, None]))
        return logits, depth[None], torch.tensor([flops], dtype=torch.float64)

    def _block_cost_table(self) -> torch.Tensor:
        """(T + 1,) float64: FLOPs of one block on n tokens, n = 0..T (measured once per n)."""
        if "_table" not in self.__dict__:
            T = self.num_patches + 1
            self.__dict__["_table"] = torch.tensor(
                [self.block_cost(n) for n in range(T + 1)], dtype=torch.float64
            )
        return self.__dict__["_table"]

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, threshold: float | None = None) -> DynamicOutput | MultiExitOutput:
        self.check_input(x)
        thr = self.threshold if threshold is None else check_threshold(threshold)
        if self.training:
            out = self.forward_dense(x, thr)
            return MultiExitOutput([out["logits"]], aux={"loss": self.training_loss(x, out)})
        B, T = x.shape[0], self.num_patches + 1
        if B == 0:
            return DynamicOutput(
                x.new_zeros(0, self.num_classes),
                flops=torch.zeros(0, dtype=torch.float64),
                decisions={"depth": torch.zeros(0, T, dtype=torch.long)},
            )
        with torch.no_grad():
            run = self.forward_single if B == 1 else self.forward_packed
            logits, depth, flops = run(x, thr)
        return DynamicOutput(logits, flops=flops, decisions={"depth": depth})


@register_model
def avit_tiny(**kw: object) -> HaltingViT:
    """vit_tiny with A-ViT per-token halting (adaptive computation time over depth)."""
    return HaltingViT(vit_config(HaltingViTConfig, kw))
