"""Retrieval over a user's own profile: BM25 ranks the user's history items against a query, and
the top k go into the query's prompt, written as the LaMP paper writes them (Salemi et al. 2023,
in-prompt augmentation). Used by method=rag (the frozen backbone with retrieval) and, with
retrieval.k > 0, by every trained stage, at training and evaluation alike, and so by what serves
(client/serving.py: a served prompt retrieves as a val question does) and audits (sim/audit.py) such
a run (docs/decisions.md, "Retrieval").

Private by construction: it runs where the user's data is, on the client that holds the user
(client/trainer.py), over that user's items alone; nothing of it is sent.

What a query may retrieve: the user's training items (the history the run trains on), never an
item of another user, never a held-out (val) item, and a training example never its own item, so
no target label is in its own prompt. Val and test queries retrieve from all training items.

How an item is written, per task (the item's text is what follows the task's marker in its prompt,
e.g. LaMP_2's "description:"; its label or title is the example's output):
  LaMP_2   the tag for the movie: "<description>" is "<tag>"
  LaMP_2N  the category for the article: "<text>" is "<category>"
  LaMP_3   <score> is the score for "<review>"
  LaMP_4   "<title>" is the title for "<article>"        (LaMP_5 the same with the abstract)
  LaMP_1   "<title>"                                     (LaMP_7 "<tweet>")
joined by ", and ", then the closing (". ", LaMP_5 ". Following the given patterns ", LaMP_7 " are
written by a person. Following the given patterns ") and the question itself.

The prompt stays within its token budget by cutting the retrieved items, never the question: the
lowest-ranked items go first, the rest share the room left evenly (an item shorter than its share
passes the remainder on), cut in their text, never in the label (shared/data/encode.py).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Collection

from shared.data.tasks import TaskSpec, User

K1, B = 1.5, 0.75    # BM25's term-frequency saturation and length normalisation (the Okapi defaults)
MIN_BODY = 8         # tokens of an item's text below which the item is dropped rather than cut further


@dataclass(frozen=True)
class Retrieved:
    """The items retrieved for one query, as they go into its prompt."""
    items: tuple[tuple[str, str, str], ...]   # (head, text, tail) in rank order: only the text is cut
    sources: tuple[str, ...]                  # the retrieved profile items' example ids, same order
    sep: str = ", and "
    closing: str = ". "

    def render(self, question: str, texts: list[str] | None = None) -> str:
        """The augmented prompt: the items (their texts replaced by `texts`, cut ones) then the question."""
        texts = [t for _, t, _ in self.items] if texts is None else texts
        return self.sep.join(h + t + tail for (h, _, tail), t in zip(self.items, texts)) + self.closing + question


@dataclass(frozen=True)
class Format:
    marker: str                                           # the item's text follows it in the task's prompt
    item: Callable[[str, str], tuple[str, str, str]]      # (text, output) -> (head, text, tail)
    document: Callable[[str, str], str]                   # (text, output) -> what BM25 indexes
    closing: str = ". "


def _titled(text: str, out: str) -> tuple[str, str, str]:
    return f'"{out}" is the title for "', text, '"'


def _quoted_output(text: str, out: str) -> tuple[str, str, str]:
    return '"', out, '"'


def _text_only(text: str, out: str) -> str:
    return text


def _output_and_text(text: str, out: str) -> str:
    return f"{out} {text}"


PATTERNS = ". Following the given patterns "
FORMATS = {
    "LaMP_1": Format("paper:", _quoted_output, _output_and_text),
    "LaMP_2": Format("description:", lambda t, o: ('the tag for the movie: "', t, f'" is "{o}"'), _text_only),
    "LaMP_2N": Format("article:", lambda t, o: ('the category for the article: "', t, f'" is "{o}"'), _text_only),
    "LaMP_3": Format("review:", lambda t, o: (f'{o} is the score for "', t, '"'), _text_only),
    "LaMP_4": Format("article:", _titled, _output_and_text),
    "LaMP_5": Format("paper:", _titled, _output_and_text, PATTERNS),
    "LaMP_7": Format("after it:", _quoted_output, lambda t, o: o, " are written by a person" + PATTERNS),
}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over a few documents (one user's profile), idf as log(1 + (N - n + 0.5) / (n + 0.5)):
    never negative, so a word in most of a small profile still counts a little, never against."""

    def __init__(self, documents: list[list[str]], k1: float = K1, b: float = B):
        self.k1, self.b = k1, b
        self.tf = [Counter(d) for d in documents]
        self.length = [len(d) for d in documents]
        self.mean_length = (sum(self.length) / len(documents)) if documents else 0.0
        df = Counter(w for tf in self.tf for w in tf)
        n = len(documents)
        self.idf = {w: math.log(1 + (n - m + 0.5) / (m + 0.5)) for w, m in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        """Each document's score for `query` (each distinct query word counted once)."""
        terms = [w for w in dict.fromkeys(query) if w in self.idf]
        out = []
        for tf, length in zip(self.tf, self.length):
            norm = self.k1 * (1 - self.b + self.b * length / (self.mean_length or 1.0))
            out.append(sum(self.idf[w] * tf[w] * (self.k1 + 1) / (tf[w] + norm) for w in terms if w in tf))
        return out

    def top(self, query: list[str], k: int, skip: int | Collection[int] | None = None) -> list[int]:
        """The k best documents' indices, best first (ties: the earlier item), never `skip` (one, or several)."""
        scores = self.scores(query)
        skipped = {skip} if isinstance(skip, int) else set(skip or ())
        order = sorted((i for i in range(len(scores)) if i not in skipped), key=lambda i: (-scores[i], i))
        return order[:k]


def item_text(fmt: Format, prompt: str) -> str:
    """What a query or item is about: the text after the task's marker (the whole prompt without one,
    e.g. a LaMP_1 citation question)."""
    head, found, tail = prompt.partition(fmt.marker)
    return tail.strip() if found else prompt.strip()


def with_retrieval(users: list[User], spec: TaskSpec, k: int) -> list[User]:
    """The users with every example's `context` set to its top-k items of the user's own training
    items (the users unchanged where k is 0)."""
    if k <= 0:
        return users
    fmt = FORMATS[spec.name]
    return [_user_with_retrieval(u, fmt, k) for u in users]


class Profile:
    """One user's training items indexed for BM25: what each of its queries retrieves from, the
    training examples' own and any other prompt's (a served one: client/serving.py)."""

    def __init__(self, user: User, spec_or_fmt: TaskSpec | Format, k: int):
        self.fmt = spec_or_fmt if isinstance(spec_or_fmt, Format) else FORMATS[spec_or_fmt.name]
        self.user, self.k = user, k
        self.texts = [item_text(self.fmt, ex.input) for ex in user.train]
        self.index = BM25([words(self.fmt.document(t, ex.output)) for t, ex in zip(self.texts, user.train)])

    def context(self, prompt: str, skip: int | Collection[int] | None = None) -> Retrieved | None:
        """The top-k items for a query whose prompt is `prompt` (never training item `skip`: the
        query's own, or several); None where the user has no item to give."""
        chosen = self.index.top(words(item_text(self.fmt, prompt)), self.k, skip=skip)
        if not chosen:
            return None
        train = self.user.train
        items = tuple(self.fmt.item(self.texts[i], train[i].output) for i in chosen)
        return Retrieved(items, tuple(train[i].id for i in chosen), closing=self.fmt.closing)


def _user_with_retrieval(user: User, fmt: Format, k: int) -> User:
    profile = Profile(user, fmt, k)
    train = [replace(ex, context=profile.context(ex.input, i)) for i, ex in enumerate(user.train)]
    return User(user.user_id, train, [replace(ex, context=profile.context(ex.input)) for ex in user.val],
                [replace(ex, context=profile.context(ex.input)) for ex in user.test])


# ---------------------------------------------------------------- fitting the items into a prompt
def fit(tokenizer, ctx: Retrieved, question: str, room: int) -> list[int] | None:
    """The ids of the retrieved items and the question in at most `room` tokens, the items cut first
    (module docstring); None where not even the question and one item fit (the caller then encodes
    the question alone, as without retrieval)."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    spare = room - len(ids(question)) - len(ids(ctx.closing))
    bodies = [ids(text) for _, text, _ in ctx.items]
    fixed = [len(ids(head + tail + ctx.sep)) for head, _, tail in ctx.items]
    while spare > 0:
        n = _items_that_fit(fixed, [len(b) for b in bodies], spare)
        if n == 0:
            return None
        kept = Retrieved(ctx.items[:n], ctx.sources[:n], ctx.sep, ctx.closing)
        shares = _even_shares([len(b) for b in bodies[:n]], spare - sum(fixed[:n]))
        texts = [text if a == len(b) else tokenizer.decode(b[:a])
                 for (_, text, _), b, a in zip(kept.items, bodies, shares)]
        out = ids(kept.render(question, texts))
        if len(out) <= room:
            return out
        spare -= len(out) - room    # the pieces tokenised apart came out shorter than the whole: cut more
    return None


def _items_that_fit(fixed: list[int], lengths: list[int], spare: int) -> int:
    """How many of the top items fit, each with its fixed part and at least MIN_BODY of its text."""
    n, used = 0, 0
    for f, length in zip(fixed, lengths):
        used += f + min(MIN_BODY, length)
        if used > spare:
            break
        n += 1
    return n


def _even_shares(lengths: list[int], budget: int) -> list[int]:
    """Tokens of text each item keeps: an even share of `budget` in rank order, what an item does not
    need passing on to the items after it."""
    out = []
    for i, length in enumerate(lengths):
        a = min(length, max(0, budget) // (len(lengths) - i))
        out.append(a)
        budget -= a
    return out
