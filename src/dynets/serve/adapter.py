"""One interface over any saved dynamic model: parse request inputs, batch them, run, cost them.

The server knows nothing about families. It asks a `ServedModel` to turn JSON inputs into tensors
(failing with `InputError`, which names the input, what was expected and what was given), to
group parsed samples into batches, and to run a batch; the model's eval forward must return a
`DynamicOutput`. Three input kinds:

  image   a model with a 3-dim `input_shape` (C, H, W): nested lists of numbers, or base64 PNG
  text    a model with a tokenizer (`encode`), e.g. DynamicBert: strings; padded per batch
  tensor  anything else: nested lists of numbers; the model's own `check_input` validates them,
          and samples of different shapes go to different forwards

A model "has an operating point" when it holds an `ExitPolicy` in `model.policy` and takes
`policy=` in its forward (early-exit networks, DynamicBert), or when its family has a run-time
knob (block skipping, routing, Skip-RNNs, slimmable widths, DynamicViT / A-ViT / ToMe:
`serve.knobs`), applied before the forward; for other families budgets are reported as unavailable.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dynets.core.outputs import DynamicOutput
from dynets.policies.exit_policies import ExitPolicy

MAX_IMAGE_PIXELS_FACTOR = 4  # a PNG may not declare more than this many times the model's pixels


class InputError(ValueError):
    """A request input the model cannot take; the message says what was expected and what was given."""


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + (",)" if len(shape) == 1 else ")")


class ServedModel:
    """A loaded dynamic model with the input handling and cost accounting a server needs."""

    def __init__(self, model: nn.Module, *, name: str = "", optimize: bool = False) -> None:
        """`optimize`: serve the model's `optimize_for_inference()` copy where it has one (the
        same outputs up to float rounding, less time per batch)."""
        model = model.eval()
        self.optimized = bool(optimize and hasattr(model, "optimize_for_inference"))
        self.model = model.optimize_for_inference() if self.optimized else model
        self.name = name or type(model).__name__
        self.architecture = type(model).__name__
        shape = getattr(model, "input_shape", None)
        self.input_shape: tuple[int, ...] | None = tuple(int(d) for d in shape) if shape else None
        if hasattr(model, "encode") and hasattr(model, "tokenizer"):
            self.kind = "text"
        elif self.input_shape is not None and len(self.input_shape) == 3:
            self.kind = "image"
        else:
            self.kind = "tensor"
        from dynets.serve.knobs import knob_for

        has_policy = isinstance(getattr(model, "policy", None), ExitPolicy)
        self.knob = None if has_policy else knob_for(model)
        self.supports_policy = has_policy or self.knob is not None
        self.num_exits: int | None = getattr(model, "num_exits", None) if has_policy else None
        self.labels = self._labels()

    def _labels(self) -> list[str]:
        cfg = getattr(self.model, "config", None)
        labels = getattr(cfg, "labels", None)
        if labels:
            return [str(v) for v in labels]
        n = getattr(self.model, "num_classes", None) or getattr(cfg, "num_classes", None)
        return [str(i) for i in range(int(n))] if n else []

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": self.kind}
        if self.kind == "image":
            c, h, w = self.input_shape  # type: ignore[misc]
            spec.update(
                shape=list(self.input_shape),  # type: ignore[arg-type]
                field="inputs",
                formats=[f"nested list of numbers ({c}, {h}, {w})"]
                + ([f"nested list ({h}, {w})"] if c == 1 else [])
                + [f"base64 PNG string, {w}x{h} {'grayscale' if c == 1 else 'RGB'}"],
                value_range="[0, 1] (PNG bytes are divided by 255)",
            )
        elif self.kind == "text":
            spec.update(field="texts", formats=["non-empty string"])
        else:
            spec.update(
                field="inputs",
                shape=list(self.input_shape) if self.input_shape else None,
                formats=["nested list of numbers"],
            )
        return {
            "architecture": self.architecture,
            "name": self.name,
            "input": spec,
            "labels": self.labels,
            "operating_point_available": self.supports_policy,
            "num_exits": self.num_exits,
            "optimized_for_inference": self.optimized,
        }

    # ------------------------------------------------------------------ parsing
    def parse(self, inputs: list[Any] | None, texts: list[str] | None) -> list[torch.Tensor]:
        """JSON inputs -> one tensor per sample, or InputError."""
        if self.kind == "text":
            if inputs is not None:
                raise InputError("'inputs': this model takes text; expected 'texts' (a list of strings)")
            if texts is None:
                raise InputError("expected 'texts' (a list of strings), got no 'texts' field")
            return [self._parse_text(i, t) for i, t in enumerate(texts)]
        if texts is not None:
            raise InputError(
                f"'texts': this model takes {self.kind} inputs; expected 'inputs' (nested lists"
                f"{' or base64 PNG strings' if self.kind == 'image' else ''})"
            )
        if inputs is None:
            raise InputError("expected 'inputs' (a list of samples), got no 'inputs' field")
        return [self._parse_one(i, v) for i, v in enumerate(inputs)]

    def _parse_text(self, i: int, text: Any) -> torch.Tensor:
        if not isinstance(text, str):
            raise InputError(f"texts[{i}]: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise InputError(f"texts[{i}]: expected a non-empty text, got {text!r}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # truncation to max_length is the model's documented rule
                ids = self.model.encode([text])  # (1, L)
        except (TypeError, ValueError) as e:
            raise InputError(f"texts[{i}]: {e}") from None
        return ids[0]

    def _parse_one(self, i: int, value: Any) -> torch.Tensor:
        from_png = isinstance(value, str)
        if from_png:
            if self.kind != "image":
                raise InputError(f"inputs[{i}]: expected a nested list of numbers, got a string")
            x = self._decode_png(i, value)
        else:
            x = self._from_list(i, value)
        if self.kind == "image":
            c, h, w = self.input_shape  # type: ignore[misc]
            if c == 1 and tuple(x.shape) == (h, w):
                x = x.unsqueeze(0)
            if tuple(x.shape) != self.input_shape:
                alt = f" or {_shape_str((h, w))}" if c == 1 else ""
                raise InputError(
                    f"inputs[{i}]: expected shape {_shape_str(self.input_shape)}{alt} (channels, height, "
                    f"width), got {_shape_str(x.shape)}"
                )
        elif self.input_shape is not None and tuple(x.shape) != self.input_shape:
            raise InputError(
                f"inputs[{i}]: expected shape {_shape_str(self.input_shape)}, got {_shape_str(x.shape)}"
            )
        if not from_png and not torch.isfinite(x).all():  # PNG bytes / 255 are always finite
            raise InputError(f"inputs[{i}]: expected finite numbers, got NaN or infinity")
        if (
            self.kind == "tensor"
            and int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 0) > 0
        ):
            if not torch.equal(x, x.round()):
                raise InputError(f"inputs[{i}]: expected token ids (whole numbers), got non-integral values")
            x = x.long()  # a token-id model
        check = getattr(self.model, "check_input", None)
        if self.kind == "tensor" and callable(check):
            try:
                check(x.unsqueeze(0))
            except (TypeError, ValueError) as e:
                raise InputError(f"inputs[{i}]: {e}") from None
        return x

    @staticmethod
    def _from_list(i: int, value: Any) -> torch.Tensor:
        if not isinstance(value, list):
            raise InputError(f"inputs[{i}]: expected a nested list of numbers, got {type(value).__name__}")
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (ValueError, TypeError) as e:
            reason = "a ragged list (rows of different lengths)" if "inhomogeneous" in str(e) else str(e)
            raise InputError(
                f"inputs[{i}]: expected a rectangular nested list of numbers, got {reason}"
            ) from None
        if arr.size == 0:
            raise InputError(
                f"inputs[{i}]: expected a non-empty nested list, got shape {_shape_str(arr.shape)}"
            )
        return torch.from_numpy(arr)

    def _decode_png(self, i: int, text: str) -> torch.Tensor:
        c, h, w = self.input_shape  # type: ignore[misc]
        if text.startswith("data:"):
            text = text.split(",", 1)[-1]
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(
                f"inputs[{i}]: expected base64-encoded PNG bytes, got a string that is not base64"
            ) from None
        if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
            raise InputError(f"inputs[{i}]: expected a PNG image (base64), got other bytes")
        try:
            from PIL import Image
        except ImportError:  # pillow is a dynets dependency, so this is a broken install
            raise InputError(
                "PNG inputs need pillow (pip install pillow); send nested lists instead"
            ) from None
        try:
            img = Image.open(io.BytesIO(raw), formats=("PNG",))  # no probing of other formats
            if img.width * img.height > MAX_IMAGE_PIXELS_FACTOR * h * w:
                raise InputError(f"inputs[{i}]: expected a {w}x{h} PNG, got {img.width}x{img.height}")
            img.load()
        except InputError:
            raise
        except Exception as e:  # PIL raises many types for corrupt data
            raise InputError(f"inputs[{i}]: the PNG could not be decoded ({e})") from None
        if img.size != (w, h):
            raise InputError(f"inputs[{i}]: expected a {w}x{h} PNG, got {img.width}x{img.height}")
        mode = "L" if c == 1 else "RGB"
        arr = np.asarray(img if img.mode == mode else img.convert(mode), dtype=np.float32) / 255.0
        arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
        if arr.shape[0] != c:
            raise InputError(f"inputs[{i}]: expected {c} channels, PNG gives {arr.shape[0]}")
        return torch.from_numpy(np.ascontiguousarray(arr))

    # ------------------------------------------------------------------ batching and running
    def group(self, samples: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
        """Batches to run: (positions in `samples`, batch tensor); texts are right-padded together."""
        if not samples:
            return []
        if self.kind == "text":
            pad = int(getattr(self.model.config, "pad_token_id", 0))
            L = max(int(s.shape[0]) for s in samples)
            x = torch.full((len(samples), L), pad, dtype=torch.long)
            for j, s in enumerate(samples):
                x[j, : s.shape[0]] = s
            return [(list(range(len(samples))), x)]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, s in enumerate(samples):
            by_shape.setdefault(tuple(s.shape), []).append(j)
        return [(pos, torch.stack([samples[j] for j in pos])) for pos in by_shape.values()]

    def forward(self, x: torch.Tensor, policy: Any = None) -> DynamicOutput:
        """The model's eval forward at `policy`: an ExitPolicy (passed to the forward) or a knob
        setting (`serve.knobs.KnobSetting`, applied to the model first)."""
        with torch.inference_mode():
            if policy is not None and self.knob is not None:
                policy.apply(self.model)
                out = self.model(x)
            elif policy is not None and self.supports_policy:
                out = self.model(x, policy=policy)
            else:
                out = self.model(x)
        if not isinstance(out, DynamicOutput):
            raise TypeError(
                f"{self.architecture}'s eval forward returned {type(out).__name__}; expected DynamicOutput"
            )
        return out

    def full_cost(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B,) float64 FLOPs of each sample on the static path, or None when the model cannot say."""
        fn = getattr(self.model, "full_cost", None)
        if fn is None:
            return None
        try:
            if self.kind == "text":
                value = fn(self.model.lengths(x))
            else:
                value = fn()
        except TypeError:
            return None
        B = x.shape[0]
        if isinstance(value, torch.Tensor) and value.numel() == B and B != 1:
            return value.reshape(B).double().cpu()
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            return None  # not one cost per sample: the fraction is unknown
        v = float(value)
        return torch.full((x.shape[0],), v, dtype=torch.float64) if math.isfinite(v) and v > 0 else None


def load_served_model(directory: str, *, name: str = "", optimize: bool = True) -> ServedModel:
    """Load a saved model directory for serving (its inference copy where it has one, unless
    `optimize` is False); errors name the directory and what is wrong."""
    from dynets.core.serialization import load

    model = load(directory)
    return ServedModel(model, name=name or str(directory), optimize=optimize)
