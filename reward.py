"""Reward models behind one interface.

Every reward is built by a factory in `REWARDS` and called as

    fn(images, prompts, metadata) -> rewards
        images   (N, 3, H, W) float in [0, 1], on any device
        prompts  list of N strings
        metadata list of N dicts (the prompt file's extra fields; may be empty)
        rewards  (N,) float tensor on the CPU, non-negative and roughly in [0, 1]

VGPO's step weights and anchored advantage assume that scale, so every reward is scaled to
it here, once. A reward may also carry `fn.metrics(images, prompts, metadata) -> dict` for evaluation
(the shapes world reports GenEval's strict accuracy per category) and `fn.check_prompts(pairs)`, which
rejects prompts it cannot score before a run starts. Heavy models are imported inside their factory,
so `import reward` is cheap.

`--reward` takes a spec, parsed by `parse_reward_spec` and built by `load_reward`:

    ocr                          one reward
    pickscore=1,aesthetic=0.5    a weighted sum R = Σ w·R_name (weights > 0; they are not normalised)
    pickscore@DIR                the reward's model from a local folder instead of the model hub

| name | what | scale |
|---|---|---|
| shapes, shapes_strict | the toy world's exact verifier | [0, 1] |
| jpeg_compressibility | 1 − JPEG bytes / raw bytes | [0, 1] |
| ocr | 1 − edit distance between the text read and the prompt's quoted text (rapidocr, offline) | [0, 1] |
| pickscore | PickScore_v1: logit_scale·cos(image, prompt) ÷ 26 | ≈ 0.7–0.9 |
| aesthetic | LAION improved-aesthetic MLP on CLIP ViT-L/14 image embeddings ÷ 10 | ≈ 0.4–0.7 |
"""
from __future__ import annotations

import inspect
import contextlib
import io
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F


class RewardUnavailable(Exception):
    """A reward that cannot run as asked: a bad --reward spec, absent model weights, a missing package, or
    prompts it cannot score. vgpo.py prints the message as one line and exits with code 2."""


def shapes_reward(device="cpu", strict_weight: float = 0.5):
    """The toy world's exact verifier: ½·(partial credit) + ½·(strict 0/1 score), in [0, 1].

    Partial credit alone (the fraction of GenEval-style checks passed) can be raised by giving up one
    check for another: measured here, RL on it raised held-out partial credit 0.53 → 0.58 while strict
    accuracy fell 0.25 → 0.17 (extra objects satisfy "is there a red circle" and only cost the clean
    check). Paying half of the reward for getting everything right keeps the partial signal and makes
    the whole prompt the thing worth learning."""
    import shapes

    def metas_of(prompts, metadata):
        # a prompt file may carry the grammar's metadata; plain text prompts are parsed
        return [m if m and "category" in m else shapes.parse_prompt(p) for p, m in zip(prompts, metadata)]

    def mix(partial, strict):
        return (1 - strict_weight) * partial + strict_weight * strict

    def fn(images, prompts, metadata):
        return torch.from_numpy(mix(*shapes.verify(images, metas_of(prompts, metadata))))

    def metrics(images, prompts, metadata):
        metas = metas_of(prompts, metadata)
        partial, strict = shapes.verify(images, metas)
        cats = np.array([m["category"] for m in metas])
        out = {"score": float(mix(partial, strict).mean()), "partial_credit": float(partial.mean())}
        per_cat = {c: float(strict[cats == c].mean()) for c in shapes.CATEGORIES if (cats == c).any()}
        out["strict_accuracy"] = float(np.mean(list(per_cat.values())))  # GenEval: mean over categories
        out.update({f"strict/{c}": v for c, v in per_cat.items()})
        return out

    def check_prompts(pairs):  # before the run: a prompt outside the grammar has no exact check
        try:
            metas_of([p for p, _ in pairs], [m for _, m in pairs])
        except ValueError as e:
            raise RewardUnavailable(f"the shapes reward scores only prompts of the shapes world: {e}") from None

    fn.metrics, fn.check_prompts = metrics, check_prompts
    return fn


def jpeg_compressibility(device="cpu", quality: int = 95):
    """1 − (JPEG bytes / raw RGB bytes): in [0, 1], higher for images that compress well (DDPO's
    compressibility task, rescaled from −kilobytes to the [0, 1] range VGPO assumes)."""
    from PIL import Image

    def fn(images, prompts, metadata):
        arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=quality)
            out.append(1.0 - min(1.0, buf.tell() / a.size))
        return torch.tensor(out, dtype=torch.float32)

    return fn


# ----------------------------------------------------------------------------------------------------
# OCR: does the image spell the prompt's quoted text? (Flow-GRPO's text-rendering reward)
# ----------------------------------------------------------------------------------------------------
_QUOTED = re.compile(r'["“”]([^"“”]+)["“”]')  # the first span between double quotes, straight or curly


def ocr_target(prompt: str, metadata: dict | None = None) -> str | None:
    """The text an image for `prompt` should show: `metadata["text"]` when the prompt file gives it, else
    the first double-quoted span of the prompt: `A sign that says "OPEN"` → OPEN. None when there is none."""
    if metadata and metadata.get("text"):
        return str(metadata["text"])
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions a → b."""
    prev = list(range(len(b) + 1))  # row i−1 of the DP table: distance of a[:i−1] to b[:j]
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(read: str, target: str) -> float:
    """Flow-GRPO's OCR reward, 1 − d/len(target) in [0, 1], on both strings lower-cased and with all
    whitespace removed (OCR splits and joins words unreliably; case is a font choice). d is the edit
    distance, capped at len(target), and 0 when the target occurs inside the text read: text the prompt
    did not ask for costs nothing, as in Flow-GRPO."""
    read, target = ("".join(s.lower().split()) for s in (read, target))
    d = 0 if target in read else min(edit_distance(read, target), len(target))
    return 1.0 - d / len(target)


def ocr(device="cpu", workers: int | None = None):
    """Text rendering: ocr_score(text read from the image, quoted text of the prompt), in [0, 1].

    The reader is rapidocr-onnxruntime: PP-OCRv4 text detection and recognition as ONNX models shipped
    inside the wheel, so it needs no download and no GPU (the angle classifier is off, as in Flow-GRPO).
    Images are read `workers` at a time (default min(8, CPU count)), each worker thread with its own
    engine running one ONNX thread: on this project's shared 2-core machine one thread read a 512-px
    image in 0.11 s against 0.26 s with onnxruntime's default thread count."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        raise RewardUnavailable("reward 'ocr' needs rapidocr-onnxruntime: pip install -r requirements.txt") from None
    pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1), thread_name_prefix="ocr")
    local = threading.local()  # an engine keeps per-call state, so every worker thread gets its own

    def read(bgr: np.ndarray) -> str:
        """All text found in one (H, W, 3) uint8 BGR image, in reading order."""
        if not hasattr(local, "engine"):
            # det_limit_type "max": images up to 960 px are read at their own size (the default "min"
            # enlarges the short side to 736 px: 512-px images took 1.6× longer and read no better here)
            local.engine = RapidOCR(det_limit_type="max", use_cls=False, intra_op_num_threads=1,
                                    inter_op_num_threads=1)
        found, _ = local.engine(bgr)  # [[box, text, confidence], ...] or None
        return " ".join(text for _, text, _ in found or [])

    def targets(prompts, metadata):
        out = [ocr_target(p, m) for p, m in zip(prompts, metadata)]
        bad = [p for p, t in zip(prompts, out) if not t or not t.strip()]
        if bad:
            raise RewardUnavailable(f"reward 'ocr' scores the quoted text of each prompt and {len(bad)} prompt(s) "
                                    f"have none (e.g. {bad[0]!r}): use --prompts ocr or prompts like "
                                    "'A sign that says \"OPEN\"'")
        return out

    def read_all(images) -> list[str]:
        # one transfer off the device; channels flipped to the BGR order of OpenCV-based readers
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).flip(1)
        return list(pool.map(read, arr.permute(0, 2, 3, 1).contiguous().cpu().numpy()))  # (N, H, W, 3) → N texts

    def fn(images, prompts, metadata):
        want = targets(prompts, metadata or [{}] * len(prompts))
        return torch.tensor([ocr_score(t, w) for t, w in zip(read_all(images), want)], dtype=torch.float32)

    fn.check_prompts = lambda pairs: targets([p for p, _ in pairs], [m for _, m in pairs])
    fn.read = read_all  # the raw text read, for inspection
    return fn


# ----------------------------------------------------------------------------------------------------
# CLIP-based preference rewards: PickScore and the LAION aesthetic predictor
# ----------------------------------------------------------------------------------------------------
# Where the weights come from. Each can be replaced by a local folder (`--reward pickscore@DIR`) or, from
# Python, by a model object (the tests pass random-weight CLIP models built from configs).
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"  # CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # its tokenizer and image pre-processing
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"  # the CLIP the aesthetic head was trained on
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac%2Blogos%2Bava1-l14-linearMSE.pth")
AESTHETIC_HEAD_FILES = ("aesthetic_head.safetensors", "sac+logos+ava1-l14-linearMSE.pth")  # looked for in DIR
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RewardUnavailable("the CLIP-based rewards need transformers: pip install -r requirements.txt") from None
    return transformers


def _hub_offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)  # HF_HUB_OFFLINE=1 in the environment


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub be opened? Without this check a machine with no network spends about
    a minute in the download helpers' retries (with a log line each) before the one-line error."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants

    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_hub():
    """The download helpers log every retry; the user gets our one line if they fail."""
    import logging

    lg = logging.getLogger("huggingface_hub")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _pretrained(cls, source, reward: str):
    """`source` itself if it is already a model/processor object, else `cls.from_pretrained(source)` from
    a local folder, the hub cache or, failing both, a download. Absent weights → RewardUnavailable, one line."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    source = os.fspath(source)
    try:  # a local folder or the hub cache: no network
        return cls.from_pretrained(source, local_files_only=True)
    except OSError:
        pass
    if os.path.isdir(source):
        raise RewardUnavailable(f"reward {reward!r}: folder {source!r} holds no loadable {cls.__name__} "
                                "(save one there with save_pretrained, or download the model into it)")
    if not _hub_offline() and _hub_reachable():
        try:
            with _quiet_hub():
                return cls.from_pretrained(source)
        except OSError:
            pass
    raise RewardUnavailable(f"reward {reward!r} needs {source} from the Hugging Face hub, which is neither in the "
                            f"local cache nor downloadable here: run `hf download {source}` where the hub is reachable "
                            f"(`hf auth login` first if it asks), give a local copy as --reward {reward}@DIR, or "
                            "choose another reward (ocr and jpeg_compressibility need no download)")


def _has_processor(folder) -> bool:
    return bool(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in _PROCESSOR_FILES)


def _default_dtype(device) -> torch.dtype:
    # fp16 on a GPU halves the reward model's memory (CLIP was trained in mixed precision). Not bf16: its
    # 8-bit mantissa (~0.4% per number) could move a PickScore of ~22 by ~0.1 (an estimate, not measured),
    # while the images of one group may differ by only a few tenths
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def clip_pixels(images: torch.Tensor, processor, device, dtype=torch.float32) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] → CLIP's `pixel_values` (N, 3, S, S) on `device`: what the model's image
    processor makes of PIL images (bicubic resize of the short side, centre crop, mean/std normalisation),
    computed batched on the device instead of image by image through PIL. Only the 8-bit rounding of the
    PIL route is left out (a test bounds the difference)."""
    ip = getattr(processor, "image_processor", processor)  # a CLIPProcessor or its image processor
    x = images.detach().to(device=device, dtype=torch.float32).clamp(0, 1)
    h, w = x.shape[-2:]
    size = {"shortest_edge": ip.size} if isinstance(ip.size, int) else dict(ip.size)
    if "shortest_edge" in size:  # the short side to S, the long side in proportion (truncated, as transformers)
        s = size["shortest_edge"]
        long = int(s * max(h, w) / min(h, w))
        new = (s, long) if h <= w else (long, s)
    else:
        new = (size["height"], size["width"])
    if new != (h, w):
        # antialias=True is PIL's bicubic (a = −0.5, kernel widened when shrinking), which the processor uses
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if getattr(ip, "do_center_crop", True):
        crop = {"height": ip.crop_size, "width": ip.crop_size} if isinstance(ip.crop_size, int) else dict(ip.crop_size)
        top, left = (new[0] - crop["height"]) // 2, (new[1] - crop["width"]) // 2
        x = x[..., top : top + crop["height"], left : left + crop["width"]]
    mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def _image_embeds(clip, pixel_values) -> torch.Tensor:
    # the projected image embedding, by the module names that CLIPModel and CLIPVisionModelWithProjection
    # share in every transformers version (get_image_features changed its return type in v5)
    return clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output).float()


def pickscore(device="cpu", local_dir=None, *, model=None, processor=None, dtype=None, batch_size: int = 64):
    """PickScore (Kirstain et al., 2023): CLIP ViT-H/14 fine-tuned on Pick-a-Pic's human preferences.
    R = logit_scale·cos(image embedding, prompt embedding) ÷ 26, never below 0.

    PickScore_v1's logit_scale is ≈ 100 and it scores fitting images ~18–24 (SD3.5-M averages 21.7 in the
    VGPO paper), so ÷26 (Flow-GRPO's constant) puts them at ~0.7–0.9. `model`, `processor`: hub ids,
    local folders or objects; `local_dir` (from `pickscore@DIR`) holds the model and, if present, the
    processor (else PICKSCORE_PROCESSOR's is used)."""
    tf = _transformers()
    model = _pretrained(tf.CLIPModel, model or local_dir or PICKSCORE_MODEL, "pickscore")
    processor = _pretrained(tf.AutoProcessor,
                            processor or (local_dir if _has_processor(local_dir) else PICKSCORE_PROCESSOR), "pickscore")
    dtype = dtype or _default_dtype(device)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    scale = model.logit_scale.float().exp()  # stored as a log: exp gives the multiplier, ≈ 100 for CLIP-H
    max_len = min(processor.tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    text_cache: dict[str, torch.Tensor] = {}  # prompt → unit text embedding: the N·T previews share P prompts

    @torch.no_grad()
    def fn(images, prompts, metadata):
        new = sorted(set(prompts) - text_cache.keys())
        if new:
            tok = processor.tokenizer(new, padding=True, truncation=True, max_length=max_len,
                                      return_tensors="pt").to(device)
            out = model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            text_cache.update(zip(new, F.normalize(model.text_projection(out).float(), dim=-1)))
        scores = []
        for s in range(0, len(images), batch_size):  # bounded memory whatever the caller's batch
            pixels = clip_pixels(images[s : s + batch_size], processor, device, dtype)
            img = F.normalize(_image_embeds(model, pixels), dim=-1)
            txt = torch.stack([text_cache[p] for p in prompts[s : s + batch_size]])
            scores.append(scale * (img * txt).sum(-1))
        # ≥ 0: ω = Q/mean(Q) needs non-negative rewards (a real PickScore is far above 0 anyway)
        return (torch.cat(scores) / 26).clamp(min=0).cpu()

    return fn


class AestheticHead(torch.nn.Module):
    """LAION's improved aesthetic predictor (trained on SAC, LAION-Logos and AVA ratings with an MSE loss):
    768 → 1024 → 128 → 64 → 16 → 1 linear layers with dropout between the first four and no activation,
    on the unit-normalised CLIP ViT-L/14 image embedding; it predicts a 1–10 rating. The layers sit at the
    indices of LAION's state dict (layers.0, .2, .4, .6, .7), so their file loads as it is."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:  # (N, 768) unit vectors → (N,) ratings
        return self.layers(embeds).squeeze(-1)


def _aesthetic_head(source, local_dir) -> AestheticHead:
    """The head from a module, a state dict, a .safetensors / .pth file, DIR, or LAION's URL (cached by torch.hub)."""
    if isinstance(source, torch.nn.Module):
        return source
    if source is None and local_dir:
        source = next((os.path.join(local_dir, f) for f in AESTHETIC_HEAD_FILES
                       if os.path.isfile(os.path.join(local_dir, f))), None)
    if isinstance(source, dict):
        state = source
    elif source is None:  # LAION's file, downloaded once into torch.hub's cache
        try:
            # weights_only: a .pth is a pickle, which could run code when loaded; this reads tensors only
            state = torch.hub.load_state_dict_from_url(AESTHETIC_HEAD_URL, map_location="cpu", weights_only=True,
                                                       file_name=AESTHETIC_HEAD_FILES[1], progress=False)
        except OSError:
            raise RewardUnavailable(f"reward 'aesthetic' needs LAION's head {AESTHETIC_HEAD_FILES[1]}, neither cached "
                                    f"nor downloadable here: download {AESTHETIC_HEAD_URL} into "
                                    f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}, or put it in a folder with a "
                                    "CLIP ViT-L/14 copy and use --reward aesthetic@DIR, or choose another "
                                    "reward") from None
    elif str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(source)
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    head = AestheticHead()
    head.load_state_dict(state)
    return head


def aesthetic(device="cpu", local_dir=None, *, clip=None, processor=None, head=None, dtype=None, batch_size: int = 64):
    """LAION aesthetic score ÷ 10, never below 0: the 1–10 rating AestheticHead predicts from the CLIP
    ViT-L/14 image embedding (typical photographs rate 4–6, so ≈ 0.4–0.6; DDPO's aesthetic task).

    `clip`, `processor`: hub ids, local folders (a CLIPModel) or objects (CLIPModel or
    CLIPVisionModelWithProjection);
    `head`: AestheticHead, state dict or file; `local_dir` (from `aesthetic@DIR`) holds the CLIP, if
    present its processor, and if present the head as one of AESTHETIC_HEAD_FILES."""
    tf = _transformers()
    # the head first: the smallest file and the likeliest to be missing (its home is LAION's GitHub repository)
    mlp = _aesthetic_head(head, local_dir).to(device).float().eval().requires_grad_(False)  # 0.9 M weights: fp32
    source = clip or local_dir or AESTHETIC_CLIP
    clip = _pretrained(tf.CLIPModel, source, "aesthetic")
    if isinstance(source, (str, os.PathLike)):  # loaded here: free the text tower (123 M weights), never used
        # (a CLIPModel rather than CLIPVisionModelWithProjection: that class, loaded from a CLIPModel folder,
        # misses the top-level projection_dim and re-initialises the projection; seen with transformers 5.24)
        clip.text_model, clip.text_projection = torch.nn.Identity(), torch.nn.Identity()
    processor = _pretrained(tf.AutoImageProcessor,
                            processor or (local_dir if _has_processor(local_dir) else AESTHETIC_CLIP), "aesthetic")
    dtype = dtype or _default_dtype(device)
    clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        ratings = [mlp(F.normalize(_image_embeds(clip, clip_pixels(images[s : s + batch_size], processor, device,
                                                                   dtype)), dim=-1))
                   for s in range(0, len(images), batch_size)]
        return (torch.cat(ratings) / 10).clamp(min=0).cpu()  # ≥ 0 as every reward (real ratings are ≥ 1)

    return fn


REWARDS = {
    "shapes": shapes_reward,
    # GenEval's strict 0/1 score alone: sparse, so many groups are all-0 or all-1 (reward-diversity depletion)
    "shapes_strict": lambda device="cpu": shapes_reward(device, strict_weight=1.0),
    "jpeg_compressibility": jpeg_compressibility,
    "ocr": ocr,
    "pickscore": pickscore,
    "aesthetic": aesthetic,
}


# ----------------------------------------------------------------------------------------------------
# --reward specs: one reward, a weighted sum, local model folders
# ----------------------------------------------------------------------------------------------------
_SPEC_HELP = "write NAME, NAME@DIR or a weighted sum NAME=WEIGHT,NAME=WEIGHT (e.g. pickscore=1,aesthetic=0.5)"


def parse_reward_spec(spec: str) -> list[tuple[str, str | None, float]]:
    """'pickscore@DIR=1,aesthetic=0.5' → [('pickscore', 'DIR', 1.0), ('aesthetic', None, 0.5)].
    Terms are separated by commas, a weight follows the last '=', a folder the first '@' (so a folder name
    may hold neither a comma nor '='). A bad spec raises RewardUnavailable with one line saying what to write."""
    terms = []
    for item in spec.split(","):
        item = item.strip()
        head, weight = item.rsplit("=", 1) if "=" in item else (item, "1")
        name, _, folder = head.partition("@")
        name = name.strip()
        if name not in REWARDS:
            raise RewardUnavailable(f"unknown reward {name!r} in {spec!r}: choose from {', '.join(REWARDS)}; "
                                    f"{_SPEC_HELP}")
        try:
            w = float(weight)
        except ValueError:
            w = math.nan
        if not (math.isfinite(w) and w > 0):
            raise RewardUnavailable(f"the weight of {name!r} must be a number > 0, got {weight.strip()!r}: "
                                    f"{_SPEC_HELP}")
        if any(t[0] == name for t in terms):
            raise RewardUnavailable(f"reward {name!r} appears twice in {spec!r}: give each reward once")
        if "@" in head:
            if "local_dir" not in inspect.signature(REWARDS[name]).parameters:
                takes = [n for n, f in REWARDS.items() if "local_dir" in inspect.signature(f).parameters]
                raise RewardUnavailable(f"reward {name!r} has no model to load from a folder (@DIR works for "
                                        f"{', '.join(takes)})")
            if not os.path.isdir(folder):
                raise RewardUnavailable(f"{name}@{folder}: no such folder (give the folder that holds the {name} "
                                        "model)")
        terms.append((name, folder or None, w))
    return terms


def load_reward(spec: str, device="cpu"):
    """The reward function of a --reward spec: each named reward built once, summed with its weight.

    A single reward with weight 1 is returned as its factory made it (its own metrics included). A sum
    also reports its components in `metrics` ({'score': R, 'pickscore': …, 'aesthetic': …}, and a
    component's own metrics as 'NAME/KEY'). The weights
    are not normalised: keep their sum near 1 to keep R in [0, 1], the scale VGPO's anchor assumes."""
    terms = parse_reward_spec(spec)
    built = [(name, w, REWARDS[name](device, local_dir=folder) if folder else REWARDS[name](device))
             for name, folder, w in terms]
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][2]

    def fn(images, prompts, metadata):
        return sum(w * f(images, prompts, metadata) for _, w, f in built)

    def metrics(images, prompts, metadata):
        # the mean of a weighted sum is the weighted sum of the means; a component with metrics of its own
        # (shapes: strict accuracy by category) keeps them under its name
        out = {}
        for name, _, f in built:
            if hasattr(f, "metrics"):
                own = f.metrics(images, prompts, metadata)
                out[name] = own.pop("score")
                out.update({f"{name}/{k}": v for k, v in own.items()})
            else:
                out[name] = float(f(images, prompts, metadata).mean())
        return {"score": sum(w * out[name] for name, w, _ in built), **out}

    def check_prompts(pairs):
        for _, _, f in built:
            if hasattr(f, "check_prompts"):
                f.check_prompts(pairs)

    fn.metrics, fn.check_prompts = metrics, check_prompts
    return fn
