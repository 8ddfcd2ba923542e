"""Shared test helpers: tiny models, chat data, and real multi-process launches of the entrypoint."""

import contextlib
import json
import os
import socket
import subprocess
import sys

from tests.forked_ranks import RANK_ENV, ForkedRank

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(REPO, "dist_lm_pretrain_and_finetune.py")
TOKENIZER = os.path.join(REPO, "assets", "tokenizer")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def held_port():
    """A port something else listens on and never answers (another job's, say); yields the port number."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def make_model(path, model_type="gptneox", hidden=32, layers=4, heads=4, extra=()):
    """tools/make_tiny_model.py, called in this process (a launch would cost the imports of torch and transformers
    again); the global RNG it seeds is restored afterwards."""
    import io

    import torch

    from tools.make_tiny_model import main

    argv = ["--output", str(path), "--model-type", model_type, "--hidden-size", str(hidden)]
    argv += ["--num-layers", str(layers), "--num-heads", str(heads), *extra]
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    assert code == 0, f"make_tiny_model {argv} exited {code}"
    return str(path)


def hf_attention(config) -> str:
    """transformers' attention for a reference model: SDPA like ours, except GPT-J (transformers 5.17, the GPU
    image, has no SDPA path for it)."""
    return "eager" if config.model_type == "gptj" else "sdpa"


def save_random_hf_model(config, directory):
    """A random transformers model of `config` (weights std 0.2, bos = eos = 0, seed 0), saved (safetensors) into
    `directory`; returns it in eval mode."""
    import torch
    import transformers

    config.initializer_range = 0.2
    config.bos_token_id = config.eos_token_id = 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=hf_attention(config)).eval()
    model.save_pretrained(str(directory))
    return model


def make_chat_data(path, n=120, seed=0):
    """OIG-style text records and chat-format records of varied length."""
    import random

    rng = random.Random(seed)
    words = "the a model learns to answer short questions about numbers colours cities rivers and time".split()
    with open(path, "w") as f:
        for i in range(n):
            question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(2, 20)))
            if i % 3 == 0:
                record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            else:
                record = {"text": f"<human>: {question}?\n<bot>: {answer}."}
            f.write(json.dumps(record) + "\n")
    return str(path)


def data_config(task_spec, seq_length=2048, batch_size=4, num_workers=1, **settings):
    """The DataConfig of a stream as the tests describe it (num_workers is --data-workers' field `workers`)."""
    from config import DataConfig

    return DataConfig(
        task_spec=task_spec, seq_length=seq_length, batch_size=batch_size, workers=num_workers, **settings
    )


STREAM_OPTIONS = ("show_data", "prefetch", "chunk_docs", "chunk_bytes", "show_every")


def packed_stream(task_spec, tokenizer, seq_length=2048, batch_size=4, dp_rank=0, dp_size=1, **settings):
    """tasks.PackedStream from the stream's settings as keywords: the DataConfig fields, plus its own options."""
    from tasks import PackedStream

    options = {k: settings.pop(k) for k in STREAM_OPTIONS if k in settings}
    data = data_config(task_spec, seq_length, batch_size, **settings)
    return PackedStream(data, tokenizer, dp_rank, dp_size, **options)


def eval_batches(paths, tokenizer, seq_length, batch_size, dp_rank=0, dp_size=1, chunk_docs=256, **settings):
    """tasks.evaluation_batches with the data settings as keywords."""
    from tasks import evaluation_batches

    data = data_config(None, seq_length, batch_size, **settings)
    return evaluation_batches(paths, tokenizer, data, dp_rank, dp_size, chunk_docs)


def base_flags(model_dir, data, ckpt, **overrides):
    flags = {
        "model-name": model_dir,
        "tokenizer-name": model_dir,
        "task-name": data,
        "checkpoint-path": ckpt,
        "seq-length": 32,
        "batch-size": 4,
        "micro-batch-size": 1,
        "gradient-accumulate-step": 1,
        "total-steps": 3,
        "warmup-steps": 0,
        "lr": 1e-3,
        "seed": 7,
        "use-cuda": "false",
        "dp-backend": "gloo",
        "load-checkpoint": "false",
        "dist-timeout": 60,
        # every checkpoint at its own step, however long the tiny writes take on a loaded machine: tests name them
        "defer-checkpoints": "false",
    }
    flags.update(overrides)
    out = []
    for key, value in flags.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not None and value is not False:
            out += [f"--{key}", str(value)]
    return out


def _rank_env(env):
    full_env = dict(os.environ, **RANK_ENV, **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    return full_env


def _start_ranks(nproc, flags, env, cwd, logs):
    """One ForkedRank per rank (--rank/--world-size/--dist-url, as the shell scripts start them), output in `logs`."""
    distributed = ["--world-size", str(nproc), "--dist-url", f"tcp://127.0.0.1:{free_port()}"]
    full_env = _rank_env(env)
    return [
        ForkedRank(
            [*flags, "--rank", str(rank), *distributed],
            full_env,
            cwd or REPO,
            os.path.join(logs, f"{rank}.out"),
            os.path.join(logs, f"{rank}.err"),
        )
        for rank in range(nproc)
    ]


def run_job(nproc, flags, env=None, timeout=300, cwd=None):
    """Run the entrypoint as `nproc` processes, one per rank, and wait for all; returns a CompletedProcess whose
    returncode is the first non-zero one (0 when all succeeded) and whose stdout/stderr are the ranks' outputs in
    rank order (never raises on failure). The ranks are forks of a server that imported torch once
    (tests/forked_ranks.py): tests of torchrun or of the launch itself use run_torchrun or a subprocess."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as logs:  # files, not pipes: a rank blocked on a full pipe would hang the job
        procs = _start_ranks(nproc, flags, env, cwd, logs)
        deadline = time.time() + timeout
        try:
            for proc in procs:
                proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
                proc.wait()
            raise
        outputs = [proc.output() for proc in procs]
    codes = [proc.returncode for proc in procs]
    code = next((c for c in codes if c != 0), 0)
    stdout, stderr = "".join(o for o, _ in outputs), "".join(e for _, e in outputs)
    return subprocess.CompletedProcess(procs[0].args, code, stdout, stderr)


def run_forked(flags, env=None, timeout=120, cwd=None):
    """One process of the entrypoint with exactly `flags` (no rank flags added) and the environment `env` (as
    subprocess's: default os.environ), forked as run_job's ranks are; returns its CompletedProcess (never raises on
    failure, except on the timeout)."""
    import tempfile

    full_env = dict(os.environ if env is None else env)
    for name, value in RANK_ENV.items():
        full_env.setdefault(name, value)
    with tempfile.TemporaryDirectory() as logs:
        proc = ForkedRank(flags, full_env, cwd or REPO, os.path.join(logs, "out"), os.path.join(logs, "err"))
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        stdout, stderr = proc.output()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_torchrun(nproc, flags, env=None, timeout=300, cwd=None, script=ENTRYPOINT):
    """Run the entrypoint (or a script that wraps it) under torchrun on CPU; returns the CompletedProcess (never
    raises on failure)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "--tee=3",
        script,
        *flags,
    ]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


_logs = None  # run_ranks' output files, removed when the tests end


def run_ranks(world, flags, env=None):
    """Start one process per rank, as run_job does, without waiting: wait_ranks collects them."""
    import tempfile

    global _logs
    if _logs is None:
        _logs = tempfile.TemporaryDirectory()
    return _start_ranks(world, flags, env, None, tempfile.mkdtemp(dir=_logs.name))


def read_checkpoint_weights(ckpt_dir, step=None, suffix="_model.safetensors"):
    """All HF-named weights of a training checkpoint (every stage file merged); with suffix
    "_optimizer.safetensors" too, the optimizer state ("<name>/exp_avg", ...)."""
    from safetensors.torch import load_file

    step = step if step is not None else int(open(os.path.join(ckpt_dir, "latest")).read())
    folder = os.path.join(ckpt_dir, f"checkpoint_{step}")
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(suffix):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def run_torchrun_launcher(nproc, flags, launcher_args=(), env=None, timeout=300):
    """run_torchrun with extra torchrun arguments (e.g. ["--max-restarts", "1"]); with "--rdzv-backend" among
    them no --master_port is passed."""
    port = [] if "--rdzv-backend" in launcher_args else [f"--master_port={free_port()}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *port,
        "--tee=3",
        *launcher_args,
        ENTRYPOINT,
        *flags,
    ]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def wait_ranks(procs, timeout=300):
    """Wait for the processes of run_ranks; [(returncode, stdout, stderr)] per rank (killed after `timeout`)."""
    import time

    deadline = time.time() + timeout
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += "\n[wait_ranks: killed after timeout]"
        out.append((proc.returncode, stdout, stderr))
    return out


def read_metrics(path, key="loss"):
    """{step: value} from a --metrics-file (JSON lines); later lines win."""
    values = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if key in record:
                    values[record["step"]] = record[key]
    return values


def damaged_files(folder):
    """Files of a checkpoint folder whose sha256 differs from meta.json (missing ones included)."""
    import hashlib

    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    bad = []
    for name, digest in meta["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            bad.append(name)
            continue
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                bad.append(name)
    return bad


def document_logits(model, batch):
    """A transformers model's logits for a packed batch as --attention-mask document sees it: each document of
    each row run alone (fresh positions), the rows put back together."""
    import torch

    rows = []
    for ids, docs in zip(batch["input_ids"], batch["doc_ids"]):
        parts = [model(ids[docs == d][None]).logits[0] for d in torch.unique(docs, sorted=True)]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


# what every run writes beside its checkpoints (the curves' process may still be renaming its partial file)
RUN_FILES = ("curves.png", "curves.png.partial.png", "metrics.jsonl")


def checkpoint_entries(ckpt_dir):
    """The names under a --checkpoint-path, without the run's metrics and curves."""
    return sorted(n for n in os.listdir(ckpt_dir) if n not in RUN_FILES)
