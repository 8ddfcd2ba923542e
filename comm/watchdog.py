"""Make a failure on one rank end every rank, naming the rank that failed.

Each rank runs a daemon thread that, through the rendezvous store every process group already has:
- publishes a heartbeat every second;
- watches for an "abort" record, written by a rank that raised (see `report_failure`);
- declares a rank dead when its heartbeat is older than --dist-timeout (a SIGKILL or a lost machine leaves no record).
On either, it prints one line and exits the process with status 1, so no rank waits forever in a collective. When
the store itself is gone (rank 0 or the launcher exited) it first gives this rank's main thread STORE_LOST_GRACE_S to
report an error of its own: when every rank stops on the same error (a failed save), rank 0 may exit first, and the
line a user reads on the others should be that error, not the lost store.
Keys carry torchrun's restart count, so an attempt never reads the records of a failed earlier attempt.
"""

import os
import threading
import time

import torch.distributed as dist

from utils.logging import error_line

HEARTBEAT_S = 1.0
STORE_LOST_GRACE_S = 2.0


def _key(name):
    return f"watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


class Watchdog:
    def __init__(self, rank, world_size, timeout_s):
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.store = dist.distributed_c10d._get_default_store()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self):
        self._beat()
        self.thread.start()
        return self

    def stop(self):
        self.stopped.set()

    def _beat(self):
        self.store.set(_key(f"heartbeat/{self.rank}"), repr(time.time()))

    def _exit(self, message):
        if self.stopped.is_set():
            return
        error_line(f"[rank {self.rank}] {message}")
        os._exit(1)

    def _run(self):
        seen = {}  # rank -> (last heartbeat value, local time it last changed)
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self._beat()
                reported = _reported_failure(self.store)
                if reported and reported[0] != self.rank:  # the failing rank itself reports and exits on its own
                    self._exit(f"stopping: {reported[1]}")
                now = time.time()
                silent = {}  # rank -> seconds since its heartbeat last changed
                for other in range(self.world_size):
                    if other == self.rank:
                        continue
                    key = _key(f"heartbeat/{other}")
                    value = self.store.get(key) if self.store.check([key]) else b""
                    last_value, changed = seen.get(other, (None, now))
                    if value != last_value:
                        seen[other] = (value, now)
                    else:
                        silent[other] = now - changed
                if any(s > self.timeout_s for s in silent.values()):
                    # a lost machine takes several ranks at once: name every rank that has been silent for a
                    # while, not only the first to pass the timeout (a live rank beats every HEARTBEAT_S)
                    quiet = min(self.timeout_s, max(self.timeout_s / 2, 3 * HEARTBEAT_S))
                    lost = sorted(r for r, s in silent.items() if s > quiet)
                    names = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}"
                    self._exit(
                        f"stopping: {names} sent no heartbeat for {self.timeout_s:.0f} s "
                        f"(--dist-timeout); {'it' if len(lost) == 1 else 'they'} died or hang (a lost node?), "
                        f"see {'its' if len(lost) == 1 else 'their'} log"
                    )
            except Exception as exc:  # the store lives with rank 0 / torchrun: losing it means the job is gone
                if self.stopped.wait(STORE_LOST_GRACE_S):  # a failing main thread exits the process before this
                    return
                self._exit(
                    f"stopping: lost the rendezvous store ({type(exc).__name__}: {exc}); rank 0 or the launcher died"
                )


def _reported_failure(store):
    """(rank, message) of the first rank that reported a failure, or None."""
    if not store.check([_key("abort")]):
        return None
    failed, message = store.get(_key("abort")).decode().split("|", 1)
    return int(failed), message


def report_failure(rank, message):
    """Tell every rank that this one failed (best effort: the store may already be gone). The first report stays:
    later ones are usually consequences of it."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.compare_set(_key("abort"), "", f"{rank}|rank {rank} failed: {message}")
    except Exception:  # noqa: BLE001 - nothing more can be done; the heartbeat timeout still catches it
        pass


def failure_of_another_rank(rank):
    """The failure another rank reported, if any. A rank whose collective broke because a peer exited (gloo closes
    the connection at once) names that first failure instead of its own consequential error."""
    try:
        reported = _reported_failure(dist.distributed_c10d._get_default_store())
    except Exception:  # noqa: BLE001 - the store is gone with the launcher: report this rank's own error
        return None
    return reported[1] if reported and reported[0] != rank else None
