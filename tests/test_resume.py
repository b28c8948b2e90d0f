"""Tests of the run plumbing: checkpoints, resuming, interruptions, NaN guards, input validation, safety.
Each checks a claim of recovery.py, harness.py or of the README's "Checkpoints, exit codes, logged metrics"."""
import ast
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import harness
import recovery
import reward
import shapes
import vgpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny and fast: 8 trajectories, 4 steps, 2 optimizer steps per epoch, a 4-image evaluation every 2 epochs
SETTINGS = dict(prompts_per_epoch=2, num_generations=4, train_batch_size=4, gradient_accumulation_steps=2,
                num_steps=4, eval_steps=3, eval_batch_size=16, eval_every=2, save_every=1)


def flags(**kw) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("a red circle\ntwo blue squares\na circle left of a square\na green triangle and a red square\n")
    return str(path)


def run(out, prompt_file, **kw) -> int:
    return vgpo.main(flags(**{**SETTINGS, "prompts": prompt_file, "output_dir": out, **kw}))


def result(out):
    """(metric rows without the wall-clock times, final weights) of a finished run."""
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    return ([{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows],
            load_file(os.path.join(out, "transformer.safetensors")))


def assert_same(a, b):
    (rows_a, w_a), (rows_b, w_b) = a, b
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a]
    assert rows_a == rows_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def checkpoints(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompt_file):
    """An uninterrupted 4-epoch run."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    assert run(out, prompt_file, epochs=4) == 0
    return result(out)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, prompt_file):
    """A finished 2-epoch run with checkpoints of epochs 1 and 2 (copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    assert run(out, prompt_file, epochs=2) == 0
    return out


# ---------------------------------------------------------------------------------------------------
# Resume equality, signals, SIGKILL
# ---------------------------------------------------------------------------------------------------
def test_two_epochs_then_resume_to_four_equals_four_in_one_go(reference, two_epochs, tmp_path):
    """`--resume DIR --epochs 4` after a 2-epoch run gives bitwise the metrics and weights of 4 epochs in one go,
    one metrics row per epoch; checkpoints are the newest --keep-checkpoints (2), complete, no temporary folder."""
    out = str(tmp_path / "run")
    shutil.copytree(two_epochs, out)
    assert checkpoints(out) == ["epoch_0001", "epoch_0002"]
    assert vgpo.main(["--resume", out, "--epochs", "4"]) == 0
    assert_same(reference, result(out))
    assert checkpoints(out) == ["epoch_0003", "epoch_0004"]
    assert json.load(open(os.path.join(out, "args.json")))["epochs"] == 4


def test_a_run_saved_before_the_task_and_ema_fields_resumes_as_it_ran(reference, two_epochs, tmp_path):
    """An args.json without `task`, `ema_decay`, `ema_update_interval` and `reward_dtype` (written before they
    existed): --resume runs it on its model's own task without the EMA, to the uninterrupted result."""
    out = str(tmp_path / "run")
    shutil.copytree(two_epochs, out)
    path = os.path.join(out, "args.json")
    saved = json.load(open(path))
    for key in ("task", "ema_decay", "ema_update_interval", "reward_dtype"):
        saved.pop(key)
    json.dump(saved, open(path, "w"))
    args = vgpo.parse_args(["--resume", out, "--epochs", "4"])
    assert (args.task, args.ema_decay) == ("shapes", 0.0)
    assert vgpo.main(["--resume", out, "--epochs", "4"]) == 0
    assert_same(reference, result(out))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_epoch_finishes_it_saves_and_resumes_to_the_same_result(sig, code, reference, prompt_file,
                                                                         tmp_path, monkeypatch, capsys):
    """A SIGINT/SIGTERM during epoch 2's rollout: epoch 2 finishes, a checkpoint is saved, the exit code is
    128 + signal and the message says how to resume; resuming gives the uninterrupted result."""
    calls, rollout = [], vgpo.rollout

    def rollout_then_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # epoch 2, before its rollout starts
            os.kill(os.getpid(), sig)
        return rollout(*a, **kw)

    monkeypatch.setattr(vgpo, "rollout", rollout_then_signal)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = str(tmp_path / "run")
    assert run(out, prompt_file, epochs=4, save_every=0) == code
    err = capsys.readouterr().err
    assert f"stopped by {sig.name} after epoch 2/4" in err and f"--resume {out}" in err
    assert [json.loads(ln)["epoch"] for ln in open(os.path.join(out, "metrics.jsonl"))] == [0, 1, 2]
    assert checkpoints(out) == ["epoch_0002"] and not os.path.exists(os.path.join(out, "transformer.safetensors"))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    assert vgpo.main(["--resume", out]) == 0
    assert_same(reference, result(out))


def test_a_second_sigterm_stops_at_once_with_sigterms_exit_code(prompt_file, tmp_path, monkeypatch, capsys):
    """SIGTERM twice (a scheduler that will not wait): the run stops at once, the epoch in progress is lost, and the
    exit code is still SIGTERM's 143 (the README's table), not Ctrl-C's 130; the last checkpoint stands."""
    calls, rollout = [], vgpo.rollout

    def rollout_then_two_signals(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(*a, **kw)

    monkeypatch.setattr(vgpo, "rollout", rollout_then_two_signals)
    out = str(tmp_path / "run")
    assert run(out, prompt_file, epochs=4) == 143
    err = capsys.readouterr().err
    assert "SIGTERM: stopped at once" in err and checkpoints(out) == ["epoch_0001"]


# calls of vgpo.policy_loss per epoch: micro-batches × trained steps (T − 1 = 3 within the toy's SDE window of 4)
LOSSES_PER_EPOCH = SETTINGS["prompts_per_epoch"] * SETTINGS["num_generations"] // SETTINGS["train_batch_size"] * 3


@pytest.mark.parametrize("inside, call, epoch, said", [
    ("policy_loss", 2 * LOSSES_PER_EPOCH + 1, 3, "in the update of epoch 3"),  # the first loss of epoch 3
    ("generate", 4, 2, "in the evaluation of epoch 2"),  # evaluation 0, rollouts 1 and 2, evaluation 2
])
def test_out_of_memory_in_an_epoch_saves_the_state_before_it_and_resuming_gives_the_same_result(
        inside, call, epoch, said, reference, prompt_file, tmp_path, monkeypatch, capsys):
    """torch.OutOfMemoryError (a GPU's error, raised here on the CPU) in epoch E, in its update or in its evaluation
    after the epoch has trained and stepped the optimizer: exit code 4, a checkpoint of epoch E − 1 holding the state
    before E (not the trained one; no periodic checkpoint was due), metrics up to E − 1, and one line saying where and
    how to continue (evaluation: a smaller --eval-batch-size); resuming gives the uninterrupted run bitwise."""
    real, calls = getattr(vgpo, inside), []

    def runs_out(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 79.11 GiB of which 1.02 GiB is free.")
        return real(*a, **kw)

    monkeypatch.setattr(vgpo, inside, runs_out)
    out = str(tmp_path / "run")
    assert run(out, prompt_file, epochs=4, save_every=0) == recovery.OUT_OF_MEMORY == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "out of GPU memory " + said in err and "Tried to allocate 2.00 GiB" in err, err
    assert f"epoch_{epoch - 1:04d} holds the state before it" in err and f"--resume {out}" in err
    assert ("--eval-batch-size 8" in err) == (inside == "generate")
    assert checkpoints(out) == [f"epoch_{epoch - 1:04d}"]
    assert [json.loads(ln)["epoch"] for ln in open(os.path.join(out, "metrics.jsonl"))] == list(range(epoch))
    monkeypatch.undo()
    assert vgpo.main(["--resume", out]) == 0
    assert_same(reference, result(out))


def test_sigkill_after_a_checkpoint_resumes_to_the_same_result(reference, prompt_file, tmp_path):
    """`python vgpo.py` killed with SIGKILL once epoch 2's checkpoint exists: --resume gives the uninterrupted
    result."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "vgpo.py", *flags(**{**SETTINGS, "prompts": prompt_file, "output_dir": out, "epochs": 4})]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out, "checkpoints", "epoch_0002")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert vgpo.main(["--resume", out]) == 0
    assert_same(reference, result(out))


# ---------------------------------------------------------------------------------------------------
# Damaged and half-written checkpoints
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory, prompt_file):
    out = str(tmp_path_factory.mktemp("three") / "run")
    assert run(out, prompt_file, epochs=3) == 0
    return out


def _flip_bytes(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x00\xff\x00\xff")


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


@pytest.mark.parametrize("damage", [
    lambda ck: _flip_bytes(os.path.join(ck, "weights.safetensors")),
    lambda ck: (_truncate(os.path.join(ck, "state.pt")), os.remove(os.path.join(ck, "meta.json"))),
], ids=["flipped-weights", "truncated-state-no-meta"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one_and_says_so(damage, three_epochs, reference,
                                                                            tmp_path, capsys):
    """The newest checkpoint damaged: resume says so, sets it aside, continues from the one before it (dropping the
    metrics row logged after that one) and still reaches the uninterrupted result."""
    out = str(tmp_path / "run")
    shutil.copytree(three_epochs, out)
    damage(os.path.join(out, "checkpoints", "epoch_0003"))
    assert vgpo.main(["--resume", out, "--epochs", "4"]) == 0
    captured = capsys.readouterr()
    assert "epoch_0003 is damaged" in captured.err and "from epoch_0002" in captured.out
    assert "1 row(s) logged after the checkpoint dropped" in captured.out
    assert "epoch_0003.damaged" in checkpoints(out)
    assert_same(reference, result(out))


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_usable(reference, prompt_file, tmp_path, monkeypatch):
    """Interrupted while writing epoch 2's checkpoint (after its weights file): epoch 1's checkpoint is intact,
    the half-written one is only a temporary folder, and resuming gives the uninterrupted result."""
    save, calls = torch.save, []

    def save_then_die(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process died here
        return save(*a, **kw)

    monkeypatch.setattr(torch, "save", save_then_die)
    out = str(tmp_path / "run")
    assert run(out, prompt_file, epochs=4) == 130
    monkeypatch.undo()
    assert checkpoints(out) == [".tmp-epoch_0002", "epoch_0001"]
    assert recovery.read_checkpoint(os.path.join(out, "checkpoints", "epoch_0001"))["epoch"] == 1
    assert vgpo.main(["--resume", out]) == 0
    assert_same(reference, result(out))
    assert ".tmp-epoch_0002" not in checkpoints(out)


def test_a_full_disk_skips_the_checkpoint_with_a_warning_and_the_run_goes_on(prompt_file, tmp_path, monkeypatch,
                                                                             capsys):
    """An OSError while saving (a full disk) is a warning: the run finishes, no half-written checkpoint is left."""
    save, calls = torch.save, []

    def save_or_full(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return save(*a, **kw)

    monkeypatch.setattr(torch, "save", save_or_full)
    out = str(tmp_path / "run")
    assert run(out, prompt_file, epochs=2) == 0
    assert "could not save checkpoint" in capsys.readouterr().err
    assert checkpoints(out) == ["epoch_0002"]


# ---------------------------------------------------------------------------------------------------
# Which flags a resume may change
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--learning-rate", "1e-3"], "--learning-rate 0.001 conflicts"), (["--seed", "5"], "--seed 5 conflicts"),
    (["--algo", "grpo"], "--algo 'grpo' conflicts"), (["--num-generations", "2"], "--num-generations 2 conflicts"),
    (["--model", "sd3"], "--model 'sd3' conflicts"), (["--no-temporal-values"], "--temporal-values False conflicts"),
    (["--epochs", "2"], "has reached epoch 2"), (["--output-dir", "elsewhere"], "drop --output-dir"),
])
def test_resume_refuses_flags_that_would_change_the_run(extra, needle, two_epochs, capsys):
    """With --resume, a flag that changes what is computed (anything outside SAFE_ON_RESUME) is one line, exit 2,
    and the run folder is left as it was."""
    before = sorted(os.listdir(two_epochs)), open(os.path.join(two_epochs, "metrics.jsonl")).read()
    assert vgpo.main(["--resume", two_epochs, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err
    assert (sorted(os.listdir(two_epochs)), open(os.path.join(two_epochs, "metrics.jsonl")).read()) == before


def test_resume_of_what_is_not_a_resumable_run(prompt_file, tmp_path, capsys):
    """--resume of a missing folder, of a folder without a run, and of a run that saved no checkpoint: exit 2."""
    out = str(tmp_path / "nockpt")
    assert run(out, prompt_file, epochs=1, save_every=0) == 0
    for folder, needle in [(str(tmp_path / "missing"), "not a run folder"), (str(tmp_path), "not a run folder"),
                           (out, "no usable checkpoint")]:
        assert vgpo.main(["--resume", folder, "--epochs", "3"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err


# ---------------------------------------------------------------------------------------------------
# NaN guards and a reward model that raises
# ---------------------------------------------------------------------------------------------------
def _brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def test_nan_in_rewards_loss_or_log_probs_skips_that_batch_and_is_counted(prompt_file, tmp_path, monkeypatch, capsys):
    """Epoch 2: NaN reward → its update is skipped; epoch 3: NaN loss → its optimizer step is skipped;
    epoch 4: NaN log-prob → skipped. Each warns, is counted in guard/skipped_batches and leaves the weights as
    they were; epoch 5 trains again."""
    epoch = [0]
    train_epoch, policy_loss, rollout = vgpo.train_epoch, vgpo.policy_loss, vgpo.rollout

    def counting_epoch(*a, **kw):
        epoch[0] += 1
        return train_epoch(*a, **kw)

    def nan_reward(images, prompts, metadata):
        r = _brightness(images, prompts, metadata)
        return r * float("nan") if epoch[0] == 2 and len(images) > 4 else r  # not the 4-image evaluation

    def nan_loss(*a, **kw):
        loss, stats = policy_loss(*a, **kw)
        return (loss * float("nan") if epoch[0] == 3 else loss), stats

    def nan_log_prob(*a, **kw):
        traj = rollout(*a, **kw)
        if epoch[0] == 4:
            traj.log_probs[0, 0] = float("nan")
        return traj

    monkeypatch.setitem(reward.REWARDS, "nan_test", lambda device="cpu": nan_reward)
    for name, fn in [("train_epoch", counting_epoch), ("policy_loss", nan_loss), ("rollout", nan_log_prob)]:
        monkeypatch.setattr(vgpo, name, fn)
    out = str(tmp_path / "run")
    assert run(out, prompt_file, epochs=5, reward="nan_test", keep_checkpoints=5, nan_patience=9) == 0
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r.get("guard/skipped_batches") for r in rows] == [None, 0, 1, 1, 1, 0]
    assert "reward/mean" not in rows[2] and "reward/mean" in rows[3] and "policy/clip_frac" not in rows[3]
    err = capsys.readouterr().err
    assert "NaN/inf in the rollout (8 NaN/inf terminal reward value(s))" in err
    assert "NaN/inf in the loss" in err and "NaN/inf log-prob" in err
    w = [load_file(os.path.join(out, "checkpoints", f"epoch_{e:04d}", "weights.safetensors")) for e in (1, 2, 3, 4, 5)]
    assert all(torch.equal(w[0][k], w[i][k]) for k in w[0] for i in (1, 2, 3))
    assert not all(torch.equal(w[3][k], w[4][k]) for k in w[0])


def test_nan_patience_in_a_row_stops_the_run_with_a_checkpoint(prompt_file, tmp_path, monkeypatch, capsys):
    """--nan-patience 2 skipped batches in a row stop the run after that epoch: a checkpoint, exit code 3, a
    message naming the cause and the resume command."""
    def all_nan(images, prompts, metadata):
        return torch.full((len(images),), float("nan"))

    monkeypatch.setitem(reward.REWARDS, "nan_test", lambda device="cpu": all_nan)
    out = str(tmp_path / "run")
    assert run(out, prompt_file, epochs=4, reward="nan_test", save_every=0, nan_patience=2) == 3
    err = capsys.readouterr().err
    assert "stopped after epoch 2: 2 batches in a row had NaN/inf" in err and f"--resume {out}" in err
    assert checkpoints(out) == ["epoch_0002"]


@pytest.mark.parametrize("where", ["factory", "call"])
def test_a_reward_model_that_raises_is_named(where, prompt_file, tmp_path, monkeypatch):
    """An exception from the reward model, when it is built or called, says which reward raised what."""
    def broken(images, prompts, metadata):
        raise ValueError("boom")

    def factory(device="cpu"):
        if where == "factory":
            raise ValueError("boom")
        return broken

    monkeypatch.setitem(reward.REWARDS, "broken", factory)
    with pytest.raises(harness.RewardCrashed, match="the reward 'broken' raised ValueError: boom"):
        run(str(tmp_path / "run"), prompt_file, epochs=1, reward="broken")


def test_init_from_starts_a_new_run_from_another_runs_weights(two_epochs, prompt_file, tmp_path):
    """--init-from RUN: epoch 0 of the new run evaluates RUN's final weights (the same held-out numbers), then it
    trains on from them in its own folder with a fresh optimizer; RUN is not touched."""
    before = result(two_epochs)
    model = vgpo.load_model(vgpo.make_args(model="tiny", prompts=prompt_file, **SETTINGS))
    base = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    harness.init_from(model, two_epochs)
    state = model.transformer.state_dict()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert not all(torch.equal(state[k], base[k]) for k in state)  # RUN trained: its weights are not the base's
    out = str(tmp_path / "continued")
    assert run(out, prompt_file, epochs=1, init_from=two_epochs, reward="shapes") == 0  # partial credit: a signal
    rows, weights = result(out)
    evals = ("eval/strict_accuracy", "eval/partial_credit")
    assert [rows[0][k] for k in evals] == [before[0][-1][k] for k in evals]
    assert not all(torch.equal(weights[k], before[1][k]) for k in weights)  # and this run trained on
    assert result(two_epochs)[0] == before[0]


# ---------------------------------------------------------------------------------------------------
# Validation of every setting, before anything heavy is loaded
# ---------------------------------------------------------------------------------------------------
BAD = [  # (field, argv, words the one-line message must contain); {tmp} is a fresh folder
    ("model", ["--model", "nope"], "--model"), ("algo", ["--algo", "ppo"], "--algo"),
    ("reward", ["--reward", "nope"], "--reward"), ("prompts", ["--prompts", "missing.txt"], "not found"),
    ("reward", ["--model", "sd3.5", "--reward", "shapes"], "scores the toy world's"),
    ("task", ["--task", "ocr"], "--task ocr is a task for SD3-family models"),
    ("task", ["--model", "sd3.5", "--task", "ppo"], "unknown --task 'ppo'"),
    ("reward_dtype", ["--reward-dtype", "bf16"], "--reward-dtype"),
    ("ema_decay", ["--ema-decay", "1"], "--ema-decay"),
    ("ema_update_interval", ["--ema-update-interval", "0"], "--ema-update-interval"),
    ("prompts", ["--prompts", "{tmp}/bad.jsonl"], "bad.jsonl:2: not JSON"),
    ("prompts", ["--prompts", "{tmp}/words.txt", "--reward", "jpeg_compressibility"], "unknown: dog, purple"),
    ("seed", ["--seed", "-1"], "--seed"), ("device", ["--device", "tpu"], "--device"),
    ("output_dir", ["--output-dir", "{tmp}/a-file"], "cannot write"),
    ("output_dir", ["--output-dir", "{tmp}/old-run"], "already holds a run"),
    ("epochs", ["--epochs", "0"], "--epochs"), ("epochs", ["--epochs", "x"], "--epochs"),
    ("eval_every", ["--eval-every", "0"], "--eval-every"), ("save_every", ["--save-every", "-1"], "--save-every"),
    ("keep_checkpoints", ["--keep-checkpoints", "0"], "--keep-checkpoints"),
    ("resume", ["--resume", "{tmp}/nothing"], "not a run folder"),
    ("init_from", ["--init-from", "{tmp}/old-run"], "no transformer.safetensors there"),
    ("nan_patience", ["--nan-patience", "0"], "--nan-patience"),
    ("num_generations", ["--num-generations", "1"], "--num-generations"),
    ("prompts_per_epoch", ["--prompts-per-epoch", "0"], "--prompts-per-epoch"),
    ("prompts_per_epoch", ["--prompts-per-epoch", "512"], f"more than the {len(shapes.TRAIN_PROMPTS)}"),
    ("num_steps", ["--num-steps", "1"], "--num-steps"), ("eval_steps", ["--eval-steps", "0"], "--eval-steps"),
    ("guidance_scale", ["--guidance-scale", "0.5"], "--guidance-scale"),
    ("noise_level", ["--noise-level", "0"], "--noise-level"), ("gamma", ["--gamma", "2"], "--gamma"),
    ("sde_steps", ["--sde-steps", "-1"], "--sde-steps"),
    ("gamma", ["--gamma", "nan"], "--gamma must be a finite number"),
    ("anchor_coef", ["--anchor-coef", "-1"], "--anchor-coef"),
    ("anchor_steps", ["--anchor-steps", "-1"], "--anchor-steps"),
    ("temporal_values", ["--temporal-values=yes"], "--temporal-values"),
    ("step_weights", ["--step-weights=no"], "--step-weights"),
    ("scale_rewards", ["--scale-rewards", "global"], "--scale-rewards"),
    ("adv_clip_max", ["--adv-clip-max", "0"], "--adv-clip-max"),
    ("clip_range", ["--clip-range", "1.5"], "--clip-range"),
    ("beta", ["--beta", "-0.1"], "--beta"), ("learning_rate", ["--learning-rate", "0"], "--learning-rate"),
    ("learning_rate", ["--learning-rate", "inf"], "finite"),
    ("weight_decay", ["--weight-decay", "-1"], "--weight-decay"),
    ("max_grad_norm", ["--max-grad-norm", "0"], "--max-grad-norm"),
    ("train_batch_size", ["--train-batch-size", "48"], "multiple"),
    ("train_batch_size", ["--train-batch-size", "0"], "batch sizes"),
    ("gradient_accumulation_steps", ["--gradient-accumulation-steps", "0"], "batch sizes"),
    ("eval_batch_size", ["--eval-batch-size", "0"], "batch sizes"),
    ("resolution", ["--model", "sd3.5", "--random-weights", "--resolution", "500"], "--resolution"),
    ("max_sequence_length", ["--max-sequence-length", "0"], "--max-sequence-length"),
    ("random_weights", ["--random-weights"], "--random-weights is for SD3-family models"),
    ("low_memory", ["--low-memory=yes"], "--low-memory"),
    ("preview_decoder", ["--preview-decoder", "nope"], "--preview-decoder"),
    ("dtype", ["--dtype", "int8"], "--dtype"),
    ("gradient_checkpointing", ["--gradient-checkpointing=yes"], "--gradient-checkpointing"),
    ("lora_rank", ["--lora-rank", "0"], "--lora-rank"), ("lora_alpha", ["--lora-alpha", "0"], "--lora-alpha"),
    (None, ["--no-such-flag", "1"], "unrecognized"),
]


def test_every_setting_has_a_bad_value_case():
    """The table below names every Args field (the booleans' only bad value is a malformed flag)."""
    assert {f.name for f in dataclasses.fields(vgpo.Args)} <= {field for field, _, _ in BAD}


@pytest.mark.parametrize("field, argv, needle", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_settings_are_one_line_and_exit_2_before_the_model_loads(field, argv, needle, tmp_path, monkeypatch,
                                                                     capsys):
    """Each bad value: exit code 2, one line on stderr naming the fix, no traceback, and no model loaded."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": oops}\n')
    (tmp_path / "words.txt").write_text("a red circle\n" * 20 + "a purple dog\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "old-run").mkdir()
    (tmp_path / "old-run" / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)  # nothing may be written into the repository
    monkeypatch.setattr(vgpo, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
    assert vgpo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------------
# Safety
# ---------------------------------------------------------------------------------------------------
def test_no_code_is_loaded_from_data_files():
    """In every module: torch.load only with weights_only=True, no trust_remote_code=True, no pickle, eval or exec;
    weights are written with safetensors (torch.save only writes the optimizer and random states)."""
    for name in ("vgpo.py", "harness.py", "recovery.py", "distributed.py", "reward.py", "shapes.py", "sd3.py",
                 "tools/bench.py", "tools/experiments.py", "tools/notebook.py", "prompts/make_prompts.py"):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert fn not in ("eval", "exec", "pickle.load", "pickle.loads"), (name, fn)
                if fn == "torch.load":
                    assert kw.get("weights_only") == "True", (name, node.lineno)
                assert kw.get("trust_remote_code", "False") == "False", (name, node.lineno)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert "pickle" not in ast.unparse(node), name


def test_jsonl_prompts_are_plain_data(tmp_path):
    """A .jsonl prompt file is parsed as JSON only: code-like text stays text, fields other than "prompt" are
    metadata."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle", "note": "__import__(\'os\').system(\'false\')"}\n'
                    '{"prompt": "two blue squares"}\n')
    args = vgpo.make_args(model="tiny", prompts=str(path), prompts_per_epoch=2)
    train, _ = vgpo.load_prompts(args)
    assert train == [("a red circle", {"note": "__import__('os').system('false')"}), ("two blue squares", {})]
