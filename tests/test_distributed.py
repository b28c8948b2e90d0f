"""Tests of runs split over several processes (distributed.py), launched as a user types it: `python -m
torch.distributed.run --standalone --nproc-per-node 2 vgpo.py …` (torchrun), two processes on the CPU with gloo.
tests/probe.py is vgpo.py with a reward that misbehaves on one process (a NaN, a failure, a signal). Select these
tests with `python -m pytest -m distributed`, leave them out with `-m "not distributed"`."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import distributed
import reward
import shapes
import vgpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from probe import shapes_probe  # noqa: E402
from test_resume import flags, prompt_file, result  # noqa: E402, F401  (prompt_file: a fixture)

pytestmark = pytest.mark.distributed

# 4 prompts × 4 trajectories, T = 4, the shapes reward's partial credit (some spread in most groups); 2 processes
# with micro-batches of 4 and accumulation 1 against one process with accumulation 2: in both, 2 optimizer
# steps of 8 trajectories per epoch. Evaluation: the 4 prompts in batches of 2, one batch per process, with the
# EMA of the weights (updated at every step: each process evaluates with its own copy, saved in checkpoints).
SETTINGS = dict(prompts_per_epoch=4, num_generations=4, train_batch_size=4, num_steps=4, eval_steps=3,
                eval_batch_size=2, eval_every=2, epochs=2, reward="shapes", ema_decay=0.9, ema_update_interval=1)
TOLERANCE = 1e-5  # the processes sum the gradients in another order than one process does


def torchrun(script: str, argv: list[str], probe_plan: str = "") -> tuple[subprocess.CompletedProcess, float]:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 SCRIPT ARGV` at one thread per process;
    returns the finished process and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VGPO_PROBE": probe_plan}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *argv]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.time() - t0


def assert_close(a, b, tol):
    """The same epochs and keys, every logged number and weight within `tol` (0: bitwise)."""
    (rows_a, w_a), (rows_b, w_b) = a, b
    assert [sorted(r) for r in rows_a] == [sorted(r) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ra:
            x, y = torch.tensor(ra[key], dtype=torch.float64), torch.tensor(rb[key], dtype=torch.float64)
            assert (x - y).abs().max() <= tol, (ra["epoch"], key, ra[key], rb[key])
    assert w_a.keys() == w_b.keys()
    worst = max((w_a[k] - w_b[k]).abs().max().item() for k in w_a)
    assert worst <= tol, worst


def one_process(out, prompt_file, **kw):
    """The reference: one process, accumulation 2, in this process."""
    assert vgpo.main(flags(**{**SETTINGS, "gradient_accumulation_steps": 2, "prompts": prompt_file,
                              "output_dir": out, **kw})) == 0
    return result(out)


def two_processes(out, prompt_file, script="vgpo.py", probe_plan="", **kw):
    """Two processes under torchrun, accumulation 1."""
    argv = flags(**{**SETTINGS, "gradient_accumulation_steps": 1, "prompts": prompt_file, "output_dir": out, **kw})
    return torchrun(script, argv, probe_plan)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompt_file):
    return one_process(str(tmp_path_factory.mktemp("one") / "run"), prompt_file)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prompt_file):
    """2 epochs of VGPO by 2 processes: (the finished process, its run folder)."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    proc, _ = two_processes(out, prompt_file, save_every=1)
    return proc, out


# ---------------------------------------------------------------------------------------------------
# Two processes take the optimizer steps of one
# ---------------------------------------------------------------------------------------------------
def test_two_processes_equal_one_process_with_twice_the_accumulation_vgpo(reference, uninterrupted):
    """VGPO, 2 epochs: 2 processes with (B, A) give the metrics and weights of 1 process with (B, 2A) within 1e-5;
    process 0 alone prints (one start-up box, one line per epoch) and records the number of processes."""
    proc, out = uninterrupted
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("N = P·G = 4·4 = 16") == 1 and proc.stdout.count("epoch   2/2") == 1
    assert "2 micro-batches of 4 per process (2 processes, 2 prompts each" in proc.stdout
    assert json.load(open(os.path.join(out, "args.json")))["processes"] == 2
    assert_close(reference, result(out), TOLERANCE)
    rows, weights = reference  # and the equality is not that of two runs that did nothing
    assert all(r["reward/std"] > 0 and max(r["advantage/mean_abs"]) > 0 for r in rows[1:])
    base = shapes.load_pretrained()[0].state_dict()
    assert max((weights[k] - base[k]).abs().max().item() for k in weights) > 10 * TOLERANCE


def test_two_processes_equal_one_process_with_twice_the_accumulation_grpo_batch_std(prompt_file, tmp_path):
    """GRPO with --scale-rewards batch (the std of all N rewards, gathered from both processes): the same
    equality."""
    grpo = dict(algo="grpo", scale_rewards="batch")
    want = one_process(str(tmp_path / "one"), prompt_file, **grpo)
    proc, _ = two_processes(str(tmp_path / "two"), prompt_file, **grpo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(want, result(str(tmp_path / "two")), TOLERANCE)
    assert all(r["reward/std"] > 0 for r in want[0][1:])


# ---------------------------------------------------------------------------------------------------
# Stopping and resuming
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tmp_path_factory, prompt_file):
    """A 2-process run whose process 1 received SIGTERM in epoch 1 (copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    proc, _ = two_processes(out, prompt_file, "tests/probe.py", "1:signal@1", reward="shapes_probe", save_every=0)
    return proc, out


def test_a_signal_to_one_process_stops_both_after_the_epoch_and_resuming_gives_the_uninterrupted_run(
        stopped, uninterrupted, tmp_path):
    """SIGTERM to process 1 only: both finish epoch 1 and stop, one checkpoint is saved, process 0 alone says how
    to continue (with torchrun); `torchrun … --resume` then gives bitwise the uninterrupted 2-process run."""
    proc, stopped_out = stopped
    assert proc.returncode != 0
    assert proc.stderr.count("stopped by SIGTERM after epoch 1/2") == 1, proc.stderr[-3000:]
    assert f"Continue with: torchrun --standalone --nproc-per-node 2 vgpo.py --resume {stopped_out}" in proc.stderr
    assert "[rank" not in proc.stderr  # no process printed a traceback
    out = str(tmp_path / "run")
    shutil.copytree(stopped_out, out)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["epoch_0001"]
    assert [json.loads(ln)["epoch"] for ln in open(os.path.join(out, "metrics.jsonl"))] == [0, 1]
    proc, _ = torchrun("tests/probe.py", ["--resume", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(result(uninterrupted[1]), result(out), 0.0)


def test_a_run_of_two_processes_resumes_on_one_with_twice_the_accumulation(stopped, reference, tmp_path, capsys,
                                                                          monkeypatch):
    """The 2-process checkpoint resumed by one process: the accumulation doubles (said once), and the run ends
    as the one-process run (within 1e-5): no random state depends on how the groups were split."""
    monkeypatch.setitem(reward.REWARDS, "shapes_probe", shapes_probe)
    out = str(tmp_path / "run")
    shutil.copytree(stopped[1], out)
    assert vgpo.main(["--resume", out]) == 0
    assert capsys.readouterr().out.count("--gradient-accumulation-steps 1 → 2") == 1
    assert json.load(open(os.path.join(out, "args.json")))["gradient_accumulation_steps"] == 2
    assert_close(reference, result(out), TOLERANCE)


def test_a_resume_on_a_number_of_processes_that_cannot_share_the_steps_is_one_line(stopped, tmp_path, monkeypatch,
                                                                                   capsys):
    """The 2-process run (accumulation 1: 2 micro-batches per optimizer step) resumed by 4 processes: exit 2, one
    line saying which numbers of processes can continue it."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped[1], out)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert vgpo.main(["--resume", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "divides 2" in err, err


# ---------------------------------------------------------------------------------------------------
# A NaN and a failure on one process
# ---------------------------------------------------------------------------------------------------
def test_a_nan_on_one_process_skips_the_epoch_on_both_and_a_failure_on_one_ends_the_run(prompt_file, tmp_path):
    """Process 1's rewards are NaN in epoch 1: both skip that rollout (process 0's were finite), one warning. In
    epoch 2 process 1's reward raises: the run ends at once with a non-zero exit, the reward's error printed once,
    process 0 stopping with one line and no traceback, nothing left running."""
    out = str(tmp_path / "run")
    proc, seconds = two_processes(out, prompt_file, "tests/probe.py", "1:nan@1,raise@2", reward="shapes_probe",
                                  nan_patience=2)
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count("NaN/inf in the rollout (8 NaN/inf terminal reward value(s))") == 1, err[-3000:]
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["guard/skipped_batches"] == 1 and "reward/mean" not in rows[1]
    assert err.count("the reward 'shapes_probe' raised ValueError: probe failure on process 1") == 1, err[-3000:]
    assert err.count("another process of this run stopped with an error") <= 1
    assert "[rank0]" not in err  # process 0 printed no traceback
    assert seconds < 120


# ---------------------------------------------------------------------------------------------------
# In one process: the pieces the equality rests on
# ---------------------------------------------------------------------------------------------------
def test_a_groups_draws_do_not_depend_on_which_groups_are_drawn_with_it():
    """group_draws for groups 0…3 at once equals groups 0–1 and 2–3 drawn apart (two processes), bitwise; other
    epochs and seeds draw other numbers."""
    def draws(groups, epoch=3, seed=0):
        return distributed.group_draws(seed, epoch, groups, 4, (3, 2, 2), 2, "cpu")

    whole, first, second = draws(range(4)), draws(range(2)), draws(range(2, 4))
    for w, a, b in zip(whole, first, second):
        assert torch.equal(w, torch.cat([a, b]))
    assert whole[0].shape == (16, 3, 2, 2) and whole[1].shape == (16, 2, 3, 2, 2) and whole[2].shape == (4, 4)
    assert all(sorted(p.tolist()) == [0, 1, 2, 3] for p in whole[2])
    assert not torch.equal(draws(range(4), epoch=4)[0], whole[0]) and not torch.equal(draws(range(4), seed=1)[0],
                                                                                     whole[0])


@pytest.mark.parametrize("processes", [1, 2, 3, 5])
def test_each_process_gets_whole_batches_and_together_all_items(processes, monkeypatch):
    """my_batches: contiguous shares of whole batches (the last may be short) that cover every item once."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    for n, batch in [(10, 2), (7, 3), (3, 4), (624, 128)]:
        shares = []
        for r in range(processes):
            monkeypatch.setenv("RANK", str(r))
            shares.append(distributed.my_batches(n, batch))
        assert [i for s in shares for i in range(n)[s]] == list(range(n))
        assert all(s.start % batch == 0 for s in shares)


def test_each_optimizer_step_trains_on_an_equal_share_of_every_group(tiny_model):
    """update's stratified order: with 2 optimizer steps per rollout, each step's micro-batches hold 2 of the 4
    trajectories of each prompt, in the order `shuffle` gives, and every trajectory is trained once."""
    model, args = tiny_model
    traj = vgpo.rollout(model, ["a red circle", "two blue squares"], args, generator=torch.Generator().manual_seed(0))
    shuffle = torch.tensor([[3, 1, 0, 2], [2, 0, 3, 1]])
    seen, encode = [], model.encode
    model.encode = lambda prompts: (seen.append(list(prompts)), encode(prompts))[1]
    try:
        vgpo.update(model, traj, torch.zeros(8, 4), torch.optim.SGD(model.transformer.parameters(), lr=0.0), args,
                    shuffle)
    finally:
        model.encode = encode
    steps = [seen[0] + seen[1], seen[2] + seen[3]]  # A = 2 micro-batches of B = 2 per optimizer step
    for step in steps:
        assert step.count("a red circle") == 2 and step.count("two blue squares") == 2


@pytest.fixture(scope="module")
def tiny_model():
    args = vgpo.make_args(model="tiny", num_generations=4, prompts_per_epoch=2, train_batch_size=2,
                          gradient_accumulation_steps=2, num_steps=4)
    return vgpo.load_model(args), args


@pytest.mark.parametrize("argv, needle", [
    (["--prompts-per-epoch", "3", "--train-batch-size", "8"], "must be a multiple of the 2 processes"),
    (["--prompts-per-epoch", "2", "--num-generations", "4", "--train-batch-size", "8"],
     "N/K = 8/2 = 4 trajectories per process must be a multiple"),
])
def test_work_that_two_processes_cannot_share_is_one_line(argv, needle, monkeypatch, capsys, tmp_path):
    """Under torchrun with 2 processes (WORLD_SIZE=2, before any process group): P not a multiple of 2, or a
    process's share not a multiple of B·A, is one line and exit code 2."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert vgpo.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_optimizer_steps_that_do_not_divide_the_group_are_one_line_for_two_processes(capsys, tmp_path, monkeypatch):
    """2 processes with 12 trajectories each in micro-batches of 2: 6 optimizer steps cannot take equal shares of
    groups of 4, so the steps would depend on the number of processes (one process accepts it)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--prompts-per-epoch", "6", "--num-generations", "4", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--output-dir", str(tmp_path / "out")]
    assert vgpo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the 6 optimizer steps per epoch must divide --num-generations 4" in err, err


# ---------------------------------------------------------------------------------------------------
# NCCL's side, checked with gloo or with torch.distributed replaced: the GPU, gathers, failures, downloads
# ---------------------------------------------------------------------------------------------------
def test_start_names_the_gpu_to_the_process_group(monkeypatch):
    """Under torchrun on GPUs, init_process_group is given this process's GPU (device_id), so NCCL binds to it at
    once; NCCL for CUDA tensors, gloo for the rest; and a gloo group with a long timeout for waiting on downloads."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: calls.append(("init", a, kw)))
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kw: calls.append(("group", kw)))
    monkeypatch.setattr(distributed, "_device", distributed._device)
    monkeypatch.setattr(distributed, "_patient", None)
    distributed.start("cuda")
    gpu = torch.device("cuda", 1)
    assert calls == [("set_device", gpu), ("init", ("cpu:gloo,cuda:nccl",), {"device_id": gpu}),
                     ("group", {"backend": "gloo", "timeout": distributed.DOWNLOAD_WAIT})]
    assert distributed._device == "cuda:1"


def _gather_in_process(rank: int, path: str, parts: dict) -> None:
    """One of two processes (forked): join a gloo group through `path`, gather_to_first each case, save rank 0's."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    got = {case: distributed.gather_to_first(shares[rank]) for case, shares in parts.items()}
    if rank == 0:
        torch.save(got, path + ".out")
    torch.distributed.destroy_process_group()


def test_gather_to_first_is_exact_for_uneven_and_empty_shares(tmp_path):
    """Two processes with gloo: the evaluation images of both reach process 0 in process order, bitwise and in
    their dtype, whatever the lengths (3 and 1, 2 and 2) or when one process had no batch (None); the others get
    None. One tensor collective after the shapes are agreed: no pickle of the images."""
    import multiprocessing

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 4, 4, generator=g), torch.rand(1, 3, 4, 4, generator=g)
    parts = {"uneven": (a, b), "even": (a[:2], a[1:]), "one empty": (a, None),
             "bytes": ((a * 255).byte(), (b * 255).byte())}
    path = str(tmp_path / "rendezvous")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_gather_in_process, args=(r, path, parts)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = torch.load(path + ".out")
    for case, (x, y) in parts.items():
        want = torch.cat([t for t in (x, y) if t is not None])
        assert got[case].dtype == want.dtype and torch.equal(got[case], want), case


def test_every_gpu_collective_follows_a_cpu_one(monkeypatch):
    """gloo notices a dead process at once, NCCL only after its timeout: broadcasting the initial weights and gathering
    the evaluation images each agree on something over gloo (CPU values, Python objects) before their tensor
    collective (NCCL between GPUs), so a process that failed before them is noticed there."""
    seen = []

    def record(fn, *a, **kw):
        tensor = next((t for t in a if isinstance(t, torch.Tensor)), None)
        seen.append((fn.__name__, "objects" if tensor is None else tensor.device.type))
        if fn.__name__ == "all_gather_object":
            a[0][:] = [((2, 3), "torch.float32")] * 2

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "_active", lambda: True)
    monkeypatch.setattr(distributed, "_collective", record)
    distributed.broadcast_weights(torch.nn.Linear(2, 2))
    assert seen[0] == ("all_reduce", "cpu") and [s[0] for s in seen[1:]] == ["broadcast", "broadcast"]
    seen.clear()
    assert distributed.gather_to_first(torch.zeros(2, 3)) is None  # not process 0
    assert seen == [("all_gather_object", "objects"), ("gather", "cpu")]


@pytest.mark.parametrize("rank, fails", [(0, False), (1, False), (0, True)])
def test_process_0_loads_first_and_the_others_after_it(rank, fails, monkeypatch):
    """first_then_others: process 0 runs the block (a first download) before the barrier the others wait at; it
    reaches the barrier even when the block fails, so the others go on and meet the error themselves; in one
    process, or with wait=False, nothing waits."""
    order = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(distributed, "_active", lambda: True)
    monkeypatch.setattr(distributed, "_collective", lambda fn, *a, **kw: order.append(fn.__name__))
    try:
        with distributed.first_then_others():
            order.append("load")
            if fails:
                raise OSError("gated repository")
    except OSError:
        order.append("error")
    assert order == (["barrier", "load"] if rank else ["load", "barrier"] + (["error"] if fails else []))
    order.clear()
    with distributed.first_then_others(wait=False):
        order.append("load")
    assert order == ["load"]
