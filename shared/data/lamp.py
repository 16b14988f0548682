"""Reader for LaMP benchmark files: one question = one user.

Official layout: ``questions.json`` = [{id, input, profile: [...], (user_id)}] and
``outputs.json`` = {task, golds: [{id, output}]}. A user trains on its profile and is tested
on its question. Profile items are records (a tagged movie, a rated review, ...), not prompts,
so ``profile_to_example`` turns each one into an (input, output) pair written in the same
style as that task's question, so that training and test prompts look alike.

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

import json
import re
from dataclasses import dataclass
from pathlib import Path


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


# ----------------------------------------------------------------------------- files

def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LampDataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LampDataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _id(rec: dict, key: str, where: str, path: Path) -> str:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v).strip() == "":
        raise LampDataError(f"{path}: {where}: missing or invalid field {key!r}")
    return str(v).strip()


def load_lamp(path, task=None, holdout: int = 0, max_users=None, longest: bool = False):
    """Read a LaMP questions/outputs pair into (TaskSpec, [User]).

    `path` is the directory holding both files, or questions.json itself. Each user trains on
    its profile in file order; the last `holdout` items become `val` (always leaving at least
    one to train on), and its question with the gold output is `test`. A user with an empty
    profile has no history: no training or val items, only its question (the stages skip it in
    training and serve it with the population's mean mixture, client/trainer.py). `max_users` keeps the
    first users in file order, or with `longest` the ones with the longest profiles (the
    published per-user baselines use the 100 longest histories), ties kept in file order.
    """
    path = Path(path)
    qpath = path / "questions.json" if path.is_dir() else path
    opath = qpath.with_name("outputs.json")
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")

    outputs = _read_json(opath)
    if not isinstance(outputs, dict) or not isinstance(outputs.get("golds"), list):
        raise LampDataError(f"{opath}: expected an object with a 'golds' list")
    file_task = outputs.get("task")
    if task is None and file_task is None:
        raise LampDataError(f"{opath}: no 'task' field and no task given")
    try:
        spec = task_spec(task if task is not None else file_task)
        if task is not None and file_task is not None and task_spec(file_task).name != spec.name:
            raise LampDataError(f"task {task!r} given, but the file says {file_task!r}")
    except LampDataError as e:
        raise LampDataError(f"{opath}: {e}") from None

    golds = {}
    for k, g in enumerate(outputs["golds"]):
        if not isinstance(g, dict):
            raise LampDataError(f"{opath}: gold #{k}: expected an object")
        gid = _id(g, "id", f"gold #{k}", opath)
        where = f"gold #{k} (id={gid!r})"
        if gid in golds:
            raise LampDataError(f"{opath}: {where}: duplicate id")
        out = g.get("output")
        if not isinstance(out, (str, int, float)) or isinstance(out, bool) or str(out).strip() == "":
            raise LampDataError(f"{opath}: {where}: missing or empty field 'output'")
        try:
            _check_target(spec, str(out).strip(), where)
        except LampDataError as e:
            raise LampDataError(f"{opath}: {e}") from None
        golds[gid] = str(out).strip()

    questions = _read_json(qpath)
    if not isinstance(questions, list):
        raise LampDataError(f"{qpath}: expected a list of questions")
    users, seen_q, seen_u = [], set(), set()
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            raise LampDataError(f"{qpath}: question #{i}: expected an object")
        qid = _id(q, "id", f"question #{i}", qpath)
        where = f"question #{i} (id={qid!r})"
        if qid in seen_q:
            raise LampDataError(f"{qpath}: {where}: duplicate id")
        seen_q.add(qid)
        uid = _id(q, "user_id", where, qpath) if "user_id" in q else qid
        if uid in seen_u:
            raise LampDataError(f"{qpath}: {where}: duplicate user_id {uid!r}")
        seen_u.add(uid)
        if not isinstance(q.get("input"), str) or not q["input"].strip():
            raise LampDataError(f"{qpath}: {where}: missing or empty field 'input'")
        profile = q.get("profile")
        if not isinstance(profile, list):
            raise LampDataError(f"{qpath}: {where}: missing field 'profile' (a list)")
        if qid not in golds:
            raise LampDataError(f"{qpath}: {where}: no gold output for this id in {opath}")
        try:
            items = [profile_to_example(spec, it, uid, j) for j, it in enumerate(profile)]
        except LampDataError as e:
            raise LampDataError(f"{qpath}: {where}: {e}") from None
        n_val = min(holdout, max(0, len(items) - 1))
        cut = len(items) - n_val
        test = [Example(id=qid, user=uid, input=q["input"].strip(), output=golds[qid])]
        users.append(User(user_id=uid, train=items[:cut], val=items[cut:], test=test))

    for k, gid in enumerate(golds):
        if gid not in seen_q:
            raise LampDataError(f"{opath}: gold #{k} (id={gid!r}): no question with this id in {qpath}")

    if longest:
        # sorted() is stable, so equal profile lengths keep file order
        users = sorted(users, key=lambda u: -(len(u.train) + len(u.val)))
    if max_users is not None:
        users = users[:max_users]
    return spec, users


# ----------------------------------------------------------------------------- compact prompts
# The official LaMP_2 / LaMP_2N prompts spend ~70 tokens (of ~130) on an instruction and the label
# list that every example repeats. With data.template=compact the prompt keeps only the item
# ("description: ..." / "article: ..."): half the tokens per step on 2 CPU cores. The labels are
# then learned from the training outputs instead of read from the prompt (docs/decisions.md).
_COMPACT_MARKERS = {"LaMP_2": "description:", "LaMP_2N": "article:"}


def compact_input(task: str, text: str) -> str:
    marker = _COMPACT_MARKERS.get(task_spec(task).name)
    if marker is None or marker not in text:
        return text
    return marker + text.split(marker, 1)[1]


def apply_template(users: list[User], task: str, template: str) -> list[User]:
    if template == "official":
        return users
    if template != "compact":
        raise LampDataError(f"unknown prompt template {template!r}; expected 'official' or 'compact'")
    def fix(exs):
        return [Example(e.id, e.user, compact_input(task, e.input), e.output) for e in exs]
    return [User(u.user_id, fix(u.train), fix(u.val), fix(u.test)) for u in users]


# ----------------------------------------------------------------------------- overlap across users
# In LaMP_2 the same movie recurs in many users' profiles, almost always with the same tag: in the
# 72-user sample, with the last 2 items of each history held out, 59 of the 72 questions and 37 of
# the 144 held-out items have their exact input among another user's training items. A model
# trained across users can then score by remembering other users' labels, which is not
# personalization. data.exclude_eval_overlap
# drops every training item whose input equals any user's test or val input (a study option: it
# looks at all users' data, as the experimenter preparing a benchmark split does).
def eval_overlap(users: list[User]) -> dict[str, int]:
    """How many test / val queries have their exact input in another user's training items."""
    owners: dict[str, set[str]] = {}
    for u in users:
        for e in u.train:
            owners.setdefault(e.input, set()).add(u.user_id)
    return {split: sum(bool(owners.get(e.input, set()) - {u.user_id}) for u in users for e in getattr(u, split))
            for split in ("test", "val")}


def exclude_eval_overlap(users: list[User]) -> tuple[list[User], int]:
    """Users with every training item whose input is some user's test or val input removed."""
    held = {e.input for u in users for e in u.test + u.val}
    kept = [User(u.user_id, [e for e in u.train if e.input not in held], u.val, u.test) for u in users]
    return kept, sum(len(u.train) for u in users) - sum(len(u.train) for u in kept)
