"""Secret-sharer canaries (Carlini et al., 2019, "The Secret Sharer"): privacy.canaries.

A canary is one training item put into a chosen user's history on that user's own client, repeated
`repeats` times: a random phrase as its input and a random secret of `digits` digits as its output
("7 2 9 4", digits apart so that every tokenizer sees one token per digit). Nothing about it
travels: every client derives the same canaries from the config's seed and the users' ids, and adds
only its own users'. `proper audit` (sim/audit.py) derives them again to measure how exposed each
secret is in the models the run released (shared/evaluation/audit.py), and writes them to
<run>/canaries.json.

The choice of users: the `users` users with a history whose sha1(seed, user id) is smallest, among
the users of the run's data (data.path as the run reads it): the same on every client.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from functools import lru_cache

from shared.data.lamp import Example, User

# the canary's phrase: random words, so no real item resembles it
WORDS = ("amber", "basil", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kelp", "lantern", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "tundra",
         "umber", "velvet", "willow", "xenon", "yarrow", "zephyr", "anvil", "birch", "cinder", "dune",
         "falcon", "glacier")
PHRASE_WORDS = 6


@dataclass
class Canary:
    user: str
    input: str       # the prompt the secret follows
    secret: str      # the output: digits separated by spaces
    digits: int
    repeats: int

    def example(self, j: int) -> Example:
        return Example(id=f"{self.user}/canary{j}", user=self.user, input=self.input, output=self.secret)


def is_canary(example: Example) -> bool:
    """Whether a training item is a canary copy (Canary.example's id)."""
    return "/canary" in example.id


def secret_text(number: int, digits: int) -> str:
    """0 <= number < 10**digits as the canary's output text: '0 4 1 7'."""
    return " ".join(f"{number:0{digits}d}")


def _rank_key(seed: int, user_id: str) -> str:
    return hashlib.sha1(f"canary:{seed}:{user_id}".encode()).hexdigest()


def choose_users(user_ids: list[str], n: int, seed: int) -> list[str]:
    return sorted(user_ids, key=lambda u: _rank_key(seed, u))[:n]


def make_canaries(user_ids: list[str], n: int, repeats: int, digits: int, seed: int,
                  marker: str = "description:") -> list[Canary]:
    """The canaries of the `n` chosen users among `user_ids` (users with a history)."""
    out = []
    for uid in choose_users(user_ids, n, seed):
        rng = random.Random(_rank_key(seed, uid))
        phrase = " ".join(rng.choice(WORDS) for _ in range(PHRASE_WORDS))
        out.append(Canary(uid, f"{marker} {phrase}".strip(), secret_text(rng.randrange(10 ** digits), digits),
                          digits, repeats))
    return out


@lru_cache(maxsize=4)
def _users_with_history(path: str, task, holdout: int, max_users, longest: bool) -> tuple[str, ...]:
    from shared.data.lamp import load_lamp
    _, users = load_lamp(path, task=task, holdout=holdout, max_users=max_users, longest=longest)
    return tuple(u.user_id for u in users if u.train)


def run_canaries(cfg, users: list[User] | None = None) -> list[Canary]:
    """The run's canaries (privacy.canaries), chosen among the users of its data: data.path where
    it can be read, else `users` (a deployed client's own files)."""
    c = cfg.privacy.canaries
    if int(c.users) <= 0:
        return []
    d = cfg.data
    try:
        ids = list(_users_with_history(str(d.path), d.task, int(d.holdout), d.max_users, bool(d.longest)))
    except (OSError, ValueError):
        if users is None:
            raise
        ids = [u.user_id for u in users if u.train]
    from shared.data.lamp import _COMPACT_MARKERS, task_spec
    spec_name = task_spec(d.task).name if d.task else None
    marker = _COMPACT_MARKERS.get(spec_name, "description:") if spec_name else "description:"
    return make_canaries(ids, int(c.users), int(c.repeats), int(c.digits), int(c.seed), marker)


def with_canaries(users: list[User], canaries: list[Canary]) -> list[User]:
    """New User objects: each canary's item `repeats` times at the end of its user's training items
    (never in val or test); users without one are passed through as they are."""
    by_user = {c.user: c for c in canaries}
    out = []
    for u in users:
        c = by_user.get(u.user_id)
        out.append(u if c is None else User(u.user_id, u.train + [c.example(j) for j in range(c.repeats)],
                                            u.val, u.test))
    return out


def as_records(canaries: list[Canary]) -> list[dict]:
    return [asdict(c) for c in canaries]
