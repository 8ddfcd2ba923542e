"""--context-parallel-size: every sequence split over the ranks of a cp group trains like one process (transformers
+ AdamW, three steps, packed documents with several per window), at cp2, pp2 x cp2 and cp2 x dp2 with the optimizer
state sharded over all four; sliding windows shorter than the window and Gemma 2's soft-caps stay exact; a checkpoint
written at cp2 resumes at cp1; bad settings are refused in one line."""

import pytest
import torch

from checkpoint.training_state import join_pieces
from context_parallel import ContextSplit
from tests.helpers import (
    base_flags,
    make_chat_data,
    make_model,
    read_checkpoint_weights,
    read_metrics,
    run_job,
    run_ranks,
    wait_ranks,
)
from tests.test_layouts import LR, SEED, SEQ, STEPS, reference_weights


def test_each_rank_holds_an_early_and_a_late_chunk_and_together_every_token_once():
    split = ContextSplit(size=2, rank=1, group=None)
    assert split.local_index(16).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert ContextSplit(2, 0, None).local_index(16).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert sorted(ContextSplit(4, 0, None).key_index(32).tolist()) == list(range(32))
    batch = torch.arange(32).view(2, 16)
    assert split.split(batch).tolist() == [list(range(4, 12)), list(range(20, 28))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("window", [None, 6])
def test_each_ranks_queries_against_the_gathered_keys_equal_whole_sequence_attention(device, window):
    """One process plays both ranks of a cp2 group: each rank's queries against the keys in gathered order, under
    its context mask (boolean for SDPA on CPU, a FlexAttention block mask on GPUs), equal attention over the whole
    sequence at that rank's positions; packed documents and a sliding window included."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from types import SimpleNamespace

    from context_parallel import context_masks
    from modules.layers import causal_attention

    seq, heads, dim = 256, 2, 16  # FlexAttention's blocks are 128 tokens: two chunks of 64 per rank
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, seq, dim, generator=gen).to(device) for _ in range(3))
    doc_ids = torch.cumsum(torch.rand(2, seq, generator=gen) < 0.02, dim=1).to(device)
    kinds = ["full", "sliding"] if window else ["full"]
    cfg = SimpleNamespace(sliding_window=window or seq, layer_types=kinds)
    positions = torch.arange(seq, device=device)
    visible = (positions[None, :] <= positions[:, None]) & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if window:
        visible &= positions[:, None] - positions[None, :] < window
    whole = causal_attention(q.cpu(), k.cpu(), v.cpu(), visible[:, None].cpu()).to(device)
    for rank in range(2):
        split = ContextSplit(2, rank, None)
        mine, keys = split.local_index(seq, device), split.key_index(seq, device)
        mask = context_masks(cfg, split, seq, doc_ids, torch.device(device))[kinds[-1]].mask
        got = causal_attention(q[:, :, mine], k[:, :, keys], v[:, :, keys], mask)
        torch.testing.assert_close(got, whole[:, mine], rtol=1e-4, atol=1e-5)


def layouts_of(family):
    """(label, world, flags); every family at cp2, the two the issue names in the composed layouts too."""
    out = [("cp2", 2, ["--context-parallel-size", "2"])]
    if family in ("gptneox", "llama"):
        out.append(("pp2xcp2", 4, ["--context-parallel-size", "2", "--pipeline-group-size", "2", "--pp-mode", "1f1b"]))
        sharded = ["--dp-mode", "sharded", "--dp-bucket-mb", "0.002"]
        out.append(("cp2xdp2", 4, ["--context-parallel-size", "2", "--data-group-size", "2", *sharded]))
    return out


FAMILIES = {  # make_tiny_model flags
    "gptneox": (),
    "llama": ("--num-kv-heads", "2", "--tie-word-embeddings"),
    "mistral": ("--sliding-window", "8", "--num-kv-heads", "1"),  # a window shorter than SEQ
    "gemma2": ("--sliding-window", "8", "--tie-word-embeddings"),  # soft-capped attention and logits
}


def expected_weights(model_dir, data, tied_split: bool):
    expected = reference_weights(model_dir, data)
    tied = "model.embed_tokens.weight/exp_avg" in expected and "lm_head.weight/exp_avg" not in expected
    if tied_split and tied:  # one matrix in transformers; a separate last stage holds a copy, with its own moments
        for suffix in ("", "/exp_avg", "/exp_avg_sq"):
            expected["lm_head.weight" + suffix] = expected["model.embed_tokens.weight" + suffix]
    return expected


def assert_trained_like(ckpt, expected, where):
    got = read_checkpoint_weights(str(ckpt), suffix=("_model.safetensors", "_optimizer.safetensors"))
    got = join_pieces(got, {k: v.shape for k, v in got.items() if "/" not in k}, str(ckpt))
    assert set(expected) <= set(got), (where, sorted(set(expected) - set(got))[:5])
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, n=name: f"{where} {n}: {m}")


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_sequences_train_like_one_process(family, tmp_path):
    model_dir = make_model(tmp_path / family, model_type=family, hidden=32, layers=4, heads=4, extra=FAMILIES[family])
    data = make_chat_data(tmp_path / "chat.jsonl")
    runs = {}
    for label, world, extra in layouts_of(family):
        ckpt = tmp_path / label
        dp = 2 if "--data-group-size" in extra else 1
        flags = base_flags(
            model_dir,
            data,
            str(ckpt),
            **{"batch-size": 4 // dp, "total-steps": STEPS, "seq-length": SEQ, "lr": LR, "seed": SEED},
        )
        runs[label] = (ckpt, "--pipeline-group-size" in extra, run_ranks(world, [*flags, *extra]))
    plain = tied = None
    for label, (ckpt, split_pipeline, procs) in runs.items():
        results = wait_ranks(procs, 400)
        assert all(rc == 0 for rc, _, _ in results), [out[-2000:] + err[-2000:] for _, out, err in results]
        if split_pipeline:
            tied = tied or expected_weights(model_dir, data, True)
        else:
            plain = plain or expected_weights(model_dir, data, False)
        assert_trained_like(ckpt, tied if split_pipeline else plain, f"{family} {label}")


@pytest.mark.e2e
def test_a_checkpoint_written_at_cp2_resumes_at_cp1(tmp_path):
    model_dir = make_model(tmp_path / "llama", model_type="llama", hidden=32, layers=4, heads=4)
    data = make_chat_data(tmp_path / "chat.jsonl")
    ckpt = tmp_path / "ckpt"
    flags = base_flags(
        model_dir,
        data,
        str(ckpt),
        **{"batch-size": 4, "total-steps": STEPS, "seq-length": SEQ, "lr": LR, "seed": SEED, "checkpoint-steps": 2},
    )
    # the run dies as it starts saving step 3: step 2's checkpoint is the latest
    first = run_job(2, [*flags, "--context-parallel-size", "2"], env={"CKPT_FAULT_AFTER_FILES": "0:3"})
    assert first.returncode != 0 and "simulated crash" in first.stderr, first.stdout[-2000:] + first.stderr[-2000:]
    second = run_job(1, [*flags, "--load-checkpoint", "true"])
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr
    assert_trained_like(ckpt, reference_weights(model_dir, data), "cp2 -> cp1")


@pytest.mark.e2e
def test_evaluation_scores_the_whole_sequences_at_cp2(tmp_path):
    """valid.loss and the logged training loss at cp2 equal one process's: each cp rank's share is summed once."""
    model_dir = make_model(tmp_path / "m", model_type="llama", hidden=32, layers=2, heads=4)
    data = make_chat_data(tmp_path / "chat.jsonl")
    held_out = make_chat_data(tmp_path / "eval.jsonl", n=12, seed=1)
    scores = {}
    for cp in (1, 2):
        ckpt = tmp_path / f"cp{cp}"
        flags = base_flags(
            model_dir, data, str(ckpt), **{"evaluation-data": held_out, "evaluation-steps": 1, "total-steps": 2}
        )
        done = run_job(cp, [*flags, "--context-parallel-size", str(cp)])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        scores[cp] = read_metrics(str(ckpt / "metrics.jsonl"), "valid.loss"), read_metrics(str(ckpt / "metrics.jsonl"))
    (valid1, loss1), (valid2, loss2) = scores[1], scores[2]
    assert len(valid1) == 2 and valid2.keys() == valid1.keys() and loss2.keys() == loss1.keys()
    for step in valid1:
        assert valid2[step] == pytest.approx(valid1[step], rel=1e-5)
        assert loss2[step] == pytest.approx(loss1[step], rel=1e-5)


@pytest.mark.parametrize("extra,fragment", [(["--seq-length", "30"], "--seq-length 30 must be a multiple of 4")])
def test_settings_that_cannot_split_are_refused_in_one_line(tmp_path, extra, fragment):
    model_dir = make_model(tmp_path / "m", hidden=32, layers=2, heads=4)
    data = make_chat_data(tmp_path / "chat.jsonl")
    flags = base_flags(model_dir, data, str(tmp_path / "ck"), **{"total-steps": 1})
    done = run_job(2, [*flags, "--context-parallel-size", "2", *extra])
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert fragment in done.stderr and "Traceback" not in done.stderr


@pytest.mark.e2e
def test_dpo_at_cp2_logs_one_processs_training_and_held_out_scores(tmp_path):
    """DPO with its stored reference at cp2: the pairs' losses, statistics and held-out scores equal one process's
    (each sequence's log-probability summed over the cp group before the loss; the stored reference written once)."""
    from tests.test_preference_training import make_pairs

    model_dir = make_model(tmp_path / "m", model_type="llama", hidden=32, layers=2, heads=4)
    pairs = make_pairs(tmp_path / "pairs.jsonl")
    held_out = make_pairs(tmp_path / "held_out.jsonl", n=8, seed=1)
    keys = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "valid.loss", "valid.rewards/margins")
    logged = {}
    for cp in (1, 2):
        ckpt = tmp_path / f"cp{cp}"
        settings = {"objective": "dpo", "seq-length": 24, "total-steps": 2}
        flags = base_flags(
            model_dir, pairs, str(ckpt), **settings, **{"evaluation-data": held_out, "evaluation-steps": 1}
        )
        done = run_job(cp, [*flags, "--context-parallel-size", str(cp)])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        logged[cp] = {key: read_metrics(str(ckpt / "metrics.jsonl"), key) for key in keys}
        assert (ckpt / "reference" / "dp_0.safetensors").exists()
    for key in keys:
        assert len(logged[1][key]) == 2 and logged[2][key].keys() == logged[1][key].keys(), key
        for step, want in logged[1][key].items():
            assert logged[2][key][step] == pytest.approx(want, rel=1e-5, abs=1e-6), (key, step)
