"""Does the population stage learn the inputs or only the label prior? (issue 33, part 4)

    python -m bench.population_prior SUITE_OUT [LABEL=SUITE_OUT ...] [--method proper-fed] [--md FILE]

Reads the result JSONs of bench.suite output directories (<out>/results/<cell>.json, or the records
under docs/results/suite/<side>) and, for every
label-task data set (accuracy) with a population stage, sets the population stage's val accuracy
(mean [min, max] over run seeds) beside the bare backbone and the data set's reference rows: the most
frequent training label overall (what a model that learned only the population's label prior would
score) and each user's most frequent label. The last line is the correlation, over data sets, of the
population stage's val with the prior's. Several directories (LABEL=DIR) set the same method run
with different settings side by side, e.g. the population stage at two server learning rates.
Nothing is run: it reads what bench.suite wrote.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from shared.runtime.persist import atomic_write_text


def results_dir(out: Path) -> Path:
    """<out>/results of a bench.suite run, or a directory of its records (docs/results/suite/<side>)."""
    return out / "results" if (out / "results").is_dir() else out


def _val(res: dict, stage: str, metric: str = "accuracy") -> float | None:
    return ((res.get("stages") or {}).get(stage) or {}).get("val", {}).get(metric)


def _ref(out: Path, dataset: str, prefix: str) -> float | None:
    path = results_dir(out) / f"{dataset}--reference.json"
    if not path.is_file():
        return None
    for row in json.loads(path.read_text()):
        if row["split"] == "val" and row["label"].startswith(prefix):
            return row["metrics"].get("accuracy")
    return None


def collect(out: Path, method: str) -> dict[str, dict]:
    """Per data set: the population and backbone val accuracy of each finished seed, the references."""
    rows: dict[str, dict] = {}
    for path in sorted(results_dir(out).glob(f"*--{method}--s*.json")):
        res = json.loads(path.read_text())
        pop = _val(res, "population")
        if res.get("rc") != 0 or pop is None:
            continue
        row = rows.setdefault(res["dataset"], {"population": [], "population_f1": [], "base": [],
                                              "prior": _ref(out, res["dataset"], "most frequent"),
                                              "own": _ref(out, res["dataset"], "each user")})
        row["population"].append(pop)
        row["population_f1"].append(_val(res, "population", "macro_f1"))
        if _val(res, "base") is not None:
            row["base"].append(_val(res, "base"))
    return rows


def _band(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = 100 * statistics.mean(xs)
    return f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} [{100 * min(xs):.1f}, {100 * max(xs):.1f}]"


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r (the standard library's); None where it is not defined (under 3 points, a constant)."""
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def table(sources: list[tuple[str, Path]], method: str) -> str:
    got = [(label, collect(out, method)) for label, out in sources]
    names = sorted({d for _, rows in got for d in rows})
    head = ["data set", "prior (most frequent label) %", "each user's most frequent %", "bare backbone %"]
    for label, _ in got:
        head += [f"population val % ({label})", f"population macro-F1 % ({label})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        first = next(rows[name] for _, rows in got if name in rows)
        cells = [name, _band([first["prior"]] if first["prior"] is not None else []),
                 _band([first["own"]] if first["own"] is not None else []), _band(first["base"][:1])]
        for _, rows in got:
            r = rows.get(name)
            cells += [_band(r["population"]) if r else "-",
                      _band([f for f in r["population_f1"] if f is not None]) if r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, rows in got:
        pairs = [(r["prior"], statistics.mean(r["population"])) for r in rows.values() if r["prior"] is not None]
        base = [(r["base"][0], statistics.mean(r["population"])) for r in rows.values() if r["base"]]
        rp = pearson([p for p, _ in pairs], [q for _, q in pairs])
        rb = pearson([p for p, _ in base], [q for _, q in base])
        fmt = lambda r: "-" if r is None else f"{r:+.2f}"   # noqa: E731
        lines.append(f"{label}: {len(rows)} data sets; correlation of the population stage's val with the "
                     f"prior's {fmt(rp)}, with the bare backbone's {fmt(rb)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", help="SUITE_OUT or LABEL=SUITE_OUT")
    ap.add_argument("--method", default="proper-fed", help="the cells' method (population, proper-fed, ...)")
    ap.add_argument("--md", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    sources = []
    for s in args.sources:
        label, _, path = s.rpartition("=")
        out = Path(path)
        if not any(results_dir(out).glob("*--reference.json")):
            print(f"population_prior: {out} holds no bench.suite results (<cell>.json)", file=sys.stderr)
            return 2
        sources.append((label or out.name, out))
    md = table(sources, args.method)
    print(md, end="")
    if args.md:
        atomic_write_text(args.md, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
