"""Tests of the SD3-family path (sd3.py and its use in vgpo.py), on the CPU with no download: a tiny random
SD3 pipeline is built from configs (tokenizers included), saved to a folder and loaded through the same
`--model PATH` code a user's SD3.5 folder goes through. Run: pytest -q"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import harness
import sd3
import vgpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 32-px images (16×16 latents, 64 image tokens), 16 T5 tokens: a rollout step takes milliseconds
TINY = dict(resolution=32, max_sequence_length=16, guidance_scale=4.5, num_steps=4, num_generations=2,
            prompts_per_epoch=2, train_batch_size=4, gradient_accumulation_steps=1)
PROMPTS = ["a red cat", "a blue dog", "a green bird", 'a sign that says "vgpo"']


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """(pipeline folder, prompt file, AutoencoderTiny folder), built once for the module."""
    root = tmp_path_factory.mktemp("sd3")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return (sd3.save_tiny_random_pipeline(str(root / "pipe")), str(prompts),
            sd3.save_tiny_random_preview_vae(str(root / "taesd")))


def _load(tiny_sd3, **kw):
    folder, prompts, _ = tiny_sd3
    args = vgpo.make_args(model=folder, prompts=prompts, **{**TINY, **kw})
    if args.noise_level > 0:  # validate() rightly refuses noise_level 0 for training
        harness.validate(args)
    return vgpo.load_model(args), args


def _stock(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ode_rollout_reproduces_the_stock_pipeline(tiny_sd3):
    """With noise_level 0, our rollout from the same start noise (same steps, CFG 4.5, shifted sigmas)
    gives the stock StableDiffusion3Pipeline's latents at every step and its decoded images (≤ 1e-4)."""
    model, args = _load(tiny_sd3, noise_level=0.0)
    noise = torch.randn(4, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    traj = vgpo.rollout(model, PROMPTS[:2], args, noise=noise)
    pipe, steps = _stock(tiny_sd3[0]), []

    def keep(pipe, i, t, kw):  # the pipeline's latents after each step
        steps.append(kw["latents"].clone())
        return kw

    images = pipe(traj.prompts, num_inference_steps=4, guidance_scale=4.5, height=32, width=32, max_sequence_length=16,
                  latents=noise.clone(), output_type="pt", callback_on_step_end=keep).images
    assert traj.latents.shape == (4, 5, 4, 16, 16) and traj.images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(traj.latents[:, 1:], torch.stack(steps, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(traj.images, images, atol=1e-4, rtol=0)
    assert traj.latents[:, -1].abs().mean() > 0.1  # not a trivial all-zero agreement


def test_exported_lora_in_the_stock_pipeline_equals_the_policy_and_adapter_off_is_the_base(tiny_sd3, tmp_path):
    """save_policy writes diffusers' LoRA format: load_lora_weights in the stock pipeline gives exactly our
    LoRA transformer's output (α/r restored), which differs from the base model; the KL reference (the
    adapter switched off) is exactly the base model. Only LoRA weights (fp32) are trainable."""
    model, _ = _load(tiny_sd3, beta=0.004)
    trainable = [(n, p) for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
    g = torch.Generator().manual_seed(1)
    for n, p in trainable:  # a trained-looking adapter (B starts at zero)
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    path = harness.save_policy(model, str(tmp_path / "lora"))
    assert path.endswith("pytorch_lora_weights.safetensors")
    pipe = _stock(tiny_sd3[0])
    x, t = torch.randn(2, *model.latent_shape, generator=g), torch.tensor([700.0, 300.0])
    seq, pooled = model.encode(PROMPTS[:2])
    call = dict(encoder_hidden_states=seq, pooled_projections=pooled, timestep=t, return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(x, **call)[0]
        pipe.load_lora_weights(str(tmp_path / "lora"))
        stock_lora = pipe.transformer(x, **call)[0]
        ours, reference = model.transformer(x, **call)[0], model.reference(x, **call)[0]
    assert (stock_lora - base).abs().max() > 1e-2
    torch.testing.assert_close(stock_lora, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=0)
    # --init-from a run folder holding that LoRA: a fresh model gets the same adapter, the same output
    fresh, _ = _load(tiny_sd3, beta=0.004)
    harness.init_from(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh.transformer(x, **call)[0], ours, atol=1e-6, rtol=0)
        torch.testing.assert_close(fresh.reference(x, **call)[0], base, atol=1e-6, rtol=0)


def test_one_training_epoch_from_the_command_line(tiny_sd3, tmp_path):
    """`python vgpo.py --model FOLDER …` trains one epoch (KL on, tiny preview decoder) and writes
    DIR/lora/pytorch_lora_weights.safetensors, which the stock pipeline loads and which changes its output (without
    the EMA, whose first update comes after 7 optimizer steps; the EMA: the resume test below). Of its two optimizer
    steps the second starts off the reference (the adapter has moved), so the logged KL is > 0."""
    folder, prompts, taesd = tiny_sd3
    out = tmp_path / "run"
    flags = dict(epochs=1, prompts_per_epoch=2, num_generations=2, train_batch_size=2, gradient_accumulation_steps=1,
                 num_steps=3, eval_steps=2, eval_batch_size=4, resolution=32, max_sequence_length=16,
                 reward="jpeg_compressibility", preview_decoder=taesd, learning_rate=1e-2, ema_decay=0)
    cmd = [sys.executable, "vgpo.py", "--model", folder, "--prompts", prompts, "--output-dir", str(out),
           *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "32 px, latents (4, 16, 16)" in proc.stdout and "epoch   1/1" in proc.stdout
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and len(rows[1]["credit/instant_reward"]) == 3
    assert rows[1]["loss/kl"] > 0 and rows[1]["policy/approx_kl"] > 0 and "eval/score" in rows[1]
    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.exists() and not (out / "transformer.safetensors").exists()
    pipe = _stock(folder)
    run = dict(num_inference_steps=3, guidance_scale=4.5, height=32, width=32, max_sequence_length=16,
               output_type="latent")
    before = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), **run).images
    pipe.load_lora_weights(str(out / "lora"))
    after = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), **run).images
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("random_weights", [True, False], ids=["random-weights", "folder-weights"])
def test_a_run_prints_only_its_own_lines(tiny_sd3, tmp_path, random_weights):
    """A one-epoch run prints nothing of the libraries', off a terminal: nothing on stderr (no transformers note,
    no warning, no loading or saving progress bar) and no library line on stdout. Importing diffusers' SD3
    pipeline imports transformers' CLIPImageProcessor and SiglipImageProcessor, which without torchvision log a
    fallback note each; with --random-weights (as `--model sd3.5 --random-weights`) that import happens when the
    LoRA is saved, after the last epoch, otherwise when the prompts are encoded."""
    folder, prompts, _ = tiny_sd3
    flags = dict(epochs=1, prompts_per_epoch=2, num_generations=2, train_batch_size=2, gradient_accumulation_steps=2,
                 num_steps=3, eval_steps=2, eval_batch_size=4, resolution=32, max_sequence_length=16,
                 reward="jpeg_compressibility")
    cmd = [sys.executable, "vgpo.py", "--model", folder, "--prompts", prompts, "--output-dir", str(tmp_path / "run"),
           *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]]
    cmd += ["--random-weights"] if random_weights else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch   1/1" in proc.stdout and "pytorch_lora_weights.safetensors" in proc.stdout
    assert proc.stderr == "", proc.stderr[-3000:]
    noise = re.compile(r"torchvision|ImageProcessor|warn|deprecat|\[transformers\]|\[diffusers\]|it/s\]|Loading",
                       re.IGNORECASE)
    assert not [ln for ln in proc.stdout.splitlines() if noise.search(ln)], proc.stdout


def test_sd3_run_resumed_after_one_epoch_equals_two_epochs_straight_with_the_ema(tiny_sd3, tmp_path, capsys):
    """On an SD3 folder with the EMA updated after every optimizer step: 1 epoch, then `--resume DIR --epochs 2
    --gradient-checkpointing` (what an out-of-memory stop suggests: it changes memory, not what is computed), gives
    bitwise the metrics and the saved LoRA (the EMA's) of 2 epochs straight without checkpointing; the checkpoint
    keeps the raw LoRA weights, which differ from the saved EMA. The startup box names the task preset and the EMA."""
    from safetensors.torch import load_file

    folder, prompts, _ = tiny_sd3
    flags = dict(model=folder, prompts=prompts, prompts_per_epoch=2, num_generations=2, train_batch_size=2,
                 gradient_accumulation_steps=1, num_steps=3, eval_steps=2, eval_batch_size=4, eval_every=1,
                 save_every=1, resolution=32, max_sequence_length=16, reward="jpeg_compressibility",
                 learning_rate=1e-2, ema_update_interval=1)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert vgpo.main([*argv, "--epochs", "2", "--output-dir", str(straight)]) == 0
    box = capsys.readouterr().out
    assert "task ocr: beta 0.04; model " in box and "EMA of the weights (decay 0.9" in box
    assert vgpo.main([*argv, "--epochs", "1", "--output-dir", str(split)]) == 0
    assert vgpo.main(["--resume", str(split), "--epochs", "2", "--gradient-checkpointing"]) == 0
    assert "checkpointing on" in capsys.readouterr().out and json.loads((split / "args.json").read_text())[
        "gradient_checkpointing"]

    def result(out):
        rows = [{k: v for k, v in json.loads(ln).items() if not k.startswith("time/")}
                for ln in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))

    (rows_a, lora_a), (rows_b, lora_b) = result(straight), result(split)
    assert [r["epoch"] for r in rows_a] == [0, 1, 2] and rows_a == rows_b
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    raw = load_file(str(split / "checkpoints" / "epoch_0002" / "weights.safetensors"))  # peft's names
    saved = {f"transformer.{k.replace('.default', '')}": v for k, v in raw.items()}  # diffusers' names
    assert saved.keys() <= lora_a.keys() and any("lora_B" in k for k in saved)
    assert any((lora_a[k] - v).abs().max() > 1e-6 for k, v in saved.items())  # the EMA, not the weights
    assert all(lora_a[k].abs().max() > 0 for k in saved if "lora_B" in k)  # the EMA moved off B's zero start


def test_instant_rewards_use_the_preview_decoder_for_previews_and_the_vae_for_the_terminal_image(tiny_sd3):
    """r_k for k < T−2 scores previews decoded by `preview_decode`; r_{T−1} scores the rollout's images, and
    r_{T−2} is that terminal reward: the preview after step T−2 is bitwise the final latent (the last step is an
    Euler step to σ = 0), so the reward is called once less per trajectory and Q is what scoring it would give."""
    model, args = _load(tiny_sd3)
    traj = vgpo.rollout(model, PROMPTS[:2], args, generator=torch.Generator().manual_seed(0))
    assert torch.equal(traj.x0_preds[:, -2], traj.latents[:, -1])
    seen = []

    def reward_fn(images, prompts, metadata):
        seen.append(images)
        return images.mean(dim=(1, 2, 3))

    r = vgpo.instant_rewards(model, traj, reward_fn, [{}] * 4, previews=True)  # previews through the VAE
    assert sum(len(s) for s in seen) == 4 + 4 * 2  # N terminal images + N·(T−2) previews, nothing scored twice
    scored_twice = reward_fn(model.decode(traj.x0_preds[:, -2]), None, None)  # what scoring it again would give
    torch.testing.assert_close(vgpo.temporal_values(r, 0.9),
                               vgpo.temporal_values(torch.cat([r[:, :-2], scored_twice[:, None], r[:, -1:]], 1), 0.9))
    model.preview_decode = lambda z: torch.full((z.shape[0], 3, 32, 32), 0.25)
    r = vgpo.instant_rewards(model, traj, reward_fn, [{}] * 4, previews=True)
    torch.testing.assert_close(r[:, :-2], torch.full((4, 2), 0.25))
    torch.testing.assert_close(r[:, -1], traj.images.mean(dim=(1, 2, 3)))
    assert torch.equal(r[:, -2], r[:, -1])


def test_random_weights_need_no_weights_and_seed_embeddings_by_prompt(tiny_sd3):
    """--random-weights builds the architecture from its config only (random prompt embeddings of shape
    (B, 77 + L, joint dim) and (B, pooled dim), the same for the same prompt); the SD3.5 configs kept in
    sd3.py have SD3.5-M's 2.24 B and SD3.5-L's 8.06 B transformer parameters."""
    from diffusers import SD3Transformer2DModel

    model, _ = _load(tiny_sd3, random_weights=True)
    seq, pooled = model.encode(["a", "b", "a"])
    assert seq.shape == (3, 77 + 16, 32) and pooled.shape == (3, 16)
    assert torch.equal(seq[0], seq[2]) and not torch.equal(seq[0], seq[1])
    stock = _stock(tiny_sd3[0]).transformer.state_dict()
    ours = {k: v for k, v in model.transformer.state_dict().items() if "lora_" not in k}
    assert len(ours) == len(stock) and sum(v.numel() for v in ours.values()) == sum(v.numel() for v in stock.values())
    assert not torch.equal(ours["pos_embed.proj.weight"], stock["pos_embed.proj.weight"])
    for name, billions in [("sd3.5", 2.243), ("sd3.5-large", 8.057)]:
        with torch.device("meta"):
            net = SD3Transformer2DModel.from_config(sd3.TRANSFORMER_CONFIGS[name])
        assert abs(sum(p.numel() for p in net.parameters()) / 1e9 - billions) < 1e-3


def test_low_memory_is_a_preset_below_what_the_user_sets():
    """--low-memory sets micro-batch 4 × 8 accumulation, eval batch 4 and gradient checkpointing unless the user set
    them; without it checkpointing is off, as Flow-GRPO trains."""
    a = vgpo.make_args(model="sd3.5", low_memory=True)
    assert (a.train_batch_size, a.gradient_accumulation_steps, a.eval_batch_size, a.gradient_checkpointing) == \
        (4, 8, 4, True)
    assert vgpo.make_args(model="sd3.5", low_memory=True, train_batch_size=2).train_batch_size == 2
    assert not vgpo.make_args(model="sd3.5", low_memory=True, gradient_checkpointing=False).gradient_checkpointing
    a = vgpo.make_args(model="sd3.5")
    assert a.train_batch_size == 8 and not a.gradient_checkpointing


@pytest.mark.parametrize("model, needle", [
    ("vgpo-test-nobody/absent-model", "hf auth login"),  # a hub id that is neither cached nor reachable
    ("EMPTY_DIR", "not a complete SD3 diffusers folder"),
    ("sd3.5", "needs a CUDA GPU"),
])
def test_absent_weights_get_one_line_and_exit_code_2(model, needle, tmp_path, capsys):
    """Absent, gated or incomplete weights, and SD3.5 without a GPU: one line on stderr saying what to do
    (log in / local folder / --random-weights / --model tiny), exit code 2, no traceback."""
    if model == "sd3.5" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if model == "EMPTY_DIR":
        model = str(tmp_path / "empty")
        os.makedirs(model)
    assert vgpo.main(["--model", model, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err, err
    assert "--random-weights" in err and "--model tiny" in err


def test_sd3_benchmark_runs_end_to_end(tmp_path):
    """`python -m tools.bench --tiny-sd3` (the CPU stand-in for `--model sd3.5 --random-weights`) measures rollout
    against the stock pipeline, the three epoch configurations and the FLOP rates, and writes its JSON; at its
    default resolution (64 px: the tiny transformer takes at most 128), as the module docstring runs it."""
    from tools import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--tiny-sd3", "--num-generations", "2", "--train-batch-size", "2",
                       "--num-steps", "3", "--max-sequence-length", "16", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["setting"]["resolution"] == bench.TINY_SD3_RESOLUTION == 64
    assert set(r["epochs"]) == {"vgpo (vae previews)", "vgpo (tiny previews)", "grpo"}
    assert r["rollout"]["images"] == 4 and r["rollout"]["rollout_img_s"] > 0 and r["rollout"]["stock_plain_img_s"] > 0
    assert r["flops"]["train_step_tflop"] > r["flops"]["forward_tflop"] > 0
    assert r["peak_epoch_gib"] is None if r["device"] == "cpu" else r["peak_epoch_gib"] > 0


def test_sd3_benchmark_resolution_defaults_and_one_line_for_one_too_large(tmp_path, monkeypatch, capsys):
    """The benchmark's --resolution defaults to 64 px with --tiny-sd3 and to 512 px with --model; a resolution
    larger than the transformer's position embeddings cover (the tiny one: 32 tokens × 4 px = 128 px) stops with
    one line on stderr and exit code 2, as vgpo.py does, not with diffusers' traceback."""
    from tools import bench

    seen = []

    def record(a):
        seen.append(a.resolution)
        raise harness.UsageError("stop here")

    monkeypatch.setattr(bench, "sd3_bench", record)
    assert bench.main(["--tiny-sd3", "--out", str(tmp_path / "a.json")]) == 2
    assert bench.main(["--model", "sd3.5", "--random-weights", "--out", str(tmp_path / "b.json")]) == 2
    assert seen == [64, 512]
    monkeypatch.undo()
    capsys.readouterr()
    assert bench.main(["--tiny-sd3", "--resolution", "256", "--num-generations", "2", "--train-batch-size", "2",
                       "--num-steps", "3", "--max-sequence-length", "16", "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "at most 128 px" in err and "Traceback" not in err, err
    assert not (tmp_path / "c.json").exists()


# ---------------------------------------------------------------------------------------------------
# A machine with a GPU: devices and dtypes
# ---------------------------------------------------------------------------------------------------
class DeviceChecked(torch.nn.Module):
    """A velocity net that fails, as a CUDA kernel does, when an input is not on its device; returns v = 0."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def forward(self, x, encoder_hidden_states, pooled_projections, timestep, return_dict=False):
        for t in (x, encoder_hidden_states, pooled_projections, timestep):
            if t.device != self.device:
                raise RuntimeError(f"Expected all tensors to be on the same device, found {t.device} and {self.device}")
        return (torch.zeros_like(x),)


@pytest.mark.parametrize("given", ["noise", "generator"])
def test_cpu_noise_or_a_cpu_generator_drives_a_model_on_another_device(given):
    """The tests, tools and notebook pass CPU noise or CPU generators; with the model on another device (here the
    meta device stands in for a GPU) the rollout uses them there: noise given is moved, noise drawn from a generator
    is drawn on the generator's device (the same numbers as on the CPU) and then moved. (The meta device accepts a
    CPU generator where CUDA refuses one, so only the move can fail here.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = "meta"
    model = harness.Model(transformer=DeviceChecked(dev), device=dev, latent_shape=(4, 2, 2),
                          encode=lambda p: (torch.zeros(len(p), 3, 8, device=dev), torch.zeros(len(p), 8, device=dev)),
                          decode=lambda z: torch.zeros(z.shape[0], 3, 4, 4, device=dev),
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    args = vgpo.make_args(model="tiny", num_generations=2, num_steps=3, train_batch_size=2)
    cpu = torch.Generator().manual_seed(0)
    draws = dict(noise=torch.randn(4, 4, 2, 2, generator=cpu), step_noise=torch.randn(4, 2, 4, 2, 2, generator=cpu))
    kw = draws if given == "noise" else dict(generator=torch.Generator().manual_seed(0))
    traj = vgpo.rollout(model, ["a", "b"], args, **kw)
    assert traj.latents.device.type == traj.log_probs.device.type == traj.images.device.type == dev


def test_the_suite_runs_on_the_cpu_even_where_a_gpu_is():
    """conftest.py hides any GPU before torch looks for one, so `--device auto` means the CPU in every test and in
    every process a test starts (they inherit the environment)."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)], ids=["A100", "V100"])
def test_auto_dtype_is_bf16_only_where_the_gpu_computes_it_natively(native, want, monkeypatch):
    """`--dtype auto` on CUDA asks torch whether the card has bf16 units, not whether it can emulate bf16 (a V100 or T4
    can, slowly): bf16 on an A100-class card, fp32 on older ones; fp32 on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    assert sd3.compute_dtype("auto", "cuda") == want and sd3.compute_dtype("auto", "cuda:1") == want
    assert sd3.compute_dtype("auto", "cpu") == torch.float32 and sd3.compute_dtype("bf16", "cpu") == torch.bfloat16


def test_fp16_training_is_refused_in_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    """fp16 without a gradient scaler would train nothing: the run stops before loading anything, saying to use bf16
    or fp32."""
    monkeypatch.setattr(vgpo, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    assert vgpo.main(["--model", "sd3.5", "--random-weights", "--dtype", "fp16", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dtype fp16" in err and "--dtype bf16" in err and "--dtype fp32" in err, err
    assert not os.listdir(tmp_path)


def test_tf32_is_allowed_on_cuda_only_and_loading_an_sd3_model_asks_for_it(tiny_sd3, monkeypatch):
    """fp32 matmuls (the LoRA path, the reward models) run in TF32 on CUDA as in Flow-GRPO; a CPU run keeps exact fp32.
    sd3.load asks for it with the run's device."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        sd3.allow_tf32("cpu")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        sd3.allow_tf32("cuda:0")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    seen = []
    monkeypatch.setattr(sd3, "allow_tf32", seen.append)
    _load(tiny_sd3)
    assert seen == ["cpu"]


def test_prompt_embeddings_live_in_host_memory_and_the_text_encoders_are_freed(tiny_sd3):
    """After loading, the text encoders are gone (no T5 or CLIP text model more than before), a prompt that was not
    encoded at load time is an error that says so, and the cache hands out embeddings on the model's device from host
    memory (here the meta device stands in for a GPU: the cached tensors stay on the CPU)."""
    import gc

    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    def alive():
        gc.collect()
        return sum(type(o) in (T5EncoderModel, CLIPTextModelWithProjection) for o in gc.get_objects())

    before = alive()
    model, _ = _load(tiny_sd3)
    assert alive() == before
    seq, pooled = model.encode(PROMPTS[:2] + [""])
    assert seq.shape[0] == 3 and torch.isfinite(seq).all()
    with pytest.raises(ValueError, match="not encoded when the model was loaded"):
        model.encode(["a prompt the run never named"])
    filled = []
    encode = sd3._cache(lambda ps: (filled.extend(ps) or [torch.ones(2, 3)] * len(ps), [torch.ones(3)] * len(ps)),
                        "meta")
    out = encode(["x", "y", "x"])
    assert out[0].device.type == "meta" and out[0].shape == (3, 2, 3) and filled == ["x", "y"]
    assert set(encode.cache) == {"x", "y"} and all(t.device.type == "cpu" for p in encode.cache.values() for t in p)
    assert all(t.device.type == "cpu" for p in model.encode.cache.values() for t in p)


def test_decoding_many_latents_costs_their_images_and_one_chunk(tiny_sd3):
    """The decoder writes its fp32 images into one output, chunk by chunk, and rescales them in place: decoding N
    latents holds the N images plus one chunk's working memory, not the chunks, their concatenation and rescaled
    copies. Memory is counted on the CPU by tools.bench.TensorPeak (the tensors a block allocates); the images are
    exactly those of one VAE call per chunk."""
    from tools.bench import TensorPeak

    model, args = _load(tiny_sd3)
    vae = model.parts["vae"]
    z = torch.randn(160, *model.latent_shape, generator=torch.Generator().manual_seed(0))  # images outweigh a chunk
    decode = sd3.make_decoder(vae, 4)
    with TensorPeak() as one:
        decode(z[:4])
    with TensorPeak() as many:
        images = decode(z)
    with torch.no_grad():
        want = torch.cat([((vae.decode(c / vae.config.scaling_factor + vae.config.shift_factor)[0] + 1) / 2)
                          .clamp(0, 1) for c in z.split(4)])
    torch.testing.assert_close(images, want, atol=0, rtol=0)
    assert many.peak <= images.nbytes + one.peak, (many.peak, images.nbytes, one.peak)


SMOKE = ["--smoke", "--tiny-sd3", "--num-generations", "4", "--train-batch-size", "4", "--num-steps", "3",
         "--max-sequence-length", "16", "--resolution", "32"]


def test_the_smoke_check_passes_on_the_tiny_pipeline_and_low_memory_holds_less(tmp_path, capsys):
    """`python -m tools.bench --smoke` on the tiny random pipeline (as where no GPU is): the on-policy log-ratio of a
    micro-batch mixing two groups is within 1e-5, the gradient finite and non-zero, checkpointing on and off agree;
    seconds and peak memory per phase for the default settings and --low-memory, whose update (half the micro-batch,
    checkpointing on) holds less; a one-line verdict; exit code 0."""
    from tools import bench

    out = tmp_path / "smoke.json"
    assert bench.main([*SMOKE, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["passed"] and not r["failures"] and "verdict: PASS" in capsys.readouterr().out
    default, low = r["configs"]["default"], r["configs"]["--low-memory"]
    assert (default["train_batch_size"], default["gradient_checkpointing"]) == (4, False)
    assert (low["train_batch_size"], low["gradient_checkpointing"]) == (2, True)
    for c in (default, low):
        assert c["log_ratio"]["beyond"] == 0 and c["log_ratio"]["rms"] < 1e-5 and c["grad_finite"] and c["grad_norm"]
        assert set(c["phases"]) == {"load", "rollout", "previews + rewards", "update"}
        assert all(p["s"] > 0 for p in c["phases"].values()) and c["phases"]["update"]["peak_gib"] > 0
    assert r["checkpointing"]["relative_difference"] <= r["checkpointing"]["bound"] <= 1e-5
    assert low["phases"]["update"]["peak_gib"] < default["phases"]["update"]["peak_gib"]


@pytest.mark.parametrize("faults", [("off-policy", "checkpointing changes the model"), ("no gradient",)])
def test_the_smoke_check_fails_with_exit_code_1_on_what_it_checks(faults, monkeypatch, capsys):
    """Each check can fail: a rollout whose log-probs are 1e-4 off the policy's, a checkpointing switch that changes
    the model (two faults in one run: each shows), and a velocity the loss cannot move give the verdict FAIL,
    naming what failed, and exit code 1."""
    from tools import bench

    if "off-policy" in faults:
        rollout = vgpo.rollout

        def shifted(*a, **kw):
            traj = rollout(*a, **kw)
            traj.log_probs += 1e-4
            return traj

        monkeypatch.setattr(vgpo, "rollout", shifted)
    if "checkpointing changes the model" in faults:
        switch = bench._set_checkpointing

        def changes_weights(transformer, on):  # switching it on also doubles the adapters' A matrices
            switch(transformer, on)
            with torch.no_grad():
                for n, p in transformer.named_parameters():
                    if on and "lora_A" in n:
                        p.mul_(2.0)

        monkeypatch.setattr(bench, "_set_checkpointing", changes_weights)
    if "no gradient" in faults:
        velocity = vgpo.guided_velocity
        frozen = lambda *a, **kw: (lambda v: v.detach() + 0 * v)(velocity(*a, **kw))  # noqa: E731
        monkeypatch.setattr(vgpo, "guided_velocity", frozen)
    assert bench.main(SMOKE) == 1
    verdict = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("verdict:")]
    assert len(verdict) == 1 and verdict[0].startswith("verdict: FAIL"), verdict
    said = {"off-policy": "on-policy log-ratios exceed", "checkpointing changes the model":
            "checkpointing on and off give gradients", "no gradient": "the gradient is zero"}
    assert all(said[f] in verdict[0] for f in faults)
    assert not any(said[f] in verdict[0] for f in said if f not in faults)


def test_out_of_memory_on_sd3_says_to_resume_with_checkpointing_or_start_with_low_memory(tiny_sd3, tmp_path,
                                                                                        monkeypatch, capsys):
    """Out of GPU memory in an SD3 run's update without checkpointing: exit code 4, a checkpoint of the epoch before,
    and the command that continues with --gradient-checkpointing (which --resume accepts: it changes memory, not
    the result), or a new run with --low-memory."""
    folder, prompts, _ = tiny_sd3

    def runs_out(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")

    monkeypatch.setattr(vgpo, "policy_loss", runs_out)
    out = tmp_path / "run"
    argv = ["--model", folder, "--prompts", prompts, "--output-dir", str(out), "--epochs", "2", "--num-steps", "3",
            "--num-generations", "2", "--prompts-per-epoch", "2", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "2", "--eval-steps", "2", "--eval-batch-size", "4", "--resolution", "32",
            "--max-sequence-length", "16", "--reward", "jpeg_compressibility"]
    assert vgpo.main(argv) == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "out of GPU memory in the update of epoch 1" in err, err
    assert f"--resume {out} --gradient-checkpointing" in err and "--low-memory" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["epoch_0000"]
    monkeypatch.undo()
    assert vgpo.main(["--resume", str(out), "--gradient-checkpointing"]) == 0
    assert [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_first_download_is_announced_and_its_progress_reported_off_a_terminal(tmp_path, monkeypatch):
    """Loading a hub repository not in the Hugging Face cache yet says so (with SD3.5-M's size), then, off a terminal
    where the hub's bars are hidden, reports how much has arrived while the cache folder grows, and the total at the
    end. A cached repository, a local folder or --random-weights print nothing."""
    import threading
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = sd3.HUB_IDS["sd3.5"]
    blobs = tmp_path / ("models--" + repo.replace("/", "--")) / "blobs"
    lines = []

    def fetch():  # a download arriving in pieces, as the hub writes blobs/<hash>.incomplete
        blobs.mkdir(parents=True)
        for i in range(4):
            (blobs / f"{i}.incomplete").write_bytes(b"x" * 300_000)
            time.sleep(0.06)

    with sd3.download_progress(repo, lines.append, every=0.05):
        worker = threading.Thread(target=fetch)
        worker.start()
        worker.join()
    assert lines[0].startswith(f"sd3.py: downloading {repo} (about 16 GB, once)") and str(tmp_path) in lines[0]
    assert len(lines) >= 3 and "MB downloaded (" in lines[1] and lines[-1].endswith(" s")
    assert lines[-1].startswith(f"sd3.py: {repo}: 1.2 MB downloaded in")
    # cached: refs/main → snapshots/<commit>/model_index.json, and nothing arrives
    snapshot = tmp_path / ("models--" + repo.replace("/", "--")) / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    lines.clear()
    with sd3.download_progress(repo, lines.append, every=0.01):
        time.sleep(0.05)
    assert lines == []
    args = vgpo.make_args(model="sd3.5", random_weights=True)
    assert sd3.hub_repo(args) is None and not sd3.fetches(args)
    assert sd3.hub_repo(vgpo.make_args(model="sd3.5")) == repo and sd3.fetches(vgpo.make_args(model="sd3.5"))
    assert sd3.hub_repo(vgpo.make_args(model=str(tmp_path))) is None
