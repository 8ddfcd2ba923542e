"""Checkpoints written by earlier versions still resume, bit-exactly (tests/fixtures/make_format_v*.py wrote them):
format_v1, the first format (pp=2); format_v2, the flat `flags` metadata of 2026-11-29 with the optimizer state
sharded over two data-parallel ranks and packed documents masked."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, base_flags, run_job

FIXTURES = os.path.join("tests", "fixtures")
V1 = os.path.join(FIXTURES, "format_v1")  # its model and data serve both fixtures
# Each fixture's run (make_format_v*.py) in today's flags: (ranks, flags)
RUNS = {
    # the attention of the version that wrote it: the whole window
    "format_v1": (2, {"pipeline-group-size": 2, "attention-mask": "causal"}),
    "format_v2": (2, {"data-group-size": 2, "dp-mode": "sharded", "dp-bucket-mb": 0.002}),
}


def fixture_flags(fixture, ckpt, **overrides):
    settings = {"seq-length": 16, "batch-size": 2, "total-steps": 3, **RUNS[fixture][1]}
    model, data = os.path.join(V1, "model"), os.path.join(V1, "data.jsonl")
    return base_flags(model, data, str(ckpt), **{**settings, **overrides})


def transplant(folder, source):
    """Put the tensors of checkpoint folder `source` (model weights, optimizer moments and steps) into the files of
    the same name in `folder`, a checkpoint of today's format, by name, and re-hash them in its meta.json. Plain
    safetensors reads: none of the resume code. Every tensor must have its counterpart of the same shape and dtype."""
    meta_path = os.path.join(folder, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    names = sorted(n for n in os.listdir(source) if n.startswith("prank_") and n.endswith(".safetensors"))
    assert names == sorted(n for n in meta["tensors"] if n.startswith("prank_")), (names, sorted(meta["tensors"]))
    for name in names:
        theirs, ours = load_file(os.path.join(source, name)), load_file(os.path.join(folder, name))
        assert set(theirs) == set(ours), (name, set(theirs) ^ set(ours))
        for key, value in theirs.items():
            assert (value.shape, value.dtype) == (ours[key].shape, ours[key].dtype), key
        path = os.path.join(folder, name)
        save_file(theirs, path)
        with open(path, "rb") as f:
            meta["files"][name] = hashlib.sha256(f.read()).hexdigest()
        meta["sizes"][name] = os.path.getsize(path)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


@pytest.mark.e2e
@pytest.mark.parametrize("fixture", list(RUNS))
def test_old_checkpoint_resumes_bit_exact(tmp_path, fixture):
    """The fixture's step-2 checkpoint resumes and trains step 3 exactly as the same state does in today's format,
    both computed here (floating-point results depend on the machine's CPU kernels, so no stored step-3 weights).
    Today's checkpoint of that state: a run of 2 steps writes the format, its LR schedule step and data position
    those of step 2 on any machine (a resumed run shapes the schedule by its own --total-steps), then the fixture's
    weights and optimizer state replace its own. Wrong weights, optimizer moments or steps, LR schedule step or data
    position read from the old files change step 3."""
    ranks = RUNS[fixture][0]
    step2 = os.path.join(REPO, FIXTURES, fixture, "checkpoints", "checkpoint_2")
    old = tmp_path / "old"
    shutil.copytree(os.path.dirname(step2), old)
    result = run_job(ranks, fixture_flags(fixture, old, **{"load-checkpoint": "true"}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "(step 2;" in result.stdout

    ref = tmp_path / "today"
    result = run_job(ranks, fixture_flags(fixture, ref, **{"total-steps": 2}))
    assert result.returncode == 0, result.stdout + result.stderr
    transplant(str(ref / "checkpoint_2"), step2)
    result = run_job(ranks, fixture_flags(fixture, ref, **{"load-checkpoint": "true"}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "(step 2;" in result.stdout

    names = sorted(n for n in os.listdir(step2) if n.startswith("prank_") and n.endswith(".safetensors"))
    for name in names:
        got, want = load_file(str(old / "checkpoint_3" / name)), load_file(str(ref / "checkpoint_3" / name))
        assert set(got) == set(want) and want, name
        for key, value in want.items():
            assert torch.equal(got[key], value), (name, key)
        if name.endswith("_model.safetensors"):  # step 3 moved every weight: not two copies of step 2 compared
            before = load_file(os.path.join(step2, name))
            assert all(not torch.equal(before[key], value) for key, value in want.items()), name
    for name in sorted(n for n in os.listdir(step2) if n.endswith(".json") and n != "meta.json"):
        with open(old / "checkpoint_3" / name) as f, open(ref / "checkpoint_3" / name) as g:
            assert json.load(f) == json.load(g), name


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
