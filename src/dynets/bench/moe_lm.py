"""MoE vs dense on character-level language modelling of SST-2's text (a part of `dynets bench moe`).

Classification of 67k short sentences by a transformer trained from scratch is limited by
over-fitting, where more parameters do not help; language modelling is where the field measures
what an MoE's extra capacity buys (Switch Transformer: lower held-out loss at the same FLOPs per
token). Both models are the blocks of `dynets.models.moe_transformer` (pre-LN attention + FFN or
top-1 MoE of the same expert size, so equal FLOPs per token; the MoE dropless, since which tokens
a capacity limit drops depends on the whole batch, future tokens included) with a causal mask,
trained identically (same seed, same random crops, AdamW with a cosine schedule) on the characters
of SST-2's training sentences; the held-out metric is bits per character on the dev sentences, in
non-overlapping windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynets.models.moe_transformer import Block, MoETransformerConfig, sinusoid
from dynets.width.moe import MoE


@dataclass
class CharLMConfig:
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    num_experts: int = 8
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 800
    lr: float = 2e-3
    weight_decay: float = 0.01
    eval_chars: int = 60000  # of the dev text (about all of it)

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "n_heads",
            "n_layers",
            "d_ff",
            "num_experts",
            "seq_len",
            "batch_size",
            "steps",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CharLMConfig.{name}: expected an int >= 1, got {v!r}")


class CharLM(nn.Module):
    """Causal character model: embedding + sinusoid positions, blocks, final LayerNorm, output layer."""

    def __init__(self, vocab: int, c: CharLMConfig, moe: bool) -> None:
        super().__init__()
        tc = MoETransformerConfig(
            num_classes=vocab,
            vocab_size=vocab,
            input_size=0,
            d_model=c.d_model,
            n_heads=c.n_heads,
            n_layers=c.n_layers,
            d_ff=c.d_ff,
            num_experts=c.num_experts,
            k=1,
            dropless=True,  # capacity drops depend on the other tokens of the batch, future ones included
            dropout=0.0,
        )
        self.embed = nn.Embedding(vocab, c.d_model)  # N(0, 1): on the scale of the sinusoid positions
        self.blocks = nn.ModuleList(Block(tc, moe) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.out = nn.Linear(c.d_model, vocab)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) ids -> (logits (B, T, V), the MoE blocks' auxiliary loss, 0 for dense)."""
        T = x.shape[1]
        h = self.embed(x) + sinusoid(T, self.embed.embedding_dim, x.device)
        causal = torch.full((T, T), float("-inf"), device=x.device).triu(1)[None, None]  # (1, 1, T, T)
        aux = h.new_zeros(())
        for block in self.blocks:
            h = block(h, causal, None)
            if isinstance(block.ffn, MoE):
                aux = aux + block.ffn.last_stats.aux_loss
        return self.out(self.ln_f(h)), aux


def encode_chars(train_texts: list[str], dev_texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sentences joined by newlines, as ids of the training text's characters (0 = unknown)."""
    train, dev = "\n".join(train_texts) + "\n", "\n".join(dev_texts) + "\n"
    chars = sorted(set(train))
    index = {ch: i + 1 for i, ch in enumerate(chars)}
    enc = lambda s: torch.tensor([index.get(ch, 0) for ch in s], dtype=torch.long)  # noqa: E731
    return enc(train), enc(dev), len(chars) + 1


@torch.no_grad()
def bits_per_char(model: CharLM, ids: torch.Tensor, seq_len: int) -> float:
    """Mean held-out cross-entropy in bits per predicted character, non-overlapping windows."""
    model.eval()
    n = (ids.numel() - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 64):
        logits, _ = model(x[i : i + 64])
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i : i + 64].flatten(), reduction="sum"))
    return total / (n * seq_len) / math.log(2)


def train_char_lm(
    name: str, train_ids: torch.Tensor, dev_ids: torch.Tensor, vocab: int, c: CharLMConfig, seed: int
) -> dict[str, Any]:
    """Train the dense or MoE model (`name` "dense" / "moe") for c.steps and measure dev bits/char."""
    torch.manual_seed(seed)
    model = CharLM(vocab, c, moe=name == "moe")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=c.lr
    )
    warmup = max(1, c.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, c.steps) / c.steps)),
    )
    gen = torch.Generator().manual_seed(seed)  # the same crops for both models
    offsets = torch.arange(c.seq_len + 1)
    start, losses = time.perf_counter(), []
    model.train()
    for _ in range(c.steps):
        starts = torch.randint(0, train_ids.numel() - c.seq_len - 1, (c.batch_size,), generator=gen)
        chunk = train_ids[starts[:, None] + offsets]  # (B, T + 1)
        logits, aux = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    dev = dev_ids[: c.eval_chars + 1]
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "dev_bits_per_char": bits_per_char(model, dev, c.seq_len),
        "train_bits_per_char_last_100": sum(losses[-100:]) / len(losses[-100:]) / math.log(2),
        "train_seconds": seconds,
    }


def compare(
    train_texts: list[str], dev_texts: list[str], c: CharLMConfig, seed: int, log: Any = print
) -> dict[str, Any]:
    """Dense vs MoE character model, trained identically; the numbers of both and who wins."""
    train_ids, dev_ids, vocab = encode_chars(train_texts, dev_texts)
    out: dict[str, Any] = {
        "task": "character-level language modelling of SST-2 sentences; held out: the dev sentences",
        "config": asdict(c),
        "train_chars": int(train_ids.numel()),
        "dev_chars": int(min(dev_ids.numel(), c.eval_chars + 1)),
        "vocab": vocab,
    }
    for name in ("dense", "moe"):
        log(f"[moe] char LM: training {name} for {c.steps} steps")
        out[name] = train_char_lm(name, train_ids, dev_ids, vocab, c, seed)
        log(
            f"[moe]   dev {out[name]['dev_bits_per_char']:.4f} bits/char ({out[name]['train_seconds']:.0f} s)"
        )
    out["moe_beats_dense_loss"] = out["moe"]["dev_bits_per_char"] < out["dense"]["dev_bits_per_char"]
    return out
