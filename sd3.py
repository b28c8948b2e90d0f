"""SD3-family models for vgpo.py: loading, LoRA, the prompt cache, decoders and the LoRA export.

Plumbing, not the algorithm: `harness.load_model` calls `load` here for every `--model` other than `tiny`
and wraps what it returns in a `harness.Model`. The algorithm sees the same five things it sees on the
toy model (a transformer v_θ, a reference v_ref, a cached prompt encoder, a decoder, the sigmas).

    --model sd3.5            stabilityai/stable-diffusion-3.5-medium (gated: accept the licence, `hf auth login`)
    --model sd3.5-large      stabilityai/stable-diffusion-3.5-large
    --model OWNER/NAME       any SD3-family diffusers repository (StableDiffusion3Pipeline layout)
    --model PATH             a local folder of the same layout (what `pipeline.save_pretrained` writes)
    --random-weights         the same architecture with random weights and random prompt embeddings:
                             no download, to plan memory and speed (configs of SD3.5-M/-L are kept below)

Precision: the transformer, VAE and text encoders run in `--dtype` (auto = bf16 on a GPU that computes it
natively, compute capability ≥ 8; fp32 on older GPUs, which only emulate bf16, and on the CPU, where bf16
matmuls are slow and the tests compare against the stock pipeline at 1e-4); the LoRA weights are fp32
(AdamW on bf16 weights would round most updates of size lr·1e-3 away), and latents, the SDE step and its
log-probability stay fp32 in vgpo.py. fp16 is refused for training (harness.validate): without a gradient
scaler the gradients reaching the transformer fall below fp16's range and flush to zero.

It imports nothing of the project (vgpo → harness → sd3); it raises `ModelUnavailable`, which the harness
turns into its one-line usage error.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import re
import sys
import warnings

import torch

HUB_IDS = {"sd3.5": "stabilityai/stable-diffusion-3.5-medium", "sd3.5-large": "stabilityai/stable-diffusion-3.5-large"}
# What a first run downloads, from the parameter counts in 16-bit: SD3.5-M's transformer 4.5 GB, T5-XXL's encoder
# 9.5 GB, CLIP-G 1.4 GB, CLIP-L 0.25 GB, the VAE 0.17 GB; SD3.5-L's transformer 16 GB
DOWNLOAD_SIZES = {"sd3.5": "about 16 GB", "sd3.5-large": "about 27 GB"}
TAESD3 = "madebyollin/taesd3"  # the tiny preview decoder of `--preview-decoder tiny`

# The published architectures, written out so that `--random-weights` needs no download (values as in
# the repositories' config.json files). SD3.5-M is an MMDiT-X: its first 13 blocks have a second,
# image-only attention (attn2); SD3.5-L is a plain MMDiT with 38 blocks.
TRANSFORMER_CONFIGS = {
    "sd3.5": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                  dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        dual_attention_layers=(), qk_norm="rms_norm"),
}
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024,
                  scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)  # SD3.5's: spend more steps at high noise
TAESD3_CONFIG = dict(latent_channels=16, scaling_factor=1.5305)
CLIP_TOKENS = 77  # the two CLIP encoders' sequence length; T5 adds --max-sequence-length tokens after it
# Flow-GRPO's LoRA targets: the joint attention's projections of both streams (not attn2, not the MLPs)
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelUnavailable(Exception):
    """The weights cannot be loaded here; the message says what to do (vgpo prints it as one line)."""


def is_model_name(name: str) -> bool:
    """A preset, an existing folder, or something shaped like a hub id (owner/name)."""
    return name in HUB_IDS or os.path.isdir(name) or bool(_HUB_ID.match(name))


def compute_dtype(dtype: str, device: str) -> torch.dtype:
    # bf16 halves memory and is what SD3.5 was trained in, where the GPU has bf16 units (compute capability ≥ 8:
    # A100, H100, RTX 30xx/40xx); a V100 or T4 only emulates it, slowly, and the CPU is slow at it: fp32 there
    if dtype == "auto":
        native = device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def allow_tf32(device: str) -> None:
    """On CUDA, fp32 matmuls and convolutions on the tensor cores in TF32 (10-bit mantissa), as Flow-GRPO runs: the
    fp32 LoRA path (peft computes each adapted projection's input in fp32) and the fp32 reward models. bf16 weights
    are unaffected; the SDE step and its log-probability are elementwise and stay exact fp32. CPU runs keep full fp32
    (the tests' bitwise reproducibility)."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the flag Flow-GRPO sets (not mixed with torch's newer API)
        torch.backends.cudnn.allow_tf32 = True


def hub_repo(args) -> str | None:
    """The hub repository whose weights loading `args.model` reads (and a first run downloads); None for a local
    folder or --random-weights."""
    if args.random_weights or os.path.isdir(args.model):
        return None
    return HUB_IDS.get(args.model, args.model)


def fetches(args) -> bool:
    """Whether loading may download anything: the model's weights, or a preview decoder named by hub id."""
    preview = args.preview_decoder != "vae" and not args.random_weights and not os.path.isdir(args.preview_decoder)
    return hub_repo(args) is not None or preview


@contextlib.contextmanager
def download_progress(repo: str | None, say, every: float = 60.0):
    """While the block loads `repo`: a line if its files are not in the Hugging Face cache yet (what a first run
    fetches), then, off a terminal (where the hub's progress bars are hidden), a line every `every` seconds while its
    cache folder grows, and the total at the end; nothing when all was cached. say(line) prints; None: silent."""
    if repo is None or say is None:
        yield
        return
    import threading
    import time

    from huggingface_hub import constants, try_to_load_from_cache

    blobs = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"), "blobs")

    def size() -> int:  # complete files and partial downloads (*.incomplete) alike
        with contextlib.suppress(OSError):
            return sum(e.stat().st_size for e in os.scandir(blobs) if e.is_file())
        return 0

    def amount(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    start, t0, stop = size(), time.time(), threading.Event()
    if not isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        hint = next((s for name, s in DOWNLOAD_SIZES.items() if HUB_IDS[name] == repo), "its weights")
        say(f"sd3.py: downloading {repo} ({hint}, once) into the Hugging Face cache {constants.HF_HUB_CACHE} "
            "(HF_HOME moves it); a line per minute while it grows")

    def report():
        last = start
        while not stop.wait(every):
            now = size()
            if now > last:
                say(f"sd3.py: {repo}: {amount(now - start)} downloaded ({time.time() - t0:.0f} s)")
                last = now

    ticker = None if sys.stderr.isatty() else threading.Thread(target=report, daemon=True)
    if ticker:
        ticker.start()
    try:
        yield
    finally:
        stop.set()
        if ticker:
            ticker.join()
        if size() > start:
            say(f"sd3.py: {repo}: {amount(size() - start)} downloaded in {time.time() - t0:.0f} s")


@contextlib.contextmanager
def _quiet():
    """Without a network the libraries log "Couldn't connect to the Hub … will try the cache" before they
    raise; the user gets our one line instead (vgpo's contract for bad input). Their loading bars: see
    _library_bars()."""
    import diffusers  # noqa: F401  (imported first: their import sets their loggers' levels)
    import transformers  # noqa: F401

    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notes of the download helpers
            with _library_bars():
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _library_bars():
    """diffusers' and transformers' progress bars ("Loading pipeline components", "Loading weights", "Writing
    model shards", downloads) on a terminal only, as the run's own (harness.progress): in a log, a CI job or a
    test's captured output they are lines that are not the run's. Restored as they were afterwards."""
    if sys.stderr.isatty():
        yield
        return
    from diffusers.utils import logging as df_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as tf_logging

    on = df_logging.is_progress_bar_enabled(), tf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    df_logging.disable_progress_bar()
    tf_logging.disable_progress_bar()  # and huggingface_hub's
    try:
        yield
    finally:
        if on[0]:
            df_logging.enable_progress_bar()
        if on[1]:
            with warnings.catch_warnings():  # the hub's "cannot enable" under HF_HUB_DISABLE_PROGRESS_BARS=1
                warnings.simplefilter("ignore")
                tf_logging.enable_progress_bar()  # and huggingface_hub's
        if not on[2]:
            disable_progress_bars()


def pipeline_module():
    """diffusers' SD3 pipeline module (StableDiffusion3Pipeline, calculate_shift), imported without transformers'
    notes. Its first import imports transformers' CLIPImageProcessor and SiglipImageProcessor (for diffusers'
    IP-Adapter loader, which vgpo does not use); transformers ≥ 5 without torchvision falls back to their PIL
    versions and logs "`CLIPImageProcessor` requires torchvision (not installed); falling back …" for each, a note
    about a backend this project never uses. Only that logger (transformers' lazy-import machinery) is raised to
    ERROR, and only while the module is imported: an import that fails still raises."""
    lg = logging.getLogger("transformers.utils.import_utils")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3
    finally:
        lg.setLevel(level)
    return pipeline_stable_diffusion_3


def _pretrained(cls, *args, **kwargs):
    with _quiet():
        return cls.from_pretrained(*args, **kwargs)


def _config(cls, source: str, subfolder: str) -> dict:
    with _quiet():
        return cls.load_config(source, subfolder=subfolder)


def _unavailable(args, err: Exception) -> ModelUnavailable:
    reason = " ".join(str(err).split())[:200]  # one line, however long the library's message is
    hub = HUB_IDS.get(args.model, args.model)
    if os.path.isdir(args.model):
        return ModelUnavailable(f"--model {args.model!r} is not a complete SD3 diffusers folder ({reason}): point "
                                "--model at a folder StableDiffusion3Pipeline.save_pretrained wrote, or at a hub id, "
                                "or use --random-weights / --model tiny")
    if args.random_weights:
        return ModelUnavailable(
            f"cannot read the configs of --model {args.model!r} ({reason}): --random-weights has sd3.5 and sd3.5-large "
            "built in; for other models point --model at a local diffusers folder, or use --model tiny")
    return ModelUnavailable(
        f"cannot load --model {args.model!r} ({reason}): log in with `hf auth login` and accept the licence at "
        f"https://huggingface.co/{hub}, or point --model at a local diffusers folder, or use --random-weights "
        "(no download) or --model tiny")


def load(args, device: str, prompts: list[str]) -> dict:
    """Everything harness.Model needs for an SD3-family model. `prompts` are encoded now, with "" (the
    negative prompt), so the text encoders can leave the GPU before the transformer arrives."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    source = HUB_IDS.get(args.model, args.model)
    dtype = compute_dtype(args.dtype, device)
    try:
        # 1. prompts first: the three text encoders (~11 GB in bf16, T5-XXL most of it) are loaded only while the
        #    prompt set is encoded, then freed; the transformer is loaded after they have gone
        if args.random_weights:
            config = TRANSFORMER_CONFIGS.get(args.model) or _config(SD3Transformer2DModel, source, "transformer")
            encode = random_prompt_encoder(config, args.max_sequence_length, device, dtype)
        else:
            encode = cached_prompt_encoder(source, prompts, args.max_sequence_length, device, dtype)
        # 2. transformer, VAE, scheduler
        if args.random_weights:
            transformer = _build(SD3Transformer2DModel, config, device, dtype)
            vae_config = VAE_CONFIG if args.model in HUB_IDS else _config(AutoencoderKL, source, "vae")
            vae = _build(AutoencoderKL, vae_config, device, dtype)
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                SCHEDULER_CONFIG if args.model in HUB_IDS else
                _config(FlowMatchEulerDiscreteScheduler, source, "scheduler"))
        else:
            transformer = _pretrained(SD3Transformer2DModel, source, subfolder="transformer", dtype=dtype).to(device)
            vae = _pretrained(AutoencoderKL, source, subfolder="vae", dtype=dtype).to(device)
            scheduler = _pretrained(FlowMatchEulerDiscreteScheduler, source, subfolder="scheduler")
        preview_vae = load_preview_vae(args.preview_decoder, args.random_weights, device, dtype)
    except OSError as e:  # missing files, no network, gated repository (GatedRepoError is an OSError)
        raise _unavailable(args, e) from None

    vae.requires_grad_(False).eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell (8 on SD3)
    multiple = scale * transformer.config.patch_size
    if args.resolution % multiple:
        raise ModelUnavailable(f"--resolution {args.resolution} must be a multiple of {multiple} for {args.model}")
    tokens = transformer.config.pos_embed_max_size  # its position embeddings cover no more tokens per side
    if tokens and args.resolution > tokens * multiple:
        raise ModelUnavailable(f"--resolution {args.resolution} is larger than this model's transformer takes: at most "
                               f"{tokens * multiple} px (pos_embed_max_size {tokens} tokens × {multiple} px)")
    add_lora(transformer, args.lora_rank, args.lora_alpha)
    allow_tf32(device)
    # off by default, as Flow-GRPO trains: each block's forward runs again in backward (a third more compute in the
    # update), for a fraction of its activation memory; --low-memory turns it on (README: what it costs)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    # --low-memory decodes one image at a time; otherwise a micro-batch at a time
    batch = 1 if args.low_memory else args.train_batch_size
    latent = args.resolution // scale
    return dict(
        transformer=transformer, reference=AdapterOff(transformer), encode=encode,
        decode=make_decoder(vae, batch), scheduler=scheduler,
        preview_decode=make_decoder(preview_vae, batch) if preview_vae is not None else None,
        latent_shape=(transformer.config.in_channels, latent, latent),
        sigma_kwargs=sigma_kwargs(scheduler, (latent // transformer.config.patch_size) ** 2),
        parts=dict(vae=vae, preview_vae=preview_vae, dtype=dtype),
    )


def _build(cls, config: dict, device: str, dtype: torch.dtype):
    """A diffusers model from its config with random weights, allocated directly on `device` in `dtype`
    (building SD3.5-M in fp32 first would briefly need 9 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls.from_config(config).to(device, dtype).eval()
    finally:
        torch.set_default_dtype(previous)


def sigma_kwargs(scheduler, image_tokens: int) -> dict:
    """What set_timesteps needs besides the step count: the stock pipeline's resolution-dependent shift
    μ when the scheduler uses dynamic shifting (SD3.5's does not: a fixed shift of 3.0)."""
    if not scheduler.config.get("use_dynamic_shifting"):
        return {}
    c, shift = scheduler.config, pipeline_module().calculate_shift
    return {"mu": shift(image_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)}


# ----------------------------------------------------------------------------------------------------
# LoRA: trained adapter, reference = adapter off, export in diffusers' format
# ----------------------------------------------------------------------------------------------------


def add_lora(transformer, rank: int, alpha: float) -> None:
    """LoRA (peft) on Flow-GRPO's eight attention projections; only the adapter is trained, in fp32."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    # Gaussian A and zero B: the adapter starts as the identity, so epoch 0 is the base model
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # fp32 master weights (and AdamW states) even on a bf16 base
            p.requires_grad_(True)
    # The last block reads the prompt stream but does not output it (context_pre_only): its prompt-query
    # projection never reaches the output, so its adapter gets no gradient. Frozen, so that the
    # "trainable parameters" count is honest; it stays in the exported file (as zeros: no effect).
    last = transformer.transformer_blocks[-1].attn
    if last.context_pre_only and hasattr(last.add_q_proj, "lora_A"):
        last.add_q_proj.requires_grad_(False)


class AdapterOff(torch.nn.Module):
    """The reference policy v_ref of the KL term: the same transformer with its LoRA switched off, so
    the frozen base model costs no second copy of the weights."""

    def __init__(self, transformer):
        super().__init__()
        object.__setattr__(self, "transformer", transformer)  # not a submodule: no duplicate parameters
        object.__setattr__(self, "lora", [p for n, p in transformer.named_parameters() if "lora_" in n])

    def forward(self, *args, **kwargs):
        # peft's disable/enable also switch requires_grad of every adapter weight on; restore what it was,
        # or gradient checkpointing would recompute the policy's blocks with a different graph
        flags = [p.requires_grad for p in self.lora]
        self.transformer.disable_adapters()
        try:
            return self.transformer(*args, **kwargs)
        finally:
            self.transformer.enable_adapters()
            for p, flag in zip(self.lora, flags):
                p.requires_grad_(flag)


def save_lora(transformer, folder: str) -> str:
    """Write `folder/pytorch_lora_weights.safetensors` in diffusers' format (with the LoRA config, so α is
    restored): `StableDiffusion3Pipeline.from_pretrained(model).load_lora_weights(folder)` loads it."""
    from peft.utils import get_peft_model_state_dict

    StableDiffusion3Pipeline = pipeline_module().StableDiffusion3Pipeline
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    config = transformer.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set is not JSON
    os.makedirs(folder, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=config)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


# ----------------------------------------------------------------------------------------------------
# Prompts: encoded once and cached
# ----------------------------------------------------------------------------------------------------


def _cache(fill, device: str):
    """encode(prompts) -> (sequence (B, 77+L, D), pooled (B, D')) on `device`, from a per-prompt cache in host memory;
    fill(missing prompts) computes the embeddings of prompts not seen yet. Host memory, not the GPU's: GenEval's 4 121
    prompts take 11 GB (2.7 MB each on SD3.5), and a micro-batch's B prompts cross to the GPU in each call."""
    cache: dict[str, tuple] = {}

    def encode(prompts: list[str]):
        missing = sorted({p for p in prompts if p not in cache})
        if missing:
            seq, pooled = fill(missing)
            cache.update({p: (s.to("cpu"), q.to("cpu")) for p, s, q in zip(missing, seq, pooled)})
        return (torch.stack([cache[p][0] for p in prompts]).to(device, non_blocking=True),
                torch.stack([cache[p][1] for p in prompts]).to(device, non_blocking=True))

    encode.cache = cache  # {prompt: (sequence, pooled)}, for inspection
    return encode


def cached_prompt_encoder(source: str, prompts: list[str], max_sequence_length: int, device: str, dtype):
    """Encode `prompts` and "" with the stock pipeline's encode_prompt (CLIP-L, CLIP-G, T5), then free the three
    text encoders: a run encodes nothing else (harness.load_model passes every prompt of its prompt files), and
    keeping them would hold about 11 GB of host memory per process for the whole run. A prompt not encoded here is
    an error that says so. The cache costs 2.7 MB per prompt on SD3.5 in bf16 (333 × 4096 numbers)."""
    pipe = _pretrained(pipeline_module().StableDiffusion3Pipeline, source, transformer=None, vae=None, dtype=dtype)

    @torch.no_grad()
    def fill(batch):
        if pipe is None:  # reads the enclosing `pipe` when called: None once the encoders are freed
            raise ValueError(f"the prompt {batch[0]!r} was not encoded when the model was loaded, and the text "
                             "encoders have been freed since: pass every prompt to harness.load_model(prompts=...)")
        seq, _, pooled, _ = pipe.encode_prompt(batch, None, None, device=device, do_classifier_free_guidance=False,
                                               max_sequence_length=max_sequence_length)
        return seq, pooled

    encode = _cache(fill, device)
    pipe.to(device)
    todo = sorted(set(prompts) | {""})
    for s in range(0, len(todo), 32):  # 32 prompts per call: T5-XXL activations stay small
        encode(todo[s : s + 32])
    pipe = None  # the text encoders' last reference: freed, on the GPU and in host memory
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return encode


def random_prompt_encoder(config: dict, max_sequence_length: int, device: str, dtype):
    """--random-weights: no text encoders; each prompt gets fixed random embeddings of the real shapes,
    seeded by the prompt's text, so a prompt means the same thing in every call and every run."""
    seq_len = CLIP_TOKENS + max_sequence_length
    dim, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]

    def fill(batch):
        pairs = []
        for prompt in batch:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") >> 1
            g = torch.Generator().manual_seed(seed)
            pairs.append((torch.randn(seq_len, dim, generator=g), torch.randn(pooled_dim, generator=g)))
        return [s.to(dtype) for s, _ in pairs], [q.to(dtype) for _, q in pairs]

    return _cache(fill, device)


# ----------------------------------------------------------------------------------------------------
# Decoders: latents → images in [0, 1]
# ----------------------------------------------------------------------------------------------------


def load_preview_vae(name: str, random_weights: bool, device: str, dtype):
    """None for 'vae' (previews use the full VAE); TAESD3 for 'tiny'; or an AutoencoderTiny folder/hub id."""
    if name == "vae":
        return None
    from diffusers import AutoencoderTiny

    if name == "tiny" and random_weights:
        return _build(AutoencoderTiny, TAESD3_CONFIG, device, dtype).requires_grad_(False)
    vae = _pretrained(AutoencoderTiny, TAESD3 if name == "tiny" else name, dtype=dtype).to(device)
    return vae.requires_grad_(False).eval()


def make_decoder(vae, batch: int):
    """latents (N, C, h, w) -> images (N, 3, H, W) in [0, 1], `batch` images per VAE call. Latents are
    unscaled as the stock pipeline does: z / scaling_factor + shift_factor. TAESD3 takes no shift (its
    model card sets shift_factor = 0 for the SD3 pipeline)."""
    from diffusers import AutoencoderTiny

    scale = vae.config.scaling_factor
    shift = 0.0 if isinstance(vae, AutoencoderTiny) else (vae.config.get("shift_factor") or 0.0)

    @torch.no_grad()
    def decode(latents):
        # one fp32 output written chunk by chunk and rescaled in place: N images once, not a list of chunks, their
        # concatenation and two rescaled copies (256 previews of 512 px are 0.8 GB each)
        out = None
        for s in range(0, len(latents), batch):
            z = latents[s : s + batch]
            x = vae.decode((z.float() / scale + shift).to(vae.dtype), return_dict=False)[0]
            if out is None:
                out = torch.empty((len(latents), *x.shape[1:]), dtype=torch.float32, device=x.device)
            out[s : s + len(z)] = x  # cast to fp32 in the copy
            del x  # not held while the next chunk decodes
        return out.add_(1).div_(2).clamp_(0, 1)  # the VAE outputs [-1, 1]

    return decode


# ----------------------------------------------------------------------------------------------------
# A tiny random SD3 pipeline (tests and the CPU benchmark): every part built from a config, no download
# ----------------------------------------------------------------------------------------------------


def save_tiny_random_pipeline(folder: str, seed: int = 0, layers: int = 2, heads: int = 2) -> str:
    """A complete StableDiffusion3Pipeline folder with random weights, small enough for a CPU: two
    CLIP text encoders and a T5 with tokenizers made here (character-level), an MMDiT-X transformer
    (block 0 has the second attention, as SD3.5-M's), a 2-level VAE (4 latent channels, 2 px per
    latent cell), and SD3.5's scheduler (shift 3.0). 64×32-px images are 256 image tokens."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(seed)
    # CLIP: byte-level BPE with no merges (every character is a token), the two special tokens last
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    # T5: a Unigram model over single characters
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'\"!?-"]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=64)
    # the wiring rules: pooled = 2 × CLIP projection, T5 width = joint_attention_dim ≥ 2 × CLIP width
    clip = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=8, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    t5 = T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                        attention_head_dim=8, num_attention_heads=heads, joint_attention_dim=32,
                                        caption_projection_dim=8 * heads, pooled_projection_dim=16,
                                        pos_embed_max_size=32,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=1.5, shift_factor=0.1,
                        use_quant_conv=False, use_post_quant_conv=False)
    pipe = pipeline_module().StableDiffusion3Pipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval(), tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval(), tokenizer_2=clip_tok,
        text_encoder_3=T5EncoderModel(t5).eval(), tokenizer_3=t5_tok)
    with _library_bars():
        pipe.save_pretrained(folder)
    return folder


def save_tiny_random_preview_vae(folder: str, seed: int = 0) -> str:
    """An AutoencoderTiny for the tiny pipeline above (4 latent channels, one 2× upsampling)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), scaling_factor=1.5).save_pretrained(folder)
    return folder
