"""Small runtimes for exported dynamic models: one graph per stage and per exit head (early exit),
per block and per gate (block skipping), per branch (routing), or one graph (dynamic parameters),
the decisions applied between the graphs in NumPy, each graph run on the rows that need it.

This file imports neither torch nor dynets (torch only for the `torch` backend, lazily), and the
exporter copies it into every exported directory as `dynets_runtime.py`, so an ONNX export runs
anywhere NumPy and onnxruntime do:

    from dynets_runtime import load_runtime
    rt = load_runtime("exported/")   # the runtime of the export's kind (classes below)
    out = rt.run(x)            # x: (B, C, H, W) float32 (token ids for text); out["logits"],
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


class SkipRNNRuntime(_Runtime):
    """Runs an exported Skip-RNN on x (B, T, F) (optionally with lengths (B,)): at each step only
    the rows whose accumulated update probability ũ reaches the threshold run the step graph; the
    others add their last Δũ, as the eager model does. `policy`: {"threshold": t}."""

    kind = "skip_rnn"

    def _load(self, m: dict[str, Any]) -> None:
        self.input_size, self.state_shape = int(m["input_size"]), tuple(m["state_shape"])
        self.policy = m["policy"]

    def run(
        self, x: np.ndarray, policy: dict[str, Any] | None = None, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """logits (B, C), updated (B, T) bool, num_updates (B,), flops (B,)."""
        thr = (policy or self.policy).get("threshold", 0.5)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
            raise ValueError(f"threshold: expected a value in [0, 1], got {thr!r}")
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
        updated = np.zeros((B, T), dtype=bool)
        if B == 0:
            z = np.zeros(0)
            return {
                "logits": np.zeros((0, self.num_classes), np.float32),
                "updated": updated,
                "num_updates": z,
                "flops": z,
            }
        steps = T if lengths is None else int(lengths.max())
        state = np.zeros((B, *self.state_shape), dtype=np.float32)
        ut, delta = np.ones(B, dtype=np.float32), np.zeros(B, dtype=np.float32)
        thr32 = np.float32(thr)
        for t in range(steps):
            upd = ut >= thr32 if lengths is None else (ut >= thr32) & (t < lengths)  # who updates at t
            if upd.all():
                state, delta = self.graphs.run("step", [np.ascontiguousarray(x[:, t]), state])
            elif upd.any():  # the updating rows only
                new, d = self.graphs.run("step", [np.ascontiguousarray(x[upd, t]), state[upd]])
                state, delta = np.array(state), np.array(delta)
                state[upd], delta[upd] = new, d
            ut = np.where(upd, delta, np.minimum(ut + delta, np.float32(1.0)))
            updated[:, t] = upd
        n = updated.sum(1)
        flops = n * float(self.manifest["update_cost"]) + float(self.manifest["head_cost"])
        logits = self.graphs.run("head", [state])[0]
        return {"logits": logits, "updated": updated, "num_updates": n, "flops": flops}


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


class SingleRuntime(_Runtime):
    """Runs an exported model whose input-dependence lives inside one static-shape graph
    (dynamic convolution's per-sample kernel mixture, a hypernetwork's per-sample weights,
    DynamicViT's per-sample kept tokens at a fixed keep ratio, ToMe merging at a fixed count)."""

    kind = "single"

    def run(self, x: np.ndarray, policy: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """logits (B, C), flops (B,) and the graph's decisions (e.g. kept_idx_s) for a batch x;
        the setting is the one exported (no run-time knob)."""
        if policy:
            raise ValueError(
                f"this export ({self.manifest['architecture']}) has no run-time policy; got {policy!r}"
            )
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

    def _check_ids(self, ids: Any) -> np.ndarray:
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
        pos = np.arange(1, ids.shape[1] + 1)
        lengths = np.maximum(((ids != self.pad) * pos).max(1), 1)  # last non-pad position + 1
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
    if isinstance(rt, TextRuntime):
        x = rng.integers(1, rt.vocab_size, (4, 12))
    else:
        x = rng.random((4, *rt.input_shape), dtype=np.float32)
    r = rt.run(x)
    print({k: v.tolist() for k, v in r.items() if k != "logits"})


if __name__ == "__main__":
    main()
