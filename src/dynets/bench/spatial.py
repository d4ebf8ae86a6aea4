"""The spatial benchmark: token pruning, halting and merging on a ViT; glance and focus on a CNN.

ViT part (CIFAR-10, 2 threads): a static ViT is trained; DynamicViT (keep predictors, distilled
from it) and A-ViT halting are fine-tuned from it for a short schedule; ToMe merging uses it as
is. For every method and setting: test accuracy, its drop against the static ViT, mean FLOPs,
and images/s against the static ViT at batch 1 and 64 (`compare_wallclock`: one process,
alternating passes, medians). The control (on by default): the static ViT given the same extra
fine-tune as the dynamic models, so that their extra epochs are not read as a dynamic gain; each
row's `accuracy_drop_vs_finetuned` is against it, and so is the headline `static_acc`. ToMe, which
needs no training, then merges on the control's weights. Optionally (`--tome-finetune-r R`) a ToMe
ViT is also trained: the control's fine-tune with merging on at r = R (ToMe's "trained" setting).

Glance part: the static ResNet of `dynets.models.resnet` and `glance_focus` trained with the same
schedule; accuracy vs mean FLOPs over confidence thresholds, an operating point calibrated on
validation data to a FLOPs budget, and its wall-clock against the static ResNet.

Trained models are cached by everything that decides them under `cache_dir()/bench`, so a re-run
only repeats evaluation and timing. Headline fields (top level of the JSON): static_acc,
dynamic_acc, speedup_b1, speedup_b64 of DynamicViT at the first keep ratio; every method's numbers
are under "vit" and the glance-and-focus ones under "glance_focus".

Run: `python -m dynets.bench.spatial --json benchmarks/results/vit_cifar10.json` (see --help).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from dynets.bench.common import cache_key as _key
from dynets.bench.common import cpu_model
from dynets.bench.common import log as _log
from dynets.bench.evaluate import collect, sweep
from dynets.bench.plots import _save, plot_pareto, plt
from dynets.bench.wallclock import compare_wallclock, split_batches
from dynets.core.registry import create_model
from dynets.core.serialization import atomic_write_bytes, load, save
from dynets.data import DATASET_STATS, cache_dir, load_dataset
from dynets.models.vit import check_token_multiple
from dynets.policies.calibration import calibrate
from dynets.spatial.halting import HaltingViT, HaltingViTConfig, check_threshold
from dynets.spatial.merging import ToMeViT, check_r, tome, tome_cost
from dynets.spatial.plots import plot_glance_focus, plot_halting_depth, plot_kept_patches, plot_merged_groups
from dynets.spatial.token_pruning import DynamicViT, DynamicViTConfig, check_keep_ratio, check_prune_after
from dynets.train import TrainConfig, train

HEADLINE_KEYS = ("static_acc", "dynamic_acc", "speedup_b1", "speedup_b64")


@dataclass
class SpatialBenchConfig:
    data: str = "cifar10"
    quick: bool = False
    parts: tuple[str, ...] = ("vit", "glance")
    train_limit: int | None = 25000  # of the 45,000 training images, to fit ~45 minutes on 2 cores
    val_limit: int | None = 2000
    test_limit: int | None = None
    batch_size: int = 128
    seed: int = 0
    # ViT: a smaller shape than the zoo default (dim 192, mlp 4) so that training fits ~45 minutes
    vit_kw: dict = field(default_factory=lambda: dict(dim=128, depth=6, heads=4, mlp_ratio=2.0))
    vit_epochs: int = 6
    vit_lr: float = 1e-3
    finetune_epochs: int = 1
    dvit_lr: float = 1e-4  # DynamicViT: backbone and predictors fine-tuned together
    dvit_predictor_lr_scale: float = 10.0  # the keep predictors' lr = this x dvit_lr (session 13: 1 -> 10)
    # blocks followed by a keep predictor: (1, 3, 4) prunes late (29% fewer FLOPs at 0.7); (0, 2, 4)
    # spaces the stages like DynamicViT's 3/6/9 of 12 blocks (37% fewer at 0.7, as in the paper)
    dvit_prune_after: tuple[int, ...] = DynamicViTConfig.prune_after
    halting_lr: float = 3e-4  # A-ViT: the halting channel has to move within one epoch
    halting_epochs: int | None = None  # A-ViT's fine-tuning epochs (None: finetune_epochs)
    # the fair control: the static ViT given the same extra training as the fine-tuned dynamic models
    # (the longer of finetune_epochs and halting_epochs, at halting_lr, distilled from itself as A-ViT
    # is); the headline static_acc is its accuracy (static_acc_before_finetune: before it)
    static_finetune: bool = True
    keep_ratios: tuple[float, ...] = (0.7, 0.5)
    # DynamicViT and ToMe rows again with sequence lengths rounded to multiples of this (the same
    # models; 1 = no extra rows): see DynamicViTConfig.token_multiple and merging.merge_schedule
    token_multiple: int = 16
    train_keep_ratios: tuple[float, ...] = (0.5, 0.6, 0.7)
    halting_kw: dict = field(default_factory=dict)
    halting_thresholds: tuple[float, ...] = (0.99,)
    tome_r: tuple[int, ...] = (4, 8)
    # also fine-tune a ToMe ViT with merging on (this r per block, lengths rounded to token_multiple)
    # from the static ViT, with the control's recipe (ToMe's "trained" setting); its rows evaluate it at
    # every tome_r (None: off)
    tome_finetune_r: int | None = None
    # glance and focus vs the static ResNet, trained with the same schedule
    cnn_epochs: int = 3
    cnn_lr: float = 0.1
    gf_kw: dict = field(default_factory=dict)
    gf_budget: float = 0.5  # operating point: this fraction of the static ResNet's FLOPs
    # timing
    b1_samples: int = 300
    b64_samples: int = 2048
    rounds: int = 5
    threads: int = 2
    # ViT part: time the static ViT and every method whose token counts are fixed for a batch size
    # (DynamicViT, ToMe) compiled by torch.compile (dynamic=False, one graph per batch size), so that
    # both sides run without eager's per-op overhead. A-ViT's counts depend on the input (a new shape
    # nearly every batch), so it stays eager against the compiled static ViT. Needs a C++ compiler.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.compile:
            check_compiler()
        bad = sorted(set(self.parts) - {"vit", "glance"})
        if bad or not self.parts:
            raise ValueError(f"parts: expected a non-empty subset of ('vit', 'glance'), got {self.parts}")
        for r in self.tome_r:
            check_r(r)
        r = self.tome_finetune_r
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"tome_finetune_r: expected an int >= 1 (tokens merged per block), got {r!r}")
        check_token_multiple(self.token_multiple)
        self.halting_thresholds = tuple(check_threshold(t) for t in self.halting_thresholds)
        if not self.keep_ratios:
            raise ValueError("keep_ratios: expected at least one keep ratio in (0, 1], got none")
        self.keep_ratios = tuple(check_keep_ratio(r) for r in self.keep_ratios)
        for name in ("vit_epochs", "finetune_epochs", "halting_epochs", "cnn_epochs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name in ("vit_lr", "dvit_lr", "halting_lr", "cnn_lr", "dvit_predictor_lr_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        bad = sorted(set(self.halting_kw) - {f.name for f in fields(HaltingViTConfig)})
        if bad:
            raise ValueError(f"halting_kw: expected HaltingViTConfig fields, got unknown {bad}")
        if self.quick:
            self.train_limit = min(self.train_limit or 2000, 2000)
            self.val_limit = min(self.val_limit or 500, 500)
            self.test_limit = self.test_limit or 500
            self.vit_kw = dict(dim=64, depth=6, heads=2, mlp_ratio=2.0)
            self.vit_epochs = min(self.vit_epochs, 2)
            self.cnn_epochs = min(self.cnn_epochs, 2)
            self.gf_kw = self.gf_kw or dict(widths=(16, 32, 64))
            self.b1_samples = min(self.b1_samples, 40)
            self.b64_samples = min(self.b64_samples, 256)
            self.rounds = min(self.rounds, 3)
        # checked against the ViT shape actually trained (after --quick has set it), before any training
        depth = self.vit_kw.get("depth", DynamicViTConfig.depth)
        self.dvit_prune_after = check_prune_after(self.dvit_prune_after, depth, "dvit_prune_after")
        HaltingViTConfig(**{**self.vit_kw, **self.halting_kw})  # a bad recipe value fails here


def _trained(
    path: Path,
    build: Callable[[], torch.nn.Module],
    data,
    tc: TrainConfig,
    seed: int,
    name: str,
    teacher: torch.nn.Module | None = None,
):
    """Train the model `build()` makes (or reuse the copy an identical earlier run cached at `path`)."""
    if (path / "config.json").exists():
        _log(f"reusing trained {name} from {path}")
        return load(path)
    torch.manual_seed(seed)
    model = build()
    _log(f"training {name} for {tc.epochs} epoch(s) on {len(data)} images")
    start = time.time()
    train(model, data, tc, teacher=teacher)
    _log(f"trained {name} in {time.time() - start:.0f} s")
    model.eval()
    save(model, path)
    return model


@torch.inference_mode()
def _evaluate(fn: Callable[[torch.Tensor], object], data, bs: int = 256) -> dict:
    """Accuracy and mean FLOPs of a model call returning DynamicOutput (or logits with flops=None)."""
    correct, flops = 0, []
    for i in range(0, len(data), bs):
        out = fn(data.x[i : i + bs])
        correct += int((out.logits.argmax(-1) == data.y[i : i + bs]).sum())
        flops.append(out.flops)
    return {"accuracy": correct / len(data), "mean_flops": float(torch.cat(flops).mean())}


def check_compiler() -> str:
    """The C++ compiler torch.compile's CPU backend builds its kernels with (CXX, else g++ / clang++ /
    c++ on PATH), or a clear error before any training when there is none."""
    names = [n for n in (os.environ.get("CXX"), "g++", "clang++", "c++") if n]
    for n in names:
        if shutil.which(n):
            return n
    raise ValueError(
        f"compile: expected a C++ compiler for torch.compile on CPU (one of {names}), found none"
    )


def _timing(
    static_fn, dyn_fn, x: torch.Tensor, cfg: SpatialBenchConfig, compiled: tuple[bool, bool] = (False, False)
) -> dict:
    """compare_wallclock at batch 1 and 64. compiled = (static, dynamic): which side runs compiled,
    with a fresh compile per batch size (dynamo's caches reset, so that no earlier method's graphs
    or recompile counts carry over), compiled on the first and last batch before any timing."""
    # the two alternate over groups of batches within each round (as in the early-exit benchmark), so
    # that the host's load drifts over both alike: with whole passes (before session 20) the same
    # models' b64 speed-ups moved by up to 0.16x from run to run
    res = {}
    for bs, n in ((1, cfg.b1_samples), (64, cfg.b64_samples)):
        batches = split_batches(x[:n], bs)
        s_fn, d_fn = static_fn, dyn_fn
        if any(compiled):
            torch._dynamo.reset()
            s_fn = torch.compile(static_fn, dynamic=False) if compiled[0] else static_fn
            d_fn = torch.compile(dyn_fn, dynamic=False) if compiled[1] else dyn_fn
            with torch.inference_mode():  # the mode the timing runs in (dynamo guards on it)
                for b in {batches[0].shape[0]: batches[0], batches[-1].shape[0]: batches[-1]}.values():
                    s_fn(b), d_fn(b)
        wc = compare_wallclock(s_fn, d_fn, batches, rounds=cfg.rounds, chunks=min(10, len(batches)))
        res[f"b{bs}"] = {**wc, "compiled": {"static": compiled[0], "dynamic": compiled[1]}}
    return res


def run(
    cfg: SpatialBenchConfig,
    *,
    json_path: str | None = None,
    out_dir: str | None = None,
    progress: bool = True,
) -> dict:
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir or (Path(json_path).parent if json_path else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(json_path).stem if json_path else f"spatial_{cfg.data}"
    t0 = time.time()
    train_set = load_dataset(cfg.data, "train", limit=cfg.train_limit)
    val_set = load_dataset(cfg.data, "val", limit=cfg.val_limit)
    test_set = load_dataset(cfg.data, "test", limit=cfg.test_limit)
    _log(f"data {cfg.data}: train {len(train_set)}, val {len(val_set)}, test {len(test_set)}")
    c, h, _ = train_set.input_shape
    mean, std = DATASET_STATS.get(cfg.data, ((0.5,), (0.25,)))
    data_kw = dict(
        in_channels=c, image_size=h, num_classes=train_set.num_classes, mean=tuple(mean), std=tuple(std)
    )
    result: dict = {"benchmark": "spatial", "data": cfg.data, "quick": cfg.quick, "config": asdict(cfg)}
    ctx = dict(
        cfg=cfg,
        train_set=train_set,
        val_set=val_set,
        test_set=test_set,
        data_kw=data_kw,
        out=out,
        stem=stem,
        progress=progress,
    )
    if "vit" in cfg.parts:
        result["vit"] = _vit_part(**ctx)
        head = result["vit"]["methods"][f"dynamicvit_{cfg.keep_ratios[0]}"]
        s = result["vit"]["static"]
        result.update(
            # the fair control where it ran (the static ViT given the same extra training)
            static_acc=s.get("finetuned_accuracy", s["accuracy"]),
            static_acc_before_finetune=s["accuracy"],
            dynamic_acc=head["accuracy"],
            speedup_b1=head["speedup_b1"],
            speedup_b64=head["speedup_b64"],
        )
    if "glance" in cfg.parts:
        result["glance_focus"] = _glance_part(**ctx)
    result.update(
        torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu_model(), seconds=time.time() - t0
    )
    if json_path:
        atomic_write_bytes(json_path, json.dumps(result, indent=2).encode())
    atomic_write_bytes(out / f"{stem}.md", _markdown(result).encode())
    _log(f"done in {time.time() - t0:.0f} s")
    return result


# ------------------------------------------------------------------------------------------ ViT
def _vit_part(cfg, train_set, val_set, test_set, data_kw, out, stem, progress) -> dict:
    kw = {**data_kw, **cfg.vit_kw}
    tc = dict(
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        augment="crop_flip" if data_kw["image_size"] == 32 else "none",
        optimizer="adamw",
        weight_decay=0.05,
        grad_clip=1.0,
    )
    # a progress bar does not change training: the key always says progress off (as the keys of the
    # models cached so far do), so a run with the bar reuses a model trained without it
    base = [cfg.data, cfg.train_limit, cfg.seed, kw, {**tc, "progress": False}, cfg.vit_epochs, cfg.vit_lr]
    tc["progress"] = progress
    cache = cache_dir() / "bench"
    name = f"spatial_{cfg.data}"
    static_tc = TrainConfig(
        **tc,
        epochs=cfg.vit_epochs,
        lr=cfg.vit_lr,
        warmup_epochs=min(1.0, cfg.vit_epochs / 5),
        label_smoothing=0.1,
    )
    static = _trained(
        cache / f"{name}-vit-{_key(base)}",
        lambda: create_model("vit_tiny", **kw),
        train_set,
        static_tc,
        cfg.seed,
        "static vit_tiny",
    )

    def ft_schedule(epochs: int) -> dict:  # every fine-tune (dynamic models and the control): 10% warmup
        return dict(**tc, epochs=epochs, warmup_epochs=0.1 * epochs)

    ft = ft_schedule(cfg.finetune_epochs)
    ft_key = base + [cfg.finetune_epochs]

    # (an lr scale of 1 adds nothing to the key, so models cached before the option are reused)
    dvit_extra = [cfg.dvit_predictor_lr_scale] if cfg.dvit_predictor_lr_scale != 1.0 else []
    if cfg.dvit_prune_after != DynamicViTConfig.prune_after:  # likewise the default stages
        dvit_extra.append(["prune_after", list(cfg.dvit_prune_after)])

    def build_dvit():  # keep predictors initialised for the config's 0.7, whatever --keep-ratios evaluates
        return (
            DynamicViT.from_static(
                static,
                train_keep_ratios=tuple(cfg.train_keep_ratios),
                predictor_lr_scale=cfg.dvit_predictor_lr_scale,
                prune_after=cfg.dvit_prune_after,
            )
            .set_teacher(static)
            .train()
        )

    def build_avit():
        return HaltingViT.from_static(static, **cfg.halting_kw).set_teacher(static).train()

    dvit = _trained(
        cache / f"{name}-dvit-{_key(ft_key + [cfg.train_keep_ratios, cfg.dvit_lr] + dvit_extra)}",
        build_dvit,
        train_set,
        TrainConfig(**ft, lr=cfg.dvit_lr),
        cfg.seed,
        "DynamicViT",
    )
    # a separate A-ViT schedule (only when it differs, so models cached before the option are reused)
    h_epochs = cfg.halting_epochs or cfg.finetune_epochs
    h_extra = [["halting_epochs", h_epochs]] if h_epochs != cfg.finetune_epochs else []
    avit = _trained(
        cache / f"{name}-avit-{_key(ft_key + [cfg.halting_kw, cfg.halting_lr] + h_extra)}",
        build_avit,
        train_set,
        TrainConfig(**ft_schedule(h_epochs), lr=cfg.halting_lr),
        cfg.seed,
        "A-ViT halting",
    )
    static.eval()
    full = static.full_cost()
    static_row = {**_evaluate(static, test_set), "mean_flops": full}
    _log(f"static ViT: accuracy {static_row['accuracy']:.4f}, {full / 1e6:.1f} MFLOPs")
    # The control's recipe (also the fine-tuned ToMe's). A-ViT's loss is CE + distill_weight *
    # KL(teacher || student) at temperature 1; the loop's kd form (1 - kd) CE + kd KL with
    # kd = w / (1 + w) is the same objective times 1 / (1 + w), which AdamW's update does not see (up
    # to eps and the gradient clip). As long as the longest dynamic fine-tune (A-ViT's may be longer).
    w = HaltingViTConfig(**{**cfg.vit_kw, **cfg.halting_kw}).distill_weight
    kd = dict(kd=w / (1 + w), temperature=1.0) if w else {}
    c_epochs = max(cfg.finetune_epochs, h_epochs)
    c_extra = [["epochs", c_epochs]] if c_epochs != cfg.finetune_epochs else []
    c_tc = TrainConfig(**ft_schedule(c_epochs), lr=cfg.halting_lr, **kd)
    if cfg.static_finetune:

        def build_static_ft():
            m = create_model("vit_tiny", **kw)
            m.load_state_dict(static.state_dict())
            return m.train()

        static_ft = _trained(
            cache / f"{name}-vitft-{_key(ft_key + [cfg.halting_lr, kd] + c_extra)}",
            build_static_ft,
            train_set,
            c_tc,
            cfg.seed,
            "static ViT fine-tuned like the dynamic models (control)",
            teacher=static if w else None,
        ).eval()
        ft_acc = _evaluate(static_ft, test_set)["accuracy"]
        static_row.update(
            finetuned_accuracy=ft_acc,
            finetune={"epochs": c_epochs, "lr": cfg.halting_lr, "distill_weight": w},
        )
        _log(f"static ViT fine-tuned {c_epochs} more epoch(s) (control): accuracy {ft_acc:.4f}")
    else:
        static_ft = None
    tome_ft, ft_r = None, cfg.tome_finetune_r
    if ft_r:  # ToMe trained: merging on during the control's fine-tune (from the 10-epoch static ViT)
        ft_m = cfg.token_multiple
        tome_ft = _trained(
            cache / f"{name}-tomeft-{_key(ft_key + [cfg.halting_lr, kd, ['epochs', c_epochs], ft_r, ft_m])}",
            lambda: ToMeViT.from_static(static, merge_r=ft_r, token_multiple=ft_m).train(),
            train_set,
            c_tc,
            cfg.seed,
            f"ToMe ViT fine-tuned with merging (r = {ft_r}, multiples of {ft_m})",
            teacher=static if w else None,
        ).eval()
        static_row["tome_finetune"] = {"r": ft_r, "token_multiple": ft_m, "epochs": c_epochs}
    # ToMe needs no training, so it merges on the best static ViT there is: the control where it ran,
    # so that its drop against that control is like for like (the same weights, fewer tokens)
    tm = tome(static if static_ft is None else static_ft, 0).eval()
    on = "" if static_ft is None else ", on the fine-tuned static ViT"
    methods: dict[str, tuple[Callable, str, object]] = {}
    for rho in cfg.keep_ratios:
        methods[f"dynamicvit_{rho}"] = (
            lambda x, r=rho: dvit(x, keep_ratio=r),
            "token pruning (DynamicViT)",
            rho,
        )
        if cfg.token_multiple > 1:
            methods[f"dynamicvit_{rho}_m{cfg.token_multiple}"] = (
                lambda x, r=rho: dvit(x, keep_ratio=r, token_multiple=cfg.token_multiple),
                f"token pruning (DynamicViT), lengths rounded to multiples of {cfg.token_multiple}",
                rho,
            )
    for thr in cfg.halting_thresholds:
        methods[f"halting_{thr}"] = (lambda x, t=thr: avit(x, threshold=t), "halting (A-ViT)", thr)
    for r in cfg.tome_r:
        methods[f"tome_r{r}"] = (lambda x, r=r: tm(x, r=r), f"merging (ToMe, no training{on})", r)
        if cfg.token_multiple > 1:
            methods[f"tome_r{r}_m{cfg.token_multiple}"] = (
                lambda x, r=r: tm(x, r=r, token_multiple=cfg.token_multiple),
                f"merging (ToMe, no training{on}), onto lengths that are multiples of {cfg.token_multiple}",
                r,
            )
    if tome_ft is not None:
        ft_family = f"merging (ToMe fine-tuned with merging at r = {ft_r}"
        for r in cfg.tome_r:
            methods[f"tomeft_r{r}"] = (lambda x, r=r: tome_ft(x, r=r, token_multiple=1), ft_family + ")", r)
            if cfg.token_multiple > 1:
                methods[f"tomeft_r{r}_m{cfg.token_multiple}"] = (
                    lambda x, r=r: tome_ft(x, r=r, token_multiple=cfg.token_multiple),
                    f"{ft_family}), onto lengths that are multiples of {cfg.token_multiple}",
                    r,
                )
    rows = {}
    xt = test_set.x
    for key, (fn, family, setting) in methods.items():
        ev = _evaluate(fn, test_set)
        # A-ViT: token counts that change with the input would recompile nearly every batch
        wc = _timing(
            static.forward_static, fn, xt, cfg, (cfg.compile, cfg.compile and not key.startswith("halting"))
        )
        rows[key] = {
            "family": family,
            "setting": setting,
            # the weights it starts from: the static ViT (fine-tuned further where trained) or,
            # for ToMe with the control on, the fine-tuned static ViT itself
            "base": "finetuned_static" if key.startswith("tome_") and static_ft is not None else "static",
            **ev,
            "accuracy_drop": static_row["accuracy"] - ev["accuracy"],
            **(
                {"accuracy_drop_vs_finetuned": static_row["finetuned_accuracy"] - ev["accuracy"]}
                if "finetuned_accuracy" in static_row
                else {}
            ),
            "flops_ratio": ev["mean_flops"] / full,
            "speedup_b1": wc["b1"]["speedup"],
            "speedup_b64": wc["b64"]["speedup"],
            "timing": wc,
        }
        _log(
            f"{key}: acc {ev['accuracy']:.4f} (static {static_row['accuracy']:.4f}), "
            f"FLOPs x{ev['mean_flops'] / full:.3f}, "
            f"speed-up b1 {wc['b1']['speedup']:.2f}x, b64 {wc['b64']['speedup']:.2f}x"
        )
    # pictures of the decisions on a few test images
    x8 = xt[:8]
    with torch.inference_mode():
        for rho in cfg.keep_ratios:
            plot_kept_patches(
                x8,
                dvit(x8, keep_ratio=rho).decisions["kept"],
                out / f"{stem}_kept_{rho}.png",
                title=f"DynamicViT keep ratio {rho}: patches kept after each stage (grey = dropped)",
            )
        plot_halting_depth(x8, avit(x8).decisions["depth"], out / f"{stem}_halting_depth.png")
        plot_merged_groups(
            x8,
            tm(x8, r=max(cfg.tome_r), record=True).decisions["owner"],
            out / f"{stem}_tome_groups.png",
            title=f"ToMe r={max(cfg.tome_r)}: patches merged into the same final token",
        )
    _plot_vit(static_row, rows, out / f"{stem}_vit_tradeoff.png")
    # control: the same gathering with untrained keep predictors (a near-random keep rule), to
    # show what the trained predictors add over merely dropping that many tokens
    torch.manual_seed(cfg.seed)
    untrained = DynamicViT.from_static(static, prune_after=cfg.dvit_prune_after).eval()  # the same stages
    control = {
        f"untrained_predictors_{rho}": _evaluate(lambda x, r=rho: untrained(x, keep_ratio=r), test_set)[
            "accuracy"
        ]
        for rho in cfg.keep_ratios
    }
    _log(f"control, untrained keep predictors: {control}")
    return {
        "static": static_row,
        "methods": rows,
        "control_accuracy": control,
        "tome_flops": {r: tome_cost(static, r) for r in cfg.tome_r},
        "tome_flops_multiple": {r: tome_cost(static, r, cfg.token_multiple) for r in cfg.tome_r},
        "model": kw,
    }


def _plot_vit(static_row: dict, rows: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.get_cmap("tab20").colors  # one colour per row (up to 20), one marker per family
    markers = {"dynamicvit": "o", "halting": "s", "tome": "^", "tomeft": "v"}
    for ax, b in zip(axes, ("b1", "b64")):
        ax.axhline(100 * static_row["accuracy"], color="gold", ls="--", label="static ViT")
        if "finetuned_accuracy" in static_row:
            acc = 100 * static_row["finetuned_accuracy"]
            ax.axhline(acc, color="orange", ls=":", label="static ViT, fine-tuned too")
        for i, (key, r) in enumerate(rows.items()):
            m = markers.get(key.split("_", 1)[0], "o")
            ax.scatter(r[f"speedup_{b}"], 100 * r["accuracy"], label=key, color=colors[i % 20], marker=m)
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set_xlabel(f"images/s vs static, batch {b[1:]}")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("ViT on 2 CPU threads: accuracy vs wall-clock speed-up", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------ glance
def _glance_part(cfg, train_set, val_set, test_set, data_kw, out, stem, progress) -> dict:
    tc = TrainConfig(
        epochs=cfg.cnn_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.cnn_lr,
        seed=cfg.seed,
        augment="crop_flip" if data_kw["image_size"] == 32 else "none",
        progress=progress,
    )
    base = [cfg.data, cfg.train_limit, cfg.seed, data_kw, asdict(tc) | {"progress": None}]
    cache = cache_dir() / "bench"
    name = f"spatial_{cfg.data}"
    static = _trained(
        cache / f"{name}-resnet-{_key(base)}",
        lambda: create_model("static_resnet", **data_kw),
        train_set,
        tc,
        cfg.seed,
        "static_resnet",
    )
    gf_kw = {**data_kw, **cfg.gf_kw}
    gf = _trained(
        cache / f"{name}-gf-{_key(base + [gf_kw])}",
        lambda: create_model("glance_focus", **gf_kw),
        train_set,
        tc,
        cfg.seed,
        "glance_focus",
    )
    static.eval()
    gf.eval()
    full = static.full_cost()
    with torch.inference_mode():
        static_acc = float(
            torch.cat([static.forward_static(test_set.x[i : i + 256]) for i in range(0, len(test_set), 256)])
            .argmax(-1)
            .eq(test_set.y)
            .double()
            .mean()
        )
    static_row = {"accuracy": static_acc, "mean_flops": full}
    val, test = collect(gf, val_set), collect(gf, test_set)
    val.full_cost = test.full_cost = full
    rows = sweep(test, ["confidence"])
    anytime = [
        {"exit": k, "accuracy": a, "mean_flops": float(test.exit_costs[k])}
        for k, a in enumerate(test.accuracy_per_exit())
    ]
    budget = max(cfg.gf_budget, float(val.exit_costs[0]) / full)
    budget = min(budget, float(val.exit_costs[-1]) / full)
    cal = calibrate("confidence", val.exit_logits, val.labels, val.exit_costs, budget, full_cost=full)
    gf.policy = cal.policy
    op = _evaluate(gf, test_set)
    with torch.inference_mode():
        focused = torch.cat(
            [gf(test_set.x[i : i + 256]).decisions["focused"] for i in range(0, len(test_set), 256)]
        )
    wc = _timing(static.forward_static, gf, test_set.x, cfg)
    op_row = {
        "policy": cal.policy.to_dict(),
        "budget": budget,
        **op,
        "accuracy_drop": static_acc - op["accuracy"],
        "flops_ratio": op["mean_flops"] / full,
        "focused_fraction": float(focused.double().mean()),
        "speedup_b1": wc["b1"]["speedup"],
        "speedup_b64": wc["b64"]["speedup"],
        "timing": wc,
    }
    _log(
        f"glance_focus at {cal.policy}: acc {op['accuracy']:.4f} (static ResNet {static_acc:.4f}), FLOPs "
        f"x{op_row['flops_ratio']:.3f}, focused {op_row['focused_fraction']:.2f}, speed-up b1 "
        f"{wc['b1']['speedup']:.2f}x, b64 {wc['b64']['speedup']:.2f}x"
    )
    plot_pareto(
        rows,
        static_row,
        out / f"{stem}_glance_pareto.png",
        anytime=anytime,
        calibrated=[op_row],
        title=f"{cfg.data}: glance and focus vs static ResNet",
    )
    x16 = test_set.x[:16]
    with torch.inference_mode():
        d = gf(x16).decisions
    plot_glance_focus(x16, d["focused"], d["patch"], gf.config.patch_size, out / f"{stem}_glance_focus.png")
    return {
        "static": static_row,
        "operating_point": op_row,
        "anytime": anytime,
        "sweep": rows,
        "exit_costs": test.exit_costs.tolist(),
        "model": gf_kw,
    }


# ---------------------------------------------------------------------------------- report
def _training_line(c: dict) -> str:
    if not c:
        return ""
    n = f"{c['train_limit']} training images" if c.get("train_limit") else "all training images"
    hk = {**{f.name: f.default for f in fields(HaltingViTConfig)}, **c.get("halting_kw", {})}
    recipe = (
        f", halting-depth prior centred on block {hk['target_depth']:g} with weight {hk['distr_weight']:g}, "
        f"ponder weight {hk['ponder_weight']:g}"
    )
    he = c.get("halting_epochs")
    h_epochs = f" and {he}" if he and he != c["finetune_epochs"] else ""
    r = c.get("tome_finetune_r")
    tome_ft = (
        f", and also fine-tuned from the static ViT with merging on (r = {r}, lengths rounded to multiples "
        f"of {c.get('token_multiple', 16)}) with the control's recipe"
        if r
        else ""
    )
    return (
        f"Training: the static ViT {c['vit_epochs']} epochs on {n} (lr {c['vit_lr']}); DynamicViT "
        f"and A-ViT fine-tuned from it for {c['finetune_epochs']}{h_epochs} epoch(s) "
        f"(DynamicViT lr {c['dvit_lr']}, "
        f"its keep predictors x{c.get('dvit_predictor_lr_scale', 1.0):g} after blocks "
        f"{', '.join(map(str, c.get('dvit_prune_after', (1, 3, 4))))} (0-based); "
        f"A-ViT lr {c['halting_lr']}{recipe}); ToMe untrained{tome_ft}. Speed-ups: images/s vs the "
        "static ViT in the same process, alternating over groups of batches, medians."
        + (
            " **Compiled timing** (`--compile`): the static ViT, DynamicViT and ToMe run compiled by "
            "torch.compile (dynamic=False, compiled afresh for each batch size before timing); A-ViT, whose "
            "token counts change with the input, runs eager against the compiled static ViT."
            if c.get("compile")
            else ""
        )
    )


def _markdown(r: dict) -> str:
    lines = [f"# Spatial dynamic networks on {r['data']} ({'quick' if r['quick'] else 'full'} run)", ""]
    if "vit" in r:
        s = r["vit"]["static"]
        ft = "finetuned_accuracy" in s
        lines += [
            f"Static ViT ({r['vit']['model']}): accuracy {100 * s['accuracy']:.2f}%, "
            f"{s['mean_flops'] / 1e6:.1f} MFLOPs per image. {r['threads']} CPU threads"
            f"{' of ' + r['cpu'] if r.get('cpu') else ''}.",
            "",
            _training_line(r.get("config", {})),
            "",
        ]
        if ft:
            f = s["finetune"]
            lines += [
                "Control: the same static ViT given the dynamic models' extra training "
                f"({f['epochs']} epoch(s) at lr {f['lr']:g}, distilled from itself with weight "
                f"{f['distill_weight']:g}, as A-ViT is): "
                f"**{100 * s['finetuned_accuracy']:.2f}%**. The last drop column is against it (the first, "
                "against the static ViT before its fine-tune, is '-' where a row runs on the fine-tuned "
                "weights: ToMe).",
                "",
            ]
        lines += [
            "| method | setting | accuracy | drop (points) | FLOPs vs static | speed-up b1 | speed-up b64 |"
            + (" drop vs fine-tuned static |" if ft else ""),
            "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if ft else ""),
        ]
        for m in r["vit"]["methods"].values():
            # a drop against the un-fine-tuned static ViT means nothing for a row on the fine-tuned weights
            drop = "-" if m.get("base") == "finetuned_static" else f"{100 * m['accuracy_drop']:.2f}"
            lines.append(
                f"| {m['family']} | {m['setting']} | {100 * m['accuracy']:.2f}% "
                f"| {drop} | {m['flops_ratio']:.3f} "
                f"| {m['speedup_b1']:.2f}x | {m['speedup_b64']:.2f}x |"
                + (f" {100 * m['accuracy_drop_vs_finetuned']:.2f} |" if ft else "")
            )
        lines += [
            "",
            "Control, the same gathering with untrained keep predictors (a near-random keep rule): "
            + ", ".join(
                f"{k.rsplit('_', 1)[1]}: {100 * v:.2f}%" for k, v in r["vit"]["control_accuracy"].items()
            ),
        ]
        lines.append("")
    if "glance_focus" in r:
        g = r["glance_focus"]
        op, s = g["operating_point"], g["static"]
        lines += [
            "## Glance and focus vs the static ResNet",
            "",
            "| metric | value |",
            "|---|---:|",
            f"| static ResNet accuracy / MFLOPs | {100 * s['accuracy']:.2f}% / {s['mean_flops'] / 1e6:.1f} |",
            f"| glance only / glance + focus accuracy | {100 * g['anytime'][0]['accuracy']:.2f}% / "
            f"{100 * g['anytime'][1]['accuracy']:.2f}% |",
            f"| glance / glance + focus MFLOPs | {g['exit_costs'][0] / 1e6:.1f} / "
            f"{g['exit_costs'][1] / 1e6:.1f} |",
            f"| operating point ({op['policy']['kind']} {op['policy']['threshold']}) accuracy | "
            f"{100 * op['accuracy']:.2f}% |",
            f"| FLOPs vs static / focused fraction | {op['flops_ratio']:.3f} / "
            f"{op['focused_fraction']:.2f} |",
            f"| speed-up batch 1 / batch 64 | {op['speedup_b1']:.2f}x / {op['speedup_b64']:.2f}x |",
            "",
            "| threshold | accuracy | FLOPs vs static |",
            "|---:|---:|---:|",
        ]
        lines += [
            f"| {row['value']} | {100 * row['accuracy']:.2f}% | {row['flops_ratio']:.3f} |"
            for row in g["sweep"]
        ]
        lines.append("")
    lines.append(f"Total {r['seconds']:.0f} s, torch {r['torch']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynets.bench.spatial", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="cifar10")
    p.add_argument("--parts", default="vit,glance", help="comma-separated: vit, glance")
    p.add_argument("--quick", action="store_true", help="reduced version (a few minutes)")
    p.add_argument("--limit", type=int, default=None, help="train and test on at most N images")
    p.add_argument("--vit-epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument(
        "--halting-epochs",
        type=int,
        default=None,
        help="A-ViT's fine-tuning epochs (default: --finetune-epochs); part of the A-ViT cache key",
    )
    p.add_argument("--cnn-epochs", type=int, default=None)
    p.add_argument(
        "--no-static-finetune",
        action="store_true",
        help="skip the control that gives the static ViT the dynamic models' extra fine-tune",
    )
    p.add_argument(
        "--train-limit", type=int, default=None, help="train on at most N images (0: all; default 25,000)"
    )
    p.add_argument("--dvit-lr", type=float, default=None, help="DynamicViT's fine-tuning lr (default 1e-4)")
    p.add_argument(
        "--dvit-predictor-lr-scale",
        type=float,
        default=None,
        help="DynamicViT keep predictors' lr as a multiple of the backbone's fine-tuning lr (default 10)",
    )
    p.add_argument(
        "--token-multiple",
        type=int,
        default=None,
        help="also run DynamicViT and ToMe with lengths rounded to multiples of this (default 16; 1: off)",
    )
    p.add_argument(
        "--dvit-prune-after",
        default=None,
        help="comma-separated 0-based blocks followed by a DynamicViT keep predictor (default 1,3,4)",
    )
    p.add_argument(
        "--keep-ratios",
        default=None,
        help="comma-separated DynamicViT keep ratios in (0, 1] to evaluate (run-time knob; default 0.7,0.5; "
        "the first is the headline)",
    )
    p.add_argument(
        "--halting-thresholds",
        default=None,
        help="comma-separated A-ViT halting thresholds in (0, 1] to evaluate (run-time knob; default 0.99)",
    )
    for flag, hint in (
        ("--halting-target-depth", "centre of A-ViT's halting-depth prior, in blocks (default 4)"),
        ("--halting-distr-weight", "weight of A-ViT's halting-distribution prior loss (default 0.1)"),
        ("--halting-ponder-weight", "weight of A-ViT's ponder loss (default 5e-4)"),
    ):
        p.add_argument(flag, type=float, default=None, help=hint + "; part of the A-ViT cache key")
    p.add_argument("--tome-r", default=None, help="comma-separated ToMe merge counts per block (default 4,8)")
    p.add_argument(
        "--tome-finetune-r",
        type=int,
        default=None,
        help="also fine-tune a ToMe ViT with merging on at this r (lengths rounded to --token-multiple) with "
        "the control's recipe, and evaluate it at every --tome-r (default: off)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="folder for the Markdown and PNGs (default: beside --json)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the benchmark's setting: 2)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="time the static ViT, DynamicViT and ToMe compiled by torch.compile (A-ViT stays eager; "
        "needs a C++ compiler)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    def given(*names: str, prefix: str = "") -> dict:  # the options set on the command line
        return {n: getattr(a, prefix + n) for n in names if getattr(a, prefix + n) is not None}

    epochs = ("vit_epochs", "finetune_epochs", "halting_epochs", "cnn_epochs")
    extra = given(*epochs, "dvit_lr", "dvit_predictor_lr_scale", "token_multiple", "tome_finetune_r")
    halting_kw = given("target_depth", "distr_weight", "ponder_weight", prefix="halting_")
    if halting_kw:
        extra["halting_kw"] = halting_kw
    if a.no_static_finetune:
        extra["static_finetune"] = False
    if a.compile:
        extra["compile"] = True
    if a.limit:
        extra.update(train_limit=a.limit, test_limit=a.limit, val_limit=a.limit)
    if a.train_limit is not None:
        if a.train_limit < 0:
            p.error(f"--train-limit: expected 0 (all) or a positive count, got {a.train_limit}")
        extra["train_limit"] = a.train_limit or None
    for flag, key, conv, example in (
        ("--tome-r", "tome_r", int, "ints such as 4,8"),
        ("--dvit-prune-after", "dvit_prune_after", int, "ints such as 0,2,4"),
        ("--halting-thresholds", "halting_thresholds", float, "numbers in (0, 1] such as 0.99,0.9"),
        ("--keep-ratios", "keep_ratios", float, "numbers in (0, 1] such as 0.7,0.5"),
    ):
        text = getattr(a, key)
        if text:
            try:
                extra[key] = tuple(conv(v) for v in text.split(","))
            except ValueError:
                p.error(f"{flag}: expected comma-separated {example}, got {text!r}")
    try:
        cfg = SpatialBenchConfig(
            data=a.data,
            quick=a.quick,
            threads=a.threads,
            parts=tuple(s.strip() for s in a.parts.split(",")),
            **extra,
        )
    except ValueError as e:  # a setting out of its range: the message names it
        p.error(str(e))
    r = run(cfg, json_path=a.json, out_dir=a.out, progress=not a.no_progress)
    print(json.dumps({k: round(r[k], 4) for k in HEADLINE_KEYS if k in r}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
