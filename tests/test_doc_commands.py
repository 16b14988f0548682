"""Every `proper local` / `proper sim` command quoted in README.md and docs/results/*.md still yields
the configuration of the run it cites, or the doc says it no longer does. No training: each command's
config name and overrides go through the config schema (load_config) only.

A quoted command: a line of a code block, or an inline `...` span, that starts with `proper local -c`
or `proper sim -c` (a `\\` at the end of a code line continues it; `$NAME` is the value a line
`NAME="..."` of the same code block gives it). It cites a run by `output.name=NAME` (the record
docs/results/*/runs/NAME/config.yaml) or by a marker `(record: .../runs/NAME)` (from the repository
root or docs/results): after
an inline command, in its paragraph (before the next command); after a code block, in the paragraph
right after it. A placeholder value is given in the marker: `(record: .../runs/c8b2p3-s0 with S=0)`
reads `seed=S` as `seed=0`. Every key the record holds (other than where the output went) must come
out of the command with the recorded value. A command that cites no record is a usage example: it
must still load through the schema.

A doc keeps a command that no longer reproduces its record, or one with a placeholder ($C, <dir>,
seed=S) and no record, by a marker `(historical: why)` in the same places: then it is not checked.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from shared.runtime.config import load_config
from shared.runtime.schema import SERVER_KEYS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "results").glob("*.md"))]
START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*proper\s+(?:local|sim)\s+-c\s")
MARKER = re.compile(r"\((historical|record):\s*([^)]*)\)")
VARIABLE = re.compile(r'^([A-Z_]+)="([^"]*)"$')
PLACEHOLDER = re.compile(r"\$\w|<[a-z ]+>|=S\b|=N\b")
# where a run's output went, not what it computed; and what `proper sim` sets itself (it raises
# federation.min_available_clients to the number of clients it starts and writes their number,
# simulation.num_clients)
NOT_CONFIGURATION = ("output.", "data.path", "federation.min_available_clients", "simulation.num_clients")
FEDERATION_ONLY = ("federation.", "simulation.")   # and each stage's server-optimizer keys (SERVER_KEYS)
STAGES = ("population", "group", "user")


@dataclass
class Command:
    doc: Path
    line: int
    text: str
    marker: tuple[str, str] | None = None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def historical(self) -> bool:
        return bool(self.marker) and self.marker[0] == "historical"

    def overrides(self) -> tuple[str, list[str]]:
        """(config name, overrides), a placeholder read as the record marker's `with NAME=VALUE` says."""
        words = shlex.split(self.text.split(" #")[0])
        words = words[words.index("-c"):]
        given = dict(re.findall(r"\b(\w+)=([^\s;,]+)", self.marker[1].split(" with ", 1)[1])) \
            if self.marker and " with " in self.marker[1] else {}
        overrides = []
        for w in words[2:]:
            if "=" in w and not w.startswith("-"):
                key, value = w.split("=", 1)
                overrides.append(f"{key}={given.get(value, value)}")
        return words[1], overrides

    def placeholder(self) -> bool:
        return bool(PLACEHOLDER.search(" ".join(self.overrides()[1]))) or "$" in self.text

    def config(self):
        return load_config(*self.overrides())

    def record(self) -> Path | None:
        if self.marker and self.marker[0] == "record":
            path = self.marker[1].split()[0].rstrip(";,")
            return ROOT / path if (ROOT / path).exists() else ROOT / "docs" / "results" / path
        name = re.search(r"\boutput\.name=(\S+)", self.text)
        if not name:
            return None
        found = sorted(ROOT.glob(f"docs/results/*/runs/{name.group(1)}/config.yaml"))
        return found[0].parent if found else None


def _blocks(lines: list[str]):
    """(first line number, lines) of each run of non-blank lines."""
    block, start = [], 0
    for n, line in enumerate(lines + [""], 1):
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield start, block
            block = []


def quoted_commands(doc: Path) -> list[Command]:
    out = []
    blocks = list(_blocks(doc.read_text().splitlines()))
    for b, (start, lines) in enumerate(blocks):
        if all(line.startswith("    ") for line in lines):      # a code block
            variables = dict(m.groups() for m in (VARIABLE.match(line.strip()) for line in lines) if m)
            after = "\n".join(blocks[b + 1][1]) if b + 1 < len(blocks) else ""
            marker = MARKER.search(after)
            for i, line in enumerate(lines):
                if not START.match(line.strip()):
                    continue
                text, j = line.strip(), i
                while text.endswith("\\") and j + 1 < len(lines):
                    j += 1
                    text = text[:-1] + " " + lines[j].strip()
                for name, value in variables.items():
                    text = text.replace(f"${name}", value)
                out.append(Command(doc, start + i, text, marker.groups() if marker else None))
            continue
        text = "\n".join(lines)
        spans = [m for m in re.finditer(r"`([^`]+)`", text) if START.match(m.group(1).replace("\n", " "))]
        for n, m in enumerate(spans):
            until = spans[n + 1].start() if n + 1 < len(spans) else len(text)
            marker = MARKER.search(text, m.end(), until)
            out.append(Command(doc, start + text.count("\n", 0, m.start()), " ".join(m.group(1).split()),
                               marker.groups() if marker else None))
    return out


COMMANDS = [c for doc in DOCS for c in quoted_commands(doc)]


def _flat(cfg, prefix="") -> dict:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def drift(command: Command, record: Path) -> list[str]:
    """What the command now gives otherwise than the record: a recorded key with another value (or
    gone), or a key the record predates set away from what the record ran with (the schema's default;
    for a stage's training key, the record's train.* value). `proper local` reads no federation keys."""
    now = _flat(OmegaConf.to_container(command.config(), resolve=True))
    then = _flat(OmegaConf.to_container(OmegaConf.load(record / "config.yaml"), resolve=True))
    schema = _flat(OmegaConf.to_container(load_config(None, []), resolve=True))
    ignored = NOT_CONFIGURATION + (FEDERATION_ONLY if " local " in f" {command.text} " else ())

    def counts(key: str) -> bool:
        return not key.startswith(ignored) and not (ignored != NOT_CONFIGURATION and key.split(".")[-1] in SERVER_KEYS)

    def ran_with(key: str):
        stage, _, name = key.partition(".")
        return then.get(f"train.{name}", schema.get(key)) if stage in STAGES else schema.get(key)
    changed = [f"{key}: recorded {value!r}, now {now.get(key, '<no such key>')!r}" for key, value in then.items()
               if counts(key) and now.get(key) != value]
    return changed + [f"{key}: not in the record, now {value!r} (it ran with {ran_with(key)!r})"
                      for key, value in now.items() if key not in then and counts(key) and value != ran_with(key)]


def test_the_docs_quote_commands():
    assert len(COMMANDS) > 20 and any(c.record() for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_a_quoted_command_yields_its_recorded_configuration(command):
    if command.historical:
        return
    record = command.record()
    assert not command.placeholder(), (f"{command.where}: `{command.text}` has a placeholder: give its value in a "
                                       "(record: ... with NAME=VALUE) marker, or mark it (historical: ...)")
    if record is None:
        command.config()   # a usage example: it loads
        return
    assert (record / "config.yaml").exists(), f"{command.where}: cites {record}, which holds no config.yaml"
    changed = drift(command, record)
    assert not changed, (f"{command.where}: `{command.text}` no longer yields the configuration of {record.name}: "
                         + "; ".join(changed) + ". Add the overrides the record used, or mark it (historical: ...)")


def test_a_command_whose_config_drifted_from_its_record_is_caught(tmp_path):
    """The lamp2 record's command without the overrides that give back its values fails; marked
    historical, or with them, it passes."""
    doc = tmp_path / "doc.md"
    doc.write_text("Commands:\n\n    proper local -c lamp2_sample output.name=lamp2-proper-local-B\n\nText.\n\n"
                   "`proper local -c lamp2_sample output.name=lamp2-oppu-local` (historical: other defaults)\n\n"
                   "`proper local -c lamp2_sample train.bf16=true population.rounds=1 population.batch_size=8 "
                   "group.batch_size=8 seed=S` (record: lamp2/runs/lamp2-proper-local-seed1 with S=1)\n")
    drifted, historical, seeded = quoted_commands(doc)
    assert "population.rounds: recorded 1, now 3" in drift(drifted, drifted.record())
    assert historical.historical
    assert not drift(seeded, seeded.record()) and not seeded.placeholder()
