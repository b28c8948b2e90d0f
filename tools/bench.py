"""Benchmarks that print their figures (never timed tests).

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

import numpy as np
import torch

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
    if any(x.startswith("--model") or x == "--tiny-sd3" for x in argv):
        p = argparse.ArgumentParser(description="SD3-family benchmark (see the module docstring)")
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
        p.add_argument("--out", default="bench-sd3.json")
        a = p.parse_args(argv)
        if a.resolution is None:
            a.resolution = TINY_SD3_RESOLUTION if a.tiny_sd3 else 512
        a.tmp = tempfile.mkdtemp(prefix="vgpo-bench-")
        try:
            r = sd3_bench(a)
        except harness.UsageError as e:
            print(f"tools.bench: error: {e}", file=sys.stderr)
            return 2
        finally:
            shutil.rmtree(a.tmp, ignore_errors=True)
        print_sd3(r)
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
        return 0
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
