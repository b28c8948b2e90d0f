"""Several processes under torchrun (plumbing: a reader of the method can skip this).

`torchrun --nproc-per-node K vgpo.py …` starts K copies of vgpo.py; the functions here join them into one run
with PyTorch's own torch.distributed (NCCL between GPUs, gloo on the CPU). Without torchrun (no WORLD_SIZE in
the environment) no process group exists and every function is the identity: one process runs the same code.

How the work is split, and why the result does not depend on K:
- every process draws the same P prompts (one seeded generator each, in step); process r samples and trains
  the contiguous prompt groups r·P/K … (r+1)·P/K − 1 (`my_groups`), whole groups, so a group's statistics
  never need another process;
- each group's random draws (starting noise, SDE noise, the update's shuffle) come from generators keyed by
  (seed, epoch, group) (`group_draws`): a group gets the same trajectories whichever process samples it;
- what needs the whole batch is gathered: the rewards (so values, advantages, GRPO's batch std and the logged
  metrics are those of all N trajectories, on every process), the update's statistics, and the evaluation
  images (sampled in shares of whole batches, scored once on process 0);
- after each optimizer step's micro-batches the gradients are averaged over the processes
  (`average_gradients`), so K processes with micro-batch B and accumulation A take the optimizer step of one
  process with B and K·A (vgpo.update's stratified order puts the same trajectories into it);
- process 0 writes the run folder and prints; the others print only errors.
A collective whose peer has died raises ProcessFailed instead of torch's transport error. gloo notices a dead peer at
once (its connection closes); NCCL would wait for its timeout. So every collective on GPU tensors (NCCL) follows one
on CPU values (gloo) at the same point of the loop: a process that stopped is noticed there, and the others stop with
ProcessFailed. One that stops between the two leaves the others in NCCL until torchrun stops them (SIGTERM, then
SIGKILL after its --shutdown-timeout) or NCCL's timeout (30 min) ends the wait.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import numpy as np
import torch


class ProcessFailed(RuntimeError):
    """Another process of the run stopped with an error (printed by that process): this one stops too, exit 1."""

    code = 1


def world_size() -> int:
    """K, the number of processes of the run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """r, this process's index 0…K−1 (torchrun's RANK)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its node: the GPU it uses (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_first() -> bool:
    """Process 0: the one that writes the run folder and prints."""
    return rank() == 0


_failed = False  # a collective failed: the group is broken, and destroying it could block
_device = "cpu"  # this process's device (start): where gathered tensors meet
_patient = None  # a gloo group with a long timeout, for waiting on process 0's downloads (first_then_others)
DOWNLOAD_WAIT = datetime.timedelta(hours=4)  # a first download of SD3.5-M (16 GB) on a slow link


def _active() -> bool:
    return world_size() > 1 and torch.distributed.is_initialized()


def start(device: str) -> None:
    """Join the other processes (once; nothing without torchrun): NCCL for CUDA tensors and gloo for CPU tensors
    and Python objects, with torch's default timeout (30 min: a process that hangs stops the others after it). The
    GPU is named to init_process_group (device_id), so NCCL binds this process to it from the start."""
    global _device, _patient
    if world_size() == 1 or torch.distributed.is_initialized():
        return
    if device.startswith("cuda"):  # "cuda" in any library call now means this process's GPU
        gpu = torch.device("cuda", torch.device(device).index if ":" in device else local_rank())
        torch.cuda.set_device(gpu)
        _device = str(gpu)
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl", device_id=gpu)
    else:
        torch.distributed.init_process_group("gloo")
    _patient = torch.distributed.new_group(backend="gloo", timeout=DOWNLOAD_WAIT)


def finish() -> None:
    """Leave the process group (unless a peer failed: the process exits without waiting for it)."""
    if _active() and not _failed:
        torch.distributed.destroy_process_group()


def command(rest: str) -> str:
    """The command line that runs `rest` (e.g. 'vgpo.py --resume DIR') the way this run was started."""
    k, local = world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    if k == 1:
        return f"python {rest}"
    if local == k:
        return f"torchrun --standalone --nproc-per-node {k} {rest}"
    return f"torchrun --nnodes {k // local} --nproc-per-node {local} <your rendezvous options> {rest}"


def _collective(fn, *args, **kwargs):
    """torch.distributed's `fn`; a peer that died (gloo: connection closed; NCCL: timeout) is a ProcessFailed."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # torch.distributed.DistError and the transports' own errors
        global _failed
        _failed = True
        raise ProcessFailed("error: another process of this run stopped with an error (its own message says why); "
                            "this one stops too") from e


# ----------------------------------------------------------------------------------------------------
# Who does what
# ----------------------------------------------------------------------------------------------------


def my_groups(prompts: int) -> range:
    """The prompt groups (indices 0…P−1) this process samples and trains: a contiguous P/K of them."""
    share = prompts // world_size()  # harness.validate: K divides P
    return range(rank() * share, (rank() + 1) * share)


def my_batches(n: int, batch_size: int) -> slice:
    """This process's items of n processed in batches of `batch_size`: a contiguous run of whole batches (the
    batches of one process, so results do not depend on K); may be empty when there are fewer batches than K."""
    batches = -(-n // batch_size)
    first, last = (batches * r // world_size() for r in (rank(), rank() + 1))
    return slice(min(first * batch_size, n), min(last * batch_size, n))


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by the non-negative integers `key`: its draws depend on the key alone, not on
    what any process drew before (numpy's SeedSequence mixes the key into a 64-bit seed)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


def group_draws(seed: int, epoch: int, groups: range, size: int, shape: tuple, steps: int, device):
    """Epoch `epoch`'s random draws for the prompt groups `groups`, each group's from generators keyed by
    (seed, epoch, group, stream), so they do not depend on which process draws them. Returns
        noise (n, C, H, W)          the starting latents x_0 (n = len(groups)·size, groups one after another)
        step_noise (n, S, C, H, W)  ε of SDE steps 0…S−1 (S = `steps`)
        shuffle (len(groups), size) a random order of each group's `size` trajectories, for the update
    drawn on the CPU (the same numbers on every device) and moved to `device`."""
    noise, step_noise, shuffle = [], [], []
    for g in groups:
        gen = keyed_generator(seed, epoch, g, 0)  # stream 0: the rollout; 1: the shuffle, independent of it
        noise.append(torch.randn((size, *shape), generator=gen))
        step_noise.append(torch.randn((size, steps, *shape), generator=gen))
        shuffle.append(torch.randperm(size, generator=keyed_generator(seed, epoch, g, 1)))
    return torch.cat(noise).to(device), torch.cat(step_noise).to(device), torch.stack(shuffle).to(device)


# ----------------------------------------------------------------------------------------------------
# Sharing results (each the identity in one process)
# ----------------------------------------------------------------------------------------------------


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` (the same shape on each), concatenated along dim 0 in process order, on every process."""
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    _collective(torch.distributed.all_gather, parts, x.contiguous())
    return torch.cat(parts)


def gather_objects(obj) -> list | None:
    """[every process's `obj`] in process order on process 0, None on the others (Python objects, via gloo)."""
    if not _active():
        return [obj]
    out = [None] * world_size() if is_first() else None
    _collective(torch.distributed.gather_object, obj, out, dst=0)
    return out


def gather_to_first(x: torch.Tensor | None) -> torch.Tensor | None:
    """Every process's `x` (any length along dim 0, or None for nothing) concatenated in process order on process 0,
    on x's device there; None on the others. One tensor collective (NCCL between GPUs: no copy through host memory,
    no pickling), exact, in x's dtype; the shapes are agreed first (over gloo), and shorter parts padded."""
    if not _active():
        return x
    shapes = [None] * world_size()
    _collective(torch.distributed.all_gather_object, shapes, None if x is None else (tuple(x.shape), str(x.dtype)))
    known = [s for s in shapes if s is not None]
    if not known:
        return None
    rows, tail = max(shape[0] for shape, _ in known), known[0][0][1:]
    dtype = getattr(torch, known[0][1].removeprefix("torch."))
    part = torch.zeros((rows, *tail), dtype=dtype, device=_device)
    if x is not None:
        part[: len(x)] = x
    whole = torch.empty((world_size() * rows, *tail), dtype=dtype, device=_device) if is_first() else None
    _collective(torch.distributed.gather, part, list(whole.chunk(world_size())) if is_first() else None, dst=0)
    if not is_first():
        return None
    used = [r * rows + i for r, s in enumerate(shapes) if s is not None for i in range(s[0][0])]
    out = whole if len(used) == len(whole) else whole[torch.tensor(used, device=whole.device)]
    return out.to(x.device if x is not None else _device)


def on_first(fn, *args):
    """fn(*args) computed on process 0 only, its result sent to every process. If it raises there, the others
    raise ProcessFailed (process 0 reports the error, once)."""
    if not _active():
        return fn(*args)
    box = [None]
    if is_first():
        try:
            box = [(True, fn(*args))]
        except BaseException:
            _collective(torch.distributed.broadcast_object_list, [(False, None)], src=0)
            raise
    _collective(torch.distributed.broadcast_object_list, box, src=0)
    ok, result = box[0]
    if not ok:
        raise ProcessFailed("error: process 0 stopped with an error (its message says why); this one stops too")
    return result


@contextlib.contextmanager
def together(error: type):
    """Run the block; if it raised `error` on any process, raise it on every process (the first process's
    message), so that a decision one process would take alone (skip this rollout for a NaN) is taken by all.
    Every process must enter the block; other exceptions pass through as usual."""
    if not _active():
        yield
        return
    problem = None
    try:
        yield
    except error as e:
        problem = str(e)
    problems = [None] * world_size()
    _collective(torch.distributed.all_gather_object, problems, problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise error(first)


@contextlib.contextmanager
def first_then_others(wait: bool = True):
    """Process 0 runs the block first, then the others (nothing to wait for in one process, or with wait=False): a
    first download into the shared cache happens once, not in every process at once. A failure in process 0 still
    lets the others go, and they meet it themselves (the same one-line error)."""
    if not _active() or not wait:
        yield
        return
    if not is_first():
        _collective(torch.distributed.barrier, group=_patient)
    try:
        yield
    finally:
        if is_first():
            _collective(torch.distributed.barrier, group=_patient)


def largest(value: int) -> int:
    """The largest `value` over the processes, on every process (e.g. a stop signal, 0 for none)."""
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    _collective(torch.distributed.all_reduce, t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def means(values: dict[str, list]) -> dict[str, float]:
    """{key: mean of every process's values of key}: statistics of the whole update, on every process."""
    if _active():
        everyone = [None] * world_size()
        _collective(torch.distributed.all_gather_object, everyone, values)
        values = {key: [v for d in everyone for v in d.get(key, [])] for key in dict.fromkeys(k for d in everyone
                                                                                          for k in d)}
    return {key: float(np.mean(v)) for key, v in values.items()}


def average_gradients(params: list, bad: str | None) -> str | None:
    """Average the gradients of `params` over the processes (one all-reduce of all of them, flattened), before
    the optimizer step; returns `bad` (why this step is skipped, or None) agreed over the processes: a NaN
    loss that one process skipped skips the step on all. With equal weights before, the weights stay equal."""
    if not _active():
        return bad
    if largest(bad is not None):  # first, so that no process reduces gradients the others do not have
        return bad or "the loss on another process"
    grads = [p.grad for p in params if p.grad is not None]  # the same parameters on every process (same graph)
    if not grads:
        return None
    flat = torch.cat([g.flatten() for g in grads])
    _collective(torch.distributed.all_reduce, flat)
    flat /= world_size()
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))
    return None


def broadcast_weights(module: torch.nn.Module) -> None:
    """Process 0's trainable weights on every process: all start equal even if initialisation were random."""
    if not _active():
        return
    largest(0)  # over gloo first: a process that failed while loading is noticed here, not in NCCL's broadcast
    for p in module.parameters():
        if p.requires_grad:
            _collective(torch.distributed.broadcast, p.data, src=0)
