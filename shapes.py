"""The toy world: coloured shapes, GenEval-style prompts, an exact verifier and a tiny flow model.

Nothing of Stable Diffusion 3.5 runs on a laptop CPU, and model hubs may be out of reach. This file
is a whole text-to-image world small enough to train, fine-tune and test on two CPU cores, built so
that the RL code in `vgpo.py` takes the same path it takes on SD3.5:

- a scene grammar with GenEval's six categories (single object, two objects, counting, colours,
  position, colour attribution) over circles, squares and triangles in red, green, blue and yellow;
- a renderer that draws random 32x32 scenes matching a prompt (the pretraining data): the image is a
  4x4 grid of 8-pixel cells, each holding at most one 6-pixel object, and a cell is one token of the model;
- a verifier that reads a generated image (per-colour masks, connected components, shape from fill
  ratio and top/bottom asymmetry, centroids for relations) and returns GenEval-style partial credit
  (fraction of requirements met) and a strict 0/1 score;
- a fixed train/test prompt split whose test prompts are held-out combinations (a colour with a shape,
  a count with a coloured shape, a relation between two shapes...) never seen in training;
- the model: diffusers' `SD3Transformer2DModel` (the MMDiT of SD3.5) at 3.8 M parameters working
  directly on pixels (no VAE), and a small learned prompt encoder standing in for CLIP + T5;
- `python shapes.py pretrain`: flow-matching pretraining that reproduces the committed checkpoint.

Only the single-object category shares its three prompts ("a circle", ...) between train and test:
there is no combination in it to hold out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage

# ----------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------
IMAGE_SIZE = 32
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CELL = 8  # the model's patch size: the image is a 4×4 grid of cells, each holding at most one object
OBJECT_SIZE = 6  # side of an object's bounding box, centred in its cell (2 px between neighbours)
MIN_AREA = 6  # components smaller than this are noise, not objects
MAX_STRAY = 8  # lit pixels outside the objects that a clean image may have (anti-aliasing-like specks)
CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "shapes-tiny.safetensors")


def _obj(shape, color=None, count=1):
    return {"shape": shape, "color": color, "count": count}


def _name(o):
    """'a red circle', 'three circles', 'a square'."""
    plural = "s" if o["count"] > 1 else ""
    words = [NUMBERS[o["count"]]] + ([o["color"]] if o["color"] else []) + [o["shape"] + plural]
    return " ".join(words)


def _all_prompts():
    """Every prompt of the grammar as (category, metadata, is_test), in a fixed order.

    The test rule in each category is a fixed arithmetic pattern over the indices, chosen so that
    every colour, shape, count and relation still appears in training: the test prompts are new
    *combinations* of known words, as in GenEval.
    """
    C, S = list(COLORS), SHAPES
    pairs = [(a, b) for a, b in itertools.permutations(range(3), 2)]  # ordered pairs of distinct shapes
    out = []
    for si, s in enumerate(S):  # "a circle": nothing to hold out, so test = train
        out.append(("single_object", {"objects": [_obj(s)]}, None))
    for a, b in pairs:  # "a circle and a square": the reversed order is held out
        out.append(("two_object", {"objects": [_obj(S[a]), _obj(S[b])]}, a > b))
    for n in (2, 3, 4):  # "three red circles"
        for ci, c in enumerate(C):
            for si, s in enumerate(S):
                out.append(("counting", {"objects": [_obj(s, c, n)]}, (ci + si + n) % 4 == 0))
    for ci, c in enumerate(C):  # "a red circle"
        for si, s in enumerate(S):
            out.append(("colors", {"objects": [_obj(s, c)]}, (ci + si) % 4 == 0))
    for pi, (a, b) in enumerate(pairs):  # "a circle left of a square"
        for ri, r in enumerate(RELATIONS):
            out.append(("position", {"objects": [_obj(S[a]), _obj(S[b])], "relation": r}, (pi + ri) % 4 == 0))
    for pi, (a, b) in enumerate(pairs):  # "a red circle and a blue square"
        for c1, c2 in itertools.permutations(range(4), 2):
            meta = {"objects": [_obj(S[a], C[c1]), _obj(S[b], C[c2])]}
            out.append(("color_attr", meta, (pi + c1 + 2 * c2) % 4 == 0))
    prompts = []
    for cat, meta, is_test in out:
        meta["category"] = cat
        meta.setdefault("relation", None)
        names = [_name(o) for o in meta["objects"]]
        text = f"{names[0]} {meta['relation']} {names[1]}" if meta["relation"] else " and ".join(names)
        prompts.append((text, meta, is_test))
    return prompts


PROMPTS = _all_prompts()
METADATA = {text: meta for text, meta, _ in PROMPTS}
TRAIN_PROMPTS = [t for t, _, test in PROMPTS if test in (False, None)]
TEST_PROMPTS = [t for t, _, test in PROMPTS if test in (True, None)]
VOCAB = ["<pad>", "<bos>"] + sorted({w for t in METADATA for w in t.split()})


def parse_prompt(prompt: str) -> dict:
    """Metadata (category, objects, relation) of a prompt of the grammar; ValueError otherwise."""
    try:
        return METADATA[prompt.strip()]
    except KeyError:
        raise ValueError(f"{prompt!r} is not a prompt of the shapes world (see shapes.PROMPTS)") from None


def sampling_weights(prompts: list[str]) -> np.ndarray:
    """Probabilities that make every category equally likely (else counting and colour attribution,
    with the most prompts, would dominate and single objects would be rare)."""
    cats = [parse_prompt(p)["category"] for p in prompts]
    per_cat = {c: cats.count(c) for c in set(cats)}
    w = np.array([1.0 / (len(per_cat) * per_cat[c]) for c in cats])
    return w / w.sum()


def eval_prompt_list(min_per_prompt: int = 6, per_category: int = 100) -> list[str]:
    """The held-out evaluation set: every test prompt, repeated so that each category has at least
    `per_category` images and each prompt at least `min_per_prompt` (622 images by default)."""
    out = []
    for cat in CATEGORIES:
        ps = [p for p in TEST_PROMPTS if METADATA[p]["category"] == cat]
        k = max(min_per_prompt, math.ceil(per_category / len(ps)))
        out += [p for p in ps for _ in range(k)]
    return out


# ----------------------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------------------
def shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean (s, s) mask of a shape filling an s x s box (pixel centres inside the shape)."""
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    c = s / 2
    if shape == "square":
        return np.ones((s, s), bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    if shape == "triangle":  # apex up, base down
        return np.abs(xx - c) <= yy / 2 + 0.25
    raise ValueError(shape)


def _centroid(shape, s, box):
    ys, xs = np.nonzero(shape_mask(shape, s))
    return box[0] + xs.mean() + 0.5, box[1] + ys.mean() + 0.5


def _relation_holds(a, b, relation, margin):
    """Is the object centred at a (x, y) `relation` the one at b? Dominant axis decides, as GenEval."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    d_main, d_other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return d_main > margin and abs(d_main) > abs(d_other)


def render(meta: dict, rng: np.random.Generator) -> np.ndarray:
    """A random scene satisfying `meta`: (3, 32, 32) float32 in [0, 1], black background."""
    for _ in range(1000):  # rejection sampling of a layout; a valid one is found in a few tries
        objs = []
        for o in meta["objects"]:
            for _ in range(o["count"]):
                color = o["color"] or list(COLORS)[rng.integers(len(COLORS))]
                objs.append((o["shape"], color, OBJECT_SIZE))
        # One object per cell of the 4×4 grid, and a cell is exactly one token of the tiny transformer
        # (patch size 8). Earlier versions with free positions and 4-pixel patches never learned coherent
        # shapes in minutes of CPU (samples were patch-sized confetti): an object spread over several
        # tokens needs the attention to coordinate them. Here what an object *is* is one token's job,
        # while how many there are and where they stand needs all tokens to agree: counting and
        # position stay the hard part, as they are for SD3.5 on GenEval.
        cells = rng.choice((IMAGE_SIZE // CELL) ** 2, size=len(objs), replace=False)
        offset = (CELL - OBJECT_SIZE) // 2
        boxes = [(int(c % (IMAGE_SIZE // CELL)) * CELL + offset, int(c // (IMAGE_SIZE // CELL)) * CELL + offset, s)
                 for c, (_, _, s) in zip(cells, objs)]
        if meta.get("relation"):  # centres of mass, as the verifier measures them
            ca, cb = (_centroid(objs[i][0], objs[i][2], boxes[i]) for i in (0, 1))
            if not _relation_holds(ca, cb, meta["relation"], margin=6):
                continue
        img = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        for (shape, color, s), (x0, y0, _) in zip(objs, boxes):
            m = shape_mask(shape, s)
            for ch, val in enumerate(COLORS[color]):
                img[ch, y0 : y0 + s, x0 : x0 + s][m] = val
        return img
    raise RuntimeError(f"could not lay out {meta}")


# ----------------------------------------------------------------------------------------------------
# Verifier
# ----------------------------------------------------------------------------------------------------
_COLOR_CODE = {name: int(r > 0.5) + 2 * int(g > 0.5) + 4 * int(b > 0.5) for name, (r, g, b) in COLORS.items()}


def detect(image: np.ndarray) -> list[dict]:
    """Objects in a (3, H, W) image in [0, 1]: colour, shape (or None), centre x, y and area.

    Each pixel's colour is its RGB thresholded at 0.5 (the four colours are corners of the RGB cube, so
    this is exact on renders and forgiving on generated images); each colour's connected components
    (4-connectivity) of at least MIN_AREA pixels are objects. Shape: a triangle has much less mass in
    the top half of its box than in the bottom half; otherwise the fill ratio of the box separates a
    square (~1.0) from a circle (~0.8).
    """
    bits = image > 0.5
    code = bits[0] * 1 + bits[1] * 2 + bits[2] * 4
    objects = []
    for name, k in _COLOR_CODE.items():
        labels, n = ndimage.label(code == k)
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels[sl] == i
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            h, w = comp.shape
            rows = comp.sum(1)
            top, bottom = rows[: h // 2].sum(), rows[(h + 1) // 2 :].sum()
            fill = area / (h * w)
            if max(h, w) > 1.6 * min(h, w):
                shape = None  # elongated: two merged objects or a smear
            elif top < 0.6 * bottom:
                shape = "triangle"
            elif fill >= 0.95:  # a 6-pixel circle fills 0.89 of its box
                shape = "square"
            elif fill >= 0.65:
                shape = "circle"
            else:
                shape = None
            ys, xs = np.nonzero(comp)
            objects.append({"color": name, "shape": shape, "x": sl[1].start + xs.mean() + 0.5,
                            "y": sl[0].start + ys.mean() + 0.5, "area": area})
    return objects


def requirements(objects: list[dict], meta: dict, stray: int = 0) -> list[bool]:
    """GenEval-style checks of a prompt against detected objects; partial credit = their mean.

    Every category ends with a *clean* check: exactly as many objects as the prompt asks for and at most
    MAX_STRAY lit pixels outside them. Without it, an image full of coloured confetti contains a circle, a
    square and a triangle of every colour somewhere and passes most checks: a prototype policy learned
    exactly that. (GenEval's object detector does not see confetti as objects; this verifier must say so.)
    """
    return _content_checks(objects, meta) + [
        len(objects) == sum(o["count"] for o in meta["objects"]) and stray <= MAX_STRAY]


def _content_checks(objects, meta):
    def match(o, spec):
        return o["shape"] == spec["shape"] and (spec["color"] is None or o["color"] == spec["color"])

    specs = meta["objects"]
    found = [[o for o in objects if match(o, s)] for s in specs]
    cat = meta["category"]
    if cat in ("single_object", "two_object", "color_attr"):
        return [len(f) > 0 for f in found]
    if cat == "counting":  # the kind is there, and exactly as many as asked
        return [len(found[0]) > 0, len(found[0]) == specs[0]["count"]]
    if cat == "colors":  # the shape is there, and in the asked colour
        return [any(o["shape"] == specs[0]["shape"] for o in objects), len(found[0]) > 0]
    if cat == "position":
        rel = any(_relation_holds((a["x"], a["y"]), (b["x"], b["y"]), meta["relation"], margin=2)
                  for a in found[0] for b in found[1] if a is not b)
        return [len(found[0]) > 0, len(found[1]) > 0, rel]
    raise ValueError(cat)


def verify(images, metas: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Partial credit in [0, 1] and strict 0/1 score for each of N images (N, 3, H, W) in [0, 1]."""
    images = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    partial, strict = np.zeros(len(metas), np.float32), np.zeros(len(metas), np.float32)
    for i, (img, meta) in enumerate(zip(images, metas)):
        objects = detect(img)
        stray = int((img > 0.5).any(0).sum()) - sum(o["area"] for o in objects)  # lit pixels in no object
        req = requirements(objects, meta, stray)
        partial[i], strict[i] = np.mean(req), float(all(req))
    return partial, strict


# ----------------------------------------------------------------------------------------------------
# The tiny model: SD3's MMDiT on pixels, and a prompt encoder standing in for CLIP + T5
# ----------------------------------------------------------------------------------------------------
MAX_TOKENS = 10  # "<bos> a yellow triangle and a green square" is 8 tokens
TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE, patch_size=CELL, in_channels=3, out_channels=3,  # 4x4 = 16 image tokens
    # width 6 × 32 = 192 = 8·8·3, the size of one patch: at high noise the velocity is mostly the noise
    # itself, which a narrower model cannot pass through its patch embedding (loss stalled at ~0.45)
    num_layers=3, attention_head_dim=32, num_attention_heads=6,
    joint_attention_dim=128, caption_projection_dim=192, pooled_projection_dim=128,
    pos_embed_max_size=IMAGE_SIZE // CELL,
    qk_norm="rms_norm",  # as SD3.5: keeps attention logits bounded at lr 1e-3
)


class PromptEncoder(nn.Module):
    """Word embeddings + one transformer layer -> (sequence (B, L, 128), pooled (B, 128)), like
    SD3's T5 sequence and CLIP pooled embedding. Words outside VOCAB are an error, not silently dropped."""

    def __init__(self, dim: int = 128, layers: int = 1, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = nn.Linear(dim, dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        index = {w: i for i, w in enumerate(VOCAB)}
        ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)  # 0 = <pad>
        for i, p in enumerate(prompts):
            words = ["<bos>"] + p.split()
            unknown = [w for w in words if w not in index]
            if unknown or len(words) > MAX_TOKENS:
                raise ValueError(f"prompt {p!r} is outside the toy vocabulary or too long (words: {unknown})")
            ids[i, : len(words)] = torch.tensor([index[w] for w in words])
        return ids

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(prompts).to(self.pos.device)
        pad = ids == 0
        seq = self.encoder(self.embed(ids) + self.pos, src_key_padding_mask=pad)  # (B, L, D)
        keep = (~pad).unsqueeze(-1).float()
        pooled = self.pool((seq * keep).sum(1) / keep.sum(1))  # (B, D) mean of real tokens
        return seq, pooled


def make_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def load_pretrained(path: str = CHECKPOINT, device="cpu"):
    """(transformer, prompt_encoder) in fp32 and eval mode, from the committed checkpoint."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"toy checkpoint {path} is missing: run `python shapes.py pretrain`")
    state = load_file(path)
    transformer, encoder = make_transformer(), PromptEncoder()
    transformer.load_state_dict({k[12:]: v.float() for k, v in state.items() if k.startswith("transformer.")})
    encoder.load_state_dict({k[8:]: v.float() for k, v in state.items() if k.startswith("encoder.")})
    return transformer.to(device).eval(), encoder.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# Pretraining (rectified flow on rendered scenes) -- `python shapes.py pretrain`
# ----------------------------------------------------------------------------------------------------
def pretrain(steps: int = 3600, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.998,
             seed: int = 0, out: str = CHECKPOINT, evaluate: bool = True, snapshots=()) -> dict:
    """Train the tiny model by flow matching and save its EMA weights (fp16 safetensors, ~4.7 MB).

    x_σ = (1 − σ)·x0 + σ·ε, target velocity ε − x0 (the time direction of vgpo.py), σ uniform,
    10 % empty prompts so that classifier-free guidance is available. Seeded: the same command on the
    same machine writes the same file. `snapshots`: steps at which the EMA weights are also saved
    (beside `out`, as <out>.<step>) and evaluated, to choose the step count; they do not change the run.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    transformer, encoder = make_transformer().train(), PromptEncoder().train()
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    weights = sampling_weights(TRAIN_PROMPTS)
    t0, losses = time.time(), []
    bar = tqdm(range(steps), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        idx = rng.choice(len(TRAIN_PROMPTS), size=batch_size, p=weights)
        prompts = [TRAIN_PROMPTS[i] for i in idx]
        x0 = torch.from_numpy(np.stack([render(METADATA[p], rng) for p in prompts])) * 2 - 1  # (B, 3, H, W) in [-1, 1]
        drop = rng.random(batch_size) < 0.1
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        # uniform σ, not SD3's logit-normal: a briefly trained tiny model needs both ends of the schedule
        # (σ ≈ 1 decides the layout, σ ≈ 0 cleans the edges), which logit-normal almost never samples
        sigma = torch.rand(batch_size).view(-1, 1, 1, 1)
        noise = torch.randn_like(x0)
        x_t = (1 - sigma) * x0 + sigma * noise
        seq, pooled = encoder(prompts)
        v = transformer(x_t, encoder_hidden_states=seq, pooled_projections=pooled,
                        timestep=sigma.flatten() * 1000, return_dict=False)[0]
        loss = ((v - (noise - x0)) ** 2).mean()
        for g in opt.param_groups:  # 50-step linear warm-up, then constant
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (step + 1) / (step + 10))  # short EMA early on, 0.998 later
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step + 1 in snapshots:
            _save_ema(transformer, encoder, ema, params, f"{out}.{step + 1}", steps=step + 1, seed=seed)
            if evaluate:
                print(f"\nsnapshot at step {step + 1}:")
                _report(f"{out}.{step + 1}")
    _save_ema(transformer, encoder, ema, params, out, steps=steps, seed=seed)
    result = {"final_loss": float(np.mean(losses[-50:])), "minutes": (time.time() - t0) / 60, "path": out}
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.1f} MB) after {steps} steps in {result['minutes']:.1f} min; "
          f"final loss (mean of last 50 steps) {result['final_loss']:.4f}")
    if evaluate:
        result.update(_report(out))
    return result


def _save_ema(transformer, encoder, ema, params, path, **info):
    """Write the EMA weights (fp16: half the size, and the RL code computes in fp32) without touching
    the live weights; through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    from safetensors.torch import save_file

    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    state = {f"transformer.{k}": v.half().contiguous() for k, v in transformer.state_dict().items()}
    state.update({f"encoder.{k}": v.half().contiguous() for k, v in encoder.state_dict().items()})
    with torch.no_grad():
        for v, p in zip(live, params):
            p.copy_(v)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = {k: str(v) for k, v in info.items()} | {"config": json.dumps(TRANSFORMER_CONFIG)}
    save_file(state, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def _report(path) -> dict:
    """Held-out strict accuracy of a checkpoint, by category: what an RL run starting from it logs at epoch 0."""
    with torch.random.fork_rng():  # building the model draws initial weights: keep the training RNG untouched
        metrics = held_out_accuracy(path)
    print("base model, held-out prompts, strict accuracy by category:")
    for cat in CATEGORIES:
        print(f"  {cat:14s} {metrics[f'strict/{cat}']:.3f}")
    print(f"  {'overall':14s} {metrics['strict_accuracy']:.3f}  (mean over categories, as GenEval)", flush=True)
    return metrics


# ----------------------------------------------------------------------------------------------------
# The tiny model as a policy (what vgpo's harness loads) and its held-out accuracy
# ----------------------------------------------------------------------------------------------------
EVAL_SEED = 1234  # vgpo.EVAL_SEED, so that the report above prints an RL run's epoch-0 numbers (tested)


def load(path: str = CHECKPOINT, device="cpu") -> dict:
    """The tiny model as harness.Model takes it: transformer, encode (cached), decode, scheduler, latent_shape
    and encoded (the prompt batches encoded, in order). The transformer is trained whole; the prompt encoder
    is frozen, as SD3's text encoders are, so the policy is the same kind of object on both models."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer, encoder = load_pretrained(path, device)
    encoder.requires_grad_(False)
    # SD3's last block only reads the prompt stream (context_pre_only): its prompt-query projection
    # never reaches the output, so it gets no gradient. Freezing it keeps "trainable" honest.
    last = transformer.transformer_blocks[-1].attn
    for unused in (last.add_q_proj, last.norm_added_q):
        unused.requires_grad_(False)
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

    # no resolution shift at 32×32 (SD3.5 uses 3.0 at 512 px to spend more steps at high noise)
    return dict(transformer=transformer, encode=encode, decode=decode,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                latent_shape=(3, IMAGE_SIZE, IMAGE_SIZE), encoded=encoded)


def decode(x: torch.Tensor) -> torch.Tensor:
    """Pixel space: the "latent" (B, 3, 32, 32) is the image in [-1, 1], so decoding is a rescale to [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def held_out_accuracy(path: str = CHECKPOINT, steps: int = 40, batch_size: int = 128, seed: int = EVAL_SEED,
                      prompts: list[str] | None = None) -> dict:
    """{'strict_accuracy': mean over categories (as GenEval), 'strict/<category>': …} of a checkpoint on
    `prompts` (default: eval_prompt_list()). Euler ODE sampling without guidance from noise drawn with `seed`,
    in micro-batches of `batch_size`: vgpo.evaluate's sampler with the toy preset, written out here so that
    this file needs no vgpo (a test checks that both give the same numbers)."""
    m = load(path)
    prompts = prompts or eval_prompt_list()
    m["scheduler"].set_timesteps(steps)
    sigmas = m["scheduler"].sigmas.float()  # σ_0 = 1 > … > σ_T = 0
    noise = torch.randn((len(prompts), *m["latent_shape"]), generator=torch.Generator().manual_seed(seed))
    images = []
    for s in range(0, len(prompts), batch_size):
        x = noise[s : s + batch_size].float()
        seq, pooled = m["encode"](prompts[s : s + batch_size])
        for k in range(steps):  # x ← x + v·(σ_{k+1} − σ_k), time running from noise to data
            v = m["transformer"](x, encoder_hidden_states=seq, pooled_projections=pooled,
                                 timestep=(sigmas[k] * 1000).expand(x.shape[0]), return_dict=False)[0].float()
            x = x + (sigmas[k + 1] - sigmas[k]) * v
        images.append(m["decode"](x))
    _, strict = verify(torch.cat(images), [METADATA[p] for p in prompts])
    cats = np.array([METADATA[p]["category"] for p in prompts])
    per_cat = {c: float(strict[cats == c].mean()) for c in CATEGORIES if (cats == c).any()}
    return {"strict_accuracy": float(np.mean(list(per_cat.values()))),  # GenEval: the mean over categories
            **{f"strict/{c}": v for c, v in per_cat.items()}}


def check_vocabulary(prompts: list[str]) -> None:
    """ValueError unless every prompt uses only the grammar's words and fits the encoder's MAX_TOKENS."""
    unknown = sorted({w for p in prompts for w in p.split() if w not in VOCAB[2:]})
    if unknown or max(len(p.split()) for p in prompts) >= MAX_TOKENS:
        raise ValueError(f"the tiny model knows only the shapes world's words, at most {MAX_TOKENS - 1} per prompt "
                         f"(unknown: {', '.join(unknown[:8]) or 'none'})")


def prompt_weights(prompts: list[str]) -> np.ndarray | None:
    """sampling_weights(prompts) when every prompt is of the grammar; None (uniform) for any other prompts."""
    return sampling_weights(prompts) if all(p in METADATA for p in prompts) else None


def main(argv=None):
    p = argparse.ArgumentParser(description="The shapes toy world.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("pretrain", help="train the tiny model and write checkpoints/shapes-tiny.safetensors")
    pt.add_argument("--steps", type=int, default=3600)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out", default=CHECKPOINT)
    pt.add_argument("--snapshots", default="", help="comma-separated steps at which to also save and evaluate")
    sub.add_parser("prompts", help="print the prompt split")
    a = p.parse_args(argv)
    if a.cmd == "pretrain":
        pretrain(steps=a.steps, seed=a.seed, out=a.out,
                 snapshots={int(s) for s in a.snapshots.split(",") if s})
    else:
        for text, meta, test in PROMPTS:
            print(f"{'test ' if test else 'train' if test is False else 'both '} {meta['category']:14s} {text}")
        print(f"{len(TRAIN_PROMPTS)} train prompts, {len(TEST_PROMPTS)} test prompts, "
              f"{len(eval_prompt_list())} held-out evaluation images")


if __name__ == "__main__":
    main()
