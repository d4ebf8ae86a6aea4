"""DynamicViT-style token pruning: keep predictors after a few blocks drop the least useful patches.

Stage s (after block `prune_after[s]`) keeps round(N * rho^(s+1)) of the N patch tokens, rho the
keep ratio; the class token is always kept. A keep predictor scores each token from its own
(local) features and the mean of the kept tokens (global), plus rho itself.

Training (Rao et al., 2021): a Gumbel-softmax keep/drop sample per token (straight-through hard
0/1), accumulated over stages; dropped tokens are masked out of attention as keys (they no
longer influence the others, but the gradient still reaches the decision through the attention
weights). aux["loss"] = ratio_weight * (mean kept fraction - rho^(s+1))^2 averaged over stages,
plus, when a teacher (the static ViT) is set, KL distillation of its logits and MSE to its final
token features at the kept positions (the mask only selects there, as in DynamicViT: otherwise the
predictor learns to keep the tokens that are easiest to match, not the useful ones). When
`train_keep_ratios` is set, each batch draws its rho from it, so one model serves several ratios.
`train_selection="gumbel_topk"` instead samples exactly the inference counts (Gumbel top-k,
straight-through); `freeze_backbone()` trains the predictors alone. Predictors start at keep
probability rho, so early steps drop about the right share of tokens.

Inference: the top-k tokens by keep score are gathered (index gather, no masks), so every later
block runs on a shorter sequence: FLOPs and time fall. rho is a run-time knob
(`model.keep_ratio = 0.5` or `model(x, keep_ratio=0.5)`), saved in the config; rho = 1 keeps all.

decisions: "kept" (B, S, N) bool, patch j still present after stage s; "kept_idx_{s}" (B, k_s)
int64, the (sorted) original patch indices kept at stage s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.core.tensors import take_tokens
from dynets.models.vit import ViT, ViTConfig, check_token_multiple, nearest_multiple, trunc_init_, vit_config
from dynets.train.estimators import gumbel_softmax, sample_gumbel


def check_keep_ratio(rho: object) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1 or math.isnan(rho):
        raise ValueError(f"keep_ratio: expected a number in (0, 1], got {rho!r}")
    return float(rho)


def check_prune_after(stages: object, depth: int, name: str = "prune_after") -> tuple[int, ...]:
    """The blocks followed by a keep predictor: strictly increasing 0-based indices below the last block."""
    p = tuple(stages)
    if not p or any(b <= a for a, b in zip(p, p[1:])) or p[0] < 0 or p[-1] >= depth - 1:
        raise ValueError(f"{name}: expected strictly increasing block indices in [0, {depth - 2}], got {p}")
    return p


@dataclass
class DynamicViTConfig(ViTConfig):
    prune_after: tuple[int, ...] = (1, 3, 4)  # 0-based blocks followed by a keep predictor
    keep_ratio: float = 0.7  # rho: stage s keeps round(N * rho^(s+1)) patches (run-time knob)
    train_keep_ratios: tuple[float, ...] = ()  # if set, each training batch draws rho from these
    predictor_hidden: int = 0  # 0: dim // 2
    tau: float = 1.0  # Gumbel-softmax temperature
    # "gumbel": DynamicViT's per-token keep/drop Gumbel-softmax; "gumbel_topk": exactly k_s tokens
    # by Gumbel-perturbed top-k (sampling without replacement), the count inference uses
    train_selection: str = "gumbel"
    ratio_weight: float = 2.0
    distill_weight: float = 0.5  # KL to the teacher's logits
    token_distill_weight: float = 0.5  # MSE to the teacher's final tokens, kept positions only
    # learning rate of the keep predictors relative to the backbone's (the train config's lr): they
    # start from scratch while the backbone is only fine-tuned (DynamicViT trains the backbone at
    # 0.01x the predictors' rate)
    predictor_lr_scale: float = 1.0
    # run-time knob: round each stage's sequence length (kept patches + the class token) to the
    # nearest multiple of this (1 = no rounding; lengths below it are left as they are). PyTorch's
    # CPU attention kernel runs a length that is a multiple of 16 about twice as fast as one a few
    # tokens shorter (48 tokens: 0.75 ms, 46: 1.38 ms at batch 64, dim 128, 4 heads; benchmarks/
    # kernel_micro.py), so 16 turns
    # more of the saved FLOPs into saved time; the FLOPs follow the counts actually kept
    token_multiple: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prune_after(self.prune_after, self.depth)
        check_keep_ratio(self.keep_ratio)
        for r in self.train_keep_ratios:
            check_keep_ratio(r)
        if not self.tau > 0:
            raise ValueError(f"tau: expected > 0, got {self.tau}")
        check_token_multiple(self.token_multiple)
        s = self.predictor_lr_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf:
            raise ValueError(f"predictor_lr_scale: expected a number > 0, got {s!r}")
        if self.train_selection not in ("gumbel", "gumbel_topk"):
            raise ValueError(
                f"train_selection: expected 'gumbel' or 'gumbel_topk', got {self.train_selection!r}"
            )


class KeepPredictor(nn.Module):
    """Per-token (keep, drop) logits from local features, the kept tokens' mean, and rho.

    The first output layer acts on [local, global, rho]; it is split into a per-token part and a
    per-sample part (global and rho are the same for every token of a sample), which is the same
    function without building the (B, n, H + 1) concatenation.
    """

    def __init__(self, dim: int, hidden: int, init_keep: float = 0.5) -> None:
        super().__init__()
        self.init_keep = init_keep  # initial keep probability, applied by reset_bias()
        half = hidden // 2
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.local = nn.Linear(half, hidden // 2)
        self.glob = nn.Linear(hidden - half + 1, hidden // 2, bias=False)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden // 2, 2))

    def reset_bias(self) -> None:
        """Start near keep probability init_keep, so the first training steps already drop about
        the right share of tokens (at 0.5 three stages would keep 1/8 instead of rho^3)."""
        with torch.no_grad():
            p = min(max(self.init_keep, 1e-3), 1 - 1e-3)
            self.out[-1].bias.copy_(torch.tensor([math.log(p / (1 - p)), 0.0]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rho: torch.Tensor) -> torch.Tensor:
        # x (B, n, D) patch tokens; mask (B, n) 0/1 tokens still present (None: all); rho (B,)
        h = self.inp(x)  # (B, n, H)
        half = self.local.in_features
        local, glob = h[..., :half], h[..., half:]
        if mask is None:
            g = glob.mean(1)  # (B, H - half)
        else:
            g = (glob * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        per_sample = self.glob(torch.cat([g, rho.to(h.dtype)[:, None]], -1))  # (B, H/2)
        return self.out(self.local(local) + per_sample[:, None])  # (B, n, 2)


def keep_score(logits: torch.Tensor) -> torch.Tensor:
    return logits[..., 0] - logits[..., 1]  # log-odds of keeping


@register_architecture
class DynamicViT(ViT):
    config_class = DynamicViTConfig

    def __init__(self, config: DynamicViTConfig) -> None:
        super().__init__(config)
        hidden = config.predictor_hidden or config.dim // 2
        self.predictors = nn.ModuleList(
            KeepPredictor(config.dim, hidden, config.keep_ratio) for _ in config.prune_after
        )
        trunc_init_(self.predictors)
        for p in self.predictors:
            p.reset_bias()
        self._teacher: list[ViT] = []  # a plain list: the teacher is neither saved nor trained

    # ---------------------------------------------------------------- knobs
    @property
    def keep_ratio(self) -> float:
        return self.config.keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, rho: float) -> None:
        self.config.keep_ratio = check_keep_ratio(rho)

    def freeze_backbone(self) -> DynamicViT:
        """Train only the keep predictors: the backbone keeps the static ViT's weights exactly
        (a short fine-tune cannot then disturb it); its gradients still flow to the predictors."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("predictors."))
        return self

    def lr_scales(self) -> dict[nn.Parameter, float]:
        """For the train loop: the keep predictors' learning rate is predictor_lr_scale x the lr."""
        s = float(self.config.predictor_lr_scale)
        return {} if s == 1.0 else {p: s for p in self.predictors.parameters()}

    def set_teacher(self, teacher: ViT | None) -> DynamicViT:
        """Distil from `teacher` (e.g. the static ViT this model was fine-tuned from) in training."""
        self._teacher = [] if teacher is None else [teacher.eval()]
        return self

    @property
    def token_multiple(self) -> int:
        return self.config.token_multiple

    @token_multiple.setter
    def token_multiple(self, m: int) -> None:
        self.config.token_multiple = check_token_multiple(m)

    def keep_counts(self, rho: float, token_multiple: int | None = None) -> list[int]:
        """Patch tokens present after each stage: round(N * rho^(s+1)), at least 1; with a
        token_multiple m > 1 (default: the config's), the sequence length k + 1 (the class token)
        is rounded to the nearest multiple of m where it is at least m, never above the previous
        stage's count."""
        N, m = (
            self.num_patches,
            check_token_multiple(self.config.token_multiple if token_multiple is None else token_multiple),
        )
        out, prev = [], N
        for s in range(len(self.predictors)):
            k = max(1, min(N, round(N * rho ** (s + 1))))
            if m > 1 and k + 1 >= m:
                k = nearest_multiple(k + 1, m) - 1
            k = min(k, prev)
            out.append(k)
            prev = k
        return out

    # ---------------------------------------------------------------- masked path (training, reference)
    def forward_masked(
        self,
        x: torch.Tensor,
        rho: torch.Tensor,
        *,
        hard_topk: bool = False,
        masks_given: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Every token computed, dropped ones masked out of attention as keys.

        hard_topk=False: Gumbel-softmax decisions (training). hard_topk=True: the inference rule
        (top-k of the keep score among present tokens). masks_given: explicit per-stage (B, N)
        0/1 masks to apply instead of deciding (the reference for the gathered path).
        Returns logits (B, C), normalised features (B, 1+N, D), per-stage masks [(B, N) 0/1].
        """
        t = self.embed(x)
        B, N = t.shape[0], self.num_patches
        mask = t.new_ones(B, N)
        keep_full, masks = None, []
        stage_of = {b: s for s, b in enumerate(self.config.prune_after)}
        mode = "topk" if hard_topk else self.config.train_selection
        counts = self.keep_counts(float(rho[0]))
        for i, blk in enumerate(self.blocks):
            t = blk(t, keep=keep_full)
            s = stage_of.get(i)
            if s is None:
                continue
            if masks_given is not None:
                mask = masks_given[s].to(t.dtype)
            elif mode != "gumbel" and counts[s] >= (counts[s - 1] if s else N):
                masks.append(mask)
                continue
            else:
                mask = self._decide(self.predictors[s](t[:, 1:], mask, rho), mask, counts[s], mode)
            masks.append(mask)
            keep_full = torch.cat([mask.new_ones(B, 1), mask], 1)  # the class token is always kept
        feats = self.norm(t)
        return self.forward_head(feats), feats, masks

    def _decide(self, logits: torch.Tensor, mask: torch.Tensor, k: int, mode: str) -> torch.Tensor:
        """New (B, N) keep mask from (B, N, 2) predictor logits and the present tokens' mask.

        "topk": the k best keep scores (inference's rule); "gumbel": a straight-through
        Gumbel-softmax keep/drop sample per token; "gumbel_topk": the top k of the scores plus
        Gumbel noise, straight-through a sigmoid around the k-th value (soft near the boundary)."""
        if mode == "gumbel":
            return gumbel_softmax(logits, tau=self.config.tau, hard=True)[..., 0] * mask
        score = keep_score(logits)
        if mode == "gumbel_topk":
            score = score + sample_gumbel(score.shape, score)
        score = score.masked_fill(mask <= 0, float("-inf"))
        top = score.topk(k, dim=1)
        hard = torch.zeros_like(mask).scatter_(1, top.indices, 1.0)
        if mode == "topk":
            return hard
        below = score.masked_fill(hard > 0, float("-inf")).amax(1, keepdim=True)  # (k+1)-th value
        kth = top.values[:, -1:]
        thr = torch.where(torch.isfinite(below), (kth + below) / 2, kth - 1).detach()
        soft = torch.sigmoid((score - thr) / self.config.tau) * mask
        return hard + soft - soft.detach()

    def training_loss(
        self, x: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor, masks: list[torch.Tensor], rho
    ) -> torch.Tensor:
        c = self.config
        targets = torch.stack([rho ** (s + 1) for s in range(len(masks))], 1)  # (B, S)
        kept = torch.stack([m.mean(1) for m in masks], 1)  # (B, S)
        loss = c.ratio_weight * ((kept - targets) ** 2).mean()
        if self._teacher:
            teacher = self._teacher[0]
            with torch.no_grad():
                t_feats = teacher.forward_features(x)
                t_logits = teacher.forward_head(t_feats)
            if c.distill_weight:
                kl = F.kl_div(
                    F.log_softmax(logits, -1),
                    F.log_softmax(t_logits, -1),
                    reduction="batchmean",
                    log_target=True,
                )
                loss = loss + c.distill_weight * kl
            if c.token_distill_weight:
                m = masks[-1].detach()[..., None]  # (B, N, 1); an index, as in DynamicViT: no gradient
                err = ((feats[:, 1:] - t_feats[:, 1:]) ** 2 * m).sum() / (
                    m.sum() * feats.shape[-1]
                ).clamp_min(1)
                loss = loss + c.token_distill_weight * err
        return loss

    # ---------------------------------------------------------------- gathered path (inference)
    def forward_pruned(
        self, x: torch.Tensor, rho: float, token_multiple: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Top-k gather at each stage; returns logits and per-stage kept patch indices [(B, k_s)]."""
        t = self.embed(x)
        B, N = t.shape[0], self.num_patches
        orig = torch.arange(N, device=x.device).expand(B, N)  # original index of each present patch
        rho_t = t.new_full((B,), rho)
        counts = self.keep_counts(rho, token_multiple)
        stage_of = {b: s for s, b in enumerate(self.config.prune_after)}
        kept = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            s = stage_of.get(i)
            if s is None:
                continue
            if counts[s] < t.shape[1] - 1:
                score = keep_score(self.predictors[s](t[:, 1:], None, rho_t))  # (B, n)
                idx = score.topk(counts[s], dim=1, sorted=False).indices.sort(1).values  # (B, k)
                t = take_tokens(t, torch.cat([idx.new_zeros(B, 1), idx + 1], 1))  # class token first
                orig = orig.gather(1, idx)
            kept.append(orig)
        return self.forward_head(self.norm(t)), kept

    def pruned_cost(self, rho: float, token_multiple: int | None = None) -> float:
        """FLOPs per sample at keep ratio rho (every sample keeps the same number of tokens)."""
        m = check_token_multiple(self.config.token_multiple if token_multiple is None else token_multiple)
        key = ("pruned", rho, m)
        if key not in self._costs:
            self._costs[key] = self._pruned_cost(rho, m)
        return self._costs[key]

    def _pruned_cost(self, rho: float, token_multiple: int) -> float:
        N = self.num_patches
        counts = self.keep_counts(rho, token_multiple)
        total, n = self.embed_cost() + self.head_cost(), N
        stage_of = {b: s for s, b in enumerate(self.config.prune_after)}
        for i in range(self.config.depth):
            total += self.block_cost(n + 1)
            s = stage_of.get(i)
            if s is not None and counts[s] < n:
                total += self._predictor_cost(s, n)
                n = counts[s]
        return float(total)

    def _predictor_cost(self, s: int, n: int) -> int:
        pred = self.predictors[s]
        rho = torch.ones(1, device=self.pos_embed.device)
        return self._measure(("pred", s, n), lambda t: pred(t, None, rho), self._tokens(n))

    # ---------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, keep_ratio: float | None = None, token_multiple: int | None = None
    ) -> DynamicOutput | MultiExitOutput:
        """token_multiple (inference): overrides config.token_multiple for this call."""
        self.check_input(x)
        rho = self.keep_ratio if keep_ratio is None else check_keep_ratio(keep_ratio)
        B = x.shape[0]
        if self.training:
            if self.config.train_keep_ratios and self.predictors.training:
                choices = torch.tensor(self.config.train_keep_ratios)
                rho = float(choices[torch.randint(len(choices), ())])
            rho_t = x.new_full((B,), rho)
            logits, feats, masks = self.forward_masked(x, rho_t, hard_topk=not self.predictors.training)
            return MultiExitOutput([logits], aux={"loss": self.training_loss(x, logits, feats, masks, rho_t)})
        N, S = self.num_patches, len(self.predictors)
        if B == 0:
            decisions = {"kept": torch.zeros(0, S, N, dtype=torch.bool)}
            decisions.update(
                {
                    f"kept_idx_{s}": torch.zeros(0, k, dtype=torch.long)
                    for s, k in enumerate(self.keep_counts(rho, token_multiple))
                }
            )
            return DynamicOutput(
                x.new_zeros(0, self.num_classes),
                flops=torch.zeros(0, dtype=torch.float64),
                decisions=decisions,
            )
        with torch.no_grad():
            logits, kept = self.forward_pruned(x, rho, token_multiple)
        present = torch.zeros(B, S, N, dtype=torch.bool, device=x.device)
        for s, idx in enumerate(kept):
            present[:, s].scatter_(1, idx, True)
        decisions = {"kept": present, **{f"kept_idx_{s}": idx for s, idx in enumerate(kept)}}
        flops = torch.full((B,), self.pruned_cost(rho, token_multiple), dtype=torch.float64)
        return DynamicOutput(logits, flops=flops, decisions=decisions)


@register_model
def dynamicvit_tiny(**kw: object) -> DynamicViT:
    """vit_tiny with DynamicViT keep predictors after blocks 2, 4, 5 (keep ratio rho, rho^2, rho^3)."""
    return DynamicViT(vit_config(DynamicViTConfig, kw))
