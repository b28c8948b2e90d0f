"""The toy world: coloured shapes, GenEval-style prompts, an exact verifier and a tiny flow model.

Nothing of Stable Diffusion 3.5 runs on a laptop CPU, and model hubs may be out of reach. This file
is a whole text-to-image world small enough to train, fine-tune and test on two CPU cores, built so
that the RL code in `vgpo.py` takes the same path it takes on SD3.5:

- a scene grammar with GenEval's six categories (single object, two objects, counting, colours,
  position, colour attribution) over circles, squares and triangles in red, green, blue and yellow;
- a renderer that draws random 32x32 scenes matching a prompt (the pretraining data): the image is a
  4x4 grid of 8-pixel cells, each holding at most one 6-pixel object;
- a verifier that reads a generated image (per-colour masks, connected components, shape from fill
  ratio and top/bottom asymmetry, centroids for relations) and returns GenEval-style partial credit
  (fraction of requirements met) and a strict 0/1 score;
- a train/test split by meaning: test scenes are held-out combinations (a colour with a shape, a count
  with a coloured shape, a relation between two shapes...), and every phrasing of a scene is in its split;
- the model, SD3's three parts in miniature: a frozen autoencoder with a 16-channel latent at 1/8
  resolution (SD3's VAE; 4x4x16, one latent pixel per cell), diffusers' `SD3Transformer2DModel` (the
  MMDiT of SD3.5) on those latents, and a small learned prompt encoder standing in for CLIP + T5;
- pretraining with caption noise (`near_miss`), so that the base model is capable but unreliable in ways
  the verifier catches: what RL is for;
- `python shapes.py pretrain` reproduces the committed checkpoint; `python shapes.py evaluate` reports a
  checkpoint's (or a fine-tuned run's) held-out accuracy by category over several evaluation-noise seeds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
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
CELL = 8  # the image is a 4×4 grid of cells, each holding at most one object and encoded to one latent pixel
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
    """Every prompt of the grammar as (text, metadata, is_test), in a fixed order.

    The split is by *scene*, not by string: the phrasings of one scene ("a circle and a square" / "a
    square and a circle", "a circle left of a square" / "a square right of a circle", "a red circle and a
    blue square" / "a blue square and a red circle") are always in the same split, so a held-out prompt
    never asks for a picture that a training prompt asked for in other words. In each category a fixed
    arithmetic rule over the scene indices holds out about a quarter of the scenes, chosen so that every
    colour, shape, count and relation still appears in training: test scenes are new *combinations* of
    known words, as in GenEval. The single-object category (three scenes of one word each) has nothing to
    hold out: its prompts are in both splits (is_test None).
    """
    C, S = list(COLORS), SHAPES
    scenes = []  # (category, phrasings: list of metadata, is_test)
    for s in S:  # "a circle"
        scenes.append(("single_object", [{"objects": [_obj(s)]}], None))
    for i, (a, b) in enumerate(itertools.combinations(S, 2)):  # "a circle and a square": 3 scenes
        scenes.append(("two_object", [{"objects": [_obj(a), _obj(b)]}, {"objects": [_obj(b), _obj(a)]}], i == 1))
    for n in (2, 3, 4):  # "three red circles": 36 scenes
        for ci, c in enumerate(C):
            for si, s in enumerate(S):
                scenes.append(("counting", [{"objects": [_obj(s, c, n)]}], (ci + si + n) % 4 == 0))
    for ci, c in enumerate(C):  # "a red circle": 12 scenes
        for si, s in enumerate(S):
            scenes.append(("colors", [{"objects": [_obj(s, c)]}], (ci + si) % 4 == 0))
    inverse = {"left of": "right of", "above": "below"}
    for pi, (a, b) in enumerate(itertools.permutations(S, 2)):  # "a circle left of a square": 12 scenes
        for ri, r in enumerate(inverse):
            scenes.append(("position", [{"objects": [_obj(a), _obj(b)], "relation": r},
                                        {"objects": [_obj(b), _obj(a)], "relation": inverse[r]}], (pi + ri) % 4 == 0))
    for i, (a, b) in enumerate(itertools.combinations(S, 2)):  # "a red circle and a blue square": 36 scenes
        for c1, c2 in itertools.permutations(range(len(C)), 2):
            x, y = _obj(a, C[c1]), _obj(b, C[c2])
            scenes.append(("color_attr", [{"objects": [x, y]}, {"objects": [y, x]}], (i + c1 + 2 * c2) % 4 == 1))
    prompts = []
    for cat, phrasings, is_test in scenes:
        for meta in phrasings:
            meta.update(category=cat, relation=meta.get("relation"))
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


def near_miss(meta: dict, rng: np.random.Generator) -> dict:
    """A scene one edit away from `meta`, in the same category: one shape, colour, count (±1) or relation
    changed, or, for colour attribution, the two colours swapped (the binding error). It never satisfies
    `meta`: pretraining renders it under `meta`'s caption with probability `caption_noise` (see `pretrain`)."""
    objs, relation = [dict(o) for o in meta["objects"]], meta["relation"]
    edits = {"single_object": ["shape"], "two_object": ["shape"], "counting": ["shape", "color", "count"],
             "colors": ["shape", "color"], "position": ["shape", "relation"],
             "color_attr": ["shape", "color", "swap"]}[meta["category"]]
    edit, o = edits[rng.integers(len(edits))], objs[rng.integers(len(objs))]

    def other(options, current):
        options = [x for x in options if x != current]
        return options[rng.integers(len(options))]

    if edit == "shape":
        o["shape"] = other(SHAPES, o["shape"])
    elif edit == "color":
        o["color"] = other(list(COLORS), o["color"])
    elif edit == "count":  # counts 2–4 become 1–5
        o["count"] += 1 if rng.random() < 0.5 else -1
    elif edit == "relation":
        relation = other(RELATIONS, relation)
    else:  # swap the colours of the two objects
        objs[0]["color"], objs[1]["color"] = objs[1]["color"], objs[0]["color"]
    return {**meta, "objects": objs, "relation": relation}


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


def _paint(img: np.ndarray, shape: str, color: str, x0: int, y0: int, s: int) -> None:
    """Draw one object into a (3, H, W) image: its shape's s × s mask at (x0, y0) in its colour."""
    mask = shape_mask(shape, s)
    for ch, val in enumerate(COLORS[color]):
        img[ch, y0 : y0 + s, x0 : x0 + s][mask] = val


def render(meta: dict, rng: np.random.Generator) -> np.ndarray:
    """A random scene satisfying `meta`: (3, 32, 32) float32 in [0, 1], black background."""
    for _ in range(1000):  # rejection sampling of a layout; a valid one is found in a few tries
        objs = []
        for o in meta["objects"]:
            for _ in range(o["count"]):
                color = o["color"] or list(COLORS)[rng.integers(len(COLORS))]
                objs.append((o["shape"], color, OBJECT_SIZE))
        # One object per cell of the 4×4 grid, and a cell is exactly one latent pixel, one token of the tiny
        # transformer. Earlier versions with free positions and 4-pixel patches never learned coherent
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
            _paint(img, shape, color, x0, y0, s)
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


def _objects_and_stray(img: np.ndarray) -> tuple[list[dict], int]:
    """detect(img) and the number of lit pixels in no detected object."""
    objects = detect(img)
    return objects, int((img > 0.5).any(0).sum()) - sum(o["area"] for o in objects)


def fidelity(img: np.ndarray, objects: list[dict]) -> float:
    """How close a (3, H, W) image is to the ideal render of the objects detected in it (detect): 1 − the mean
    absolute pixel difference over their cells, in [0, 1]. 1 means every object is exactly its shape's mask in its
    colour, centred in its cell, with nothing else lit there; a generated image's soft edges and faint specks
    cost a little. An object without a recognised shape, or no object at all, scores 0."""
    if not objects or any(o["shape"] is None for o in objects):
        return 0.0
    ideal, cells = np.zeros_like(img), np.zeros(img.shape[1:], bool)
    offset = (CELL - OBJECT_SIZE) // 2
    for o in objects:
        cx, cy = int(o["x"] // CELL), int(o["y"] // CELL)
        _paint(ideal, o["shape"], o["color"], cx * CELL + offset, cy * CELL + offset, OBJECT_SIZE)
        cells[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 1) * CELL] = True
    return float(1 - np.abs(img - ideal)[:, cells].mean())


def soft_scores(images, metas: list[dict]) -> np.ndarray:
    """strict × fidelity for each of N images: 0 unless the prompt is satisfied, then how cleanly it is drawn.
    A continuous reward, as PickScore is: the samples of a prompt the model has mastered differ by little, but
    never by exactly nothing."""
    images = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    out = np.zeros(len(metas), np.float32)
    for i, (img, meta) in enumerate(zip(images, metas)):
        objects, stray = _objects_and_stray(img)
        out[i] = fidelity(img, objects) if all(requirements(objects, meta, stray)) else 0.0
    return out


def verify(images, metas: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Partial credit in [0, 1] and strict 0/1 score for each of N images (N, 3, H, W) in [0, 1]."""
    images = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    partial, strict = np.zeros(len(metas), np.float32), np.zeros(len(metas), np.float32)
    for i, (img, meta) in enumerate(zip(images, metas)):
        objects, stray = _objects_and_stray(img)
        req = requirements(objects, meta, stray)
        partial[i], strict[i] = np.mean(req), float(all(req))
    return partial, strict


# ----------------------------------------------------------------------------------------------------
# The tiny model: an autoencoder (SD3's VAE), SD3's MMDiT on its latents, and a prompt encoder (CLIP + T5)
# ----------------------------------------------------------------------------------------------------
LATENT_SHAPE = (16, IMAGE_SIZE // CELL, IMAGE_SIZE // CELL)  # (C, H, W): 16 channels at 1/8 resolution, as SD3's VAE
MAX_TOKENS = 10  # "<bos> a yellow triangle and a green square" is 8 tokens
TRANSFORMER_CONFIG = dict(
    sample_size=LATENT_SHAPE[1], patch_size=1, in_channels=LATENT_SHAPE[0], out_channels=LATENT_SHAPE[0],
    num_layers=6, attention_head_dim=32, num_attention_heads=4,  # 16 image tokens of width 128
    joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=LATENT_SHAPE[1],
    qk_norm="rms_norm",  # as SD3.5: keeps attention logits bounded at lr 1e-3
)
ENCODER_LAYERS = 2  # the prompt encoder's depth: binding a colour word to the shape word after it needs attention


class Autoencoder(nn.Module):
    """images (B, 3, 32, 32) in [0, 1] ↔ latents (B, 16, 4, 4), one latent pixel per 8-px cell.

    The toy counterpart of SD3's VAE: the flow model works on its latents and every image, previews
    included, is decoded by it. Encoder: one 8×8 stride-8 convolution and a 1×1 one (a cell holds at most
    one object, so a cell is one latent pixel). Decoder: a per-cell MLP to 8·8·3 values and a sigmoid.
    Latents are normalised as SD3's are, z = (enc(x) − shift)·scale, with the scalars measured on renders,
    so that the flow model's data have unit variance like its noise. Frozen after its own training.
    """

    def __init__(self, hidden: int = 128):
        super().__init__()
        c = LATENT_SHAPE[0]
        self.encoder = nn.Sequential(nn.Conv2d(3, hidden, CELL, stride=CELL), nn.SiLU(), nn.Conv2d(hidden, c, 1))
        self.decoder = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
                                     nn.Conv2d(hidden, 3 * CELL * CELL, 1), nn.PixelShuffle(CELL))
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [0, 1] → normalised latents (B, 16, 4, 4)."""
        return (self.encoder(images * 2 - 1) - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, 4, 4) → images (B, 3, 32, 32) in [0, 1]; fp32."""
        return torch.sigmoid(self.decoder(latents.float() / self.scale + self.shift))


class PromptEncoder(nn.Module):
    """Word embeddings + `layers` transformer layers -> (sequence (B, L, 128), pooled (B, 128)), like
    SD3's T5 sequence and CLIP pooled embedding. Words outside VOCAB are an error, not silently dropped."""

    def __init__(self, dim: int = 128, layers: int = ENCODER_LAYERS, heads: int = 4):
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


def make_transformer(config: dict | None = None):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**(config or TRANSFORMER_CONFIG))


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"toy checkpoint {path} is missing: run `python shapes.py pretrain`")
    try:
        with safe_open(path, "pt") as f:
            info = f.metadata() or {}
            state = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a file of another format
        raise ValueError(f"{path} is not a safetensors checkpoint ({e})") from None
    if not any(k.startswith("autoencoder.") for k in state):
        raise ValueError(f"{path} is not a checkpoint of this shapes world (no autoencoder): "
                         "run `python shapes.py pretrain`")
    return state, info


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def load_pretrained(path: str = CHECKPOINT, device="cpu"):
    """(transformer, prompt_encoder, decode, latent_shape) from the committed checkpoint: the modules in
    fp32 and eval mode; `decode` is the frozen autoencoder's decoder, latents (B, 16, 4, 4) → images
    (B, 3, 32, 32) in [0, 1] (the autoencoder itself is `decode.__self__`)."""
    state, info = _read_checkpoint(path)
    config = json.loads(info.get("config", "null")) or TRANSFORMER_CONFIG
    transformer = make_transformer(config)
    encoder = PromptEncoder(layers=int(info.get("encoder_layers", ENCODER_LAYERS)))
    autoencoder = Autoencoder()
    for module, prefix in ((transformer, "transformer"), (encoder, "encoder"), (autoencoder, "autoencoder")):
        module.load_state_dict(_part(state, prefix))
    autoencoder.requires_grad_(False)
    return (transformer.to(device).eval(), encoder.to(device).eval(), autoencoder.to(device).eval().decode,
            LATENT_SHAPE)


# ----------------------------------------------------------------------------------------------------
# Pretraining -- `python shapes.py pretrain`: the autoencoder, then rectified flow on its latents
# ----------------------------------------------------------------------------------------------------
def train_autoencoder(steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, latent_noise: float = 0.2,
                      seed: int = 0, progress: bool = True) -> Autoencoder:
    """Train the autoencoder on renders of training prompts (and their near misses) and freeze it.

    Loss: MSE(decode(z + latent_noise·ε), x) + 0.01·mean(z²) on raw latents z = enc(x). The noise keeps
    neighbouring latents decoding to the same clean cell (so slightly-off generated latents still give
    clean images, as a VAE's sampling does); the penalty keeps z from growing to make the noise irrelevant.
    Afterwards shift and scale are set to the mean and 1/std of z over 4 096 renders.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ae = Autoencoder().train()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)

    def batch(n):
        metas = [METADATA[TRAIN_PROMPTS[i]] for i in rng.integers(len(TRAIN_PROMPTS), size=n)]
        metas = [near_miss(m, rng) if rng.random() < 0.3 else m for m in metas]
        return torch.from_numpy(np.stack([render(m, rng) for m in metas]))

    bar = tqdm(range(steps), desc="autoencoder", dynamic_ncols=True, disable=not progress)
    for step in bar:
        x = batch(batch_size)
        z = ae.encoder(x * 2 - 1)
        recon = torch.sigmoid(ae.decoder(z + latent_noise * torch.randn_like(z)))
        loss = ((recon - x) ** 2).mean() + 0.01 * (z**2).mean()
        for g in opt.param_groups:  # cosine decay: the last steps sharpen the edges
            g["lr"] = cosine_lr(step, steps, lr, 0.0, warmup=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        z = torch.cat([ae.encoder(batch(512) * 2 - 1) for _ in range(8)])
        ae.shift.fill_(z.mean())
        ae.scale.fill_(1 / z.std())
    return ae.eval().requires_grad_(False)


def cosine_lr(step: int, steps: int, lr: float, lr_min: float, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from lr to lr_min."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# Pretraining samples every category equally often, except these, which are harder (relations and colour
# binding need all tokens to agree) and are seen more often
CATEGORY_BOOST = {"position": 2.0, "color_attr": 2.0}
def pretrain(steps: int = 5000, batch_size: int = 128, lr: float = 1e-3, lr_min: float = 2e-5,
             caption_noise: float = 0.3, sigma_shift: float = 2.0, category_boost: dict | None = None,
             ema_decay: float = 0.999, config: dict | None = None, encoder_layers: int = ENCODER_LAYERS,
             autoencoder_steps: int = 1500, seed: int = 0, out: str = CHECKPOINT, evaluate: bool = True,
             snapshots=(), progress: bool = True) -> dict:
    """Train the autoencoder, then the flow model on its latents; save both (fp16 safetensors).

    Flow matching on latents z0 = enc(render): z_σ = (1 − σ)·z0 + σ·ε, target velocity ε − z0 (the time
    direction of vgpo.py). σ = s·u/(1 + (s − 1)·u), u uniform: SD3's time shift s (`sigma_shift`) puts more
    training at high noise, where the layout (how many objects, where, which colour on which) is decided.
    Caption noise: with probability `caption_noise` the scene rendered for a caption is a near miss of it
    (`near_miss`), so the base makes the systematic, verifiable mistakes that RL then removes: a model that
    learned its data is right about 1 − p of the time on what it can do, which leaves RL room above it.
    `category_boost` (default CATEGORY_BOOST) multiplies the categories' sampling weights. 10 % empty
    prompts make classifier-free guidance available. AdamW with warm-up and cosine decay lr → lr_min; the
    saved weights are an EMA. Seeded: the same command on the same machine writes the same file.
    `snapshots`: steps at which the EMA weights are also saved (as <out>.<step>) and, with `evaluate`,
    evaluated with one evaluation-noise seed, to choose the step count; they do not change the run.
    """
    from tqdm import tqdm

    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    autoencoder = train_autoencoder(steps=autoencoder_steps, seed=seed, progress=progress)
    config = config or TRANSFORMER_CONFIG
    transformer, encoder = make_transformer(config).train(), PromptEncoder(layers=encoder_layers).train()
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    boost = CATEGORY_BOOST if category_boost is None else category_boost
    weights = sampling_weights(TRAIN_PROMPTS) * [boost.get(METADATA[p]["category"], 1.0) for p in TRAIN_PROMPTS]
    weights /= weights.sum()
    info = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, lr_min=lr_min, caption_noise=caption_noise,
                sigma_shift=sigma_shift, category_boost=json.dumps(boost), ema_decay=ema_decay,
                encoder_layers=encoder_layers, autoencoder_steps=autoencoder_steps, config=json.dumps(config))
    losses = []
    bar = tqdm(range(steps), desc="pretrain", dynamic_ncols=True, disable=not progress)
    for step in bar:
        prompts = [TRAIN_PROMPTS[i] for i in rng.choice(len(TRAIN_PROMPTS), size=batch_size, p=weights)]
        scenes = [near_miss(METADATA[p], rng) if rng.random() < caption_noise else METADATA[p] for p in prompts]
        with torch.no_grad():
            z0 = autoencoder.encode(torch.from_numpy(np.stack([render(m, rng) for m in scenes])))  # (B, 16, 4, 4)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        u = torch.rand(batch_size)
        sigma = (sigma_shift * u / (1 + (sigma_shift - 1) * u)).view(-1, 1, 1, 1)
        noise = torch.randn_like(z0)
        z_t = (1 - sigma) * z0 + sigma * noise
        seq, pooled = encoder(prompts)
        v = transformer(z_t, encoder_hidden_states=seq, pooled_projections=pooled,
                        timestep=sigma.flatten() * 1000, return_dict=False)[0]
        loss = ((v - (noise - z0)) ** 2).mean()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, lr_min)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (step + 1) / (step + 10))  # short EMA early on, ema_decay later
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step + 1 in snapshots:
            _save(transformer, encoder, autoencoder, ema, params, f"{out}.{step + 1}", info | {"at_step": step + 1})
            if evaluate:
                print(f"\nsnapshot at step {step + 1} (loss {np.mean(losses[-200:]):.4f}):")
                _report(f"{out}.{step + 1}", seeds=EVAL_SEEDS[:1], clean=False)
    _save(transformer, encoder, autoencoder, ema, params, out, info)
    result = {"final_loss": float(np.mean(losses[-200:])), "minutes": (time.time() - t0) / 60, "path": out}
    print(f"saved {out} ({os.path.getsize(out) / 1e6:.1f} MB) after {steps} steps in {result['minutes']:.1f} min; "
          f"final loss (mean of the last 200 steps) {result['final_loss']:.4f}")
    return result


def _save(transformer, encoder, autoencoder, ema, params, path, info):
    """Write the EMA weights and the autoencoder (fp16: half the size; everything computes in fp32) without
    touching the live weights; through a temporary file, so an interrupted save never leaves a broken one."""
    from safetensors.torch import save_file

    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    state = {}
    for module, prefix in ((transformer, "transformer"), (encoder, "encoder"), (autoencoder, "autoencoder")):
        state.update({f"{prefix}.{k}": v.half().contiguous() for k, v in module.state_dict().items()})
    with torch.no_grad():
        for v, p in zip(live, params):
            p.copy_(v)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path + ".tmp", metadata={k: str(v) for k, v in info.items()})
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------
# The tiny model as a policy (what vgpo's harness loads) and its held-out accuracy -- `python shapes.py evaluate`
# ----------------------------------------------------------------------------------------------------
EVAL_SEED = 1234  # vgpo.EVAL_SEED, so that the report prints an RL run's epoch-0 numbers (tested)
# One evaluation starts every image from the same noise: good for comparing two models, but that noise's
# luck is in both. Comparing runs, report the mean over several evaluation-noise seeds.
EVAL_SEEDS = (EVAL_SEED, EVAL_SEED + 1, EVAL_SEED + 2)


def load(path: str = CHECKPOINT, device="cpu", policy: str | None = None) -> dict:
    """The tiny model as harness.Model takes it: transformer, encode (cached), decode, scheduler, latent_shape
    and encoded (the prompt batches encoded, in order). The transformer is trained whole; the prompt encoder
    is frozen, as SD3's text encoders are, so the policy is the same kind of object on both models.
    `policy`: a fine-tuned transformer.safetensors (what `python vgpo.py` saves) to put into the transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer, encoder, decode, latent_shape = load_pretrained(path, device)
    if policy:
        from safetensors.torch import load_file

        try:
            transformer.load_state_dict(load_file(policy, device=str(device)))
        except Exception:  # another format, or another architecture's weights
            raise ValueError(f"{policy} is not a fine-tuned transformer of {os.path.basename(path)}") from None
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
                scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), latent_shape=latent_shape, encoded=encoded)


@torch.no_grad()
def held_out_accuracy(path: str = CHECKPOINT, steps: int = 40, batch_size: int = 128, seed: int = EVAL_SEED,
                      prompts: list[str] | None = None, policy: str | None = None, keep_images: bool = False) -> dict:
    """{'strict_accuracy': mean over categories (as GenEval), 'strict/<category>': …} of a checkpoint (with
    `policy`: of a fine-tuned run) on `prompts` (default: eval_prompt_list()). Euler ODE sampling without
    guidance from noise drawn with `seed`, in micro-batches of `batch_size`: vgpo.evaluate's sampler with the
    toy preset, written out here so that this file needs no vgpo (a test checks that both give the same
    numbers). `keep_images` adds 'images' (N, 3, 32, 32)."""
    with torch.random.fork_rng():  # building the model draws initial weights: keep the caller's RNG untouched
        m = load(path, policy=policy)
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
    images = torch.cat(images)
    _, strict = verify(images, [METADATA[p] for p in prompts])
    cats = np.array([METADATA[p]["category"] for p in prompts])
    per_cat = {c: float(strict[cats == c].mean()) for c in CATEGORIES if (cats == c).any()}
    return {"strict_accuracy": float(np.mean(list(per_cat.values()))),  # GenEval: the mean over categories
            **{f"strict/{c}": v for c, v in per_cat.items()}} | ({"images": images} if keep_images else {})


def clean_fraction(images) -> float:
    """Fraction of images (N, 3, H, W) in [0, 1] that are clean whatever they were asked for: no more than
    MAX_STRAY lit pixels outside the detected objects, and every component a recognised shape."""
    images = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    ok = 0
    for img in images:
        objects, stray = _objects_and_stray(img)
        ok += stray <= MAX_STRAY and all(o["shape"] for o in objects)
    return ok / len(images)


def _report(path: str = CHECKPOINT, seeds=EVAL_SEEDS, policy: str | None = None, clean: bool = True) -> dict:
    """Held-out strict accuracy of a checkpoint (or of a fine-tuned `policy` on it) by category, mean over the
    evaluation-noise `seeds`, printed; with `clean`, also the fraction of clean images among the first seed's."""
    runs = [held_out_accuracy(path, seed=s, policy=policy, keep_images=clean and i == 0) for i, s in enumerate(seeds)]
    metrics = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "images"}
    print(f"held-out prompts, strict accuracy by category (mean over evaluation-noise seeds {list(seeds)}):")
    for cat in [c for c in CATEGORIES if f"strict/{c}" in metrics]:
        print(f"  {cat:14s} {metrics[f'strict/{cat}']:.3f}")
    per_seed = ", ".join(f"{r['strict_accuracy']:.3f}" for r in runs)
    print(f"  {'overall':14s} {metrics['strict_accuracy']:.3f}  (mean over categories, as GenEval; "
          f"per seed {per_seed})")
    if clean:
        metrics["clean"] = clean_fraction(runs[0]["images"])
        print(f"  clean images   {metrics['clean']:.3f}  (no stray pixels, every object a recognised shape)")
    sys.stdout.flush()
    return metrics | {"per_seed": [r["strict_accuracy"] for r in runs]}


def check_vocabulary(prompts: list[str]) -> None:
    """ValueError unless every prompt uses only the grammar's words and fits the encoder's MAX_TOKENS."""
    unknown = sorted({w for p in prompts for w in p.split() if w not in VOCAB[2:]})
    if unknown or max(len(p.split()) for p in prompts) >= MAX_TOKENS:
        raise ValueError(f"the tiny model knows only the shapes world's words, at most {MAX_TOKENS - 1} per prompt "
                         f"(unknown: {', '.join(unknown[:8]) or 'none'})")


def prompt_weights(prompts: list[str]) -> np.ndarray | None:
    """sampling_weights(prompts) when every prompt is of the grammar; None (uniform) for any other prompts."""
    return sampling_weights(prompts) if all(p in METADATA for p in prompts) else None


def _error(message: str) -> int:
    print(f"shapes.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The shapes toy world.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("pretrain", help="train the tiny model and write checkpoints/shapes-tiny.safetensors")
    pt.add_argument("--steps", type=int, default=5000)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out", default=CHECKPOINT)
    pt.add_argument("--snapshots", default="", help="comma-separated steps at which to also save and evaluate")
    ev = sub.add_parser("evaluate", help="held-out strict accuracy by category, mean over evaluation-noise seeds")
    ev.add_argument("--checkpoint", default=CHECKPOINT, help="a checkpoint written by `shapes.py pretrain`")
    ev.add_argument("--policy", default=None,
                    help="a run folder of `python vgpo.py` (its transformer.safetensors)")
    ev.add_argument("--seeds", type=int, default=len(EVAL_SEEDS),
                    help="how many evaluation-noise seeds (1234, 1235, …)")
    sub.add_parser("prompts", help="print the prompt split")
    a = p.parse_args(argv)
    if a.cmd == "pretrain":
        try:
            snapshots = {int(s) for s in a.snapshots.split(",") if s}
        except ValueError:
            return _error(f"--snapshots {a.snapshots!r}: give comma-separated step numbers, e.g. 2000,4000")
        if a.steps < 1:
            return _error("--steps must be ≥ 1")
        pretrain(steps=a.steps, seed=a.seed, out=a.out, snapshots=snapshots)
        _report(a.out)
    elif a.cmd == "evaluate":
        policy = a.policy
        if policy and os.path.isdir(policy):  # a run folder
            policy = os.path.join(policy, "transformer.safetensors")
        for path, what in ((a.checkpoint, "--checkpoint"), (policy, "--policy")):
            if path and not os.path.isfile(path):
                return _error(f"{what} {path}: no such file (a run folder of `python vgpo.py` holds "
                              "transformer.safetensors)")
        if a.seeds < 1:
            return _error("--seeds must be ≥ 1")
        try:
            _report(a.checkpoint, seeds=tuple(EVAL_SEEDS[0] + i for i in range(a.seeds)), policy=policy)
        except ValueError as e:  # a file of another kind, or a checkpoint without the autoencoder
            return _error(str(e))
    else:
        for text, meta, test in PROMPTS:
            print(f"{'test ' if test else 'train' if test is False else 'both '} {meta['category']:14s} {text}")
        print(f"{len(TRAIN_PROMPTS)} train prompts, {len(TEST_PROMPTS)} test prompts, "
              f"{len(eval_prompt_list())} held-out evaluation images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
