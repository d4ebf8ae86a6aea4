"""multi_exit_loss and exit_weights against references written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dynets.train import exit_weights, multi_exit_loss


def _logits(n_exits: int = 3, b: int = 6, c: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n_exits)]


def _target(b: int = 6, c: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


def _ce_ref(z: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy written out: -(1-s) log p_y - s * mean_c log p_c, averaged over the batch."""
    logp = z - z.exp().sum(-1, keepdim=True).log()
    nll = -logp[torch.arange(len(y)), y]
    return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()


def _kl_ref(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) summed over classes, mean over the batch."""
    p = torch.softmax(teacher / t, -1)
    log_q = torch.log_softmax(student / t, -1)
    return (p * (p.log() - log_q)).sum(-1).mean()


# ------------------------------------------------------------------------------------- exit_weights
def test_exit_weight_schemes():
    torch.testing.assert_close(exit_weights(4, "uniform"), torch.full((4,), 0.25))
    torch.testing.assert_close(exit_weights(4, "linear"), torch.tensor([1.0, 2, 3, 4]) / 10)
    s = torch.tensor([1.0, 2, 3]).sqrt()
    torch.testing.assert_close(exit_weights(3, "sqrt"), s / s.sum())
    assert exit_weights(1, "linear").tolist() == [1.0]


def test_exit_weights_explicit_are_normalised():
    w = exit_weights(3, [2.0, 0.0, 6.0])
    torch.testing.assert_close(w, torch.tensor([0.25, 0.0, 0.75]))
    assert w.dtype == torch.float32
    torch.testing.assert_close(exit_weights(2, torch.tensor([3.0, 1.0])), torch.tensor([0.75, 0.25]))


@pytest.mark.parametrize(
    "n, scheme, match",
    [
        (3, "cubic", "uniform"),
        (3, [1.0, 2.0], "expected 3 values"),
        (2, [1.0, -1.0], ">= 0"),
        (2, [0.0, 0.0], "not all zero"),
        (2, [1.0, float("nan")], "finite"),
        (0, "uniform", "n_exits"),
        (2, ["a", 1.0], "numbers"),
    ],
)
def test_exit_weights_bad(n, scheme, match):
    with pytest.raises(ValueError, match=match):
        exit_weights(n, scheme)


# ---------------------------------------------------------------------------------- multi_exit_loss
@pytest.mark.parametrize("scheme", ["uniform", "linear", [0.2, 0.3, 0.5]])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_plain_weighted_ce_matches_reference(scheme, smoothing):
    zs, y = _logits(), _target()
    w = exit_weights(3, scheme).double()
    ref = sum(w[k] * _ce_ref(z, y, smoothing) for k, z in enumerate(zs))
    got = multi_exit_loss(zs, y, weights=scheme, label_smoothing=smoothing)
    torch.testing.assert_close(got, ref)


def test_default_weights_are_uniform_and_single_tensor_is_one_exit():
    zs, y = _logits(), _target()
    torch.testing.assert_close(multi_exit_loss(zs, y), multi_exit_loss(zs, y, weights="uniform"))
    torch.testing.assert_close(multi_exit_loss(zs[0], y), _ce_ref(zs[0], y))


@pytest.mark.parametrize("distill, t", [(0.5, 3.0), (1.0, 1.0), (0.3, 4.0)])
def test_distillation_matches_reference(distill, t):
    zs, y = _logits(), _target()
    w = exit_weights(3, "linear").double()
    ref = w[2] * _ce_ref(zs[2], y)
    for k in range(2):
        ref = ref + w[k] * ((1 - distill) * _ce_ref(zs[k], y) + distill * t**2 * _kl_ref(zs[2], zs[k], t))
    got = multi_exit_loss(zs, y, weights="linear", distill=distill, temperature=t)
    torch.testing.assert_close(got, ref)


def test_distill_zero_equals_weighted_ce():
    zs, y = _logits(), _target()
    a = multi_exit_loss(zs, y, weights=[1.0, 2.0, 3.0], distill=0.0, temperature=7.0)
    b = sum(w * torch.nn.functional.cross_entropy(z, y) for w, z in zip([1 / 6, 2 / 6, 3 / 6], zs))
    torch.testing.assert_close(a, b)


def test_no_gradient_into_teacher_through_distillation():
    zs, y = _logits(), _target()
    # Teacher weight 0: its only link to the loss is the (detached) distillation target.
    multi_exit_loss(zs, y, weights=[1.0, 1.0, 0.0], distill=1.0).backward()
    assert torch.count_nonzero(zs[2].grad) == 0
    assert zs[0].grad.abs().sum() > 0 and zs[1].grad.abs().sum() > 0

    # With weight on the teacher, its gradient is exactly that of its own CE term.
    zs2 = _logits()
    multi_exit_loss(zs2, y, weights="uniform", distill=0.7).backward()
    own = _logits()[2]
    (_ce_ref(own, y) / 3).backward()
    torch.testing.assert_close(zs2[2].grad, own.grad)


def test_loss_is_finite_scalar_and_differentiable_in_float32():
    zs = [z.detach().float().requires_grad_() for z in _logits()]
    loss = multi_exit_loss(zs, _target(), distill=0.5)
    assert loss.shape == () and loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distill": -0.1}, "distill"),
        ({"distill": 1.5}, "distill"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"weights": [1.0, 1.0]}, "expected 3 values"),
        ({"weights": "steep"}, "uniform"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multi_exit_loss(_logits(), _target(), **kwargs)


def test_bad_shapes():
    zs, y = _logits(), _target()
    with pytest.raises(ValueError, match="at least one"):
        multi_exit_loss([], y)
    with pytest.raises(ValueError, match=r"exit_logits\[1\]"):
        multi_exit_loss([zs[0], zs[1][:, :3], zs[2]], y)
    with pytest.raises(ValueError, match=r"exit_logits\[0\]"):
        multi_exit_loss(zs, y[:4])
    with pytest.raises(ValueError, match="target"):
        multi_exit_loss(zs, y.float())
    with pytest.raises(ValueError, match="non-empty"):
        multi_exit_loss([z[:0] for z in zs], y[:0])


@pytest.mark.parametrize("kd, distill, t", [(0.5, 0.0, 3.0), (1.0, 0.0, 1.0), (0.3, 0.6, 4.0)])
def test_teacher_distillation_matches_reference(kd, distill, t):
    zs, y = _logits(), _target()
    teacher = _logits(n_exits=1, seed=5)[0].detach()
    w = exit_weights(3, "sqrt").double()
    ref = 0.0
    for k in range(3):
        own = _ce_ref(zs[k], y)
        if k < 2:
            own = (1 - distill) * own + distill * t**2 * _kl_ref(zs[2], zs[k], t)
        ref = ref + w[k] * ((1 - kd) * own + kd * t**2 * _kl_ref(teacher, zs[k], t))
    got = multi_exit_loss(
        zs, y, weights="sqrt", distill=distill, temperature=t, teacher_logits=teacher, kd=kd
    )
    torch.testing.assert_close(got, ref)


def test_teacher_distillation_pulls_towards_the_teacher_and_never_into_it():
    z = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    multi_exit_loss(z, torch.zeros(4, dtype=torch.long), teacher_logits=teacher, kd=1.0).backward()
    assert teacher.grad is None
    # descending the gradient from uniform logits moves probability towards the teacher's classes
    step = torch.softmax(-z.grad, -1)
    assert (step.argmax(-1) == teacher.argmax(-1)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kd": 0.5}, "teacher_logits and kd: expected both"),
        ({"teacher_logits": torch.zeros(6, 5, dtype=torch.float64)}, "teacher_logits and kd"),
        ({"teacher_logits": torch.zeros(6, 5), "kd": 1.5}, r"kd: expected a float in \[0, 1\], got 1.5"),
        (
            {"teacher_logits": torch.zeros(6, 4), "kd": 0.5},
            r"teacher_logits: expected shape .*\(6, 5\).* got \(6, 4\)",
        ),
    ],
)
def test_teacher_distillation_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multi_exit_loss(_logits(), _target(), **kwargs)
