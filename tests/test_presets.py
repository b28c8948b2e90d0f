"""Tests of the task presets and of Flow-GRPO's details around the method: `--task`, the order in which presets
apply, the refusal of a reward that cannot score the model's images, the EMA of the trained weights, the reward
models' precision. (GRPO's and VGPO's advantage scaling: test_vgpo.py; resuming SD3 with the EMA: test_sd3.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import harness
import reward
import vgpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flow-GRPO's config/grpo.py, general_ocr_sd3_1gpu (and what it takes from config/base.py), in our names; the KL
# is its form (reading 7), so its β values carry over unchanged
FLOW_GRPO_1GPU = dict(num_steps=10, eval_steps=40, guidance_scale=4.5, resolution=512, num_generations=8,
                      prompts_per_epoch=8, train_batch_size=8, gradient_accumulation_steps=4, eval_batch_size=16,
                      sde_steps=0, ema_decay=0.9, ema_update_interval=8, learning_rate=3e-4,
                      weight_decay=1e-4, max_grad_norm=1.0, adv_clip_max=5.0, clip_range=1e-4, noise_level=0.7,
                      lora_rank=32, lora_alpha=64.0, reward_dtype="fp32")
TASKS = {"ocr": ("ocr", "ocr", 0.04), "pickscore": ("preference", "pickscore", 0.01),
         "geneval": ("geneval", "geneval", 0.04)}  # prompts, reward, Flow-GRPO's β


@pytest.mark.parametrize("task", TASKS)
def test_each_task_is_flow_grpos_config_on_one_gpu(task):
    """`--model sd3.5` alone is the OCR task; `--task pickscore|geneval` the others: each with its prompts, reward
    and β (Flow-GRPO's: the KL is its form, reading 7) and Flow-GRPO's 1-GPU batch numbers and settings."""
    args = vgpo.make_args(model="sd3.5") if task == "ocr" else vgpo.make_args(model="sd3.5", task=task)
    prompts, reward_name, beta = TASKS[task]
    assert (args.task, args.prompts, args.reward) == (task, prompts, reward_name)
    assert args.beta == beta
    assert {k: getattr(args, k) for k in FLOW_GRPO_1GPU} == FLOW_GRPO_1GPU
    assert args.prompts_per_epoch * args.num_generations // (args.train_batch_size * args.gradient_accumulation_steps) \
        == 2  # two optimizer steps per epoch, as every Flow-GRPO SD3 config
    assert vgpo.make_args(model="stabilityai/stable-diffusion-3.5-large", task=task).reward == reward_name
    # GRPO's advantage ÷ the batch's std as Flow-GRPO's global_std; VGPO's relative term ÷ the group's, as Eq. 12
    assert (args.algo, args.scale_rewards) == ("vgpo", "group")
    assert vgpo.make_args(model="sd3.5", task=task, algo="grpo").scale_rewards == "batch"
    assert vgpo.make_args(model="sd3.5", task=task, scale_rewards="batch").scale_rewards == "batch"


def test_presets_apply_in_order_and_the_tiny_preset_is_unchanged():
    """What the user sets > --low-memory > the task's preset > the model's > the Args default; the tiny model's
    task is the toy world, with the toy preset's reward and today's scaling and no EMA."""
    a = vgpo.make_args(model="sd3.5", task="pickscore", beta=0.02, reward="aesthetic", low_memory=True)
    assert (a.beta, a.reward, a.prompts, a.train_batch_size) == (0.02, "aesthetic", "preference", 4)
    assert vgpo.make_args(model="sd3.5", task="pickscore", low_memory=True, train_batch_size=2).train_batch_size == 2
    tiny = vgpo.make_args(model="tiny")
    assert (tiny.task, tiny.prompts, tiny.reward, tiny.beta) == ("shapes", "shapes", "shapes_strict", 0.0)
    assert (tiny.scale_rewards, tiny.ema_decay, tiny.guidance_scale) == ("group", 0.0, 1.0)
    assert vgpo.make_args(model="tiny", task="shapes") == tiny
    with pytest.raises(harness.UsageError, match="unknown --task 'oc'"):
        vgpo.make_args(model="sd3.5", task="oc")


def test_help_names_each_presets_value_and_the_order(capsys):
    """`python vgpo.py --help` shows each field's default and its value under --model tiny and each --task."""
    with pytest.raises(SystemExit):
        vgpo.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "your flags > --low-memory > the task's preset (--task) > the model's (--model tiny) > the default" in text
    assert "(default: 0.04; --model tiny: 0.0; --task ocr: 0.04; --task pickscore: 0.01; --task geneval: 0.04)" \
        in text
    assert "(default: 'ocr'; --model tiny: 'shapes_strict'; --task ocr: 'ocr'; --task pickscore: 'pickscore';" in text


@pytest.mark.parametrize("argv, needle", [
    (["--model", "sd3.5", "--reward", "shapes"], "--reward shapes scores the toy world's 32×32 scenes"),
    (["--model", "sd3.5", "--random-weights", "--reward", "ocr=1,shapes_strict=0.5"], "--reward shapes_strict"),
    (["--reward", "pickscore"], "--reward pickscore scores photographs, and --model tiny draws 32×32 toy scenes"),
    (["--task", "ocr"], "--task ocr is a task for SD3-family models"),
    (["--model", "sd3.5", "--task", "shapes"], "--task shapes is the toy world of --model tiny"),
])
def test_a_reward_or_task_the_models_images_cannot_serve_is_refused(argv, needle, tmp_path, capsys, monkeypatch):
    """The shapes verifier on SD3, a photo reward on the tiny model, a task of the other kind of model: one line,
    exit code 2, before anything loads."""
    monkeypatch.setattr(vgpo, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert vgpo.main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_shapes_reward_on_sd3_typed_in_a_shell():
    """`python vgpo.py --model sd3.5 --reward shapes` from a real shell: exit code 2 and one line that says what to
    use instead (on any machine: it is refused before the GPU is looked for)."""
    proc = subprocess.run([sys.executable, "vgpo.py", "--model", "sd3.5", "--reward", "shapes"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--task ocr, pickscore or geneval" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# The EMA of the weights
# ---------------------------------------------------------------------------------------------------
def _flow_grpo_ema(thetas, decay, interval):
    """Flow-GRPO's EMA, written out: it starts at θ_0; after optimizer step s, if (s + 1) % interval == 0,
    ema += (1 − d_s)·(θ_s − ema) with d_s = min((1 + s)/(10 + s), decay). thetas[s] = the weights after step s."""
    ema = [t.clone() for t in thetas[0]]
    out = [[t.clone() for t in ema]]
    for s in range(1, len(thetas)):
        if (s + 1) % interval == 0:
            d = min((1 + s) / (10 + s), decay)
            ema = [e - (1 - d) * (e - t) for e, t in zip(ema, thetas[s])]
        out.append([e.clone() for e in ema])
    return out


def test_the_ema_follows_flow_grpos_schedule_and_swaps_back_bitwise(tmp_path):
    """WeightEMA on 100 optimizer steps equals Flow-GRPO's formula (warm-up (1+s)/(10+s), decay 0.9 from step 80,
    updates after steps 7, 15, …); `applied()` shows the EMA and puts the trained weights back bitwise; its state
    goes through torch.save / torch.load(weights_only=True) and a new WeightEMA restores it exactly."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ema = harness.WeightEMA(opt, 0.9, 8)
    thetas = [[p.detach().clone() for p in net.parameters()]]
    seen = {}
    for s in range(1, 101):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        thetas.append([p.detach().clone() for p in net.parameters()])
        if s in (6, 7, 50, 100):
            with ema.applied():
                seen[s] = [p.detach().clone() for p in net.parameters()]
            assert all(torch.equal(p, t) for p, t in zip(net.parameters(), thetas[-1]))  # swapped back
    want = _flow_grpo_ema(thetas, 0.9, 8)
    assert all(torch.equal(a, b) for a, b in zip(seen[6], thetas[0]))  # no update before step 7
    for s in (7, 50, 100):
        for a, b in zip(seen[s], want[s]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert ema.updates == 12 and not torch.allclose(seen[100][0], thetas[100][0])
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", map_location="cpu", weights_only=True)
    other = harness.WeightEMA(torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1), 0.9, 8)
    other.load_state_dict(state)
    assert other.steps == 100 and other.ema.optimization_step == ema.ema.optimization_step
    assert all(torch.equal(a, b) for a, b in zip(other.ema.shadow_params, ema.ema.shadow_params))
    off = harness.WeightEMA(opt, 0.0, 8)
    assert off.ema is None and off.state_dict() == {}
    with off.applied():
        assert all(torch.equal(p, t) for p, t in zip(net.parameters(), thetas[-1]))


def test_a_run_evaluates_and_saves_the_ema_and_checkpoints_the_raw_weights(tmp_path, monkeypatch):
    """A 2-epoch tiny run with --ema-decay 0.5 --ema-update-interval 1: every evaluation sees the EMA of the weights
    (Flow-GRPO's formula over the weights after each optimizer step), the saved transformer.safetensors is the
    final EMA, and the checkpoint keeps the raw weights (to train on) with the EMA in its state."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na circle left of a square\na green triangle and a red square\n")
    thetas, names, at_eval = [], [], []
    make_optimizer, evaluate = vgpo.make_optimizer, vgpo.evaluate

    def recording_optimizer(model, args):
        opt = make_optimizer(model, args)
        names[:] = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
        params = opt.param_groups[0]["params"]
        thetas.append([p.detach().clone() for p in params])
        opt.register_step_post_hook(lambda *_: thetas.append([p.detach().clone() for p in params]))
        return opt

    def recording_evaluate(model, *a, **kw):
        at_eval.append([p.detach().clone() for p in model.transformer.parameters() if p.requires_grad])
        return evaluate(model, *a, **kw)

    monkeypatch.setattr(vgpo, "make_optimizer", recording_optimizer)
    monkeypatch.setattr(vgpo, "evaluate", recording_evaluate)
    out = tmp_path / "run"
    flags = dict(epochs=2, prompts_per_epoch=2, num_generations=4, train_batch_size=4, gradient_accumulation_steps=1,
                 num_steps=4, eval_steps=3, eval_batch_size=16, eval_every=1, save_every=1, reward="shapes",
                 ema_decay=0.5, ema_update_interval=1, prompts=str(prompts), output_dir=str(out))
    assert vgpo.main([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]) == 0
    assert len(thetas) == 5 and len(at_eval) == 3  # θ_0 … θ_4 (2 optimizer steps per epoch); epochs 0, 1, 2
    want = _flow_grpo_ema(thetas, 0.5, 1)
    for seen, s in zip(at_eval, (0, 2, 4)):
        for a, b in zip(seen, want[s]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not all(torch.equal(a, b) for a, b in zip(at_eval[-1], thetas[-1]))  # the EMA, not the weights
    saved = load_file(str(out / "transformer.safetensors"))
    checkpoint = load_file(str(out / "checkpoints" / "epoch_0002" / "weights.safetensors"))
    for name, ema_value, raw in zip(names, want[4], thetas[4]):
        torch.testing.assert_close(saved[name], ema_value, atol=1e-6, rtol=0)
        assert torch.equal(checkpoint[name], raw)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all("eval/score" in r for r in rows)


# ---------------------------------------------------------------------------------------------------
# The reward models' precision
# ---------------------------------------------------------------------------------------------------
def test_reward_models_get_fp32_unless_reward_dtype_says_fp16(monkeypatch):
    """make_reward hands the CLIP-based rewards torch.float32 by default (Flow-GRPO's PickScore precision) and
    float16 with --reward-dtype fp16; the factories themselves default to fp32; rewards without a model get none."""
    import inspect

    got = []

    def fake(device="cpu", local_dir=None, dtype=None):
        got.append(dtype)
        return lambda images, prompts, metadata: torch.zeros(len(images))

    monkeypatch.setitem(reward.REWARDS, "pickscore", fake)
    for flags, dtype in (({}, torch.float32), ({"reward_dtype": "fp16"}, torch.float16)):
        args = vgpo.make_args(model="sd3.5", task="pickscore", **flags)
        harness.make_reward(args, "cpu")
        assert got[-1] is dtype
    harness.make_reward(vgpo.make_args(model="sd3.5", reward="jpeg_compressibility"), "cpu")  # takes no dtype
    monkeypatch.undo()
    for name in ("pickscore", "aesthetic", "geneval", "geneval_strict"):
        assert inspect.signature(reward.REWARDS[name]).parameters["dtype"].default is None
    assert reward._reward_dtype(None) is torch.float32 and reward._reward_dtype(torch.float16) is torch.float16
