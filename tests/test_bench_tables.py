"""The benchmark tables show every column some row has (a cost row without peak memory must not hide it)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import md_table  # noqa: E402


def test_md_table_takes_the_columns_of_every_row():
    table = md_table([{"run": "base", "minutes": 2.5}, {"run": "s1", "minutes": 12.0, "peak_rss_mb": 3200.7}])
    lines = table.splitlines()
    assert lines[0] == "| run | minutes | peak_rss_mb |"
    assert lines[2] == "| base | 2.500 | – |"
    assert lines[3] == "| s1 | 12.000 | 3201 |"
