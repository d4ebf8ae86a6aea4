"""Small runtimes for exported dynamic models: one graph per stage and per exit head (early exit),
per block and per gate (block skipping), per branch (routing), per expert (mixture of experts),
per recurrent step or ponder pass (skip-update, ACT and frame-skipping RNNs), per transformer block
piece (A-ViT halting), or one graph (dynamic parameters), the decisions applied between the graphs
in NumPy, each graph run on the rows (samples, tokens) that need it.

This file imports neither torch nor dynets (torch only for the `torch` backend, lazily), and the
exporter copies it into every exported directory as `dynets_runtime.py`, so an ONNX export runs
anywhere NumPy and onnxruntime do (which is why every family's runtime lives in this one file, past
the usual 400 lines):

    from dynets_runtime import load_runtime
    rt = load_runtime("exported/")   # the runtime of the export's kind (classes below)
    out = rt.run(x)            # x: (B, C, H, W) float32 (token ids for text, (B, T, F) for
                               # sequences); out["logits"],
                               # out["flops"] and the decisions (exit_index, blocks_run, ...)

Early exit (StagedRuntime), per batch, as the eager model does:
  1. run the block's stage graphs on the rows still active        h: list of (B_active, ...)
  2. run the exit head graph: logits (and the learned-exit score)  (B_active, C)
  3. the policy says who stops; their logits go to their input positions
  4. compact: keep only the survivors' rows of h and of the policy state
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------- policies, in NumPy
def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class NumpyPolicy:
    """The dynets exit policies (confidence, entropy, learned, patience, never) over NumPy arrays,
    built from `ExitPolicy.to_dict()` output."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.kind = spec.get("kind")
        if self.kind not in ("confidence", "entropy", "learned", "patience", "never"):
            raise ValueError(
                f"policy kind: expected confidence, entropy, learned, patience or never, got {self.kind!r}"
            )
        t = spec.get("threshold", 0.9)
        self.thresholds = [float(v) for v in (t if isinstance(t, list) else [t])]
        self.patience = int(spec.get("patience", 2))
        self.needs_learned = self.kind == "learned"

    def threshold_at(self, k: int) -> float:
        return self.thresholds[0] if len(self.thresholds) == 1 else self.thresholds[k]

    def init_state(self, n: int) -> dict[str, np.ndarray]:
        if self.kind == "patience":
            return {"prev": np.full(n, -1, dtype=np.int64), "count": np.zeros(n, dtype=np.int64)}
        return {}

    def step(
        self, k: int, logits: np.ndarray, state: dict, learned: np.ndarray | None
    ) -> tuple[np.ndarray, dict]:
        if self.kind == "confidence":
            return _softmax(logits).max(-1) >= self.threshold_at(k), state
        if self.kind == "entropy":
            p = _softmax(logits)
            h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1)
            return h <= self.threshold_at(k) * math.log(max(logits.shape[-1], 2)), state
        if self.kind == "learned":
            if learned is None:
                raise ValueError("learned policy: this export has no learned-exit scores")
            return learned >= self.threshold_at(k), state
        if self.kind == "patience":
            pred = logits.argmax(-1)
            count = np.where(pred == state["prev"], state["count"] + 1, 0)
            return count >= self.patience, {"prev": pred, "count": count}
        return np.zeros(logits.shape[0], dtype=bool), state


# ---------------------------------------------------------------------- backends
class _OnnxGraphs:
    def __init__(self, directory: Path, threads: int, providers: list[str] | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(f"the ONNX runtime needs onnxruntime ({e}): pip install onnxruntime") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between runs: the runtime calls many small graphs with Python in between,
        # and spinning ORT threads would take the cores from that code (and from anything beside it)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.ort, self.opts, self.dir = ort, opts, directory
        self.providers = providers or ["CPUExecutionProvider"]
        self.sessions: dict[str, Any] = {}

    def load(self, name: str, file: str) -> None:
        sess = self.ort.InferenceSession(str(self.dir / file), self.opts, providers=self.providers)
        self.sessions[name] = (sess, [i.name for i in sess.get_inputs()])

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        sess, names = self.sessions[name]  # inputs are named in0, in1, ...; unused ones were pruned
        return sess.run(None, {n: inputs[int(n[2:])] for n in names})


class _TorchGraphs:
    def __init__(self, directory: Path, threads: int) -> None:
        import torch

        self.torch, self.dir = torch, directory
        torch.set_num_threads(threads)
        self.modules: dict[str, Any] = {}

    def load(self, name: str, file: str) -> None:
        self.modules[name] = self.torch.export.load(str(self.dir / file)).module()

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            outs = self.modules[name](*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return [o.numpy() for o in outs]


# ---------------------------------------------------------------------- the runtimes
class _Runtime:
    """What every runtime shares: the manifest, the graph backend, the input check."""

    kind = ""

    def __init__(
        self, directory: str | Path, *, threads: int = 1, providers: list[str] | None = None
    ) -> None:
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: expected a directory written by `dynets export`")
        self.manifest = m = json.loads(path.read_text())
        kind = m.get("kind", "early_exit")
        if kind != self.kind:
            raise ValueError(
                f"{path}: this export is of kind {kind!r}; open it with load_runtime(), "
                f"not {type(self).__name__}"
            )
        self.format = m["format"]
        if self.format == "onnx":
            self.graphs: Any = _OnnxGraphs(self.dir, threads, providers)
        elif self.format == "torch":
            self.graphs = _TorchGraphs(self.dir, threads)
        else:
            raise ValueError(f"{path}: format {self.format!r} is not 'onnx' or 'torch'")
        for name, unit in m["units"].items():
            self.graphs.load(name, unit["file"])
        self.input_shape = tuple(m.get("input_shape") or ())  # () for token ids of any length
        self.num_classes = int(m["num_classes"])
        self._load(m)

    def _load(self, m: dict[str, Any]) -> None:
        """The kind's own manifest entries (subclasses)."""

    def _check(self, x: Any) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if tuple(x.shape[1:]) != self.input_shape or x.ndim != len(self.input_shape) + 1:
            raise ValueError(
                f"input: expected shape (B, {', '.join(map(str, self.input_shape))}), got {x.shape}"
            )
        if not np.isfinite(x).all():
            raise ValueError("input: expected finite values, got NaN or inf")
        return x

    def _check_ids(self, ids: Any) -> np.ndarray:
        """Token ids (B, L) of an integer dtype in [0, vocab_size), L >= 1, as int64."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu" or ids.ndim != 2:
            raise ValueError(
                f"input: expected token ids (B, L) of an integer dtype, got {ids.dtype} {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"input: expected token ids in [0, {self.vocab_size}), "
                f"got values in [{ids.min()}, {ids.max()}]"
            )
        if ids.shape[0] and ids.shape[1] == 0:
            raise ValueError("input: expected at least one token per sentence (L >= 1), got L = 0")
        return ids.astype(np.int64)

    def _no_policy(self, policy: Any) -> None:
        if policy:
            raise ValueError(
                f"this export ({self.manifest['architecture']}) has no run-time policy; got {policy!r}"
            )

    def _empty(self, **decisions: np.ndarray) -> dict[str, np.ndarray]:
        """The result of an empty batch: no logits, no FLOPs, the given (empty) decisions."""
        logits = np.zeros((0, self.num_classes), dtype=np.float32)
        return {"logits": logits, **decisions, "flops": np.zeros(0, dtype=np.float64)}

    def _rows(self, name: str, rows: np.ndarray, *inputs: np.ndarray) -> list[np.ndarray]:
        """Graph `name` on the rows `rows` (a bool mask) of each input only."""
        return self.graphs.run(name, [np.ascontiguousarray(a if rows.all() else a[rows]) for a in inputs])


def _token_lengths(ids: np.ndarray, pad: int) -> np.ndarray:
    """(B,) the last non-pad position + 1 of right-padded ids (B, L), at least 1."""
    pos = np.arange(1, ids.shape[1] + 1)
    return np.maximum(((ids != pad) * pos).max(1, initial=0), 1)


class StagedRuntime(_Runtime):
    """Runs an exported early-exit model dynamically; `policy` (a dict, or None for the policy
    saved at export) may be changed per call."""

    kind = "early_exit"

    def _load(self, m: dict[str, Any]) -> None:
        self.blocks = m["blocks"]
        self.exit_costs = np.asarray(m["exit_costs"], dtype=np.float64)
        self.exit_costs_learned = np.asarray(m["exit_costs_learned"], dtype=np.float64)
        self.policy = NumpyPolicy(m["policy"])

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C) in input order, exit_index (B,), flops (B,) for a batch x (B, *input_shape)."""
        pol = self.policy if policy is None else NumpyPolicy(policy)
        x = self._check(x)
        if pol.needs_learned and not all(b["learned"] for b in self.blocks[:-1]):
            raise ValueError("policy 'learned' needs learned-exit scores, but this export has none")
        B, K = x.shape[0], self.num_exits
        out = np.zeros((B, self.num_classes), dtype=np.float32)
        exit_index = np.full(B, K - 1, dtype=np.int64)
        costs = self.exit_costs_learned if pol.needs_learned else self.exit_costs
        if B == 0:
            return {"logits": out, "exit_index": exit_index, "flops": costs[exit_index]}
        idx = np.arange(B)  # input positions of the active rows
        state = pol.init_state(B)
        h = [x]
        for k, block in enumerate(self.blocks):
            for unit in block["units"]:  # 1. the stages, active rows only
                h = self.graphs.run(unit, h)
            head_out = self.graphs.run(block["head"], h)  # 2. logits (and learned score)
            logits = head_out[0]
            if k == K - 1:
                out[idx] = logits
                exit_index[idx] = k
                break
            learned = head_out[1] if (pol.needs_learned and len(head_out) > 1) else None
            stop, state = pol.step(k, logits, state, learned)  # 3. who stops here
            if stop.any():
                out[idx[stop]] = logits[stop]
                exit_index[idx[stop]] = k
                if stop.all():
                    break
                keep = ~stop  # 4. compaction
                idx = idx[keep]
                h = [np.ascontiguousarray(a[keep]) for a in h]
                state = {n: v[keep] for n, v in state.items()}
        return {"logits": out, "exit_index": exit_index, "flops": costs[exit_index]}


def _thresholds(spec: Any, n: int) -> list[float]:
    values = [spec] if isinstance(spec, (int, float)) else list(spec)
    if len(values) not in (1, n) or any(
        isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1 for t in values
    ):
        raise ValueError(f"skip threshold: expected a value in [0, 1] or {n} of them, got {spec!r}")
    return [float(values[0])] * n if len(values) == 1 else [float(t) for t in values]


class SkipRuntime(_Runtime):
    """Runs an exported block-skipping model (SkipNet): before each gated block its gate graph
    gives every sample's execute probability, and the block's graph runs on the executing rows
    only (the others keep their features). `policy`: {"threshold": t or [t per gate]}."""

    kind = "skip"

    def _load(self, m: dict[str, Any]) -> None:
        self.program = m["program"]  # [{"block": name, "gate": name | None}] in order
        self.gated_costs = np.asarray(m["gated_costs"], dtype=np.float64)
        self.min_cost = float(m["min_cost"])
        self.policy = m["policy"]

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), blocks_run (B, n_gated) bool, flops (B,) for a batch x (B, *input_shape)."""
        G = len(self.gated_costs)
        thr = _thresholds((policy or self.policy).get("threshold", 0.5), G)
        x = self._check(x)
        B = x.shape[0]
        blocks_run = np.zeros((B, G), dtype=bool)
        if B == 0:
            return {
                "logits": np.zeros((0, self.num_classes), dtype=np.float32),
                "blocks_run": blocks_run,
                "flops": np.zeros(0, dtype=np.float64),
            }
        h = self.graphs.run("stem", [x])[0]
        gi = 0
        for step in self.program:
            if step["gate"] is None:
                h = self.graphs.run(step["block"], [h])[0]
                continue
            p = self.graphs.run(step["gate"], [h])[0]  # 1. (B,) execute probability
            run = p >= thr[gi]  # 2. who runs this block
            blocks_run[:, gi] = run
            if run.all():
                h = self.graphs.run(step["block"], [h])[0]
            elif run.any():  # 3. the executing rows only; the others keep h
                h = np.array(h)
                h[run] = self.graphs.run(step["block"], [np.ascontiguousarray(h[run])])[0]
            gi += 1
        logits = self.graphs.run("head", [h])[0]
        flops = self.min_cost + blocks_run @ self.gated_costs
        return {"logits": logits, "blocks_run": blocks_run, "flops": flops}


class RouteRuntime(_Runtime):
    """Runs an exported routed model: the trunk, then the router's gate picks a branch per sample
    (argmax of gate logits + cost bias), and each branch graph runs on its own rows only.
    `policy`: {"penalty": p} shifts routing toward the cheap branch (p > 0), as
    `set_cost_penalty` does in the eager model."""

    kind = "route"

    def _load(self, m: dict[str, Any]) -> None:
        self.branches = m["branches"]
        self.branch_costs = np.asarray(m["branch_costs"], dtype=np.float64)  # per route, trunk included
        self.relative_costs = np.asarray(m["relative_costs"], dtype=np.float32)
        self.route_bias = np.asarray(m["route_bias"], dtype=np.float32)

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), branch (B,), flops (B,) for a batch x (B, *input_shape)."""
        bias = self.route_bias
        if policy is not None and "penalty" in policy:
            p = policy["penalty"]
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
                raise ValueError(f"penalty: expected a finite number, got {p!r}")
            bias = (-float(p) * self.relative_costs).astype(np.float32)
        x = self._check(x)
        B = x.shape[0]
        out = np.zeros((B, self.num_classes), dtype=np.float32)
        if B == 0:
            return {"logits": out, "branch": np.zeros(0, dtype=np.int64), "flops": np.zeros(0)}
        h = self.graphs.run("trunk", [x])[0]
        branch = (self.graphs.run("gate", [h])[0] + bias).argmax(-1)  # 1. one branch per sample
        for k, name in enumerate(self.branches):
            rows = branch == k  # 2. branch k's rows only
            if rows.all():
                out = self.graphs.run(name, [h])[0]
            elif rows.any():
                out[rows] = self.graphs.run(name, [np.ascontiguousarray(h[rows])])[0]
        return {"logits": out, "branch": branch.astype(np.int64), "flops": self.branch_costs[branch]}


class WidthRuntime(_Runtime):
    """Runs an exported slimmable network: every sample at the smallest width first; those whose
    confidence is below the thresholds re-run at the width the policy picks, each width on its own
    rows only. `policy`: {"thresholds": [t] or [t per width but the last]}."""

    kind = "width"

    def _load(self, m: dict[str, Any]) -> None:
        self.width_mults = np.asarray(m["width_mults"], dtype=np.float64)
        self.width_costs = np.asarray(m["width_costs"], dtype=np.float64)
        self.policy = m["policy"]

    def choose(self, confidence: np.ndarray, thresholds: list[float]) -> np.ndarray:
        K = len(self.width_mults)
        if len(thresholds) not in (1, K - 1) or any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1 for t in thresholds
        ):
            raise ValueError(f"width policy: expected 1 or {K - 1} thresholds in [0, 1], got {thresholds!r}")
        out = np.full(confidence.shape, K - 1, dtype=np.int64)
        for k in reversed(range(min(len(thresholds), K - 1))):  # the first match wins
            out = np.where(confidence >= thresholds[k], k, out)
        return out

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), width (B,), width_index (B,), flops (B,) for a batch x (B, *input_shape)."""
        t = (policy or self.policy).get("thresholds", [0.9])
        thresholds = [t] if isinstance(t, (int, float)) else list(t)
        x = self._check(x)
        B = x.shape[0]
        if B == 0:
            return {
                "logits": np.zeros((0, self.num_classes), dtype=np.float32),
                "width": np.zeros(0),
                "width_index": np.zeros(0, dtype=np.int64),
                "flops": np.zeros(0),
            }
        logits, conf = self.graphs.run("width_0", [x])  # 1. everyone at the smallest width
        index = self.choose(conf, thresholds)  # 2. a width per sample
        logits = np.array(logits)
        for k in range(1, len(self.width_mults)):  # 3. each wider width on its own rows
            rows = index == k
            if rows.any():
                logits[rows] = self.graphs.run(f"width_{k}", [np.ascontiguousarray(x[rows])])[0]
        flops = self.width_costs[0] + np.where(index > 0, self.width_costs[index], 0.0)
        return {"logits": logits, "width": self.width_mults[index], "width_index": index, "flops": flops}


class _SequenceRuntime(_Runtime):
    """What the recurrent runtimes share: x (B, T, F) with optional lengths (B,), a state
    (B, R, H) carried between the "step" graph calls, the classifier graph "head"."""

    def _load(self, m: dict[str, Any]) -> None:
        self.input_size, self.state_shape = int(m["input_size"]), tuple(m["state_shape"])
        self.head_cost = float(m["head_cost"])
        self.policy = m.get("policy", {})

    def _sequences(self, x: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
        """The checked x (B, T, F) float32, lengths (B,) int64 or None, a zero state, the steps to run."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"x: expected shape (B, T, F={self.input_size}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("input: expected finite values, got NaN or inf")
        B, T, _ = x.shape
        if lengths is not None:
            lengths = np.asarray(lengths, dtype=np.int64)
            if lengths.shape != (B,) or (lengths < 1).any() or (lengths > T).any():
                raise ValueError(f"lengths: expected (B,) = ({B},) values in [1, {T}], got {lengths!r}")
        steps = 0 if B == 0 else T if lengths is None else int(lengths.max())
        return x, lengths, np.zeros((B, *self.state_shape), dtype=np.float32), steps

    @staticmethod
    def _valid(t: int, lengths: np.ndarray | None, B: int) -> np.ndarray:
        """(B,) bool: the rows whose sequence has a step t."""
        return np.ones(B, dtype=bool) if lengths is None else t < lengths

    def _events(self, x: np.ndarray, lengths: np.ndarray | None, state: np.ndarray, decide) -> np.ndarray:
        """Event-driven rounds, as the eager models' executor (dynets.temporal.base.run_events): each
        round runs the step graph once, on every live row at its own next step; decide(out, rows, t)
        -> (n,) int64, the steps from each row's step t to its next one (past its length ends the
        row). `state` (B, R, H) is updated in place; returns the steps computed, (B, T) bool."""
        B, T, _ = x.shape
        end = np.full(B, T, dtype=np.int64) if lengths is None else lengths
        computed = np.zeros((B, T), dtype=bool)
        rows, t = np.arange(B), np.zeros(B, dtype=np.int64)  # every row computes step 0
        while rows.size:
            computed[rows, t] = True
            out = self.graphs.run(
                "step", [np.ascontiguousarray(x[rows, t]), np.ascontiguousarray(state[rows])]
            )
            state[rows] = out[0]
            t = t + decide(out, rows, t)
            keep = t < end[rows]
            rows, t = rows[keep], t[keep]
        return computed


class SkipRNNRuntime(_SequenceRuntime):
    """Runs an exported Skip-RNN on x (B, T, F) (optionally with lengths (B,)) event-driven, as the
    eager model: each round runs the step graph on every live row at its own next update; a row that
    updates at step t with Δũ is next due at t + ceil(threshold / Δũ), the first step at which its
    accumulated ũ reaches the threshold (SkipRNN.sleep_steps). `policy`: {"threshold": t}."""

    kind = "skip_rnn"

    def run(
        self, x: np.ndarray, policy: dict[str, Any] | None = None, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """logits (B, C), updated (B, T) bool, num_updates (B,), flops (B,)."""
        thr = (policy or self.policy).get("threshold", 0.5)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
            raise ValueError(f"threshold: expected a value in [0, 1], got {thr!r}")
        x, lengths, state, _ = self._sequences(x, lengths)
        B, T, _ = x.shape
        updated = np.zeros((B, T), dtype=bool)
        if B == 0:
            return self._empty(updated=updated, num_updates=np.zeros(0))

        def decide(out, rows, t):  # next update: as SkipRNN.sleep_steps
            d = np.asarray(out[1], dtype=np.float64).reshape(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                k = np.clip(np.nan_to_num(np.ceil(thr / d), nan=1.0), 1, T)  # 0 / 0 (threshold 0): 1
            return (k + (k * d < thr)).astype(np.int64)

        updated = self._events(x, lengths, state, decide)
        n = updated.sum(1)
        flops = n * float(self.manifest["update_cost"]) + self.head_cost
        logits = self.graphs.run("head", [state])[0]
        return {"logits": logits, "updated": updated, "num_updates": n, "flops": flops}


class ACTRuntime(_SequenceRuntime):
    """Runs an exported ACT RNN on x (B, T, F) (optionally with lengths (B,)): at each step the
    ponder-pass graph runs pass after pass on the rows still pondering only; a row leaves the loop
    at the pass where its halting sum reaches 1 - epsilon (or at max_ponder) and its ACT-weighted
    state is written back, as the eager executor does. No run-time knob."""

    kind = "act_rnn"

    def run(
        self, x: np.ndarray, policy: dict[str, Any] | None = None, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """logits (B, C), ponder (B, T) passes per step (0 on padding), flops (B,)."""
        self._no_policy(policy)
        x, lengths, state, steps = self._sequences(x, lengths)
        B, T, _ = x.shape
        ponder = np.zeros((B, T), dtype=np.int64)
        if B == 0:
            return self._empty(ponder=ponder)
        N, limit = int(self.manifest["max_ponder"]), np.float32(1 - self.manifest["epsilon"])
        for t in range(steps):
            rows = np.flatnonzero(self._valid(t, lengths, B))  # input positions still pondering
            xt = x[rows, t]
            first = np.concatenate([xt, np.ones((rows.size, 1), np.float32)], 1)  # first-pass flag
            rest = np.concatenate([xt, np.zeros((rows.size, 1), np.float32)], 1)
            s, cum = state[rows], np.zeros(rows.size, dtype=np.float32)
            acc = np.zeros_like(s)
            for n in range(1, N + 1):
                s, h = self.graphs.run("step", [first if n == 1 else rest, s])  # 1. one pass
                stop = (cum + h >= limit) | (n == N)  # 2. who halts at this pass
                acc += np.where(stop, np.float32(1) - cum, h)[:, None, None] * s
                state[rows[stop]], ponder[rows[stop], t] = acc[stop], n  # 3. write back the halted
                if stop.all():
                    break
                keep = ~stop  # 4. compaction: the others ponder on
                rows, s, acc, cum, h, rest = rows[keep], s[keep], acc[keep], cum[keep], h[keep], rest[keep]
                cum = cum + h
        flops = ponder.sum(1) * float(self.manifest["pass_cost"]) + self.head_cost
        return {"logits": self.graphs.run("head", [state])[0], "ponder": ponder, "flops": flops}


def _confidence(spec: dict[str, Any]) -> float | None:
    fixed = sorted(k for k in spec if k in ("skip_bias", "skip_cap"))
    if fixed:
        raise ValueError(
            f"policy: {fixed} are fixed in the exported read graph (set them on the model before export); "
            f"expected only 'stop_confidence', got {sorted(spec)}"
        )
    c = spec.get("stop_confidence")
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1):
        raise ValueError(f"stop_confidence: expected None or a number in (0, 1], got {c!r}")
    return c


class FrameSkipRuntime(_SequenceRuntime):
    """Runs an exported frame-skipping RNN on x (B, T, F) (optionally with lengths (B,)) event-driven,
    as the eager model: each round runs the read graph (cell + skip length) on every live row at its
    own next frame. With a stop confidence the classifier also runs on the reading rows and a row
    that is sure enough stops reading for good. `policy`: {"stop_confidence": c or None}."""

    kind = "frame_skip"

    def run(
        self, x: np.ndarray, policy: dict[str, Any] | None = None, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """logits (B, C), read (B, T) bool, num_reads (B,), stop_step (B,) (-1: no early stop), flops."""
        conf = _confidence(self.policy if policy is None else policy)
        x, lengths, state, _ = self._sequences(x, lengths)
        B, T, _ = x.shape
        read, stop = np.zeros((B, T), dtype=bool), np.full(B, -1, dtype=np.int64)
        if B == 0:
            return self._empty(read=read, num_reads=np.zeros(0, dtype=np.int64), stop_step=stop)
        logits = np.zeros((B, self.num_classes), dtype=np.float32)

        def decide(out, rows, t):  # read the frame after the skipped ones; a sure row stops for good
            k = 1 + np.asarray(out[1], dtype=np.int64).reshape(-1)
            if conf is not None:
                lg, sure = self.graphs.run("head", [out[0]])
                done = sure >= np.float32(conf)
                logits[rows[done]], stop[rows[done]], k[done] = lg[done], t[done], T
            return k

        read = self._events(x, lengths, state, decide)
        rest = stop < 0  # the rows that read to the end
        if rest.any():
            logits[rest] = self._rows("head", rest, state)[0]
        n = read.sum(1)
        per_read = float(self.manifest["read_cost"]) + (self.head_cost if conf is not None else 0.0)
        flops = n * per_read + (stop < 0) * self.head_cost
        return {"logits": logits, "read": read, "num_reads": n, "stop_step": stop, "flops": flops}


class GlanceRuntime(_Runtime):
    """Runs an exported glance-and-focus model: every image is glanced at (downsampled); the
    policy (as for early exit, exit 0) keeps the sure ones, and only the others run the focus graph
    (patch choice, crop, focus CNN). `policy`: an exit-policy dict, or None for the saved one."""

    kind = "glance"

    def _load(self, m: dict[str, Any]) -> None:
        self.exit_costs = np.asarray(m["exit_costs"], dtype=np.float64)
        self.positions = np.asarray(m["positions"], dtype=np.int64)
        self.policy = NumpyPolicy(m["policy"])

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), exit_index (B,), focused (B,), patch (B, 2) (-1: not focused), flops (B,)."""
        pol = self.policy if policy is None else NumpyPolicy(policy)
        if pol.needs_learned:
            raise ValueError(f"policy {pol.kind!r} needs learned exits, but glance_focus has none")
        x = self._check(x)
        B = x.shape[0]
        patch = np.full((B, 2), -1, dtype=np.int64)
        if B == 0:
            z = np.zeros(0, dtype=np.int64)
            empty = np.zeros((0, self.num_classes), dtype=np.float32)
            return {
                "logits": empty,
                "exit_index": z,
                "focused": z.astype(bool),
                "patch": patch,
                "flops": np.zeros(0),
            }
        g, logits = self.graphs.run("glance", [x])  # 1. glance at everyone
        stop, _ = pol.step(0, logits, pol.init_state(B), None)
        focused = ~stop
        if focused.any():  # 2. only the unsure ones: choose a patch, crop it, focus
            f_logits, choice = self.graphs.run(
                "focus", [np.ascontiguousarray(x[focused]), np.ascontiguousarray(g[focused])]
            )
            logits = np.array(logits)
            logits[focused] = f_logits
            patch[focused] = self.positions[choice]
        exit_index = focused.astype(np.int64)
        return {
            "logits": logits,
            "exit_index": exit_index,
            "focused": focused,
            "patch": patch,
            "flops": self.exit_costs[exit_index],
        }


class MoERuntime(_Runtime):
    """Runs an exported mixture-of-experts transformer on token ids (B, T) (right-padded with the pad
    id) or features (B, T, F). The batch is trimmed to its longest sequence; each block's attention
    runs on the (B, L) grid, its FFN on the valid tokens only. In an MoE block the router graph
    gives each token's top-k experts and gates, and as the eager model in eval:
      1. plan:     the k*N assignments, first choices before second ones, are stably sorted by
                   expert; each expert keeps its first ceil(factor * k * N / E) (N: the batch's
                   valid tokens; all of them when dropless), the rest are dropped
      2. dispatch: each expert graph runs on its own tokens only
      3. combine:  the outputs, scaled by the gates, are added back in token order
    No run-time knob."""

    kind = "moe"

    def _load(self, m: dict[str, Any]) -> None:
        self.moe_layers, self.costs = m["moe_layers"], m["costs"]
        self.num_experts, self.k, self.capacity_factor = m["num_experts"], m["k"], m["capacity_factor"]
        self.vocab_size, self.pad, self.input_size = m["vocab_size"], m["pad_token_id"], m["input_size"]

    def capacity(self, n: int) -> int | None:
        """Slots per expert for n tokens (None: dropless), as `MoEConfig.capacity` in eval."""
        cf = self.capacity_factor
        return None if cf is None else min(n, math.ceil(cf * self.k * n / self.num_experts))

    def _inputs(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """The checked input trimmed to its longest sequence, and the lengths (B,)."""
        if self.vocab_size:
            x = self._check_ids(x)
            lengths = _token_lengths(x, self.pad)
        else:
            x = np.asarray(x, dtype=np.float32)
            if x.ndim != 3 or x.shape[2] != self.input_size or (x.shape[0] and x.shape[1] == 0):
                raise ValueError(f"input: expected features (B, T >= 1, {self.input_size}), got {x.shape}")
            if not np.isfinite(x).all():
                raise ValueError("input: expected finite values, got NaN or inf")
            lengths = np.full(x.shape[0], x.shape[1], dtype=np.int64)
        return np.ascontiguousarray(x[:, : lengths.max(initial=0)]), lengths

    def _experts(self, i: int, z: np.ndarray, index: np.ndarray, gates: np.ndarray) -> tuple[np.ndarray, ...]:
        """Steps 1-3 for the tokens z (N, d) of MoE block i: (output (N, d), kept (N, k) bool)."""
        N, k = index.shape
        flat = index.T.reshape(-1)  # (k*N,) choice-major: priority to first choices
        order = np.argsort(flat, kind="stable")  # assignment ids, expert-contiguous
        counts = np.bincount(flat, minlength=self.num_experts)  # (E,)
        cap = self.capacity(N)
        if cap is not None and cap < N:  # each expert keeps its first `cap` assignments
            rank = np.arange(order.size) - (np.cumsum(counts) - counts)[flat[order]]
            order, counts = order[rank < cap], np.minimum(counts, cap)
        token, gate = order % N, gates.T.reshape(-1)[order]
        xs, ys = z[token], np.empty((order.size, z.shape[1]), dtype=np.float32)
        ends = np.cumsum(counts)
        for e in np.flatnonzero(counts):  # each expert on its own tokens only
            sl = slice(ends[e] - counts[e], ends[e])
            ys[sl] = self.graphs.run(f"expert_{i}_{e}", [np.ascontiguousarray(xs[sl])])[0]
        out = np.zeros_like(z)
        np.add.at(out, token, ys * gate[:, None])
        kept = np.zeros(k * N, dtype=bool)
        kept[order] = True
        return out, kept.reshape(k, N).T

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), expert (B, T, k) (B, n_moe, T, k with several MoE blocks; -1 for padding
        and dropped assignments), dropped (B,) assignments, flops (B,)."""
        self._no_policy(policy)
        T_in = np.shape(x)[1] if np.ndim(x) >= 2 else 0
        x, lengths = self._inputs(x)
        B, k, n_moe = x.shape[0], self.k, sum(self.moe_layers)
        lead = (B, n_moe) if n_moe > 1 else (B,)
        decisions = {"expert": np.full((*lead, T_in, k), -1), "dropped": np.zeros(B, np.int64)}
        if B == 0:
            return self._empty(**(decisions if n_moe else {}))
        L = x.shape[1]
        valid = np.arange(L)[None, :] < lengths[:, None]  # (B, L)
        tokens = np.flatnonzero(valid)  # (N,) valid positions in the flat (B*L) grid
        sample = tokens // L
        ran, grids = np.zeros(B), []
        h = self.graphs.run("embed", [x])[0]
        for i, moe in enumerate(self.moe_layers):
            h = np.array(self.graphs.run(f"attn_{i}", [h, valid])[0])  # (B, L, d)
            flat = h.reshape(B * L, -1)
            z = flat[tokens]
            if moe:
                zn, index, gates = self.graphs.run(f"router_{i}", [z])
                f, kept = self._experts(i, zn, index, gates)
                grid = np.full((B * L, k), -1, dtype=np.int64)
                grid[tokens] = np.where(kept, index, -1)
                grids.append(grid.reshape(B, L, k))
                ran += np.bincount(sample, kept.sum(1), minlength=B)
                decisions["dropped"] += np.bincount(sample, (~kept).sum(1), minlength=B).astype(np.int64)
            else:
                f = self.graphs.run(f"ffn_{i}", [z])[0]
            flat[tokens] += f
        logits = self.graphs.run("head", [h, valid])[0]
        if n_moe:
            grid = grids[0] if n_moe == 1 else np.stack(grids, 1)
            decisions["expert"][..., :L, :] = grid
        c = self.costs
        n_layers = len(self.moe_layers)
        flops = n_layers * _length_cost(c["attention"], lengths) + lengths.astype(np.float64) * c["per_token"]
        flops = flops + ran * c["expert"] + c["head"]
        return {"logits": logits, **(decisions if n_moe else {}), "flops": flops}


class HaltingViTRuntime(_Runtime):
    """Runs an exported A-ViT (per-token halting) packed, as the eager executor does: the active
    tokens of all samples sit in one (T_active, D) array; per block
      1. the qkv graph runs on the active tokens only
      2. qkv is laid out per live sample (L = its largest active count, padding masked out as keys)
         for the attention-core graph, and gathered back
      3. the rest of the block (projection, MLP) and the halting scores on the active tokens
      4. a token halts when its summed score reaches the threshold; a sample whose class token
         halts is finished (its ACT-weighted class token goes to the head); halted tokens leave
    `policy`: {"threshold": t in (0, 1]}."""

    kind = "halting_vit"

    def _load(self, m: dict[str, Any]) -> None:
        self.depth, self.dim, self.tokens = m["depth"], m["dim"], m["tokens"]
        self.block_costs = np.asarray(m["block_costs"], dtype=np.float64)  # (tokens + 1,) per count
        self.policy = m["policy"]

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), depth (B, tokens) blocks each token ran (class token first), flops (B,)."""
        thr = (policy or self.policy).get("threshold", 0.99)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 < thr <= 1:
            raise ValueError(f"threshold: expected a number in (0, 1], got {thr!r}")
        x = self._check(x)
        B, T, D = x.shape[0], self.tokens, self.dim
        depth = np.zeros((B, T), dtype=np.int64)
        if B == 0:
            return self._empty(depth=depth)
        xp = self.graphs.run("embed", [x])[0].reshape(B * T, D)
        sample, tok = np.repeat(np.arange(B), T), np.tile(np.arange(T), B)  # of each packed token
        cum, rem = np.zeros(B * T, np.float32), np.ones(B * T, np.float32)
        out_cls = np.zeros((B, D), dtype=np.float32)
        flops = np.full(B, float(self.manifest["base_cost"]))
        live, lut = np.arange(B), np.zeros(B, dtype=np.int64)  # samples still running
        for i in range(self.depth):
            lut[live] = np.arange(live.size)
            sid = lut[sample]  # live index of each packed token (they are sample-major)
            counts = np.bincount(sid, minlength=live.size)
            pos = np.arange(sid.size) - (np.cumsum(counts) - counts)[sid]
            flops[live] += self.block_costs[counts]
            depth[sample, tok] += 1
            qkv = self.graphs.run(f"qkv_{i}", [xp])[0]  # 1. (T_active, 3D)
            n, L = live.size, int(counts.max())
            if (counts == L).all():  # 2. per sample, no padding needed
                grid, valid = qkv.reshape(n, L, 3 * D), np.ones((n, L), dtype=bool)
            else:
                grid = np.zeros((n, L, 3 * D), dtype=np.float32)
                grid[sid, pos] = qkv
                valid = np.arange(L)[None, :] < counts[:, None]
            o = self.graphs.run(f"attn_{i}", [grid, valid])[0][sid, pos]
            xp, h = self.graphs.run(f"rest_{i}", [xp, o])  # 3.
            halt = cum + h >= np.float32(thr)  # 4.
            cls = np.flatnonzero(tok == 0)
            out_cls[sample[cls]] += np.where(halt, rem, h)[cls, None] * xp[cls]
            done = np.zeros(B, dtype=bool)
            done[sample[cls[halt[cls]]]] = True
            keep = ~(halt | done[sample])
            if not keep.any():
                break
            xp, sample, tok = np.ascontiguousarray(xp[keep]), sample[keep], tok[keep]
            cum, rem = (cum + h)[keep], (rem - h)[keep]
            live = live[~done[live]]
        return {"logits": self.graphs.run("head", [out_cls])[0], "depth": depth, "flops": flops}


class SingleRuntime(_Runtime):
    """Runs an exported model whose input-dependence lives inside one static-shape graph
    (dynamic convolution's per-sample kernel mixture, a hypernetwork's per-sample weights,
    DynamicViT's per-sample kept tokens at a fixed keep ratio, ToMe merging at a fixed count)."""

    kind = "single"

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), flops (B,) and the graph's decisions (e.g. kept_idx_s) for a batch x;
        the setting is the one exported (no run-time knob)."""
        self._no_policy(policy)
        x = self._check(x)
        names = self.manifest.get("outputs", ["logits"])
        flops = float(self.manifest.get("flops", self.manifest["full_cost"]))
        if x.shape[0] == 0:
            out = {"logits": np.zeros((0, self.num_classes), dtype=np.float32)}
            out.update({n: np.zeros((0, 0), dtype=np.int64) for n in names[1:]})
            return {**out, "flops": np.zeros(0)}
        out = dict(zip(names, self.graphs.run("model", [x])))
        return {**out, "flops": np.full(x.shape[0], flops)}


def _length_cost(coef: list[float], lengths: np.ndarray) -> np.ndarray:
    """c + a*L + b*L^2 in float64, as `LengthCost` computes it."""
    L = lengths.astype(np.float64)
    return coef[0] + coef[1] * L + coef[2] * L * L


class TextRuntime(_Runtime):
    """Runs an exported Dynamic BERT on token ids (B, L) int64, right-padded with the pad id (any
    BERT tokenizer's `input_ids`): sentences that exit leave the batch, and the padding is trimmed
    to the longest sentence still running, as the eager model does. `policy` as for early exit."""

    kind = "text"

    def _load(self, m: dict[str, Any]) -> None:
        self.blocks, self.costs = m["blocks"], m["costs"]
        self.pad, self.vocab_size, self.max_positions = m["pad_token_id"], m["vocab_size"], m["max_positions"]
        self.labels = m["labels"]
        self.policy = NumpyPolicy(m["policy"])

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def exit_costs(self, lengths: np.ndarray, learned: bool) -> np.ndarray:
        """(B, K) FLOPs of leaving at each exit (embeddings, then one layer and head per exit)."""
        c, K = self.costs, self.num_exits
        n = np.arange(1, K + 1, dtype=np.float64)
        per = _length_cost(c["layer"], lengths)[:, None] + _length_cost(c["head"], lengths)[:, None]
        cost = _length_cost(c["embeddings"], lengths)[:, None] + n * per
        if learned:
            cost = cost + np.minimum(n, K - 1) * c["predictor"]
        return cost

    def run(self, ids: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), exit_index (B,), exit_layer (B,), flops (B,) for token ids (B, L)."""
        pol = self.policy if policy is None else NumpyPolicy(policy)
        ids = self._check_ids(ids)
        if pol.needs_learned and not all(b["learned"] for b in self.blocks[:-1]):
            raise ValueError("policy 'learned' needs learned-exit scores, but this export has none")
        B, K = ids.shape[0], self.num_exits
        out = np.zeros((B, self.num_classes), dtype=np.float32)
        exit_index = np.full(B, K - 1, dtype=np.int64)
        layers = np.asarray([b["layer"] for b in self.blocks], dtype=np.int64)
        if B == 0:
            empty = np.zeros(0, dtype=np.float64)
            return {"logits": out, "exit_index": exit_index, "exit_layer": exit_index, "flops": empty}
        lengths = _token_lengths(ids, self.pad)
        if lengths.max() > self.max_positions:
            raise ValueError(
                f"input: expected at most {self.max_positions} tokens (the encoder's positions), "
                f"got {lengths.max()}"
            )
        ids = np.ascontiguousarray(ids[:, : lengths.max()])
        valid = ids != self.pad
        valid[:, 0] = True
        idx, lens, state = np.arange(B), lengths, pol.init_state(B)
        h = self.graphs.run("embeddings", [ids])[0]
        for k, block in enumerate(self.blocks):
            h = self.graphs.run(f"layer_{block['layer']}", [h, valid])[0]  # 1. the active rows
            head_out = self.graphs.run(f"head_{block['layer']}", [h, valid])  # 2. logits
            logits = head_out[0]
            if k == K - 1:
                out[idx], exit_index[idx] = logits, k
                break
            learned = head_out[1] if (pol.needs_learned and len(head_out) > 1) else None
            stop, state = pol.step(k, logits, state, learned)  # 3. who stops here
            if stop.any():
                out[idx[stop]], exit_index[idx[stop]] = logits[stop], k
                if stop.all():
                    break
                keep = ~stop  # 4. compaction, then the padding trimmed to the longest survivor
                idx, lens = idx[keep], lens[keep]
                L = int(lens.max())
                h = np.ascontiguousarray(h[keep][:, :L])
                valid = np.ascontiguousarray(valid[keep][:, :L])
                state = {n: v[keep] for n, v in state.items()}
        flops = self.exit_costs(lengths, pol.needs_learned)[np.arange(B), exit_index]
        return {"logits": out, "exit_index": exit_index, "exit_layer": layers[exit_index], "flops": flops}


RUNTIMES = {
    r.kind: r
    for r in (
        StagedRuntime,
        SkipRuntime,
        RouteRuntime,
        WidthRuntime,
        SingleRuntime,
        TextRuntime,
        SkipRNNRuntime,
        GlanceRuntime,
        ACTRuntime,
        FrameSkipRuntime,
        MoERuntime,
        HaltingViTRuntime,
    )
}


def load_runtime(directory: str | Path, **kw: Any) -> _Runtime:
    """The runtime for whatever kind of export `directory` holds."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected a directory written by `dynets export`")
    kind = json.loads(path.read_text()).get("kind", "early_exit")
    if kind not in RUNTIMES:
        raise ValueError(f"{path}: kind {kind!r} is not one of {sorted(RUNTIMES)}")
    return RUNTIMES[kind](directory, **kw)


def main() -> None:  # `python dynets_runtime.py DIR` runs a random batch: a smoke test of an export
    import sys

    rt = load_runtime(sys.argv[1])
    rng = np.random.default_rng(0)
    if getattr(rt, "vocab_size", 0):  # token ids
        x = rng.integers(1, rt.vocab_size, (4, 12))
    else:
        x = rng.random((4, *rt.input_shape), dtype=np.float32)
    r = rt.run(x)
    print({k: v.tolist() for k, v in r.items() if k != "logits"})


if __name__ == "__main__":
    main()
