"""VGPO: Value-Anchored Group Policy Optimization for flow-matching text-to-image models, in one file.

Paper: Shao et al., "Anchoring Values in Temporal and Group Dimensions for Flow Matching Model
Alignment", arXiv 2512.12387 (2025). VGPO changes Flow-GRPO (Liu et al., arXiv 2505.05470) in two
places: every denoising step gets its own value from rewards of one-step clean-image previews (the
temporal dimension), and the group advantage gets an absolute, value-anchored term that survives when
all samples of a prompt score the same (the group dimension).

Run:
    python vgpo.py                      # the built-in tiny model on the shapes toy world, CPU, minutes
    python vgpo.py --algo grpo          # the Flow-GRPO baseline, same code and budget
    python vgpo.py --help               # every hyperparameter with its paper symbol
    python vgpo.py --resume runs/<run>  # continue an interrupted run from its last checkpoint
    python vgpo.py --model sd3.5 --prompts FILE --reward NAME   # SD3.5-Medium with LoRA on one GPU (sd3.py loads it)
    python vgpo.py --model sd3.5 --random-weights --epochs 1   # same architecture, no download: memory and speed

Time runs from noise to data: σ_0 = 1 > σ_1 > … > σ_T = 0 are the scheduler's sigmas, step k maps
x_k → x_{k+1}, the velocity is v ≈ noise − x_0 and an Euler step is x + v·dt with dt = σ_{k+1} − σ_k < 0.
(Meta's `flow_matching` library runs time the other way; the algebra below is for this direction.)

Notation (code name → paper symbol):
    velocity v            v_θ(x_k, σ_k), eq. (1), guided with scale g (`guidance_scale`)
    noise_level           a, the SDE's noise scale: std_k = a·sqrt(σ_k / (1 − σ_k))
    log_probs             log π_θ(x_{k+1} | x_k), eq. (2), averaged over C·H·W
    x0_preds              x̂0_{k+1} = x_{k+1} − σ_{k+1}·v(x_{k+1}), eq. (3) (paper Eq. 9)
    instant_rewards r     r_k = R(x̂0_{k+1}, prompt)
    values Q              Q_k = r_k + γ·Q_{k+1}, eq. (4) (paper Eq. 10), `gamma` = γ
    weights ω             ω_k = Q_k / mean_k' Q_k', eq. (5) (paper Eq. 11)
    advantages Â          ω_k·[(Q_k − μ_k)/(s_k + 1e-4) + α_k·Q̄_k], eq. (6) (paper Eqs. 12–13)
    anchor_coef           κ, the absolute term's coefficient α_k on the first `anchor_steps` steps
    clip_range, beta      ε of the clipped ratio, β of the KL penalty, eq. (8)

Shape letters: N = P·G trajectories (P prompts per epoch, G = `num_generations` per prompt), T steps,
(C, H, W) one latent (16×4×4 for the toy world, 16×64×64 for SD3.5 at 512 px), B a micro-batch.

Our reading where the paper is silent (each behind a flag where a careful reader could differ):
    1. Instant rewards score the one-step prediction x̂0_{k+1} made from the velocity that step k+1
       computes anyway: no extra transformer call, one decode + reward call per step. For the last
       step x̂0_T = x_T, so r_{T−1} is the ordinary terminal reward. On SD3 the previews may be decoded
       by TAESD3 (`--preview-decoder tiny`, far cheaper); the terminal image always by the full VAE.
    2. Q_k is the discounted sum of future instant rewards with γ = 0.9 (`--gamma`; the paper's value is
       not given).
    3. ω_k divides by the mean of Q over all T steps of the same trajectory (the untrained last step
       included, so ω depends on values alone); ω = 1 where that mean is ≤ 1e-8.
    4. The absolute term is κ·Q̄_k with Q̄_k = Q_k·(1 − γ)/(1 − γ^{T−k}), the discounted *mean* of future
       rewards (back in reward units). This is the σ → 0 limit of the paper's κ·std form, with no 0/0
       when a group is uniform. It is on for the first `anchor_steps` = 5 steps only, as the paper.
    5. ω multiplies both terms; Â is clipped to ±`adv_clip_max`. Group std is the population std.
    6. `--no-temporal-values` (ablation): only the terminal reward is used (r_k = 0 before the last
       step, no previews decoded) and ω ≡ 1. `--anchor-coef 0` turns the anchor off.
    7. The KL penalty is the exact KL of the two Gaussian steps, dt included (Flow-GRPO leaves dt out,
       so its β corresponds to a smaller β here).
    8. The toy preset samples without CFG (g = 1) in rollouts, training and evaluation alike: the policy
       optimised must be the one evaluated, and a prototype measured that RL with CFG did not learn there.
    9. `--sde-steps S` (not in the paper; Flow-GRPO-Fast's window): only the first S steps are SDE steps
       and trained, the later ones are Euler steps without noise. The toy preset uses S = 4, with the
       strict 0/1 reward: on the toy world RL learned nothing held-out without both (README: "What the
       default run does and reaches"). SD3.5 keeps every step stochastic and trained, as the paper.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

# ====================================================================================================
# Hyperparameters
# ====================================================================================================


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    """Every hyperparameter. Defaults are the paper's SD3.5 setting; PRESETS below overrides some of
    them for the toy model. The command line is generated from these fields (`--num-generations` ...)."""

    # run
    model: str = _f("tiny", "model: 'tiny' (the built-in shapes model), 'sd3.5' (SD3.5-Medium), 'sd3.5-large', "
                            "an SD3-family hub id or a local diffusers folder")
    algo: str = _f("vgpo", "algorithm: 'vgpo' or 'grpo' (the Flow-GRPO baseline, same code path)")
    reward: str = _f("shapes", "reward R: a name in reward.REWARDS (shapes, ocr, pickscore, aesthetic, ...), a weighted "
                     "sum 'pickscore=1,aesthetic=0.5', NAME@DIR for a model in a local folder")
    prompts: str = _f("shapes", "prompts: 'shapes' (the toy world), a prompt set in prompts/ ('ocr', 'preference': "
                      "NAME_train and NAME_test files) or a .txt/.jsonl file (evaluated on itself)")
    seed: int = _f(0, "random seed (prompts, noise, shuffling)")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    output_dir: str = _f("", "output folder (default runs/<algo>-<seed>-<timestamp>)")
    epochs: int = _f(100, "number of epochs: one rollout of P×G trajectories and its updates each")
    eval_every: int = _f(10, "evaluate on held-out prompts every this many epochs (also at 0 and at the end)")
    save_every: int = _f(10, "save a checkpoint every this many epochs and at the end (0: only when stopped early)")
    keep_checkpoints: int = _f(2, "keep the newest this many checkpoints in <output_dir>/checkpoints/")
    resume: str = _f("", "continue the run in this folder from its last good checkpoint (README: Checkpoints ...)")
    nan_patience: int = _f(3, "stop (with a checkpoint) after this many batches in a row skipped for NaN/inf")
    # SD3-family models (sd3.py); the tiny model ignores these
    resolution: int = _f(512, "image size in pixels (square); a multiple of 16 on SD3")
    max_sequence_length: int = _f(256, "T5 prompt tokens (after CLIP's 77); SD3.5 was trained with 256")
    random_weights: bool = _f(False, "build the architecture from configs in sd3.py with random weights and random "
                                     "prompt embeddings: no download, to plan memory and speed")
    low_memory: bool = _f(False, "settings for a 24 GB card: micro-batches of 4 (×8 accumulation), eval batch 4, "
                                 "one image per VAE decode, prompt embeddings cached in host memory")
    preview_decoder: str = _f("vae", "decoder of the instant-reward previews, eq. (3): 'vae' (the full VAE), 'tiny' "
                                     "(TAESD3, much cheaper) or an AutoencoderTiny folder/hub id; the terminal reward "
                                     "always uses the full VAE")
    dtype: str = _f("auto", "transformer/VAE/text-encoder dtype: 'auto' (bf16 on CUDA, fp32 on the CPU), 'bf16', "
                            "'fp16', 'fp32'; LoRA weights, latents and log-probs are always fp32")
    gradient_checkpointing: bool = _f(True, "recompute transformer activations in backward (SD3.5-M on an H200, "
                                            "SPEC §7: 3.6× less memory at batch 8, 1.6× slower train step)")
    lora_rank: int = _f(32, "LoRA rank r on the attention projections (SD3)")
    lora_alpha: float = _f(64.0, "LoRA α (the adapter is scaled by α/r)")
    # sampling
    num_generations: int = _f(8, "G, trajectories per prompt (group size)")
    prompts_per_epoch: int = _f(8, "P, distinct prompts per epoch (N = P·G trajectories)")
    num_steps: int = _f(10, "T, denoising steps in a rollout")
    eval_steps: int = _f(40, "ODE steps when evaluating")
    guidance_scale: float = _f(4.5, "g, classifier-free guidance scale, eq. (1); the same in RL and evaluation")
    noise_level: float = _f(0.7, "a, SDE noise scale: std_k = a·sqrt(σ_k/(1−σ_k)), eq. (2)")
    sde_steps: int = _f(0, "steps 0…sde_steps−1 are SDE steps and trained, the later ones plain Euler steps without "
                           "noise (Flow-GRPO-Fast's window); 0 = all T−1 steps, as the paper")
    # VGPO
    gamma: float = _f(0.9, "γ, discount of instant rewards in Q_k = r_k + γ·Q_{k+1}, eq. (4)")
    anchor_coef: float = _f(1.0, "κ, coefficient α_k of the absolute (anchored) advantage term, eq. (6); 0 = off")
    anchor_steps: int = _f(5, "number of first steps on which the absolute term is on, eq. (6)")
    temporal_values: bool = _f(True, "use instant rewards and step weights ω (off: terminal reward only, ω ≡ 1)")
    # GRPO
    scale_rewards: str = _f("group", "GRPO advantage scaling, eq. (7): 'group', 'batch' or 'none'")
    # optimisation
    adv_clip_max: float = _f(5.0, "advantages are clipped to ±this, eq. (6)/(7)")
    clip_range: float = _f(1e-4, "ε, ratio clip range, eq. (8) (small: the log-prob is averaged over dims)")
    beta: float = _f(0.004, "β, KL penalty weight, eq. (8) (Flow-GRPO's 0.04 without dt ≈ 0.004 with dt)")
    learning_rate: float = _f(3e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient-norm clip")
    train_batch_size: int = _f(8, "B, micro-batch of trajectories, the same in rollout and training")
    gradient_accumulation_steps: int = _f(4, "micro-batches per optimizer step")
    eval_batch_size: int = _f(16, "images per batch when evaluating")


# The toy preset: applied when --model tiny, for every field the user did not set. Why each differs:
PRESETS = {
    "tiny": dict(
        guidance_scale=1.0,  # a prototype measured that RL with CFG 4 did not learn on a toy model and that
        #                      gains at g = 1 barely carried over to CFG-4 sampling: the policy optimised
        #                      must be the one evaluated, so g = 1 everywhere (interpretation 8)
        learning_rate=1e-4,  # the whole transformer is fine-tuned (no LoRA): a smaller step than LoRA's 3e-4
        clip_range=1e-3,  # 256 latent dimensions instead of SD3.5's 65 536: the averaged
        #                   log-prob moves more per update, so the ratio needs a wider band
        beta=0.0,  # no KL: it saves a reference forward pass; VGPO did not collapse without it in 5 runs of
        #            100–140 epochs (GRPO did once in 3: README)
        reward="shapes_strict",  # the evaluation's own 0/1 metric. With partial credit ('shapes') RL first
        #                          learns to add objects (each one found pays) and held-out strict accuracy
        #                          did not rise in any run measured; with the strict reward it rises
        sde_steps=4,  # the layout is decided in the first steps (README); later SDE noise only blurs their
        #               credit, and Euler steps after the window make the rollouts close to the ODE evaluated
        epochs=100,  # ≈ 4 minutes on 2 CPU cores, evaluations included (1.8 s per epoch, 15 s per evaluation)
        eval_every=20,
        prompts_per_epoch=16,  # 16 prompts × 8 = 128 trajectories: a cheap epoch with many groups
        train_batch_size=32,  # the CPU is faster on bigger batches; 4 micro-batches per epoch
        gradient_accumulation_steps=1,  # 4 optimizer steps per epoch: one rollout's gradient is mostly noise
        #                                 (README), and more, smaller steps at lr 1e-4 learned faster than 2
        eval_batch_size=128,
    ),
}
MODELS = ("tiny", "sd3.5", "sd3.5-large")  # or any SD3-family hub id / local diffusers folder (sd3.py)
# --low-memory: applied like a preset (below what the user set, above the model's preset). The train step
# at micro-batch 8 with CFG is a batch of 16 through the transformer; 4 halves its activations, and ×8
# accumulation keeps 2 optimizer steps per epoch at N = 64. One image per VAE call and the prompt cache in
# host memory are set in sd3.py.
LOW_MEMORY = dict(train_batch_size=4, gradient_accumulation_steps=8, eval_batch_size=4)
# Evaluation draws its starting noise from this fixed seed, whatever --seed is: every evaluation of every
# run starts from the same noise (common random numbers), so a change between two evaluations is the
# model's and not the noise's. With 624 images this keeps the metric's run-to-run jitter small.
EVAL_SEED = 1234


class UsageError(Exception):
    """A mistake in the command line or its files: printed as one line, exit code 2."""


class NonFiniteError(RuntimeError):
    """NaN or inf in rewards or log-probs: the NaN guard skips the batch (see NanGuard)."""


class RewardError(RuntimeError):
    """The reward model raised; the message names it (the original exception is chained)."""


class RunStopped(Exception):
    """The run stopped early after saving a checkpoint (a signal, or the NaN guard); `code` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def make_args(**overrides) -> Args:
    """Args for `overrides["model"]` with its preset applied, then `overrides` (what the user set)."""
    # order of precedence: what the user set > the model's preset > the Args default (SD3.5's)
    model = overrides.get("model", Args.model)
    low_memory = LOW_MEMORY if overrides.get("low_memory") and model != "tiny" else {}
    values = {**PRESETS.get(model if model in PRESETS else "", {}), **low_memory, **overrides}
    unknown = set(values) - {f.name for f in dataclasses.fields(Args)}
    if unknown:
        raise UsageError(f"unknown setting(s) {sorted(unknown)}")
    return Args(**values)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other usage error
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None) -> Args:
    """The command line, generated from the Args fields: `--field-name VALUE`, `--flag/--no-flag`.
    With `--resume DIR` the run's saved settings are the base and only safe flags may change them."""
    # SUPPRESS: a flag the user did not type is absent from the namespace, so the preset can fill it
    p = _Parser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        ftype = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        tiny = f"; tiny: {PRESETS['tiny'][f.name]}" if f.name in PRESETS["tiny"] else ""
        help = f"{f.metadata['help']} (default: {f.default!r}{tiny})"
        if ftype is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(flag, type=ftype, help=help, metavar=f.name.upper())
    given = vars(p.parse_args(argv))
    return resume_args(**given) if given.get("resume") else make_args(**given)


def validate(args: Args) -> None:
    """Reject bad settings with a message that says what to do, before anything heavy is loaded."""
    import reward
    import sd3

    # every float must be a number: argparse accepts "nan" and "inf", which pass none of the range checks below
    for f in dataclasses.fields(Args):
        if f.type == "float" and not math.isfinite(getattr(args, f.name)):
            raise UsageError(f"--{f.name.replace('_', '-')} must be a finite number")
    sd3_named = args.model in sd3.HUB_IDS
    checks = [
        (args.model == "tiny" or sd3.is_model_name(args.model),
         f"unknown --model {args.model!r}: use 'tiny', 'sd3.5', 'sd3.5-large', a hub id (owner/name) or a local diffusers folder"),
        (not sd3_named or args.random_weights or resolve_device(args) != "cpu",
         f"--model {args.model} needs a CUDA GPU and none is here: use --model tiny on the CPU, or --random-weights "
         "to plan memory and speed, or a small local SD3 folder"),
        (not (args.random_weights and args.model == "tiny"), "--random-weights is for SD3-family models (--model tiny has its own checkpoint)"),
        (args.preview_decoder in ("vae", "tiny") or sd3.is_model_name(args.preview_decoder),
         f"--preview-decoder {args.preview_decoder!r}: use 'vae', 'tiny' or an AutoencoderTiny folder/hub id"),
        (args.dtype in ("auto", "bf16", "fp16", "fp32"), f"--dtype {args.dtype!r}: use 'auto', 'bf16', 'fp16' or 'fp32'"),
        (args.model == "tiny" or args.resolution > 0 and args.resolution % 16 == 0,
         f"--resolution must be a positive multiple of 16, got {args.resolution}"),
        (1 <= args.max_sequence_length <= 512, "--max-sequence-length must be in 1…512 (T5's limit in SD3)"),
        (args.lora_rank >= 1 and args.lora_alpha > 0, "--lora-rank must be ≥ 1 and --lora-alpha > 0"),
        (args.algo in ("vgpo", "grpo"), f"unknown --algo {args.algo!r}: use 'vgpo' or 'grpo'"),
        (args.num_generations >= 2, "--num-generations must be ≥ 2: group-relative advantages need a group"),
        (0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}"),
        (args.num_steps >= 2, "--num-steps must be ≥ 2 (the last step is not trained)"),
        (args.eval_steps >= 1, "--eval-steps must be ≥ 1"),
        (args.anchor_steps >= 0, "--anchor-steps must be ≥ 0 (a value ≥ --num-steps anchors every step)"),
        (args.noise_level > 0, "--noise-level must be > 0: the policy needs a stochastic step to have log-probs"),
        (args.sde_steps >= 0, "--sde-steps must be ≥ 0 (0, or any value ≥ num_steps − 1: every step but the last)"),
        (0 < args.clip_range < 1, f"--clip-range must be in (0, 1), got {args.clip_range}"),
        (args.beta >= 0 and args.anchor_coef >= 0, "--beta and --anchor-coef must be ≥ 0"),
        (args.guidance_scale >= 1, "--guidance-scale must be ≥ 1 (1 = no classifier-free guidance)"),
        (args.scale_rewards in ("group", "batch", "none"), "--scale-rewards must be 'group', 'batch' or 'none'"),
        (args.adv_clip_max > 0, "--adv-clip-max must be > 0"),
        (args.learning_rate > 0 and args.max_grad_norm > 0, "--learning-rate and --max-grad-norm must be > 0"),
        (args.weight_decay >= 0, "--weight-decay must be ≥ 0"),
        (args.seed >= 0, "--seed must be ≥ 0"),
        (args.epochs >= 1 and args.eval_every >= 1, "--epochs and --eval-every must be ≥ 1"),
        (args.save_every >= 0, "--save-every must be ≥ 0 (0 = checkpoints only on an interruption)"),
        (args.keep_checkpoints >= 1 and args.nan_patience >= 1, "--keep-checkpoints and --nan-patience must be ≥ 1"),
        (args.prompts_per_epoch >= 1 and args.train_batch_size >= 1 and args.gradient_accumulation_steps >= 1
         and args.eval_batch_size >= 1, "batch sizes and --prompts-per-epoch must be ≥ 1"),
        (args.device in ("auto", "cpu") or args.device.startswith("cuda") and torch.cuda.is_available(),
         f"--device {args.device!r} is not available here: use 'cpu' or 'auto'"),
        (args.prompts == "shapes" or prompt_files(args.prompts) or os.path.isfile(args.prompts),
         f"--prompts {args.prompts!r} not found: give a .txt (one prompt per line) or .jsonl file, or a prompt set: "
         f"{', '.join(['shapes', *prompt_sets()])}"),
        (not args.resume or os.path.isdir(args.resume), f"--resume {args.resume!r}: no such folder"),
        (not args.resume or not args.output_dir or os.path.abspath(args.output_dir) == os.path.abspath(args.resume),
         "a resumed run continues in its own folder: drop --output-dir"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:  # names, weights and @DIR folders; the models themselves load in make_reward
        reward.parse_reward_spec(args.reward)
    except reward.RewardError as e:
        raise UsageError(f"--reward: {e}") from None
    # every optimizer step must see the same number of trajectories, or the last one would be a partial,
    # noisier step (and the gradient-accumulation divisor in `update` would be wrong for it)
    n = args.prompts_per_epoch * args.num_generations
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    if n % per_step:
        raise UsageError(f"N = prompts_per_epoch×num_generations = {n} must be a multiple of "
                         f"train_batch_size×gradient_accumulation_steps = {per_step}")


# ====================================================================================================
# Model loading (plumbing)
# ====================================================================================================


@dataclass
class Model:
    """What the algorithm needs of a text-to-image flow model."""

    transformer: torch.nn.Module  # v_θ(x, σ, prompt), the trained policy
    encode: Callable  # prompts -> (sequence (B, L, D), pooled (B, D)), cached
    decode: Callable  # latents (B, C, H, W) -> images (B, 3, H', W') in [0, 1]
    scheduler: object  # FlowMatchEulerDiscreteScheduler: gives the sigmas
    latent_shape: tuple  # (C, H, W)
    reference: torch.nn.Module | None = None  # frozen v_ref for the KL term (None when β = 0)
    device: str = "cpu"
    # the prompt batches `encode` has run, in order: a resumed run replays them, because a batched encoder's
    # output depends (in the last bits) on the batch, and a cache filled otherwise would change the run
    encoded: list = field(default_factory=list)
    # decoder of the instant-reward previews x̂0_{k+1}, k < T−1 (None: `decode`); the terminal image
    # always goes through `decode` (on SD3 the full VAE, the previews optionally TAESD3)
    preview_decode: Callable | None = None
    sigma_kwargs: dict = field(default_factory=dict)  # extra set_timesteps arguments (μ of dynamic shifting)
    parts: dict = field(default_factory=dict)  # SD3: vae, preview_vae, dtype (for benchmarks and tests)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """σ_0 = 1 > … > σ_T = 0, (T+1,) in fp32, exactly the scheduler's."""
        self.scheduler.set_timesteps(num_steps, **self.sigma_kwargs)
        return self.scheduler.sigmas.float().to(self.device)


def resolve_device(args: Args) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def load_model(args: Args, checkpoint: str | None = None, prompts: list[str] | None = None) -> Model:
    """The model bundle for `args.model`: transformer, reference, cached prompt encoder, decoder. `prompts`:
    what an SD3 model encodes before its transformer loads (default: the run's train and eval prompts)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    device = resolve_device(args)
    if args.model == "tiny":
        import shapes

        # the flow transformer on the latents of a frozen autoencoder (the toy world's VAE; `decode` is its
        # decoder). The whole transformer is trained; the prompt encoder is frozen, as SD3's text encoders
        # are, so the policy is the same kind of object on both models
        transformer, encoder, decode, latent_shape = shapes.load_pretrained(checkpoint or shapes.CHECKPOINT, device)
        encoder.requires_grad_(False)
        # SD3's last block only reads the prompt stream (context_pre_only): its prompt-query projection
        # never reaches the output, so it gets no gradient. Freezing it keeps "trainable" honest.
        last = transformer.transformer_blocks[-1].attn
        for unused in (last.add_q_proj, last.norm_added_q):
            unused.requires_grad_(False)
        # no resolution shift at 32×32 (SD3.5 uses 3.0 at 512 px to spend more steps at high noise)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    else:
        # SD3-family: LoRA (fp32) on a frozen bf16 transformer, the reference is the adapter switched
        # off, prompts encoded once before the transformer is loaded (sd3.py, plumbing)
        import sd3

        if prompts is None:
            prompts = [p for pairs in load_prompts(args) for p, _ in pairs]
        try:
            with sd3._quiet():  # library notes at import and load time would break the one-line error
                parts = sd3.load(args, device, prompts)
        except sd3.ModelUnavailable as e:
            raise UsageError(str(e)) from None
        reference = parts.pop("reference")  # the adapter switched off: no second copy of the weights
        return Model(device=device, reference=reference if args.beta > 0 else None, **parts)
    # Full fine-tuning keeps a frozen copy as the reference policy (with LoRA, above: the adapter off).
    reference = copy.deepcopy(transformer).requires_grad_(False) if args.beta > 0 else None
    # prompt → (sequence, pooled) embeddings; the negative prompt "" is encoded once like any other
    cache: dict[str, tuple] = {}
    encoded: list[list[str]] = []

    @torch.no_grad()
    def encode(prompts: list[str]):
        """Prompts are encoded once and cached: the prompt encoder is frozen during RL."""
        missing = sorted({p for p in prompts if p not in cache})
        if missing:
            encoded.append(missing)
            seq, pooled = encoder(missing)
            cache.update({p: (s, q) for p, s, q in zip(missing, seq, pooled)})
        return torch.stack([cache[p][0] for p in prompts]), torch.stack([cache[p][1] for p in prompts])

    return Model(transformer, encode, decode, scheduler, latent_shape, reference, device, encoded)


PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def prompt_files(name: str) -> tuple[str, str] | None:
    """`--prompts NAME` → (prompts/NAME_train.{jsonl,txt}, prompts/NAME_test.{jsonl,txt}), or None."""
    found = []
    for split in ("train", "test"):
        paths = [os.path.join(PROMPTS_DIR, f"{name}_{split}{ext}") for ext in (".jsonl", ".txt")]
        found.append(next((p for p in paths if os.path.isfile(p)), None))
    return tuple(found) if all(found) and os.sep not in name else None


def prompt_sets() -> list[str]:
    """The prompt set names shipped in prompts/ (those with both a train and a test file)."""
    names = {f.rsplit("_", 1)[0] for f in os.listdir(PROMPTS_DIR)} if os.path.isdir(PROMPTS_DIR) else set()
    return sorted(n for n in names if prompt_files(n))


def read_prompt_file(path: str) -> list[tuple[str, dict]]:
    """(prompt, metadata) pairs of a .txt file (one prompt per line) or a .jsonl file (one
    {"prompt": ..., other fields = metadata} object per line). Blank lines are skipped."""
    # prompt files are plain data: read as text and JSON, never executed
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --prompts {path!r} as UTF-8 text: {e}") from None
    if not path.endswith(".jsonl"):
        return [(ln, {}) for ln in lines]
    rows = [_jsonl_row(ln, i, path) for i, ln in enumerate(lines, 1)]
    return [(r.pop("prompt"), r) for r in rows]


def load_prompts(args: Args) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(train, eval) lists of (prompt, metadata): the toy world's split, a prompt set's train and test
    files, or one file used for both."""
    import shapes

    if args.prompts == "shapes":
        # the toy world's fixed split: held-out prompts are unseen combinations of trained words
        train = [(p, shapes.METADATA[p]) for p in shapes.TRAIN_PROMPTS]
        if len(train) < args.prompts_per_epoch:
            raise UsageError(f"--prompts-per-epoch {args.prompts_per_epoch} is more than the {len(train)} "
                             "training prompts")
        return train, [(p, shapes.METADATA[p]) for p in shapes.eval_prompt_list()]
    files = prompt_files(args.prompts)
    train, test = [read_prompt_file(f) for f in files] if files else [read_prompt_file(args.prompts)] * 2
    if len(train) < args.prompts_per_epoch:
        raise UsageError(f"{args.prompts} has {len(train)} prompts, fewer than --prompts-per-epoch {args.prompts_per_epoch}")
    return train, test  # a single file has no split: it is evaluated on its own prompts


def check_vocabulary(args: Args, pairs: list[tuple[str, dict]]) -> None:
    """The toy encoder knows only the shapes world's words: say so before the run, not mid-rollout."""
    import shapes

    if args.model != "tiny" or args.prompts == "shapes":
        return
    unknown = sorted({w for p, _ in pairs for w in p.split() if w not in shapes.VOCAB[2:]})
    if unknown or max(len(p.split()) for p, _ in pairs) >= shapes.MAX_TOKENS:
        raise UsageError(f"{args.prompts}: the tiny model knows only the shapes world's words, at most "
                         f"{shapes.MAX_TOKENS - 1} per prompt (unknown: {', '.join(unknown[:8]) or 'none'})")


def _jsonl_row(line: str, number: int, path: str) -> dict:
    """One .jsonl prompt row, {"prompt": str, other fields = metadata}; a bad row is a one-line error."""
    try:
        row = json.loads(line)  # plain JSON: no code is ever run from a prompt file
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UsageError(f'{path}:{number}: each line must be an object with a "prompt" string')
    return row


def sample_prompts(train: list, count: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """`count` distinct prompts; for the shapes world every GenEval category is equally likely."""
    import shapes

    # without replacement: a prompt appears in at most one group per epoch, so groups are independent
    weights = None
    if all(p in shapes.METADATA for p, _ in train):
        weights = shapes.sampling_weights([p for p, _ in train])
    return [train[i] for i in rng.choice(len(train), size=count, replace=False, p=weights)]


# ====================================================================================================
# §1  The SDE step with log-probability, and the rollout
# ====================================================================================================


# The policy π_θ is the stochastic sampler itself: each denoising step is a Gaussian transition whose
# mean depends on the transformer's velocity, so every step has a log-probability and the whole
# trajectory is a sequence of T actions. Flow-matching models are ODE samplers; Flow-GRPO turns the ODE
# into an SDE with the same marginals (so images stay in-distribution) and noise scale a·sqrt(σ/(1−σ)).


def guided_velocity(net, x, sigma, cond, uncond, guidance_scale):
    """Eq. (1): v = v_u + g·(v_c − v_u), in fp32. x (B, C, H, W); cond/uncond = (seq, pooled).
    With g = 1 only the conditional pass is run."""
    t = (sigma * 1000).expand(x.shape[0])  # diffusers' SD3 takes timestep = 1000·σ
    x = x.to(cond[0].dtype)  # the transformer's dtype (bf16 on SD3.5); the result is cast back to fp32
    # one batched call for both passes, [uncond; cond], as the stock pipeline does
    if guidance_scale == 1.0:
        return net(x, encoder_hidden_states=cond[0], pooled_projections=cond[1], timestep=t, return_dict=False)[0].float()
    out = net(torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond[0], cond[0]]),
              pooled_projections=torch.cat([uncond[1], cond[1]]), timestep=torch.cat([t, t]), return_dict=False)[0]
    v_u, v_c = out.float().chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


def sde_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample=None, generator=None):
    """Eq. (2): one Euler–Maruyama step of Flow-GRPO's marginal-preserving reverse SDE, and its log-prob.

    velocity, sample: (B, C, H, W); sigma, sigma_next: floats or 0-d tensors (σ_k, σ_{k+1}).
    Returns (next_sample, log_prob (B,), mean (B, C, H, W), std) where std = std_k·sqrt(−dt) is the
    standard deviation of the step. With `prev_sample` given, that sample is scored instead of drawn.
    With noise_level 0 the step is the deterministic Euler step x + v·dt and log_prob is 0.
    """
    # fp32 throughout: with bf16 latents std² and (x − mean)²/std² lose the digits the ratio depends on
    v, x = velocity.float(), sample.float()
    sigma, sigma_next = torch.as_tensor(sigma, dtype=torch.float32), torch.as_tensor(sigma_next, dtype=torch.float32)
    dt = sigma_next - sigma  # < 0
    # (2a) std_k = a·sqrt(σ/(1−σ)); at σ = 1 (first step) Flow-GRPO puts 1 − σ_{k+1} in the denominator
    denom = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    std_k = noise_level * torch.sqrt(sigma / denom)
    # (2b) mean = x + [v + std²/(2σ)·(x + (1−σ)·v)]·dt   (the score term keeps the marginals of the ODE)
    mean = x + (v + std_k**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = std_k * torch.sqrt(-dt)
    if noise_level == 0:
        # the ODE limit: std = 0 makes the bracket exactly v, so mean = x + v·dt is the Euler step;
        # the density is degenerate, and a log-prob of 0 marks the step as deterministic
        return mean, torch.zeros(x.shape[0], device=x.device), mean, std
    # (2c) x_{k+1} = mean + std·ε
    if prev_sample is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + std * eps
    # the sample is data, not a function of θ: gradients flow only through the mean
    prev_sample = prev_sample.float().detach()
    # (2d) Gaussian log-density, averaged (not summed) over C·H·W so that its scale does not grow with
    # resolution: the ratio exp(Δ log π) then moves by ~1e-4 per update and ε is chosen at that scale.
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


@dataclass
class Trajectories:
    """One batch of rollouts. k indexes steps; x0_preds[:, k] is x̂0_{k+1}, the preview after step k."""

    latents: torch.Tensor  # (N, T+1, C, H, W), x_0 = noise … x_T
    log_probs: torch.Tensor  # (N, T) log π_old(x_{k+1} | x_k); 0 for deterministic steps (the last, and after --sde-steps)
    x0_preds: torch.Tensor  # (N, T, C, H, W)
    sigmas: torch.Tensor  # (T+1,)
    images: torch.Tensor  # (N, 3, H', W') in [0, 1]
    prompts: list  # N strings
    group_ids: torch.Tensor  # (N,) long: the index of the trajectory's prompt


def _progress(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # silent when not a TTY


def sde_window(num_steps: int, sde_steps: int) -> int:
    """S, the number of SDE (and trained) steps 0…S−1 of a rollout: `sde_steps` capped at T − 1, and 0 means
    T − 1 (every step but the last, which is always a plain Euler step to σ_T = 0)."""
    return min(sde_steps, num_steps - 1) if sde_steps else num_steps - 1


@torch.no_grad()
def sample(model: Model, prompts: list[str], num_steps: int, noise_level: float, guidance_scale: float,
           batch_size: int, generator=None, noise=None, record: bool = True, desc: str = "rollout",
           sde_steps: int = 0):
    """Sample one image per prompt in micro-batches of `batch_size`: SDE steps 0…S−1 (S = `sde_steps`, or
    T−1 when 0), plain Euler steps S…T−1. Returns (images, latents, log_probs, x0_preds, sigmas); the
    last three are None unless `record`; a deterministic step's log-prob is 0."""
    # Micro-batches of the training size: SD3 outputs depend slightly on the batch size, and a rollout
    # scored at another size than it is re-scored at shows up as ratio ≠ 1 before any update.
    n, (c, h, w), T = len(prompts), model.latent_shape, num_steps
    stochastic = sde_window(T, sde_steps)  # the last step (to σ_T = 0) is always a plain Euler step
    sigmas = model.sigmas(T)  # (T+1,)
    if noise is None:  # x_0 ~ N(0, I): σ_0 = 1 is pure noise
        noise = torch.randn((n, c, h, w), generator=generator, device=model.device)
    latents = torch.empty((n, T + 1, c, h, w), device=model.device) if record else None
    x0_preds = torch.empty((n, T, c, h, w), device=model.device) if record else None
    log_probs = torch.zeros((n, T), device=model.device) if record else None
    images = []
    bar = _progress(math.ceil(n / batch_size) * T, desc)
    for s in range(0, n, batch_size):
        b = slice(s, s + batch_size)
        x = noise[b].float()  # (B, C, H, W)
        cond = model.encode(prompts[b])
        uncond = model.encode([""] * x.shape[0]) if guidance_scale != 1.0 else None
        for k in range(T):
            if record:  # x_k is kept: training re-scores x_k → x_{k+1} under the updated policy
                latents[b, k] = x
            v = guided_velocity(model.transformer, x, sigmas[k], cond, uncond, guidance_scale)  # (B, C, H, W)
            if record and k > 0:  # eq. (3): the velocity at step k also gives the preview x̂0_k = x_k − σ_k·v_k
                x0_preds[b, k - 1] = x - sigmas[k] * v
            if k < stochastic:
                x, lp, _, _ = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], noise_level, generator=generator)
                if record:
                    log_probs[b, k] = lp
            else:  # σ_T = 0 (or past the SDE window): a plain Euler step, no noise, not trained
                x = x + (sigmas[k + 1] - sigmas[k]) * v
            bar.update()
        if record:
            latents[b, T], x0_preds[b, T - 1] = x, x  # x̂0_T = x_T
        images.append(model.decode(x))
    bar.close()
    return torch.cat(images), latents, log_probs, x0_preds, sigmas


def rollout(model: Model, prompts: list[str], args: Args, generator=None, noise=None) -> Trajectories:
    """P distinct prompts, each sampled G = args.num_generations times with the SDE (N = P·G)."""
    # a group = the G trajectories of one prompt, stored next to each other; group_ids says which
    expanded = [p for p in prompts for _ in range(args.num_generations)]
    group_ids = torch.arange(len(prompts)).repeat_interleave(args.num_generations).to(model.device)  # (N,)
    images, latents, log_probs, x0_preds, sigmas = sample(
        model, expanded, args.num_steps, args.noise_level, args.guidance_scale, args.train_batch_size,
        generator=generator, noise=noise, sde_steps=args.sde_steps)
    return Trajectories(latents, log_probs, x0_preds, sigmas, images, expanded, group_ids)


# ====================================================================================================
# §2  Temporal values: instant rewards → discounted values → step weights
# ====================================================================================================


# GRPO credits every step with the terminal reward R(x_T). VGPO asks after each step k how good the
# image already looks: the one-step prediction x̂0_{k+1} is what the model would output if it stopped
# now, so its reward r_k measures the progress made up to step k. Early previews are blurry and score
# low, later ones approach R(x_T); the discounted sum Q_k of what follows step k is that step's value.


@torch.no_grad()
def instant_rewards(model: Model, traj: Trajectories, reward_fn, metadata: list[dict], previews: bool,
                    batch_size: int = 256) -> torch.Tensor:
    """Eq. (3): r_k = R(decode(x̂0_{k+1}), prompt), (N, T). With previews=False only the terminal reward
    is computed and r_k = 0 for k < T−1 (GRPO, and the no-temporal-values ablation)."""
    n, T = traj.log_probs.shape
    r = torch.zeros((n, T), device=model.device)
    # the terminal reward r_{T−1} scores the rollout's final images (x̂0_T = x_T, decoded by the full VAE)
    r[:, -1] = _checked(reward_fn(traj.images, traj.prompts, metadata), "terminal reward").to(model.device)
    if not previews:
        return r
    # The N·(T−1) intermediate previews go through the preview decoder and the reward in large batches:
    # on SD3.5 this is where VGPO's extra cost lives (T decodes and reward calls per image instead of
    # one), so it is batched and timed separately (time/reward_s). `--preview-decoder tiny` cuts it.
    decode = model.preview_decode or model.decode
    flat = traj.x0_preds[:, :-1].flatten(0, 1)  # (N·(T−1), C, H, W), trajectory-major
    prompts = [p for p in traj.prompts for _ in range(T - 1)]
    metas = [m for m in metadata for _ in range(T - 1)]
    out = [reward_fn(decode(flat[s : s + batch_size]), prompts[s : s + batch_size], metas[s : s + batch_size])
           for s in range(0, len(flat), batch_size)]
    r[:, :-1] = _checked(torch.cat(out), "instant reward").to(model.device).view(n, T - 1)
    return r


def _checked(r, what):
    # a NaN reward would silently turn every advantage of its group into NaN: train_epoch skips the batch
    if not torch.isfinite(r).all():
        raise NonFiniteError(f"{int((~torch.isfinite(r)).sum())} NaN/inf {what} value(s)")
    return r.float()


def temporal_values(instant_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (4) (paper Eq. 10): Q_{T−1} = r_{T−1}, Q_k = r_k + γ·Q_{k+1}. (N, T) → (N, T)."""
    q = torch.zeros_like(instant_rewards)
    running = torch.zeros_like(instant_rewards[:, 0])  # (N,), Q_T = 0: nothing follows the last step
    # backwards in k, as a return is computed in RL; T is ~10, so a Python loop costs nothing
    for k in reversed(range(instant_rewards.shape[1])):
        running = instant_rewards[:, k] + gamma * running
        q[:, k] = running
    return q


def step_weights(values: torch.Tensor) -> torch.Tensor:
    """Eq. (5) (paper Eq. 11): ω_k = Q_k / mean_k' Q_k' over the trajectory's T steps; 1 where that mean
    is ≤ 1e-8 (a trajectory with no reward has no preferred step). (N, T) → (N, T)."""
    # the mean over k, not the sum: ω averages 1 over a trajectory, so the loss keeps GRPO's overall scale
    mean = values.mean(dim=1, keepdim=True)  # (N, 1)
    # Early steps accumulate more future reward, so ω > 1 early and < 1 late: the loss leans on the
    # steps that decide the layout. Rewards are ≥ 0 (SPEC §2), so Q ≥ 0 and ω ≥ 0; the clamp only
    # keeps the division finite in the branch torch.where discards.
    return torch.where(mean > 1e-8, values / mean.clamp_min(1e-8), torch.ones_like(values))


# ====================================================================================================
# §3  Advantages: VGPO's anchored advantage beside GRPO's group-relative one
# ====================================================================================================


def _group_normalize(x: torch.Tensor, group_ids: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """(x − group mean) / (std + 1e-4), per column. x (N,) or (N, T). The 1e-4 keeps a uniform group at
    0 instead of 0/0. `scale`: 'group' std, 'batch' std (Flow-GRPO's global_std) or 'none' (no division)."""
    centred, std = torch.empty_like(x), torch.empty_like(x)
    # a loop over groups reads like the equation; P is at most a few dozen, so it costs nothing
    for g in group_ids.unique():
        m = group_ids == g
        centred[m] = x[m] - x[m].mean(dim=0)
        std[m] = x[m].std(dim=0, unbiased=False)  # population std, as Flow-GRPO's np.std
    if scale == "batch":
        std = x.std(dim=0, unbiased=False).expand_as(x)
    return centred if scale == "none" else centred / (std + 1e-4)


def vgpo_advantages(values, group_ids, gamma, anchor_coef, anchor_steps, adv_clip_max, weights=None):
    """Eq. (6) (paper Eqs. 12–13): Â_k = ω_k·[(Q_k − μ_k)/(s_k + 1e-4) + α_k·Q̄_k], clipped to ±adv_clip_max.

    values Q (N, T); group_ids (N,); weights ω (N, T), computed by step_weights(values) when None.
    μ_k, s_k: mean and std of Q_k over the group. Q̄_k = Q_k·(1 − γ)/(1 − γ^{T−k}) is the discounted mean
    of future rewards (Q_k/(T − k) for γ = 1); α_k = κ on the first `anchor_steps` steps, else 0.
    """
    # The relative term is GRPO's, per step: which trajectories of this prompt did better than their
    # siblings at step k. It vanishes when the group agrees (all solved or all failed), which is where
    # GRPO stops learning. The absolute term does not compare within the group: it rewards a step for
    # the value it reached, so a uniformly good group is still reinforced. It is only on in the early,
    # layout-deciding steps, where the paper turns it on.
    n, T = values.shape
    k = torch.arange(T, device=values.device, dtype=values.dtype)  # (T,)
    relative = _group_normalize(values, group_ids)  # (N, T): 0 for a uniform group
    # Q_k sums T − k discounted rewards, so its size depends on k; dividing by the sum of the discounts
    # turns it into a weighted mean of rewards, in [0, 1] like the rewards themselves. That keeps κ on a
    # scale comparable to the unit-std relative term at every step.
    horizon = T - k  # number of future rewards summed in Q_k
    norm = horizon if gamma == 1 else (1 - gamma**horizon) / (1 - gamma)  # Σ_{j<T−k} γ^j
    alpha = torch.where(k < anchor_steps, anchor_coef, 0.0)  # (T,)
    absolute = alpha * values / norm  # (N, T): α_k·Q̄_k, in reward units
    if weights is None:
        weights = step_weights(values)
    # the clip bounds what one outlier trajectory (a group with std ≈ 0 and one different sample) can do
    return (weights * (relative + absolute)).clamp(-adv_clip_max, adv_clip_max)


def grpo_advantages(rewards, group_ids, scale_rewards, adv_clip_max, num_steps):
    """Eq. (7): Â^i = (R^i − mean_group R)/(std + 1e-4), the same for all T steps. (N,) → (N, T)."""
    adv = _group_normalize(rewards, group_ids, scale_rewards).clamp(-adv_clip_max, adv_clip_max)  # (N,)
    return adv.unsqueeze(1).expand(-1, num_steps).contiguous()


def credit(r: torch.Tensor, group_ids: torch.Tensor, args: Args):
    """Eqs. (4)–(7) for one rollout: (values, weights, advantages), each (N, T), from the rewards r (N, T).
    VGPO: discounted values, step weights and the anchored advantage; GRPO: the terminal reward's
    group-normalised advantage on every step (its 'values' are the terminal reward, its weights 1)."""
    if args.algo == "vgpo":
        values = temporal_values(r, args.gamma)  # eq. (4)
        weights = step_weights(values) if args.temporal_values else torch.ones_like(values)  # eq. (5)
        adv = vgpo_advantages(values, group_ids, args.gamma, args.anchor_coef, args.anchor_steps,
                              args.adv_clip_max, weights=weights)  # eq. (6)
    else:
        values, weights = r[:, -1:].expand_as(r), torch.ones_like(r)  # GRPO credits every step alike
        adv = grpo_advantages(r[:, -1], group_ids, args.scale_rewards, args.adv_clip_max, args.num_steps)  # eq. (7)
    return values, weights, adv


# ====================================================================================================
# §4  The clipped policy loss with KL, and the update over one rollout
# ====================================================================================================


def policy_loss(log_probs, log_probs_old, advantages, clip_range, kl=None, beta=0.0):
    """Eq. (8): L = mean(max(−Â·ρ, −Â·clip(ρ, 1 − ε, 1 + ε))) + β·mean(KL), ρ = exp(log π_θ − log π_old).
    All arguments (B,) for one trained step. Returns (loss, stats)."""
    # PPO's clipped surrogate. The log-probs are averaged over dims, so a ratio of 1 ± 1e-3 is already a
    # real change of the step distribution; ε is chosen at that scale (1e-4 for SD3.5, 1e-3 for the toy).
    ratio = torch.exp(log_probs - log_probs_old)  # (B,), 1 on-policy
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    # max of the two losses = min of the two objectives: the pessimistic bound. Outside the band the
    # clipped term is constant, so it has no gradient exactly when moving further would pay
    l_clip = torch.maximum(unclipped, clipped).mean()
    l_kl = kl.mean() if kl is not None else torch.zeros((), device=ratio.device)
    stats = {
        "policy/approx_kl": 0.5 * ((log_probs - log_probs_old) ** 2).mean().item(),
        "policy/clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
        "loss/policy": l_clip.item(),
        "loss/kl": l_kl.item(),
    }
    return l_clip + beta * l_kl, stats


def update(model: Model, traj: Trajectories, advantages, optimizer, args: Args, generator=None, guard=None) -> dict:
    """Eq. (9): shuffle the N trajectories into micro-batches; for each micro-batch and trained step k
    (0…T−2): forward, loss, backward; an optimizer step every `gradient_accumulation_steps` micro-batches.
    An optimizer step whose loss or gradient is NaN/inf is skipped and counted by `guard` (a NanGuard)."""
    # One backward per (micro-batch, step): activations of a single transformer call are alive at a
    # time, which is what lets SD3.5 train on one GPU. The transformer stays in eval mode: it has no
    # dropout, and eval mode keeps the re-scored log-probs identical to the rollout's (ratio = 1).
    n, T = traj.log_probs.shape
    trained, accum = sde_window(T, args.sde_steps), args.gradient_accumulation_steps  # the SDE steps 0…trained−1
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    # shuffle so that a micro-batch mixes prompts (its own generator: the rollout noise stays independent)
    perm = torch.randperm(n, generator=generator).to(model.device)
    stats = defaultdict(list)
    guard, bad = guard if guard is not None else NanGuard(args.nan_patience), None  # bad: what was NaN/inf
    bar = _progress(math.ceil(n / args.train_batch_size) * trained, "update")
    for i, idx in enumerate(perm.split(args.train_batch_size)):
        prompts = [traj.prompts[j] for j in idx.tolist()]
        cond = model.encode(prompts)
        uncond = model.encode([""] * len(prompts)) if args.guidance_scale != 1.0 else None
        for k in range(trained):
            x, x_next, sigma, sigma_next = traj.latents[idx, k], traj.latents[idx, k + 1], traj.sigmas[k], traj.sigmas[k + 1]
            v = guided_velocity(model.transformer, x, sigma, cond, uncond, args.guidance_scale)
            _, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, args.noise_level, prev_sample=x_next)
            kl = None
            if args.beta > 0:  # exact KL of two Gaussians with the same std: |Δmean|²/(2·std²), averaged over dims
                with torch.no_grad():
                    v_ref = guided_velocity(model.reference, x, sigma, cond, uncond, args.guidance_scale)
                    _, _, mean_ref, _ = sde_step_with_logprob(v_ref, x, sigma, sigma_next, args.noise_level, prev_sample=x_next)
                kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
            loss, s = policy_loss(log_prob, traj.log_probs[idx, k], advantages[idx, k], args.clip_range, kl, args.beta)
            if not torch.isfinite(loss):  # NaN guard: no backward, and this optimizer step will be skipped
                bad = "the loss"
                continue
            (loss / (trained * accum)).backward()  # the optimizer step sees the mean over steps and micro-batches
            for key, val in s.items():
                stats[key].append(val)
            bar.update()
        if (i + 1) % accum == 0:  # gradient-norm clip 1.0 as Flow-GRPO: a rare huge advantage cannot jump
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if guard.record(bad is None and bool(torch.isfinite(norm)), bad or "the gradient"):  # NaN guard
                stats["policy/grad_norm"].append(norm.item())
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bad = None
    bar.close()
    return {key: float(np.mean(v)) for key, v in stats.items()}


# ====================================================================================================
# §5  Training loop
# ====================================================================================================


def train(args: Args) -> list[dict]:
    """The whole method: per epoch rollout → rewards → values → advantages → update. Returns the metric rows.
    With `args.resume` it continues that run from its last good checkpoint (see the checkpoint plumbing)."""
    # --- set-up: everything that can fail on bad input fails here, before the first rollout ---
    validate(args)
    checkpoint = find_checkpoint(args) if args.resume else None  # the newest undamaged one, or a one-line error
    args = dataclasses.replace(args, output_dir=args.resume or args.output_dir)  # a resumed run stays in its folder
    # Three independent streams from one seed, so that e.g. a change in shuffling leaves the rollouts
    # alone; everything on the CPU is then bitwise reproducible (tested).
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # which prompts each epoch
    # the prompts and the reward before the big model: a bad prompt file or an absent reward model stops at once
    train_set, eval_set = load_prompts(args)
    reward_fn = make_reward(args, resolve_device(args), train_set + eval_set)
    check_vocabulary(args, train_set + eval_set)
    out_dir = open_run_dir(args, checkpoint)
    model = load_model(args, prompts=[p for p, _ in train_set + eval_set])  # the prompt files are read once
    optimizer = make_optimizer(model, args)
    params = optimizer.param_groups[0]["params"]
    rollout_gen = torch.Generator(model.device).manual_seed(args.seed)  # start noise and SDE noise
    shuffle_gen = torch.Generator().manual_seed(args.seed + 1)  # micro-batch order
    rngs, guard = {"prompts": rng, "rollout": rollout_gen, "shuffle": shuffle_gen}, NanGuard(args.nan_patience)
    print_startup_box(args, model, params, out_dir)

    # --- epoch 0: the base model on the held-out prompts, the reference point of every curve ---
    if checkpoint:  # a resumed run puts back weights, optimizer, random states and its metric rows instead
        history = restore_checkpoint(checkpoint, model, optimizer, rngs, guard)
    else:
        history = [{"epoch": 0, **evaluate(model, args, reward_fn, eval_set, out_dir, epoch=0)}]  # the base model
        log_row(out_dir, history[-1])
    with StopSignals() as stop:  # Ctrl-C or SIGTERM: the epoch in progress finishes, then a checkpoint is saved
        for epoch in range(history[-1]["epoch"] + 1, args.epochs + 1):
            chosen = sample_prompts(train_set, args.prompts_per_epoch, rng)
            row = {"epoch": epoch,
                   **train_epoch(model, chosen, args, reward_fn, optimizer, rollout_gen, shuffle_gen, guard)}
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # the last epoch is always evaluated
                row.update(evaluate(model, args, reward_fn, eval_set, out_dir, epoch=epoch))
            history.append(row)
            log_row(out_dir, row)  # appended and flushed every epoch: an interrupted run keeps its curve
            print(summary_line(row, args.epochs), flush=True)
            if stop.signum or guard.tripped or args.save_every and (epoch % args.save_every == 0 or epoch == args.epochs):
                saved = save_checkpoint(out_dir, epoch, args, model, optimizer, rngs, guard, history)
                raise_if_stopped(stop.signum, guard, saved, args, epoch)

    finish_run(model, history, out_dir)
    return history


def make_reward(args: Args, device: str, prompts: list[tuple[str, dict]] = ()):
    """The reward of `--reward` (reward.load_reward: one reward or a weighted sum, each model loaded once),
    checked against the run's (prompt, metadata) pairs. Absent reward weights, and prompts the reward
    cannot score (ocr needs quoted text), stop here with one line; any other exception, when the reward is
    built or called, is re-raised as a RewardError that names the reward."""
    import reward

    def call(fn, *a):
        try:
            return fn(*a)
        except reward.RewardError as e:
            raise UsageError(str(e)) from None
        except Exception as e:
            raise RewardError(f"the reward {args.reward!r} raised {type(e).__name__}: {e}") from e

    fn = call(reward.load_reward, args.reward, device)
    if hasattr(fn, "check_prompts"):
        call(fn.check_prompts, list(prompts))
    wrapped = lambda *a: call(fn, *a)  # noqa: E731
    if hasattr(fn, "metrics"):
        wrapped.metrics = lambda *a: call(fn.metrics, *a)
    return wrapped


def make_optimizer(model: Model, args: Args) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable weights only: the prompt encoder (and on SD3.5 the base
    weights under LoRA) stay frozen."""
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)


def train_epoch(model: Model, chosen: list, args: Args, reward_fn, optimizer, rollout_gen, shuffle_gen,
                guard=None) -> dict:
    """One epoch on the P `chosen` (prompt, metadata) pairs: rollout → rewards → credit → update.
    `guard` (a NanGuard) counts the batches skipped for NaN/inf; logged as guard/skipped_batches."""
    guard = guard if guard is not None else NanGuard(args.nan_patience)
    guard.skipped = 0
    # --- sample: P prompts × G trajectories with their old log-probs and previews ---
    t0 = time.time()
    traj = rollout(model, [p for p, _ in chosen], args, generator=rollout_gen)  # eqs. (1)–(2)
    metadata = [m for _, m in chosen for _ in range(args.num_generations)]
    t1 = time.time()
    use_previews = args.algo == "vgpo" and args.temporal_values  # GRPO never looks at previews
    try:  # NaN guard: a rollout with a NaN/inf reward or log-prob is not learned from
        r = instant_rewards(model, traj, reward_fn, metadata, previews=use_previews)  # eq. (3), (N, T)
        _checked(traj.log_probs, "log-prob")
    except NonFiniteError as e:
        guard.record(False, f"the rollout ({e})")
        return {"guard/skipped_batches": guard.skipped, "time/rollout_s": t1 - t0, "time/epoch_s": time.time() - t0}
    t2 = time.time()
    # --- credit: per-step values and advantages (VGPO) or one advantage for all steps (GRPO) ---
    values, weights, adv = credit(r, traj.group_ids, args)  # eqs. (4)–(7)
    t3 = time.time()
    # --- learn: clipped policy gradient over the rollout ---
    stats = update(model, traj, adv, optimizer, args, shuffle_gen, guard)  # eqs. (8)–(9)
    return {**epoch_metrics(r, values, weights, adv, traj.group_ids), **stats, "guard/skipped_batches": guard.skipped,
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": time.time() - t3,
            "time/epoch_s": time.time() - t0}


def epoch_metrics(r, values, weights, adv, group_ids) -> dict:
    """The SPEC §3 'Logged' keys of one rollout; per-step vectors are lists over k = 0…T−1."""
    terminal = r[:, -1]  # (N,)
    # frac_zero_std is the collapse meter: the share of groups where GRPO's advantage is exactly 0
    groups = [terminal[group_ids == g] for g in group_ids.unique()]
    return {
        "reward/mean": terminal.mean().item(),
        "reward/std": float(np.mean([g.std(unbiased=False).item() for g in groups])),  # within-group spread
        "reward/frac_zero_std": float(np.mean([(g.max() - g.min()).item() < 1e-6 for g in groups])),
        "credit/instant_reward": r.mean(0).tolist(),
        "credit/value": values.mean(0).tolist(),
        "credit/weight": weights.mean(0).tolist(),
        "advantage/mean_abs": adv.abs().mean(0).tolist(),
    }


@torch.no_grad()
def evaluate(model: Model, args: Args, reward_fn=None, eval_set=None, out_dir=None, epoch=None,
             seed: int = EVAL_SEED) -> dict:
    """Eq. (10): ODE sampling (a = 0), `eval_steps`, held-out prompts, the same guidance as in training,
    the same starting noise (from `seed`) every time. Returns {'eval/score': …, 'eval/strict_accuracy': …, …}."""
    t0 = time.time()
    eval_set = eval_set or load_prompts(args)[1]
    reward_fn = reward_fn or make_reward(args, model.device, eval_set)
    prompts, metas = [p for p, _ in eval_set], [m for _, m in eval_set]
    gen = torch.Generator(model.device).manual_seed(seed)
    # noise_level 0: the deterministic ODE sampler users sample with after training (eq. 10)
    images = sample(model, prompts, args.eval_steps, 0.0, args.guidance_scale, args.eval_batch_size,
                    generator=gen, record=False, desc="eval")[0]
    scores = reward_fn.metrics(images, prompts, metas) if hasattr(reward_fn, "metrics") else \
        {"score": reward_fn(images, prompts, metas).mean().item()}
    if out_dir:  # a grid of the first images of up to 8 distinct prompts
        firsts = {}
        for i, p in enumerate(prompts):
            firsts.setdefault(p, []).append(i)
        rows = [idx[:6] for idx in list(firsts.values())[:: max(1, len(firsts) // 8)][:8]]
        save_grid(images, prompts, rows, os.path.join(out_dir, "samples", f"epoch_{epoch:04d}.png"))
    return {f"eval/{k}": v for k, v in scores.items()} | {"time/eval_s": time.time() - t0}


# ====================================================================================================
# Run outputs (plumbing): folder, metrics, sample grids, curves, console
# ====================================================================================================


def open_run_dir(args: Args, checkpoint: dict | None = None) -> str:
    """The run folder, checked writable; a resumed run's metrics.jsonl is cut back to its checkpoint's rows."""
    out = args.output_dir or os.path.join("runs", f"{args.algo}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    # never append to another run's metrics: two runs in one file would make both unreadable
    if checkpoint is None and any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "checkpoints")):
        raise UsageError(f"{out} already holds a run: choose another --output-dir, or continue it with --resume {out}")
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
        if checkpoint is not None:
            rewrite_metrics(out, checkpoint["history"])
    except OSError as e:
        raise UsageError(f"cannot write to --output-dir {out!r}: {e.strerror}") from None
    return out


def log_row(out_dir: str, row: dict) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def save_grid(images, prompts, rows, path) -> None:
    """One row per prompt (its first samples), the prompt written to the left. images (N, 3, H, W)."""
    from PIL import Image, ImageDraw

    # 32-pixel images are enlarged 3× with nearest-neighbour so that single pixels stay visible;
    # large (SD3) images are shrunk to 256-pixel thumbnails so the grid stays a few MB
    label_w = 260
    h, w = (images.shape[2] * 3, images.shape[3] * 3) if images.shape[2] <= 64 else (256, 256)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (w + 2), len(rows) * (h + 2)), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for y, idx in enumerate(rows):
        draw.text((4, y * (h + 2) + h // 2 - 6), prompts[idx[0]], fill=(230, 230, 230))
        for x, i in enumerate(idx):
            arr = (images[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST if w > arr.shape[1] else Image.BILINEAR)
            grid.paste(tile, (label_w + x * (w + 2), y * (h + 2)))
    grid.save(path)


def plot_curves(history: list[dict], path: str) -> None:
    """curves.png: reward and held-out accuracy by epoch; per-step credit and mean |Â| of the last epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: CI machines and remote GPUs have none
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    trained = [r for r in history if "reward/mean" in r]
    evals = [r for r in history if "eval/score" in r]
    ax[0].plot([r["epoch"] for r in trained], [r["reward/mean"] for r in trained], label="train reward (terminal)")
    for key in ("eval/score", "eval/strict_accuracy"):
        if key in evals[0]:
            ax[0].plot([r["epoch"] for r in evals], [r[key] for r in evals], "o-", label=f"held-out {key[5:]}")
    ax[0].set(xlabel="epoch", title="reward and held-out accuracy")
    ax[0].legend()
    if trained:
        last = trained[-1]
        for key in ("credit/instant_reward", "credit/value", "credit/weight"):
            ax[1].plot(last[key], "o-", label=key.split("/")[1])
        ax[1].set(xlabel="step k", title=f"per-step credit, epoch {last['epoch']}")
        ax[1].legend()
        ax[2].bar(range(len(last["advantage/mean_abs"])), last["advantage/mean_abs"])
        ax[2].set(xlabel="step k (last is not trained)", title="mean |advantage| by step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_policy(model: Model, folder: str) -> str:
    """The trained weights: on SD3 models `folder/pytorch_lora_weights.safetensors` in diffusers' LoRA
    format (`StableDiffusion3Pipeline.load_lora_weights(folder)` loads it); on the tiny model the whole
    transformer as `folder/transformer.safetensors`. Returns the file written."""
    if getattr(model.transformer, "peft_config", None):
        import sd3

        return sd3.save_lora(model.transformer, folder)
    from safetensors.torch import save_file

    # the fine-tuned policy, loadable with shapes.load_pretrained-style code or any safetensors reader
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.transformer.state_dict().items()}
    save_file(state, os.path.join(folder, "transformer.safetensors"))
    return os.path.join(folder, "transformer.safetensors")


def finish_run(model: Model, history: list[dict], out_dir: str) -> None:
    # SD3: only the LoRA, in DIR/lora/ (the base weights are the hub's); tiny: DIR/transformer.safetensors
    path = save_policy(model, os.path.join(out_dir, "lora") if getattr(model.transformer, "peft_config", None) else out_dir)
    print(f"trained weights: {path}", flush=True)
    plot_curves(history, os.path.join(out_dir, "curves.png"))
    first, last = history[0], history[-1]
    if "eval/strict_accuracy" in first:
        print(f"held-out strict accuracy {first['eval/strict_accuracy']:.3f} → {last['eval/strict_accuracy']:.3f}; "
              f"outputs in {out_dir}")


def print_startup_box(args: Args, model: Model, params, out_dir: str) -> None:
    """The derived numbers, to double-check before a long run."""
    n = args.prompts_per_epoch * args.num_generations
    micro = n // args.train_batch_size  # validate() guarantees these divisions are exact
    lines = [
        f"VGPO reference run: --algo {args.algo}, --model {args.model}, --reward {args.reward}, device {model.device}",
        f"N = P·G = {args.prompts_per_epoch}·{args.num_generations} = {n} trajectories per epoch, T = {args.num_steps} steps "
        f"({sde_window(args.num_steps, args.sde_steps)} SDE steps, trained), guidance g = {args.guidance_scale}",
        f"{micro} micro-batches of {args.train_batch_size}, {micro // args.gradient_accumulation_steps} optimizer steps "
        f"per epoch, {args.epochs} epochs",
        f"trainable parameters {sum(p.numel() for p in params) / 1e6:.2f} M, lr {args.learning_rate}, "
        f"ε = {args.clip_range}, β = {args.beta}",
    ]
    if args.model != "tiny":
        lines.append(f"{args.resolution} px, latents {tuple(model.latent_shape)}, {model.parts['dtype']}, LoRA r {args.lora_rank} "
                     f"α {args.lora_alpha:g}, checkpointing {'on' if args.gradient_checkpointing else 'off'}, previews "
                     f"{args.preview_decoder}{', random weights' if args.random_weights else ''}"
                     f"{', low memory' if args.low_memory else ''}")
    if args.algo == "vgpo":
        lines.append(f"γ = {args.gamma}, κ = {args.anchor_coef} on the first {args.anchor_steps} steps, "
                     f"temporal values {'on' if args.temporal_values else 'off'}")
    lines.append(f"outputs: {out_dir}")
    width = max(len(s) for s in lines)
    print("┌" + "─" * (width + 2) + "┐\n" + "\n".join(f"│ {s:<{width}} │" for s in lines) + "\n└" + "─" * (width + 2) + "┘",
          flush=True)


def summary_line(row: dict, epochs: int) -> str:
    if "reward/mean" not in row:  # the NaN guard skipped this epoch's rollout
        return f"epoch {row['epoch']:3d}/{epochs} | skipped: NaN/inf in the rollout | {row['time/epoch_s']:.1f} s"
    # |Â| is averaged over all steps but the last (whose advantage is never used)
    s = (f"epoch {row['epoch']:3d}/{epochs} | reward {row['reward/mean']:.3f} (in-group std {row['reward/std']:.3f}, "
         f"zero-std {row['reward/frac_zero_std']:.2f}) | |Â| {np.mean(row['advantage/mean_abs'][:-1]):.3f} | "
         f"clip {row.get('policy/clip_frac', math.nan):.3f} | {row['time/epoch_s']:.1f} s")
    if row.get("guard/skipped_batches"):
        s += f" | {row['guard/skipped_batches']} batch(es) skipped for NaN/inf"
    if "eval/strict_accuracy" in row:
        s += f" | held-out strict {row['eval/strict_accuracy']:.3f}"
    elif "eval/score" in row:
        s += f" | held-out score {row['eval/score']:.3f}"
    return s


# ====================================================================================================
# Checkpoints, resuming, interruptions and NaN guards (plumbing)
# ====================================================================================================
# An RL run on SD3.5 takes hours; a crash, a Ctrl-C, a full disk or one NaN must not cost it. A checkpoint
# is a folder <output_dir>/checkpoints/epoch_NNNN/ with
#     weights.safetensors   the trainable parameters by name (the whole tiny model; the LoRA weights on SD3.5)
#     state.pt              the optimizer and every random state: python, numpy, torch, and the prompt,
#                           rollout and shuffle generators (tensors, dicts and numbers only: read back with
#                           torch.load(weights_only=True), which cannot run code)
#     meta.json             epoch, settings, the metric rows so far, the prompt-encoding order (Model.encoded),
#                           the NaN guard's count, and the SHA-256 of the two files above
# It is written as .tmp-epoch_NNNN and renamed when complete (a rename is atomic), so a crash or a full
# disk mid-write leaves the earlier checkpoints as they were. --resume DIR takes the newest checkpoint that
# matches its checksums and loads (a damaged one is renamed *.damaged, with a message), cuts metrics.jsonl
# back to the checkpoint's rows and continues; on the CPU the result is bitwise that of an uninterrupted
# run (tested). Exit codes are in main().

# Flags that may differ from the saved run on --resume: they change when or where things happen, not what
# is computed (a change of --device does change the numbers a little; the run says so).
SAFE_ON_RESUME = ("epochs", "eval_every", "save_every", "keep_checkpoints", "nan_patience", "device", "eval_batch_size")
CHECKPOINT_FILES = ("weights.safetensors", "state.pt")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_same(saved: dict, given: dict, where: str) -> None:
    """A one-line error for the first setting in `given` that is not safe to change and differs from `saved`."""
    for k, v in given.items():
        if k not in (*SAFE_ON_RESUME, "resume", "output_dir") and k in saved and saved[k] != v:
            raise UsageError(f"{_flag(k)} {v!r} conflicts with {saved[k]!r} in {where}: a resumed run may change only "
                             f"{', '.join(map(_flag, SAFE_ON_RESUME))}; start a new run to change {_flag(k)}")


def resume_args(resume: str, **given) -> Args:
    """The settings of the run in folder `resume` (its args.json), updated with the flags in `given` that are
    safe to change (SAFE_ON_RESUME); any other flag given must repeat the saved value."""
    try:
        with open(os.path.join(resume, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"--resume {resume!r} is not a run folder (no readable args.json): "
                         "give a run's output folder") from None
    if given.get("output_dir") and os.path.abspath(given["output_dir"]) != os.path.abspath(resume):
        raise UsageError("a resumed run continues in its own folder: drop --output-dir")
    saved = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Args)}}
    _check_same(saved, given, f"the run in {resume}")
    safe = {k: v for k, v in given.items() if k in SAFE_ON_RESUME}
    return Args(**{**saved, **safe, "resume": resume, "output_dir": resume})


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
    """Every random state a run draws from, as tensors, dicts and numbers."""
    np_global = np.random.get_state(legacy=False)
    np_global["state"]["key"] = np_global["state"]["key"].tolist()  # weights_only loads no numpy arrays
    return {"python": random.getstate(), "numpy": np_global, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "prompts": rngs["prompts"].bit_generator.state, "shuffle": rngs["shuffle"].get_state(),
            "rollout": rngs["rollout"].get_state(), "rollout_device": rngs["rollout"].device.type}


def set_rng_states(s: dict, rngs: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.device_count() == len(s["cuda"]):
        torch.cuda.set_rng_state_all(s["cuda"])
    rngs["prompts"].bit_generator.state = s["prompts"]
    rngs["shuffle"].set_state(s["shuffle"])
    if rngs["rollout"].device.type == s["rollout_device"]:
        rngs["rollout"].set_state(s["rollout"])
    else:  # a CPU generator's state means nothing to a CUDA one: a new stream, seeded from the old state
        rngs["rollout"].manual_seed(int(hashlib.sha256(s["rollout"].numpy().tobytes()).hexdigest()[:15], 16))
        print(f"vgpo.py: note: the rollout noise moved from {s['rollout_device']} to {rngs['rollout'].device.type}: "
              "the run continues correctly but not bitwise as it would have on the old device", file=sys.stderr)


def save_checkpoint(out_dir, epoch, args, model, optimizer, rngs, guard, history) -> str | None:
    """Write checkpoints/epoch_NNNN atomically and keep the newest `args.keep_checkpoints`. Returns its path,
    or None (with a warning; the run goes on) when it could not be written, e.g. on a full disk."""
    from safetensors.torch import save_file

    root = os.path.join(out_dir, "checkpoints")
    final, tmp = os.path.join(root, f"epoch_{epoch:04d}"), os.path.join(root, f".tmp-epoch_{epoch:04d}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        weights = {n: p.detach().cpu().contiguous() for n, p in model.transformer.named_parameters() if p.requires_grad}
        save_file(weights, os.path.join(tmp, "weights.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_states(rngs)}, os.path.join(tmp, "state.pt"))
        meta = {"epoch": epoch, "args": dataclasses.asdict(args), "history": history, "encoded": model.encoded,
                "nan_in_a_row": guard.in_a_row, "sha256": {f: _sha256(os.path.join(tmp, f)) for f in CHECKPOINT_FILES}}
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
        print(f"vgpo.py: warning: could not save checkpoint {final} ({e}); the run goes on", file=sys.stderr, flush=True)
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


def find_checkpoint(args: Args) -> dict:
    """The newest checkpoint in args.resume that is complete and undamaged, read. A damaged one is renamed
    *.damaged (kept for inspection, out of the way of later saves), reported, and the previous one tried."""
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
        _check_same(ckpt["args"], dataclasses.asdict(args), f"checkpoint {path}")
        if ckpt["epoch"] >= args.epochs:
            raise UsageError(f"the run in {args.resume} has reached epoch {ckpt['epoch']}: give --epochs above "
                             f"{ckpt['epoch']} to train it further")
        print(f"resuming {args.resume} from {name} (epoch {ckpt['epoch']}, training to epoch {args.epochs})", flush=True)
        return ckpt
    raise UsageError(f"no usable checkpoint in {root}: the run saved none (see --save-every); start a new run")


def rewrite_metrics(out_dir: str, rows: list[dict]) -> None:
    """metrics.jsonl := the checkpoint's rows (atomically): rows a killed run logged after its last checkpoint
    go, as the resumed run computes those epochs again; no epoch is missing or logged twice."""
    path = os.path.join(out_dir, "metrics.jsonl")
    logged = 0
    if os.path.exists(path):
        with open(path) as f:
            logged = sum(1 for line in f if line.strip())
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
    if logged > len(rows):
        print(f"metrics.jsonl: {logged - len(rows)} row(s) logged after the checkpoint dropped; those epochs run again")


def restore_checkpoint(ckpt: dict, model: Model, optimizer, rngs: dict, guard) -> list[dict]:
    """Put a checkpoint's weights, optimizer state, prompt cache and random states back; returns its rows."""
    params = dict(model.transformer.named_parameters())
    if set(ckpt["weights"]) != {n for n, p in params.items() if p.requires_grad}:
        raise UsageError("the checkpoint's weights do not fit this model's trainable parameters")
    with torch.no_grad():
        for name, value in ckpt["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt["state"]["optimizer"])
    for batch in ckpt["encoded"]:  # the prompt cache, filled in the original order (see Model.encoded)
        model.encode(batch)
    set_rng_states(ckpt["state"]["rng"], rngs)
    guard.in_a_row = ckpt["nan_in_a_row"]
    return ckpt["history"]


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
        print(f"vgpo.py: warning: NaN/inf in {what}: batch skipped ({self.in_a_row} in a row; the run stops at "
              f"{self.patience}, --nan-patience)", file=sys.stderr, flush=True)
        return False


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM set `signum` and the loop stops after the epoch in progress,
    with a checkpoint; a second signal stops at once (KeyboardInterrupt, the epoch is lost)."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nvgpo.py: {signal.Signals(signum).name}: finishing this epoch, then saving a checkpoint "
              "(send it again to stop at once, losing the epoch)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def raise_if_stopped(signum, guard: NanGuard, saved: str | None, args: Args, epoch: int) -> None:
    """After a checkpoint: RunStopped if a signal came (unless the run is complete anyway) or the guard tripped."""
    where = f"checkpoint {saved}" if saved else "no checkpoint could be saved (see the warning above)"
    again = f"python vgpo.py --resume {args.output_dir}"
    if guard.tripped:
        raise RunStopped(f"stopped after epoch {epoch}: {guard.in_a_row} batches in a row had NaN/inf (last: "
                         f"{guard.last}); {where}. Fix the cause, then continue with: {again}", code=3)
    if signum and epoch < args.epochs:
        raise RunStopped(f"stopped by {signal.Signals(signum).name} after epoch {epoch}/{args.epochs}; {where}. "
                         f"Continue with: {again}", code=128 + signum)


# ====================================================================================================
# Entry point
# ====================================================================================================


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 a usage error (one line); 3 stopped by the NaN guard; 130 / 143 stopped by
    SIGINT / SIGTERM after saving a checkpoint; 1 anything else (a bug, or a reward model that raised)."""
    # usage mistakes are one line and exit code 2 (as argparse's own); anything else is a real bug and
    # keeps its traceback
    try:
        train(parse_args(argv))
    except UsageError as e:
        print(f"vgpo.py: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a checkpoint was saved; the message says how to resume
        print(f"vgpo.py: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint of this epoch
        print("vgpo.py: interrupted at once; if the run saved a checkpoint, continue with --resume <the run's folder>",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
