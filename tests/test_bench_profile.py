"""bench/profile_step.py: how a Chrome trace of one GPU's steps becomes kernel time by kind, busy time and idle gaps
(a synthetic trace, no GPU), the figures bench/RESULTS.md's profile tables are read from."""

import json

from bench import profile_step as ps


def kernel(name, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


def cpu_op(name, ts, dur):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur}


def test_kernels_are_summed_by_kind_and_idle_gaps_name_what_the_host_did(tmp_path):
    events = [
        kernel("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 0, 1000),
        kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", 1000, 500),
        kernel("triton_red_fused_abs_max_0", 1500, 100),  # --fp8: an operand's absolute maximum
        kernel("triton_poi_fused__to_copy_clamp_mul_1", 1600, 200),  # --fp8: its scaled cast
        kernel("triton_poi_fused_gelu_view_3", 1800, 300),
        # 1.9 ms with no kernel while the host reads a number back
        kernel("adamw_one_pass", 4000, 400),
        kernel("adamw_one_pass", 4300, 200),  # overlaps the one before: busy time counts it once
        cpu_op("aten::_local_scalar_dense", 2100, 1800),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))

    summary = ps.summarize_trace(str(path))

    assert summary["by_kind_ms"] == {
        "matmul": 1.0,
        "attention": 0.5,
        "optimizer": 0.6,
        "other": 0.3,
        "float8 casts": 0.3,
    }
    assert summary["span_ms"] == 4.5
    assert summary["gpu_busy_ms"] == 2.6
    [gap] = summary["idle_gaps"]
    assert gap["ms"] == 1.9 and gap["host"] == [("aten::_local_scalar_dense", 1)]
    [sync] = summary["syncs"]
    assert sync["name"] == "aten::_local_scalar_dense" and sync["ms"] == 1.8
    assert summary["top_kernels"][0] == {
        "name": "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN",
        "ms": 1.0,
        "calls": 1,
        "kind": "matmul",
    }
    assert [k for k in summary["top_kernels"] if k["name"] == "adamw_one_pass"][0]["calls"] == 2
