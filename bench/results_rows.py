"""Print RESULTS.md table rows (one per target) from the JSON files the benchmarks wrote.

    python bench/results_rows.py /work/.device/.../bench_single_gpu.json [more.json ...] >> bench/RESULTS.md

Copies what was measured; it never makes a row up: a target whose runs did not finish shows "n/a" / "not measured".
"""

import json
import sys

VERDICT = {True: "yes", False: "**no**", None: "not measured"}


def rows(payload: dict) -> list[str]:
    out = []
    card = payload["card"] + (f" x{payload['gpus']}" if payload.get("gpus", 0) > 1 else "")
    for t in payload["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        if t.get("detail"):
            value += f" ({t['detail']})"
        cells = [
            payload["date"],
            card,
            payload["commit"][:12],
            f"`{payload['command']}`",
            t.get("ours") or "-",
            t.get("reference") or "-",
            value,
            f"{t['target']} {t['compare']} {t['threshold']}",
            VERDICT[t["met"]],
        ]
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return out


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for path in paths:
        with open(path) as f:
            for row in rows(json.load(f)):
                print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
