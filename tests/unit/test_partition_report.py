"""The partition-point report: quality vs sigma and vs sigma/RMS per p, best attack vs p, from grid JSONs."""

from __future__ import annotations

import pytest

from fedsea.experiments.partition_report import (
    NOT_MEASURED,
    at_level,
    markdown_report,
    rms_by_p,
    settings_by_p,
    write_partition_report,
)
from fedsea.experiments.privacy_report import GridRow, load_rows, write_report

RMS = {1: 2.0, 4: 8.0}
NAME = "sst2 accuracy (fine-tuned 48 steps, noised cut)"


def row(p: int, sigma: float, attack: str, acc: float, utility: float, name: str = NAME) -> GridRow:
    return GridRow("none", p, sigma, sigma / RMS[p], None, None, attack, acc, acc, 0.0, utility, name, 1.0)


def tiny_grid() -> list[GridRow]:
    """p = 1 at sigma 0, 0.28 (0.14 x RMS), 2; p = 4 at sigma 0, 1.12 (0.14 x RMS), 4 (probe only at 4)."""
    return [
        row(1, 0.0, "probe", 0.96, 0.90),
        row(1, 0.0, "bisr", 0.99, 0.90),
        row(1, 0.28, "probe", 0.95, 0.73),
        row(1, 0.28, "bisr", 0.98, 0.73),
        row(1, 2.0, "probe", 0.80, 0.51),
        row(4, 0.0, "probe", 0.85, 0.86),
        row(4, 1.12, "probe", 0.82, 0.70),
        row(4, 1.12, "bisr", 0.95, 0.70),
        row(4, 4.0, "probe", 0.60, 0.59),
    ]


def test_report_draws_tables_and_panels_from_a_grid_json(tmp_path, capsys):
    from fedsea.cli import main

    write_report(tiny_grid(), tmp_path / "grid")
    grid = tmp_path / "grid" / "attack_grid.json"
    out = tmp_path / "by-p"
    flags = ["--levels", "0.14,0.5", "--chance", "0.525", "--out", str(out)]
    assert main(["attack-report", "--by-p", str(grid), *flags]) == 0
    assert "9 rows" in capsys.readouterr().out
    assert (out / "partition.png").stat().st_size > 5000
    text = (out / "partition.md").read_text()
    # the best over every attack at the setting, with its name and the attacks that ran
    assert "| 1 | 0.28 | 0.14 | 0.730 | bisr/base | 0.980 | bisr/base, probe/base |" in text
    assert "| 4 | 4 | 0.5 | 0.590 | probe/base | 0.600 | probe/base |" in text
    # quality vs sigma: p = 4 never ran sigma 2, p = 1 never ran 4: not measured, not interpolated
    assert f"| 2 | 0.510 | {NOT_MEASURED} |" in text
    assert f"| 4 | {NOT_MEASURED} | 0.590 |" in text
    # quality vs sigma / RMS: both cuts at 0.14
    assert "| 0.14 | 0.730 | 0.700 |" in text
    assert "| RMS | 2 | 8 |" in text
    # best attack vs p at 0.14 (both measured) and 0.5 (only p = 4, probe only)
    assert "| 0.14 | 0.980 (bisr/base, 0.14; quality 0.730) | 0.950 (bisr/base, 0.14; quality 0.700) |" in text
    assert f"| 0.5 | {NOT_MEASURED} | 0.600 (probe/base, 0.5; quality 0.590) |" in text


def test_settings_group_by_cut_and_sigma_and_read_rms():
    settings = settings_by_p(tiny_grid())
    cuts = [(s.head_layers, s.sigma) for s in settings]
    assert cuts == [(1, 0.0), (1, 0.28), (1, 2.0), (4, 0.0), (4, 1.12), (4, 4.0)]
    assert rms_by_p(settings) == pytest.approx(RMS)
    assert at_level(settings, 4, 0.142) is not None  # within 5%: the same level measured in another run
    assert at_level(settings, 4, 0.3) is None
    assert "| 0.5 |" in markdown_report(settings, [0.5])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "no row of defence 'none'"),
        ([*tiny_grid(), row(1, 0.28, "probe", 0.9, 0.75)], "different utilities"),  # two budgets merged
        ([*tiny_grid(), row(4, 8.0, "probe", 0.1, 0.5, name="xsum rougeL")], "different utilities cannot share"),
        ([row(1, float("nan"), "probe", 0.5, 0.5)], "non-finite"),
    ],
)
def test_bad_grids_are_refused(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        write_partition_report(rows, tmp_path)
    assert not (tmp_path / "partition.png").exists()


def test_bad_levels_and_files_are_refused(tmp_path, capsys):
    from fedsea.cli import main

    with pytest.raises(ValueError, match="levels"):
        write_partition_report(tiny_grid(), tmp_path, levels=[])
    with pytest.raises(ValueError, match="levels"):
        write_partition_report(tiny_grid(), tmp_path, levels=[float("inf")])
    write_report(tiny_grid(), tmp_path / "grid")
    grid = tmp_path / "grid" / "attack_grid.json"
    assert len(load_rows(grid)) == 9
    with pytest.raises(SystemExit):  # argparse: a negative level, before any file is read
        main(["attack-report", "--by-p", str(grid), "--levels", "-1", "--out", str(tmp_path / "x")])
    assert "-1" in capsys.readouterr().err
