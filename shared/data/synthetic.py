"""Synthetic LaMP users with a known group structure, for studies and tests.

Four tasks, one recipe. Every item is about one of a few topics, told with words from that topic's
small word bank plus neutral filler. Users fall into latent groups; a group maps each topic to the
answer its members give; a user may have quirks: topics where it overrides its group's answer
with its own. So a user's answer is a function of (topic in the text, group, quirks): learnable
from the text, shared within a group, partly personal.

  LaMP_2  movie tagging: a movie description on a theme (space, heists, ghosts, ...); a group maps
          each theme to a tag (one group tags space films "sci-fi", another "dystopia").
  LaMP_4  headline generation: a short news article on a desk's topic (politics, sports, ...)
          that states a key phrase ("governor rejects reform bill"); a group writes every
          headline in its own style ("Politics: Governor rejects reform bill", "governor rejects
          reform bill, says report"), so the group shows in the wording, which ROUGE measures.
          A quirk is a topic where the user writes in another style.
  LaMP_3  product rating (score 1-5, MAE / RMSE): each group its own score per product category;
  LaMP_5  paper title generation from an abstract: each group its own title style
          (both in shared/data/synthetic_tasks.py).

History sizes follow a Pareto law (a few long histories, many short ones, like real LaMP users);
with size_law="uniform" they are uniform between min_profile and max_profile, with
size_law="fixed" every user has exactly min_profile items.

Files are the official LaMP pair plus a "user_id" field, and groups.json holding the ground
truth: each user's group, each group's topic->answer map, each user's quirks.
"""

import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shared.data import synthetic_tasks as more
from shared.data.lamp import MOVIE_TAGS, LampDataError, profile_to_example, task_spec


class SyntheticArgumentError(ValueError):
    """Generator arguments no population can be drawn from (`proper synth`, data.synthetic)."""


SIZE_LAWS = ("pareto", "uniform", "fixed")

# ---------------------------------------------------------------- LaMP_2: movies
# theme -> words that give it away; kept disjoint so the theme is readable from the text
THEMES = {
    "space": ["starship", "galaxy", "orbit", "astronaut", "alien", "planet"],
    "heist": ["vault", "robbery", "crew", "casino", "safecracker", "getaway"],
    "ghost": ["haunted", "spirit", "mansion", "seance", "curse", "apparition"],
    "war": ["soldier", "battlefield", "trench", "regiment", "bombing", "frontline"],
    "court": ["trial", "lawyer", "jury", "verdict", "courtroom", "testimony"],
    "love": ["wedding", "sweetheart", "kiss", "letters", "proposal", "heartbreak"],
    "school": ["teacher", "classroom", "exam", "student", "campus", "graduation"],
    "magic": ["wizard", "dragon", "spell", "kingdom", "enchanted", "sorceress"],
    "family": ["siblings", "grandmother", "reunion", "inheritance", "farmhouse", "holidays"],
    "sport": ["coach", "championship", "stadium", "rookie", "tournament", "underdog"],
}
FILLER = ["a", "young", "old", "woman", "man", "story", "city", "night", "secret", "journey",
          "friend", "stranger", "life", "world", "years", "small", "town", "must", "find", "past"]


def _description(rng: random.Random, theme: str) -> str:
    words = rng.sample(THEMES[theme], 3) + rng.sample(FILLER, 5)
    rng.shuffle(words)
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _movie(rng: random.Random, theme: str, tag: str, item_id: str) -> dict:
    """A movie on `theme` that the user tags `tag`."""
    return {"id": item_id, "description": _description(rng, theme), "tag": tag}


def theme_of(description: str) -> str | None:
    """The theme whose word bank the description uses (ground-truth reader for studies)."""
    words = set(description.lower().rstrip(".").split())
    hits = [th for th, bank in THEMES.items() if words & set(bank)]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------- LaMP_4: news headlines
# topic -> who acts, what it does (the key phrase is "<who> <what>") and cue words that give the
# topic away. Cue words are disjoint across topics and absent from every other bank, so the topic
# is readable from the article; the phrases are lowercase letters and spaces, so style_of can
# parse a headline back. Articles stay near 30 words (about 45 SmolLM tokens): with the prompt
# and the headline, an example fits the 160-token max_len of the SmolLM configs.
TOPICS = {
    "politics": {"who": ["senate", "governor", "city council", "prime minister"],
                 "what": ["approves new budget", "rejects reform bill", "delays election", "announces tax cut"],
                 "cue": ["ballot", "lawmakers", "campaign", "coalition", "voters", "cabinet"]},
    "sports": {"who": ["home team", "star striker", "league", "head coach"],
               "what": ["wins title", "signs record contract", "loses final", "breaks scoring record"],
               "cue": ["stadium", "playoffs", "fans", "season", "referee", "tournament"]},
    "science": {"who": ["research team", "space agency", "university lab", "observatory"],
                "what": ["discovers new species", "launches probe", "publishes key study", "finds water on moon"],
                "cue": ["telescope", "experiment", "journal", "laboratory", "microscope", "physicists"]},
    "business": {"who": ["tech giant", "central bank", "carmaker", "retail chain"],
                 "what": ["cuts jobs", "raises interest rates", "reports record profit", "opens new factory"],
                 "cue": ["shareholders", "market", "investors", "earnings", "stocks", "economy"]},
    "health": {"who": ["hospital", "health ministry", "medical board", "drug maker"],
               "what": ["warns of flu surge", "approves vaccine", "opens new ward", "recalls medicine"],
               "cue": ["patients", "nurses", "symptoms", "treatment", "virus", "clinic"]},
    "travel": {"who": ["airline", "national park", "cruise line", "tourism board"],
               "what": ["adds summer routes", "closes main trail", "cancels voyages", "reports record visitors"],
               "cue": ["passengers", "airport", "hotels", "tourists", "luggage", "beaches"]},
    "culture": {"who": ["city museum", "famous painter", "film festival", "orchestra"],
                "what": ["unveils lost painting", "wins top award", "announces final tour", "returns stolen statue"],
                "cue": ["gallery", "audience", "artists", "exhibition", "critics", "concert"]},
    "weather": {"who": ["storm", "heat wave", "flood", "heavy snow"],
                "what": ["hits coast", "breaks records", "closes schools", "cuts power"],
                "cue": ["forecasters", "rainfall", "temperatures", "winds", "meteorologists", "thunder"]},
}
DAYS = ["On Monday", "On Tuesday", "On Wednesday", "On Thursday", "On Friday", "This weekend"]
REASONS = ["weeks of debate", "a long review", "months of talks", "a surprise vote", "pressure from residents",
           "a tense meeting"]
CLOSINGS = ["Residents shared mixed reactions online.", "Further details are expected later this month.",
            "Officials declined to comment further.", "The decision drew attention across the region."]

# style -> headline template. {topic} / {phrase} are lowercase, {Topic} / {Phrase} capitalised.
# The fixed words differ from style to style: that is what ROUGE sees of a group.
STYLES = {
    "colon": "{Topic}: {Phrase}",
    "breaking": "Breaking - {Phrase} in {topic}",
    "says": "{phrase}, says report",
    "why": "Why {phrase} matters for {topic}",
    "update": "{Topic} update: {phrase}, sources confirm",
    "watch": "Watch: {Phrase} ({topic})",
    "experts": "Experts react as {phrase}",
    "known": "{Phrase} - what we know so far",
}


def headline(style: str, topic: str, phrase: str) -> str:
    return STYLES[style].format(topic=topic, Topic=topic.capitalize(), phrase=phrase, Phrase=phrase.capitalize())


def _article(rng: random.Random, topic: str) -> tuple[str, str]:
    """(article, key phrase): the key phrase comes first, so a cut prompt still holds it."""
    bank = TOPICS[topic]
    phrase = f"{rng.choice(bank['who'])} {rng.choice(bank['what'])}"
    cues = rng.sample(bank["cue"], 3)
    text = (f"{rng.choice(DAYS)}, the {phrase} after {rng.choice(REASONS)}. "
            f"Reports mention the {cues[0]}, the {cues[1]} and the {cues[2]}. "
            f"{rng.choice(CLOSINGS)}")
    return text, phrase


def _news(rng: random.Random, topic: str, style: str, item_id: str) -> dict:
    """An article on `topic` that the user headlines in `style`."""
    text, phrase = _article(rng, topic)
    return {"id": item_id, "text": text, "title": headline(style, topic, phrase)}


def topic_of(article: str) -> str | None:
    """The topic whose cue words the article uses (ground-truth reader for studies)."""
    return more.cue_of(article, TOPICS)


def _style_pattern(template: str) -> re.Pattern:
    return more.template_pattern(template, "topic", TOPICS)


_STYLE_PATTERNS = {s: _style_pattern(t) for s, t in STYLES.items()}


def style_of(title: str) -> str | None:
    """The style a headline is written in, None unless exactly one matches (ground-truth reader)."""
    hits = [s for s, pat in _STYLE_PATTERNS.items() if pat.fullmatch(title)]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------- the two tasks, one recipe
@dataclass(frozen=True)
class _Task:
    topics: dict                                   # topic -> its word bank
    answers: list[str]                             # what a group or a quirk maps a topic to
    group_prefs: Callable                          # (rng, topics, n_groups) -> [{topic: answer}]
    item: Callable                                 # (rng, topic, answer, item id) -> a profile item


def _movie_groups(rng, topics, n_groups):
    return [{th: rng.choice(MOVIE_TAGS) for th in topics} for _ in range(n_groups)]


def _news_groups(rng, topics, n_groups):
    # one style per group, distinct across groups: two groups writing alike could not be told apart
    return [{t: style for t in topics} for style in rng.sample(sorted(STYLES), n_groups)]


_TASKS = {"LaMP_2": _Task(THEMES, MOVIE_TAGS, _movie_groups, _movie),
          "LaMP_3": _Task(more.PRODUCTS, more.RATINGS, more.rating_groups, more.review_item),
          "LaMP_4": _Task(TOPICS, sorted(STYLES), _news_groups, _news),
          "LaMP_5": _Task(more.FIELDS, sorted(more.PAPER_STYLES), more.title_groups, more.paper_item)}
# tasks whose groups each take one style of a fixed set: at most that many groups
_STYLE_SETS = {"LaMP_4": STYLES, "LaMP_5": more.PAPER_STYLES}


def _draw(rng: random.Random, gen: _Task, topics: list[str], prefs: dict, item_id: str) -> dict:
    """One item on a random topic, answered as the user answers that topic."""
    t = rng.choice(topics)
    return gen.item(rng, t, prefs[t], item_id)


def _task_name(task: str) -> str:
    try:
        name = task_spec(task).name  # "lamp-4", "LAMP_4": spelt as lamp.py accepts them
    except LampDataError:
        name = str(task)
    if name not in _TASKS:
        raise SyntheticArgumentError(f"synthetic task {task!r}: expected one of {', '.join(_TASKS)}")
    return name


def _history_size(rng: random.Random, law: str, low: int, high: int, shape: float) -> int:
    if law == "fixed":   # draws nothing: the rest of the draw is as it would be
        return low
    if law == "uniform":
        return rng.randint(low, high)
    # classic Pareto with scale low: P(size > x) = (low / x) ** shape
    return min(high, int(low * rng.paretovariate(shape)))


def _check_arguments(task, n_users, n_groups, min_profile, max_profile, pareto_shape, quirk_prob, size_law):
    if n_users < 1 or n_groups < 1:
        raise SyntheticArgumentError("need at least one user and one group")
    if not 1 <= min_profile <= max_profile:
        raise SyntheticArgumentError(f"need 1 <= min_profile <= max_profile, got {min_profile}, {max_profile}")
    if pareto_shape <= 0 or not 0 <= quirk_prob <= 1:
        raise SyntheticArgumentError("need pareto_shape > 0 and 0 <= quirk_prob <= 1")
    if size_law not in SIZE_LAWS:
        raise SyntheticArgumentError(f"size_law {size_law!r}: expected one of {', '.join(SIZE_LAWS)}")
    styles = _STYLE_SETS.get(task)
    if styles is not None and n_groups > len(styles):
        raise SyntheticArgumentError(f"{task} has {len(styles)} styles, one per group: "
                                     f"n_groups must be <= {len(styles)}, got {n_groups}")


def _write_json(path: Path, obj) -> None:
    # temp file in the same directory + os.replace: readers never see a half-written file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_synthetic_lamp(out_dir, n_users: int = 20, n_groups: int = 3, seed: int = 0,
                         min_profile: int = 4, max_profile: int = 40, pareto_shape: float = 1.5,
                         quirk_prob: float = 0.2, task: str = "LaMP_2", size_law: str = "pareto") -> Path:
    """Write questions.json, outputs.json and groups.json into out_dir; return out_dir."""
    task = _task_name(task)
    _check_arguments(task, n_users, n_groups, min_profile, max_profile, pareto_shape, quirk_prob, size_law)
    gen = _TASKS[task]
    rng = random.Random(seed)
    topics = sorted(gen.topics)

    group_prefs = gen.group_prefs(rng, topics, n_groups)
    questions, golds, truth = [], [], {}
    for u in range(n_users):
        uid = f"u{u:04d}"
        group = u % n_groups if u < n_groups else rng.randrange(n_groups)  # every group used
        prefs = dict(group_prefs[group])
        quirks = {}
        for t in topics:
            if rng.random() < quirk_prob:
                quirks[t] = prefs[t] = rng.choice([a for a in gen.answers if a != prefs[t]])
        size = _history_size(rng, size_law, min_profile, max_profile, pareto_shape)
        profile = [_draw(rng, gen, topics, prefs, f"{uid}-{j}") for j in range(size + 1)]
        # the question is one more item, asked exactly as the reader turns profile items into prompts
        query = profile_to_example(task, profile.pop(), uid, size)
        questions.append({"id": f"q{u:04d}", "input": query.input, "profile": profile, "user_id": uid})
        golds.append({"id": f"q{u:04d}", "output": query.output})
        truth[uid] = {"group": group, "quirks": quirks}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "questions.json", questions)
    _write_json(out / "outputs.json", {"task": task, "golds": golds})
    _write_json(out / "groups.json", {
        "task": task, "seed": seed, "n_groups": n_groups,
        "users": {uid: t["group"] for uid, t in truth.items()},
        "group_prefs": {str(g): p for g, p in enumerate(group_prefs)},
        "quirks": {uid: t["quirks"] for uid, t in truth.items()},
    })
    return out
