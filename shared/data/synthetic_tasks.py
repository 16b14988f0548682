"""The LaMP_3 and LaMP_5 families of `proper synth` (shared/data/synthetic.py holds the recipe, the
LaMP_2 and LaMP_4 families and the writer).

  LaMP_3  product rating: a short review of a product of one category (kitchen, books, ...) whose
          cue words give the category away; a group maps each category to the score (1-5) its
          members give it (one group rates kitchen goods 5, another 2), a quirk is a category the
          user rates its own way. The review text carries no verdict, so the score is learnable
          only from (category, group, quirks): what MAE / RMSE measure.
  LaMP_5  scholarly title generation: a short abstract in one field (vision, genomics, ...) that
          states a key phrase ("graph attention for protein folding"); a group titles every paper
          in its own style ("Towards graph attention for protein folding", "Graph attention for
          protein folding revisited"), a quirk is a field the user titles in another style.

Both keep the profile fields of the official files: LaMP_3 {id, text, score} (score a string
"1".."5", as LaMP ships it), LaMP_5 {id, abstract, title}.
"""
from __future__ import annotations

import random
import re

# ---------------------------------------------------------------- LaMP_3: product reviews
RATINGS = ["1", "2", "3", "4", "5"]
# category -> the product reviewed and cue words; cue words are disjoint across categories
PRODUCTS = {
    "kitchen": {"what": ["blender", "kettle", "frying pan", "toaster"],
                "cue": ["recipes", "stovetop", "countertop", "dishwasher", "breakfast", "cooking"]},
    "books": {"what": ["novel", "paperback", "cookbook", "memoir"],
              "cue": ["chapters", "author", "plot", "pages", "narrator", "bookshelf"]},
    "garden": {"what": ["hose", "lawn mower", "rake", "planter"],
               "cue": ["backyard", "flowers", "soil", "weeds", "seedlings", "patio"]},
    "toys": {"what": ["puzzle", "doll", "toy car", "board game"],
             "cue": ["kids", "birthday", "playroom", "grandson", "nephew", "playtime"]},
    "audio": {"what": ["headphones", "speaker", "earbuds", "radio"],
              "cue": ["bass", "volume", "bluetooth", "playlist", "microphone", "podcasts"]},
    "outdoor": {"what": ["tent", "backpack", "sleeping bag", "flashlight"],
                "cue": ["hiking", "campsite", "trail", "rain", "mountains", "camping"]},
}
_REVIEW_OPENINGS = ["I bought this {what} last month.", "Got the {what} as a gift.",
                    "Ordered this {what} online.", "This is my second {what}."]
_REVIEW_FILLER = ["It arrived on time.", "Shipping took a week.", "The box was plain.",
                  "I used it every day.", "My partner tried it too.", "I compared a few before buying."]


def _review(rng: random.Random, category: str) -> str:
    bank = PRODUCTS[category]
    cues = rng.sample(bank["cue"], 3)
    return (f"{rng.choice(_REVIEW_OPENINGS).format(what=rng.choice(bank['what']))} "
            f"I mostly use it for {cues[0]}, {cues[1]} and {cues[2]}. {rng.choice(_REVIEW_FILLER)}")


def review_item(rng: random.Random, category: str, score: str, item_id: str) -> dict:
    """A review of a product in `category` that the user scores `score`."""
    return {"id": item_id, "text": _review(rng, category), "score": score}


def rating_groups(rng: random.Random, topics: list[str], n_groups: int) -> list[dict]:
    """Each group's score per category."""
    return [{c: rng.choice(RATINGS) for c in topics} for _ in range(n_groups)]


def category_of(review: str) -> str | None:
    """The category whose cue words the review uses (ground-truth reader for studies)."""
    words = set(re.findall(r"[a-z]+", review.lower()))
    hits = [c for c, bank in PRODUCTS.items() if words & set(bank["cue"])]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------- LaMP_5: paper titles
# field -> methods and problems (the key phrase is "<method> for <problem>") and cue words; all
# lowercase letters and spaces, so paper_style_of can parse a title back
FIELDS = {
    "vision": {"method": ["contrastive pretraining", "vision transformers", "sparse convolutions"],
               "problem": ["object detection", "image segmentation", "depth estimation"],
               "cue": ["pixels", "images", "cameras", "video", "scenes", "photographs"]},
    "language": {"method": ["prompt tuning", "retrieval augmentation", "sparse attention"],
                 "problem": ["machine translation", "question answering", "summarization"],
                 "cue": ["sentences", "tokens", "corpora", "grammar", "dialogue", "vocabulary"]},
    "genomics": {"method": ["graph attention", "variational inference", "deep sequence models"],
                 "problem": ["protein folding", "gene expression", "variant calling"],
                 "cue": ["cells", "genomes", "mutations", "proteins", "sequencing", "enzymes"]},
    "robotics": {"method": ["model predictive control", "imitation learning", "reward shaping"],
                 "problem": ["robot grasping", "legged locomotion", "drone navigation"],
                 "cue": ["actuators", "grippers", "sensors", "torque", "manipulators", "joints"]},
    "systems": {"method": ["learned indexes", "adaptive caching", "speculative execution"],
                "problem": ["query optimization", "cluster scheduling", "storage compaction"],
                "cue": ["servers", "latency", "throughput", "workloads", "datacenters", "disks"]},
    "economics": {"method": ["causal forests", "structural estimation", "mechanism design"],
                  "problem": ["labor markets", "auction pricing", "housing demand"],
                  "cue": ["prices", "wages", "households", "firms", "consumers", "markets"]},
}
PAPER_STYLES = {
    "towards": "Towards {phrase}",
    "revisited": "{Phrase} revisited",
    "study": "An empirical study of {phrase} in {field}",
    "simple": "A simple approach to {phrase}",
    "colon": "{Field}: {phrase}",
    "rethinking": "Rethinking {phrase}",
    "matters": "Why {phrase} matters",
    "scale": "{Phrase} at scale",
}
_ABSTRACT_ENDS = ["Code is released.", "Results hold across settings.", "We discuss limitations.",
                  "Ablations confirm each part."]


def paper_title(style: str, field: str, phrase: str) -> str:
    return PAPER_STYLES[style].format(field=field, Field=field.capitalize(), phrase=phrase,
                                      Phrase=phrase.capitalize())


def abstract(rng: random.Random, field: str) -> tuple[str, str]:
    """(abstract, key phrase): the key phrase comes first, so a cut prompt still holds it."""
    bank = FIELDS[field]
    phrase = f"{rng.choice(bank['method'])} for {rng.choice(bank['problem'])}"
    cues = rng.sample(bank["cue"], 3)
    text = (f"We propose {phrase}. Our experiments use {cues[0]}, {cues[1]} and {cues[2]} "
            f"and improve on strong baselines. {rng.choice(_ABSTRACT_ENDS)}")
    return text, phrase


def paper_item(rng: random.Random, field: str, style: str, item_id: str) -> dict:
    """A paper in `field` that the user titles in `style`."""
    text, phrase = abstract(rng, field)
    return {"id": item_id, "abstract": text, "title": paper_title(style, field, phrase)}


def title_groups(rng: random.Random, topics: list[str], n_groups: int) -> list[dict]:
    # one style per group, distinct across groups (as LaMP_4's headline styles)
    return [{f: style for f in topics} for style in rng.sample(sorted(PAPER_STYLES), n_groups)]


def cue_of(text: str, banks: dict) -> str | None:
    """The one bank (topic, field) whose cue words `text` uses, None where none or several do
    (ground-truth reader for studies; LaMP_4's topics and LaMP_5's fields alike)."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    hits = [name for name, bank in banks.items() if words & set(bank["cue"])]
    return hits[0] if len(hits) == 1 else None


def template_pattern(template: str, slot: str, names) -> re.Pattern:
    """A style template ("{Slot}: {phrase}" ...) as a regex: {slot} / {Slot} match one of `names`."""
    alts = "|".join(names)
    parts = {"{" + slot + "}": f"(?:{alts})", "{" + slot.title() + "}": f"(?:{alts.title()})",
             "{phrase}": "[a-z][a-z ]*", "{Phrase}": "[A-Z][a-z ]*"}
    return re.compile("".join(parts.get(p, re.escape(p)) for p in re.split(r"(\{\w+\})", template)))


def field_of(text: str) -> str | None:
    """The field whose cue words the abstract uses (ground-truth reader for studies)."""
    return cue_of(text, FIELDS)


def _pattern(template: str) -> re.Pattern:
    return template_pattern(template, "field", FIELDS)


_PAPER_PATTERNS = {s: _pattern(t) for s, t in PAPER_STYLES.items()}


def paper_style_of(title: str) -> str | None:
    """The style a title is written in, None unless exactly one matches (ground-truth reader)."""
    hits = [s for s, pat in _PAPER_PATTERNS.items() if pat.fullmatch(title)]
    return hits[0] if len(hits) == 1 else None
