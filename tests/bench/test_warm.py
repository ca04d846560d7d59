"""torch.compile's first compile in a time-limited child process (sam_kernels/bench/warm.py)."""
import time

import torch

from sam_kernels.bench import warm
from sam_kernels.bench.cases import parse_size

CPU, F32 = torch.device("cpu"), torch.float32


def test_a_compile_out_of_time_is_stopped_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    case = parse_size("8")
    # 2 s: the child has not even imported torch by then; it and its process group are killed
    w = warm.Warming(case, F32, CPU)
    why = w.wait(time.perf_counter() + 2.0)
    assert why is not None and "did not finish in the 2 s left" in why
    assert w.child.poll() is not None  # ended, not left running
    assert not warm.marker(case, F32, CPU).exists()


def test_a_compiled_list_is_not_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    case = parse_size("8")
    done = warm.marker(case, F32, CPU)
    assert done.parent.parent == tmp_path
    done.parent.mkdir(parents=True)
    done.touch()
    w = warm.Warming(case, F32, CPU)
    assert w.child is None and w.wait(time.perf_counter()) is None
    # another list, dtype or torch version has its own marker
    assert warm.marker(parse_size("16"), F32, CPU) != done
    assert warm.marker(case, torch.float64, CPU) != done


def test_a_slow_compile_from_the_cache_is_skipped_when_time_is_short(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    case = parse_size("8")
    done = warm.marker(case, F32, CPU)
    done.parent.mkdir(parents=True)
    done.touch()
    warm.Warming(case, F32, CPU).record(42.0)
    w = warm.Warming(case, F32, CPU)
    assert w.reuse_s == 42.0
    why = w.wait(time.perf_counter() + 10.0)
    assert why is not None and "took 42 s" in why and "--budget" in why
    assert w.wait(time.perf_counter() + 60.0) is None
