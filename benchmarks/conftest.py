"""pytest-benchmark entries for sam_kernels' ops: ``python -m pytest benchmarks`` (not part of ``pytest tests``).

Files here are named ``bench_*.py`` so the test command never collects them; the hook below
collects them when pytest is pointed at this folder. Options:
  --bench-sizes 1M resnet50   cases (sam_kernels.bench.cases names or element counts; default 1M)
  --bench-dtype bfloat16      parameter dtype (default float32)
  --bench-compile             include the torch.compile baseline (slow to compile on CPU)
For the full side-by-side report (GB/s, copy bandwidth, targets) use ``python -m sam_kernels.bench``.
"""
import pytest
import torch

from sam_kernels.bench.cases import parse_size


def pytest_addoption(parser):
    group = parser.getgroup("sam_kernels benchmarks")
    group.addoption("--bench-sizes", nargs="+", default=["1M"], help="cases to benchmark (default: 1M)")
    group.addoption("--bench-dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    group.addoption("--bench-compile", action="store_true", help="also benchmark torch.compile of the reference")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself, whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        sizes = metafunc.config.getoption("--bench-sizes")
        metafunc.parametrize("case", [parse_size(s) for s in sizes], ids=sizes)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def dtype(request):
    return getattr(torch, request.config.getoption("--bench-dtype"))


@pytest.fixture(scope="session")
def with_compile(request):
    return request.config.getoption("--bench-compile")
