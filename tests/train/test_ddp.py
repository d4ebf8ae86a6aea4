"""Two gloo processes under torchrun train exactly like one process with the same global batch.

The DDP run is also interrupted after epoch 2 and resumed from rank 0's checkpoint, so the
comparison covers checkpointing and resuming under DDP as well.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynets.train import load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir: Path, *args: str) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        str(out_dir),
        *args,
    ]
    # own session, so a hang can be killed with every worker rather than orphaning them
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after 120 s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker_module", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_ddp_matches_single_process(tmp_path, monkeypatch):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()

    # 1. DDP on 2 ranks, interrupted after epoch 2 (rank 0 alone writes the checkpoint), then resumed.
    _torchrun(ddp_dir, "--interrupt-after", "2")
    assert sorted(os.listdir(ddp_dir / "ckpt")) == ["last.pt"]
    ckpt = load_checkpoint(ddp_dir / "ckpt" / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    ddp = torch.load(ddp_dir / "final.pt", weights_only=True)
    assert ddp["world_size"] == 2 and not ddp["group_left"]
    assert ddp["interrupted_history"] == [1, 2]
    assert [h["epoch"] for h in ddp["history"]] == [1, 2, 3]

    # 2. the same call in this (single) process, uninterrupted.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    single = _load_worker().run(str(single_dir))
    assert single["world_size"] == 1

    for k, v in single["state"].items():
        torch.testing.assert_close(ddp["state"][k], v, atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert torch.equal(ddp["state"]["frozen.weight"], single["state"]["frozen.weight"])
    for a, b in zip(ddp["history"], single["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["val_acc_per_exit"] == b["val_acc_per_exit"]

    # the frozen conv kept its initial value, i.e. DDP never touched it
    torch.manual_seed(0)
    init = _load_worker().TwoExitNet().state_dict()
    assert torch.equal(single["state"]["frozen.weight"], init["frozen.weight"])
    assert not torch.equal(single["state"]["exit2.weight"], init["exit2.weight"])


def test_single_process_context_and_shard():
    from dynets.train.distributed import DistInfo, distributed_context, shard

    with distributed_context() as info:
        assert info == DistInfo(0, 1) and info.is_main and not info.enabled
    assert not torch.distributed.is_initialized()

    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    parts = [shard(perm, DistInfo(r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]  # trimmed to 9 so every rank takes the same steps
    assert sorted(torch.cat(parts).tolist()) == sorted(perm[:9].tolist())
    # local batch i of every rank together is global batch i (global batch 6, per-rank batch 2)
    for i in range(2):
        local = torch.cat([p[i * 2 : (i + 1) * 2] for p in parts])
        assert sorted(local.tolist()) == sorted(perm[:9][i * 6 : (i + 1) * 6].tolist())
    assert torch.equal(shard(perm, DistInfo()), perm)
