"""LaMP's tasks: their label sets and metrics, their prompts, and how a profile item of each task
becomes a training (input, output) pair written in the style of that task's question (the reader
of the files is shared/data/lamp.py).

Profile conversions (the item fields are LaMP's own):
  LaMP_1   {title, abstract} -> the LaMP_5 prompt "Generate a title for the following abstract
           of a paper: <abstract>" -> title. A citation question needs two candidate references
           and a profile paper carries none, so a faithful "[1]/[2]" pair cannot be built from
           one item; abstract -> title teaches what the author writes about, which is what the
           citation choice hinges on.
  LaMP_2   {description, tag} -> the official tag question -> tag.
  LaMP_2N  {text, category} -> the official category question -> category.
  LaMP_3   {text, score} -> the official rating question -> score (as a string).
  LaMP_4   {text, title} -> "Generate a headline for the following article: <text>" -> title.
  LaMP_5   {abstract, title} -> "Generate a title for the following abstract of a paper:
           <abstract>" -> title.
  LaMP_7   {text} -> "Paraphrase the following tweet without any explanation before or after
           it: <plain version of the tweet>" -> the tweet as written. LaMP_7 test inputs are
           neutral paraphrases whose gold is the user's own tweet, so the pair "plain text ->
           this user's wording" is the skill to learn. The plain version is a cheap stand-in for
           that paraphrase: hashtag signs, emoji and repeated characters removed, sentence case,
           a final full stop. Where the tweet is already plain the pair is a copy, still harmless.
"""

import re
from dataclasses import dataclass


class LampDataError(ValueError):
    """Bad LaMP input; the message names the file and the record."""


@dataclass
class TaskSpec:
    name: str
    kind: str  # "label" | "rating" | "generation"
    labels: list[str]  # the closed label set for label/rating tasks, [] for generation
    metrics: list[str]  # names of the values task_metrics returns, headline metric first


@dataclass
class Example:
    id: str
    user: str
    input: str  # full prompt, in the task's official question style
    output: str  # target text
    # retrieval.k > 0 or method=rag: the user's own items retrieved for this query, which go into its
    # prompt before the question (shared/data/retrieval.py Retrieved); None = the question alone
    context: object = None


@dataclass
class User:
    user_id: str
    train: list[Example]
    val: list[Example]
    test: list[Example]


MOVIE_TAGS = ["sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
              "dark comedy", "classic", "psychology", "fantasy", "romance", "thought-provoking",
              "social commentary", "violence", "true story"]
NEWS_CATEGORIES = ["travel", "education", "parents", "style & beauty", "entertainment",
                   "food & drink", "science & technology", "business", "sports", "healthy living",
                   "women", "politics", "crime", "culture & arts", "religion"]
# The official LaMP_2N questions list the same categories in another order; prompts copy the
# question text exactly, metrics only care about the set.
NEWS_PROMPT_ORDER = ["women", "religion", "politics", "style & beauty", "entertainment",
                     "culture & arts", "sports", "science & technology", "travel", "business",
                     "crime", "education", "healthy living", "parents", "food & drink"]

_LABEL_METRICS = ["accuracy", "macro_f1"]
_TASKS = {
    "LaMP_1": TaskSpec("LaMP_1", "label", ["[1]", "[2]"], _LABEL_METRICS),
    "LaMP_2": TaskSpec("LaMP_2", "label", MOVIE_TAGS, _LABEL_METRICS),
    "LaMP_2N": TaskSpec("LaMP_2N", "label", NEWS_CATEGORIES, _LABEL_METRICS),
    "LaMP_3": TaskSpec("LaMP_3", "rating", ["1", "2", "3", "4", "5"], ["mae", "rmse"]),
    "LaMP_4": TaskSpec("LaMP_4", "generation", [], ["rouge-1", "rouge-L"]),
    "LaMP_5": TaskSpec("LaMP_5", "generation", [], ["rouge-1", "rouge-L"]),
    "LaMP_7": TaskSpec("LaMP_7", "generation", [], ["rouge-1", "rouge-L"]),
}
_ALIASES = {"LaMP_2M": "LaMP_2"}


def _canon(name: str) -> str:
    # accept "lamp-2m", "LAMP_2M", ...: LaMP names are spelt inconsistently across papers
    return str(name).strip().lower().replace("-", "_")


def task_spec(name: str) -> TaskSpec:
    known = {_canon(k): k for k in [*_TASKS, *_ALIASES]}
    key = known.get(_canon(name))
    if key is None:
        raise LampDataError(f"unknown LaMP task {name!r}; known: {', '.join(sorted(known.values()))}")
    spec = _TASKS[_ALIASES.get(key, key)]
    # hand out a copy so a caller mutating labels cannot corrupt the registry
    return TaskSpec(spec.name, spec.kind, list(spec.labels), list(spec.metrics))


# ----------------------------------------------------------------------------- prompts

def movie_prompt(description: str) -> str:
    return ("Which tag does this movie relate to among the following tags? Just answer with the "
            f"tag name without further explanation. tags: [{', '.join(MOVIE_TAGS)}] "
            f"description: {description}")


def _news_prompt(text: str) -> str:
    return ("Which category does this article relate to among the following categories? Just "
            "answer with the category name without further explanation. categories: "
            f"[{', '.join(NEWS_PROMPT_ORDER)}] article: {text}")


def _review_prompt(text: str) -> str:
    return ("What is the score of the following review on a scale of 1 to 5? just answer with "
            f"1, 2, 3, 4, or 5 without further explanation. review: {text}")


def _headline_prompt(text: str) -> str:
    return f"Generate a headline for the following article: {text}"


def _title_prompt(abstract: str) -> str:
    return f"Generate a title for the following abstract of a paper: {abstract}"


def _paraphrase_prompt(text: str) -> str:
    return f"Paraphrase the following tweet without any explanation before or after it: {text}"


def plain_tweet(text: str) -> str:
    """A neutral rewrite of a tweet: what a paraphraser would hand back, minus the user's style."""
    t = text.replace("#", "")
    t = re.sub(r"[^\x20-\x7e]", " ", t)  # emoji and other non-ASCII decoration
    t = re.sub(r"(.)\1{2,}", r"\1", t)  # "soooo!!!" -> "so!"
    t = re.sub(r"\s+", " ", t).strip()
    if not t:
        return t
    t = t[0].upper() + t[1:]
    return t if t[-1] in ".!?" else t + "."


# task -> (fields the profile item must carry, item -> (input, output))
_PROFILE = {
    "LaMP_1": (("title", "abstract"), lambda it: (_title_prompt(it["abstract"]), it["title"])),
    "LaMP_2": (("description", "tag"), lambda it: (movie_prompt(it["description"]), it["tag"])),
    "LaMP_2N": (("text", "category"), lambda it: (_news_prompt(it["text"]), it["category"])),
    "LaMP_3": (("text", "score"), lambda it: (_review_prompt(it["text"]), it["score"])),
    "LaMP_4": (("text", "title"), lambda it: (_headline_prompt(it["text"]), it["title"])),
    "LaMP_5": (("abstract", "title"), lambda it: (_title_prompt(it["abstract"]), it["title"])),
    "LaMP_7": (("text",), lambda it: (_paraphrase_prompt(plain_tweet(it["text"])), it["text"])),
}


def profile_to_example(task, item: dict, user: str, index: int) -> Example:
    """Turn profile item number `index` of `user` into a training pair (see module docstring)."""
    spec = task if isinstance(task, TaskSpec) else task_spec(task)
    where = f"profile item #{index} (id={item.get('id') if isinstance(item, dict) else None!r})"
    if not isinstance(item, dict):
        raise LampDataError(f"{where}: expected an object, got {type(item).__name__}")
    fields, convert = _PROFILE[spec.name]
    clean = {}
    for f in fields:
        if f not in item:
            raise LampDataError(f"{where}: missing field {f!r} required by {spec.name}")
        v = item[f]
        # scores sometimes arrive as numbers; everything else must already be text
        if f == "score" and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise LampDataError(f"{where}: field {f!r} must be a string, got {type(v).__name__}")
        clean[f] = v.strip()
    inp, out = convert(clean)
    if not out:
        raise LampDataError(f"{where}: empty target field {fields[-1]!r}")
    if spec.name != "LaMP_1":  # LaMP_1 pairs target a paper title, not a "[1]"/"[2]" label
        _check_target(spec, out, where)
    return Example(id=f"{user}/{index}", user=str(user), input=inp, output=out)


def _check_target(spec: TaskSpec, out: str, where: str) -> None:
    # a label outside the closed set would silently skew macro-F1, so reject it at load time
    if spec.kind == "label" and out.strip().lower() not in spec.labels:
        raise LampDataError(f"{where}: label {out!r} is not one of the {spec.name} labels")
    if spec.kind == "rating":
        try:
            float(out)
        except ValueError:
            raise LampDataError(f"{where}: rating {out!r} is not a number") from None
