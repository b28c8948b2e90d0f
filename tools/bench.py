"""Benchmarks that print their figures (never timed tests), and the smoke check to run first on a GPU.

    python -m tools.bench --smoke             # first, on a new GPU: SD3.5-M, random weights, no download, minutes
    python -m tools.bench                     # toy world on this machine: VGPO's epoch time against GRPO's
    python -m tools.bench summarize runs/*    # a Markdown table of finished runs (held-out accuracy, time)
    python -m tools.bench --model sd3.5 --random-weights --resolution 512 --num-generations 8   # one GPU
    python -m tools.bench --tiny-sd3          # the same measurements on a tiny random SD3 pipeline (CPU check)
    python -m tools.bench detectors [SIZE]    # CPU forward time of the detectors considered for the geneval reward

VGPO decodes and scores a preview after every step (T reward calls per image instead of one): this
measures what that costs. Both algorithms run in one process on the same model, interleaved epoch by
epoch on the same prompts (which goes first alternates), after one warm-up epoch each, so that machine
noise hits both alike. Writes the table as JSON (--out).

The SD3 benchmark (`--model` or `--tiny-sd3`) measures, in one process: rollout images/s against the
stock StableDiffusion3Pipeline's images/s (same transformer, micro-batch, steps, CFG, prompt embeddings
given, final VAE decode included in both); VGPO's epoch time with both preview decoders against GRPO's;
peak GPU memory of an epoch with the default settings and with --low-memory (CUDA only); and training
against forward TFLOP/s, where FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions and
attention, as executed: the backward pass and the gradient-checkpointing recompute included).

The smoke check (`--smoke`; SD3.5-M with random weights on a GPU, the tiny random pipeline where there is none)
loads the model with the default settings, then with --low-memory, and for each: seconds and peak memory of load,
rollout, previews + rewards and update; before the update, on a micro-batch mixing two prompt groups, the on-policy
log-ratio (within 1e-5) and the gradient (finite, non-zero); once, the gradient with gradient checkpointing on
against off. A one-line verdict; exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import harness
import vgpo


def toy_epoch_time(epochs: int = 6, seed: int = 0) -> dict:
    args = vgpo.make_args(model="tiny", seed=seed)
    model = vgpo.load_model(args)
    reward_fn = vgpo.make_reward(args, model.device)
    train_set, _ = vgpo.load_prompts(args)
    rng = np.random.default_rng(seed)
    optimizer = vgpo.make_optimizer(model, args)  # the same optimizer as a training run
    rows = {"vgpo": [], "grpo": []}
    for e in range(epochs + 1):  # epoch 0 is the warm-up
        chosen = vgpo.sample_prompts(train_set, args.prompts_per_epoch, rng)
        for algo in (("vgpo", "grpo") if e % 2 == 0 else ("grpo", "vgpo")):
            row = vgpo.train_epoch(model, chosen, dataclasses.replace(args, algo=algo), reward_fn, optimizer, e)
            if e > 0:
                rows[algo].append(row)
            print(f"epoch {e} {algo}: {row['time/epoch_s']:.2f} s", flush=True)
    keys = ("time/rollout_s", "time/reward_s", "time/update_s", "time/epoch_s")
    table = {algo: {k: float(np.mean([r[k] for r in rs])) for k in keys} for algo, rs in rows.items()}
    table["vgpo/grpo epoch time"] = table["vgpo"]["time/epoch_s"] / table["grpo"]["time/epoch_s"]
    table["setting"] = {"epochs": epochs, "N": args.prompts_per_epoch * args.num_generations, "T": args.num_steps,
                        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                        "date": time.strftime("%Y-%m-%d")}
    return table


DETECTOR_MIN_SIZE = 256  # smaller images give Grounding DINO fewer feature cells than its 900 queries (128 px: 340)


def detector_times(size: int = 512, rounds: int = 3) -> dict:
    """Forward time of each detector considered for reward.geneval on one size×size image, on the CPU at torch's
    thread count: the real architecture built from its config with random weights (no download), the models
    interleaved round by round (the order reversed every round) after one warm-up round; the median per model
    and its ratio to Mask2Former Swin-S, the one chosen. Open-vocabulary models get the 80 COCO classes as text."""
    import transformers as tf

    def swin(depths):
        return dict(model_type="swin", depths=depths, out_features=["stage1", "stage2", "stage3", "stage4"])

    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=g)
    builds = {  # name: (model, inputs)
        "mask2former-swin-s": (tf.Mask2FormerForUniversalSegmentation, tf.Mask2FormerConfig(num_labels=80), {}),
        "mask2former-swin-t": (tf.Mask2FormerForUniversalSegmentation,
                               tf.Mask2FormerConfig(num_labels=80, backbone_config=swin([2, 2, 6, 2])), {}),
        "rt-detr-r50": (tf.RTDetrForObjectDetection, tf.RTDetrConfig(), {}),
        "detr-r50": (tf.DetrForObjectDetection, tf.DetrConfig(use_timm_backbone=False, num_labels=91), {}),
        # "person . bicycle . …": about 200 BERT tokens for the 80 class names
        "grounding-dino-t": (tf.GroundingDinoForObjectDetection, tf.GroundingDinoConfig(),
                             {"input_ids": torch.randint(1000, 2000, (1, 200), generator=g)}),
        # OWLv2 sees a fixed 960×960 input; one query of 16 tokens per class
        "owlv2-b16": (tf.Owlv2ForObjectDetection, tf.Owlv2Config(vision_config=dict(image_size=960)),
                      {"input_ids": torch.randint(0, 1000, (80, 16), generator=g),
                       "pixel_values": torch.randn(1, 3, 960, 960, generator=g)}),
    }
    models = {name: (cls(cfg).eval(), {"pixel_values": image, **extra}) for name, (cls, cfg, extra) in builds.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 is the warm-up
            for name in (list(models) if r % 2 else list(models)[::-1]):
                model, inputs = models[name]
                t0 = time.perf_counter()
                model(**inputs)
                if r:
                    times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["mask2former-swin-s"]))
    return {"size": size, "threads": torch.get_num_threads(), "rounds": rounds,
            "models": {name: {"params_m": sum(p.numel() for p in models[name][0].parameters()) / 1e6,
                              "median_s": float(np.median(t)), "ratio": float(np.median(t)) / base}
                       for name, t in times.items()}}


def summarize(run_dirs: list[str]) -> str:
    """Markdown table of runs: held-out strict accuracy at epoch 0 and at the end, best, time per epoch."""
    lines = ["| run | algo | seed | epochs | held-out strict, base → final | change | best (epoch) | s/epoch | "
             "total min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in run_dirs:
        args = json.load(open(f"{d}/args.json"))
        rows = [json.loads(ln) for ln in open(f"{d}/metrics.jsonl")]
        evals = [r for r in rows if "eval/strict_accuracy" in r]
        best = max(evals, key=lambda r: r["eval/strict_accuracy"])
        first, last = evals[0]["eval/strict_accuracy"], evals[-1]["eval/strict_accuracy"]
        per_epoch = np.mean([r["time/epoch_s"] for r in rows if "time/epoch_s" in r])
        total = sum(r.get("time/epoch_s", 0) + r.get("time/eval_s", 0) for r in rows) / 60
        lines.append(f"| {d} | {args['algo']} | {args['seed']} | {rows[-1]['epoch']} | {first:.3f} → {last:.3f} | "
                     f"{last - first:+.3f} | {best['eval/strict_accuracy']:.3f} ({best['epoch']}) | "
                     f"{per_epoch:.1f} | {total:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# SD3-family models
# ----------------------------------------------------------------------------------------------------


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device, reps=1):
    """Mean seconds of `reps` calls of fn() (after the caller's warm-up), and the last result."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps, out


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _bench_args(a, prompt_file, **extra):
    n = a.prompts_per_epoch * a.num_generations
    b = extra.pop("train_batch_size", a.train_batch_size)
    values = dict(model=a.model, random_weights=a.random_weights, resolution=a.resolution,
                  num_generations=a.num_generations,
                  prompts_per_epoch=a.prompts_per_epoch, num_steps=a.num_steps, guidance_scale=a.guidance_scale,
                  reward=a.reward, prompts=prompt_file, max_sequence_length=a.max_sequence_length, seed=0,
                  train_batch_size=b, gradient_accumulation_steps=max(1, n // b // 2))  # 2 optimizer steps per epoch
    args = vgpo.make_args(**{**values, **extra})
    harness.validate(args)
    return args


def stock_pipeline(model):
    """The stock StableDiffusion3Pipeline around the same transformer, VAE and scheduler settings (no text
    encoders: it is given the same cached prompt embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    import sd3

    StableDiffusion3Pipeline = sd3.pipeline_module().StableDiffusion3Pipeline  # without transformers' import notes
    pipe = StableDiffusion3Pipeline(transformer=model.transformer, vae=model.parts["vae"],
                                    scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rollout_speed(model, args, prompts, device, reps=3) -> dict:
    """Images/s of vgpo.rollout (SDE, log-probs, previews kept, final VAE decode) and of the stock
    pipeline (ODE, final decode) on the same N images, both in micro-batches of train_batch_size. The
    three are interleaved `reps` times and each keeps its fastest time (the least disturbed by whatever
    else the machine is doing)."""
    n, b = len(prompts) * args.num_generations, args.train_batch_size
    expanded = [p for p in prompts for _ in range(args.num_generations)]
    pipe = stock_pipeline(model)
    h = w = args.resolution

    def stock():
        out = []
        for s in range(0, n, b):
            seq, pooled = model.encode(expanded[s : s + b])
            neg, neg_pooled = model.encode([""] * len(seq))
            out.append(pipe(prompt_embeds=seq, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                            negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=args.num_steps,
                            guidance_scale=args.guidance_scale, height=h, width=w, output_type="pt").images)
        return out

    ours = lambda: vgpo.rollout(model, prompts, args, generator=torch.Generator(device).manual_seed(0))  # noqa: E731
    def plain():  # the stock pipeline as users run it: the plain base model, no LoRA layers
        with adapter_off(model.transformer):
            return stock()

    ours(), stock(), plain()  # warm-up (kernels, allocator)
    times = {"ours": [], "stock": [], "plain": []}
    for r in range(reps):
        for name, fn in (("ours", ours), ("stock", stock), ("plain", plain))[:: 1 if r % 2 == 0 else -1]:
            times[name].append(_timed(fn, device)[0])
    t_ours, t_stock, t_plain = (min(times[k]) for k in ("ours", "stock", "plain"))
    return {"images": n, "rollout_img_s": n / t_ours, "stock_same_lora_transformer_img_s": n / t_stock,
            "stock_plain_img_s": n / t_plain, "rollout/stock_plain": t_plain / t_ours}


@contextlib.contextmanager
def adapter_off(transformer):
    """The transformer with its LoRA switched off: the plain base model."""
    flags = [(p, p.requires_grad) for n, p in transformer.named_parameters() if "lora_" in n]
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
        for p, flag in flags:  # peft's enable switches requires_grad on for every adapter weight
            p.requires_grad_(flag)


def flop_rates(model, args, prompts, device, reps=3) -> dict:
    """Forward TFLOP/s of one rollout transformer call (CFG: 2B samples) and training TFLOP/s of vgpo.update
    on one micro-batch (T−1 trained steps: forward with grad, KL reference forward, backward)."""
    b = args.train_batch_size
    traj = vgpo.rollout(model, prompts[:1], dataclasses.replace(args, num_generations=b),
                        generator=torch.Generator(device).manual_seed(1))
    cond, uncond = model.encode(traj.prompts), model.encode([""] * b)
    x, sigma = traj.latents[:, 1], traj.sigmas[1]
    with torch.no_grad():
        fwd = lambda: vgpo.guided_velocity(model.transformer, x, sigma, cond, uncond, args.guidance_scale)  # noqa: E731
        fwd()
        f_fwd = _flops(fwd)
        t_fwd, _ = _timed(fwd, device, reps)
    adv = torch.randn(b, args.num_steps, generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.SGD([p for p in model.transformer.parameters() if p.requires_grad], lr=0.0)  # weights kept
    one = dataclasses.replace(args, gradient_accumulation_steps=1)
    train = lambda: vgpo.update(model, traj, adv, optimizer, one)  # noqa: E731
    train()
    f_train = _flops(train)
    t_train, _ = _timed(train, device, reps=max(1, reps // 2))
    steps = args.num_steps - 1
    return {"forward_batch": 2 * b if args.guidance_scale != 1 else b, "forward_s": t_fwd,
            "forward_tflop": f_fwd / 1e12, "forward_tflop_s": f_fwd / t_fwd / 1e12, "train_step_s": t_train / steps,
            "train_step_tflop": f_train / steps / 1e12,
            "train_tflop_s": f_train / t_train / 1e12}


def epoch_times(model, args, prompts, device, epochs=1) -> dict:
    """Seconds per epoch of VGPO with the VAE and the tiny preview decoder, and of GRPO, interleaved
    after one warm-up epoch each, on the same prompts. Peak GPU memory of the VGPO (VAE previews) epochs."""
    reward_fn = vgpo.make_reward(args, device)  # a --reward spec, e.g. pickscore=1,aesthetic=0.5
    optimizer = vgpo.make_optimizer(model, args)
    chosen = [(p, {}) for p in prompts]
    tiny = model.parts.get("tiny_preview")
    configs = {"vgpo (vae previews)": ("vgpo", None), "grpo": ("grpo", None)}
    if tiny is not None:
        configs["vgpo (tiny previews)"] = ("vgpo", tiny)
    rows, peak = {k: [] for k in configs}, 0
    for e in range(epochs + 1):
        for name in (list(configs) if e % 2 == 0 else list(configs)[::-1]):
            algo, preview = configs[name]
            model.preview_decode = preview
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            row = vgpo.train_epoch(model, chosen, dataclasses.replace(args, algo=algo), reward_fn, optimizer, e)
            if device.startswith("cuda") and name == "vgpo (vae previews)":
                peak = max(peak, torch.cuda.max_memory_allocated())
            if e > 0:
                rows[name].append(row)
            print(f"  epoch {e} {name}: {row['time/epoch_s']:.2f} s", flush=True)
    keys = ("time/rollout_s", "time/reward_s", "time/update_s", "time/epoch_s")
    out = {name: {k: float(np.mean([r[k] for r in rs])) for k in keys} for name, rs in rows.items()}
    n = len(prompts) * args.num_generations
    for name in out:
        out[name]["img_s"] = n / out[name]["time/epoch_s"]
        out[name]["/grpo"] = out[name]["time/epoch_s"] / out["grpo"]["time/epoch_s"]
    model.preview_decode = None
    return out, peak


def _gib(x):
    return x / 2**30


TINY_SD3_RESOLUTION = 64  # the tiny pipeline's default side: 32×32 latents (its transformer takes up to 128 px)


def sd3_bench(a) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = a.tmp  # the prompt file (and the tiny pipeline); removed by main() afterwards
    if a.tiny_sd3:  # a small random SD3 pipeline with text encoders, saved and loaded like a user's folder
        import sd3

        a.model = sd3.save_tiny_random_pipeline(os.path.join(tmp, "pipe"), layers=4, heads=4)
        a.tiny_preview = sd3.save_tiny_random_preview_vae(os.path.join(tmp, "taesd"))
    prompts = [f"a photo of object number {i} on a table" for i in range(a.prompts_per_epoch)]
    prompt_file = os.path.join(tmp, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(prompts) + "\n")
    preview = a.tiny_preview or "tiny"
    setting = {k: v for k, v in vars(a).items() if k != "tmp"}
    if a.tiny_sd3:  # not the temp folder's name, which is gone after the run
        setting.update(model="tiny random SD3 pipeline (sd3.save_tiny_random_pipeline, 4 layers)",
                       tiny_preview="random")
    result = {"setting": setting, "device": device,
              "hardware": torch.cuda.get_device_name() if device == "cuda" else
              f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "date": time.strftime("%Y-%m-%d")}

    # 1. default settings: load, rollout speed, FLOP rates, epoch times, peak memory
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    args = _bench_args(a, prompt_file)
    model = vgpo.load_model(args)
    result["load_s"] = time.perf_counter() - t0
    if device == "cuda":
        result["peak_load_gib"] = _gib(torch.cuda.max_memory_allocated())
    try:  # the tiny preview decoder may be unavailable (TAESD3 not cached): then only the VAE is measured
        import sd3

        tiny_vae = sd3.load_preview_vae(preview, a.random_weights, device, model.parts["dtype"])
        model.parts["tiny_preview"] = sd3.make_decoder(tiny_vae, args.train_batch_size)
    except OSError as e:
        print(f"tiny preview decoder unavailable ({str(e).splitlines()[0][:120]}): measuring VAE previews only")
    print("rollout speed …", flush=True)
    result["rollout"] = rollout_speed(model, args, prompts, device)
    print("FLOP rates …", flush=True)
    result["flops"] = flop_rates(model, args, prompts, device)
    print("epoch times …", flush=True)
    result["epochs"], peak = epoch_times(model, args, prompts, device, a.epochs)
    result["peak_epoch_gib"] = _gib(peak) if device == "cuda" else None

    # 2. --low-memory: a fresh model with its settings, one VGPO epoch (CUDA only: it is about GPU memory)
    result["peak_low_memory_gib"] = None
    if device == "cuda":
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        args = _bench_args(a, prompt_file, low_memory=True, train_batch_size=4)
        model = vgpo.load_model(args)
        row = vgpo.train_epoch(model, [(p, {}) for p in prompts], args, vgpo.make_reward(args, device),
                               vgpo.make_optimizer(model, args), 0)  # one VGPO epoch, VAE previews
        result["low_memory_epoch_s"] = row["time/epoch_s"]
        result["peak_low_memory_gib"] = _gib(torch.cuda.max_memory_allocated())
    return result


# ----------------------------------------------------------------------------------------------------
# The smoke check: what to run first on a GPU (random weights, no download, a few minutes)
# ----------------------------------------------------------------------------------------------------
# Re-scored on-policy, before any update, a step's log-probability must be the rollout's: SD3's outputs can depend
# on the batch a sample is computed in, and the update re-scores samples in micro-batches that mix prompt groups
# the rollout computed apart. The loss clips ratios at 1 ± 1e-4 (SD3.5's ε): a drift of a tenth of that is the limit.
SMOKE_LOG_RATIO = 1e-5
# Checkpointing on and off must give the same gradient: recomputation repeats the forward with the same kernels on
# the same inputs, so the two agree to the card's run-to-run noise. Allowed: 4× the difference between two runs
# without checkpointing, and at least this relative difference (fp32: rounding of long sums; bf16: a few units of its
# 2^-8 roundoff, should the recomputation round otherwise).
SMOKE_GRAD_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


class TensorPeak(TorchDispatchMode):
    """Within the block: the peak bytes of CPU tensors it allocated and still holds (a storage counted once, whatever
    its views), in `peak`. The CPU's stand-in for torch.cuda.max_memory_allocated, which also counts what existed
    before (the weights); every operation is intercepted, so timings taken inside are slower."""

    def __enter__(self):
        self.live, self.peak, self.held = 0, 0, set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size and key not in self.held:
                self.held.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key, size):
        self.held.discard(key)
        self.live -= size


@contextlib.contextmanager
def _phase(device: str, out: dict, name: str, count_cpu: bool = True):
    """Seconds and peak GiB of the block into out[name]: on CUDA torch's peak of allocated memory (everything on the
    GPU), on the CPU the peak of the tensors the block allocates (TensorPeak; None with count_cpu=False)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = TensorPeak() if count_cpu and not cuda else contextlib.nullcontext()
    t0 = time.perf_counter()
    with counter:
        yield
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if cuda else counter.peak if count_cpu else None
    out[name] = {"s": time.perf_counter() - t0, "peak_gib": None if peak is None else _gib(peak)}


def _mixed_micro_batch(traj, size: int):
    """size/2 trajectories of each of the first two prompt groups: a micro-batch the update may train on, mixing two
    groups that the rollout sampled in separate micro-batches (when G ≥ its micro-batch)."""
    idx = torch.cat([(traj.group_ids == g).nonzero().flatten()[: size // 2] for g in (0, 1)])
    return vgpo.Trajectories(traj.latents[idx], traj.log_probs[idx], traj.x0_preds[idx], traj.sigmas,
                             traj.images[idx], [traj.prompts[i] for i in idx.tolist()], traj.group_ids[idx])


def _step_gradient(model, traj, advantages, args):
    """vgpo.update on `traj` as one micro-batch and one optimizer step (lr 0: the weights stay): the gradient that
    step sees (unclipped; None if the NaN guard skipped it) and the update's statistics, with ε = SMOKE_LOG_RATIO so
    that policy/clip_frac is the share of ratios further than that from 1."""
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    optimizer, seen = torch.optim.SGD(params, lr=0.0), {}

    def keep(*_):
        seen["grad"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                                  for p in params])

    optimizer.register_step_pre_hook(keep)
    one = dataclasses.replace(args, train_batch_size=len(traj.prompts), gradient_accumulation_steps=1,
                              clip_range=SMOKE_LOG_RATIO, max_grad_norm=float("inf"))
    stats = vgpo.update(model, traj, advantages, optimizer, one)
    return seen.get("grad"), stats


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _set_checkpointing(transformer, on: bool) -> None:
    (transformer.enable_gradient_checkpointing if on else transformer.disable_gradient_checkpointing)()


def smoke(a) -> dict:
    """The smoke check (module docstring): for the default settings and --low-memory, seconds and peak memory of
    load, rollout, previews + rewards and update; before the update, on a micro-batch mixing two groups, the
    on-policy log-ratio and the gradient; once, the gradient with checkpointing on against off. Returns the results
    with `failures` (empty: passed)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = a.tmp
    if a.tiny_sd3:  # the checks need no size: the smallest pipeline
        import sd3

        a.model = sd3.save_tiny_random_pipeline(os.path.join(tmp, "pipe"))
    # quoted text, so that --reward ocr can score them too (its cost on this host's CPU: previews + rewards)
    prompts = [f'a shop sign that says "OPEN {i}"' for i in range(a.prompts_per_epoch)]
    prompt_file = os.path.join(tmp, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(prompts) + "\n")
    metadata = [{}] * (len(prompts) * a.num_generations)
    r = {"setting": {k: v for k, v in vars(a).items() if k not in ("tmp", "model")} |
         {"model": "tiny random SD3 pipeline" if a.tiny_sd3 else a.model}, "device": device,
         "hardware": torch.cuda.get_device_name() if device == "cuda" else
         f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
         "date": time.strftime("%Y-%m-%d"), "configs": {}, "failures": []}
    configs = {"default": {}, "--low-memory": dict(low_memory=True, train_batch_size=a.train_batch_size // 2)}
    for name, extra in configs.items():
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        c = r["configs"][name] = {"phases": {}}
        # loading reads files through libraries that the CPU counter would slow down for nothing
        with _phase(device, c["phases"], "load", count_cpu=False):
            args = _bench_args(a, prompt_file, **extra)
            model = vgpo.load_model(args)
        c.update(train_batch_size=args.train_batch_size, gradient_checkpointing=args.gradient_checkpointing,
                 dtype=str(model.parts["dtype"]).removeprefix("torch."))
        reward_fn = vgpo.make_reward(args, device)
        with _phase(device, c["phases"], "rollout"):
            traj = vgpo.rollout(model, prompts, args, generator=torch.Generator().manual_seed(0))
        with _phase(device, c["phases"], "previews + rewards"):
            rewards = vgpo.instant_rewards(model, traj, reward_fn, metadata, previews=True)
        # --- the checks, before any update: the rollout's policy re-scored ---
        mixed = _mixed_micro_batch(traj, args.train_batch_size)
        adv = torch.randn(len(mixed.prompts), args.num_steps, generator=torch.Generator().manual_seed(1)).to(device)
        grad, stats = _step_gradient(model, mixed, adv, args)
        c["log_ratio"] = {"beyond": stats.get("policy/clip_frac", 1.0),
                          "rms": float(np.sqrt(2 * stats.get("policy/approx_kl", float("nan"))))}
        c["grad_norm"] = None if grad is None else float(grad.norm())
        c["grad_finite"] = grad is not None and bool(torch.isfinite(grad).all())
        if c["log_ratio"]["beyond"] > 0:
            r["failures"].append(f"{name}: {c['log_ratio']['beyond']:.1%} of on-policy log-ratios exceed "
                                 f"{SMOKE_LOG_RATIO:g} (RMS {c['log_ratio']['rms']:.2g})")
        if not c["grad_finite"] or not c["grad_norm"]:
            r["failures"].append(f"{name}: the gradient is {'not finite' if not c['grad_finite'] else 'zero'}")
        if name == "default" and grad is not None:
            _set_checkpointing(model.transformer, args.gradient_checkpointing)  # as loaded, then the other way
            again, _ = _step_gradient(model, mixed, adv, args)
            _set_checkpointing(model.transformer, not args.gradient_checkpointing)
            other, _ = _step_gradient(model, mixed, adv, args)
            _set_checkpointing(model.transformer, args.gradient_checkpointing)
            noise = _relative(again, grad)
            diff = _relative(other, grad) if other is not None else float("inf")
            bound = max(SMOKE_GRAD_FLOOR.get(model.parts["dtype"], 1e-2), 4 * noise)
            r["checkpointing"] = {"relative_difference": diff, "repeat_difference": noise, "bound": bound}
            if not diff <= bound:
                r["failures"].append(f"checkpointing on and off give gradients {diff:.2g} apart (relative), more "
                                     f"than {bound:.2g}")
        # --- the update of the whole rollout, as an epoch runs it ---
        advantages = vgpo.credit(rewards, traj.group_ids, args)[2]
        optimizer = vgpo.make_optimizer(model, args)
        with _phase(device, c["phases"], "update"):
            vgpo.update(model, traj, advantages, optimizer, args)
        del model, traj, optimizer, grad
    r["passed"] = not r["failures"]
    return r


def print_smoke(r) -> None:
    s, cpu = r["setting"], r["device"] == "cpu"
    print(f"\nsmoke check: {r['hardware']}, {r['date']}, --model {s['model']}"
          f"{' (random weights)' if s.get('random_weights') else ''}, {s['resolution']} px, "
          f"N = {s['prompts_per_epoch']}×{s['num_generations']}, T = {s['num_steps']}, CFG {s['guidance_scale']}")
    names = list(r["configs"])
    print(f"{'':34s}" + "".join(f"{n:>26s}" for n in names))
    print(f"{'micro-batch, checkpointing, dtype':34s}" + "".join(
        f"{c['train_batch_size']:>14d}, {'on' if c['gradient_checkpointing'] else 'off':>3s}, {c['dtype']:>6s}"
        for c in r["configs"].values()))
    unit = "s / peak GiB of new CPU tensors" if cpu else "s / peak GiB allocated"
    for phase in ("load", "rollout", "previews + rewards", "update"):
        cells = []
        for c in r["configs"].values():
            ph = c["phases"][phase]
            cells.append(f"{ph['s']:8.2f} s / " + ("   n/a" if ph["peak_gib"] is None else f"{ph['peak_gib']:6.3g}"))
        print(f"{phase + ' (' + unit + ')' if phase == 'load' else phase:34s}" + "".join(f"{x:>26s}" for x in cells))
    print(f"{'on-policy log-ratio > ' + format(SMOKE_LOG_RATIO, 'g'):34s}" + "".join(
        f"{format(c['log_ratio']['beyond'], '.1%') + ' (RMS ' + format(c['log_ratio']['rms'], '.1g') + ')':>26s}"
        for c in r["configs"].values()))
    print(f"{'gradient norm (finite)':34s}" + "".join(
        f"{format(c['grad_norm'] or 0.0, '.3g') + (' ✓' if c['grad_finite'] and c['grad_norm'] else ' ✗'):>26s}"
        for c in r["configs"].values()))
    if "checkpointing" in r:
        ck = r["checkpointing"]
        print(f"checkpointing on vs off: relative difference {ck['relative_difference']:.2g} (bound {ck['bound']:.2g}; "
              f"two runs alike: {ck['repeat_difference']:.2g})")
    if cpu:
        print("(CPU: times include the memory counting; run it on the GPU for real figures)")
    print("verdict: PASS: the update re-scores the rollout's policy, gradients flow, checkpointing changes only memory"
          if r["passed"] else "verdict: FAIL: " + "; ".join(r["failures"]))


def print_sd3(r) -> None:
    cpu = r["device"] == "cpu"
    print(f"\n{'CPU figures (not a GPU measurement)' if cpu else 'GPU figures'}: {r['hardware']}, {r['date']}, "
          f"--model {r['setting']['model'] if not r['setting']['tiny_sd3'] else 'tiny random SD3 pipeline'}, "
          f"{r['setting']['resolution']} px, N = {r['rollout']['images']}, T = {r['setting']['num_steps']}, "
          f"CFG {r['setting']['guidance_scale']}, micro-batch {r['setting']['train_batch_size']}")
    ro, fl = r["rollout"], r["flops"]
    print(f"rollout {ro['rollout_img_s']:.2f} img/s | stock pipeline {ro['stock_plain_img_s']:.2f} img/s (plain), "
          f"{ro['stock_same_lora_transformer_img_s']:.2f} img/s (same LoRA transformer) | "
          f"ratio {ro['rollout/stock_plain']:.3f}")
    print(f"{'seconds per epoch':22s} {'rollout':>8s} {'reward':>8s} {'update':>8s} {'epoch':>8s} {'img/s':>7s} "
          f"{'/GRPO':>6s}")
    for name, e in r["epochs"].items():
        print(f"{name:22s} {e['time/rollout_s']:8.2f} {e['time/reward_s']:8.2f} {e['time/update_s']:8.2f} "
              f"{e['time/epoch_s']:8.2f} {e['img_s']:7.2f} {e['/grpo']:6.3f}")
    mem = (lambda x: "n/a (CPU)" if x is None else f"{x:.1f} GiB")
    print(f"peak GPU memory: epoch {mem(r['peak_epoch_gib'])}, --low-memory {mem(r['peak_low_memory_gib'])}")
    print(f"forward (batch {fl['forward_batch']}): {fl['forward_s'] * 1e3:.1f} ms, {fl['forward_tflop']:.3g} TFLOP, "
          f"{fl['forward_tflop_s']:.3g} TFLOP/s | train step: {fl['train_step_s'] * 1e3:.1f} ms, "
          f"{fl['train_step_tflop']:.3g} TFLOP, {fl['train_tflop_s']:.3g} TFLOP/s")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summarize"]:
        print(summarize(argv[1:]))
        return
    if argv[:1] == ["detectors"]:  # python -m tools.bench detectors [SIZE]
        if len(argv) > 2 or (argv[1:] and not (argv[1].isdigit() and int(argv[1]) >= DETECTOR_MIN_SIZE)):
            print(f"tools.bench: error: detectors takes one optional SIZE in px, an integer ≥ {DETECTOR_MIN_SIZE} "
                  f"(Grounding DINO picks 900 queries among its feature cells), not {' '.join(argv[1:])!r}",
                  file=sys.stderr)
            return 2
        r = detector_times(*(int(a) for a in argv[1:2]))
        print(f"CPU forward of one {r['size']}-px image, {r['threads']} thread(s), "
              f"median of {r['rounds']} interleaved rounds")
        print("| detector | parameters | seconds | time / Mask2Former Swin-S |\n|---|---|---|---|")
        for name, m in r["models"].items():
            print(f"| {name} | {m['params_m']:.1f} M | {m['median_s']:.2f} | {m['ratio']:.2f} |")
        return
    if any(x.startswith("--model") or x in ("--tiny-sd3", "--smoke") for x in argv):
        p = argparse.ArgumentParser(description="SD3-family benchmark (see the module docstring)")
        p.add_argument("--smoke", action="store_true",
                       help="the checks to run first on a GPU (random weights; the tiny pipeline where no GPU is)")
        p.add_argument("--model", default="", help="sd3.5, sd3.5-large, a hub id or a local diffusers folder")
        p.add_argument("--tiny-sd3", action="store_true", help="build a tiny random SD3 pipeline and bench it (CPU)")
        p.add_argument("--random-weights", action="store_true")
        p.add_argument("--resolution", type=int, default=None,
                       help="image side in px (default 512; with --tiny-sd3 64: its transformer takes at most 128)")
        p.add_argument("--num-generations", type=int, default=8)
        p.add_argument("--prompts-per-epoch", type=int, default=2, help="P; N = P·G images per epoch")
        p.add_argument("--train-batch-size", type=int, default=8)
        p.add_argument("--num-steps", type=int, default=10)
        p.add_argument("--guidance-scale", type=float, default=4.5)
        p.add_argument("--max-sequence-length", type=int, default=256)
        p.add_argument("--reward", default="jpeg_compressibility",
                       help="a --reward spec as in vgpo.py, e.g. pickscore or pickscore=1,aesthetic=0.5")
        p.add_argument("--tiny-preview", default="",
                       help="AutoencoderTiny folder for the tiny previews (default TAESD3)")
        p.add_argument("--epochs", type=int, default=1, help="timed epochs per configuration (after one warm-up each)")
        p.add_argument("--out", default=None, help="JSON of the results (default bench-sd3.json; --smoke: none)")
        a = p.parse_args(argv)
        if a.smoke:  # random weights, no download: SD3.5-M on a GPU, the tiny pipeline where there is none
            import sd3

            a.model = a.model or ("sd3.5" if torch.cuda.is_available() else "")
            a.tiny_sd3 = a.tiny_sd3 or not a.model
            a.random_weights = a.random_weights or a.model in sd3.HUB_IDS
            if a.tiny_sd3:
                print("smoke check on the tiny random SD3 pipeline" + ("" if a.model else " (no GPU here)"))
            if a.train_batch_size < 4 or a.train_batch_size % 4 or a.num_generations < a.train_batch_size // 2:
                print("tools.bench: error: --smoke needs --train-batch-size a multiple of 4 (its micro-batch and "
                      "--low-memory's half mix two prompt groups equally) and --num-generations ≥ half of it",
                      file=sys.stderr)
                return 2
        if a.resolution is None:
            a.resolution = TINY_SD3_RESOLUTION if a.tiny_sd3 else 512
        a.tmp = tempfile.mkdtemp(prefix="vgpo-bench-")
        try:
            r = smoke(a) if a.smoke else sd3_bench(a)
        except harness.UsageError as e:
            print(f"tools.bench: error: {e}", file=sys.stderr)
            return 2
        finally:
            shutil.rmtree(a.tmp, ignore_errors=True)
        (print_smoke if a.smoke else print_sd3)(r)
        out = a.out or (None if a.smoke else "bench-sd3.json")
        if out:
            with open(out, "w") as f:
                json.dump(r, f, indent=2)
        return 0 if r.get("passed", True) else 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per algorithm (after one warm-up each)")
    p.add_argument("--out", default="bench-toy.json")
    a = p.parse_args(argv)
    t = toy_epoch_time(a.epochs)
    print(f"\n{'seconds per epoch':18s} {'rollout':>8s} {'reward':>8s} {'update':>8s} {'epoch':>8s}")
    for algo in ("vgpo", "grpo"):
        print(f"{algo:18s} " + " ".join(f"{t[algo][k]:8.2f}" for k in
                                        ("time/rollout_s", "time/reward_s", "time/update_s", "time/epoch_s")))
    print(f"VGPO / GRPO epoch time: {t['vgpo/grpo epoch time']:.3f} (N = {t['setting']['N']}, T = {t['setting']['T']}, "
          f"{t['setting']['threads']} threads)")
    with open(a.out, "w") as f:
        json.dump(t, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
