"""Where launch -> first step goes: the seconds since this process started at the end of each start-up phase.

The trainer calls `lap(phase)` as each phase ends; the time since the previous lap belongs to that phase. A phase
that repeats (model build and weights, once per stage of a rank holding several) adds up, and the phases are
reported in the order they first ended, so the figures always increase and the last one is the whole start-up.
Time is counted from the interpreter's start (read from /proc), so imports count too.
"""

import os
import time

# The phases in the order the trainer runs them (the metrics record and the log line list them so).
PHASES = ("imports", "process_group", "inputs", "model_build", "weights", "data", "optimizer", "resume", "first_step")


def process_start_time() -> float:
    """Wall-clock time at which this process started: its age from /proc (Linux, 10 ms ticks) subtracted from now;
    elsewhere, now (only the phases after the imports are measured then)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces: split after it
        started_ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.time()


class StartupClock:
    def __init__(self):
        self.start = process_start_time()
        self.last = self.start
        self.spent: dict[str, float] = {}  # phase -> seconds, in the order the phases first ended

    def lap(self, phase: str) -> None:
        """`phase` has just ended: the time since the previous lap is its."""
        now = time.time()
        self.spent[phase] = self.spent.get(phase, 0.0) + max(0.0, now - self.last)
        self.last = now

    def since_start(self) -> dict[str, float]:
        """{phase: seconds since the process started at the end of the phase}, rounded to milliseconds."""
        out, total = {}, 0.0
        for phase, seconds in self.spent.items():
            total += seconds
            out[phase] = round(total, 3)
        return out

    def line(self) -> str:
        """One log line: each phase's end and, in brackets, its own share."""
        ends = self.since_start()
        parts = [f"{phase} {end:.1f} (+{self.spent[phase]:.1f})" for phase, end in ends.items()]
        return "start-up, seconds since launch: " + ", ".join(parts)
