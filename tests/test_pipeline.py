import json

from llm_cxr.pipeline import Stages


def test_stage_is_cached_until_its_fingerprint_changes(tmp_path):
    calls = []

    def build(tmp):
        calls.append(1)
        (tmp / "out.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    s = Stages(tmp_path)
    r1 = s.run("a", {"x": 1}, build)
    assert not r1.cached and (r1.path / "out.txt").read_text() == "1"
    r2 = Stages(tmp_path).run("a", {"x": 1}, build)
    assert r2.cached and r2.info == {"n": 1} and len(calls) == 1
    r3 = Stages(tmp_path).run("a", {"x": 2}, build)
    assert not r3.cached and (r3.path / "out.txt").read_text() == "2"
    Stages(tmp_path, fresh=True).run("a", {"x": 2}, build)
    assert len(calls) == 3
    assert json.loads((tmp_path / "a" / "stage.json").read_text())["fingerprint"]["x"] == 2


def test_interrupted_stage_leaves_no_trusted_output(tmp_path):
    def boom(tmp):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed")

    s = Stages(tmp_path)
    try:
        s.run("a", {}, boom)
    except RuntimeError:
        pass
    assert not (tmp_path / "a").exists()
    r = s.run("a", {}, lambda tmp: {"ok": True})
    assert not r.cached and r.info == {"ok": True}


def test_paths_recorded_into_the_build_folder_name_the_final_one(tmp_path):
    """A run built in the stage's temporary folder records its base model there; after the move, run.json names
    where the base is now (issue: run.json recorded a temporary folder that no longer exists)."""

    def build(tmp):
        (tmp / "base").mkdir()
        (tmp / "run").mkdir()
        (tmp / "run" / "run.json").write_text(json.dumps({"base": str((tmp / "base").resolve()), "kind": "lora",
                                                          "extra": {"refs": [str(tmp.resolve()), "hub/name"]}}))
        return {}

    r = Stages(tmp_path).run("lm", {}, build)
    doc = json.loads((r.path / "run" / "run.json").read_text())
    assert doc["base"] == str((r.path / "base").resolve()) and (r.path / "base").exists()
    assert doc["extra"]["refs"] == [str(r.path.resolve()), "hub/name"] and doc["kind"] == "lora"


def test_a_rebuilt_stage_rebuilds_the_stages_built_from_it(tmp_path):
    """A later stage's fingerprint holds the earlier one's key: retraining the earlier stage (here with the same
    measured info, as a retrained VQ-GAN encodes a dataset of the same size) must not leave the later one cached."""
    built = []

    def chain(version):
        s = Stages(tmp_path)
        s.run("first", {"v": version}, lambda tmp: {"n": 10})  # the same info whatever the version
        s.run("second", {"first": s.key("first")}, lambda tmp: built.append(version) or {})
        return s

    chain(1)
    chain(1)
    assert built == [1]
    s = chain(2)
    assert built == [1, 2] and not s.results["second"].cached
    assert s.key("first") != Stages(tmp_path).run("first", {"v": 3}, lambda tmp: {"n": 10}).key
