"""Synthetic LaMP_2 users with a known group structure, for studies and tests.

Every movie description is about one of a few themes (space, heists, ghosts, ...), told with
words from that theme's small word bank plus neutral filler. Users fall into latent groups;
a group maps each theme to the tag its members give such movies (one group tags space films
"sci-fi", another "dystopia"). A user may have quirks: themes where it overrides its group's
tag with its own. So a user's tag is a function of (theme in the text, group, quirks): learnable
from the text, shared within a group, partly personal. History sizes follow a Pareto law
(a few long histories, many short ones), like real LaMP users.

Files are the official LaMP_2 pair plus a "user_id" field, and groups.json holding the ground
truth: each user's group, each group's theme->tag map, each user's quirks.
"""

import json
import os
import random
import tempfile
from pathlib import Path

from shared.data.lamp import MOVIE_TAGS, movie_prompt

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


def _pick_tag(rng: random.Random, exclude: str | None = None) -> str:
    return rng.choice([t for t in MOVIE_TAGS if t != exclude])


def _description(rng: random.Random, theme: str) -> str:
    words = rng.sample(THEMES[theme], 3) + rng.sample(FILLER, 5)
    rng.shuffle(words)
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def theme_of(description: str) -> str | None:
    """The theme whose word bank the description uses (ground-truth reader for studies)."""
    words = set(description.lower().rstrip(".").split())
    hits = [th for th, bank in THEMES.items() if words & set(bank)]
    return hits[0] if len(hits) == 1 else None


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
                         quirk_prob: float = 0.2) -> Path:
    """Write questions.json, outputs.json and groups.json into out_dir; return out_dir."""
    if n_users < 1 or n_groups < 1:
        raise ValueError("need at least one user and one group")
    if not 1 <= min_profile <= max_profile:
        raise ValueError(f"need 1 <= min_profile <= max_profile, got {min_profile}, {max_profile}")
    if pareto_shape <= 0 or not 0 <= quirk_prob <= 1:
        raise ValueError("need pareto_shape > 0 and 0 <= quirk_prob <= 1")
    rng = random.Random(seed)
    themes = sorted(THEMES)

    group_prefs = [{th: _pick_tag(rng) for th in themes} for _ in range(n_groups)]
    questions, golds, truth = [], [], {}
    for u in range(n_users):
        uid = f"u{u:04d}"
        group = u % n_groups if u < n_groups else rng.randrange(n_groups)  # every group used
        prefs = dict(group_prefs[group])
        quirks = {}
        for th in themes:
            if rng.random() < quirk_prob:
                quirks[th] = prefs[th] = _pick_tag(rng, exclude=prefs[th])
        # classic Pareto with scale min_profile: P(size > x) = (min_profile / x) ** shape
        size = min(max_profile, int(min_profile * rng.paretovariate(pareto_shape)))

        def item(j):
            th = rng.choice(themes)
            return {"id": f"{uid}-{j}", "description": _description(rng, th), "tag": prefs[th]}

        profile = [item(j) for j in range(size)]
        query = item(size)
        questions.append({"id": f"q{u:04d}", "input": movie_prompt(query["description"]),
                          "profile": profile, "user_id": uid})
        golds.append({"id": f"q{u:04d}", "output": query["tag"]})
        truth[uid] = {"group": group, "quirks": quirks}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "questions.json", questions)
    _write_json(out / "outputs.json", {"task": "LaMP_2", "golds": golds})
    _write_json(out / "groups.json", {
        "seed": seed, "n_groups": n_groups,
        "users": {uid: t["group"] for uid, t in truth.items()},
        "group_prefs": {str(g): p for g, p in enumerate(group_prefs)},
        "quirks": {uid: t["quirks"] for uid, t in truth.items()},
    })
    return out
