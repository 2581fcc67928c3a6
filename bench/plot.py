"""Plot the latest results: throughput of each mode relative to the bare engine, per workload.

    python -m bench.plot [bench/results/gpu-h100.json bench/results/cpu.json ...]
    -> bench/results/latest.png, and a Markdown table on stdout (for the README)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ["bare", "queue", "queue-noevents", "queue-x2", "serve"]


def load(paths: list[Path]) -> list[tuple[str, dict]]:
    return [(p.stem, record) for p in paths for record in json.loads(p.read_text()) if "modes" in record]


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| run | workload | mode | wall s | jobs/s | output tok/s | p50 latency s | queue/bare | queue/serve |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for run, r in rows:
        for mode in (m for m in MODES if m in r["modes"]):
            f = r["modes"][mode]
            ratio_b = r["ratios"].get(f"{mode}/bare", "")
            ratio_s = r["ratios"].get(f"{mode}/serve", "")
            lines.append(f"| {run} | {r['workload']} | {mode} | {f['wall_s']:.2f} | {f['jobs_per_s']:.1f} | "
                         f"{f['output_tokens_per_s']:.0f} | {f['latency_p50_s']:.3f} | {ratio_b} | {ratio_s} |")
    return "\n".join(lines)


def plot(rows: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{run}\n{r['workload']}" for run, r in rows]
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = [r["modes"][mode]["jobs_per_s"] / r["modes"]["bare"]["jobs_per_s"] if mode in r["modes"] else 0
                  for _, r in rows]  # fmt: skip
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=mode)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(MODES) - 1) / 2 for x in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("jobs/s relative to the bare engine")
    ax.set_title("vqueue: throughput by mode (same run, same machine)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    default = [RESULTS / n for n in ("gpu-h100.json", "gpu-h100-rerun.json", "cpu.json")]
    paths = [Path(p) for p in sys.argv[1:]] or default
    rows = load([p for p in paths if p.exists()])
    plot(rows, RESULTS / "latest.png")
    print(table(rows))


if __name__ == "__main__":
    main()
