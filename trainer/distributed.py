"""Training one model data-parallel over several processes started by torchrun.

    torchrun --nproc_per_node 2 -m trainer --micro-batch 8 ...

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE (and MASTER_ADDR/PORT) in each process;
without them the run is one process and nothing here communicates. With them:

- every rank takes its own contiguous share of each optimizer step's sequences from the
  same (seed, epoch) order (``share``), so a step holds micro-batch x accumulation x world
  sequences, the data a one-process run with that effective batch sees;
- DDP averages the gradients in the backward of the last micro-batch (no_sync before it);
  losses are averaged over ranks before they are logged (the gradient norm is taken after
  DDP's averaging, so every rank already has the same one);
- rank 0 alone writes checkpoints, the database, final_model/ and dashboards;
- decisions are made once and spread with a collective that every rank reaches at the same
  point of every step (``from_main``, ``agree_stop``, ``any_rank``), so no rank waits at a
  barrier the others never reach.

A rank that dies makes the others' next collective fail: ``RankLost`` says so and names
the fix (--resume auto), and torchrun ends the run with the failed rank's exit code.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from trainer.errors import ConfigError, RankLost
from trainer.batching import Batching, Split

T = TypeVar("T")
PR_SET_PDEATHSIG = 1
TIMEOUT = timedelta(minutes=10)   # a collective waits this long for a rank that hangs (not one that dies)


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one model."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1     # ranks on this machine (torchrun's LOCAL_WORLD_SIZE)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "World":
        env = os.environ if environ is None else environ
        size = env.get("WORLD_SIZE", "1")
        return cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(size),
                   int(env.get("LOCAL_WORLD_SIZE", size)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def join(placement):
    """This process's World, the process group joined once, and the placement named with its rank.

    ``placement`` comes from ``trainer.device.place``, which under torchrun already selected this
    rank's GPU (cuda:LOCAL_RANK) before asking it anything. Returns (world, placement); one
    process: (World(), placement) unchanged.
    """
    world = World.from_env()
    if not world.parallel:
        return world, placement
    if placement.device.type == "cuda" and placement.device.index != world.local_rank:
        raise RuntimeError(f"rank {world.rank} was placed on {placement.device}, not cuda:{world.local_rank}")
    placement = dataclasses.replace(placement, description=f"{placement.description}, rank {world.rank} "
                                                             f"of {world.size}")
    if not dist.is_initialized():
        _stop_with_launcher()
        dist.init_process_group("nccl" if placement.device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
    return world, placement


def run_gpus(device: torch.device, world: World) -> tuple[int, ...]:
    """The GPUs (cuda indices) this process's run trains on and can see: its own device in one
    process; under torchrun those of this machine's ranks, each on cuda:<local_rank> (``join``),
    as rank 0 alone reports. None on the CPU."""
    if device.type != "cuda":
        return ()
    if world.parallel:
        return tuple(range(world.local_size))
    return (device.index if device.index is not None else torch.cuda.current_device(),)


def _stop_with_launcher() -> None:
    """SIGTERM this process when torchrun dies (Linux): torchrun starts each rank in a session of
    its own, so a launcher killed with SIGKILL (a notebook kernel restarted) would leave the
    ranks training on, unseen, into the folder the next run resumes from. SIGTERM, not SIGKILL:
    the ranks agree to stop after the same step and rank 0 writes an emergency checkpoint."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return                  # not Linux: the ranks end when their next collective fails
    if os.getppid() == 1:       # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module the training steps run: DDP over ``model`` when several ranks train it."""
    if not world.parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel
    # GPT-2 has no buffers, so DDP's buffer sync before each forward costs nothing.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class AgreedOutOfMemory(torch.cuda.OutOfMemoryError):
    """Out of memory in a step that every rank knows of (``any_rank``): all of them redo it."""


def forget_forward(ddp: torch.nn.Module) -> None:
    """Every rank, after a step's last forward pass whose backward will not run (the step is
    redone at a smaller micro-batch): DDP's reducer, prepared by that forward, would all-reduce
    in the next backward, even a ``no_sync`` one, that the ranks whose forward failed do not.
    ``_reset_state`` is DDP's own reset for a backward that did not happen; no public one exists."""
    reducer = getattr(ddp, "reducer", None)
    if reducer is not None:
        reducer._reset_state()


def share(sample_ids: np.ndarray, world: World) -> np.ndarray:
    """This rank's contiguous part of one optimizer step's sequences (every part the same size)."""
    n = len(sample_ids) // world.size
    return sample_ids[world.rank * n:(world.rank + 1) * n]


def step_seed(seed: int, world: World, step: int) -> int:
    """The dropout seed of one rank's optimizer step: a pure function, so nothing per rank
    has to be saved for an exact resume, and no two ranks draw the same masks."""
    return int(np.random.SeedSequence([seed, world.rank, step]).generate_state(1)[0])


# -- collectives: each one is reached by every rank at the same point --------------------------
def _collective(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise _rank_lost(exc) from exc


def _rank_lost(exc: BaseException) -> RankLost:
    first_line = (str(exc).splitlines() or [""])[0][:200]    # gloo's messages run on for lines
    return RankLost(f"another training process stopped answering ({type(exc).__name__}: {first_line}); "
                    "the run ends here: continue it from its last checkpoint with --resume auto")


def peer_failure(exc: BaseException, world: World) -> RankLost | None:
    """``exc`` as a lost rank when it is one, else None. Besides our own collectives, the
    gradient all-reduce inside DDP's backward meets a dead rank first as often as not; it
    raises the backend's error (NCCL: DistBackendError, gloo: a RuntimeError from gloo)."""
    if isinstance(exc, RankLost):
        return exc
    if world.parallel and (isinstance(exc, dist.DistBackendError)
                           or (isinstance(exc, RuntimeError) and "gloo" in str(exc).lower())):
        return _rank_lost(exc)
    return None


def mean_over_ranks(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``t`` over ranks (one all-reduce); ``t`` itself with one process."""
    if not world.parallel:
        return t
    t = t.clone()
    _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return t / world.size


def sum_over_ranks(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.parallel:
        _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return t


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (say, one ran out of memory)."""
    if not world.parallel:
        return flag
    t = torch.tensor([int(flag)], device=device)
    _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    return bool(t.item())


def from_main(world: World, decide: Callable[[], T]) -> T:
    """Rank 0 calls ``decide``; every rank gets its value, or raises the exception it raised."""
    if not world.parallel:
        return decide()
    box: list[Any] = [None]
    if world.is_main:
        try:
            box[0] = (True, decide())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box[0] = (False, exc)
    _collective(lambda: dist.broadcast_object_list(box, src=0))
    ok, value = box[0]
    if not ok:
        raise value
    return value


def spread_from_main(world: World, value: T | None, device: torch.device) -> T | None:
    """Rank 0's ``value`` (None when it has none) on every rank. A flag every step; the object
    itself only when there is one, so the common case costs one small all-reduce."""
    if not world.parallel:
        return value
    if not any_rank(world.is_main and value is not None, world, device):
        return None
    box = [value if world.is_main else None]
    _collective(lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def agree_stop(world: World, signal_name: str | None, main_cause: str | None, causes: tuple[str, ...],
               device: torch.device) -> str | None:
    """Why every rank stops before this step: a signal that any rank received, else rank 0's
    ``main_cause`` (one of ``causes``: its clock says the time limit is near); None: go on."""
    if not world.parallel:
        return signal_name or main_cause
    sig = int(signal.Signals[signal_name]) if signal_name in signal.Signals.__members__ else 0
    cause = causes.index(main_cause) + 1 if world.is_main and main_cause in causes else 0
    t = torch.tensor([sig, cause], device=device)
    _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    sig, cause = t.tolist()
    if sig:
        return signal.Signals(sig).name
    return causes[cause - 1] if cause else None


def copy_from_main(world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, extra: T) -> T:
    """Rank 0's weights, optimizer and scaler state into every rank's; returns rank 0's ``extra``.

    After rank 0 alone reloaded a checkpoint (it alone has the checkpoint store).
    """
    if not world.parallel:
        return extra
    tensors = [t for t in model.state_dict().values()]
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    for t in tensors:
        _collective(lambda t=t: dist.broadcast(t, src=0))
    box = [(extra, scaler.state_dict() if scaler.is_enabled() else None)]
    _collective(lambda: dist.broadcast_object_list(box, src=0))
    extra, scaler_state = box[0]
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    return extra


def split_for(step_batch: int, world: World, micro_batch: int) -> Split | None:
    """(micro-batch, accumulation) per rank that keep ``step_batch`` sequences per optimizer step
    with this many ranks (trainer.batching.Batching.for_world). None when the ranks cannot share
    the step evenly."""
    shared = Batching.shared(step_batch, world.size, micro_batch)
    return shared.split if shared is not None else None


def resumed_batching(saved: Batching, saved_flags: Batching, flags: Batching) -> tuple[Batching, str | None]:
    """The batching a resumed run continues with, and a note when the number of processes changed.

    ``saved`` is the checkpoint's batching (lowered after an out-of-memory error, perhaps);
    ``saved_flags`` and ``flags`` are --micro-batch and --grad-accum then and now, ``flags`` on
    this run's processes. New flags win. Otherwise each step keeps its sequences, shared by this
    many processes (2 -> 1: twice the accumulation; 1 -> 2: half).
    """
    if saved_flags.split != flags.split or saved.per_rank != flags.per_rank:
        return flags, None
    if saved.world_size == flags.world_size:
        return saved, None
    shared = saved.for_world(flags.world_size)
    if shared is None:
        raise ConfigError([f"--resume: the checkpoint's optimizer steps of {saved.per_step} sequences (from "
                           f"{saved.world_size} processes) cannot be shared evenly by {flags.world_size}; use a number "
                           "of processes that divides it (torchrun --nproc_per_node)"])
    return shared, (f"trained by {saved.world_size} process(es), resumed by {flags.world_size}: each optimizer step "
                    f"keeps its {saved.per_step} sequences, as micro-batch {shared.micro_batch} x {shared.grad_accum} "
                    f"accumulation x {flags.world_size} (was {saved.micro_batch} x {saved.grad_accum} x "
                    f"{saved.world_size})")
