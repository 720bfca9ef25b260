"""kit.atomic: files and folders appear whole or not at all."""

import json
import stat

import pytest

from kit import atomic


def test_a_failure_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic.writer(path) as fh:
        fh.write("half of the new")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_written_files_are_shared_0644_and_parents_are_created(tmp_path):
    path = tmp_path / "a" / "b.bin"
    with atomic.writer(path, "wb") as fh:
        fh.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_text_is_written_in_the_given_encoding_and_newline(tmp_path):
    path = atomic.write_text(tmp_path / "t.csv", "é\nx\n", encoding="latin-1", newline="\r\n")
    assert path.read_bytes() == "é\r\nx\r\n".encode("latin-1")
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(path, "é", encoding="ascii")
    assert path.read_bytes() == "é\r\nx\r\n".encode("latin-1")


def test_json_keeps_non_ascii_and_ends_with_a_newline(tmp_path):
    path = atomic.write_json(tmp_path / "m.json", {"title": "Niere"})
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert json.loads(path.read_text(encoding="utf-8")) == {"title": "Niere"}


def test_writer_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="'a'"), atomic.writer(tmp_path / "x", "a"):
        pass


def test_swap_folder_replaces_an_existing_folder_whole(tmp_path):
    target, staging = tmp_path / "data", tmp_path / ".data.partial"
    (target / "sub").mkdir(parents=True)
    (target / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    atomic.swap_folder(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_place_folder_keeps_a_finished_target_and_replaces_a_stale_one(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "done").write_text("theirs")
    built = tmp_path / ".built"
    built.mkdir()
    (built / "done").write_text("ours")
    assert not atomic.place_folder(built, target, keep=lambda t: (t / "done").exists())
    assert (target / "done").read_text() == "theirs"
    assert atomic.place_folder(built, target, keep=lambda t: False)
    assert (target / "done").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
