"""Peak memory of loading one pipeline stage from a single-file safetensors checkpoint.

    python bench/load_memory.py [--size-mb 200] [--stages 4] [--workdir DIR] [--json]

Saves a random GPT-NeoX model of about --size-mb as `model.safetensors`, then, in one fresh process per stage,
builds the stage (baseline: peak RSS after imports + building the empty stage) and loads its weights; reports
(peak RSS - baseline) / checkpoint size per stage. A stage's own parameters are already in the baseline, so that
figure is the loader's overhead (file pages mapped while reading, temporaries); the second figure measures from
before the stage was built, so it includes the stage's own share (about 1/stages).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LAYERS, HEAD_DIM, VOCAB = 8, 64, 1024


def _peak_rss_kb() -> int:
    """VmHWM: this process's peak resident set. (ru_maxrss would do, except Linux carries it across exec from the
    forking parent, which here is bigger than the worker.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _worker(model_dir: str, start: int, end: int, first: bool, last: bool) -> None:
    import torch  # noqa: F401

    from modules.stage import build_stage
    from modules.weights import expected_names, load_stage_weights

    with open(os.path.join(model_dir, "cfg.pkl"), "rb") as f:  # no transformers import in the worker
        cfg = pickle.load(f)
    expected_names(cfg)  # warm-up: torch's first ops allocate thread pools etc.; keep that out of the figures
    imports = _peak_rss_kb()
    stage = build_stage(cfg, start, end, first, last)
    baseline = _peak_rss_kb()
    load_stage_weights(stage, model_dir)
    peak = _peak_rss_kb()
    print(json.dumps({"imports_kb": imports, "baseline_kb": baseline, "peak_kb": peak}))


def make_model(model_dir: str, size_mb: float) -> int:
    from modules import ModelConfig, build_stage, init_stage_weights, save_hf_directory

    hidden = int((size_mb * 1e6 / (4 * 12 * LAYERS)) ** 0.5) // HEAD_DIM * HEAD_DIM  # 12·h² params per layer
    heads = hidden // HEAD_DIM
    hf_config = {
        "model_type": "gpt_neox",
        "architectures": ["GPTNeoXForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "use_parallel_residual": True,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
    }
    # Built by hand rather than through transformers' AutoConfig: keeps this benchmark's start-up short.
    cfg = ModelConfig(
        model_type="gptneox",
        hidden_size=hidden,
        num_layers=LAYERS,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        intermediate_size=4 * hidden,
        norm_eps=1e-5,
        hidden_act="gelu",
        rotary_dim=HEAD_DIM // 4,
        rope_theta=10000.0,
        rope_scaling=None,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        initializer_range=0.02,
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=2048,
        pad_token_id=None,
        hf_config_dict=hf_config,
    )
    model = build_stage(cfg, 0, LAYERS, True, True)
    init_stage_weights(model, cfg, seed=0)
    save_hf_directory(model.state_dict(), cfg, model_dir, "fp32")
    with open(os.path.join(model_dir, "cfg.pkl"), "wb") as f:
        pickle.dump(cfg, f)
    return os.path.getsize(os.path.join(model_dir, "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        directory, start, end, first, last = args.worker
        return _worker(directory, int(start), int(end), first == "1", last == "1")

    workdir = args.workdir or tempfile.mkdtemp(prefix="load_memory_")
    model_dir = os.path.join(workdir, "model")
    size = make_model(model_dir, args.size_mb)
    per = LAYERS // args.stages
    procs = []
    for p in range(args.stages):
        bounds = [
            model_dir,
            str(p * per),
            str(LAYERS if p == args.stages - 1 else (p + 1) * per),
            "1" if p == 0 else "0",
            "1" if p == args.stages - 1 else "0",
        ]
        procs.append(
            subprocess.Popen([sys.executable, __file__, "--worker", *bounds], stdout=subprocess.PIPE, text=True)
        )
    fractions, with_params = [], []
    for p, proc in enumerate(procs):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"load_memory: stage {p} worker failed")
        r = json.loads(out.strip().splitlines()[-1])
        fractions.append(round((r["peak_kb"] - r["baseline_kb"]) * 1024 / size, 3))
        with_params.append(round((r["peak_kb"] - r["imports_kb"]) * 1024 / size, 3))
        if not args.json:
            print(
                f"stage {p}: peak RSS over baseline (imports + empty stage) "
                f"{(r['peak_kb'] - r['baseline_kb']) / 1024:.1f} MiB = {fractions[-1]:.3f} of the "
                f"{size / 2**20:.1f} MiB checkpoint; over imports only (stage parameters included) "
                f"{with_params[-1]:.3f}"
            )
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint_bytes": size,
                    "stages": args.stages,
                    "fractions": fractions,
                    "fractions_with_params": with_params,
                }
            )
        )


if __name__ == "__main__":
    main()
