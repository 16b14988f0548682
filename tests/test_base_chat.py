"""The zero-shot row of the bare backbone (eval stage base-chat): the instruct model asked through its
own chat template, beside the training-format row (base), in `proper local` and in the federation."""
import json

import pytest

import shared.evaluation.evaluate as E
from shared.data.encode import ANSWER, encode_chat_prompt, encode_prompt
from shared.method.plan import stage_plan
from shared.runtime.backbone import load_backbone
from shared.runtime.config import ConfigError, load_config

TEXT = "description: a heist in a casino goes wrong"
STAGES = "eval.stages=[base,base-chat]"


@pytest.fixture(scope="module")
def tok():
    return load_backbone("tiny")[1]


def test_chat_prompts_are_the_template_not_the_training_format(tok):
    train = tok.decode(encode_prompt(tok, TEXT, 96))
    chat = tok.decode(encode_chat_prompt(tok, TEXT, 96))
    assert train == TEXT + ANSWER
    assert chat == "<|user|>\n" + TEXT + "<eos>\n<|assistant|>\n"
    assert "Answer:" not in chat


def test_a_long_chat_prompt_is_cut_in_the_body(tok):
    ids = encode_chat_prompt(tok, TEXT * 10, 60)
    text = tok.decode(ids)
    assert len(ids) <= 62 and text.startswith("<|user|>\n") and text.endswith("<|assistant|>\n")


def test_a_tokenizer_without_a_chat_template_is_refused(tok):
    plain = load_backbone("tiny")[1]
    plain.chat_template = None
    with pytest.raises(ValueError, match="base-chat"):
        encode_chat_prompt(plain, TEXT, 96)


def test_the_plan_evaluates_it_right_after_the_bare_row_and_bad_names_are_refused():
    plan = [s.name for s in stage_plan(load_config("tiny", [STAGES]))]
    assert plan[:2] == ["eval:base", "eval:base-chat"] and plan.count("eval:base-chat") == 1
    assert "eval:base-chat" not in [s.name for s in stage_plan(load_config("tiny", []))]   # opt-in
    mta = [s.name for s in stage_plan(load_config("tiny", ["method=mta", STAGES]))]
    assert mta[:2] == ["eval:base", "eval:base-chat"]
    with pytest.raises(ConfigError, match="eval.stages"):
        load_config("tiny", ["eval.stages=[base,chat]"])


@pytest.fixture
def prompts_seen(monkeypatch, tok):
    """Every prompt the evaluation generated from, decoded (evaluate.generate is what predict calls)."""
    seen = []
    real = E.generate

    def spy(model, tokenizer, prompts, *a, **kw):
        seen.append([tokenizer.decode(p) for p in prompts])
        return real(model, tokenizer, prompts, *a, **kw)
    monkeypatch.setattr(E, "generate", spy)
    return seen


def check_rows(run, prompts_seen):
    table = (run / "table.md").read_text()
    assert "| bare backbone |" in table and "| bare backbone, chat template |" in table
    evals = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in evals if r.get("kind") == "eval"} == {"base", "base-chat"}
    chat = [c for c in prompts_seen if all(p.endswith("<|assistant|>\n") for p in c)]
    train = [c for c in prompts_seen if all(p.endswith(ANSWER) for p in c)]
    assert chat and train and len(chat) + len(train) == len(prompts_seen)
    assert sum(map(len, chat)) == sum(map(len, train))   # the same questions, asked two ways


def test_proper_local_has_the_chat_row_beside_the_bare_row(tmp_path, prompts_seen):
    from sim.local import run_local
    cfg = load_config("tiny", [STAGES, "user.epochs=1"])
    run_local(cfg, tmp_path / "local")
    check_rows(tmp_path / "local", prompts_seen)


def test_the_federation_sends_the_stage_and_clients_evaluate_it(tmp_path, prompts_seen):
    from sim.run import run_sim
    assert run_sim("tiny", [f"output.dir={tmp_path}", "output.name=fed", "simulation.engine=inprocess",
                            STAGES]) == 0
    check_rows(tmp_path / "fed", prompts_seen)
