"""Training curves from metrics files (JSON lines, one record per logged step), several runs overlaid.

    python tools/plot_metrics.py RUN/metrics.jsonl [OTHER/metrics.jsonl ...] --output curves.png

The command line of `training.curves` (six panels, one PNG of 1500 x 900 pixels, no display needed).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from training.curves import MetricsError, plot_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", metavar="METRICS.jsonl", help="metrics files (--metrics-file)")
    parser.add_argument("--output", default="curves.png", help="PNG to write (default: curves.png)")
    args = parser.parse_args(argv)
    try:
        plot_metrics(args.metrics, args.output)
    except (MetricsError, OSError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    print(f"plot_metrics: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
