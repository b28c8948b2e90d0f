"""Tests of reward.py and the prompt sets: each checks a claim made there or in the README.

No downloads: OCR uses the PP-OCR models inside the rapidocr-onnxruntime wheel; PickScore and the
aesthetic predictor run on random-weight CLIP models built from tiny configs, with a CLIP tokenizer made
here from a hand-written byte-level vocabulary."""
import importlib.util
import os

import numpy as np
import pytest
import torch

import harness
import reward
import vgpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEW = ["--prompts-per-epoch", "2", "--train-batch-size", "8", "--gradient-accumulation-steps", "2"]  # N = 16 divides
# photo rewards need a model that draws photographs: SD3.5-M's architecture, built only if the reward loads
SD3 = ["--model", "sd3.5", "--random-weights"]


# ---------------------------------------------------------------------------------------------------
# OCR
# ---------------------------------------------------------------------------------------------------
def render_text(text: str, size=(512, 256), font_size=72) -> torch.Tensor:
    """(3, H, W) in [0, 1]: black text centred on white, in PIL's built-in scalable font (no system fonts)."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((size[0] // 2, size[1] // 2), text, fill="black",
                            font=ImageFont.load_default(size=font_size), anchor="mm")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr_fn():
    return reward.load_reward("ocr", "cpu")  # one engine for the module: building and warming it costs ~1 s


def test_ocr_reward_reads_the_quoted_text(ocr_fn):
    """The OCR reward is ≥ 0.8 on a rendered image of the prompt's quoted text and ≤ 0.3 on images of
    other text (and 0 on a blank image)."""
    words = ["HELLO", "Fresh Bread", "ROCKET", "Open 24 Hours"]
    images = torch.stack([render_text(w) for w in words] + [torch.ones(3, 256, 512)])
    right = [f'A sign that says "{w}"' for w in words] + ['A sign that says "BLANK"']
    r = ocr_fn(images, right, [{}] * 5)
    assert r.shape == (5,) and (r[:4] >= 0.8).all() and r[4] == 0, (r, ocr_fn.read(images))
    wrong = [f'A neon sign reading "{w}"' for w in ["MOUNTAIN", "COPPER", "Slow Down", "WALTZ"]]
    assert (ocr_fn(images[:4], wrong, [{}] * 4) <= 0.3).all()
    # metadata["text"] (the .jsonl prompt sets give it) wins over the prompt's quotes
    assert ocr_fn(images[:1], ['A sign that says "NOPE"'], [{"text": "hello"}]).item() == 1.0


def test_ocr_score_rules():
    """ocr_score = 1 − min(edit distance, len)/len on lower-cased, whitespace-free strings, 1 when the target
    occurs inside the text read; targets come from metadata['text'] or the first double-quoted span."""
    assert reward.edit_distance("kitten", "sitting") == 3 and reward.edit_distance("", "abc") == 3
    assert reward.ocr_score("Hel lo", "HELLO") == 1.0  # case and spaces do not count
    assert reward.ocr_score("OPEN NOW 9-5", "open now") == 1.0  # extra text is free, as in Flow-GRPO
    assert reward.ocr_score("HELL0", "HELLO") == pytest.approx(0.8)  # one substitution in five letters
    assert reward.ocr_score("", "HELLO") == 0.0 and reward.ocr_score("completely different", "HI") == 0.0
    assert reward.ocr_target('A sign that says "OPEN" and "SHUT"') == "OPEN"
    assert reward.ocr_target("A mug with “Good Luck” on it") == "Good Luck"
    assert reward.ocr_target("no quotes", {"text": "X"}) == "X" and reward.ocr_target("no quotes") is None


def test_ocr_prompts_without_quoted_text_stop_the_run(tmp_path, capsys):
    """`--reward ocr` with prompts that quote no text stops before any model loads: one line, exit code 2."""
    path = tmp_path / "plain.txt"
    path.write_text("a red circle\na blue square\n")  # no quoted text
    assert vgpo.main(["--reward", "ocr", "--prompts", str(path), *FEW, *SD3,
                      "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "quoted text" in err and "--prompts ocr" in err
    assert not (tmp_path / "run").exists()  # stopped before the run folder and the model


# ---------------------------------------------------------------------------------------------------
# CLIP-based rewards on random-weight models
# ---------------------------------------------------------------------------------------------------
def clip_tokenizer():
    """A CLIP tokenizer with no download: byte-level characters (with and without CLIP's </w> word end),
    no merges, and CLIP's two special tokens."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]  # GPT-2's byte map
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A folder as `--reward pickscore@DIR` / `aesthetic@DIR` expect: a tiny random CLIPModel (projection 768,
    the aesthetic head's input), its processor, and an aesthetic head in LAION's state-dict layout."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(**small, vocab_size=514, max_position_embeddings=77, bos_token_id=512,
                                      eos_token_id=513, pad_token_id=513),
                     vision_config=dict(**small, image_size=224, patch_size=32), projection_dim=768)
    folder = tmp_path_factory.mktemp("clip")
    model = CLIPModel(cfg).eval()
    model.logit_scale.data.fill_(np.log(100.0))  # PickScore_v1's temperature, so scores are of its size
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer()).save_pretrained(folder)
    # LAION's file holds exactly these keys and shapes; a bias of 5 makes the ratings ≈ 5, inside the 1–10 range
    dims = [768, 1024, 128, 64, 16, 1]
    head = {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        head[f"layers.{i}.weight"], head[f"layers.{i}.bias"] = torch.randn(b, a) / a**0.5, torch.zeros(b)
    head["layers.0.weight"] *= 8  # unit-norm inputs are small: spread the ratings over ≈ ±1
    head["layers.7.bias"] += 5.0
    torch.save(head, folder / "sac+logos+ava1-l14-linearMSE.pth")
    return str(folder), model, head


def smooth_images(n, h, w, seed=0):
    """Photo-like test images: low-frequency colour fields plus a little noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bilinear")
    return (base + 0.1 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)


def processor_pixels(images, folder):
    """The reference route: 8-bit PIL images through the saved processor, as Flow-GRPO feeds CLIP."""
    from PIL import Image
    from transformers import AutoProcessor

    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    return AutoProcessor.from_pretrained(folder).image_processor(images=pil, return_tensors="pt").pixel_values


def test_batched_clip_preprocessing_matches_the_processor(clip_dir):
    """reward.clip_pixels (batched torch resize/crop/normalise) gives the processor's PIL pixel values to
    within the 8-bit rounding it skips, for square and wide images."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(clip_dir[0])
    for h, w in [(512, 512), (256, 512)]:
        images = (smooth_images(2, h, w) * 255).round() / 255
        ref, mine = processor_pixels(images, clip_dir[0]), reward.clip_pixels(images, processor, "cpu")
        assert mine.shape == ref.shape == (2, 3, 224, 224)
        assert (mine - ref).abs().max() < 0.05 and (mine - ref).abs().mean() < 0.01  # normalised units (÷ std ≈ 0.27)


def test_pickscore_end_to_end_on_a_random_clip(clip_dir):
    """`--reward pickscore@DIR` loads model and processor from the folder and returns, per image,
    max(0, logit_scale·cos(image, its prompt)/26): transformers' own CLIPModel logits ÷ 26, clamped at 0."""
    import copy

    folder, model, _ = clip_dir
    images = smooth_images(8, 512, 512, seed=1)
    prompts = ["a red fox at sunset", "a bowl of ramen", 'A sign that says "HELLO"', "an oil painting of a cat",
               "a robot", "two dogs on a beach", "a bowl of ramen", "x"]
    tok = clip_tokenizer()(prompts, padding=True, return_tensors="pt")
    # the folder's model, and a copy with the text projection negated, which negates every cosine: whatever
    # sign the random model's scores have, one of the two exercises the clamp and the other the scale
    flipped = copy.deepcopy(model)
    flipped.text_projection.weight.data.neg_()
    seen_positive = False
    for fn, m in [(reward.load_reward(f"pickscore@{folder}", "cpu"), model),
                  (reward.pickscore("cpu", model=flipped, processor=folder), flipped)]:
        r = fn(images, prompts, [{}] * 8)
        with torch.no_grad():
            logits = m(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                       pixel_values=processor_pixels(images, folder)).logits_per_image.diag()
        assert r.shape == (8,) and r.dtype == torch.float32 and torch.isfinite(r).all()
        torch.testing.assert_close(r, (logits / 26).clamp(min=0), atol=1e-3, rtol=0)
        torch.testing.assert_close(fn(images, prompts, [{}] * 8), r)  # cached prompt embeddings: same scores
        seen_positive |= bool((r > 0.02).any())
    assert seen_positive


def test_aesthetic_end_to_end_on_a_random_clip(clip_dir):
    """`--reward aesthetic@DIR` loads the CLIP and LAION's head file (weights_only) from the folder and
    returns head(unit image embedding)/10; a .safetensors head and a model object load too."""
    from safetensors.torch import save_file

    folder, model, head_state = clip_dir
    images = smooth_images(3, 512, 512, seed=2)
    r = reward.load_reward(f"aesthetic@{folder}", "cpu")(images, ["p"] * 3, [{}] * 3)
    head = reward.AestheticHead()
    head.load_state_dict(head_state)  # strict: our layer layout is LAION's
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[512, 513]]), pixel_values=processor_pixels(images, folder))
        want = head.eval()(out.image_embeds) / 10  # image_embeds: projected and unit-normalised by transformers
    assert r.shape == (3,) and torch.isfinite(r).all() and ((r > 0.3) & (r < 0.7)).all()
    torch.testing.assert_close(r, want, atol=5e-4, rtol=0)  # measured 5e-5: the PIL route's 8-bit rounding
    st = os.path.join(folder, "head.safetensors")
    save_file(head_state, st)
    again = reward.aesthetic("cpu", clip=model, processor=folder, head=st)(images, ["p"] * 3, [{}] * 3)
    torch.testing.assert_close(again, r)


def test_absent_reward_weights_give_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """With the hub unreachable and no cached copy, `--reward pickscore` stops with one line naming the
    model and what to do (download, DIR, another reward), exit code 2; so does a missing aesthetic head."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    monkeypatch.setattr(reward, "PICKSCORE_MODEL", "vgpo-tests/absent-model")  # surely not in any cache
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na bowl of ramen\n")
    assert vgpo.main(["--reward", "pickscore", "--prompts", str(prompts), *FEW, *SD3,
                      "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vgpo-tests/absent-model" in err and "hf download" in err and "@DIR" in err
    # the aesthetic head: nothing cached, the URL unreachable (a closed port on this machine)
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.setattr(reward, "AESTHETIC_HEAD_URL", "http://127.0.0.1:9/none.pth")
    try:
        with pytest.raises(reward.RewardUnavailable, match="aesthetic@DIR") as e:
            reward.aesthetic("cpu", clip=object(), processor=object())
        assert "\n" not in str(e.value)
    finally:
        torch.hub.set_dir(hub_dir)


# ---------------------------------------------------------------------------------------------------
# --reward specs
# ---------------------------------------------------------------------------------------------------
def test_reward_spec_parsing_and_weighted_sum(tmp_path):
    """'a=1,b@DIR=0.5' parses to (name, folder, weight) terms; a sum is Σ w·R, its metrics give each component
    (with the component's own metrics as NAME/KEY); unknown names, weights ≤ 0 or not numbers, repeats and bad @DIR
    are one-line errors."""
    assert reward.parse_reward_spec("ocr") == [("ocr", None, 1.0)]
    assert reward.parse_reward_spec(f"pickscore@{tmp_path}=1, aesthetic=0.5") == [
        ("pickscore", str(tmp_path), 1.0), ("aesthetic", None, 0.5)]
    images = smooth_images(4, 32, 32)
    prompts = ["a red circle", "two blue squares", "a circle left of a square", "a green square"]
    fn = reward.load_reward("shapes=1,jpeg_compressibility=0.5", "cpu")
    parts = {n: reward.REWARDS[n]("cpu")(images, prompts, [{}] * 4) for n in ("shapes", "jpeg_compressibility")}
    torch.testing.assert_close(fn(images, prompts, [{}] * 4), parts["shapes"] + 0.5 * parts["jpeg_compressibility"])
    m = fn.metrics(images, prompts, [{}] * 4)
    assert {"score", "shapes", "jpeg_compressibility", "shapes/strict_accuracy"} <= set(m)
    assert m["score"] == pytest.approx(fn(images, prompts, [{}] * 4).mean().item())
    assert m["shapes"] == pytest.approx(parts["shapes"].mean().item())
    assert reward.load_reward("jpeg_compressibility", "cpu").__name__ == "fn" and not hasattr(
        reward.load_reward("jpeg_compressibility", "cpu"), "metrics")  # a lone reward is returned as built
    for bad, needle in [("nope", "choose from"), ("ocr=0", "> 0"), ("ocr=-1", "> 0"), ("ocr=x", "> 0"),
                        ("ocr=nan", "> 0"), ("ocr,ocr=2", "twice"), ("ocr@.", "no model"),
                        ("pickscore@/no/such/dir", "no such folder"), ("", "unknown")]:
        with pytest.raises(reward.RewardUnavailable, match=needle) as e:
            reward.parse_reward_spec(bad)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------------------
def test_prompt_sets_split_and_count():
    """`--prompts ocr` / `--prompts preference` read prompts/NAME_train and NAME_test: OCR 420 + 60 prompts whose
    test texts are unseen in training, each quoting its metadata text; ≥ 300 preference prompts (450 + 100)
    whose test (subject, setting) pairs are unseen; no prompt in both splits."""
    assert {"ocr", "preference"} <= set(harness.prompt_sets())
    sets = {name: vgpo.load_prompts(vgpo.make_args(model="tiny", prompts=name)) for name in ("ocr", "preference")}
    (ocr_train, ocr_test), (pref_train, pref_test) = sets["ocr"], sets["preference"]
    assert (len(ocr_train), len(ocr_test), len(pref_train), len(pref_test)) == (420, 60, 450, 100)
    for train, test in sets.values():
        assert not {p for p, _ in train} & {p for p, _ in test}
        assert len({p for p, _ in train}) == len(train) and len({p for p, _ in test}) == len(test)
    assert all(reward.ocr_target(p) == m["text"] for p, m in ocr_train + ocr_test)
    assert not {m["text"] for _, m in ocr_train} & {m["text"] for _, m in ocr_test}
    spec = importlib.util.spec_from_file_location("make_prompts", os.path.join(ROOT, "prompts", "make_prompts.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    pair = lambda p: next((s, t) for s in make.SUBJECTS for t in make.SETTINGS if f"{s} {t}" in p)  # noqa: E731
    assert not {pair(p) for p, _ in pref_train} & {pair(p) for p, _ in pref_test}
    # the committed files are exactly what the generator writes
    for name, content in make.build().items():
        with open(os.path.join(ROOT, "prompts", name), encoding="utf-8") as f:
            assert f.read() == content, name


def test_prompt_file_errors_are_one_line(tmp_path, capsys):
    """A .jsonl line that is not an object with "prompt" names the file and line; exit code 2."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a fox"}\n{"text": "no prompt"}\n')
    assert vgpo.main(["--prompts", str(path), *FEW, "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:2" in err


def test_shapes_reward_rejects_prompts_outside_the_grammar_before_the_run():
    """The shapes reward checks a prompt file at start-up: a sentence of known words that is not a prompt of
    the grammar (no exact check exists for it) is a RewardUnavailable naming it, not a traceback mid-run."""
    fn = reward.REWARDS["shapes"]("cpu")
    fn.check_prompts([("a red circle", {}), ("three blue squares", {})])  # prompts of the grammar pass
    with pytest.raises(reward.RewardUnavailable, match="'a green triangle above a red circle' is not a prompt"):
        fn.check_prompts([("a red circle", {}), ("a green triangle above a red circle", {})])


def test_shapes_reward_is_half_partial_credit_half_strict_by_hand():
    """`shapes` = ½·(share of the verifier's checks passed) + ½·(all passed), on scenes whose checks are counted by
    hand: for 'a circle left of a square' (circle, square, relation, clean) a faithful scene passes 4/4 → 1, the
    swapped scene 3/4 (no relation) → 3/8, a lone circle 1/4 → 1/8, a blank image 0/4 → 0; for 'two red circles'
    (a red circle, two of them, clean) one red circle passes 1/3 → 1/6. `shapes_strict` is the all-passed part;
    the metrics' score is the mean of `shapes`, their partial_credit the mean share."""
    import shapes

    rng = np.random.default_rng(0)
    scenes = [("a circle left of a square", "a circle left of a square"),
              ("a circle left of a square", "a square left of a circle"),
              ("a circle left of a square", "a circle"), ("a circle left of a square", None),
              ("two red circles", "a red circle")]
    images = torch.from_numpy(np.stack([shapes.render(shapes.parse_prompt(drawn), rng) if drawn else
                                        np.zeros((3, 32, 32), np.float32) for _, drawn in scenes]))
    prompts = [p for p, _ in scenes]
    partial = torch.tensor([1.0, 3 / 4, 1 / 4, 0.0, 1 / 3])
    strict = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    got = reward.REWARDS["shapes"]("cpu")(images, prompts, [{}] * 5)
    torch.testing.assert_close(got, torch.tensor([1.0, 3 / 8, 1 / 8, 0.0, 1 / 6]))
    torch.testing.assert_close(got, 0.5 * partial + 0.5 * strict)
    torch.testing.assert_close(reward.REWARDS["shapes_strict"]("cpu")(images, prompts, [{}] * 5), strict)
    m = reward.REWARDS["shapes"]("cpu").metrics(images, prompts, [{}] * 5)
    assert m["score"] == pytest.approx(got.mean().item())
    assert m["partial_credit"] == pytest.approx(partial.mean().item())


def test_shapes_soft_is_strict_times_how_cleanly_the_scene_is_drawn():
    """`shapes_soft`: a render scores exactly 1; the same render with soft edges (a faint halo of 0.1 around its
    objects, below the verifier's 0.5 threshold) still passes and scores 1 − the halo's mean over the objects'
    cells, by hand; a scene that fails the prompt scores 0 however clean; its metrics keep the strict accuracy."""
    import shapes
    from scipy import ndimage

    rng = np.random.default_rng(0)
    img = shapes.render(shapes.parse_prompt("a red circle"), rng)
    lit = img.max(0) > 0.5
    halo = ndimage.binary_dilation(lit) & ~lit  # the ring of pixels around the object, inside its cell
    soft = img.copy()
    soft[:, halo] = 0.1
    wrong = shapes.render(shapes.parse_prompt("a blue square"), rng)
    fn = reward.REWARDS["shapes_soft"]("cpu")
    got = fn(torch.from_numpy(np.stack([img, soft, wrong])), ["a red circle"] * 3, [{}] * 3)
    want_soft = 1 - 3 * 0.1 * halo.sum() / (3 * 8 * 8)  # |0.1 − 0| on 3 channels of the halo, over one cell
    torch.testing.assert_close(got, torch.tensor([1.0, float(want_soft), 0.0]))
    assert 0.9 < want_soft < 1
    m = fn.metrics(torch.from_numpy(np.stack([img, soft, wrong])), ["a red circle"] * 3, [{}] * 3)
    assert m["strict_accuracy"] == pytest.approx(2 / 3) and m["score"] == pytest.approx(got.mean().item())


# ---------------------------------------------------------------------------------------------------
# GenEval: the rules on hand-built detections, the whole reward on random-weight models, the prompt sets
# ---------------------------------------------------------------------------------------------------
BOX = (0, 0, 9, 9)  # where the rule under test does not look at boxes


def det(label, box, score=0.95, color=None):
    return reward.Detection(label, box, score, color)


CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
THREE_CATS = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
RED_CAT = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}
CAT_LEFT_OF_DOG = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                                   {"class": "cat", "count": 1, "position": ["left of", 0]}]}
RED_CAT_BLUE_DOG = {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"},
                                                      {"class": "dog", "count": 1, "color": "blue"}]}


def test_geneval_objects_threshold_cap_and_overlap():
    """GenEval keeps, per class, detections scoring > 0.3 (> 0.9 for counting prompts), the 16 best, most
    confident first; max_overlap < 1 drops a box overlapping a kept one of its class with IoU ≥ max_overlap."""
    dets = [det("cat", (0, 0, 10, 10), 0.3), det("cat", (20, 0, 30, 10), 0.31), det("dog", (0, 0, 5, 5), 0.95),
            det("cat", (40, 0, 50, 10), 0.9), det("cat", (60, 0, 70, 10), 0.91)]
    kept = reward.geneval_objects(dets, "single_object")
    assert [d.score for d in kept["cat"]] == [0.91, 0.9, 0.31] and len(kept["dog"]) == 1  # 0.3 itself is out
    assert [d.score for d in reward.geneval_objects(dets, "counting")["cat"]] == [0.91]
    many = [det("cat", (i, 0, i + 1, 1), 0.4 + i / 100) for i in range(20)]
    best16 = [0.4 + i / 100 for i in range(19, 3, -1)]
    assert [d.score for d in reward.geneval_objects(many, "single_object")["cat"]] == best16
    # IoU of (0,0,10,10) and (5,0,15,10) is 50/150 = ⅓; (0,0,10,10) and (0,0,10,9) 0.9
    a, b, c = det("cat", (0, 0, 10, 10), 0.9), det("cat", (5, 0, 15, 10), 0.8), det("cat", (0, 0, 10, 9), 0.7)
    assert reward.box_iou(a.box, b.box) == pytest.approx(1 / 3) and reward.box_iou(a.box, c.box) == pytest.approx(0.9)
    assert reward.geneval_objects([a, b, c], "two_object")["cat"] == [a, b, c]  # GenEval's default: no suppression
    assert reward.geneval_objects([a, b, c], "two_object", max_overlap=0.5)["cat"] == [a, b]
    assert reward.geneval_objects([a, b, c], "two_object", max_overlap=0.3)["cat"] == [a]


def test_relative_position_from_box_centres_with_margin():
    """A's relation to B from the centre offset o shrunk by 0.1·(sum of the two sizes) per axis, over |o|:
    'left of' when < −½ on x, 'above' when < −½ on y (y down); inside the margin no relation at all."""
    rel = reward.relative_position
    box = (0, 0, 10, 10)
    assert rel(box, (100, 0, 110, 10)) == {"left of"} and rel((100, 0, 110, 10), box) == {"right of"}
    assert rel(box, (0, 50, 10, 60)) == {"above"} and rel((0, 50, 10, 60), box) == {"below"}
    # offset (−10, −10), sizes 20 per axis: shrunk (−8, −8), ÷ |o| = 14.1 → −0.57 on both: left of and above
    assert rel(box, (10, 10, 20, 20)) == {"left of", "above"}
    # offset (−10, −4): shrunk (−8, −2), ÷ 10.8 → (−0.74, −0.19): left of only
    assert rel(box, (10, 4, 20, 14)) == {"left of"}
    # centres 1.5 apart on x, margin 0.1·20 = 2: no relation; without the margin, 'left of'
    assert rel(box, (1.5, 0, 11.5, 10)) == set() and rel(box, (1.5, 0, 11.5, 10), margin=0) == {"left of"}
    # 3 apart: shrunk to 1 of 3, 0.33 < ½: still none; 5 apart: 3 of 5 = 0.6: left of
    assert rel(box, (3, 0, 13, 10)) == set() and rel(box, (5, 0, 15, 10)) == {"left of"}


@pytest.mark.parametrize("meta, objects, want", [
    # presence: one cat asked
    (CAT, {}, (False, False, 0.0)),
    (CAT, {"dog": [det("dog", (0, 0, 9, 9))]}, (False, False, 0.0)),
    (CAT, {"cat": [det("cat", (0, 0, 9, 9))]}, (True, True, 1.0)),
    # GenEval accepts extra cats; the exact rule does not, and the count term 1 − |1 − n| is clamped at 0
    (CAT, {"cat": [det("cat", (0, 0, 9, 9)), det("cat", (20, 0, 29, 9))]}, (True, False, 0.0)),
    (CAT, {"cat": [det("cat", (0, 0, 9, 9))] * 3}, (True, False, 0.0)),
    # counting: three, and not four (the exclude clause)
    (THREE_CATS, {"cat": [det("cat", (0, 0, 9, 9))] * 3}, (True, True, 1.0)),
    (THREE_CATS, {"cat": [det("cat", (0, 0, 9, 9))] * 2}, (False, False, 2 / 3)),
    (THREE_CATS, {"cat": [det("cat", (0, 0, 9, 9))] * 4}, (False, False, 2 / 3)),
    # colour: terms count, colour
    (RED_CAT, {"cat": [det("cat", (0, 0, 9, 9), color="red")]}, (True, True, 1.0)),
    (RED_CAT, {"cat": [det("cat", (0, 0, 9, 9), color="blue")]}, (False, False, 0.5)),
    # GenEval reads the colour of the most confident cat only; the exact rule fails on the count
    (RED_CAT, {"cat": [det("cat", (0, 0, 9, 9), 0.9, "red"), det("cat", (20, 0, 29, 9), 0.5, "blue")]},
     (True, False, 0.0)),
    (RED_CAT, {"cat": [det("cat", (0, 0, 9, 9), 0.9, "blue"), det("cat", (20, 0, 29, 9), 0.5, "red")]},
     (False, False, 0.0)),
    # position: terms dog count, cat count, cat left of dog
    (CAT_LEFT_OF_DOG, {"cat": [det("cat", (0, 0, 10, 10))], "dog": [det("dog", (100, 0, 110, 10))]},
     (True, True, 1.0)),
    (CAT_LEFT_OF_DOG, {"cat": [det("cat", (100, 0, 110, 10))], "dog": [det("dog", (0, 0, 10, 10))]},
     (False, False, 2 / 3)),
    (CAT_LEFT_OF_DOG, {"cat": [det("cat", (0, 0, 10, 10))], "dog": [det("dog", (1.5, 0, 11.5, 10))]},
     (False, False, 2 / 3)),  # within the margin
    (CAT_LEFT_OF_DOG, {"cat": [det("cat", BOX)]}, (False, False, 1 / 3)),  # no dog to be left of
    # colour attribution: terms cat count, cat colour, dog count, dog colour
    (RED_CAT_BLUE_DOG, {"cat": [det("cat", BOX, color="red")], "dog": [det("dog", BOX, color="blue")]},
     (True, True, 1.0)),
    (RED_CAT_BLUE_DOG, {"cat": [det("cat", BOX, color="blue")], "dog": [det("dog", BOX, color="red")]},
     (False, False, 0.5)),
])
def test_geneval_rules_on_hand_built_detections(meta, objects, want):
    """geneval_check → (GenEval's benchmark rule, Flow-GRPO's exact rule, partial credit), computed by hand."""
    correct, exact, partial = reward.geneval_check(objects, meta)
    assert (correct, exact) == want[:2] and partial == pytest.approx(want[2])


def test_geneval_metadata_errors_are_one_line():
    """Prompts without GenEval metadata, or with a class, count, colour or position GenEval does not know, are
    named with the reason; a prompt set's rows all pass."""
    assert reward.geneval_metadata_error(CAT_LEFT_OF_DOG) is None
    for meta, needle in [({}, "tag"), ({"tag": "colors"}, "include"),
                         ({"tag": "colors", "include": [{"class": "unicorn", "count": 1}]}, "COCO"),
                         ({"tag": "counting", "include": [{"class": "cat", "count": 0}]}, "count"),
                         ({"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}]}, "colour"),
                         ({"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["near", 0]}]},
                          "position")]:
        assert needle in reward.geneval_metadata_error(meta)


@pytest.fixture(scope="module")
def geneval_dir(tmp_path_factory, clip_dir):
    """A folder as `--reward geneval@DIR` expects: detector/ holds a tiny random Mask2Former with COCO's 80
    classes, biased towards cats and dogs with confident masks so that objects are found (scores ≈ 0.3–0.6);
    clip/ the tiny random CLIP and its processor."""
    import shutil

    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    swin = dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(num_labels=80, backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, num_queries=10)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        head = model.class_predictor
        head.weight.mul_(3)
        head.bias.zero_()
        head.bias[[reward.COCO_CLASSES.index("cat"), reward.COCO_CLASSES.index("dog")]] = 8.0
        last = [m for m in model.model.transformer_module.decoder.mask_predictor.mask_embedder.modules()
                if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(5)  # larger mask logits: masks the model is sure of, mask quality near 1
    folder = tmp_path_factory.mktemp("geneval")
    model.save_pretrained(folder / "detector")
    shutil.copytree(clip_dir[0], folder / "clip")
    return str(folder), model


def geneval_metas():
    dog_cat = [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]
    return [CAT, {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
            THREE_CATS, RED_CAT, {"tag": "position", "include": dog_cat}, RED_CAT_BLUE_DOG]


def test_geneval_reward_end_to_end_on_random_models(geneval_dir, clip_dir):
    """geneval@DIR on random models: R (N,) float32 in [0, 1], the rules' partial credit of the objects found
    (geneval_strict: the exact 0/1 score); deterministic; metrics give GenEval's accuracy as the mean over
    categories; every colour read is CLIP's zero-shot argmax, as transformers' CLIPModel computes it."""
    from PIL import Image
    from transformers import AutoProcessor

    folder, _ = geneval_dir
    fn = reward.geneval("cpu", folder, size=96)
    strict_fn = reward.geneval("cpu", folder, strict=True, size=96)
    images = (smooth_images(12, 96, 96, seed=3) * 255).round() / 255  # 8-bit values: the PIL route below is exact
    metas = geneval_metas() * 2
    prompts = [f"prompt {i}" for i in range(12)]
    r = fn(images, prompts, metas)
    assert r.shape == (12,) and r.dtype == torch.float32 and ((r >= 0) & (r <= 1)).all()
    torch.testing.assert_close(fn(images, prompts, metas), r, rtol=0, atol=0)
    results = fn.evaluate(images, prompts, metas)
    assert sum(len(objs) for res in results for objs in res["objects"].values()) > 0  # the detector found objects
    for res, meta, ri in zip(results, metas, r.tolist()):
        assert (res["correct"], res["exact"], res["partial"]) == reward.geneval_check(res["objects"], meta)
        assert ri == pytest.approx(res["partial"])
    torch.testing.assert_close(strict_fn(images, prompts, metas), torch.tensor([float(x["exact"]) for x in results]))
    m = fn.metrics(images, prompts, metas)
    assert {"score", "partial_credit", "strict_accuracy", "exact_accuracy"} <= set(m)
    assert {f"strict/{c}" for c in reward.GENEVAL_CATEGORIES} <= set(m)
    assert m["score"] == pytest.approx(r.mean().item()) and m["partial_credit"] == m["score"]
    assert m["strict_accuracy"] == pytest.approx(np.mean([m[f"strict/{c}"] for c in reward.GENEVAL_CATEGORIES]))
    # the colours: the argmax over colours c of cos(image embedding, t_c), t_c the renormalised mean of the unit
    # text embeddings of the three prompts for c; the cosines as the processor's PIL route and CLIPModel compute them
    processor, clip = AutoProcessor.from_pretrained(clip_dir[0]), clip_dir[1]
    coloured = [(img, o) for img, res in zip(images, results) for objs in res["objects"].values() for o in objs
                if o.color is not None]
    assert coloured, "no colour was read"
    for img, o in coloured:
        crop = reward.masked_crop(img, o)
        pil = Image.fromarray((crop.permute(1, 2, 0) * 255).round().byte().numpy())
        texts = [t.format(color=c, object=o.label) for c in reward.GENEVAL_COLORS
                 for t in reward.GENEVAL_COLOR_TEMPLATES]
        inputs = processor(text=texts, images=pil, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = clip(**inputs)
        weights = torch.nn.functional.normalize(out.text_embeds.view(10, 3, -1).mean(1), dim=-1)
        mine = fn.color_scores([crop], [o.label])[0]
        torch.testing.assert_close(mine, weights @ out.image_embeds[0], atol=2e-3, rtol=0)
        assert o.color == reward.GENEVAL_COLORS[int(mine.argmax())]


def test_masked_crop_greys_out_the_background():
    """The colour is read from the object's box, grey #999999 (0.6) wherever its mask is off."""
    image = torch.zeros(3, 8, 10)
    image[0] = 1.0  # all red
    mask = torch.zeros(8, 10, dtype=torch.bool)
    mask[2:5, 3:6] = True
    mask[4, 7] = True  # a second piece: the box spans both
    crop = reward.masked_crop(image, reward.Detection("cat", (3, 2, 8, 5), 0.9, mask=mask))
    assert crop.shape == (3, 3, 5)
    want = torch.full((3, 3, 5), 0.6)
    want[:, :, :3] = torch.tensor([1.0, 0, 0]).view(3, 1, 1)
    want[:, 2, 4] = torch.tensor([1.0, 0, 0])
    torch.testing.assert_close(crop, want)


def test_geneval_detections_match_transformers_postprocessing(geneval_dir):
    """geneval_instances' objects (class, score) are those of transformers' Mask2Former instance
    post-processing (class probability × mean mask probability inside the mask), at the model's input size."""
    from transformers import Mask2FormerImageProcessor

    _, model = geneval_dir
    images = smooth_images(2, 384, 384, seed=4)
    ours = reward.geneval_instances(model, images, size=384)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (reward.IMAGENET_MEAN, reward.IMAGENET_STD))
    pixels = (images - mean) / std
    with torch.no_grad():
        out = model(pixel_values=pixels)
    theirs = Mask2FormerImageProcessor().post_process_instance_segmentation(out, threshold=0.0)
    for mine, lib in zip(ours, theirs):
        a = sorted((o.label, o.score) for o in mine)
        b = sorted((reward.COCO_CLASSES[s["label_id"]], s["score"]) for s in lib["segments_info"])
        assert [x[0] for x in a] == [x[0] for x in b] and len(a) > 0
        np.testing.assert_allclose([x[1] for x in a], [x[1] for x in b], atol=2e-6)
    for o in ours[0]:  # each box is its mask's bounding box
        ys, xs = torch.nonzero(o.mask, as_tuple=True)
        assert o.box == (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)


def test_geneval_refuses_a_detector_without_cocos_classes_in_order(geneval_dir, clip_dir):
    """A detector whose class names are COCO's in COCO's order loads (other codebases' spellings too: 'mouse',
    'hair dryer'); one with two classes swapped, or without 80 classes, is a one-line RewardUnavailable."""
    import copy

    _, model = geneval_dir
    names = [{"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard",
              "hair drier": "hair dryer"}.get(c, c) for c in reward.COCO_CLASSES]
    detector = copy.deepcopy(model)
    detector.config.id2label = dict(enumerate(names))
    reward.geneval("cpu", detector=detector, clip=clip_dir[1], processor=clip_dir[0])
    names[15], names[16] = names[16], names[15]
    detector.config.id2label = dict(enumerate(names))
    with pytest.raises(reward.RewardUnavailable, match="class 15 is 'dog', COCO's is 'cat'") as e:
        reward.geneval("cpu", detector=detector, clip=clip_dir[1], processor=clip_dir[0])
    assert "\n" not in str(e.value)
    detector.config.id2label = {i: f"LABEL_{i}" for i in range(133)}  # e.g. a COCO panoptic model
    with pytest.raises(reward.RewardUnavailable, match="133 classes"):
        reward.geneval("cpu", detector=detector, clip=clip_dir[1], processor=clip_dir[0])


def test_geneval_refuses_prompts_without_metadata_before_the_run(geneval_dir, tmp_path, capsys):
    """`--reward geneval@DIR` with plain-text prompts stops once the models are loaded, before the run: one line
    that says to use --prompts geneval, exit code 2."""
    path = tmp_path / "plain.txt"
    path.write_text("a red circle\na blue square\n")
    assert vgpo.main(["--reward", f"geneval@{geneval_dir[0]}", "--prompts", str(path), *FEW, *SD3,
                      "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "GenEval metadata" in err and "--prompts geneval" in err
    assert not (tmp_path / "run").exists()


def test_geneval_absent_weights_give_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """`python vgpo.py --reward geneval --prompts geneval` with neither model cached and no hub: one line naming
    both downloads and the DIR layout, exit code 2; geneval@DIR without its subfolders says which are missing."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(reward, "GENEVAL_DETECTOR", "vgpo-tests/absent-detector")
    monkeypatch.setattr(reward, "GENEVAL_CLIP", "vgpo-tests/absent-clip")
    assert vgpo.main(["--reward", "geneval", "--prompts", "geneval", *FEW, *SD3,
                      "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hf download vgpo-tests/absent-detector" in err
    assert "hf download vgpo-tests/absent-clip" in err and "geneval@DIR" in err
    (tmp_path / "models" / "clip").mkdir(parents=True)
    with pytest.raises(reward.RewardUnavailable, match="detector/ missing") as e:
        reward.load_reward(f"geneval@{tmp_path / 'models'}", "cpu")
    assert "\n" not in str(e.value) and "--local-dir" in str(e.value)


def geneval_meaning(meta: dict) -> tuple:
    """What a GenEval prompt asks for, whatever its wording: the multiset of (class, count, colour), plus each
    relation stated one way ('B right of A' is 'A left of B')."""
    inc = meta["include"]
    things = tuple(sorted((r["class"], r["count"], r.get("color", "")) for r in inc))
    flip = {"right of": "left of", "below": "above"}
    relations = []
    for r in inc:
        if "position" in r:
            rel, target = r["position"]
            a, b = r["class"], inc[target]["class"]
            relations.append((b, flip[rel], a) if rel in flip else (a, rel, b))
    return meta["tag"], things, tuple(sorted(relations))


def test_geneval_prompt_sets_split_by_meaning():
    """`--prompts geneval`: 3 600 training and 520 test prompts of GenEval's six categories, all with valid
    metadata that the wording states; no scene (by meaning, not string) twice in a split or in both splits;
    the training set words scenes in the equivalent ways (object order, 'left of' / 'right of')."""
    train, test = vgpo.load_prompts(vgpo.make_args(model="tiny", prompts="geneval"))
    assert (len(train), len(test)) == (3600, 520)
    for split in (train, test):
        assert {m["tag"] for _, m in split} == set(reward.GENEVAL_CATEGORIES)
        assert all(reward.geneval_metadata_error(m) is None for _, m in split)
        meanings = [geneval_meaning(m) for _, m in split]
        assert len(set(meanings)) == len(meanings)
    assert not {geneval_meaning(m) for _, m in train} & {geneval_meaning(m) for _, m in test}
    irregular = {"person": "people", "computer mouse": "computer mice", "knife": "knives"}
    for p, m in train + test:  # the metadata is what the prompt says
        for r in m["include"]:
            assert any(form in p for form in (r["class"], r["class"][:-1], irregular.get(r["class"], "-")))
            assert f"{r['color']} " in p if "color" in r else True
            assert f" {r['position'][0]} " in p if "position" in r else True
            assert f" {['', 'one', 'two', 'three', 'four'][r['count']]} " in p if m["tag"] == "counting" else True
    words = " ".join(p for p, m in train if m["tag"] == "position")
    assert all(w in words for w in (" left of ", " right of ", " above ", " below "))
    assert any(m["include"][0]["class"] > m["include"][1]["class"] for _, m in train if m["tag"] == "two_object")


@pytest.mark.parametrize("size", ["128", "abc", "512 3"])
def test_the_detector_benchmark_refuses_a_size_it_cannot_run_in_one_line(size, capsys):
    """`python -m tools.bench detectors [SIZE]` (results/geneval-detectors.md): a SIZE that is not an integer, or
    below 256 px, where Grounding DINO has fewer feature cells than its 900 queries and raised from torch.topk, is
    one line on stderr and exit code 2, before any model is built."""
    from tools import bench

    assert bench.main(["detectors", *size.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "≥ 256" in err and "Traceback" not in err, err
