"""The fidelity table of benchmarks/train_digits.py is computed from its rows as documented: gains
paired by seed against SGD, the share of SAM's gain kept and of SAM's passes (hand-computed rows)."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits():
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "benchmarks" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows():
    common = {"setting": {"noise": 0.4, "train_size": 1257, "width": 128, "layer_norm": True, "epochs": 60,
                          "batch": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "rho": 0.3},
              "commit": "abc", "machine": "m", "date": "d", "skipped": [["Y", "why"]]}

    def row(method, seed, acc, passes):
        return {"method": method, "family": "variants", "seed": seed, "acc": acc, "fwd_per_step": passes,
                "bwd_per_step": passes, "wall_s": 1.0, "method_settings": "", **common}

    # SAM's gains over SGD: 20 and 22 (mean 21); X's: 10 and 11.5 (mean 10.75), in the other seed order
    return [row("SGD", 0, 70.0, 1.0), row("SGD", 1, 72.0, 1.0), row("SAM", 0, 90.0, 2.0), row("SAM", 1, 94.0, 2.0),
            row("X", 1, 83.5, 1.5), row("X", 0, 80.0, 1.5)]


def test_gains_are_paired_by_seed(digits):
    s = digits.summarize(_rows())
    assert s["SAM"]["gain"] == 21.0 and s["SAM"]["gain_std"] == pytest.approx(math.sqrt(2))
    assert s["X"]["gain"] == 10.75 and s["X"]["gain_std"] == pytest.approx(math.sqrt(1.125))
    assert s["X"]["acc"] == 81.75 and s["X"]["std"] == pytest.approx(math.sqrt(6.125))


def test_table_shows_the_share_of_sams_gain_and_passes(digits):
    lines = digits.table(_rows()).splitlines()
    x = next(line for line in lines if line.startswith("| X |")).split(" | ")
    assert x[2] == "+10.75 ± 1.06" and x[3] == "1.50 / 1.50"
    assert x[4] == "51%" and x[5] == "75%"  # 10.75 / 21 and (1.5 + 1.5) / (2 + 2)
    sgd = next(line for line in lines if line.startswith("| SGD |")).split(" | ")
    assert sgd[2] == "–" and sgd[4] == "–" and sgd[5] == "50%"
    assert "- Y: why" in lines


def test_one_seed_has_no_spread(digits):
    lines = digits.table([r for r in _rows() if r["seed"] == 0]).splitlines()
    x = next(line for line in lines if line.startswith("| X |")).split(" | ")
    assert x[1] == "80.00 ± 0.00" and x[2] == "+10.00" and x[4] == "50%"  # 10 / 20


def test_merge_replaces_only_the_methods_run_again(digits, tmp_path):
    import json
    rows_file = tmp_path / "rows.jsonl"
    old = _rows()
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in old))
    fresh = [dict(r, acc=r["acc"] + 1.0, commit="def") for r in old if r["method"] == "SAM"]
    merged = digits.merge_rows(rows_file, fresh, ["SGD", "SAM", "X"])
    assert [(r["method"], r["seed"]) for r in merged] == [("SGD", 0), ("SGD", 1), ("SAM", 0), ("SAM", 1),
                                                         ("X", 1), ("X", 0)]
    assert [r["acc"] for r in merged if r["method"] == "SAM"] == [91.0, 95.0]
    assert [r["acc"] for r in merged if r["method"] != "SAM"] == [70.0, 72.0, 83.5, 80.0]
    assert "commit `abc`, d, commit `def`, d" in digits.table(merged)


def test_merge_refuses_another_setting_or_other_seeds(digits, tmp_path):
    import json
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    other = [dict(r, setting=dict(r["setting"], noise=0.2)) for r in _rows() if r["method"] == "SAM"]
    with pytest.raises(ValueError, match="another setting"):
        digits.merge_rows(rows_file, other, ["SGD", "SAM", "X"])
    with pytest.raises(ValueError, match="seeds"):
        digits.merge_rows(rows_file, [r for r in _rows() if r["method"] == "SAM" and r["seed"] == 0], ["SAM"])


@pytest.fixture(scope="module")
def diagnose(digits):
    spec = importlib.util.spec_from_file_location("diagnose_digits", ROOT / "benchmarks" / "diagnose_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dead_units_are_the_units_silent_on_every_image(diagnose):
    import torch
    from torch import nn
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.0, -1.0, 0.0, 2.0]))  # units 1 and 2 never fire
        model[2].weight.fill_(1.0)
        model[2].bias.copy_(torch.tensor([0.0, -10.0]))  # hidden sum is 3: unit 1 of layer 2 never fires
    assert diagnose.dead_units(model, torch.randn(5, 3)) == [0.5, 0.5]


def test_esam_trace_counts_the_flipped_labels_its_selection_keeps(diagnose, digits):
    from dataclasses import replace
    rows = diagnose.trace("ESAM", 0, replace(digits.SETTING, epochs=1), {"gamma": 0.5})
    (row,) = rows
    assert row["epoch"] == 1 and 0.0 <= row["selected_flipped_share"] <= 1.0
    assert row["batch_flipped_share"] == pytest.approx(0.4, abs=0.03)  # the setting's 40 % noise
    assert len(row["dead_units"]) == 2 and row["kept_to_batch_grad_norm"] > 0
