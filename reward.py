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
| geneval | GenEval's rules on Mask2Former instances, CLIP ViT-L/14 colours: Flow-GRPO's partial credit | [0, 1] |
| geneval_strict | the same rules, exact 0/1: every object count exact, every colour and position right | {0, 1} |
"""
from __future__ import annotations

import inspect
import contextlib
import dataclasses
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


def shapes_reward(device="cpu", strict_weight: float = 0.5, soft: bool = False):
    """The toy world's exact verifier: ½·(partial credit) + ½·(strict 0/1 score), in [0, 1]; with `soft`, the
    strict score times how cleanly the scene is drawn (shapes.soft_scores: a continuous reward, as PickScore).

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
        metas = metas_of(prompts, metadata)
        return torch.from_numpy(shapes.soft_scores(images, metas) if soft else mix(*shapes.verify(images, metas)))

    def metrics(images, prompts, metadata):
        metas = metas_of(prompts, metadata)
        partial, strict = shapes.verify(images, metas)
        cats = np.array([m["category"] for m in metas])
        score = shapes.soft_scores(images, metas) if soft else mix(partial, strict)
        out = {"score": float(score.mean()), "partial_credit": float(partial.mean())}
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


def _reward_dtype(dtype) -> torch.dtype:
    # fp32 unless asked (--reward-dtype fp16), as Flow-GRPO scores PickScore: after ÷26 the images of one group
    # differ by ~1e-2, and those differences are the whole signal of a group-relative advantage
    return dtype or torch.float32


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
    dtype = _reward_dtype(dtype)
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
    dtype = _reward_dtype(dtype)
    clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        ratings = [mlp(F.normalize(_image_embeds(clip, clip_pixels(images[s : s + batch_size], processor, device,
                                                                   dtype)), dim=-1))
                   for s in range(0, len(images), batch_size)]
        return (torch.cat(ratings) / 10).clamp(min=0).cpu()  # ≥ 0 as every reward (real ratings are ≥ 1)

    return fn


# ----------------------------------------------------------------------------------------------------
# GenEval: object presence, counts, colours and positions, checked on an instance segmenter's output
# ----------------------------------------------------------------------------------------------------
# GenEval (Ghosh et al., 2023) scores an image by rules on detected objects. The rules below are a pure
# function of the detections (boxes, class names, scores, colours), so tests check them on hand-built
# detections; the models only produce the detections (geneval_instances) and colours (masked_crop → CLIP).
GENEVAL_DETECTOR = "facebook/mask2former-swin-small-coco-instance"  # GenEval's detector family, see geneval()
GENEVAL_CLIP = "openai/clip-vit-large-patch14"  # GenEval's colour classifier (open_clip's ViT-L-14 'openai')
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
# The 80 COCO object classes in the order of every COCO-trained 80-class head (label i is COCO_CLASSES[i]).
# Three are named as a prompt says them (COCO: mouse, remote, keyboard), as GenEval's prompts do.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclasses.dataclass
class Detection:
    """One object found in an image: its COCO class name, box (x0, y0, x1, y1) in pixels (x to the right, y
    down, x1 and y1 exclusive), the detector's confidence in [0, 1], and the colour of its masked crop (None
    where no rule asks for it). `mask` (H, W) bool is the segment the colour is read from; rules never use it."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    color: str | None = None
    mask: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when either is empty)."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def geneval_objects(detections: list[Detection], tag: str, threshold: float = 0.3, counting_threshold: float = 0.9,
                    max_objects: int = 16, max_overlap: float = 1.0) -> dict[str, list[Detection]]:
    """GenEval's rule for which detections are objects: {class: [objects, most confident first]}.

    Per class: the detections scoring above `threshold`, or above `counting_threshold` for a counting prompt (a
    doubtful extra object would turn a right count wrong), the best `max_objects` of them, then greedy
    suppression: an object is dropped when its box overlaps one already kept with IoU ≥ `max_overlap`. GenEval's
    defaults are these values; max_overlap = 1 keeps every object (instance masks already split overlapping ones)."""
    cut = counting_threshold if tag == "counting" else threshold
    out: dict[str, list[Detection]] = {}
    for label in dict.fromkeys(d.label for d in detections):  # classes in order of first appearance
        ranked = sorted((d for d in detections if d.label == label and d.score > cut), key=lambda d: -d.score)
        kept: list[Detection] = []
        for d in ranked[:max_objects]:
            if max_overlap >= 1 or all(box_iou(d.box, k.box) < max_overlap for k in kept):
                kept.append(d)
        if kept:
            out[label] = kept
    return out


def relative_position(box_a, box_b, margin: float = 0.1) -> set[str]:
    """Where box A lies relative to box B, by GenEval's rule, as a subset of GENEVAL_RELATIONS.

    With c the box centres and s = (width_A + width_B, height_A + height_B): o = c_A − c_B, shrunk towards 0 by
    margin·s per axis, o' = sign(o)·max(|o| − margin·s, 0); if o' = 0 (|o'| < 1e-3 on both axes) the boxes are
    too close for any relation; else (dx, dy) = o'/|o| and A is 'left of' B when dx < −½, 'right of' when dx > ½,
    'above' when dy < −½, 'below' when dy > ½ (y grows downwards). Two relations at once are possible (diagonal)."""
    a, b = np.asarray(box_a, dtype=float), np.asarray(box_b, dtype=float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    span = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - margin * span, 0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {rel for rel, on in zip(GENEVAL_RELATIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if on}


def _related(found: list[Detection], targets: list[Detection] | None, relation: str, margin: float) -> bool:
    """Every object of `found` stands in `relation` to every target (False when the targets failed: None)."""
    return targets is not None and all(relation in relative_position(o.box, t.box, margin)
                                       for o in found for t in targets)


def geneval_check(objects: dict[str, list[Detection]], metadata: dict, margin: float = 0.1) -> tuple[bool, bool, float]:
    """GenEval's rules on the objects of one image (geneval_objects) for one prompt's metadata:
    {'tag': category, 'include': [{'class', 'count', 'color'?, 'position'?: [relation, index]}], 'exclude'?: [...]}.
    Returns (correct, exact, partial):

    correct   GenEval's benchmark rule: every include has ≥ count objects of its class; the `count` most
              confident of them all have its colour; each of them stands in `relation` to every object matched
              by include[index] (which must itself have passed); every exclude has < count objects.
    exact     Flow-GRPO's strict reward: the same, but each count must be exact (all objects of the class
              count, so their colours and positions too).
    partial   Flow-GRPO's partial credit: the mean over the prompt's checks of one term each, per include:
              count, max(0, 1 − |count − n|/count) for n objects found; colour, k/count for k objects of the
              colour (0 if the count is wrong); position, 1 if it holds, else 0 (0 if the count is wrong).
              Two departures from Flow-GRPO's reward server, both to keep R in [0, 1] as VGPO's ω = Q/mean(Q)
              needs: the count term is clamped at 0 (there 1 − |1 − 3|/1 = −1 for three objects instead of
              one), and a failed position check is one 0 (there a 0 and then a 1: a two-object prompt with the wrong
              relation gets 3/4 there, 2/3 here)."""
    correct = exact = True
    loose: list[list[Detection] | None] = []  # objects each include matched under each rule, None if it failed
    tight: list[list[Detection] | None] = []
    terms: list[float] = []
    for req in metadata.get("include", []):
        want, color, pos = int(req["count"]), req.get("color"), req.get("position")
        # GenEval's rule: the `want` most confident objects
        found = objects.get(req["class"], [])[:want]
        ok = len(found) == want and (color is None or all(o.color == color for o in found))
        ok = ok and (pos is None or _related(found, loose[pos[1]], pos[0], margin))
        loose.append(found if ok else None)
        correct &= ok
        # the exact rule and its partial credit: all objects of the class
        found = objects.get(req["class"], [])
        ok = len(found) == want
        terms.append(max(0.0, 1 - abs(want - len(found)) / want))
        if color is not None:
            k = sum(o.color == color for o in found) if ok else 0
            terms.append(k / want)
            ok = ok and k == want
        if pos is not None:
            ok = ok and _related(found, tight[pos[1]], pos[0], margin)
            terms.append(float(ok))
        tight.append(found if ok else None)
        exact &= ok
    for req in metadata.get("exclude", []):  # "fewer than count": a counting prompt's "not one more"
        if len(objects.get(req["class"], [])) >= int(req["count"]):
            correct = exact = False
    return correct, exact, sum(terms) / len(terms) if terms else 0.0


def geneval_metadata_error(metadata) -> str | None:
    """Why `metadata` is not a GenEval prompt's (see geneval_check), or None if it is one."""
    if not isinstance(metadata, dict) or metadata.get("tag") not in GENEVAL_CATEGORIES:
        return f"no 'tag' among {', '.join(GENEVAL_CATEGORIES)}"
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        return "no 'include' list"
    for i, req in enumerate(include + list(metadata.get("exclude", []))):
        if not isinstance(req, dict) or req.get("class") not in COCO_CLASSES:
            return f"class {req.get('class') if isinstance(req, dict) else req!r} is not one of the 80 COCO classes"
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            return f"count {req.get('count')!r} of {req['class']!r} is not an integer ≥ 1"
        if req.get("color", GENEVAL_COLORS[0]) not in GENEVAL_COLORS:
            return f"colour {req['color']!r} is not one of {', '.join(GENEVAL_COLORS)}"
        pos = req.get("position")
        if pos is not None and not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in GENEVAL_RELATIONS
                                    and isinstance(pos[1], int) and 0 <= pos[1] < i < len(include)):
            return f"position {pos!r} is not [relation, index of an earlier include]"
    return None


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the detector was trained with


@torch.no_grad()
def geneval_instances(model, images: torch.Tensor, size: int = 800, max_size: int = 1333,
                      min_score: float = 0.0) -> list[list[Detection]]:
    """A Mask2Former instance segmenter's objects: (N, 3, H, W) in [0, 1] → per image, the candidate objects
    scoring above `min_score`, each a Detection with its COCO class, score, box and (H, W) mask.

    GenEval's test-time pipeline (mmdetection's Mask2Former), computed batched on the model's device: resize
    so that the short side is `size` and the long side at most `max_size` (bilinear), normalise with ImageNet's
    mean and std, zero-pad to a multiple of 32. Then, with p (Q, K) the softmax over K classes + 'no object'
    of the Q queries, the Q most probable (query, class) pairs are the candidates; a candidate's mask is its
    query's mask logits upsampled to the image, > 0; its score is p × the mean sigmoid of those logits inside
    the mask (how sure the model is of the mask itself); its box is the mask's bounding box."""
    device = next(model.parameters()).device
    x = images.detach().to(device=device, dtype=torch.float32).clamp(0, 1)
    h, w = x.shape[-2:]
    scale = min(size / min(h, w), max_size / max(h, w))
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = (x - x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ph, pw = -(-nh // 32) * 32, -(-nw // 32) * 32  # the backbone halves the size five times
    out = model(pixel_values=F.pad(x, (0, pw - nw, 0, ph - nh)))  # padded with 0: the mean colour, as mmdetection
    probs = out.class_queries_logits.float().softmax(-1)[..., :-1]  # (N, Q, K): the last class is 'no object'
    n_queries, n_classes = probs.shape[1:]
    cols, rows = torch.arange(w, device=device), torch.arange(h, device=device)
    found = []
    for p, logits in zip(probs, out.masks_queries_logits.float()):  # one image: (Q, K), (Q, h', w')
        top, pair = p.flatten().topk(n_queries)
        keep = top > min_score  # the score below is p × a quality ≤ 1: a pair with p ≤ min_score cannot pass
        top, pair = top[keep], pair[keep]
        # mask logits at the padded input's size, the padding cut off, then at the image's own size
        m = F.interpolate(logits[pair // n_classes][None], size=(ph, pw), mode="bilinear", align_corners=False)
        m = F.interpolate(m[:, :, :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)[0]  # (k, H, W)
        masks = m > 0
        area = masks.flatten(1).sum(1)
        scores = top * (m.sigmoid() * masks).flatten(1).sum(1) / area.clamp(min=1)
        on_x, on_y = masks.any(1), masks.any(2)  # (k, W), (k, H): the columns and rows the mask covers
        boxes = torch.stack([torch.where(on_x, cols, w).amin(1), torch.where(on_y, rows, h).amin(1),
                             torch.where(on_x, cols + 1, 0).amax(1), torch.where(on_y, rows + 1, 0).amax(1)], 1)
        found.append([Detection(COCO_CLASSES[int(c)], tuple(b), float(s), mask=mk) for c, b, s, mk, a in
                      zip(pair % n_classes, boxes.tolist(), scores.tolist(), masks, area.tolist())
                      if a > 0 and s > min_score])  # an empty mask is no object
    return found


GENEVAL_COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
                           "a photo of a {color} object")  # GenEval's zero-shot colour prompts


def masked_crop(image: torch.Tensor, obj: Detection, background: float = 0.6) -> torch.Tensor:
    """What GenEval shows CLIP to read an object's colour: the image, grey (#999999 = 0.6) outside the object's
    mask, cropped to its box. (3, H, W) in [0, 1] → (3, y1 − y0, x1 − x0)."""
    x0, y0, x1, y1 = (int(v) for v in obj.box)
    img = image if obj.mask is None else torch.where(obj.mask.to(image.device), image, image.new_tensor(background))
    return img[:, y0:y1, x0:x1]


def _coco_mismatch(id2label: dict) -> str:
    """'' if a detector's class names are COCO_CLASSES in order (or generic LABEL_i names), else the first
    that is not. Spellings differ between codebases ('mouse', 'hair dryer'), so a name passes if, letters
    only, it contains or is contained in ours or starts with the same five letters."""
    names = {int(i): "".join(ch for ch in str(n).lower() if ch.isalpha()) for i, n in id2label.items()}
    for i, ours in enumerate(COCO_CLASSES):
        theirs, ours = names.get(i, ""), "".join(ch for ch in ours if ch.isalpha())
        if theirs.startswith("label"):
            return ""  # a model built from a config without names: nothing to compare
        if not theirs or not (theirs in ours or ours in theirs or theirs[:5] == ours[:5]):
            return f"; class {i} is {id2label.get(i, id2label.get(str(i)))!r}, COCO's is {COCO_CLASSES[i]!r}"
    return ""


@contextlib.contextmanager
def _quiet_loading():
    """transformers' notes (a missing torchvision, …) and progress bars while models load: a run refused after
    loading, for prompts the reward cannot score, ends with our one line alone."""
    import logging

    from transformers.utils import logging as tf_logging

    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub")]
    levels, bars = [lg.level for lg in loggers], tf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            tf_logging.enable_progress_bar()


def geneval(device="cpu", local_dir=None, *, strict: bool = False, detector=None, clip=None, processor=None,
            dtype=None, batch_size: int = 16, size: int = 800):
    """GenEval's compositional rules (geneval_check) on the objects an instance segmenter finds, colours read by
    CLIP. R = partial credit in [0, 1] (Flow-GRPO's training reward), or with `strict` (geneval_strict) the exact
    0/1 score.

    Which R to train on: Flow-GRPO trains on the partial credit (its GenEval result, 0.63 → 0.95, and the VGPO
    paper's 0.96 come from it). It is dense (a count one off still pays), so fewer groups of G samples score all
    alike than under the 0/1 score, and its count term charges every extra object, so unlike the toy world's
    partial credit it cannot be raised by adding objects. `metrics` reports both, and GenEval's own benchmark
    rule as `strict_accuracy` (mean over the six categories, as GenEval averages its tasks; per category as
    'strict/<category>'); the exact rule is 'exact_accuracy' and 'exact/<category>'.

    Detector: Mask2Former, Swin-S backbone, COCO instance segmentation (GENEVAL_DETECTOR), the architecture and
    training data of GenEval's own detector (mmdetection's mask2former_swin-s COCO checkpoint: box AP 49.3, mask
    AP 46.1). Its scores are class probability × mask quality, the scale GenEval's thresholds (0.3; 0.9 for
    counting) were set on, and its masks give the colour step GenEval's masked crops. Of the others transformers
    loads, RT-DETR-R50 has a higher box AP (53.1) and runs several times faster on a CPU, but has no masks and
    scores on another scale; DETR-R50 (42.0) is less accurate; the open-vocabulary Grounding DINO-T (48.4
    zero-shot) and OWLv2-B/16 are slower (results/geneval-detectors.md, `python -m tools.bench detectors`). Fidelity to
    the benchmark the paper reports won over speed. Its cost on a GPU is not measured yet; VGPO scores T
    previews per image, so it may matter there: `size` below trades GenEval's 800-px input for speed.

    Colours: CLIP ViT-L/14 (GENEVAL_CLIP, the OpenAI weights GenEval loads through open_clip) on masked_crop of
    each object, zero-shot over GENEVAL_COLORS: the class is argmax_c cos(image, t_c), t_c the renormalised mean
    of the unit text embeddings of GENEVAL_COLOR_TEMPLATES for colour c and the object's class. Only objects a
    colour rule looks at are classified.

    `detector`, `clip`, `processor` (CLIP's tokenizer and image pre-processing): hub ids, folders or objects;
    `local_dir` (geneval@DIR) holds the detector in DIR/detector and CLIP with its processor in DIR/clip. The
    detector's label i must be COCO_CLASSES[i]: checked by its class names where its config has them.
    Images are segmented `batch_size` at a time with the short side resized to `size` (GenEval's 800)."""
    tf = _transformers()
    if local_dir:
        missing = [sub for sub in ("detector", "clip") if not os.path.isdir(os.path.join(local_dir, sub))]
        if missing:
            raise RewardUnavailable(
                f"geneval@{local_dir}: the folder needs detector/ ({GENEVAL_DETECTOR}) and clip/ ({GENEVAL_CLIP}); "
                f"{' and '.join(missing)}/ missing: `hf download {GENEVAL_DETECTOR} --local-dir "
                f"{os.path.join(local_dir, 'detector')}`, `hf download {GENEVAL_CLIP} --local-dir "
                f"{os.path.join(local_dir, 'clip')}`")
        detector, clip = detector or os.path.join(local_dir, "detector"), clip or os.path.join(local_dir, "clip")
    sources = {"detector": (tf.Mask2FormerForUniversalSegmentation, detector or GENEVAL_DETECTOR),
               "clip": (tf.CLIPModel, clip or GENEVAL_CLIP)}
    models, absent = {}, []
    for key, (cls, source) in sources.items():  # both tried, so that one message names every download needed
        try:
            with _quiet_loading():
                models[key] = _pretrained(cls, source, "geneval")
        except RewardUnavailable:
            if not isinstance(source, str) or os.path.isdir(source):
                raise  # a folder that holds no model: its own message
            absent.append(source)
    if absent:
        commands = " and ".join(f"`hf download {a}`" for a in absent)
        raise RewardUnavailable(
            f"reward 'geneval' needs {' and '.join(absent)} from the Hugging Face hub, neither in the local cache nor "
            f"downloadable here: run {commands} where the hub is reachable (into the Hugging Face cache), or "
            "download the detector into DIR/detector and CLIP into DIR/clip (`hf download ID --local-dir ...`) and "
            "use --reward geneval@DIR, or choose another reward")
    clip_dir = sources["clip"][1] if isinstance(sources["clip"][1], (str, os.PathLike)) else None
    det, clip = models["detector"], models["clip"]
    if det.config.num_labels != len(COCO_CLASSES) or _coco_mismatch(det.config.id2label):
        raise RewardUnavailable(
            f"reward 'geneval': the detector's classes are not COCO's 80 object classes in COCO's order "
            f"({det.config.num_labels} classes{_coco_mismatch(det.config.id2label)}): give a COCO "
            f"instance-segmentation Mask2Former such as {GENEVAL_DETECTOR}")
    with _quiet_loading():
        processor = _pretrained(tf.AutoProcessor, processor or (clip_dir if _has_processor(clip_dir) else GENEVAL_CLIP),
                                "geneval")
    dtype = _reward_dtype(dtype)
    # the detector in fp32 as in GenEval: its scores are compared with fixed thresholds
    det = det.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)
    max_len = min(processor.tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
    color_texts: dict[str, torch.Tensor] = {}  # class → (colours, D) zero-shot weights, computed once per class

    @torch.no_grad()
    def text_weights(label: str) -> torch.Tensor:
        if label not in color_texts:
            texts = [t.format(color=c, object=label) for c in GENEVAL_COLORS for t in GENEVAL_COLOR_TEMPLATES]
            tok = processor.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                                      return_tensors="pt").to(device)
            emb = clip.text_projection(clip.text_model(input_ids=tok.input_ids,
                                                       attention_mask=tok.attention_mask).pooler_output).float()
            emb = F.normalize(emb, dim=-1).view(len(GENEVAL_COLORS), len(GENEVAL_COLOR_TEMPLATES), -1)
            color_texts[label] = F.normalize(emb.mean(1), dim=-1)
        return color_texts[label]

    @torch.no_grad()
    def color_scores(crops: list[torch.Tensor], labels: list[str]) -> torch.Tensor:
        """cos(crop's image embedding, t_c) for each crop (3, h, w) of an object of class labels[i]: (n, colours)."""
        pixels = torch.cat([clip_pixels(c[None], processor, device, dtype) for c in crops])  # each crop its own resize
        img = F.normalize(_image_embeds(clip, pixels), dim=-1)  # (n, D)
        weights = torch.stack([text_weights(lb) for lb in labels])  # (n, colours, D)
        return torch.einsum("nd,ncd->nc", img, weights)

    def metadata_of(prompts, metadata) -> list[dict]:
        metadata = list(metadata or [{}] * len(prompts))
        bad = [(p, why) for p, m in zip(prompts, metadata) if (why := geneval_metadata_error(m))]
        if bad:
            raise RewardUnavailable(
                f"reward 'geneval' scores a prompt by its GenEval metadata (a .jsonl row with tag and include: "
                f"[{{class, count, color?, position?}}]) and {len(bad)} prompt(s) have none or a bad one "
                f"(e.g. {bad[0][0]!r}: {bad[0][1]}): use --prompts geneval")
        return metadata

    def evaluate(images, prompts, metadata) -> list[dict]:
        """Per image {'correct', 'exact', 'partial', 'objects'}: geneval_check's three results and the objects
        they were computed on (geneval_objects, colours filled in where a rule reads them)."""
        metas, results = metadata_of(prompts, metadata), []
        for s in range(0, len(images), batch_size):  # bounded memory whatever the caller's batch
            batch, batch_metas = images[s : s + batch_size], metas[s : s + batch_size]
            found = geneval_instances(det, batch, size, min_score=0.3)  # geneval_objects' lowest threshold
            objects = [geneval_objects(f, m["tag"]) for f, m in zip(found, batch_metas)]
            need = [(img, o) for img, objs, m in zip(batch, objects, batch_metas)
                    for cls in dict.fromkeys(r["class"] for r in m["include"] if "color" in r)
                    for o in objs.get(cls, [])]
            if need:
                best = color_scores([masked_crop(img, o) for img, o in need], [o.label for _, o in need]).argmax(-1)
                for (_, o), i in zip(need, best.tolist()):
                    o.color = GENEVAL_COLORS[i]
            for objs, m in zip(objects, batch_metas):
                correct, exact, partial = geneval_check(objs, m)
                results.append({"correct": correct, "exact": exact, "partial": partial, "objects": objs})
        return results

    def fn(images, prompts, metadata):
        key = "exact" if strict else "partial"
        return torch.tensor([float(r[key]) for r in evaluate(images, prompts, metadata)], dtype=torch.float32)

    def metrics(images, prompts, metadata):
        results = evaluate(images, prompts, metadata)
        cats = np.array([m["tag"] for m in metadata_of(prompts, metadata)])
        table = {k: np.array([float(r[k]) for r in results]) for k in ("correct", "exact", "partial")}
        out = {"score": float(table["exact" if strict else "partial"].mean()),
               "partial_credit": float(table["partial"].mean())}
        for name, key in (("strict", "correct"), ("exact", "exact")):
            per_cat = {c: float(table[key][cats == c].mean()) for c in GENEVAL_CATEGORIES if (cats == c).any()}
            out[f"{name}_accuracy"] = float(np.mean(list(per_cat.values())))  # GenEval: the mean over categories
            out.update({f"{name}/{c}": v for c, v in per_cat.items()})
        return out

    fn.metrics, fn.evaluate, fn.color_scores = metrics, evaluate, color_scores
    fn.check_prompts = lambda pairs: metadata_of([p for p, _ in pairs], [m for _, m in pairs])
    return fn


REWARDS = {
    "shapes": shapes_reward,
    # GenEval's strict 0/1 score alone: sparse, so many groups are all-0 or all-1 (reward-diversity depletion)
    "shapes_strict": lambda device="cpu": shapes_reward(device, strict_weight=1.0),
    # strict × how cleanly the scene is drawn: continuous, so a mastered prompt's group differs by little, not 0
    "shapes_soft": lambda device="cpu": shapes_reward(device, soft=True),
    "jpeg_compressibility": jpeg_compressibility,
    "ocr": ocr,
    "pickscore": pickscore,
    "aesthetic": aesthetic,
    "geneval": geneval,
    # the exact 0/1 score: sparse, as shapes_strict; geneval's partial credit is Flow-GRPO's training reward
    "geneval_strict": lambda device="cpu", local_dir=None, dtype=None: geneval(device, local_dir, strict=True,
                                                                                 dtype=dtype),
}
# The images each reward can score: 'toy' (the shapes world's 32×32 scenes, --model tiny), 'photo' (natural
# images: SD3-family models) or 'any'. vgpo refuses a reward that cannot score the model's images at start-up.
IMAGES = {"shapes": "toy", "shapes_strict": "toy", "shapes_soft": "toy", "jpeg_compressibility": "any", "ocr": "photo",
          "pickscore": "photo", "aesthetic": "photo", "geneval": "photo", "geneval_strict": "photo"}


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


def load_reward(spec: str, device="cpu", dtype=None):
    """The reward function of a --reward spec: each named reward built once, summed with its weight. `dtype`
    (default fp32) goes to the rewards that run a CLIP model.

    A single reward with weight 1 is returned as its factory made it (its own metrics included). A sum
    also reports its components in `metrics` ({'score': R, 'pickscore': …, 'aesthetic': …}, and a
    component's own metrics as 'NAME/KEY'). The weights
    are not normalised: keep their sum near 1 to keep R in [0, 1], the scale VGPO's anchor assumes."""
    terms = parse_reward_spec(spec)
    def build(name, folder):
        kw = {"local_dir": folder} if folder else {}
        if dtype is not None and "dtype" in inspect.signature(REWARDS[name]).parameters:
            kw["dtype"] = dtype
        return REWARDS[name](device, **kw)

    built = [(name, w, build(name, folder)) for name, folder, w in terms]
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
