"""Smoke test of the benchmark CLI (sam_kernels.bench): runs in-process at the smallest size.

Only checks that a run completes and writes well-formed results; the numbers mean nothing here.
"""
import json

import pytest

from sam_kernels.bench.__main__ import main

TINY = ["--sizes", "4096", "--repeats", "1", "--warmup", "0", "--copy-size", "4096", "--no-progress"]


def _result(out_dir):
    files = list(out_dir.glob("*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").exists()
    return json.loads(files[0].read_text())


def test_ops_smoke(tmp_path):
    assert main(["--ops", "grad_sq_norm", "--backends", "eager", "--no-step", "--out", str(tmp_path)] + TINY) == 0
    res = _result(tmp_path)
    meta = res["meta"]
    for key in ("device", "device_slug", "torch", "triton", "git_commit", "cpu_cores", "backends", "dtype"):
        assert key in meta
    copy = res["copy_bandwidth"]
    assert copy["before"]["gbps"] > 0 and copy["after"]["gbps"] > 0
    assert copy["gbps"] == max(copy["before"]["gbps"], copy["after"]["gbps"])
    (row,) = res["ops"]
    assert (row["op"], row["impl"], row["numel"], row["correct"]) == ("grad_sq_norm", "eager", 4096, True)
    assert row["median_ms"] > 0 and row["p20_ms"] > 0 and row["gbps"] > 0 and row["frac_copy_bw"] > 0
    assert row["floor_bytes"] == 4 * 4096
    assert row["speedup"] == {"eager": pytest.approx(1.0)}
    assert row["backends_ran"] == ["eager"]
    assert (tmp_path / f"{meta['device_slug']}.png").exists()
    # every row is judged for noise and the run gets a verdict (numbers at this size are noise anyway)
    assert isinstance(row["noise"], list) and "others_cores" in (row["cpu"] or {"others_cores": None})
    assert res["verdict"]["results"] == 1 and res["verdict"]["trustworthy"] == (row["noise"] == [])
    md = (tmp_path / f"{meta['device_slug']}.md").read_text()
    assert "What the columns mean" in md and "## Verdict" in md


def test_train_step_smoke(tmp_path):
    argv = ["--steps-only", "--models", "transformer", "--methods", "sgd", "sam-fused", "--train-batch", "2",
            "--train-repeats", "1", "--out", str(tmp_path)]
    assert main(argv + TINY) == 0
    train = _result(tmp_path)["train"]
    assert [r["method"] for r in train["rows"]] == ["SGD", "SAM fused (auto)"]
    for r in train["rows"]:
        assert r["step"]["mean_ms"] > 0 and r["ratio_to_sgd"] > 0
    for s in train["skips"]:
        assert s["reason"]


def test_model_cases_have_the_real_sizes():
    from sam_kernels.bench.cases import parse_size
    resnet, gpt2 = parse_size("resnet50"), parse_size("gpt2")
    assert (resnet.tensors, resnet.numel) == (161, 25_557_032)  # torchvision resnet50()
    assert (gpt2.tensors, gpt2.numel) == (148, 124_439_808)  # HF gpt2 (tied LM head)
    assert parse_size("64k").shapes == ((65536,),)


def test_adamw_step_rows_are_checked_against_the_reference(tmp_path):
    import sam_kernels
    if not sam_kernels.backends()["cpp"]["available"]:
        pytest.skip(f"cpp backend unavailable: {sam_kernels.backends()['cpp']['reason']}")
    argv = ["--ops", "sam_adamw_step", "--backends", "loop", "eager", "cpp", "--no-step", "--out", str(tmp_path)]
    assert main(argv + TINY) == 0
    rows = {r["impl"]: r for r in _result(tmp_path)["ops"]}
    assert set(rows) == {"loop", "eager", "cpp"}
    assert all(r["correct"] for r in rows.values()), {k: r.get("max_err") for k, r in rows.items()}
    assert rows["cpp"]["floor_bytes"] == 12 * 4 * 4096


def test_host_case_is_resnet50_tensor_count():
    from sam_kernels.bench.cases import parse_size
    host = parse_size("host")
    assert (host.tensors, host.numel) == (161, 161 * 16)


def test_telemetry_bench_smoke(tmp_path):
    """The telemetry bench runs and reports the bytes each mode adds at the ops' floors: "norms"
    nothing, held g(w) one read of the gradients (+4N over 40N without the finite check), a copy of
    g(w) (in-place zeroing loops) one write more, inside perturb_'s pass (+8N)."""
    from sam_kernels.bench import telemetry_bench

    out = tmp_path / "telemetry.json"
    telemetry_bench.main(["--sizes", "4096", "--device", "cpu", "--rounds", "1", "--repeats", "1",
                          "--finite-check", "0", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["extra_bytes_pct"]["norms"] == 0.0
    assert row["extra_bytes_pct"]["on"] == pytest.approx(10.0)
    assert row["extra_bytes_pct"]["copy"] == pytest.approx(20.0)
    assert out.with_suffix(".md").exists()
