"""Plot the latest results: ratios of medians, each from one call of bench.run.

    python -m bench.plot [bench/results/gpu-h200-ab.json bench/results/cpu-interleaved.json ...]
    -> bench/results/latest.png, and a Markdown table on stdout (for the README)

Only result files written by the interleaved bench.run (records with a "summary") are read;
every ratio in a row compares modes measured in the same call (median over its rounds).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(paths: list[Path]) -> list[tuple[str, dict]]:
    return [(p.stem, r) for p in paths for r in json.loads(p.read_text()) if "summary" in r and r.get("ratios")]


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| run (one call) | workload | rounds | ratio of medians | value |", "| --- | --- | --- | --- | --- |"]
    for run, r in rows:
        for name, value in r["ratios"].items():
            lines.append(f"| {run} | {r['workload']} | {r['rounds_done']} | {name} | {value} |")
    return "\n".join(lines)


def plot(rows: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{run} {r['workload']}\n{name}", value) for run, r in rows for name, value in r["ratios"].items()
            if "/" in name]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(bars)), 4))
    ax.bar(range(len(bars)), [v for _, v in bars])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("throughput ratio of medians")
    ax.set_title("vqueue: throughput ratios, medians of interleaved rounds in one call")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(RESULTS.glob("*.json"))
    rows = load([p for p in paths if p.exists()])
    if not rows:
        raise SystemExit("no interleaved results (records with a 'summary') among " + ", ".join(map(str, paths)))
    plot(rows, RESULTS / "latest.png")
    print(table(rows))


if __name__ == "__main__":
    main()
