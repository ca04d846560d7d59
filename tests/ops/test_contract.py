"""The op table (sam_kernels.ops.contract) against what the rest of the package declares."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import sam_kernels.ops as ops
from sam_kernels.ops import contract, dispatch
from tests.utils import require_backend

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "sam_kernels.cpp"


def _cpp_schemas() -> list[str]:
    """The schemas of TORCH_LIBRARY(sam_kernels): each m.def's adjacent string literals joined."""
    text = CSRC.read_text()
    return ["".join(re.findall(r'"([^"]*)"', call)) for call in re.findall(r'm\.def\(((?:\s*"[^"]*")+)\s*\)', text)]


def _cpp_version_bumped() -> set[str]:
    """The ops csrc/sam_kernels.cpp bumps version counters for (its ADInplaceOrView loop)."""
    block = re.search(r"for \(const char\* op : \{([^}]*)\}", CSRC.read_text()).group(1)
    return set(re.findall(r'"([^"]+)"', block))


def test_csrc_schemas_are_the_table():
    assert _cpp_schemas() == [op.schema for op in contract.OPS.values()]


def test_csrc_bumps_versions_of_every_writing_op():
    assert _cpp_version_bumped() == {op.name for op in contract.OPS.values() if op.writes}


def test_registered_schemas_are_the_table():
    require_backend("cpp", "cpu")
    for op in contract.OPS.values():
        assert str(getattr(torch.ops.sam_kernels, op.name).default._schema) == "sam_kernels::" + op.schema


@pytest.mark.parametrize("name", list(contract.OPS))
def test_reference_takes_the_schema_arguments(name):
    op = contract.OPS[name]
    assert op.reference.__name__ == name
    assert tuple(inspect.signature(op.reference).parameters) == op.arguments


def test_writes_and_kinds_by_hand():
    written = {name: op.writes for name, op in contract.OPS.items() if op.writes}
    assert written == {
        "perturb_": ("params", "backups", "perturbation_sq", "grad_copies"),
        "restore_": ("params",),
        "sgd_restore_step_": ("params", "momentum_buffers", "sums", "momentum_out", "nonfinite"),
        "adamw_restore_step_": ("params", "exp_avgs", "exp_avg_sqs", "sums"),
        "renormalize_": ("grads",), "fisher_accumulate_": ("fisher",), "looksam_store_": ("g_v",),
        "looksam_apply_": ("grads",), "mix_": ("grads",), "ema_update_": ("emas", "directions"),
        "bsam_noise_": ("params", "backups"), "bsam_ascent_": ("params", "s_next"),
        "bsam_descent_": ("params", "exp_avgs", "s_next"), "centralize_": ("grads",),
    }
    kinds = {name: op.kind for name, op in contract.OPS.items()}
    assert [n for n, k in kinds.items() if k == "reduction"] == ["grad_sq_norm", "dot"]
    assert [n for n, k in kinds.items() if k == "mask"] == ["topk_mask", "nm_mask"]


def test_fp32_floors_are_the_design_figures():
    """DESIGN §7: grad norm 4N bytes, perturb 16N, restore + SGD step 20N (fp32, N elements)."""
    fp32 = {name: op.floor_units * 4 + op.bytes_per_element[1] for name, op in contract.OPS.items()}
    assert (fp32["grad_sq_norm"], fp32["perturb_"], fp32["sgd_restore_step_"]) == (4, 16, 20)
    assert fp32["grad_sq_norm"] + fp32["perturb_"] + fp32["sgd_restore_step_"] == 40  # one SAM step
    assert fp32["topk_mask"] == 4 + 1  # read the scores, write one bool per element


def test_bsam_floors_by_hand():
    """bSAM's three passes, fp32: noise reads w, s, z and writes the backup and w (20N); the ascent reads
    the backup, g, s and writes w, s_next (20N); the descent reads the backup, g, m, s and writes w, m
    (24N, the restore included): 64N bytes a step."""
    fp32 = {name: op.floor_units * 4 + op.bytes_per_element[1] for name, op in contract.OPS.items()}
    assert (fp32["bsam_noise_"], fp32["bsam_ascent_"], fp32["bsam_descent_"]) == (20, 20, 24)


def test_public_ops_are_the_table():
    assert [n for n in ops.__all__ if n in contract.OPS] == list(contract.OPS)
    for name in contract.OPS:
        assert getattr(ops, name).__name__ == name


@pytest.mark.parametrize("backend,device", [("eager", "cpu"), ("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda")])
def test_each_backend_serves_its_table_ops(backend, device):
    if backend != "eager":
        require_backend(backend, device)
    assert dispatch.backends()[backend]["ops"] == sorted(op.name for op in contract.ops_of(backend))


def test_a_bad_entry_is_rejected():
    with pytest.raises(ValueError, match="schema names"):
        contract.OpInfo("dot", "other(Tensor[] a) -> Tensor", "reduction", "", contract.reference.dot, (1, 0), "")
    with pytest.raises(ValueError, match="kind"):
        contract.OpInfo("dot", "dot(Tensor[] a, Tensor[] b) -> Tensor", "scan", "", contract.reference.dot, (1, 0), "")


def test_every_op_has_samples():
    from tests.ops.opinfo import SAMPLES
    assert list(SAMPLES) == list(contract.OPS)
    for name, samples in SAMPLES.items():
        assert samples and all(s.op == name for s in samples), name
        assert len({s.id for s in samples}) == len(samples), f"{name}: two samples share an id"
