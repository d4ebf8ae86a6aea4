"""The training loop: learning, bitwise resume, frozen parameters, checkpoints, validation."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.train import TrainConfig, load_checkpoint, random_crop_flip, train
from dynets.train.loop import _epoch_generator


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor


def make_data(n: int = 128, n_classes: int = 4, seed: int = 0, noise: float = 0.5) -> Data:
    """Classes differ by a per-channel colour, so crops and flips keep the label."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = colours[y] + noise * torch.randn(n, 3, 8, 8, generator=g)
    return Data(x.float(), y)


class TinyExitNet(nn.Module):
    """Two exits over a tiny MLP, dropout so the global RNG matters; dynamic-looking in eval mode."""

    def __init__(self, n_classes: int = 4, hidden: int = 16, p: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, hidden), nn.ReLU(), nn.Dropout(p))
        self.exit1 = nn.Linear(hidden, n_classes)
        self.stage2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(p))
        self.exit2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> MultiExitOutput | DynamicOutput:
        h = self.stem(x)  # (B, H)
        z1, z2 = self.exit1(h), self.exit2(self.stage2(h))  # (B, C) each
        if self.training:
            return MultiExitOutput([z1, z2])
        early = z1.softmax(-1).amax(-1) > 0.9  # (B,)
        logits = torch.where(early[:, None], z1, z2)
        return DynamicOutput(logits, (~early).long(), torch.zeros(len(x), dtype=torch.float64))


def make_model(seed: int = 0, **kw) -> TinyExitNet:
    torch.manual_seed(seed)
    return TinyExitNet(**kw)


FAST = {"epochs": 3, "batch_size": 32, "lr": 0.1, "progress": False}


def test_learns_and_records_history():
    data, val = make_data(256), make_data(128, seed=1)
    model = make_model()
    res = train(model, data, TrainConfig(**{**FAST, "epochs": 6}), eval_data=val)
    assert [h["epoch"] for h in res.history] == list(range(1, 7))
    assert {"loss", "train_acc", "seconds", "lr", "val_acc", "val_acc_per_exit"} <= set(res.final)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.final["train_acc"] > 0.9 and res.final["val_acc"] > 0.9
    assert len(res.final["val_acc_per_exit"]) == 2
    assert res.model is model and model.training
    assert res.checkpoint is None


RESUME_CONFIGS = [
    {"augment": "crop_flip", "warmup_epochs": 0.5, "distill": 0.5, "exit_weights": "linear"},
    {
        "optimizer": "adamw",
        "lr": 0.01,
        "schedule": "constant",
        "grad_clip": 0.5,
        "label_smoothing": 0.1,
        "exit_weights": [1.0, 2.0],
    },
]


@pytest.mark.parametrize("extra", RESUME_CONFIGS, ids=["sgd-cosine-aug-distill", "adamw-constant-clip"])
def test_resume_is_bitwise_equal(tmp_path, extra):
    data, val = make_data(100), make_data(40, seed=1)  # 100 = 3 full batches + a partial one

    torch.manual_seed(1234)  # global state before the call must not matter
    full = make_model()
    cfg = TrainConfig(**{**FAST, **extra}, checkpoint_dir=str(tmp_path / "a"))
    ref = train(full, data, cfg, eval_data=val)

    part = make_model()
    cfg_b = TrainConfig(**{**FAST, **extra}, checkpoint_dir=str(tmp_path / "b"))
    first = train(part, data, cfg_b, eval_data=val, stop_after_epoch=1)
    assert len(first.history) == 1 and load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1

    torch.manual_seed(999)
    torch.rand(100)  # disturb the global RNG, as a fresh process would have a different state
    resumed_model = make_model(seed=5)  # different init: the weights must come from the checkpoint
    resumed = train(resumed_model, data, cfg_b, eval_data=val, resume=True)

    ref_sd, got_sd = full.state_dict(), resumed_model.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in ref.history]


def test_runs_are_deterministic():
    data = make_data(64)
    sds = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        m = make_model()
        train(m, data, TrainConfig(**{**FAST, "epochs": 2}, augment="crop_flip"))
        sds.append(m.state_dict())
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_frozen_parameters_stay_frozen(tmp_path):
    model = make_model()
    for p in model.stem.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    exit_before = model.exit2.weight.clone()
    train(model, make_data(64), TrainConfig(**{**FAST, "epochs": 2}, checkpoint_dir=str(tmp_path)))
    for k, v in model.stem.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert not torch.equal(model.exit2.weight, exit_before)
    opt = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(opt["param_groups"][0]["params"]) == n_trainable == 6


def test_checkpoint_is_atomic_and_complete(tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 2}, checkpoint_dir=str(tmp_path / "ck"))
    model = make_model()
    res = train(model, make_data(64), cfg)
    assert os.listdir(tmp_path / "ck") == ["last.pt"]  # no temp files left behind
    assert res.checkpoint == str(tmp_path / "ck" / "last.pt")
    state = load_checkpoint(res.checkpoint)
    assert state["epoch"] == 2 and state["config"] == asdict(cfg) and len(state["history"]) == 2
    assert state["step"] == 2 * 2  # 64 samples / batch 32, two epochs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state["model"].items())


def test_resume_without_checkpoint(tmp_path):
    cfg = TrainConfig(**FAST, checkpoint_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "last.pt")):
        train(make_model(), make_data(32), cfg, resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(make_model(), make_data(32), TrainConfig(**FAST), resume=True)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_checkpoint"])
def test_resume_from_corrupt_checkpoint(tmp_path, damage):
    cfg = TrainConfig(**{**FAST, "epochs": 1}, checkpoint_dir=str(tmp_path))
    path = tmp_path / "last.pt"
    if damage == "garbage":
        path.write_bytes(b"definitely not a checkpoint")
    elif damage == "truncated":
        train(make_model(), make_data(32), cfg)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="last.pt"):
        train(make_model(), make_data(32), TrainConfig(**FAST, checkpoint_dir=str(tmp_path)), resume=True)


def test_static_model_and_custom_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))  # returns a plain (B, C) tensor
    calls = []

    def loss_fn(out, target):
        calls.append(type(out))
        return nn.functional.cross_entropy(out, target)

    data = make_data(64)
    res = train(model, data, TrainConfig(**{**FAST, "epochs": 1}), eval_data=data, loss_fn=loss_fn)
    assert calls == [torch.Tensor] * 2
    assert len(res.final["val_acc_per_exit"]) == 1


def test_dynamic_eval_fallback_records_overall_accuracy():
    class AlwaysDynamic(TinyExitNet):
        def forward(self, x):  # decides on a submodule's flag, so the root flag cannot ask for all exits
            h = self.stem(x)
            z1, z2 = self.exit1(h), self.exit2(self.stage2(h))
            if self.exit2.training:
                return MultiExitOutput([z1, z2])
            return DynamicOutput(z2, torch.ones(len(x), dtype=torch.long), torch.zeros(len(x)))

    torch.manual_seed(0)
    res = train(
        AlwaysDynamic(), make_data(64), TrainConfig(**{**FAST, "epochs": 1}), eval_data=make_data(32, seed=3)
    )
    assert "val_acc" in res.final and "val_acc_per_exit" not in res.final


def test_training_mode_dynamic_output_is_rejected():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            z = self.lin(x.flatten(1))
            return DynamicOutput(z, torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x)))

    with pytest.raises(TypeError, match="MultiExitOutput"):
        train(Wrong(), make_data(32), TrainConfig(**FAST))


def test_progress_bar_runs(capsys):
    train(make_model(), make_data(32), TrainConfig(**{**FAST, "epochs": 1, "progress": True}))


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", 1.5),
        ("batch_size", 0),
        ("batch_size", True),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("optimizer", "adam"),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("schedule", "step"),
        ("warmup_epochs", -1.0),
        ("warmup_epochs", 100.0),
        ("seed", -1),
        ("augment", "mixup"),
        ("exit_weights", "cubic"),
        ("exit_weights", [1.0, -1.0]),
        ("distill", 1.5),
        ("temperature", 0.0),
        ("label_smoothing", 1.0),
        ("checkpoint_dir", 3),
        ("progress", "yes"),
        ("grad_clip", 0.0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: expected .* got"):
        TrainConfig(**{field: value})


def test_bad_data_and_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="data"):
        train(model, object(), TrainConfig(**FAST))
    with pytest.raises(ValueError, match="data"):
        train(model, Data(torch.zeros(4, 3, 8, 8), torch.zeros(3, dtype=torch.long)), TrainConfig(**FAST))
    with pytest.raises(ValueError, match="eval_data"):
        train(model, make_data(32), TrainConfig(**FAST), eval_data=Data(torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="crop_flip"):
        flat = Data(torch.zeros(8, 192), torch.zeros(8, dtype=torch.long))
        train(nn.Linear(192, 4), flat, TrainConfig(**FAST, augment="crop_flip"))
    with pytest.raises(ValueError, match="stop_after_epoch"):
        train(model, make_data(32), TrainConfig(**FAST), stop_after_epoch=0)
    frozen = nn.Linear(192, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(frozen, Data(torch.zeros(8, 192), torch.zeros(8, dtype=torch.long)), TrainConfig(**FAST))


def test_random_crop_flip_is_a_padded_crop():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    again = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and torch.equal(out, again)
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        candidates = [
            c
            for i in range(5)
            for j in range(5)
            for c in (padded[b, :, i : i + 6, j : j + 6], padded[b, :, i : i + 6, j : j + 6].flip(-1))
        ]
        assert any(torch.equal(out[b], c) for c in candidates)
    with pytest.raises(ValueError, match="crop_flip"):
        random_crop_flip(x[0], torch.Generator())


def test_resume_warns_on_changed_config_and_finished_run_is_a_no_op(tmp_path):
    data = make_data(32)
    cfg = TrainConfig(**{**FAST, "epochs": 2}, checkpoint_dir=str(tmp_path))
    model = make_model()
    done = train(model, data, cfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = train(model, data, cfg, resume=True)  # nothing left to do
    assert again.history == done.history
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with pytest.warns(UserWarning, match="lr"):
        train(
            make_model(),
            data,
            TrainConfig(**{**FAST, "epochs": 2, "lr": 0.5}, checkpoint_dir=str(tmp_path)),
            resume=True,
        )


class ScaledNet(TinyExitNet):
    """TinyExitNet whose second exit learns at 10x the lr (the `lr_scales()` hook of the loop)."""

    scale = 10.0

    def lr_scales(self):
        return {p: self.scale for p in self.exit2.parameters()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_scales_make_parameter_groups(optimizer):
    # reference: one step by hand with two optimiser groups, the second at 10x the lr
    data = make_data(32)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer=optimizer, momentum=0.0, progress=False)
    torch.manual_seed(3)
    model = ScaledNet(p=0.0)
    ref = make_model(seed=3, p=0.0)
    train(model, data, cfg)
    others = [p for n, p in ref.named_parameters() if not n.startswith("exit2.")]
    groups = [{"params": others, "lr": 0.05}, {"params": list(ref.exit2.parameters()), "lr": 0.5}]
    opt = (
        torch.optim.SGD(groups, lr=0.05, momentum=0.0, weight_decay=cfg.weight_decay)
        if optimizer == "sgd"
        else torch.optim.AdamW(groups, lr=0.05, weight_decay=cfg.weight_decay)
    )
    ref.train()
    perm = torch.randperm(32, generator=_epoch_generator(cfg.seed, 0, 0))  # the loop's first shuffle
    torch.manual_seed(cfg.seed)
    out = ref(data.x[perm])
    loss = sum(torch.nn.functional.cross_entropy(z, data.y[perm]) for z in out.exit_logits) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    model.scale = 0.0
    with pytest.raises(ValueError, match="lr_scales.*> 0, got 0.0"):
        train(model, data, cfg)


def test_teacher_distillation_teaches_what_the_labels_do_not():
    """Labels drawn at random carry nothing; with kd=1 the student learns the teacher's function."""
    data = make_data(256, seed=3)
    data = Data(data.x, torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(7)))
    torch.manual_seed(11)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with torch.no_grad():
        teacher[1].weight.mul_(5.0)  # confident: its soft targets carry its decisions
    teacher.train()  # the loop runs it in eval mode and gives its flag back
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = {**FAST, "epochs": 20, "lr": 0.1, "temperature": 1.0}

    def agreement(student) -> float:
        with torch.no_grad():
            student.train()  # the tiny net's every-exit path: the last exit
            z = student(data.x).exit_logits[-1]
            return float((z.argmax(-1) == teacher(data.x).argmax(-1)).float().mean())

    taught = make_model(p=0.0)
    train(taught, data, TrainConfig(**cfg, kd=1.0), teacher=teacher)
    labels_only = make_model(p=0.0)
    train(labels_only, data, TrainConfig(**cfg))
    assert teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert agreement(taught) > 0.9
    assert agreement(labels_only) < 0.6


def test_teacher_distillation_bad_arguments():
    data, model = make_data(32), make_model()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(
        ValueError, match="teacher and TrainConfig.kd: expected both .* got teacher=None and kd=0.5"
    ):
        train(model, data, TrainConfig(**FAST, kd=0.5))
    with pytest.raises(ValueError, match="got teacher=Sequential and kd=0.0"):
        train(model, data, TrainConfig(**FAST), teacher=teacher)
    with pytest.raises(ValueError, match="expected no loss_fn with it"):
        train(model, data, TrainConfig(**FAST, kd=0.5), teacher=teacher, loss_fn=lambda o, y: o.sum())
    with pytest.raises(
        ValueError, match="shares no parameters with the one being trained, got the same module"
    ):
        train(model, data, TrainConfig(**FAST, kd=0.5), teacher=model)
    with pytest.raises(ValueError, match="got one that shares some"):
        train(model, data, TrainConfig(**FAST, kd=0.5), teacher=nn.Sequential(model.stem, nn.Linear(16, 4)))
    with pytest.raises(TypeError, match="teacher: expected None or an nn.Module, got str"):
        train(model, data, TrainConfig(**FAST, kd=0.5), teacher="static")
    with pytest.raises(ValueError, match=r"TrainConfig.kd: expected a float in \[0, 1\], got 2"):
        TrainConfig(kd=2)


class ModeSpy(nn.Module):
    """A teacher that records the mode it runs in; one submodule arrives in a mode of its own."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
        self.norm = nn.BatchNorm1d(4)
        self.seen: set[bool] = set()

    def forward(self, x):
        self.seen.add(self.training or self.norm.training)
        return self.norm(self.body(x))


def test_teacher_runs_in_eval_mode_and_every_submodule_gets_its_mode_back():
    teacher = ModeSpy().train()
    teacher.norm.eval()  # e.g. frozen batch-norm statistics inside a model left in train mode
    stats = teacher.norm.running_mean.clone()
    train(make_model(), make_data(64), TrainConfig(**{**FAST, "epochs": 1}, kd=0.5), teacher=teacher)
    assert teacher.seen == {False}  # every training batch saw it in eval mode
    assert teacher.training and teacher.body.training and not teacher.norm.training
    assert torch.equal(teacher.norm.running_mean, stats)  # eval mode: its statistics never moved
