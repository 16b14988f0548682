"""`proper client` restarts a SuperNode whose replies fell one message behind (client/deploy.py
ReplyWatch): the log lines below are what flower-supernode 1.41 printed on CI for the node that
was receiving when the SuperLink was killed (run 1 the killed run, run 2 the resumed one)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from client.deploy import ReplyWatch

ROOT = Path(__file__).resolve().parent.parent
INFO = "\x1b[92mINFO \x1b[0m:      "


def lines(*texts):
    return [INFO + t for t in texts]


IN_STEP = lines("[RUN 2]", "Receiving: train.population message (ID: a1)", "Received successfully",
                "Start `flwr-clientapp` process", "", "[RUN 2]", "Sending: train.population message (ID: a2)",
                "Sent successfully", "", "[RUN 2, ROUND 3]", "Receiving: evaluate message (ID: b1)",
                "Received successfully", "[RUN 2, ROUND 3]", "Sending: evaluate message (ID: b2)", "Sent successfully")
# the orphan reply of run 1 goes out after run 2's first message arrived: one message late from here on
LATE = lines("[RUN 2]", "Receiving: train.population message (ID: c1)", "Received successfully", "",
             "[RUN 1]", "Sending: train.population message (ID: d203)",
             "Run ID 1 is not in `RUNNING` status. Ignoring reply message d203.")


def first_reason(log):
    watch = ReplyWatch()
    for line in log:
        if why := watch.feed(line):
            return why
    return None


def test_a_supernode_in_step_is_left_alone():
    assert first_reason(IN_STEP) is None
    # a message of a run that stopped is ignored on arrival: no reply is owed, nothing is out of step
    assert first_reason(IN_STEP + lines("Run transitioned to a non-`RUNNING` status while receiving a message. "
                                        "Ignoring the message.") + IN_STEP) is None
    # a stale reply dropped by the SuperLink after its run stopped: in step
    assert first_reason(IN_STEP + lines("[RUN 2]", "Receiving: evaluate message (ID: g1)", "[RUN 2]",
                                        "Sending: evaluate message (ID: g2)",
                                        "Run ID 2 is not in `RUNNING` status. Ignoring reply message g2.")
                        + IN_STEP) is None


def test_a_reply_sent_for_another_message_than_the_one_waiting_is_caught():
    why = first_reason(IN_STEP + LATE)
    assert why is not None and "run 1" in why and "run 2" in why and "one message late" in why
    # the same run, another message type: also out of step
    assert first_reason(lines("[RUN 2]", "Receiving: evaluate message (ID: e)", "[RUN 2]",
                              "Sending: train.group message (ID: f)")) is not None


def test_a_message_given_up_on_is_caught_before_its_orphan_reply():
    # what the nodes printed when the SuperLink came back without run 1 (local runs of the test)
    log = lines("[RUN 1]", "Receiving: train.population message (ID: d1)",
                "Connection attempt failed, retrying in 0.82 seconds", "Start `flwr-clientapp` process",
                "Run ID 1 is not in `RUNNING` status. Ignoring message d1.")
    assert "gave up on a message" in first_reason(log)
    log = lines("[RUN 1]", "Receiving: train.population message (ID: d1)")
    log.append("\x1b[91mERROR \x1b[0m:     Failed to receive message d1: connection refused")
    assert "gave up on a message" in first_reason(log)


FAKE_SUPERNODE = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    starts = Path(sys.argv[1])
    starts.write_text(starts.read_text() + "start\\n" if starts.exists() else "start\\n")
    n = starts.read_text().count("start")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    Path(sys.argv[1] + f".child{n}").write_text(str(child.pid))
    Path(sys.argv[1] + f".self{n}").write_text(str(os.getpid()))
    if n == 1:  # the first one falls out of step; the second one stays in step
        for line in sys.argv[2:]:
            print(line, file=sys.stderr, flush=True)
    time.sleep(300)
""")

DRIVER = textwrap.dedent("""
    import argparse, os, sys
    import client.deploy as deploy
    fake, starts, *log = sys.argv[1:]
    deploy.supernode_command = lambda args: ([sys.executable, fake, starts, *log], dict(os.environ))
    args = argparse.Namespace(dry_run=False, state=os.path.dirname(starts), rejoin_s=30)
    sys.exit(deploy.run_client(args))
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def wait(predicate, limit_s=30.0):
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_proper_client_restarts_the_supernode_and_what_it_started(tmp_path):
    """run_client with a stand-in for flower-supernode (the same process handling, no Flower):
    the first one prints the late-reply lines and is restarted, with the process it started;
    the second one is left running; SIGTERM stops the wrapper and the SuperNode's whole group."""
    fake, driver = tmp_path / "fake_supernode.py", tmp_path / "driver.py"
    fake.write_text(FAKE_SUPERNODE)
    driver.write_text(DRIVER)
    starts = tmp_path / "starts"
    log = tmp_path / "wrapper.log"
    with log.open("w") as out:
        wrapper = subprocess.Popen([sys.executable, str(driver), str(fake), str(starts), *(IN_STEP + LATE)],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert wait(lambda: (tmp_path / "starts.child2").exists()), log.read_text()
        said = log.read_text()
        assert "restarting the SuperNode" in said and "one message late" in said, said
        assert "Sending: train.population message (ID: d203)" in said  # the SuperNode's log passes through
        assert wait(lambda: not alive(int((tmp_path / "starts.child1").read_text())), 10)
        time.sleep(2)  # the second SuperNode stays: it printed nothing out of step
        assert starts.read_text().count("start") == 2 and wrapper.poll() is None
        child2 = int((tmp_path / "starts.child2").read_text())
        assert alive(child2)
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0
        assert wait(lambda: not alive(child2), 10)
    finally:  # nothing left behind when an assertion failed
        if wrapper.poll() is None:
            wrapper.kill()
        for f in tmp_path.glob("starts.*"):
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
