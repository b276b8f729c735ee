"""Print one passkey table for all arms of passkey.sh (rows: arm x needle depth, columns: context length) from
each arm's `infinitrain eval passkey` JSON, with the training wall times and the memory temperature factor the eval
used, and save it as summary.json. A memory
arm's ``<arm>-no-memory`` folder (the same model evaluated with ``--no-memory``) adds rows ``<arm> no-mem``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from infinitrain.evaluate.passkey import length_label

TARGET_LENGTH = 32 * 1024


def load(out: Path, arm: str) -> tuple[dict, dict]:
    report = json.loads((out / arm / "passkey.json").read_text())
    train_file = out / arm / "train.json"
    return report, (json.loads(train_file.read_text()) if train_file.is_file() else {})


def no_memory(out: Path, arm: str) -> dict | None:
    """The ``--no-memory`` report of ``arm`` (``<arm>-no-memory/passkey-no-memory.json``), or None."""
    f = out / f"{arm}-no-memory" / "passkey-no-memory.json"
    return json.loads(f.read_text()) if f.is_file() else None


def rows(label: str, report: dict, lengths: list[int]) -> tuple[list[str], float | None]:
    """Table lines of one report (one per depth; '-' where it has no such length), and its worst cell at 32K."""
    by = {(c["length"], c["depth"]): c["accuracy"] for c in report["cells"]}
    depths = report["config"]["depths"]
    lines = [f"{label:>14s} {100 * d:>5.0f}%" + "".join(f"{100 * by[n, d]:>8.0f}" if (n, d) in by else f"{'-':>8s}"
                                                       for n in lengths) for d in depths]
    at_target = [by[n, d] for n in report["config"]["lengths"] if n == TARGET_LENGTH for d in depths]
    return lines, (min(at_target) if at_target else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", help="results folder of passkey.sh (one sub-folder per arm)")
    ap.add_argument("--arms", nargs="+", default=["linear", "delta", "off"])
    args = ap.parse_args()
    out = Path(args.out)
    arms = [a for a in args.arms if (out / a / "passkey.json").is_file()]
    if not arms:
        raise SystemExit(f"error: {out}: no <arm>/passkey.json found for {', '.join(args.arms)}")
    reports = {arm: load(out, arm) for arm in arms}
    lengths = sorted({n for report, _ in reports.values() for n in report["config"]["lengths"]})
    summary, lines = {"arms": {}}, []
    for arm, (report, train) in reports.items():
        arm_lines, worst = rows(arm, report, lengths)
        seconds = train.get("stage1_seconds", 0) + train.get("stage2_seconds", 0)
        summary["arms"][arm] = {"cells": report["cells"], "samples_per_cell": report["config"]["samples"],
                                "min_accuracy_at_32k": worst, "train": train, "train_seconds": seconds,
                                "eval_seconds": report["seconds"]}
        tau = report.get("memory_tau_scale", 1.0)  # eval --memory-tau-scale (passkey.sh: chosen on validation)
        summary["arms"][arm]["memory_tau_scale"] = tau
        lines += arm_lines
        lines.append(f"{'':>14s} (train {seconds} s, eval {round(report['seconds'])} s"
                     + (f", memory τ x{tau:g}" if tau != 1 else "") + ")")
        control = no_memory(out, arm)
        if control is not None:
            control_lines, control_worst = rows(f"{arm} no-mem", control, lengths)
            summary["arms"][arm]["no_memory"] = {"cells": control["cells"], "min_accuracy_at_32k": control_worst,
                                                 "eval_seconds": control["seconds"]}
            lines += control_lines
    head = f"{'arm':>14s} {'depth':>6s}" + "".join(f"{length_label(n):>8s}" for n in lengths)
    print("passkey accuracy (%) per needle depth (0% = farthest from the question) and context length (tokens);")
    print("'no-mem': the same model with --no-memory (its local attention alone)")
    print(head)
    print("\n".join(lines))
    for arm, s in summary["arms"].items():
        if s["min_accuracy_at_32k"] is not None:
            print(f"{arm}: worst depth at 32K = {100 * s['min_accuracy_at_32k']:.0f}% "
                  f"({s['samples_per_cell']} prompts per cell; target >= 95% with memory)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
