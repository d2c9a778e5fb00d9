"""benchmarks/paper_tables.py: the paper's parameter counts that DESIGN.md §2 lists, counted by vpetl
on random-weight backbones (meta device, no forward), and the match / mismatch logic."""

from __future__ import annotations

import importlib.util
import sys
from fractions import Fraction
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_tables.py"


@pytest.fixture(scope="module")
def pt():
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_tables"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("paper_tables", None)


@pytest.mark.parametrize(
    "method, options, expected",
    [
        ("linear", {}, 178_350),  # tune-FC: 1024 x 174 + 174
        ("adapter", {}, 1_732_014),  # AdaptFormer-64
        ("bapat", {"d_bottle": 32}, 2_911_918),
        ("bapat", {"d_bottle": 64}, 4_067_758),
        ("bapat", {"d_bottle": 128}, 6_379_438),
        ("bapat", {"d_bottle": 256}, 11_002_798),
        ("patt", {"d_bottle": 32}, 1_358_254),  # "w/o Adapter"
        ("lora", {}, 948_398),  # r = 16 on Q and V
    ],
)
def test_swin3d_b_ssv2_counts(pt, method, options, expected):
    assert pt.count_trainable(pt.SWIN, 174, method, **options) == expected


def test_swin3d_b_counts_follow_the_design_formulas(pt):
    """Σd over the 24 blocks of Swin-B is 12,032; PATT-r adds 3·d·r + r + 2·d per block."""
    sum_d, head = 12_032, 1024 * 174 + 174
    for r in (64, 128, 256):
        assert pt.count_trainable(pt.SWIN, 174, "patt", d_bottle=r) == 3 * r * sum_d + 24 * r + 2 * sum_d + head


@pytest.mark.parametrize("r, expected", [(32, "2.13"), (64, "3.02"), (128, "4.79"), (256, "8.33")])
def test_vit_b_bapat_with_the_hmdb51_head(pt, r, expected):
    assert pt.millions(pt.count_trainable(pt.VIT, 51, "bapat", d_bottle=r)) == expected


def test_vit_b_adaptformer_averaged_over_five_heads(pt):
    value = pt.vit_avg("adapter").value()
    assert value == Fraction(5 * 12 * (2 * 768 * 64 + 64 + 768) + 769 * (100 + 10 + 101 + 174 + 51), 5)
    assert pt.millions(value) == "1.26"


def test_millions_rounds_half_up_exactly(pt):
    assert pt.millions(20_974_999) == "20.97"
    assert pt.millions(20_975_000) == "20.98"  # half-up, no binary float error
    assert pt.millions(Fraction(12_345, 2)) == "0.01"
    assert pt.exact(Fraction(5, 2)) == "2.5" and pt.exact(1_234_567) == "1,234,567"


def test_evaluate_match_alternative_and_mismatch(pt):
    linear = pt.swin("linear")  # 178,350
    assert pt.evaluate(pt.Row("t", "fc", "0.18", linear)).status == "match"
    alt = pt._with(linear, train_head=False, label="no head")  # 0 trainable
    result = pt.evaluate(pt.Row("t", "fc", "0.00", linear, (alt,), why="because"))
    assert result.status == "match: no head" and "because" in result.note
    result = pt.evaluate(pt.Row("t", "fc", "0.19", linear, why="count {exact} is {m}M"))
    assert result.status == "mismatch" and result.note == "count 178,350 is 0.18M"


def test_evaluate_reports_an_uncountable_row(pt):
    result = pt.evaluate(pt.Row("t", "bad", "1.00", pt.swin("lora", positions="qz")))
    assert result.status == "n/a" and "cannot count" in result.note


def test_rows_cover_every_table(pt):
    rows = pt.table_rows()  # building the rows counts nothing
    tables = {r.table.split(" (")[0] for r in rows}
    assert tables == {"Table 1", "Table 3", "Table 4", "Table 6", "Table 7", "Table 8"}
    assert len(rows) == 75
    assert all(r.paper.replace(".", "").isdigit() for r in rows)
