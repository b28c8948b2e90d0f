"""Run harness for vgpo.py (plumbing: a reader of the method can skip this).

The command line and its checks, prompts, model and reward loading, the run folder, metrics, sample grids,
curves and the console. `vgpo.py` calls these; they know nothing of the method beyond the `Args` object they
are handed (its class is passed in where one is needed, so this module never imports vgpo). Checkpoints,
resuming, signals and the NaN guard are in recovery.py.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import distributed


class UsageError(Exception):
    """A mistake in the command line or its files: printed as one line, exit code 2."""


class RewardCrashed(RuntimeError):
    """The reward model raised while it was built or called (a bug or a broken model, not a usage mistake): exit
    code 1, with the original exception chained. A reward that cannot run as asked is reward.RewardUnavailable."""


# ----------------------------------------------------------------------------------------------------
# Command line and validation
# ----------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are a UsageError (one line, exit 2), as every other usage error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_flags(argv, args_cls, presets: dict[str, dict], description: str) -> dict:
    """{field: value} of the flags typed, one per field of the dataclass `args_cls`: `--field-name VALUE`,
    `--flag/--no-flag`; the help is the field's, with its default and its value in each of `presets`
    ({label: {field: value}}, e.g. {'--model tiny': {...}, '--task ocr': {...}})."""
    # SUPPRESS: a flag the user did not type is absent from the result, so a preset can fill it
    p = Parser(description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(args_cls):
        ftype = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        filled = "".join(f"; {label}: {preset[f.name]!r}" for label, preset in presets.items() if f.name in preset)
        help = f"{f.metadata['help']} (default: {f.default!r}{filled})"
        if ftype is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(flag(f.name), type=ftype, help=help, metavar=f.name.upper())
    return vars(p.parse_args(argv))


PRESET_ORDER = "your flags > --low-memory > the task's preset (--task) > the model's (--model tiny) > the default"


def apply_presets(args_cls, overrides: dict, models: dict, tasks: dict, low_memory: dict):
    """An `args_cls` from `overrides` (what the user set) > `low_memory` (if asked for, SD3 only) > tasks[task] >
    models[model] > the field defaults; `task` 'auto' is resolved by args_cls first. UsageError on an unknown
    task or field."""
    model = overrides.get("model", args_cls.model)
    task = args_cls(model=model, task=overrides.get("task", args_cls.task)).task  # 'auto' resolved
    if task not in tasks:
        raise UsageError(f"unknown --task {task!r}: use {', '.join(tasks)} or auto")
    low = low_memory if overrides.get("low_memory") and model != "tiny" else {}
    values = {**models.get(model, {}), **tasks[task], **low, **overrides, "task": task}
    unknown = set(values) - {f.name for f in dataclasses.fields(args_cls)}
    if unknown:
        raise UsageError(f"unknown setting(s) {sorted(unknown)}")
    return args_cls(**values)


def resolve_device(args) -> str:
    """'cpu' or 'cuda'; under torchrun 'cuda' is this process's GPU, cuda:LOCAL_RANK."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    return f"cuda:{distributed.local_rank()}" if device == "cuda" and distributed.world_size() > 1 else device


def validate(args) -> None:
    """Reject bad settings with a message that says what to do, before anything heavy is loaded."""
    import reward
    import sd3

    # every float must be a number: argparse accepts "nan" and "inf", which pass none of the range checks below
    for f in dataclasses.fields(args):
        if f.type == "float" and not math.isfinite(getattr(args, f.name)):
            raise UsageError(f"{flag(f.name)} must be a finite number")
    sd3_named = args.model in sd3.HUB_IDS
    try:  # names, weights and @DIR folders; the models themselves load in make_reward
        terms = reward.parse_reward_spec(args.reward)
    except reward.RewardUnavailable as e:
        raise UsageError(f"--reward: {e}") from None
    # a reward that cannot score this model's images would train on noise: the shapes verifier reads black 32×32
    # scenes, and photo rewards (a detector, CLIP, OCR) read nothing meaningful in those scenes
    draws = "toy" if args.model == "tiny" else "photo"
    foreign = [name for name, _, _ in terms if reward.IMAGES.get(name, "any") not in ("any", draws)]
    checks = [
        (args.model == "tiny" or sd3.is_model_name(args.model),
         f"unknown --model {args.model!r}: use 'tiny', 'sd3.5', 'sd3.5-large', a hub id (owner/name) or a local "
         "diffusers folder"),
        (args.model != "tiny" or args.task == "shapes",
         f"--task {args.task} is a task for SD3-family models: --model tiny draws only the toy world (--task shapes)"),
        (args.model == "tiny" or args.task != "shapes",
         f"--task shapes is the toy world of --model tiny: give --model {args.model} --task ocr, pickscore or geneval"),
        (not foreign or draws == "photo",
         f"--reward {','.join(foreign)} scores photographs, and --model tiny draws 32×32 toy scenes: use --reward "
         "shapes_strict, shapes or jpeg_compressibility (photo rewards need an SD3-family --model)"),
        (not foreign or draws == "toy",
         f"--reward {','.join(foreign)} scores the toy world's 32×32 scenes, and --model {args.model} draws "
         "photographs: give --task ocr, pickscore or geneval, or --reward ocr, pickscore, aesthetic, geneval"),
        (not sd3_named or args.random_weights or resolve_device(args) != "cpu",
         f"--model {args.model} needs a CUDA GPU and none is here: use --model tiny on the CPU, or --random-weights "
         "to plan memory and speed, or a small local SD3 folder"),
        (not (args.random_weights and args.model == "tiny"),
         "--random-weights is for SD3-family models (--model tiny has its own checkpoint)"),
        (args.preview_decoder in ("vae", "tiny") or sd3.is_model_name(args.preview_decoder),
         f"--preview-decoder {args.preview_decoder!r}: use 'vae', 'tiny' or an AutoencoderTiny folder/hub id"),
        (args.dtype in ("auto", "bf16", "fp16", "fp32"),
         f"--dtype {args.dtype!r}: use 'auto', 'bf16' or 'fp32'"),
        # fp16 without a gradient scaler: the gradients flowing back through the transformer lie mostly below fp16's
        # normal range (from 6e-5) and flush to zero, and training learns nothing, silently
        (args.model == "tiny" or args.dtype != "fp16",
         "--dtype fp16 trains nothing here (no gradient scaler: its gradients underflow to zero): use --dtype bf16 "
         "on a GPU with native bf16 (compute capability ≥ 8: A100, H100, RTX 30xx/40xx) or --dtype fp32 (V100, T4)"),
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
        (0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1) (0 = no EMA), got {args.ema_decay}"),
        (args.ema_update_interval >= 1, "--ema-update-interval must be ≥ 1 (optimizer steps between EMA updates)"),
        (args.reward_dtype in ("fp32", "fp16"), f"--reward-dtype {args.reward_dtype!r}: use 'fp32' or 'fp16'"),
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
        (not resolve_device(args).startswith("cuda") or distributed.local_rank() < torch.cuda.device_count(),
         f"torchrun started more processes on this node than its {torch.cuda.device_count()} GPUs: give "
         "--nproc-per-node at most that"),
        (args.prompts_per_epoch % distributed.world_size() == 0,
         f"--prompts-per-epoch {args.prompts_per_epoch} must be a multiple of the {distributed.world_size()} "
         "processes: each samples whole prompt groups"),
        (args.prompts == "shapes" or prompt_files(args.prompts) or os.path.isfile(args.prompts),
         f"--prompts {args.prompts!r} not found: give a .txt (one prompt per line) or .jsonl file, or a prompt set: "
         f"{', '.join(['shapes', *prompt_sets()])}"),
        (not args.resume or os.path.isdir(args.resume), f"--resume {args.resume!r}: no such folder"),
        (not args.init_from or os.path.isfile(policy_file(args.init_from, tiny=args.model == "tiny")),
         f"--init-from {args.init_from!r}: no {policy_file('', tiny=args.model == 'tiny')} there: give the folder "
         "of a finished run of this model"),
        (not args.resume or not args.output_dir or os.path.abspath(args.output_dir) == os.path.abspath(args.resume),
         "a resumed run continues in its own folder: drop --output-dir"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    # every optimizer step must see the same number of trajectories, or the last one would be a partial,
    # noisier step (and the gradient-accumulation divisor in vgpo.update would be wrong for it)
    k, n = distributed.world_size(), args.prompts_per_epoch * args.num_generations
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    if n // k % per_step:
        each = f"N/K = {n}/{k} = {n // k} trajectories per process" if k > 1 else \
            f"N = prompts_per_epoch×num_generations = {n}"
        raise UsageError(f"{each} must be a multiple of train_batch_size×gradient_accumulation_steps = {per_step}")
    # vgpo.update's stratified order: each of the U optimizer steps takes G/U trajectories of every prompt group,
    # the same trajectories whatever the number of processes
    steps = n // k // per_step
    if k > 1 and args.num_generations % steps:
        raise UsageError(f"the {steps} optimizer steps per epoch must divide --num-generations "
                         f"{args.num_generations} for {k} processes to take the steps of one (each step trains on "
                         "an equal share of every prompt's samples): raise --train-batch-size or "
                         "--gradient-accumulation-steps")


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


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


def load_model(args, checkpoint: str | None = None, prompts: list[str] | None = None) -> Model:
    """The model bundle for `args.model`: transformer, reference, cached prompt encoder, decoder. `prompts`:
    what an SD3 model encodes before its transformer loads (default: the run's train and eval prompts)."""
    device = resolve_device(args)
    if args.model == "tiny":
        import shapes

        # the whole transformer is trained; the prompt encoder and the autoencoder are frozen (shapes.load)
        parts = shapes.load(checkpoint or shapes.CHECKPOINT, device)
        distributed.broadcast_weights(parts["transformer"])  # under torchrun: every process starts equal
        # full fine-tuning keeps a frozen copy as the reference policy (with LoRA, below: the adapter off)
        reference = copy.deepcopy(parts["transformer"]).requires_grad_(False) if args.beta > 0 else None
        return Model(device=device, reference=reference, **parts)
    # SD3-family: LoRA (fp32) on a frozen bf16 transformer, the reference is the adapter switched off,
    # prompts encoded once before the transformer is loaded (sd3.py)
    import sd3

    if prompts is None:
        prompts = [p for pairs in load_prompts(args) for p, _ in pairs]
    say = (lambda line: print(line, flush=True)) if distributed.is_first() else None
    try:
        # under torchrun process 0 loads first: a first run's download happens once, and the others read the cache;
        # library notes at import and load time would break the one-line error
        with distributed.first_then_others(sd3.fetches(args)), sd3._quiet(), \
                sd3.download_progress(sd3.hub_repo(args), say):
            parts = sd3.load(args, device, prompts)
    except sd3.ModelUnavailable as e:
        raise UsageError(str(e)) from None
    reference = parts.pop("reference")  # the adapter switched off: no second copy of the weights
    distributed.broadcast_weights(parts["transformer"])  # under torchrun: every process starts from process 0's LoRA,
    #                                                    whatever its random initialisation drew
    return Model(device=device, reference=reference if args.beta > 0 else None, **parts)


def policy_file(folder: str, tiny: bool) -> str:
    """Where a run in `folder` keeps its trained weights (save_policy): the tiny model's whole transformer, or an
    SD3 model's LoRA."""
    name = "transformer.safetensors" if tiny else os.path.join("lora", "pytorch_lora_weights.safetensors")
    return os.path.join(folder, name)


def init_from(model: Model, folder: str) -> None:
    """--init-from: put the weights the run in `folder` saved (save_policy) into the policy; nothing if ''. The
    reference policy of the KL term stays what load_model made (the base model)."""
    if not folder:
        return
    from safetensors.torch import load_file

    lora = getattr(model.transformer, "peft_config", None)
    state = load_file(policy_file(folder, tiny=not lora), device=str(model.device))
    if lora:
        from peft import set_peft_model_state_dict

        # diffusers' LoRA format names the transformer's weights "transformer.<module>.lora_A.weight"
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        set_peft_model_state_dict(model.transformer, state, adapter_name="default")
        return
    try:
        model.transformer.load_state_dict(state)
    except RuntimeError:
        raise UsageError(f"--init-from {folder}: its transformer.safetensors is not a run of this model") from None


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
    path = policy_file(folder, tiny=True)
    save_file(state, path)
    return path


class WeightEMA:
    """Flow-GRPO's exponential moving average of the trained weights θ, which is what a run evaluates and saves.
    After optimizer step s (counted from 1) with (s + 1) mod `interval` = 0, ema ← ema − (1 − d_s)·(ema − θ) with
    d_s = min((1 + s)/(10 + s), decay): a short memory early, `decay` from step 80 on (decay 0.9). It starts at θ.
    decay = 0: no EMA, every method does nothing. diffusers' EMAModel keeps the copy and does the arithmetic."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float, interval: int):
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.interval, self.steps = interval, 0  # steps: optimizer steps taken
        self.ema = None
        if decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=decay)
            # it follows the optimizer: the update loop needs no EMA call (a skipped NaN step is not counted)
            optimizer.register_step_post_hook(lambda *_: self._after_step())

    @property
    def updates(self) -> int:
        """EMA updates so far: the steps s ≤ self.steps with (s + 1) mod interval = 0."""
        return (self.steps + 1) // self.interval - 1 // self.interval

    def _after_step(self) -> None:
        self.steps += 1
        if (self.steps + 1) % self.interval == 0:  # Flow-GRPO's test, with its global_step = s
            # EMAModel's warm-up (1 + n)/(10 + n) counts its own updates, Flow-GRPO's optimizer steps: its counter is
            # set to s (step() adds 1, get_decay takes 1 off again), so n = s as in Flow-GRPO
            self.ema.optimization_step = self.steps
            self.ema.step(self.params)

    @contextlib.contextmanager
    def applied(self):
        """Inside: the model holds the EMA weights (to evaluate or save them); after: the trained weights again,
        bitwise."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def state_dict(self) -> dict:
        """The averaged weights and the step count (tensors and numbers: torch.load(weights_only=True) reads it)."""
        return {"steps": self.steps, "ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Put a state_dict() back; an empty one (a checkpoint of a run without EMA) starts it at the weights now."""
        if self.ema is None:
            return
        if not state:
            self.ema.shadow_params = [p.detach().clone() for p in self.params]
            return
        self.steps = state["steps"]
        self.ema.load_state_dict(state["ema"])
        self.ema.to(device=self.params[0].device)

    def describe(self) -> str:
        if self.ema is None:
            return "no EMA: the trained weights are evaluated and saved"
        return (f"EMA of the weights (decay {self.ema.decay}, after optimizer steps s with (s + 1) mod "
                f"{self.interval} = 0) is evaluated and saved")


def make_reward(args, device: str, prompts: list[tuple[str, dict]] = ()):
    """The reward of `--reward` (reward.load_reward: one reward or a weighted sum, each model loaded once),
    checked against the run's (prompt, metadata) pairs. Absent reward weights, and prompts the reward
    cannot score (ocr needs quoted text), stop here with one line; any other exception, when the reward is
    built or called, is re-raised as RewardCrashed, naming the reward."""
    import reward

    def call(fn, *a):
        try:
            return fn(*a)
        except reward.RewardUnavailable as e:
            raise UsageError(str(e)) from None
        except Exception as e:
            raise RewardCrashed(f"the reward {args.reward!r} raised {type(e).__name__}: {e}") from e

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.reward_dtype]
    with distributed.first_then_others():  # under torchrun: a reward model is downloaded once, by process 0
        fn = call(reward.load_reward, args.reward, device, dtype)
    if hasattr(fn, "check_prompts"):
        call(fn.check_prompts, list(prompts))
    wrapped = lambda *a: call(fn, *a)  # noqa: E731
    if hasattr(fn, "metrics"):
        wrapped.metrics = lambda *a: call(fn.metrics, *a)
    return wrapped


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------
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


def _jsonl_row(line: str, number: int, path: str) -> dict:
    """One .jsonl prompt row, {"prompt": str, other fields = metadata}; a bad row is a one-line error."""
    try:
        row = json.loads(line)  # plain JSON: no code is ever run from a prompt file
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UsageError(f'{path}:{number}: each line must be an object with a "prompt" string')
    return row


def load_prompts(args) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
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
        raise UsageError(f"{args.prompts} has {len(train)} prompts, fewer than --prompts-per-epoch "
                         f"{args.prompts_per_epoch}")
    return train, test  # a single file has no split: it is evaluated on its own prompts


def check_vocabulary(args, pairs: list[tuple[str, dict]]) -> None:
    """The tiny model's encoder knows only the shapes world's words: say so before the run, not mid-rollout."""
    import shapes

    if args.model != "tiny" or args.prompts == "shapes":
        return
    try:
        shapes.check_vocabulary([p for p, _ in pairs])
    except ValueError as e:
        raise UsageError(f"{args.prompts}: {e}") from None


def sample_prompts(train: list, count: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """`count` distinct prompts; for the shapes world every GenEval category is equally likely."""
    import shapes

    # without replacement: a prompt appears in at most one group per epoch, so groups are independent
    weights = shapes.prompt_weights([p for p, _ in train])  # None (uniform) for prompts of another world
    return [train[i] for i in rng.choice(len(train), size=count, replace=False, p=weights)]


# ----------------------------------------------------------------------------------------------------
# What each epoch logs
# ----------------------------------------------------------------------------------------------------
# A group is uniform when its terminal rewards' std is below this: exactly equal on a 0/1 reward, and a spread that
# the group normalisation would blow up into noise on a continuous one
UNIFORM_STD = 0.01


def group_kind(rewards: torch.Tensor) -> str:
    """'mixed', 'all-solved' or 'all-failed' for one group's terminal rewards: uniform when their std is below
    UNIFORM_STD, solved when their mean is ≥ 0.5 (all 1 / all 0 on a 0/1 reward)."""
    if rewards.std(unbiased=False).item() >= UNIFORM_STD:
        return "mixed"
    return "all-solved" if rewards.mean().item() >= 0.5 else "all-failed"


def preview_agreement(r: torch.Tensor) -> dict:
    """How well each step's preview reward predicts the final one, over one rollout's instant rewards r (N, T):
    'credit/preview_corr', corr(r_k, R) by step (None where r_k or R is constant), and on a 0/1 reward
    'credit/preview_pass_solved' = P(R = 1 | r_k = 1), 'credit/preview_fail_solved' = P(R = 1 | r_k = 0) (None where
    no preview passed / failed). Previews that carry no step information show as corr ≈ 0 early on."""
    terminal = r[:, -1]  # (N,)

    def corr(x):
        if x.std() < 1e-8 or terminal.std() < 1e-8:  # undefined, not 0: nothing varies to agree on
            return None
        return torch.corrcoef(torch.stack([x, terminal]))[0, 1].item()

    out = {"credit/preview_corr": [corr(r[:, k].float()) for k in range(r.shape[1])]}
    if bool(((r == 0) | (r == 1)).all()):  # a 0/1 reward: the two conditional pass rates say more than a correlation
        def solved(mask):
            return terminal[mask].float().mean().item() if mask.any() else None

        out["credit/preview_pass_solved"] = [solved(r[:, k] == 1) for k in range(r.shape[1])]
        out["credit/preview_fail_solved"] = [solved(r[:, k] == 0) for k in range(r.shape[1])]
    return out


def epoch_metrics(r, values, weights, adv, group_ids, trained: int, previews: bool = False) -> dict:
    """The logged keys of one rollout of vgpo.train_epoch (README: logged metrics) from its instant rewards r,
    values, weights and advantages (N, T); per-step vectors are lists over k = 0…T−1, and `trained` = S, the
    number of trained steps 0…S−1 (the others' advantages are never used). `previews`: r holds scored previews,
    whose agreement with the final reward is logged too (preview_agreement)."""
    terminal = r[:, -1]  # (N,)
    # frac_zero_std is the collapse meter: the share of groups where GRPO's advantage is exactly 0; the uniform
    # groups split into high (all solved, on a 0/1 reward) and low (all failed), which VGPO's anchor treats apart
    groups = [terminal[group_ids == g] for g in group_ids.unique()]
    kinds = [group_kind(g) for g in groups]
    return {
        "reward/mean": terminal.mean().item(),
        "reward/std": float(np.mean([g.std(unbiased=False).item() for g in groups])),  # within-group spread
        "reward/frac_zero_std": float(np.mean([(g.max() - g.min()).item() < 1e-6 for g in groups])),
        "reward/frac_all_solved": float(np.mean([k == "all-solved" for k in kinds])),
        "reward/frac_all_failed": float(np.mean([k == "all-failed" for k in kinds])),
        # the share of trajectories that the update pushes at all: 0 in GRPO's uniform groups
        "advantage/frac_nonzero": (adv[:, :trained].abs() > 1e-6).any(dim=1).float().mean().item(),
        "credit/instant_reward": r.mean(0).tolist(),
        "credit/value": values.mean(0).tolist(),
        "credit/weight": weights.mean(0).tolist(),
        "advantage/mean_abs": adv.abs().mean(0).tolist(),
        "advantage/trained_mean_abs": adv[:, :trained].abs().mean().item(),  # the signal the update sees
    } | (preview_agreement(r) if previews else {})


# ----------------------------------------------------------------------------------------------------
# The run folder and the console
# ----------------------------------------------------------------------------------------------------


def progress(total: int, desc: str):
    """A progress bar on a terminal, silent otherwise (logs, CI, tests)."""
    from tqdm import tqdm

    # under torchrun only process 0 draws one: the others' bars would overwrite it
    quiet = None if distributed.is_first() else True  # None: tqdm's "on a terminal only"
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=quiet)


class RunFolder:
    """A run's output folder and its console lines: args.json, metrics.jsonl, samples/, curves.png, the
    trained weights. Only a `writer` writes or prints; a run split over several processes gives the others
    a RunFolder with writer=False, which keeps the path (for --resume messages) and does nothing."""

    def __init__(self, path: str, writer: bool = True):
        self.path, self.writer = path, writer

    @classmethod
    def open(cls, args, checkpoint: dict | None = None, writer: bool | None = None) -> RunFolder:
        """The run folder, checked writable; a resumed run's metrics.jsonl is cut back to its checkpoint's rows.
        The writer is process 0 unless `writer` says otherwise; args.json also records the number of processes."""
        writer = distributed.is_first() if writer is None else writer
        out = args.output_dir or os.path.join("runs", f"{args.algo}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        # never append to another run's metrics: two runs in one file would make both unreadable
        if checkpoint is None and any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "checkpoints")):
            raise UsageError(f"{out} already holds a run: choose another --output-dir, or continue it with "
                             f"--resume {out}")
        run = cls(out, writer)
        if not writer:
            return run
        try:
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            with open(os.path.join(out, "args.json"), "w") as f:
                json.dump({**dataclasses.asdict(args), "processes": distributed.world_size()}, f, indent=2)
            if checkpoint is not None:
                run.rewrite_metrics(checkpoint["history"])
        except OSError as e:
            raise UsageError(f"cannot write to --output-dir {out!r}: {e.strerror}") from None
        return run

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """metrics.jsonl := the checkpoint's rows (atomically): rows a killed run logged after its last
        checkpoint go, as the resumed run computes those epochs again; no epoch is missing or logged twice."""
        path = os.path.join(self.path, "metrics.jsonl")
        logged = 0
        if os.path.exists(path):
            with open(path) as f:
                logged = sum(1 for line in f if line.strip())
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
        if logged > len(rows):
            print(f"metrics.jsonl: {logged - len(rows)} row(s) logged after the checkpoint dropped; those epochs "
                  "run again")

    def log(self, row: dict, epochs: int | None = None) -> None:
        """Append a metrics row (flushed every epoch: an interrupted run keeps its curve); with `epochs`, also
        print the epoch's summary line."""
        if not self.writer:
            return
        with open(os.path.join(self.path, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if epochs is not None:
            print(summary_line(row, epochs), flush=True)

    def save_samples(self, images, prompts: list[str], epoch: int) -> None:
        """samples/epoch_NNNN.png: the first images of up to 8 distinct prompts, one row each."""
        if not self.writer:
            return
        firsts = {}
        for i, p in enumerate(prompts):
            firsts.setdefault(p, []).append(i)
        rows = [idx[:6] for idx in list(firsts.values())[:: max(1, len(firsts) // 8)][:8]]
        save_grid(images, prompts, rows, os.path.join(self.path, "samples", f"epoch_{epoch:04d}.png"))

    def startup_box(self, args, model: Model, params, trained_steps: int, notes: tuple[str, ...] = ()) -> None:
        """The derived numbers, to double-check before a long run; `notes`: more lines (which presets applied, the
        EMA)."""
        if not self.writer:
            return
        k, n = distributed.world_size(), args.prompts_per_epoch * args.num_generations
        micro = n // k // args.train_batch_size  # per process; validate() guarantees these divisions are exact
        each = f" per process ({k} processes, {args.prompts_per_epoch // k} prompts each; gradients averaged)"
        scaled = f"÷ the {args.scale_rewards} std" if args.scale_rewards != "none" else "not scaled"
        lines = [
            f"VGPO reference run: --algo {args.algo}, --task {args.task}, --model {args.model}, --reward "
            f"{args.reward}, --prompts {args.prompts}, device {model.device}",
            f"N = P·G = {args.prompts_per_epoch}·{args.num_generations} = {n} trajectories per epoch, "
            f"T = {args.num_steps} steps ({trained_steps} SDE steps, trained), guidance g = {args.guidance_scale}",
            f"{micro} micro-batches of {args.train_batch_size}{each if k > 1 else ''}, "
            f"{micro // args.gradient_accumulation_steps} optimizer steps per epoch, {args.epochs} epochs",
            f"trainable parameters {sum(p.numel() for p in params) / 1e6:.2f} M, lr {args.learning_rate}, "
            f"ε = {args.clip_range}, β = {args.beta}, advantages {scaled}",
        ]
        if args.model != "tiny":
            lines.append(f"{args.resolution} px, latents {tuple(model.latent_shape)}, {model.parts['dtype']}, "
                         f"LoRA r {args.lora_rank} α {args.lora_alpha:g}, checkpointing "
                         f"{'on' if args.gradient_checkpointing else 'off'}, previews {args.preview_decoder}"
                         f"{', random weights' if args.random_weights else ''}"
                         f"{', low memory' if args.low_memory else ''}")
        if args.algo == "vgpo":
            lines.append(f"γ = {args.gamma}, κ = {args.anchor_coef} on the first {args.anchor_steps} steps, "
                         f"temporal values {'on' if args.temporal_values else 'off'}"
                         f"{'' if args.step_weights or not args.temporal_values else ', step weights off (ω ≡ 1)'}")
        lines += [*notes, f"outputs: {self.path}"]
        width = max(len(s) for s in lines)
        print("┌" + "─" * (width + 2) + "┐\n" + "\n".join(f"│ {s:<{width}} │" for s in lines) + "\n└"
              + "─" * (width + 2) + "┘", flush=True)

    def finish(self, model: Model, history: list[dict], ema: WeightEMA | None = None, trained_steps: int = 0) -> None:
        """The trained weights, or their EMA when `ema` keeps one (SD3: only the LoRA, in lora/; tiny:
        transformer.safetensors), curves.png (steps 0…trained_steps−1 shaded as trained) and the held-out
        accuracy before and after."""
        if not self.writer:
            return
        lora = getattr(model.transformer, "peft_config", None)
        with ema.applied() if ema is not None else contextlib.nullcontext():
            path = save_policy(model, os.path.join(self.path, "lora") if lora else self.path)
        if ema is not None and ema.ema is not None:  # a short run may end before the first EMA update
            print(f"EMA of the trained weights ({ema.updates} update(s); the last checkpoint holds the raw ones): "
                  f"{path}", flush=True)
        else:
            print(f"trained weights: {path}", flush=True)
        plot_curves(history, os.path.join(self.path, "curves.png"), trained_steps)
        first, last = history[0], history[-1]
        if "eval/strict_accuracy" in first:
            print(f"held-out strict accuracy {first['eval/strict_accuracy']:.3f} → "
                  f"{last['eval/strict_accuracy']:.3f}; outputs in {self.path}")


def presets_note(args, tasks: dict, models: dict) -> str:
    """For the startup box: the task preset (tasks[args.task]) and model preset (models[args.model]) behind `args`,
    with the task's values the user did not change."""
    task = ", ".join(f"{k} {v}" for k, v in tasks[args.task].items() if getattr(args, k) == v)
    model = models.get(args.model, {})
    kept = sum(getattr(args, k) == v for k, v in model.items())
    return (f"presets (flags > --low-memory > task > model > default): task {args.task}: {task or 'all overridden'}; "
            f"model {args.model}: {f'{kept} of its {len(model)} settings' if model else 'none'}"
            f"{'; --low-memory' if args.low_memory else ''}")


def summary_line(row: dict, epochs: int) -> str:
    if "reward/mean" not in row:  # the NaN guard skipped this epoch's rollout
        return f"epoch {row['epoch']:3d}/{epochs} | skipped: NaN/inf in the rollout | {row['time/epoch_s']:.1f} s"
    # |Â| is averaged over the trained steps (the others' advantages are never used)
    s = (f"epoch {row['epoch']:3d}/{epochs} | reward {row['reward/mean']:.3f} (in-group std {row['reward/std']:.3f}, "
         f"zero-std {row['reward/frac_zero_std']:.2f}) | |Â| {row['advantage/trained_mean_abs']:.3f} | "
         f"clip {row.get('policy/clip_frac', math.nan):.3f} | {row['time/epoch_s']:.1f} s")
    if row.get("guard/skipped_batches"):
        s += f" | {row['guard/skipped_batches']} batch(es) skipped for NaN/inf"
    if "eval/strict_accuracy" in row:
        s += f" | held-out strict {row['eval/strict_accuracy']:.3f}"
    elif "eval/score" in row:
        s += f" | held-out score {row['eval/score']:.3f}"
    return s


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


def plot_curves(history: list[dict], path: str, trained_steps: int = 0) -> None:
    """curves.png: reward and held-out accuracy by epoch; per-step credit and mean |Â| of the last epoch, the
    trained steps 0…trained_steps−1 shaded (only their advantages reach the update); with previews, how well each
    step's preview predicted the final reward, over the first and the last 10 epochs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: CI machines and remote GPUs have none
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 7.5))
    ax = ax.flatten()
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
        steps = len(last["advantage/mean_abs"])
        ax[2].bar(range(steps), last["advantage/mean_abs"],
                  color=["tab:blue" if k < trained_steps else "lightgrey" for k in range(steps)])
        for a in ax[1:]:
            a.axvspan(-0.5, trained_steps - 0.5, color="tab:blue", alpha=0.08, lw=0)
        ax[2].set(xlabel=f"step k (shaded: trained, 0…{trained_steps - 1}; grey bars reach no update)",
                  title="mean |advantage| by step")
    scored = [r for r in trained if "credit/preview_corr" in r]
    if scored:  # one epoch's correlation is noisy: a mean over 10 epochs at each end of the run
        for part in ((scored[:10], scored[-10:]) if len(scored) > 10 else (scored,)):
            by_step = zip(*[r["credit/preview_corr"] for r in part])  # a step whose r_k never varied is left out
            means = [np.mean([v for v in vs if v is not None]) if any(v is not None for v in vs) else np.nan
                     for vs in by_step]
            ax[3].plot(means, "o-", label=f"epochs {part[0]['epoch']}–{part[-1]['epoch']}")
        ax[3].axvspan(-0.5, trained_steps - 0.5, color="tab:blue", alpha=0.08, lw=0)
        ax[3].set(xlabel="step k (shaded: trained)", ylabel="corr(r_k, R)", ylim=(-0.1, 1.05),
                  title="preview agreement: how well r_k predicts the final reward")
        ax[3].legend()
    else:
        ax[3].axis("off")  # GRPO and --no-temporal-values score no previews
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
