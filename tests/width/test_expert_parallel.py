"""Expert parallelism: 2 gloo processes give the single-process MoE's outputs and grads.

Run as a script (by the test, or by torchrun), this file is also the worker: each rank builds the
same full MoE, keeps its half of the experts in an ExpertParallelMoE, averages the gradients of the
non-expert parameters over the ranks as DDP would (the experts left out), and compares its outputs,
stats and gradients against the full model computed in-process on every rank's tokens with DDP's
objective (the mean of the ranks' losses). DDP itself is not used here: its first construction
imports torch._dynamo, which alone takes longer than this whole test should;
`ddp_ignore_expert_parameters` is checked on the attributes DDP reads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynets.width.expert_parallel import (
    ExpertParallelMoE,
    ddp_ignore_expert_parameters,
    expert_parameter_names,
    non_expert_parameters,
)
from dynets.width.moe import MoE, MoEConfig

D, WORLD = 8, 2


class Net(nn.Module):
    """A data-parallel linear, then the MoE block with a residual."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        return h + self.ffn(h)


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    n = 9 + 4 * rank  # ranks hold different token counts: uneven splits both ways
    return torch.randn(2, n, D, generator=g), torch.randn(2, n, D, generator=g)


def _full_moe(k: int, dropless: bool) -> MoE:
    torch.manual_seed(0)
    return MoE(MoEConfig(D, 16, num_experts=4, k=k, capacity_factor=1.0, dropless=dropless))


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict[str, object] = {"rank": rank}
    try:
        ExpertParallelMoE(MoEConfig(D, 16, num_experts=3))
    except ValueError as e:
        report["bad_world_error"] = str(e)
    for k, dropless in ((1, False), (2, False), (2, True)):
        full = _full_moe(k, dropless)
        ref = Net(full)
        torch.manual_seed(1)
        ref.pre.reset_parameters()
        ep_net = Net(ExpertParallelMoE.from_moe(full))
        ep_net.pre.load_state_dict(ref.pre.state_dict())
        ignored = ddp_ignore_expert_parameters(ep_net)
        x, w = _data(rank)
        y = ep_net(x)
        stats = ep_net.ffn.last_stats
        loss = (y * w).sum() + stats.aux_loss
        loss.backward()
        for p in non_expert_parameters(ep_net):  # what DDP does for the data-parallel parameters
            dist.all_reduce(p.grad)
            p.grad /= world
        # reference: the full MoE in this process on every rank's tokens, DDP's mean objective
        ref_loss, ref_y, ref_stats = 0.0, None, None
        for r in range(world):
            xr, wr = _data(r)
            yr = ref(xr)
            ref_loss = ref_loss + ((yr * wr).sum() + full.last_stats.aux_loss) / world
            if r == rank:
                ref_y, ref_stats = yr.detach(), full.last_stats
        ref_loss.backward()
        tag = f"k{k}_{'dropless' if dropless else 'cap'}"
        diffs = {"out": (y.detach() - ref_y).abs().max().item()}
        diffs["pre"] = max(
            (p.grad - q.grad).abs().max().item()
            for p, q in zip(ep_net.pre.parameters(), ref.pre.parameters())
        )
        diffs["router"] = (
            (ep_net.ffn.router.proj.weight.grad - full.router.proj.weight.grad).abs().max().item()
        )
        expert_diff = 0.0
        for i, ex in enumerate(ep_net.ffn.experts):
            twin = full.experts[ep_net.ffn.first_expert + i]
            for p, q in zip(ex.parameters(), twin.parameters()):
                expert_diff = max(expert_diff, (p.grad - q.grad).abs().max().item())
                expert_diff = max(expert_diff, (p.detach() - q.detach()).abs().max().item())
        diffs["experts"] = expert_diff
        report[tag] = {
            "diffs": diffs,
            "dropped": [stats.dropped_assignments, ref_stats.dropped_assignments],
            "expert_index_equal": bool(torch.equal(stats.expert_index, ref_stats.expert_index)),
            "ignored": ignored,
            "aux": [stats.aux_loss.item(), ref_stats.aux_loss.item()],
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path) -> None:
    """Start WORLD worker processes of this file (the env:// rendezvous torchrun would set up)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["WORLD_SIZE"] = str(WORLD)
    procs = []
    for rank in range(WORLD):
        cmd = [sys.executable, str(Path(__file__)), str(out_dir)]
        procs.append(
            subprocess.Popen(
                cmd,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # a hang can be killed with its whole group
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("expert-parallel workers timed out after 120 s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed ({p.returncode}):\n{log[-3000:]}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_expert_parallel_matches_single_process(tmp_path):
    _launch(tmp_path)
    dropped_total = 0
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "num_experts" in report["bad_world_error"] and "2" in report["bad_world_error"]
        for tag in ("k1_cap", "k2_cap", "k2_dropless"):
            r = report[tag]
            for name, diff in r["diffs"].items():
                assert diff < 1e-5, f"rank {rank} {tag}: {name} differs by {diff}"
            assert r["dropped"][0] == r["dropped"][1]
            assert r["expert_index_equal"]
            assert r["aux"][0] == pytest.approx(r["aux"][1], abs=1e-6)
            assert len(r["ignored"]) == 4 * (WORLD // WORLD) * 2  # 2 local experts x (fc1, fc2) x (w, b)
            if tag == "k2_dropless":
                assert r["dropped"][0] == 0
            else:
                dropped_total += r["dropped"][0]
    assert dropped_total > 0  # capacity 1.0 on random routing drops something: the drop path is covered


def test_world_of_one_equals_moe_and_parameter_helpers():
    full = _full_moe(2, False)
    ep = ExpertParallelMoE.from_moe(full)
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(ep(x), full(x))
    assert ep.last_stats.dropped_assignments == full.last_stats.dropped_assignments
    net = Net(ep)
    names = expert_parameter_names(net)
    assert len(names) == 16 and all(n.startswith("ffn.experts.") for n in names)
    dense = non_expert_parameters(net)
    assert len(dense) == 3  # pre.weight, pre.bias, router.proj.weight
    ignored = ddp_ignore_expert_parameters(net)
    assert ignored == names and net._ddp_params_and_buffers_to_ignore == names
    assert all(getattr(p, "_ddp_ignored", False) for n, p in net.named_parameters() if n in names)


if __name__ == "__main__":
    _worker(sys.argv[1])
