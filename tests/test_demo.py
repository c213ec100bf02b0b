"""`moerge demo --quick` end to end: the issue's quality bar, checked on real training."""

import json

from typer.testing import CliRunner

from moerge.cli import app


def test_demo_quick_scoreboard_and_quality_bar(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))  # Fisher and RegMean statistics land here
    board_file = tmp_path / "board.json"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d"), "--json", str(board_file),
                                   "--report", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    board = json.loads(board_file.read_text())
    rows = {r["model"]: r["scores"] for r in board["rows"]}
    tasks, heldout = board["tasks"], board["heldout"]
    assert len(tasks) >= 3 and len(heldout) >= 2
    merges = ("linear", "task_arithmetic", "ties", "dare_ties", "fisher", "regmean")
    assert set(rows) == {"base", "multitask", "oracle"} | {f"expert:{t}" for t in tasks} | {
        f"merge:{m}" for m in merges} | {"lora:iso_cts", "lora:tsv", "lora:ties"} | {
        f"route:{r}" for r in ("uniform", "centroid", "smear", "arrow", "phatgoose", "lorahub")}
    for scores in rows.values():
        assert set(scores) == set(tasks + heldout) and all(0 <= v <= 1 for v in scores.values())
    for t in tasks:
        assert rows["base"][t] < 0.2, f"the base already solves {t}"
        assert rows[f"expert:{t}"][t] >= rows["base"][t] + 0.3, f"expert {t} did not learn its skill"
        # the oracle routes each prompt to its task's expert through the mixture runtime: the expert's score
        assert abs(rows["oracle"][t] - rows[f"expert:{t}"][t]) <= 0.03
    def mean(row):
        return sum(rows[row][t] for t in tasks) / len(tasks)

    # routing by k-means task centroids recovers (nearly) the oracle, far above every static merge
    assert mean("route:centroid") >= 0.9 * mean("oracle")
    assert mean("route:centroid") > max(mean(f"merge:{m}") for m in merges) + 0.3
    # a LoRA-native merge changes the base: it scores something, and a change of rank at most Σ r was written
    assert any(rows[f"lora:{m}"] != rows["base"] for m in ("iso_cts", "tsv", "ties"))
    assert (tmp_path / "report" / "scoreboard.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "routing.png").stat().st_size > 10_000
    for t in tasks:
        assert board["routing"]["oracle"][t][board["experts"].index(t)] == 1.0
    for m in merges:
        assert (tmp_path / "d" / "merges" / m / "model.safetensors").exists()
    for t in tasks:
        assert (tmp_path / "d" / "experts" / t / "adapter_model.safetensors").exists()


def test_demo_leaves_lorahub_out_with_a_hint_without_nevergrad(monkeypatch):
    import sys

    from moerge.demo import ROUTERS, routers

    monkeypatch.setitem(sys.modules, "nevergrad", None)  # what an install without the extra looks like
    available, note = routers()
    assert available == ROUTERS and "moerge[lorahub]" in note
    monkeypatch.delitem(sys.modules, "nevergrad")
    available, note = routers()
    assert ("lorahub", None) in available and note is None
