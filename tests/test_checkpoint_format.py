"""Checkpoints written by an earlier version still resume, bit-exactly (tests/fixtures/make_format_v1.py wrote them)."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, base_flags, run_job

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
    result = run_job(2, flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "(step 2;" in result.stdout
    for stage in (0, 1):
        got = load_file(str(ckpt / "checkpoint_3" / f"prank_{stage}_model.safetensors"))
        want = load_file(os.path.join(REPO, FIXTURE, f"expected_p{stage}.safetensors"))
        assert set(got) == set(want) and want
        for name, value in want.items():
            assert torch.equal(got[name], value), name


def test_base_fingerprint_sees_a_change_in_the_middle_of_a_large_file(tmp_path):
    """The fingerprint that ties LoRA checkpoints to their base samples large files: a tensor rewritten in the
    middle of a 72 MiB file changes it, and so does any byte of a small file."""
    from checkpoint.training_state import base_fingerprint

    def fingerprint_of(folder, data):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(data)
        return base_fingerprint(str(folder))

    big = bytearray(72 << 20)
    first = fingerprint_of(tmp_path / "a", bytes(big))
    big[(36 << 20) + 1000 : (36 << 20) + (3 << 20)] = b"\x01" * ((3 << 20) - 1000)  # a 3 MiB tensor mid-file
    assert fingerprint_of(tmp_path / "b", bytes(big)) != first
    assert fingerprint_of(tmp_path / "c", bytes(72 << 20)) == first
    small = bytearray(1 << 20)
    small_first = fingerprint_of(tmp_path / "d", bytes(small))
    small[512 << 10] = 1
    assert fingerprint_of(tmp_path / "e", bytes(small)) != small_first
