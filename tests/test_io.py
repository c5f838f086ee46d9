"""Atomic JSON and folder writes, clean-up after a killed save, one redaction rule."""

from __future__ import annotations

import json

import pytest

from cgc_hf._io import clean_leftovers, read_json, redact, replace_folder, scrub, write_json

SECRET = "hf_NotARealTokenButSecret123"


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": (1, 2)})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "half.json").write_text('{"a": ')
    assert read_json(tmp_path / "half.json") is None


def test_replace_folder_keeps_the_old_one_when_writing_fails(tmp_path):
    dest = tmp_path / "model"
    replace_folder(dest, lambda d: (d / "w").write_text("one"))

    def fail(d):
        (d / "w").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_folder(dest, fail)
    assert (dest / "w").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    replace_folder(dest, lambda d: (d / "w").write_text("two"))
    assert (dest / "w").read_text() == "two"


def test_leftovers_of_a_killed_save_are_cleaned_and_only_those(tmp_path):
    dest = tmp_path / "model"
    for name in (".model.tmp-0123abcd", ".model.old-89abcdef", ".model.tmp-notours", "notes"):
        (tmp_path / name).mkdir()
    # Killed between the two renames: the earlier save sits under .old, dest is gone.
    clean_leftovers(dest)
    assert dest.is_dir()  # put back: it is the last complete save
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".model.tmp-notours", "model", "notes"]  # unknown names are never touched


def test_redact_by_key_and_by_value():
    data = {
        "hub_token": SECRET,
        "token": None,
        "keep": [1, {"password": "p", "note": f"x{SECRET}"}],
        "cmd": ["--a", "1", "--hub_token", SECRET, "--b", f"--token={SECRET}", "--c", SECRET],
        "other": "hf_" + "A" * 30,
    }
    assert redact(data, [SECRET]) == {
        "keep": [1, {"note": "<redacted>"}],
        "cmd": ["--a", "1", "--b"],
        "other": "<redacted>",
    }
    assert scrub(f"unrecognized arguments: --tok {SECRET}") == (
        "unrecognized arguments: --tok <redacted>"
    )
