"""Smoke tests of the benchmark command (sam_kernels.bench) on tiny cases: it runs, checks results
before timing, and writes well-formed rows. The numbers mean nothing here; no timing is asserted."""
import json

import pytest

import sam_kernels
from sam_kernels.bench import steps
from sam_kernels.bench.__main__ import main
from sam_kernels.bench.cases import parse_size

TINY = ["--cases", "4096", "--min-rounds", "3", "--max-rounds", "3", "--copy-size", "4096", "--budget", "30"]
ROW_KEYS = {"suite", "op", "case", "tensors", "numel", "provider", "dtype", "device", "device_slug", "threads",
            "median_ms", "p20_ms", "p80_ms", "rounds", "vs", "ratio", "ratio_low", "ratio_high", "level", "target",
            "verdict", "floor_bytes", "floor_fraction", "copy_gbps", "load", "commit", "dirty", "versions",
            "timestamp", "lists", "skipped", "mismatch", "setup_s"}

needs_cpp = pytest.mark.skipif(not sam_kernels.backends()["cpp"]["available"],
                               reason=f"cpp backend unavailable: {sam_kernels.backends()['cpp']['reason']}")


def _rows(out_dir):
    (path,) = out_dir.glob("*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_cpp
def test_step_suite_smoke(tmp_path, capsys):
    argv = TINY + ["--providers", "cpp", "cpp-nocheck", "foreach", "loop", "pytorch-optimizer", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {r["provider"]: r for r in _rows(tmp_path)}
    assert set(rows) == {"cpp", "cpp-nocheck", "foreach", "loop", "pytorch-optimizer"}
    for p in ("cpp", "cpp-nocheck", "foreach", "loop"):
        r = rows[p]
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert (r["suite"], r["case"], r["numel"], r["vs"], r["rounds"]) == ("step", "4096", 4096, "cpp", 3)
        assert r["median_ms"] > 0 and r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
        assert r["floor_bytes"] == 9 * 4 * 4096  # op_specs: a SAM-SGD step through the optimizer moves 9 fp32 passes
        assert r["skipped"] is None and r["mismatch"] is None
    assert rows["cpp"]["ratio"] == 1.0 and rows["cpp"]["verdict"] is None
    assert rows["loop"]["target"] == 1.6 and rows["loop"]["verdict"] in ("met", "missed", "unresolved")
    assert rows["foreach"]["target"] is None and rows["foreach"]["verdict"] is None
    if rows["pytorch-optimizer"]["skipped"] is not None:
        assert "pip install pytorch-optimizer" in rows["pytorch-optimizer"]["skipped"]
    assert (tmp_path / f"{rows['cpp']['device_slug']}.png").exists()
    out = capsys.readouterr().out
    assert "Verdicts" in out and "Noise" in out and "per-parameter loop" in out


@needs_cpp
def test_op_suite_smoke(tmp_path):
    assert main(TINY + ["--ops", "grad_sq_norm", "--out", str(tmp_path)]) == 0
    rows = {r["provider"]: r for r in _rows(tmp_path)}
    assert set(rows) == {"loop", "eager", "cpp"}
    assert all(r["suite"] == "op" and r["op"] == "grad_sq_norm" and r["vs"] == "cpp" for r in rows.values())
    assert rows["eager"]["floor_bytes"] == 4 * 4096 and rows["eager"]["mismatch"] is None


@needs_cpp
def test_a_wrong_step_is_not_timed_and_fails_the_run(tmp_path, monkeypatch):
    """Correctness before speed: a step that does not give SAM's weights is reported, not timed."""
    def shifted(inputs):
        perturbed, after = EXPECTED(inputs)
        return perturbed, [a + 1e-2 for a in after]
    EXPECTED = steps.expected
    monkeypatch.setattr(steps, "expected", shifted)
    assert main(TINY + ["--providers", "cpp", "loop", "--out", str(tmp_path)]) == 1
    rows = {r["provider"]: r for r in _rows(tmp_path)}
    assert "after second_step" in rows["cpp"]["mismatch"] and "median_ms" not in rows["cpp"]


def test_check_catches_a_wrong_ascent():
    inputs = steps.make_inputs(parse_size("300"), __import__("torch").float32, __import__("torch").device("cpu"))
    step = steps.build("foreach", inputs)
    step.first = lambda f=step.first: (f(), step.params[0].mul_(1.001))
    assert "tensor 0 after first_step" in steps.check(step, steps.expected(inputs))
    assert steps.check(steps.build("loop", inputs), steps.expected(inputs)) is None


def test_model_cases_have_the_real_sizes():
    resnet, gpt2, blocks, small = (parse_size(n) for n in ("resnet50", "gpt2", "gpt2_blocks", "small"))
    assert (resnet.tensors, resnet.numel) == (161, 25_557_032)  # torchvision resnet50()
    assert (gpt2.tensors, gpt2.numel) == (148, 124_439_808)  # HF gpt2 (tied LM head)
    # a GPT-2 small block: 2 LayerNorms (4 x 768), c_attn 768x2304 + 2304, c_proj 768x768 + 768,
    # c_fc 768x3072 + 3072, mlp c_proj 3072x768 + 768 = 7,087,872 elements in 12 tensors
    assert (blocks.tensors, blocks.numel) == (144, 12 * 7_087_872)
    assert (small.tensors, small.numel) == (2000, 2000 * 64)
    assert parse_size("64k").shapes == ((65536,),)


def test_telemetry_bench_smoke(tmp_path):
    """The telemetry bench runs and reports the bytes each mode adds at the ops' floors: "norms"
    nothing, held g(w) one read of the gradients (+4N over 40N without the finite check), a copy of
    g(w) (in-place zeroing loops) one write more, inside perturb_'s pass (+8N)."""
    from sam_kernels.bench import telemetry_bench

    out = tmp_path / "telemetry.json"
    telemetry_bench.main(["--sizes", "4096", "--device", "cpu", "--rounds", "2", "--finite-check", "0",
                          "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["extra_bytes_pct"]["norms"] == 0.0
    assert row["extra_bytes_pct"]["on"] == pytest.approx(10.0)
    assert row["extra_bytes_pct"]["copy"] == pytest.approx(20.0)
    assert row["rounds"] == 2 and set(row["overhead_pct_interval"]) == {"norms", "on", "copy"}
    assert out.with_suffix(".md").exists()
