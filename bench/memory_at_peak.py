"""What is alive at the peak of a `--profiling memory_profiling` run: replays the allocator history the trainer wrote
(`memory_rank_N.pickle`, torch.cuda.memory._dump_snapshot; load only files your own run wrote) and prints the
allocations alive at the highest point, grouped by the innermost frame in this project's code (C++-only stacks, such
as autograd's backward, show as the frame torch recorded).

Only what was allocated after recording began counts (the weights loaded before the first step do not).

    python3 bench/memory_at_peak.py profiles/memory_rank_0.pickle [--top 25]
"""

import argparse
import collections
import os
import pickle

OUR_ROOMS = ("/training/", "/modules/", "/pipeline_parallel/", "/data_parallel/", "/optimizer/", "/context_parallel/")


def frame_of(event: dict) -> str:
    frames = event.get("frames") or []
    ours = [f for f in frames if any(room in f["filename"] for room in OUR_ROOMS)]
    f = ours[0] if ours else (frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
    return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.snapshot, "rb") as f:
        trace = pickle.load(f)["device_traces"][0]
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    print(f"{len(trace)} events; peak of the allocations made while recording: {peak / 2**30:.2f} GiB")
    size, count = collections.Counter(), collections.Counter()
    for event in at_peak.values():
        size[frame_of(event)] += event["size"]
        count[frame_of(event)] += 1
    for where, nbytes in size.most_common(args.top):
        print(f"{nbytes / 2**30:8.3f} GiB  {count[where]:6d} blocks  {where}")


if __name__ == "__main__":
    main()
