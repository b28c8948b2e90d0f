"""Writes the prompt sets in this folder (seeded: running it again gives the same files; a test checks it).

    python prompts/make_prompts.py

ocr_{train,test}.jsonl         text-rendering prompts, {"prompt": ..., "text": the quoted text the OCR
                               reward looks for}; the test texts never occur in training
preference_{train,test}.txt    varied scenes for PickScore / aesthetic rewards, one prompt per line;
                               no (subject, setting) pair of the test set occurs in training
geneval_{train,test}.jsonl     GenEval's six categories over the 80 COCO classes, with GenEval's metadata
                               {"prompt", "tag", "include": [{"class", "count", "color"?, "position"?}],
                               "exclude"?}; split by scene: a scene phrased two ways ("a cat left of a dog",
                               "a dog right of a cat") is one scene, in one split

Every word list and template below was written for this project.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: class and colour names are the geneval reward's
from reward import COCO_CLASSES, GENEVAL_COLORS  # noqa: E402

SEED = 0

# ---- OCR: where the text appears, and what it says ----
OCR_TEMPLATES = [
    'A sign that says "{text}"',
    'A shop sign above a wooden door that reads "{text}"',
    'A white t-shirt printed with the words "{text}"',
    'A neon sign reading "{text}" on a brick wall at night',
    'A chalkboard menu outside a cafe with "{text}" written on it',
    'A coffee mug with "{text}" printed on the side',
    'A green road sign that says "{text}"',
    'A book cover with the title "{text}"',
    'A birthday cake with "{text}" written in icing',
    'A movie poster with the title "{text}" in large letters',
    'A wooden plank carved with the words "{text}"',
    'A stadium banner that says "{text}"',
    'A graffiti mural on a city wall spelling "{text}"',
    'A handwritten note on lined paper that says "{text}"',
    'A storefront window painted with "{text}"',
    'A billboard beside a highway that reads "{text}"',
    'A cereal box on a kitchen table labelled "{text}"',
    'A doormat in front of a house that says "{text}"',
    'A vintage postcard with "{text}" across the top',
    'A laptop screen displaying the text "{text}"',
    'A yellow sticky note on a fridge that says "{text}"',
    'A flag waving in the wind with "{text}" on it',
    'A glowing arcade sign that says "{text}"',
    'A hand-painted sign in a garden that reads "{text}"',
]

OCR_TEXTS = """
OPEN|CLOSED|EXIT|SALE|HELLO|WELCOME|BAKERY|COFFEE|PIZZA|BOOKS|FLOWERS|MARKET|HOTEL|PHARMACY|GARAGE|LIBRARY
MUSEUM|THEATER|CINEMA|STATION|TAXI|PARKING|STOP|DANGER|CAUTION|QUIET|PUSH|PULL|ENTRANCE|TICKETS|DINER|GROCERY
BARBER|FITNESS|YOGA|SURF|CAMPING|GARDEN|DREAM|HOPE|LOVE|PEACE|JOY|SMILE|RELAX|BELIEVE|IMAGINE|FREEDOM
ADVENTURE|EXPLORE|WANDER|BRAVE|KINDNESS|COURAGE|HARMONY|SUNSHINE|THUNDER|GALAXY|ROCKET|ORBIT|PLANET|COMET
NEBULA|PIXEL|ROBOT|CIRCUIT|ENERGY|TURBO|MAGNET|ECHO|VELVET|COPPER|SILVER|GOLDEN|CRIMSON|INDIGO|MAPLE|CEDAR
WILLOW|LOTUS|ORCHID|TULIP|CACTUS|MANGO|LEMON|PEPPER|HONEY|CARAMEL|WAFFLE|PRETZEL|NOODLES|DUMPLING|TACOS
BURGER|SUSHI|BAGEL|DONUTS|GELATO|COCOA|ESPRESSO|SMOOTHIE|BISTRO|CANTINA|TAVERN|ARCADE|BOWLING|KARAOKE|JAZZ
BLUES|DISCO|OPERA|BALLET|CIRCUS|CARNIVAL|FESTIVAL|PARADE|VICTORY|CHAMPION|LEGEND|HERO|TITAN|PHOENIX|DRAGON
TIGER|FALCON|WOLF|OTTER|PANDA|KOALA|PENGUIN|RAVEN|WHALE|DOLPHIN|OCEAN|RIVER|MOUNTAIN|DESERT|FOREST|ISLAND
HARBOR|BRIDGE|CASTLE|TOWER|LANTERN|COMPASS|ANCHOR|VOYAGE|JOURNEY|HORIZON|MIDNIGHT|TWILIGHT|AURORA|MEADOW
Good Morning|Fresh Bread|Hot Coffee|Open Late|Happy Birthday|Thank You|Keep Out|No Parking|One Way|Free WiFi
Best Pizza|Ice Cream|Live Music|Gone Fishing|Be Kind|Stay Wild|Dream Big|Hello World|Home Sweet Home|Enjoy Life
Coming Soon|Now Open|Grand Opening|Sold Out|Last Call|Lost and Found|Wet Paint|Do Not Disturb|Staff Only
Watch Your Step|Slow Down|Mind the Gap|Fresh Fish|Used Books|Vintage Records|Pet Shop|Night Owl|Sea Breeze
Blue Moon|Red Rocket|Silver Lining|Golden Hour|Northern Lights|Summer Camp|Winter Sale|Spring Fair
Autumn Harvest|Space Station|Robot Repair|Time Machine|Secret Garden|Magic Show|Pancake House|Noodle Bar
Taco Tuesday|Book Club|Game Over|Level Up|Press Start|High Score|Try Again|Well Done|Welcome Home|Bon Voyage
See You Soon|Good Luck|Get Well Soon|Just Married|Save the Date|Back in Five|Cash Only|Fresh Juice|Hot Dogs
Cold Drinks|Homemade Pie|Open 24 Hours|Route 66|Room 404|Gate 12|Platform 9|Exit 27|Since 1952|Apartment 3B
Mountain View|River Cafe|Ocean Drive|Maple Street|Cedar Lane|Harbor Lights|Sunset Diner|Moonlight Motel
Star Cinema|Lucky Cat|Happy Hour|Daily Specials|Fresh Flowers|Bike Repair|Record Store|Art Gallery|Tea House
Corner Shop|Night Market|Farmers Market|City Library|Fire Station|Post Office|Town Hall|Bus Stop|Ferry Terminal
Quiet Please|No Smoking|Keep Calm|Carpe Diem|Stay Curious|Think Different|Make It Happen|Never Give Up
""".split("\n")
OCR_TEXTS = [t.strip() for line in OCR_TEXTS for t in line.split("|") if t.strip()]
OCR_TEST_TEXTS = 60  # texts held out for the test set, one prompt each
OCR_TRAIN_TEMPLATES_PER_TEXT = 2  # every training text appears in two different scenes

# ---- preference prompts: subject × setting × style, each written here ----
SUBJECTS = [
    "an old lighthouse keeper", "a red fox", "a cup of steaming tea", "a vintage bicycle", "a snow leopard",
    "a child flying a kite", "a robot watering plants", "a stack of old books", "a tall sailing ship",
    "a hot air balloon", "a sleepy tabby cat", "a golden retriever puppy", "a bowl of ramen", "a grand piano",
    "a wooden cabin", "a knight in silver armor", "an astronaut", "a street musician with a guitar",
    "a hummingbird", "a pair of koi fish", "a bonsai tree", "a steam locomotive", "a glass terrarium",
    "a small green dragon", "a barn owl", "a ballerina mid-leap", "a fisherman mending nets",
    "a chef tossing vegetables in a pan", "a stone windmill", "a gothic cathedral", "a treehouse",
    "a vintage typewriter", "a red motorcycle", "a giant jellyfish", "a humpback whale", "a young deer",
    "a porcelain teapot", "a crystal chandelier", "a fruit stall", "a double-decker bus", "a sandcastle",
    "a mountain village", "a pair of worn sneakers", "a three-layer birthday cake", "a vase of peonies",
    "a samurai", "an old wizard reading a map", "a polar bear", "a scarlet macaw", "an elephant family",
    "a violin on a chair", "a paper lantern", "a brass pocket watch", "a campfire", "a tiny field mouse",
    "a stone bridge", "a yellow submarine", "a glass greenhouse", "a grandmother knitting", "a chess board mid-game",
]
SETTINGS = [
    "on a misty morning", "at sunset", "under a starry sky", "in a rainy city street", "in a sunlit kitchen",
    "on a snowy mountain ridge", "in an autumn forest", "on a quiet beach", "in a neon-lit alley",
    "in a cozy library", "in a field of wildflowers", "on a busy market square", "beside a frozen lake",
    "in a desert at noon", "in a bamboo grove", "on a rooftop garden", "in a candlelit room",
    "among coral reefs", "in a foggy harbor", "aboard a space station", "in a medieval courtyard",
    "surrounded by ferns", "on an empty country road", "at an old train station", "in a thunderstorm",
    "during cherry blossom season", "in a snowy village at night", "on a cliff above the sea",
    "in a cluttered workshop", "in a smoky jazz club", "beside a waterfall", "in a lavender field",
    "in an abandoned factory", "on a floating island", "in a Japanese garden", "in a Victorian parlor",
    "at dawn on the savanna", "inside a glass dome", "in a mountain meadow", "on a moonlit lake",
]
STYLES = [
    "a 35mm film photograph", "an oil painting", "a watercolor illustration", "a pencil sketch", "a digital painting",
    "a studio photograph with soft light", "a cinematic film still", "an isometric 3D render", "a low-poly 3D render",
    "a ukiyo-e woodblock print", "an art nouveau poster", "a pixel art scene", "a claymation still",
    "a children's book illustration", "an impressionist painting", "a charcoal drawing", "a comic book panel",
    "a macro photograph", "an aerial photograph", "a long-exposure photograph", "a vintage postcard",
    "a stained glass window", "a layered papercut artwork", "a gouache painting", "a golden-hour photograph",
    "a black-and-white photograph", "a tilt-shift photograph", "a piece of concept art",
    "a minimalist vector illustration", "a baroque painting", "a synthwave illustration", "an embroidery",
    "a mosaic", "a linocut print", "a polaroid photo",
]
PREFERENCE_TEMPLATES = [
    "{style} of {subject} {setting}",
    "{subject} {setting}, {bare}",
    "{subject} {setting}",
    "a close-up of {subject} {setting}, {bare}",
    "{style} of {subject} {setting}, highly detailed",
    "a wide view of {subject} {setting}, {bare}",
]
PREFERENCE_TRAIN, PREFERENCE_TEST = 450, 100


def _bare(style: str) -> str:
    """'an oil painting' → 'oil painting' (the style without its article, for templates that append it)."""
    return style.split(" ", 1)[1] if style.split(" ", 1)[0] in ("a", "an") else style


def ocr_sets(rng: random.Random) -> tuple[list[dict], list[dict]]:
    texts = OCR_TEXTS[:]
    rng.shuffle(texts)
    test_texts, train_texts = texts[:OCR_TEST_TEXTS], texts[OCR_TEST_TEXTS:]
    row = lambda template, text: {"prompt": template.format(text=text), "text": text}  # noqa: E731
    train = [row(t, text) for text in train_texts for t in rng.sample(OCR_TEMPLATES, OCR_TRAIN_TEMPLATES_PER_TEXT)]
    test = [row(rng.choice(OCR_TEMPLATES), text) for text in test_texts]
    return train, test


def preference_sets(rng: random.Random) -> tuple[list[str], list[str]]:
    pairs = [(s, p) for s in SUBJECTS for p in SETTINGS]
    chosen = rng.sample(pairs, PREFERENCE_TRAIN + PREFERENCE_TEST)  # distinct (subject, setting) pairs
    prompts = []
    for subject, setting in chosen:
        style = rng.choice(STYLES)
        prompts.append(rng.choice(PREFERENCE_TEMPLATES).format(subject=subject, setting=setting, style=style,
                                                                bare=_bare(style)))
    return prompts[PREFERENCE_TEST:], prompts[:PREFERENCE_TEST]


# ---- GenEval-style prompts: scenes of GenEval's six categories, each written one of several equivalent ways ----
# Scenes per category in the test set (GenEval's own has 553 prompts: all 80 single objects and ~100 of each other
# category) and in the training set (Flow-GRPO trains on prompts of GenEval's generator). Single objects are
# split in half, so both splits have some; counting has 80 × 3 scenes in all.
GENEVAL_TEST = dict(single_object=40, two_object=100, counting=80, colors=100, position=100, color_attr=100)
GENEVAL_TRAIN = dict(single_object=40, two_object=800, counting=160, colors=600, position=1000, color_attr=1000)
NUMBERS = {2: "two", 3: "three", 4: "four"}  # GenEval counts 2 to 4
PLURALS = {"person": "people", "sheep": "sheep", "knife": "knives", "computer mouse": "computer mice"}
PAIRS = ("skis", "scissors")  # one of them is "a pair of ..."
OPENINGS = ("a photo of", "an image of", "a picture of")  # training prompts vary; test prompts open as GenEval's
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _one(name: str, color: str | None = None) -> str:
    """'a red car', 'an umbrella', 'a pair of blue skis'."""
    if name in PAIRS:
        return f"a pair of {color + ' ' if color else ''}{name}"
    phrase = f"{color} {name}" if color else name
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(name: str) -> str:
    if name in PAIRS:
        return f"pairs of {name}"
    return PLURALS.get(name) or name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def geneval_scenes() -> dict[str, list[tuple]]:
    """Every scene of each category, once: a scene is what a prompt means, whatever its wording."""
    uncoloured = [c for c in COCO_CLASSES if c != "person"]  # as GenEval: a person's colour is no one thing
    return {
        "single_object": [(c,) for c in COCO_CLASSES],
        "two_object": list(itertools.combinations(COCO_CLASSES, 2)),
        "counting": [(c, n) for c in COCO_CLASSES for n in NUMBERS],
        "colors": [(c, k) for c in uncoloured for k in GENEVAL_COLORS],
        # A left of B is B right of A: each scene is stored once, with 'left of' or 'above'
        "position": [(a, rel, b) for a, b in itertools.permutations(COCO_CLASSES, 2) for rel in ("left of", "above")],
        "color_attr": [(a, ka, b, kb) for a, b in itertools.combinations(uncoloured, 2)
                       for ka, kb in itertools.permutations(GENEVAL_COLORS, 2)],
    }


def geneval_row(tag: str, scene: tuple, rng: random.Random, opening: str) -> dict:
    """One prompt with GenEval's metadata for `scene`, in a wording `rng` picks among the equivalent ones
    (the order of two objects; 'A left of B' or 'B right of A')."""
    if tag == "single_object":
        (c,) = scene
        return {"prompt": f"{opening} {_one(c)}", "tag": tag, "include": [{"class": c, "count": 1}]}
    if tag == "counting":
        c, n = scene
        return {"prompt": f"{opening} {NUMBERS[n]} {_plural(c)}", "tag": tag, "include": [{"class": c, "count": n}],
                "exclude": [{"class": c, "count": n + 1}]}
    if tag == "colors":
        c, k = scene
        return {"prompt": f"{opening} {_one(c, k)}", "tag": tag, "include": [{"class": c, "count": 1, "color": k}]}
    if tag == "position":
        a, rel, b = scene if rng.random() < 0.5 else (scene[2], OPPOSITE[scene[1]], scene[0])
        # GenEval's layout: the reference object first, the placed one says where it is relative to include[0]
        return {"prompt": f"{opening} {_one(a)} {rel} {_one(b)}", "tag": tag,
                "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]}
    parts = [(scene[0], None), (scene[1], None)] if tag == "two_object" else [scene[:2], scene[2:]]
    rng.shuffle(parts)
    words = [_one(c, k) for c, k in parts]
    include = [{"class": c, "count": 1, **({"color": k} if k else {})} for c, k in parts]
    return {"prompt": f"{opening} {words[0]} and {words[1]}", "tag": tag, "include": include}


def geneval_sets(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for tag, scenes in geneval_scenes().items():
        chosen = rng.sample(scenes, GENEVAL_TEST[tag] + GENEVAL_TRAIN[tag])  # distinct scenes: the split is by meaning
        test += [geneval_row(tag, s, rng, "a photo of") for s in chosen[: GENEVAL_TEST[tag]]]
        train += [geneval_row(tag, s, rng, rng.choice(OPENINGS)) for s in chosen[GENEVAL_TEST[tag] :]]
    rng.shuffle(train)
    return train, test


def build() -> dict[str, str]:
    """File name → content of every prompt set."""
    rng = random.Random(SEED)
    ocr_train, ocr_test = ocr_sets(rng)
    pref_train, pref_test = preference_sets(rng)
    geneval_train, geneval_test = geneval_sets(random.Random(SEED))  # its own stream: the sets above stay as they were
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    return {
        "ocr_train.jsonl": jsonl(ocr_train), "ocr_test.jsonl": jsonl(ocr_test),
        "preference_train.txt": "".join(p + "\n" for p in pref_train),
        "preference_test.txt": "".join(p + "\n" for p in pref_test),
        "geneval_train.jsonl": jsonl(geneval_train), "geneval_test.jsonl": jsonl(geneval_test),
    }


if __name__ == "__main__":
    assert len(set(OCR_TEXTS)) == len(OCR_TEXTS), "a text is listed twice"
    for name, content in build().items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(content)
        print(f"{name}: {content.count(chr(10))} prompts")
