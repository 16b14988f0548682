"""Using a finished run: `proper enroll` (a user who joins after the run) and `proper generate` (a
user's full stage-3 model), on the tiny model and synthetic headline users (LaMP_4 format)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from shared.data.encode import encode_prompt
from shared.data.synthetic import write_synthetic_lamp

NEW = "u0004"   # held out of the runs, enrolled after them


def write_data(tmp: Path) -> tuple[Path, Path]:
    """Five synthetic users (all/) and the first four of them (run/): the run's data."""
    everyone = write_synthetic_lamp(tmp / "all", n_users=5, n_groups=2, min_profile=4, max_profile=8,
                                    task="LaMP_4", seed=0)
    q = json.loads((everyone / "questions.json").read_text())
    o = json.loads((everyone / "outputs.json").read_text())
    assert q[-1]["user_id"] == NEW
    run = tmp / "run"
    run.mkdir()
    (run / "questions.json").write_text(json.dumps(q[:4]))
    (run / "outputs.json").write_text(json.dumps({**o, "golds": o["golds"][:4]}))
    return everyone, run


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A tiny `proper local` run of four users, and every generation its evaluation made:
    (stage, prompt ids, user embedding, generated ids)."""
    import shared.evaluation.evaluate as ev
    from shared.runtime.config import load_config
    from sim.local import run_local
    tmp = tmp_path_factory.mktemp("serve")
    everyone, data = write_data(tmp)
    calls, real = [], ev.generate_tokens

    def spy(model, tokenizer, prompts, user_emb, *args, **kw):
        out = real(model, tokenizer, prompts, user_emb, *args, **kw)
        for i, (p, o) in enumerate(zip(prompts, out)):
            calls.append((model.stage, tuple(p), None if user_emb is None else user_emb[i].clone(), o))
        return out
    ev.generate_tokens = spy
    try:
        run_local(load_config("tiny", [f"data.path={data}", "eval.max_new_tokens=6"]), tmp / "local")
    finally:
        ev.generate_tokens = real
    return tmp / "local", everyone, data, calls


def assert_enrolled_only(place: Path, root: Path, before: dict[str, str], written: list[str]):
    """Every file that was there is byte-identical, and the new ones are the new user's private state
    in `place`: its e_u, its user LoRA (a PEFT directory), its LoRA-aware router."""
    after = hashes(root)
    assert {k: after[k] for k in before} == before
    new = sorted(set(after) - set(before))
    prefix = str(place.relative_to(root))
    prefix = "" if prefix == "." else prefix + "/"
    stem = next(Path(w).name.split(".")[0] for w in written)
    assert stem.startswith(NEW + "-")
    assert new == sorted(prefix + f for f in (f"{stem}.embedding.safetensors", f"{stem}.router.safetensors",
                                              f"{stem}.user/adapter_config.json",
                                              f"{stem}.user/adapter_model.safetensors"))


def check_trained(place: Path):
    """The new user's state was trained: e_u moved from its seeded start, its user LoRA's B and its
    LoRA-aware router are no longer the zeros they start at."""
    from safetensors.torch import load_file

    from shared.runtime.persist import UserStore, load_tensors
    store = UserStore(place)
    emb, meta = load_tensors(store.path(NEW, "embedding"))
    assert meta["enrolled"] is True and meta["user"] == NEW
    assert not torch.equal(emb["e_u"], emb["e_u_before"])
    lora = load_file(str(store.path(NEW, "user").with_suffix("") / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert any(v.abs().sum() > 0 for v in store.load(NEW, "router").values())


def test_enroll_into_a_local_run_writes_only_the_new_user(local_run, proper):
    run, everyone, _, _ = local_run
    before = hashes(run)
    out = proper("enroll", run, "--data", everyone, "--user", NEW)
    assert out.code == 0, out.err
    written = [line.split("\t")[1] for line in out.out.splitlines()]
    assert len(written) == 3 and all(line.startswith(NEW + "\t") for line in out.out.splitlines())
    assert_enrolled_only(run / "client_state", run, before, written)
    check_trained(run / "client_state")
    # where its history is, for a run that retrieves (client/serving.py Serving.history)
    from shared.runtime.persist import UserStore, load_tensors
    assert load_tensors(UserStore(run / "client_state").path(NEW, "embedding"))[1]["data"] == str(everyone.resolve())
    # a second time: refused, and nothing changes
    again = hashes(run)
    out = proper("enroll", run, "--data", everyone, "--user", NEW)
    assert out.code == 2 and len(out.err) == 1 and "already has private state" in out.err[0]
    assert hashes(run) == again
    # and it is served like the run's own users
    gen = proper("generate", run, "--user", NEW, "--prompt", "Generate a headline for the following article: x")
    assert gen.code == 0 and len(gen.out.splitlines()) == 1


def test_enroll_into_a_simulated_client(tmp_path, proper):
    from sim.run import run_sim
    everyone, data = write_data(tmp_path)
    assert run_sim("tiny", [f"output.dir={tmp_path}", "output.name=fed", f"data.path={data}",
                            "simulation.engine=inprocess"]) == 0
    run = tmp_path / "fed"
    # the run directory holds the final shared parts, exported from the server's checkpoint
    assert (run / "population_lora" / "adapter_model.safetensors").is_file() and (run / "group.safetensors").is_file()
    before = hashes(run)
    refused = proper("enroll", run, "--data", everyone, "--user", NEW)  # which client? it must be named
    assert refused.code == 2 and "name the client directory" in refused.err[0]
    client = run / "clients" / "00001"
    out = proper("enroll", client, "--data", everyone, "--user", NEW)
    assert out.code == 0, out.err
    assert_enrolled_only(client, run, before, [line.split("\t")[1] for line in out.out.splitlines()])
    check_trained(client)
    # the run directory finds every client's users, the enrolled one included
    gen = proper("generate", run, "--user", NEW, "--user", "u0000", "--prompt", "a", "--prompt", "b")
    assert gen.code == 0 and [line.split("\t")[0] for line in gen.out.splitlines()] == [NEW, NEW, "u0000", "u0000"]


def test_a_deployed_client_keeps_the_shared_parts_and_enrolls_there(tmp_path, proper):
    """A deployed client (keep_shared) writes the run's config and final shared parts beside its
    users' state on train.user; enrollment there needs nothing else."""
    from client.trainer import ClientTrainer, load_users
    from shared.runtime.config import load_config
    everyone, data = write_data(tmp_path)
    cfg = load_config("tiny", [f"data.path={data}"])
    spec, users = load_users(cfg)
    state = tmp_path / "state"
    t = ClientTrainer(cfg, spec, users[:2], str(state), keep_shared=True)
    pop = t.population(None, 1).shared
    group = t.group(pop, None, None, 1).shared
    t.user(pop, group)
    assert {"config.yaml", "population_lora", "group.safetensors"} <= {p.name for p in state.iterdir()}
    before = hashes(state)
    out = proper("enroll", state, "--data", everyone, "--user", NEW)
    assert out.code == 0, out.err
    assert_enrolled_only(state, state, before, [line.split("\t")[1] for line in out.out.splitlines()])


def test_enrollment_after_a_kept_assignment_starts_at_the_code_of_the_expert_that_fits(tmp_path, monkeypatch):
    """Where the run's users started e_u at their expert's code (assign form, assignment kept), a new
    user starts at the code of the expert with the lowest loss on its history; elsewhere at its own
    seeded draw, as before."""
    from client import serving as CS
    from client.trainer import ClientTrainer, expert_embedding, initial_embedding, load_users
    from shared.runtime.config import load_config, stage_cfg
    from shared.runtime.persist import UserStore
    everyone, data = write_data(tmp_path)
    new = next(u for u in load_users(load_config("tiny", [f"data.path={everyone}"]))[1] if u.user_id == NEW)
    for name, extra in (("kept", ["group.constraint_form=assign", "group.reassign=false"]), ("pairs", [])):
        cfg = load_config("tiny", [f"data.path={data}", *extra])
        spec, users = load_users(cfg)
        state = tmp_path / name
        t = ClientTrainer(cfg, spec, users[:2], str(state), keep_shared=True)
        pop = t.population(None, 1).shared
        t.user(pop, t.group(pop, None, None, 1).shared)
        s = CS.Serving(state)
        s._loaded()
        k, d, group_cfg = cfg.adapters.k, s.model.d_user, stage_cfg(s.cfg, "group")
        if not extra:
            assert torch.equal(s._enrollment_start(new, group_cfg), initial_embedding(cfg.seed, NEW, d))
            continue
        s.enroll([new])   # the real losses: the start is one of the k codes
        start = UserStore(state).load(NEW, "embedding")["e_u_before"]
        assert any(torch.equal(start, expert_embedding(cfg.seed, NEW, d, e)) for e in range(k))
        monkeypatch.setattr(CS, "expert_losses", lambda *a, k=k: torch.arange(k, 0, -1).float().view(1, -1))
        assert torch.equal(s._enrollment_start(new, group_cfg), expert_embedding(cfg.seed, NEW, d, k - 1))


# ---------------------------------------------------------------- proper generate
def test_generate_gives_the_evaluation_path_tokens(local_run, proper):
    """For each user and its test question: the API's tokens are the stage-3 evaluation's tokens,
    and the command prints the text the evaluation scored."""
    from client.serving import Serving
    from client.trainer import load_users
    from shared.runtime.config import read_config
    run, _, _, calls = local_run
    cfg = read_config(run / "config.yaml")
    _, users = load_users(cfg)
    serving = Serving(run)
    evaluated = {prompt: (emb, out) for stage, prompt, emb, out in calls if stage == "user"}
    assert len(evaluated) == len(users) == 4
    for u in users:
        prompt = u.test[0].input
        ids = tuple(encode_prompt(serving.tokenizer, prompt, cfg.train.max_len))
        emb, want = evaluated[ids]
        assert torch.equal(serving.load_user(u.user_id), emb)
        assert serving.generate_tokens(u.user_id, [prompt]) == [want]
        text = serving.tokenizer.decode(want, skip_special_tokens=True).strip()
        out = proper("generate", run, "--user", u.user_id, "--prompt", prompt)
        assert out.code == 0 and out.out == text + "\n", (out.out, text)
    # retrieval.k = 0: no items and no history read (an unreadable --data changes nothing)
    assert serving.k == 0 and serving.contexts("u0000", ["x", "y"]) == [None, None]
    out = proper("generate", run, "--user", u.user_id, "--prompt", prompt, "--data", run / "nowhere")
    assert out.code == 0 and out.out == text + "\n"


def test_generate_from_a_file_or_stdin_and_for_several_users(local_run, proper, tmp_path, monkeypatch):
    import io

    from client.serving import Serving
    run = local_run[0]
    prompts = ["Generate a headline for the following article: rain", "Generate a headline: sun"]
    serving = Serving(run)
    want = {u: serving.generate(u, prompts) for u in ("u0000", "u0002")}
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n\n")
    many = proper("generate", run, "--user", "u0000", "--user", "u0002", "--prompts", f)
    assert many.code == 0
    assert many.out.splitlines() == [f"{u}\t{t}" for u in ("u0000", "u0002") for t in want[u]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts)))
    one = proper("generate", run, "--user", "u0002")
    assert one.code == 0 and one.out.splitlines() == want["u0002"]


def test_generate_fused_serves_the_user_through_the_fused_layers(local_run, proper):
    """`--fused`: the user's layers run their fused path (kept fused weights appear), and the command
    prints what the API's fused generation gives."""
    from client.serving import Serving
    run = local_run[0]
    prompt = "Generate a headline for the following article: wind"
    serving = Serving(run)
    tokens = serving.generate_tokens("u0001", [prompt], fused=True)
    assert any("fused_user" in layer._kept for _, layer in serving.model.layers())
    assert all(not layer.fuse for _, layer in serving.model.layers())
    out = proper("generate", run, "--user", "u0001", "--prompt", prompt, "--fused")
    assert out.code == 0
    assert out.out == serving.tokenizer.decode(tokens[0], skip_special_tokens=True).strip() + "\n"


def test_exclusive_serving_owns_its_backbone_and_keeps_no_copy_of_it(local_run):
    """`proper generate`'s Serving (exclusive): a backbone of its own, merged without the copy that an
    unmerge needs, the same tokens as the shared-backbone Serving, and the process's model untouched."""
    from client.serving import Serving
    from shared.runtime.process import PROCESS
    run = local_run[0]
    prompt = ["Generate a headline for the following article: frost"]
    shared = Serving(run)
    want = shared.generate_tokens("u0002", prompt)
    process_model = PROCESS.model[1][0]
    own = Serving(run, exclusive=True)
    assert own.generate_tokens("u0002", prompt) == want
    assert own.model is not process_model and PROCESS.model[1][0] is process_model
    layers = [layer for _, layer in own.model.layers()]
    assert all(layer.merged and layer.unmerged_weight is None for layer in layers)
    assert all(layer.unmerged_weight is not None for _, layer in process_model.layers())
    with pytest.raises(RuntimeError, match="not kept at the merge"):
        own.model.unmerge_population()


def test_serving_puts_its_run_back_after_other_use_of_the_backbone(local_run):
    """The process holds one backbone: after something else changed its shared parts (a client's
    training, another run), serving a user gives what it gave before."""
    from client.serving import Serving
    from tests.helpers import randomize
    serving = Serving(local_run[0])
    prompt = ["Generate a headline for the following article: snow"]
    before = serving.generate_tokens("u0003", prompt)
    randomize(serving.model, "group", seed=11)
    serving.model.unmerge_population()
    randomize(serving.model, "population", seed=12)
    serving.model.merge_population()
    assert serving.generate_tokens("u0003", prompt) == before


def test_generate_refuses_without_the_users_private_state(local_run, proper, tmp_path):
    import shutil

    from shared.runtime.persist import UserStore
    run = local_run[0]
    out = proper("generate", run, "--user", "nobody", "--prompt", "x")
    assert out.code == 2 and len(out.err) == 1
    assert "'nobody': no private state" in out.err[0] and "LoRA-aware router" in out.err[0]
    # a copy of the run whose user lost its LoRA-aware router: the message names that file
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    router = UserStore(copy / "client_state").path("u0001", "router")
    router.unlink()
    out = proper("generate", copy, "--user", "u0001", "--prompt", "x")
    assert out.code == 2 and len(out.err) == 1
    assert "missing its LoRA-aware router" in out.err[0] and str(router) in out.err[0]
    out = proper("generate", tmp_path / "nowhere", "--user", "u0001", "--prompt", "x")
    assert out.code == 2 and "no such run or state directory" in out.err[0]


def test_an_unknown_user_of_a_simulated_run_is_refused_naming_the_run(tmp_path):
    """One line naming the run, not each of its (72, for LaMP-2's sample) client directories."""
    from client.serving import Serving, ServingError
    from shared.runtime.config import load_config, to_yaml
    run = tmp_path / "run"
    (run / "population_lora").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config("tiny", [])))
    for n in range(3):
        (run / "clients" / str(n)).mkdir(parents=True)
    with pytest.raises(ServingError) as err:
        Serving(run).store_of("nobody")
    text = str(err.value)
    assert f"run {run} (3 client directories)" in text and "clients/0" not in text and "\n" not in text
