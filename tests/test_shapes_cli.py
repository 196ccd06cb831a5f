"""``alphagrpo data synth`` and ``alphagrpo data verifier-accuracy``."""
import json

from alphagrpo.cli import main
from alphagrpo.commands.data import split_test_path
from alphagrpo.worlds.shapes import TASKS, read_jsonl
from alphagrpo.worlds.shapes import accuracy


def test_synth_writes_train_and_test_beside_it(tmp_path, capsys):
    out = tmp_path / "d" / "shapes_train.jsonl"
    rc = main(["data", "synth", "--world", "shapes", "--n-per-task", "10", "--n-test", "19", "--out", str(out),
               "--seed", "1"])
    assert rc == 0
    train, test = read_jsonl(str(out)), read_jsonl(str(tmp_path / "d" / "shapes_test.jsonl"))
    assert len(train) == 10 * len(TASKS) and len(test) == 19
    assert {"prompt", "semantic_questions", "quality_questions", "task", "difficulty", "plan", "scene"} <= set(train[0])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("task") and any(line.startswith("total") for line in lines)
    summary = json.loads(lines[-1])
    assert summary["n_train"] == len(train) and summary["test"].endswith("shapes_test.jsonl")


def test_the_test_path_is_derived_from_the_train_path():
    assert split_test_path("data/shapes_train.jsonl") == "data/shapes_test.jsonl"
    assert split_test_path("x/prompts.jsonl") == "x/prompts_test.jsonl"


def test_synth_rejects_bad_sizes(tmp_path, capsys):
    assert main(["data", "synth", "--n-per-task", "-1", "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "--n-per-task" in capsys.readouterr().err


def test_verifier_accuracy_prints_a_table_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(accuracy, "CONDITIONS", {"clean": (0.0, 0.0), "noise+blur": (12.0, 0.8)})
    out = tmp_path / "acc.json"
    assert main(["data", "verifier-accuracy", "--n", "2", "--seed", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"clean", "noise+blur"}
    assert res["results"]["clean"]["all_questions"]["acc"] == 1.0 and res["meets_target"]
    assert res["results"]["clean"]["existence"]["neg"]["n"] >= 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("kind") and json.loads(lines[-1])["clean_accuracy"] == 1.0


def test_verifier_accuracy_rejects_bad_arguments(tmp_path, capsys):
    assert main(["data", "verifier-accuracy", "--n", "0", "--out", str(tmp_path / "a.json")]) == 2
    assert main(["data", "verifier-accuracy", "--resolution", "8", "--out", str(tmp_path / "a.json")]) == 2
    assert "resolution" in capsys.readouterr().err
