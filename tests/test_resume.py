"""clusterar.resume: the one policy for resumable work (refuse other settings, naming them; start over
only when asked; free settings are not compared)."""

import json

import pytest

from clusterar.resume import Record, SettingsDiffer, differences


def test_record_policy(tmp_path, capsys):
    record = Record(tmp_path / "done.json", "the stage", "Delete it to redo it", free=("device",))
    assert record.check({"lr": 1.0}) is None  # no record: the work starts
    record.write({"lr": 1.0, "steps": (1, 2), "device": "cpu"}, result=3)
    assert json.loads(record.path.read_text()) == {
        "settings": {"lr": 1.0, "steps": [1, 2], "device": "cpu"},
        "result": 3,
    }
    same = {"lr": 1.0, "steps": (1, 2), "device": "cuda"}  # tuples compare as stored; device is free
    assert record.check(same)["result"] == 3
    with pytest.raises(
        SettingsDiffer, match=r"other settings: settings differ .*lr: saved 1.0, now 2.0"
    ) as e:
        record.check({**same, "lr": 2.0})
    assert "Delete it to redo it" in str(e.value) and e.value.diff == {"lr": (1.0, 2.0)}
    with pytest.raises(SettingsDiffer):  # restart only for the names given
        record.check({**same, "lr": 2.0}, restart=("steps",))
    assert record.check({**same, "steps": [1, 3]}, restart=("steps",)) is None
    assert not record.path.exists() and "steps changed; starting the stage over" in capsys.readouterr().err
    record.write({"lr": 1.0})
    assert record.check({"lr": 2.0}, restart=True) is None and not record.path.exists()


def test_whole_file_record_and_extra_fields(tmp_path):
    record = Record(tmp_path / "run.json", "samples", "choose another --out", key=None)
    record.write({"n": 4, "old_field": 1})  # a field this version no longer has does not stand in the way
    assert record.check({"n": 4}) == {"n": 4, "old_field": 1}
    assert differences({"n": 4}, {"n": 4, "new": None}) == {}  # a field added later, at its old value
    assert differences({"n": 4}, {"n": 5, "device": "x"}, free=("device",)) == {"n": (4, 5)}
