"""Each newer family trains like transformers + AdamW in every kind of layout: three optimizer steps at pp 1, 2 and 4
and at pp2 x dp2 with the optimizer state sharded, on packed documents, with the family's features on (sliding
windows shorter than the training window, tied embeddings split over the pipeline's ends, q/k norms, soft-caps,
fused projections); the pp2 runs apply the head inside the loss (--chunked-loss on): under GPipe with four
micro-batches in flight (the head weight's gradient sums over all of them before it is handed on), and under 1F1B
with data parallelism. The four runs of a family are launched at once."""

import pytest
import torch

from checkpoint.training_state import join_pieces
from tests.helpers import base_flags, make_chat_data, make_model, read_checkpoint_weights, run_ranks, wait_ranks
from tests.test_layouts import LR, SEED, SEQ, STEPS, reference_weights

pytestmark = pytest.mark.e2e

WINDOW = 8  # < SEQ
FAMILIES = {  # make_tiny_model flags: the features each family is known by
    "qwen2": ("--sliding-window", str(WINDOW), "--num-kv-heads", "2"),
    "qwen3": ("--tie-word-embeddings", "--num-kv-heads", "2"),
    "mistral": ("--sliding-window", str(WINDOW), "--num-kv-heads", "1"),
    "gemma2": ("--sliding-window", str(WINDOW), "--tie-word-embeddings"),
    "gemma3": ("--sliding-window", str(WINDOW), "--tie-word-embeddings"),
    "phi3": (
        "--sliding-window",
        str(WINDOW),
    ),
}
# (pp, dp, pp-mode, extra flags)
LAYOUTS = [
    (1, 1, "gpipe", ()),
    (2, 1, "gpipe", ("--chunked-loss", "on", "--micro-batch-size", "1")),
    (4, 1, "gpipe", ()),
    (2, 2, "1f1b", ("--dp-mode", "sharded", "--dp-bucket-mb", "0.002", "--chunked-loss", "on")),
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_like_transformers_in_every_layout(family, tmp_path):
    model_dir = make_model(tmp_path / family, model_type=family, hidden=32, layers=4, heads=4, extra=FAMILIES[family])
    data = make_chat_data(tmp_path / "chat.jsonl")
    expected = reference_weights(model_dir, data)
    tied = "lm_head.weight" not in expected or torch.equal(
        expected["lm_head.weight"], expected["model.embed_tokens.weight"]
    )
    runs = {}
    for pp, dp, mode, extra in LAYOUTS:
        ckpt = tmp_path / f"ckpt-pp{pp}-dp{dp}"
        flags = base_flags(
            model_dir,
            data,
            str(ckpt),
            **{
                "pipeline-group-size": pp,
                "data-group-size": dp,
                "pp-mode": mode,
                "batch-size": 4 // dp,
                "total-steps": STEPS,
                "seq-length": SEQ,
                "lr": LR,
                "seed": SEED,
            },
        )
        runs[(pp, dp)] = (ckpt, run_ranks(pp * dp, [*flags, *extra]))
    for (pp, dp), (ckpt, procs) in runs.items():
        results = wait_ranks(procs, 400)
        assert all(rc == 0 for rc, _, _ in results), [out[-2000:] + err[-2000:] for _, out, err in results]
        got = read_checkpoint_weights(str(ckpt), suffix=("_model.safetensors", "_optimizer.safetensors"))
        got = join_pieces(got, {k: v.shape for k, v in got.items() if "/" not in k}, str(ckpt))
        want = dict(expected)
        if tied and pp > 1:  # a separate last stage holds a copy of the tied matrix, with its own moments
            for suffix in ("", "/exp_avg", "/exp_avg_sq"):
                want["lm_head.weight" + suffix] = expected["model.embed_tokens.weight" + suffix]
        assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
        for name, value in want.items():
            where = f"pp{pp} dp{dp} {name}"
            torch.testing.assert_close(
                got[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, where=where: f"{where}: {m}"
            )
