"""Reader for LaMP benchmark files: one question = one user.

Official layout: ``questions.json`` = [{id, input, profile: [...], (user_id)}] and
``outputs.json`` = {task, golds: [{id, output}]}. A user trains on its profile and is tested
on its question. Profile items are records (a tagged movie, a rated review, ...), not prompts,
so ``profile_to_example`` turns each one into an (input, output) pair written in the same
style as that task's question, so that training and test prompts look alike.

What each task is (labels, prompts) and how a profile item becomes a training pair:
shared/data/tasks.py.
"""

import json
from pathlib import Path

from shared.data.tasks import (
    MOVIE_TAGS,
    Example,
    LampDataError,
    TaskSpec,
    User,
    _check_target,
    plain_tweet,
    profile_to_example,
    task_spec,
)

# the tasks' names are imported from here too (their home before shared/data/tasks.py)
__all__ = ["MOVIE_TAGS", "Example", "LampDataError", "TaskSpec", "User", "plain_tweet", "profile_to_example",
           "task_spec", "load_lamp", "apply_template", "compact_input", "eval_overlap", "exclude_eval_overlap"]


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
    training and serve it with the population's mean mixture, client/predict.py). `max_users` keeps the
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
