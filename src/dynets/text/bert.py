"""Dynamic BERT: a pretrained BERT-family encoder with an exit classifier after every layer.

The case study in one file (costs in `bert_costs.py`, the transformers adapter in `hf.py`,
training recipes in `recipes.py`). The encoder comes from a local Hugging Face directory;
transformers is imported only inside functions, so `import dynets` works without it.

Inputs are token ids x (B, L) int64, right-padded with pad_token_id; position 0 ([CLS]) is always
valid. Every forward trims the batch to its longest sentence (dynamic padding). Exit k reads the
[CLS] hidden state after layer k: dropout -> linear -> (B, C) logits. Layers run one at a time,
each `BertLayer` called directly with the attention mask transformers builds for it.

In training mode `forward` returns every exit's logits (MultiExitOutput), so the train loop and
`multi_exit_loss` work unchanged. In eval mode it runs dynamically under a policy, as
EarlyExitNetwork does:

  1. run layer k on the sentences still active            h: (B_active, L_active, H)
  2. exit k's logits; the policy says who stops            stop: (B_active,)
  3. scatter the stopped rows' logits back to their input positions
  4. compact hidden states, validity mask and policy state with index_select, then re-trim the
     padding to the longest sentence still running, so short survivors stop paying for long
     ones that left

A sample's FLOPs are measured costs at its own unpadded length: the embeddings, every layer it
ran and every exit head it passed.

Width and depth (DynaBERT, `dynabert.py`) are run-time settings: `set_subnet(width, depth)` keeps
the layers of an even depth schedule, each run on the first heads and FFN neurons of its weights
(slices, not masks); exit k is then the exit after the k-th kept layer, and `num_exits`, every
forward path and every cost follow the current sub-network. Width 1 runs the HF layers themselves.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.serialization import register_architecture
from dynets.core.tensors import check_batch_size, pop_groups, write_exits
from dynets.depth.early_exit import ExitPredictor
from dynets.policies.exit_policies import ConfidencePolicy, ExitPolicy, ThresholdPolicy
from dynets.text.bert_costs import LengthCost, fit_layer_cost, measure_units
from dynets.text.dynabert import check_depth, check_width, kept_layers, narrow_layer, subnet_sizes
from dynets.text.hf import (
    attention_mask,
    check_bert_like,
    encoder_from_config,
    load_encoder_dir,
    load_tokenizer,
)

TOKENIZER_DIR = "tokenizer"  # sub-folder of a saved model directory


@dataclass
class DynamicBertConfig:
    """encoder: the Hugging Face config of the encoder (`hf_model.config.to_dict()`), from which
    the architecture is rebuilt on load without downloading anything. labels: class names, in the
    order of the logits."""

    encoder: dict[str, Any]
    num_labels: int
    labels: list[str]
    max_length: int | None = None  # None: min(128, the encoder's max positions)
    pad_token_id: int = 0
    exit_dropout: float = 0.1
    learned_exits: bool = True
    width: float = 1.0  # the current sub-network (DynaBERT), set with DynamicBert.set_subnet
    depth: float = 1.0
    rewired: bool = False  # heads and neurons permuted by importance (dynabert.rewire)
    # How the early exits pool a layer's tokens: "cls" (the [CLS] state, as DeeBERT) or "mean" (the
    # mean of the valid tokens). Mean-pooling sentence encoders such as MiniLM carry little signal
    # in their early [CLS] states. The last layer's head always uses [CLS], the static classifier.
    exit_pooling: str = "cls"
    # Mixture-of-experts FFNs (width/moe.replace_bert_ffn_with_moe): {"num_experts", "k", "layers",
    # "config"}, recorded by that call so that dynets.load rebuilds the same layers. None: dense FFNs.
    moe: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, dict) or "hidden_size" not in self.encoder:
            raise ValueError(
                "DynamicBertConfig.encoder: expected the encoder's HF config dict (with hidden_size)"
            )
        self.labels = [str(v) for v in self.labels]
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"DynamicBertConfig.labels: expected >= 2 distinct names, got {self.labels!r}")
        if self.num_labels != len(self.labels):
            raise ValueError(
                f"DynamicBertConfig.num_labels: expected len(labels) = {len(self.labels)}, "
                f"got {self.num_labels}"
            )
        max_pos = int(self.encoder.get("max_position_embeddings", 512))
        if self.max_length is None:
            self.max_length = min(128, max_pos)
        if not isinstance(self.max_length, int) or not 2 <= self.max_length <= max_pos:
            raise ValueError(
                f"DynamicBertConfig.max_length: expected an int in [2, {max_pos}] (the encoder's "
                f"positions), got {self.max_length!r}"
            )
        if not 0.0 <= float(self.exit_dropout) < 1.0:
            raise ValueError(
                f"DynamicBertConfig.exit_dropout: expected a float in [0, 1), got {self.exit_dropout}"
            )
        self.width, self.depth = check_width(self.width), check_depth(self.depth)
        if self.exit_pooling not in ("cls", "mean"):
            raise ValueError(
                f"DynamicBertConfig.exit_pooling: expected 'cls' or 'mean', got {self.exit_pooling!r}"
            )


class ExitHead(nn.Module):
    """Exit classifier: the [CLS] hidden state (or the mean of the valid tokens) -> dropout -> linear."""

    def __init__(self, hidden: int, num_labels: int, dropout: float, pooling: str = "cls") -> None:
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        # h: (B, L, H), valid: (B, L) bool or None (every token valid) -> (B, C)
        if self.pooling == "cls":
            pooled = h[:, 0]
        elif valid is None:
            pooled = h.mean(1)
        else:
            w = valid.to(h.dtype)  # (B, L)
            pooled = torch.bmm(w.unsqueeze(1), h).squeeze(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


@register_architecture
class DynamicBert(nn.Module):
    """BERT with an exit after every layer; build it with `from_pretrained_encoder(path, labels)`."""

    config_class = DynamicBertConfig

    def __init__(
        self,
        config: DynamicBertConfig,
        *,
        encoder: nn.Module | None = None,
        tokenizer: Any = None,
        policy: ExitPolicy | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        encoder = encoder if encoder is not None else encoder_from_config(config.encoder)
        check_bert_like(encoder, "encoder")
        self.hf_config = encoder.config  # the layers' attention implementation and mask type live here
        self.embeddings = encoder.embeddings
        self.layers = encoder.encoder.layer  # pooler and the rest of the HF model are not kept
        self.tokenizer = tokenizer
        H, C = int(config.encoder["hidden_size"]), config.num_labels
        self.vocab_size = int(config.encoder["vocab_size"])
        self.max_positions = int(config.encoder.get("max_position_embeddings", 512))
        n_layers = len(self.layers)
        self.heads = nn.ModuleList(
            ExitHead(H, C, config.exit_dropout, config.exit_pooling if i < n_layers - 1 else "cls")
            for i in range(n_layers)
        )
        n_pred = len(self.layers) - 1 if config.learned_exits else 0
        self.exit_predictors = nn.ModuleList(ExitPredictor(C) for _ in range(n_pred))
        for p in self.exit_predictors.parameters():  # fitted afterwards (fit_learned_exits), never by train()
            p.requires_grad_(False)
        self.policy: ExitPolicy = policy if policy is not None else ConfidencePolicy(0.9)
        if config.moe:  # rebuild the recorded MoE layers (their weights come from the checkpoint)
            from dynets.width.moe import replace_bert_ffn_with_moe

            spec = config.moe
            replace_bert_ffn_with_moe(
                self, spec["num_experts"], spec["k"], spec["layers"], noise=0.0, **spec["config"]
            )
        self.set_subnet(config.width, config.depth)

    # ------------------------------------------------------------------ width and depth (DynaBERT)
    def set_subnet(self, width: float = 1.0, depth: float = 1.0) -> DynamicBert:
        """Run the sub-network of this width (one of dynabert.WIDTHS) and depth (in (0, 1]) from now
        on; (1.0, 1.0) is the original model. Stored in the config, so it survives save/load."""
        width, depth = check_width(width), check_depth(depth)
        if width < 1.0 and self.config.moe:
            raise ValueError(
                f"width: narrow sub-networks slice dense FFNs, and this model's FFNs are mixtures of "
                f"experts; expected width 1.0, got {width}"
            )
        heads, neurons = subnet_sizes(self.layers[0], width) if width < 1.0 else (None, None)
        self._kept = kept_layers(len(self.layers), depth)
        self._heads, self._neurons = heads, neurons
        self.config.width, self.config.depth = width, depth
        return self

    @property
    def subnet(self) -> tuple[float, float]:
        """The current (width, depth)."""
        return self.config.width, self.config.depth

    @property
    def active_layers(self) -> list[int]:
        """Indices of the layers the current depth keeps; exit k follows layer active_layers[k]."""
        return list(self._kept)

    def _layer(self, i: int, h: torch.Tensor, mask: Any) -> torch.Tensor:
        """Layer i at the current width: the HF layer itself at width 1, else its sliced weights."""
        if self._heads is None:
            return self.layers[i](h, mask)
        return narrow_layer(self.layers[i], h, mask, self._heads, self._neurons)

    # ------------------------------------------------------------------ construction and save/load
    @classmethod
    def from_pretrained_encoder(
        cls, path: str | os.PathLike, labels: Sequence[str], **kw: Any
    ) -> DynamicBert:
        """Load a local HF encoder directory (weights + tokenizer) and add fresh exits for `labels`.

        kw: other DynamicBertConfig fields (max_length, exit_dropout, learned_exits) and `policy`.
        """
        encoder, tokenizer = load_encoder_dir(path)
        policy = kw.pop("policy", None)
        max_pos = int(encoder.config.max_position_embeddings)
        kw.setdefault("max_length", min(128, max_pos, int(getattr(tokenizer, "model_max_length", max_pos))))
        config = DynamicBertConfig(
            encoder=json.loads(json.dumps(encoder.config.to_dict(), default=str)),
            num_labels=len(labels),
            labels=list(labels),
            pad_token_id=int(tokenizer.pad_token_id),
            **kw,
        )
        return cls(config, encoder=encoder, tokenizer=tokenizer, policy=policy)

    def save_extra_files(self, directory: Path) -> None:
        """Called by dynets.save: write the tokenizer beside the weights (sub-folder `tokenizer/`)."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(Path(directory) / TOKENIZER_DIR))

    @classmethod
    def from_saved_directory(cls, config: DynamicBertConfig, directory: Path) -> DynamicBert:
        """Called by dynets.load: rebuild the architecture (no weights) and read the tokenizer back."""
        tok_dir = Path(directory) / TOKENIZER_DIR
        tokenizer = None
        if tok_dir.is_dir():
            tokenizer = load_tokenizer(tok_dir)
        return cls(config, tokenizer=tokenizer)

    # ------------------------------------------------------------------ tokenisation
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, L) int64, right-padded with pad_token_id to the longest text.

        Texts longer than max_length are truncated (one warning says how many); an empty text is
        an error naming its index.
        """
        if self.tokenizer is None:
            raise ValueError("this DynamicBert has no tokenizer; build it with from_pretrained_encoder")
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of strings, got a single str")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected a str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(f"texts[{i}]: expected a non-empty text, got {t!r}")
        if not texts:
            return torch.zeros(0, 0, dtype=torch.long)
        max_len = int(self.config.max_length)
        ids: list[list[int]] = self.tokenizer(texts, truncation=False)["input_ids"]
        long = [i for i, seq in enumerate(ids) if len(seq) > max_len]
        if long:  # re-encode only those, so truncation is exactly the tokenizer's own
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=max_len)["input_ids"]
            for i, seq in zip(long, cut):
                ids[i] = seq
            warnings.warn(
                f"encode: {len(long)} of {len(texts)} texts were longer than max_length={max_len} tokens "
                f"and were truncated",
                stacklevel=2,
            )
        out = torch.full((len(ids), max(map(len, ids))), self.config.pad_token_id, dtype=torch.long)
        for i, seq in enumerate(ids):
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ inputs and masks
    @property
    def num_exits(self) -> int:
        """Exits of the current sub-network (one per kept layer; all layers at depth 1)."""
        return len(self._kept)

    def check_input(self, x: torch.Tensor) -> None:
        """Token ids (B, L) int64 within the vocabulary; fails early naming expected and given."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"input: expected token ids as a torch.Tensor (B, L) int64, got {type(x).__name__}"
            )
        if x.dtype != torch.int64:
            raise TypeError(f"input: expected token ids of dtype torch.int64, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"input: expected token ids of shape (B, L), got {tuple(x.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(x)) if x.numel() else (0, 0)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"input: expected token ids in [0, {self.vocab_size}), got values in [{lo}, {hi}]"
            )
        if x.shape[0] and x.shape[1] == 0:
            raise ValueError("input: expected at least one token per sentence (L >= 1), got L = 0")

    def lengths(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) unpadded length of each sentence: last non-pad position + 1 ([CLS] always counts)."""
        valid = x != self.config.pad_token_id  # (B, L)
        pos = torch.arange(1, x.shape[1] + 1, device=x.device)
        return (valid * pos).amax(dim=1).clamp(min=1)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check, then trim to the longest sentence: (ids (B, L'), valid (B, L'), lengths (B,))."""
        self.check_input(x)
        lengths = self.lengths(x)
        if x.shape[0] == 0:
            return x, x != self.config.pad_token_id, lengths
        L = int(lengths.max())
        if L > self.max_positions:
            raise ValueError(
                f"input: expected at most {self.max_positions} tokens (the encoder's positions), got {L}"
            )
        x = x[:, :L]
        valid = x != self.config.pad_token_id
        valid[:, 0] = True  # (B, L)
        return x, valid, lengths

    def _mask(self, valid: torch.Tensor, h: torch.Tensor) -> Any:
        return attention_mask(self.hf_config, valid, h)

    # ------------------------------------------------------------------ cost accounting
    def unit_costs(self) -> dict[str, LengthCost | int]:
        """Measured FLOPs per sample of one embedding pass, layer, exit head (each a function of
        the length) and learned-exit predictor; cached. All layers share one shape, so one is measured."""
        if "_units" not in self.__dict__:
            self.__dict__["_units"] = measure_units(
                self.embeddings,
                self.layers[0],
                self.heads[0],
                self.exit_predictors[0] if len(self.exit_predictors) else None,
                hidden_size=int(self.config.encoder["hidden_size"]),
                num_labels=self.config.num_labels,
            )
        return self.__dict__["_units"]

    def layer_cost(self, width: float | None = None) -> LengthCost:
        """Measured FLOPs of one layer at `width` (default: the current one), as a function of L.
        Narrow layers are measured through the same sliced forward, with attention spelled out."""
        width = self.config.width if width is None else check_width(width)
        if width == 1.0:
            return self.unit_costs()["layer"]
        cache = self.__dict__.setdefault("_layer_costs", {})
        if width not in cache:
            layer, (heads, neurons) = self.layers[0], subnet_sizes(self.layers[0], width)
            was_training = layer.training
            layer.eval()
            try:
                cache[width] = fit_layer_cost(
                    lambda h: narrow_layer(layer, h, None, heads, neurons, eager=True),
                    int(self.config.encoder["hidden_size"]),
                    layer.output.dense.weight.device,
                )
            finally:
                layer.train(was_training)
        return cache[width]

    def exit_costs(self, lengths: torch.Tensor, learned: bool = False) -> torch.Tensor:
        """(B, K) float64: FLOPs sample b spends if it leaves at exit k of the current sub-network."""
        n = torch.arange(1, self.num_exits + 1, dtype=torch.float64)  # layers and heads run up to exit k
        return self._cost_upto(lengths.cpu()[:, None], n, n.clamp(max=self.num_exits - 1), learned)

    def _cost_upto(self, L: Any, n: Any, n_predictors: Any, learned: bool) -> Any:
        """FLOPs of `n` layers and exit heads at length L (tensors that broadcast, or Python numbers)."""
        u = self.unit_costs()
        cost = u["embeddings"](L) + n * (self.layer_cost()(L) + u["head"](L))
        if learned and len(self.exit_predictors):
            cost = cost + n_predictors * float(u["predictor"])
        return cost

    def sample_flops(
        self, lengths: torch.Tensor, exit_index: torch.Tensor, learned: bool = False
    ) -> torch.Tensor:
        """(B,) float64 FLOPs of each sample given where it exited."""
        costs = self.exit_costs(lengths, learned)
        return costs.gather(1, exit_index.cpu()[:, None]).squeeze(1).to(exit_index.device)

    def full_cost(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) float64 FLOPs of the static path of the current sub-network: its layers, last head only."""
        u = self.unit_costs()
        lengths = lengths.cpu()
        return u["embeddings"](lengths) + self.num_exits * self.layer_cost()(lengths) + u["head"](lengths)

    # ------------------------------------------------------------------ forward paths
    def forward(
        self, x: torch.Tensor, policy: ExitPolicy | None = None, *, record: bool = False
    ) -> DynamicOutput | MultiExitOutput:
        """Training mode: every exit's logits. Eval mode: dynamic execution under `policy`."""
        if self.training:
            return MultiExitOutput(self.all_exit_logits(x))
        with torch.no_grad():
            return self.run_dynamic(x, policy if policy is not None else self.policy, record=record)

    def all_exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's (B, C) logits for every sentence: the static reference and the training path."""
        return self.exits_and_hidden(x)[0]

    def exits_and_hidden(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Every exit's logits (B, C), the hidden states (B, L', H) after each kept layer, and the
        validity mask (B, L') of the trimmed batch: what distillation needs."""
        x, valid, _ = self._prepare(x)
        if x.shape[0] == 0:
            return [self._empty_logits() for _ in self._kept], [], valid
        h = self.embeddings(input_ids=x)  # (B, L, H)
        mask = self._mask(valid, h)
        outs, hidden = [], []
        for i in self._kept:
            h = self._layer(i, h, mask)  # (B, L, H)
            hidden.append(h)
            outs.append(self.heads[i](h, valid))  # (B, C)
        return outs, hidden, valid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last kept layer's hidden states (B, L', H), L' = the longest sentence (batch trimmed)."""
        x, valid, _ = self._prepare(x)
        h = self.embeddings(input_ids=x)  # (B, L', H)
        mask = self._mask(valid, h) if x.shape[0] else None
        for i in self._kept:
            h = self._layer(i, h, mask)
        return h

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """The plain static path: every layer, final head only (no exit heads run)."""
        self.check_input(x)
        if x.shape[0] == 0:
            return self._empty_logits()
        _, valid, _ = self._prepare(x)
        return self.heads[self._kept[-1]](self.forward_features(x), valid)

    def learned_scores(self, exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, K-1) learned-exit scores (P(this exit is already right)) from the non-final exits' logits."""
        if not len(self.exit_predictors):
            raise ValueError("this model was built without learned exits (learned_exits=False)")
        preds = [self.exit_predictors[i] for i in self._kept[:-1]]  # shared by every width
        return torch.stack([p(lg) for p, lg in zip(preds, exit_logits)], dim=1)

    def _empty_logits(self) -> torch.Tensor:
        return self.heads[0].classifier.weight.new_zeros(0, self.config.num_labels)

    def run_dynamic(self, x: torch.Tensor, policy: ExitPolicy, *, record: bool = False) -> DynamicOutput:
        """Dynamic execution: exited sentences leave the batch; results return in input order."""
        if policy.needs_learned and not len(self.exit_predictors):
            raise ValueError(f"policy {policy.kind!r} needs learned exits, but this model has none")
        x, valid, lengths = self._prepare(x)
        B = x.shape[0]
        if B == 0:
            return DynamicOutput(
                self._empty_logits(),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.float64),
                decisions={"exit_layer": torch.zeros(0, dtype=torch.long)},
            )
        if B == 1 and not record:
            return self._run_single(x, valid, lengths, policy)
        K = self.num_exits
        scores = torch.full((B, K), float("nan")) if record else None
        exit_index = torch.empty(B, dtype=torch.long, device=x.device)
        out = self._empty_logits().new_empty(B, self.config.num_labels)
        idx = torch.arange(B, device=x.device)  # input positions of the active rows
        lens = lengths  # (B_active,) their unpadded lengths
        state = policy.init_state(B, x.device)
        h = self.embeddings(input_ids=x)  # (B, L, H)
        mask = self._mask(valid, h)
        for k, i in enumerate(self._kept):
            h = self._layer(i, h, mask)  # 1. (B_active, L_active, H)
            logits = self.heads[i](h, None if mask is None else valid)  # 2. (B_active, C); None: no padding
            if k == K - 1:
                out.index_copy_(0, idx, logits)
                exit_index.index_fill_(0, idx, k)
                break
            learned = self.exit_predictors[i](logits) if policy.needs_learned else None
            stop, state = policy.step(k, logits, state, learned)
            if scores is not None and isinstance(policy, ThresholdPolicy):
                scores[idx.cpu(), k] = policy.score(logits, learned).float().cpu()
            n_stop = int(stop.sum())
            if n_stop == 0:
                continue
            if n_stop == idx.numel():  # everyone left: write and finish
                out.index_copy_(0, idx, logits)
                exit_index.index_fill_(0, idx, k)
                break
            keep = write_exits(out, exit_index, idx, logits, stop, k)  # 3. finished rows, in input order
            idx, lens = idx.index_select(0, keep), lens.index_select(0, keep)  # 4. compact ...
            h, valid = h.index_select(0, keep), valid.index_select(0, keep)
            state = {name: v.index_select(0, keep) for name, v in state.items()}
            L = int(lens.max())  # ... and re-trim the padding to the longest survivor
            if L < h.shape[1]:
                h, valid = h[:, :L], valid[:, :L]
            mask = self._mask(valid, h)
        flops = self.sample_flops(lengths, exit_index, learned=policy.needs_learned)
        rec = {"scores": scores, "lengths": lengths.cpu()} if record else None
        return DynamicOutput(out, exit_index, flops, rec, self._decisions(exit_index))

    @torch.no_grad()
    def run_pooled(self, x: torch.Tensor, batch_size: int, policy: ExitPolicy | None = None) -> DynamicOutput:
        """Throughput mode over many batches (EarlyExitNetwork.run_pooled for text): `x` (N, L) is
        fed in batches of `batch_size`, and the sentences still running after exit k are pooled
        across consecutive batches before layer k+1 runs, so later layers run on full batches
        instead of ever smaller remnants (whole pending groups are taken, so a batch may run
        somewhat over `batch_size`; the remainders are flushed at the end). Pooled groups are padded
        to their longest sentence, so feed length-sorted input to keep the padding small.

        Each sentence takes the same exit, with the same logits (up to float rounding) and FLOPs,
        as under `run_dynamic`; results come back in input order. A sentence may wait for others
        before its later layers run: this is for offline or server-side throughput, `forward` for
        the latency of one batch."""
        check_batch_size(batch_size)
        policy = policy if policy is not None else self.policy
        if policy.needs_learned and not len(self.exit_predictors):
            raise ValueError(f"policy {policy.kind!r} needs learned exits, but this model has none")
        x, valid_all, lengths = self._prepare(x)  # checked once; each batch below is a slice
        N, K = x.shape[0], self.num_exits
        if N == 0:
            return self.run_dynamic(x, policy)
        out = self._empty_logits().new_empty(N, self.config.num_labels)
        exit_index = torch.empty(N, dtype=torch.long, device=x.device)
        # queues[k]: groups (hidden states, validity, lengths, input positions, policy state) that
        # wait for kept layer k; counts[k]: their sentences
        queues: list[list[tuple]] = [[] for _ in range(K)]
        counts = [0] * K

        def run_level(k: int, flush: bool) -> None:
            while counts[k] >= batch_size or (flush and counts[k] > 0):
                parts, n = pop_groups(queues[k], batch_size, rows=3)
                counts[k] -= n
                h, valid, lens, idx, state = parts[0] if len(parts) == 1 else _cat_groups(parts)
                i = self._kept[k]
                mask = self._mask(valid, h)
                h = self._layer(i, h, mask)
                logits = self.heads[i](h, None if mask is None else valid)
                if k == K - 1:
                    out.index_copy_(0, idx, logits)
                    exit_index.index_fill_(0, idx, k)
                    continue
                learned = self.exit_predictors[i](logits) if policy.needs_learned else None
                stop, state = policy.step(k, logits, state, learned)
                keep = write_exits(out, exit_index, idx, logits, stop, k)
                if keep.numel():
                    lens = lens.index_select(0, keep)
                    L = int(lens.max())  # re-trim to the longest survivor
                    group = (
                        h.index_select(0, keep)[:, :L],
                        valid.index_select(0, keep)[:, :L],
                        lens,
                        idx.index_select(0, keep),
                        {name: v.index_select(0, keep) for name, v in state.items()},
                    )
                    queues[k + 1].append(group)
                    counts[k + 1] += int(keep.numel())

        for start in range(0, N, batch_size):
            lens = lengths[start : start + batch_size]
            L = int(lens.max())  # trimmed to this batch's longest sentence
            xb, valid = x[start : start + batch_size, :L], valid_all[start : start + batch_size, :L]
            h = self.embeddings(input_ids=xb)  # (b, L, H)
            idx = torch.arange(start, start + xb.shape[0], device=x.device)
            queues[0].append((h, valid, lens, idx, policy.init_state(xb.shape[0], x.device)))
            counts[0] += xb.shape[0]
            for k in range(K):
                run_level(k, flush=False)
        for k in range(K):
            run_level(k, flush=True)
        flops = self.sample_flops(lengths, exit_index, learned=policy.needs_learned)
        return DynamicOutput(out, exit_index, flops, None, self._decisions(exit_index))

    def _decisions(self, exit_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """exit_layer: the (0-based) encoder layer after which each sample left."""
        return {"exit_layer": torch.tensor(self._kept, device=exit_index.device)[exit_index]}

    def _run_single(
        self, x: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, policy: ExitPolicy
    ) -> DynamicOutput:
        """Batch size 1: already trimmed to its own length (so no mask, as a rule) and no compaction."""
        state = policy.init_state(1, x.device)
        h = self.embeddings(input_ids=x)  # (1, L, H)
        mask = self._mask(valid, h)  # None unless a pad id sits inside the sentence
        K = self.num_exits
        for k, i in enumerate(self._kept):
            h = self._layer(i, h, mask)
            logits = self.heads[i](h, None if mask is None else valid)  # (1, C)
            if k < K - 1:
                learned = self.exit_predictors[i](logits) if policy.needs_learned else None
                stop, state = policy.step_single(k, logits, state, learned)
                if not stop:
                    continue
            exit_index = torch.tensor([k], device=x.device)
            # sample_flops by Python floats (the same float64 operations): no dozen tensor ops per sentence
            n = float(k + 1)
            cost = self._cost_upto(int(lengths[0]), n, min(n, K - 1.0), policy.needs_learned)
            flops = torch.tensor([cost], dtype=torch.float64, device=x.device)
            decisions = {"exit_layer": torch.tensor([i], device=x.device)}
            return DynamicOutput(logits, exit_index, flops, None, decisions)
        raise RuntimeError("unreachable: the last exit always stops")


def _cat_groups(parts: list[tuple]) -> tuple:
    """Concatenate pending groups of run_pooled, padding each to the longest: hidden states with
    zeros and validity with False (padded positions are masked out of attention and pooling)."""
    L = max(p[0].shape[1] for p in parts)
    hs, vs = [], []
    for h, valid, *_ in parts:
        pad = L - h.shape[1]
        hs.append(nn.functional.pad(h, (0, 0, 0, pad)) if pad else h)
        vs.append(nn.functional.pad(valid, (0, pad), value=False) if pad else valid)
    states = parts[0][4]
    return (
        torch.cat(hs),
        torch.cat(vs),
        torch.cat([p[2] for p in parts]),
        torch.cat([p[3] for p in parts]),
        {name: torch.cat([p[4][name] for p in parts]) for name in states},
    )
