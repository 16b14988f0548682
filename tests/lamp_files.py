"""Small LaMP directories for tests, and the corpus of malformed ones (fixture: conftest.bad_lamp)."""
from __future__ import annotations

import json
from pathlib import Path


def write_lamp(d: Path, questions, golds, task="LaMP_2") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "questions.json").write_text(json.dumps(questions))
    (d / "outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return d


def lamp_question(qid, n, tag="comedy"):
    prof = [{"id": f"{qid}-{j}", "tag": tag, "description": f"movie {j}"} for j in range(n)]
    return {"id": qid, "input": "Which tag ... description: x", "profile": prof}


# The corpus of malformed LaMP inputs: case -> what the reader's message must say. Each case
# spoils two good users in one way (write_bad_lamp); tests/test_lamp.py checks the reader's
# error, tests/test_cli.py that `proper local` turns it into one line.
BAD_LAMP = {
    "malformed": r"questions\.json: malformed JSON at line 3, column",
    "no_gold": r"questions\.json: question #1 \(id='b'\): no gold",
    "gold_without_question": r"outputs\.json: gold #1 \(id='zz'\): no question",
    "missing_field": r"questions\.json: question #0 \(id='a'\): profile item #1 \(id='a-1'\): missing field 'tag'",
    "missing_input": r"questions\.json: question #1 \(id='b'\): missing or empty field 'input'",
    "unknown_task": r"outputs\.json: unknown LaMP task 'LaMP_9'; known: .*LaMP_2N",
    "duplicate_id": r"questions\.json: question #1 \(id='a'\): duplicate id",
    "bad_label": r"question #0 \(id='a'\): profile item #0 .*'drama' is not one of",
    "no_outputs": r"outputs\.json: cannot read: No such file",
    "golds_not_a_list": r"outputs\.json: expected an object with a 'golds' list",
    "no_task": r"outputs\.json: no 'task' field and no task given",
    "duplicate_gold": r"outputs\.json: gold #1 \(id='a'\): duplicate id",
    "empty_gold": r"outputs\.json: gold #1 \(id='b'\): missing or empty field 'output'",
    "questions_not_a_list": r"questions\.json: expected a list of questions",
    "item_not_an_object": r"questions\.json: question #1 \(id='b'\): profile item #0 \(id=None\): expected an object",
    "field_not_text": r"question #0 \(id='a'\): profile item #1 \(id='a-1'\): field 'description' must be a string",
    "duplicate_user": r"questions\.json: question #1 \(id='b'\): duplicate user_id 'u'",
}


def write_bad_lamp(case: str, d: Path) -> Path:
    """A LaMP directory in `d` spoilt as BAD_LAMP[case] says."""
    qs = [lamp_question("a", 2), lamp_question("b", 2)]
    golds = [{"id": "a", "output": "comedy"}, {"id": "b", "output": "action"}]
    task = "LaMP_2"
    if case == "no_gold":
        golds = golds[:1]
    elif case == "gold_without_question":
        golds = [golds[0], {"id": "zz", "output": "comedy"}, golds[1]]
    elif case == "missing_field":
        del qs[0]["profile"][1]["tag"]
    elif case == "missing_input":
        del qs[1]["input"]
    elif case == "unknown_task":
        task = "LaMP_9"
    elif case == "duplicate_id":
        qs[1]["id"] = "a"
    elif case == "bad_label":
        qs[0]["profile"][0]["tag"] = "drama"
    elif case == "duplicate_gold":
        golds[1]["id"] = "a"
    elif case == "empty_gold":
        golds[1]["output"] = " "
    elif case == "questions_not_a_list":
        qs = {"a": qs[0]}
    elif case == "item_not_an_object":
        qs[1]["profile"][0] = "movie 0"
    elif case == "field_not_text":
        qs[0]["profile"][1]["description"] = 42
    elif case == "duplicate_user":
        qs[0]["user_id"] = qs[1]["user_id"] = "u"
    write_lamp(d, qs, golds, task)
    if case == "malformed":
        (d / "questions.json").write_text('[\n {"id": "a",\n  "input": oops}\n]')
    elif case == "no_outputs":
        (d / "outputs.json").unlink()
    elif case == "golds_not_a_list":
        (d / "outputs.json").write_text(json.dumps({"task": task, "golds": {"a": "comedy"}}))
    elif case == "no_task":
        (d / "outputs.json").write_text(json.dumps({"golds": golds}))
    return d
