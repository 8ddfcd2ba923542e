"""Checkpoints written by an earlier version still resume, bit-exactly (tests/fixtures/make_format_v1.py wrote them)."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, base_flags, run_torchrun

FIXTURE = os.path.join("tests", "fixtures", "format_v1")


@pytest.mark.e2e
def test_format_v1_checkpoint_resumes_bit_exact(tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(REPO, FIXTURE, "checkpoints"), ckpt)
    model, data = os.path.join(FIXTURE, "model"), os.path.join(FIXTURE, "data.jsonl")
    flags = base_flags(
        model,
        data,
        str(ckpt),
        **{
            "seq-length": 16,
            "batch-size": 2,
            "total-steps": 3,
            "pipeline-group-size": 2,
            "load-checkpoint": "true",
            "attention-mask": "causal",  # the attention of the version that wrote it
        },
    )
    result = run_torchrun(2, flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "(step 2;" in result.stdout
    for stage in (0, 1):
        got = load_file(str(ckpt / "checkpoint_3" / f"prank_{stage}_model.safetensors"))
        want = load_file(os.path.join(REPO, FIXTURE, f"expected_p{stage}.safetensors"))
        assert set(got) == set(want) and want
        for name, value in want.items():
            assert torch.equal(got[name], value), name
