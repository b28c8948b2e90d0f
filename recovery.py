"""Checkpoints, resuming, interruptions and the NaN guard (plumbing: a reader of the method can skip this).

An RL run on SD3.5 takes hours; a crash, a Ctrl-C, a full disk or one NaN must not cost it. A checkpoint is
a folder <output_dir>/checkpoints/epoch_NNNN/ with
    weights.safetensors   the trainable parameters by name (the whole tiny model; the LoRA weights on SD3.5)
    state.pt              the optimizer, the EMA of the weights, and for each process its random states (python,
                          numpy, torch, the prompt generator) and prompt-encoding order (Model.encoded) (tensors,
                          dicts, strings and numbers only: read back with torch.load(weights_only=True), which
                          cannot run code)
    meta.json             epoch, settings, the number of processes, the metric rows so far, the NaN guard's
                          count, and the SHA-256 of the two files above
It is written as .tmp-epoch_NNNN and renamed when complete (a rename is atomic), so a crash or a full disk
mid-write leaves the earlier checkpoints as they were. --resume DIR takes the newest checkpoint that matches
its checksums and loads (a damaged one is renamed *.damaged, with a message), cuts metrics.jsonl back to the
checkpoint's rows and continues; on the CPU the result is bitwise that of an uninterrupted run (tested).
The rollout noise and the update's shuffle are keyed by (seed, epoch, prompt group) (distributed.group_draws)
and hold no state, so a run saved by K processes may resume with another number of processes: the gradient
accumulation is rescaled to keep the optimizer steps (the same run, up to rounding; tested). Under torchrun
process 0 finds, reads and writes checkpoints for all. Exit codes are in vgpo.main.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import traceback
from dataclasses import dataclass

import numpy as np
import torch

import distributed
from harness import UsageError, flag

# Flags that may differ from the saved run on --resume: they change when or where things happen, or how much memory
# it takes, not what is computed (a change of --device does change the numbers a little; the run says so).
SAFE_ON_RESUME = ("epochs", "eval_every", "save_every", "keep_checkpoints", "nan_patience", "device",
                  "eval_batch_size", "gradient_checkpointing")
CHECKPOINT_FILES = ("weights.safetensors", "state.pt")


class RunStopped(Exception):
    """The run stopped early after saving a checkpoint (a signal, or the NaN guard); `code` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------
# Resuming: which settings, which checkpoint
# ----------------------------------------------------------------------------------------------------


def _check_same(saved: dict, given: dict, where: str) -> None:
    """A one-line error for the first setting in `given` that is not safe to change and differs from `saved`."""
    for k, v in given.items():
        if k not in (*SAFE_ON_RESUME, "resume", "output_dir") and k in saved and saved[k] != v:
            raise UsageError(f"{flag(k)} {v!r} conflicts with {saved[k]!r} in {where}: a resumed run may change "
                             f"only {', '.join(map(flag, SAFE_ON_RESUME))}; start a new run to change {flag(k)}")


def for_these_processes(saved: dict, processes: int, where: str, say: bool = True) -> dict:
    """The settings `saved` by a run of `processes` processes, for this run's number K: the same optimizer steps
    (processes × gradient_accumulation_steps micro-batches each) with the accumulation rescaled (and, with `say`,
    a note), or a one-line error where K cannot take them."""
    k, accum = distributed.world_size(), saved["gradient_accumulation_steps"]
    if processes == k:
        return saved
    if accum * processes % k:
        raise UsageError(f"{where} ran on {processes} process(es) with --gradient-accumulation-steps {accum}: its "
                         f"optimizer steps take {accum * processes} micro-batches, which {k} processes cannot "
                         f"share; resume it on a number of processes that divides {accum * processes}")
    if say and distributed.is_first():
        print(f"{where} ran on {processes} process(es), this one on {k}: --gradient-accumulation-steps {accum} → "
              f"{accum * processes // k}, the same optimizer steps", flush=True)
    return {**saved, "gradient_accumulation_steps": accum * processes // k}


# how a run saved before these fields existed ran: without the EMA, on its model's own task
OLDER_RUNS = dict(ema_decay=0.0, task="auto")


def resume_args(args_cls, resume: str, older: dict = OLDER_RUNS, **given):
    """The settings (an `args_cls`) of the run in folder `resume` (its args.json), updated with the flags in
    `given` that are safe to change (SAFE_ON_RESUME); any other flag given must repeat the saved value (the
    gradient accumulation rescaled when the number of processes changed: for_these_processes). `older`: the
    values of fields an args.json written before they existed lacks (how such a run ran)."""
    try:
        with open(os.path.join(resume, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"--resume {resume!r} is not a run folder (no readable args.json): "
                         "give a run's output folder") from None
    if given.get("output_dir") and os.path.abspath(given["output_dir"]) != os.path.abspath(resume):
        raise UsageError("a resumed run continues in its own folder: drop --output-dir")
    processes = saved.get("processes", 1)
    saved = {**(older or {}), **{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(args_cls)}}}
    saved = for_these_processes(saved, processes, f"the run in {resume}")
    _check_same(saved, given, f"the run in {resume}")
    safe = {k: v for k, v in given.items() if k in SAFE_ON_RESUME}
    return args_cls(**{**saved, **safe, "resume": resume, "output_dir": resume})


def find_checkpoint(args) -> dict:
    """The newest checkpoint in args.resume that is complete and undamaged, read. A damaged one is renamed
    *.damaged (kept for inspection, out of the way of later saves), reported, and the previous one tried.
    Under torchrun process 0 looks and sends the checkpoint to the others."""
    return distributed.on_first(_find_checkpoint, args)


def _find_checkpoint(args) -> dict:
    root = os.path.join(args.resume, "checkpoints")
    names = [n for n in (os.listdir(root) if os.path.isdir(root) else []) if re.fullmatch(r"epoch_\d+", n)]
    for name in sorted(names, key=lambda n: int(n[6:]), reverse=True):
        path = os.path.join(root, name)
        try:
            ckpt = read_checkpoint(path)
        except Exception as e:  # truncation, flipped bits, missing files: all end up here
            shutil.rmtree(path + ".damaged", ignore_errors=True)
            os.rename(path, path + ".damaged")
            print(f"vgpo.py: checkpoint {path} is damaged ({type(e).__name__}: {e}); set aside as {name}.damaged, "
                  "trying the one before it", file=sys.stderr, flush=True)
            continue
        saved = for_these_processes(ckpt["args"], ckpt.get("processes", 1), f"checkpoint {path}", say=False)
        _check_same(saved, dataclasses.asdict(args), f"checkpoint {path}")
        if ckpt["epoch"] >= args.epochs:
            raise UsageError(f"the run in {args.resume} has reached epoch {ckpt['epoch']}: give --epochs above "
                             f"{ckpt['epoch']} to train it further")
        print(f"resuming {args.resume} from {name} (epoch {ckpt['epoch']}, training to epoch {args.epochs})",
              flush=True)
        return ckpt
    raise UsageError(f"no usable checkpoint in {root}: the run saved none (see --save-every); start a new run")


# ----------------------------------------------------------------------------------------------------
# Writing, reading and restoring a checkpoint
# ----------------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:  # a file or a folder on disk, not only in the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_states(rngs: dict) -> dict:
    """This process's random states: the global ones and the numpy generators in `rngs` (the prompts'), as
    tensors, dicts and numbers. Rollout noise and shuffles are keyed by the epoch and hold no state."""
    np_global = np.random.get_state(legacy=False)
    np_global["state"]["key"] = np_global["state"]["key"].tolist()  # weights_only loads no numpy arrays
    return {"python": random.getstate(), "numpy": np_global, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **{name: gen.bit_generator.state for name, gen in rngs.items()}}


def set_rng_states(s: dict, rngs: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.device_count() == len(s["cuda"]):
        torch.cuda.set_rng_state_all(s["cuda"])
    for name, gen in rngs.items():
        gen.bit_generator.state = s[name]


def save_checkpoint(out_dir, epoch, args, model, optimizer, rngs, guard, history, ema=None) -> str | None:
    """Write checkpoints/epoch_NNNN atomically and keep the newest `args.keep_checkpoints`. Returns its path,
    or None (with a warning; the run goes on) when it could not be written, e.g. on a full disk. Under torchrun
    every process calls it: process 0 writes, with every process's random states and prompt-encoding order."""
    from safetensors.torch import save_file

    per_process = distributed.gather_objects({"rng": rng_states(rngs), "encoded": model.encoded})
    if not distributed.is_first():
        return None

    root = os.path.join(out_dir, "checkpoints")
    final, tmp = os.path.join(root, f"epoch_{epoch:04d}"), os.path.join(root, f".tmp-epoch_{epoch:04d}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        weights = {n: p.detach().cpu().contiguous()
                   for n, p in model.transformer.named_parameters() if p.requires_grad}
        save_file(weights, os.path.join(tmp, "weights.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "per_process": per_process,
                    "ema": ema.state_dict() if ema is not None else {}}, os.path.join(tmp, "state.pt"))
        meta = {"epoch": epoch, "args": dataclasses.asdict(args), "history": history,
                "processes": len(per_process), "nan_in_a_row": guard.in_a_row,
                "sha256": {f: _sha256(os.path.join(tmp, f)) for f in CHECKPOINT_FILES}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        for f in (*CHECKPOINT_FILES, "meta.json", ""):  # the files, then the folder, reach the disk
            _fsync(os.path.join(tmp, f))
        if os.path.exists(final):  # a resumed run passing an epoch saved before (it was set aside as damaged)
            shutil.rmtree(final)
        os.rename(tmp, final)  # the moment the checkpoint exists, complete
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"vgpo.py: warning: could not save checkpoint {final} ({e}); the run goes on", file=sys.stderr,
              flush=True)
        return None
    # keep the newest K; also clear temporary folders left by a run killed mid-write
    done = sorted((n for n in os.listdir(root) if re.fullmatch(r"epoch_\d+", n)), key=lambda n: int(n[6:]))
    for name in done[: -args.keep_checkpoints] + [n for n in os.listdir(root) if n.startswith(".tmp-")]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def read_checkpoint(path: str) -> dict:
    """meta.json of a checkpoint with `weights` and `state` added, on the CPU; raises if anything is damaged."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "meta.json")) as f:
        ckpt = json.load(f)
    for name in CHECKPOINT_FILES:
        if _sha256(os.path.join(path, name)) != ckpt["sha256"][name]:
            raise ValueError(f"{name} does not match its checksum")
    ckpt["weights"] = load_file(os.path.join(path, "weights.safetensors"))
    ckpt["state"] = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    return ckpt


def restore_checkpoint(ckpt: dict, model, optimizer, rngs: dict, guard, ema=None) -> list[dict]:
    """Put a checkpoint's weights, optimizer state, EMA (a harness.WeightEMA), prompt cache and random states back;
    returns its rows. Process r takes process r's random states and prompt order (process 0's if the run had fewer
    processes: the loop draws nothing from the global generators, and the prompt generator is the same on every
    process)."""
    params = dict(model.transformer.named_parameters())
    if set(ckpt["weights"]) != {n for n, p in params.items() if p.requires_grad}:
        raise UsageError("the checkpoint's weights do not fit this model's trainable parameters")
    with torch.no_grad():
        for name, value in ckpt["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt["state"]["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["state"].get("ema", {}))
    # (a checkpoint written before runs could span processes: one process's states, its prompt order in meta)
    saved = ckpt["state"].get("per_process") or [{"rng": ckpt["state"]["rng"], "encoded": ckpt["encoded"]}]
    mine = saved[distributed.rank()] if distributed.rank() < len(saved) else saved[0]
    for batch in mine["encoded"]:  # the prompt cache, filled in the original order (see Model.encoded)
        model.encode(batch)
    set_rng_states(mine["rng"], rngs)
    guard.in_a_row = ckpt["nan_in_a_row"]
    return ckpt["history"]


# ----------------------------------------------------------------------------------------------------
# The NaN guard and stop signals
# ----------------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """NaN or inf in rewards or log-probs: the NaN guard skips the batch (see NanGuard)."""


def require_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """`x` unchanged, or NonFiniteError: a NaN reward would silently turn every advantage of its group into NaN."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{int((~torch.isfinite(x)).sum())} NaN/inf {what} value(s)")
    return x


@dataclass
class NanGuard:
    """Counts batches skipped for NaN/inf. A batch is one rollout (its rewards or log-probs) or one optimizer
    step (its loss or gradient); an applied optimizer step resets the count of skips in a row, and
    `patience` in a row trip the guard: the run stops after the epoch, with a checkpoint (exit code 3)."""

    patience: int
    in_a_row: int = 0
    skipped: int = 0  # in the current epoch: logged as guard/skipped_batches
    tripped: bool = False
    last: str = ""  # what was not finite, for the stop message

    def record(self, ok: bool, what: str = "") -> bool:
        """Count one batch, good (`ok`) or skipped; returns `ok`."""
        if ok:
            self.in_a_row = 0
            return True
        self.in_a_row, self.skipped, self.last = self.in_a_row + 1, self.skipped + 1, what
        self.tripped |= self.in_a_row >= self.patience
        if distributed.is_first():  # under torchrun every process takes the same decisions: one warning
            print(f"vgpo.py: warning: NaN/inf in {what}: batch skipped ({self.in_a_row} in a row; the run stops at "
                  f"{self.patience}, --nan-patience)", file=sys.stderr, flush=True)
        return False


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: the run stops at once, without a checkpoint of the epoch in progress; the exit code
    is 128 + the signal's number, as for the first."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM set `signum` and the loop stops after the epoch in progress,
    with a checkpoint; a second signal stops at once (StoppedAtOnce, the epoch is lost). Under torchrun a
    signal to any process stops all after the same epoch (`requested`); torchrun forwards Ctrl-C and SIGTERM to
    every process and kills them --shutdown-timeout seconds later (30 by default)."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise StoppedAtOnce(signum)
        self.signum = signum
        if distributed.world_size() == 1:  # under torchrun the signal may be torchrun stopping a failed run
            print(f"\nvgpo.py: {signal.Signals(signum).name}: finishing this epoch, then saving a checkpoint "
                  "(send it again to stop at once, losing the epoch)", file=sys.stderr, flush=True)

    def requested(self) -> int | None:
        """The signal that asks to stop after this epoch, received by this or any other process (None if none);
        every process must call this at the same point."""
        self.signum = distributed.largest(self.signum or 0) or None
        return self.signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _host_copy(x):
    """`x` (tensors in dicts, lists and tuples: a state_dict) with every tensor copied to host memory."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _host_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_host_copy(v) for v in x)
    return copy.deepcopy(x)


OUT_OF_MEMORY = 4  # the exit code of a run stopped by an out-of-memory error


class OutOfMemory:
    """While active, an out-of-memory error of the GPU (torch.OutOfMemoryError) inside an epoch stops the run with a
    checkpoint of the state before that epoch and says what to try, exit code 4, instead of a traceback, exit 1 and
    the epochs since the last checkpoint lost. before_epoch() keeps that state in host memory (the trainable weights,
    the optimizer, the EMA, the random states: a LoRA's worth) at the start of each epoch; the epoch in progress may
    have stepped the optimizer already, so it is not what is saved. The resumed run computes the epoch again, as an
    uninterrupted run would have (tested on the CPU, where the error is simulated). Under torchrun the other processes
    are inside a collective and cannot join a checkpoint: the last one saved stands."""

    def __init__(self, out_dir: str, args, model, optimizer, rngs: dict, guard: NanGuard, history: list, ema=None):
        self.out_dir, self.args, self.model, self.optimizer = out_dir, args, model, optimizer
        self.rngs, self.guard, self.history, self.ema = rngs, guard, history, ema
        self.epoch, self.state = None, None

    def __enter__(self):
        return self

    def _params(self) -> list:
        return [p for p in self.model.transformer.parameters() if p.requires_grad]

    def before_epoch(self, epoch: int) -> None:
        """Keep what a checkpoint of epoch − 1 holds (the loop draws this epoch's prompts after this call)."""
        self.epoch = epoch
        self.state = {"weights": [p.detach().to("cpu", copy=True) for p in self._params()],
                      "optimizer": _host_copy(self.optimizer.state_dict()),
                      "ema": _host_copy(self.ema.state_dict()) if self.ema is not None else {},
                      "rng": rng_states(self.rngs), "guard": (self.guard.in_a_row, self.guard.tripped),
                      "rows": len(self.history)}

    def __exit__(self, kind, error, tb):
        if kind is None or not issubclass(kind, torch.OutOfMemoryError) or self.state is None:
            return False
        # where it ran out (the method's function names), then the failed epoch's tensors let go: the frames below
        # this one still hold its activations, and putting the optimizer state back needs a little memory
        names = {frame.name for frame in traceback.extract_tb(tb)}
        traceback.clear_frames(tb.tb_next)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        s, epoch, args = self.state, self.epoch, self.args
        with torch.no_grad():
            for p, saved in zip(self._params(), s["weights"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(s["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
        set_rng_states(s["rng"], self.rngs)
        self.guard.in_a_row, self.guard.tripped = s["guard"]
        del self.history[s["rows"]:]
        saved = None
        if distributed.world_size() == 1:
            saved = save_checkpoint(self.out_dir, epoch - 1, args, self.model, self.optimizer, self.rngs, self.guard,
                                    self.history, self.ema)
        where = ("the evaluation" if "evaluate" in names else "the update" if "update" in names else
                 "the rewards" if "instant_rewards" in names else "the rollout" if "generate" in names else "")
        # what uses less memory on --resume (it changes memory only), then what needs a new run
        flags = [f"--eval-batch-size {max(1, args.eval_batch_size // 2)}"] if where == "the evaluation" else []
        if args.model != "tiny" and not args.gradient_checkpointing and where != "the evaluation":
            flags.append("--gradient-checkpointing")
        reason = " ".join(str(error).split())[:160]
        state = (f"checkpoint {saved} holds the state before it" if saved else
                 "no checkpoint: " + ("the other processes cannot join one now, the last saved stands"
                                      if distributed.world_size() > 1 else "see the warning above"))
        again = distributed.command(f"vgpo.py --resume {args.output_dir}{''.join(' ' + f for f in flags)}")
        new_run = "" if args.model == "tiny" or args.low_memory else (
            "; or start a new run with --low-memory (micro-batch 4, checkpointing, one image per VAE call)")
        raise RunStopped(f"out of GPU memory in {where + ' of ' if where else ''}epoch {epoch} ({reason}); {state}. "
                         f"Continue with {'less memory' if flags else 'the same settings'}: {again}{new_run}",
                         code=OUT_OF_MEMORY) from None


def raise_if_stopped(signum, guard: NanGuard, saved: str | None, args, epoch: int) -> None:
    """After a checkpoint: RunStopped if a signal came (unless the run is complete anyway) or the guard tripped."""
    where = f"checkpoint {saved}" if saved else "no checkpoint could be saved (see the warning above)"
    again = distributed.command(f"vgpo.py --resume {args.output_dir}")
    if guard.tripped:
        raise RunStopped(f"stopped after epoch {epoch}: {guard.in_a_row} batches in a row had NaN/inf (last: "
                         f"{guard.last}); {where}. Fix the cause, then continue with: {again}", code=3)
    if signum and epoch < args.epochs:
        raise RunStopped(f"stopped by {signal.Signals(signum).name} after epoch {epoch}/{args.epochs}; {where}. "
                         f"Continue with: {again}", code=128 + signum)


def exit_code(run) -> int:
    """Call `run()` (vgpo's training) and turn how it ended into vgpo.main's exit code. Usage mistakes are one
    line and exit code 2 (as argparse's own); anything else that is not a stop is a real bug and keeps its
    traceback."""
    try:
        run()
    except UsageError as e:  # under torchrun every process says it: the mistake may be its own (a missing GPU)
        print(f"vgpo.py: error: {e}", file=sys.stderr)
        return 2
    # a checkpoint was saved and the message says how to resume; or under torchrun another process failed
    except (RunStopped, distributed.ProcessFailed) as e:
        if distributed.is_first():  # the processes stop together; one says why
            print(f"vgpo.py: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:  # a second signal (or Ctrl-C before the loop): stopped at once
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"vgpo.py: {signal.Signals(signum).name}: stopped at once, without a checkpoint of the epoch in "
              "progress; if the run saved one, continue with --resume <the run's folder>", file=sys.stderr)
        return 128 + signum
    finally:
        distributed.finish()  # leave the process group (torchrun)
    return 0
