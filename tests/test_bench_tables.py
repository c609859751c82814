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


def test_compare_lm_quality_puts_each_arm_on_one_row(tmp_path, monkeypatch):
    import json

    import common
    import compare_lm_quality

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(compare_lm_quality, "RESULTS", tmp_path)
    for name, f1, share in (("full", 0.93, 1.0), ("lora", 0.88, 0.2)):
        costs = [{"run": "base", "minutes": 3.0}] + [
            {"run": f"s{i}", "minutes": 10.0 + i, "peak_rss_mb": 2000 + i, "trainable": 5, "share": share}
            for i in range(3)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"targets": {"vqa_accuracy": 0.9}, "costs": costs,
                                                           "runs": {"model": {}}}))
        (tmp_path / f"{name}_model.json").write_text(json.dumps({"summary": {"report_clinical_micro_f1": f1}}))
    monkeypatch.setattr(sys, "argv", ["x", "full=full", "lora=lora", "--name", "cmp"])
    assert compare_lm_quality.main() == 0
    out = json.loads((tmp_path / "cmp.json").read_text())
    arms = {r["arm"]: r for r in out["arms"]}
    assert arms["full"]["report micro-F1"] == 0.93 and arms["lora"]["report micro-F1"] == 0.88
    assert arms["lora"]["stage minutes"] == 33.0 and arms["lora"]["stages timed"] == 3  # the base LM is not a stage
    assert arms["lora"]["trainable share"] == 0.2
    assert len(out["costs"]) == 6
    assert "vqa_accuracy >= 0.9" in (tmp_path / "cmp.md").read_text()
