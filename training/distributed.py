"""DDP plumbing: detect torchrun from RANK, or spawn `--world_size` processes ourselves.

Like nanoGPT, a run is distributed exactly when RANK is in the environment; one
`master` flag (rank 0) decides who logs, samples and saves.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda:<local_rank> when CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def setup(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun / spawn (RANK set), else single process."""
    if "RANK" not in os.environ:
        return DistInfo(device=resolve_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Long timeout: rank 0 alone draws the sample grid while the others wait at the next
        # collective; the default would kill a large-image run during sampling.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    log.debug("rank %d/%d on %s (%s)", rank, world_size, device, backend)
    return DistInfo(rank, local_rank, world_size, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(rc: int) -> NoReturn:
    """End a distributed rank's process now, without finalizing the interpreter.

    gloo's worker threads outlive `destroy_process_group` (DDP still holds the group) and
    may still be releasing the last collective's tensors, which takes the GIL; an
    interpreter finalizing under them kills the thread inside C++ and the rank aborts
    ("terminate called without an active exception": 9 of 60 SIGTERM stops of a 2-rank
    run here). The rank has saved and logged by now, so flush and leave.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(local_rank: int, world_size: int, port: int, fn: Callable[..., Any], arg: Any) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if "OMP_NUM_THREADS" not in os.environ:
        # N processes on one machine: split the cores instead of each taking them all.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    exit_rank(fn(arg))


def spawn(fn: Callable[[Any], int], arg: Any, world_size: int) -> None:
    """Run `fn(arg)` in `world_size` fresh processes joined into one group (`--world_size N`).

    `fn` must be a module-level function (the spawn start method pickles it by name).
    A failure in any rank raises here in the parent.
    """
    import signal

    import torch.multiprocessing as mp

    port = _free_port()
    ctx = mp.spawn(_spawned, args=(world_size, port, fn, arg), nprocs=world_size, join=False)

    def forward(signum: int, frame: Any) -> None:
        # Like torchrun: a SIGTERM to the launcher reaches every rank, which saves and exits.
        for p in ctx.processes:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signum)

    sigints = [0]

    def on_sigint(signum: int, frame: Any) -> None:
        # A terminal's Ctrl-C reaches the ranks too (one process group); a SIGINT sent to
        # the launcher alone must still stop them. Forwarded as SIGTERM, so a rank never
        # takes it for the second Ctrl-C that quits without saving.
        sigints[0] += 1
        if sigints[0] > 1:
            raise KeyboardInterrupt
        forward(signal.SIGTERM, frame)

    old = signal.signal(signal.SIGTERM, forward)
    old_int = signal.signal(signal.SIGINT, on_sigint)
    try:
        while not ctx.join():
            pass
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when the flag is set on any rank; all ranks must call it at the same step."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from `src` to every rank (identity when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable value, in rank order (one-element list when not distributed)."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
