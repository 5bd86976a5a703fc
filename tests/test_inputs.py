"""Input expansion: files, directories, globs, .txt lists; sorted, deduplicated, absolute."""

from __future__ import annotations

import os

import pytest

from pipeline.inputs import expand_inputs


def test_files_directories_globs_and_lists(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ["a/one.wav", "a/deep/two.MP3", "a/notes.txt", "a/deep/cover.jpg", "b.flac"]:
        (tmp_path / rel).write_bytes(b"x" * 10)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{tmp_path / 'b.flac'}\n\n{tmp_path / 'a' / 'one.wav'}\n")
    found = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.flac"), str(listing)])
    names = [os.path.relpath(i.uri, tmp_path) for i in found]
    # The directory gives audio extensions only (case-insensitive); duplicates from the list vanish.
    assert names == ["a/deep/two.MP3", "a/one.wav", "b.flac"]
    assert all(os.path.isabs(i.uri) and i.size == 10 for i in found)
    # An explicit file is always attempted, whatever its extension (decode records what it is).
    assert [os.path.basename(i.uri) for i in expand_inputs([str(tmp_path / "a" / "deep" / "cover.jpg")])] == ["cover.jpg"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        expand_inputs([str(tmp_path / "nope.wav")])


def test_inputs_without_audio_are_an_error_or_a_warning(tmp_path, caplog):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("no audio here")
    (tmp_path / "talk.wav").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no audio files in .*docs"):
        expand_inputs([str(tmp_path / "docs")])
    with pytest.raises(FileNotFoundError, match=r"\*\.ogg"):
        expand_inputs([str(tmp_path / "*.ogg")])
    with caplog.at_level("WARNING"):
        found = expand_inputs([str(tmp_path / "docs"), str(tmp_path / "talk.wav")])
    assert [os.path.basename(i.uri) for i in found] == ["talk.wav"]
    assert "no audio files in" in caplog.text and "docs" in caplog.text
