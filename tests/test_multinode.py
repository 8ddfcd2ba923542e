"""Several nodes on one host: each "node" is its own launcher (torchrun, or the entrypoint's launcher mode through
examples/multinode.sh and examples/slurm.sbatch) with 2 workers, meeting through a c10d rendezvous on localhost.
pp=2 x dp=2 on 2 x 2 processes, so both the pipeline and the data-parallel groups cross the node boundary.

A single 4-process torchrun is the reference; every multi-node run (uninterrupted, after a node was lost and the job
relaunched, after an elastic restart, one process per rank) must end with bit-identical weights and optimizer state.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import (
    ENTRYPOINT,
    REPO,
    base_flags,
    free_port,
    make_chat_data,
    make_model,
    read_checkpoint_weights,
    run_ranks,
    run_torchrun,
    wait_ranks,
)

pytestmark = pytest.mark.e2e

STEPS, EVERY = 4, 2  # optimizer steps, --checkpoint-steps
TIMEOUT = 15  # --dist-timeout (s) of the run whose node is lost; the others keep 60 s (a busy CI host is slow to start)
BOTH = ("_model.safetensors", "_optimizer.safetensors")
ENV = dict(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train_flags(setup, ckpt, **overrides):
    flags = {
        "pipeline-group-size": 2,
        "data-group-size": 2,
        "batch-size": 2,
        "total-steps": STEPS,
        "checkpoint-steps": EVERY,
        "keep-checkpoints": 0,
        "load-checkpoint": "true",
    }
    flags.update(overrides)
    return base_flags(setup["model"], setup["data"], str(ckpt), **flags)


def latest(ckpt):
    path = os.path.join(ckpt, "latest")
    return int(open(path).read()) if os.path.exists(path) else None


def assert_bit_identical(got_dir, want_dir):
    got = read_checkpoint_weights(str(got_dir), suffix=BOTH)
    want = read_checkpoint_weights(str(want_dir), suffix=BOTH)
    assert set(got) == set(want) and len(want) > 100
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, the data and the reference: the same job under one torchrun with 4 processes."""
    root = tmp_path_factory.mktemp("multinode")
    setup = {
        "root": root,
        "model": make_model(root / "model", hidden=32, layers=4, heads=4),
        "data": make_chat_data(root / "chat.jsonl"),
    }
    setup["ref"] = str(root / "reference")
    result = run_torchrun(4, train_flags(setup, setup["ref"]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert latest(setup["ref"]) == STEPS
    return setup


def start_node(port, flags, max_restarts=0, env=None):
    """One node: a torchrun agent with 2 workers, c10d rendezvous at 127.0.0.1:port (whichever agent binds it first
    hosts it). Output goes to a file: a pipe nobody reads could fill and stall the node."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=job{port}",
        f"--max-restarts={max_restarts}",
        ENTRYPOINT,
        *flags,
    ]
    return _popen(cmd, env)


def _popen(cmd, env=None, log=None):
    import tempfile

    out = log or tempfile.TemporaryFile(mode="w+")
    full_env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **ENV}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not from the test's own launcher
        full_env.pop(name, None)
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO)
    proc.log = out
    return proc


def output(proc):
    proc.log.seek(0)
    return proc.log.read()


def wait_nodes(procs, timeout):
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid) + [proc.pid]:
                _kill(pid)
            proc.wait()
    return [(proc.returncode, output(proc)) for proc in procs]


def descendants(pid):
    """Every live process below `pid` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_ranks(pid):
    """{global rank: pid} of the workers below a launcher, read from their environment."""
    ranks = {}
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env:
            ranks[int(env[b"RANK"])] = child
    return ranks


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(condition, timeout, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        assert all(p.poll() is None for p in procs), [output(p)[-2000:] for p in procs]
        time.sleep(0.1)
    assert condition(), [output(p)[-2000:] for p in procs]


def two_nodes(flags, max_restarts=0, env=None):
    """Two torchrun nodes. The c10d rendezvous store is held here, as by a rendezvous host that outlives the nodes:
    both agents find the port taken and join as clients. (When the node hosting the rendezvous is lost, torchrun's
    agent on the other node fails at once with RendezvousConnectionError, before its workers can name anything.)"""
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    nodes = [start_node(port, flags, max_restarts, env) for _ in range(2)]
    for node in nodes:
        node.rdzv_store = store  # alive as long as the nodes are
    return nodes


def script_env(setup, ckpt, max_restarts=0):
    """The environment examples/multinode.sh reads, for the tiny model: 2 "GPUs" per node, pp=2."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),  # the rendezvous port (29400 unless set)
        "NNODES": "2",
        "MODEL": setup["model"],
        "DATA": setup["data"],
        "CHECKPOINT_PATH": ckpt,
        "GPUS_PER_NODE": "2",
        "PP": "2",
        "MAX_RESTARTS": str(max_restarts),
        "JOB_ID": f"job{free_port()}",
        "TRAIN_FLAGS": " ".join(train_flags(setup, ckpt)),  # the tiny model's flags instead of the 20B defaults
        "PYTHON": sys.executable,
    }


def test_slurm_script_on_two_nodes_trains_bit_exact(setup, tmp_path):
    """examples/slurm.sbatch run once per "node" with SLURM's variables set and stand-ins for srun (it runs its
    command here) and scontrol: each runs examples/multinode.sh, i.e. one launcher per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho \"$3\" | tr , '\\n'\n")  # show hostnames LIST
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    ckpt = str(tmp_path / "ckpt")
    env = script_env(setup, ckpt)
    for name in ("MASTER_ADDR", "NNODES", "MAX_RESTARTS", "JOB_ID"):  # the batch script derives these
        del env[name]
    env.update(
        {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SLURM_NNODES": "2",
            "SLURM_JOB_ID": str(free_port()),
            "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2",
            "SLURM_SUBMIT_DIR": REPO,
            "MAX_RESTARTS": "0",
        }
    )
    nodes = []
    for node in range(2):
        nodes.append(
            _popen(["bash", os.path.join(REPO, "examples", "slurm.sbatch")], dict(env, SLURM_NODEID=str(node)))
        )
        time.sleep(1.0)
    results = wait_nodes(nodes, 300)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert f"saved checkpoint {ckpt}/checkpoint_{STEPS}" in "".join(out for _, out in results)
    assert_bit_identical(ckpt, setup["ref"])


def test_lost_node_stops_the_other_within_the_timeout_and_relaunch_resumes_bit_exact(setup, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    flags = train_flags(setup, ckpt)
    nodes = two_nodes(flags + ["--dist-timeout", str(TIMEOUT)], env={"CKPT_HOLD_AFTER_SAVE": f"{EVERY}:120"})
    wait_for(lambda: latest(ckpt) == EVERY, 180, nodes)
    time.sleep(1.0)  # every rank finished the save and sleeps in the pause
    # the node without rank 0 is lost (the rendezvous numbers the nodes; rank 0 holds the workers' store, and its
    # loss is reported as a lost store instead)
    lost = next(i for i, node in enumerate(nodes) if 0 not in worker_ranks(node.pid))
    assert sorted(worker_ranks(nodes[lost].pid)) == [2, 3], [worker_ranks(node.pid) for node in nodes]
    for pid in [nodes[lost].pid, *descendants(nodes[lost].pid)]:  # the whole node: its agent and its workers
        _kill(pid)
    killed_at = time.time()
    (rc, out), _ = wait_nodes([nodes[1 - lost], nodes[lost]], TIMEOUT + 60)
    took = time.time() - killed_at
    assert rc not in (0, None), out[-3000:]
    assert took < TIMEOUT + 10, (took, out[-3000:])
    assert "ranks 2, 3 sent no heartbeat" in out, out[-3000:]
    assert latest(ckpt) == EVERY

    # the same command on both nodes again: the job resumes from `latest` and ends as if nothing had happened
    results = wait_nodes(two_nodes(flags), 300)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert f"checkpoint_{EVERY} (step {EVERY}" in "".join(out for _, out in results)
    assert latest(ckpt) == STEPS
    assert_bit_identical(ckpt, setup["ref"])


def test_max_restarts_restarts_both_nodes_after_a_worker_dies_and_finishes_bit_exact(setup, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    env = dict(script_env(setup, ckpt, max_restarts=1), CKPT_HOLD_AFTER_SAVE=f"{EVERY}:120")
    nodes = []
    for _ in range(2):  # examples/multinode.sh, the same command on both nodes
        nodes.append(_popen(["bash", os.path.join(REPO, "examples", "multinode.sh")], env))
        time.sleep(1.0)
    wait_for(lambda: latest(ckpt) == EVERY, 180, nodes)
    time.sleep(1.0)
    ranks = {**worker_ranks(nodes[0].pid), **worker_ranks(nodes[1].pid)}
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    _kill(ranks[3])  # one worker; its launcher and the other node's launcher restart every worker
    results = wait_nodes(nodes, 300)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert f"checkpoint_{EVERY} (step {EVERY}" in "".join(out for _, out in results)
    assert latest(ckpt) == STEPS
    assert_bit_identical(ckpt, setup["ref"])


def test_one_node_launcher_restarts_its_workers_after_one_dies_and_finishes_bit_exact(setup, tmp_path):
    """Launcher mode on one node restarts the workers itself (so that it can leave user errors alone)."""
    ckpt = str(tmp_path / "ckpt")
    command = [sys.executable, ENTRYPOINT, "--nproc-per-node", "4", "--max-restarts", "1", *train_flags(setup, ckpt)]
    node = _popen(command, {"CKPT_HOLD_AFTER_SAVE": f"{EVERY}:120"})
    wait_for(lambda: latest(ckpt) == EVERY, 180, [node])
    time.sleep(1.0)
    ranks = worker_ranks(node.pid)
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    _kill(ranks[3])
    ((rc, out),) = wait_nodes([node], 300)
    assert rc == 0 and "launcher: restart 1 of 1 after:" in out, out[-3000:]
    assert latest(ckpt) == STEPS
    assert_bit_identical(ckpt, setup["ref"])


def test_one_process_per_rank_with_net_interface_lo(setup, tmp_path):
    """The way finetune_GPT-NeoXT-Chat-Base-20B.sh launches: 4 processes started separately with --rank."""
    ckpt = str(tmp_path / "ckpt")
    flags = train_flags(setup, ckpt, **{"net-interface": "lo"})
    results = wait_ranks(run_ranks(4, flags), 300)
    for rc, stdout, stderr in results:
        assert rc == 0, stdout[-2000:] + stderr[-2000:]
    assert_bit_identical(ckpt, setup["ref"])
