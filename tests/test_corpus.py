"""Corpus layouts, auto-detection, the registry and the stable held-out split, on generated trees of
real-format files made from the committed demo corpus."""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from spkenc.corpus import MANIFEST_SCHEMA, heldout_score, load_registry, scan_corpus, speaker_split
from spkenc.layouts import detect_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speech(demo_files) -> list[np.ndarray]:
    """Four real 16 kHz utterances."""
    return [sf.read(p, dtype="float32")[0] for p in demo_files[:4]]


def write_m4a(path: Path, wav: np.ndarray, rate_hz: int = 16000) -> Path:
    """AAC in an MP4 (.m4a) container, VoxCeleb2's format, encoded with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=rate_hz, layout="mono")
        size = stream.codec_context.frame_size or 1024
        for start in range(0, len(wav), size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[None, start : start + size]), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate_hz, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write(path: Path, wav: np.ndarray, rate_hz: int = 16000, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav, rate_hz, **kwargs)
    return path


def by_key(result) -> dict[tuple[str, str], dict]:
    return {(r["speaker_id"], r["utterance_id"]): r for r in result.rows}


def reasons(result) -> dict[str, str]:
    return {Path(r["path"]).name: r["reason"] for r in result.rejects}


def test_librispeech_layout_with_and_without_transcripts(tmp_path, speech):
    root = tmp_path / "LibriSpeech"
    write(root / "train-clean-100" / "19" / "198" / "19-198-0001.flac", speech[0])
    write(root / "train-clean-100" / "19" / "198" / "19-198-0002.flac", speech[1])
    (root / "train-clean-100" / "19" / "198" / "19-198.trans.txt").write_text("19-198-0001 HELLO\n19-198-0002 WORLD\n")
    write(root / "test-other" / "700" / "12" / "700-12-0000.flac", speech[2])
    write(root / "test-other" / "700" / "12" / "misplaced.flac", speech[3])
    assert detect_layout(root) == "librispeech"
    result = scan_corpus(root, corpus="libri")
    assert result.layout == "librispeech"
    assert sorted(by_key(result)) == [("19", "19-198-0001"), ("19", "19-198-0002"), ("700", "700-12-0000")]
    row = by_key(result)[("19", "19-198-0001")]
    assert (row["format"], row["sample_rate"], row["channels"], row["n_frames"]) == ("FLAC", 16000, 1, len(speech[0]))
    assert row["duration_s"] == pytest.approx(len(speech[0]) / 16000)
    assert row["bytes"] == os.path.getsize(row["path"]) and row["corpus"] == "libri"
    assert "not in the LibriSpeech layout" in reasons(result)["misplaced.flac"]
    only_test = scan_corpus(root, "librispeech", options={"splits": ["test-other"]})
    assert sorted(by_key(only_test)) == [("700", "700-12-0000")]
    one_split = scan_corpus(root / "test-other", "librispeech")
    assert sorted(by_key(one_split)) == [("700", "700-12-0000")]


def test_voxceleb1_layout_and_the_anglophone_filter(tmp_path, speech):
    root = tmp_path / "VoxCeleb1"
    for i, speaker in enumerate(["id10001", "id10002", "id10003"]):
        write(root / "wav" / speaker / "1zcIwhmdeo4" / "00001.wav", speech[i])
    write(root / "wav" / "id10001" / "7gWzIy6yIIk" / "00002.wav", speech[3])
    (root / "vox1_meta.csv").write_text(
        "VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\n"
        "id10001\tA.J._Buckley\tm\tIreland\tdev\n"
        "id10002\tA.R._Rahman\tm\tIndia\tdev\n"
        "id10003\tAamir_Khan\tm\tUSA\tdev\n"
    )
    assert detect_layout(root) == "voxceleb1"
    everyone = scan_corpus(root)
    assert sorted(by_key(everyone)) == [
        ("id10001", "1zcIwhmdeo4_00001"), ("id10001", "7gWzIy6yIIk_00002"), ("id10002", "1zcIwhmdeo4_00001"),
        ("id10003", "1zcIwhmdeo4_00001"),
    ]
    assert by_key(everyone)[("id10001", "1zcIwhmdeo4_00001")]["format"] == "WAV"
    anglophone = scan_corpus(root, "voxceleb1", options={"nationalities": "anglophone"})
    assert sorted({s for s, _ in by_key(anglophone)}) == ["id10001", "id10003"]
    assert anglophone.excluded_speakers == ["id10002"]
    india = scan_corpus(root, "voxceleb1", options={"nationalities": ["india"]})
    assert sorted({s for s, _ in by_key(india)}) == ["id10002"]
    (root / "vox1_meta.csv").unlink()
    with pytest.raises(FileNotFoundError, match="vox1_meta.csv: VoxCeleb1 metadata not found"):
        scan_corpus(root, "voxceleb1", options={"nationalities": "anglophone"})


def test_voxceleb2_layout_reads_m4a_headers(tmp_path, speech):
    root = tmp_path / "VoxCeleb2"
    write_m4a(root / "dev" / "aac" / "id00012" / "21Uxsk56VDQ" / "00001.m4a", speech[0])
    write_m4a(root / "dev" / "aac" / "id00015" / "0fijmz4vTVU" / "00002.m4a", speech[1])
    assert detect_layout(root) == "voxceleb2"
    result = scan_corpus(root)
    assert sorted(by_key(result)) == [("id00012", "21Uxsk56VDQ_00001"), ("id00015", "0fijmz4vTVU_00002")]
    row = by_key(result)[("id00012", "21Uxsk56VDQ_00001")]
    assert (row["format"], row["sample_rate"], row["channels"]) == ("AAC", 16000, 1)
    assert row["duration_s"] == pytest.approx(len(speech[0]) / 16000, abs=0.07)
    with pytest.raises(ValueError, match="no .*test/aac.* folder for the voxceleb2 layout"):
        scan_corpus(root, "voxceleb2", options={"subsets": ["test"]})


def test_speaker_folders_nested_mixed_formats_odd_names_and_bad_entries(tmp_path, speech):
    root = tmp_path / "corpus"
    write(root / "spk one" / "a.flac", speech[0])
    write(root / "spk one" / "session 2" / "b.wav", speech[1], subtype="PCM_24")
    write(root / "spk one" / "a.wav", speech[2])  # same name as a.flac in another format
    write(root / "sprecher-ü" / "tief" / "unten" / "ä ö.ogg", speech[3], format="OGG", subtype="VORBIS")
    write_m4a(root / "sprecher-ü" / "c.m4a", speech[0])
    write(root / "loose.wav", speech[0])  # no speaker folder
    (root / "spk one" / "notes.txt").write_text("not audio, ignored")
    (root / "spk one" / ".hidden.wav").write_text("hidden, ignored")
    (root / "spk one" / "folder.wav").mkdir()  # a folder named like an audio file
    write(root / "spk one" / "folder.wav" / "inner.flac", speech[1])
    (root / "spk one" / "empty.wav").write_bytes(b"")
    (root / "spk one" / "text.wav").write_text("this is not audio\n" * 50)
    os.symlink(root / "spk one", root / "spk one" / "session 2" / "loop")  # a symlink loop
    result = scan_corpus(root, "speaker_folders", corpus="c")
    assert sorted(by_key(result)) == [
        ("spk one", "a_flac"), ("spk one", "a_wav"), ("spk one", "folder.wav__inner"), ("spk one", "session 2__b"),
        ("sprecher-ü", "c"), ("sprecher-ü", "tief__unten__ä ö"),
    ]
    assert by_key(result)[("sprecher-ü", "tief__unten__ä ö")]["format"] == "OGG"
    assert by_key(result)[("sprecher-ü", "c")]["format"] == "AAC"
    why = reasons(result)
    assert why["loose.wav"] == "an audio file outside any speaker folder"
    assert why["folder.wav"].startswith("a folder named like an audio file")
    assert why["loop"] == "symlink loop: this folder was already scanned"
    assert "empty file (0 bytes)" in why["empty.wav"]
    assert why["text.wav"] and "text.wav" not in why["text.wav"], "the reason should not repeat the path"
    assert {r["stage"] for r in result.rejects} == {"scan"}
    table = result.manifest_table()
    assert table.schema == MANIFEST_SCHEMA and table.num_rows == 6


def test_manifest_layout_resolves_relative_paths_and_guards_the_root(tmp_path, speech):
    root = tmp_path / "corpus"
    write(root / "audio" / "x.flac", speech[0])
    write(root / "audio" / "y.wav", speech[1])
    outside = write(tmp_path / "elsewhere" / "z.flac", speech[2])
    (root / "audio" / "dir.wav").mkdir()
    (root / "list.csv").write_text(
        "path,speaker,utterance_id\n"
        "audio/x.flac,alice,\n"
        "audio/y.wav,bob,take1\n"
        f"{outside},carol,\n"
        "../elsewhere/z.flac,carol,\n"
        "audio/missing.flac,dave,\n"
        "audio/dir.wav,dave,\n"
        "audio/x.flac,alice,\n"
        "audio/y.wav,,\n"
    )
    assert detect_layout(root / "list.csv") == "manifest"
    result = scan_corpus(root / "list.csv")
    assert sorted(by_key(result)) == [("alice", "x"), ("bob", "take1")]
    assert by_key(result)[("alice", "x")]["path"] == str(root / "audio" / "x.flac")
    why = [r["reason"] for r in result.rejects]
    assert sum("outside the corpus root" in r for r in why) == 2
    assert any(r.startswith("line 6: file not found") for r in why)
    assert any(r.startswith("line 7: a folder, not an audio file") for r in why)
    assert any(r.startswith("line 8: listed twice") for r in why)
    allowed = scan_corpus(root / "list.csv", "manifest", options={"allow_outside_root": True})
    assert ("carol", "z") in by_key(allowed)

    (root / "list.tsv").write_text("file\tspk\naudio/x.flac\talice\n")
    assert sorted(by_key(scan_corpus(root / "list.tsv"))) == [("alice", "x")]
    (root / "nocols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"nocols.csv: no path column"):
        scan_corpus(root / "nocols.csv")


def test_bad_arguments_fail_at_once(tmp_path, demo_dir):
    with pytest.raises(FileNotFoundError, match="corpus root not found"):
        scan_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown layout 'kaldi'"):
        scan_corpus(demo_dir, "kaldi")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['splits'\] for layout speaker_folders"):
        scan_corpus(demo_dir, "speaker_folders", options={"splits": ["x"]})
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        scan_corpus(demo_dir, heldout_fraction=1.5)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="cannot detect a layout"):
        scan_corpus(tmp_path / "flat")


def test_the_split_is_stable_when_speakers_are_added():
    first = {f"spk{i}": speaker_split("c", f"spk{i}", 0.2) for i in range(200)}
    more = {f"spk{i}": speaker_split("c", f"spk{i}", 0.2) for i in range(1000)}
    assert all(more[s] == split for s, split in first.items())
    share = sum(v == "heldout" for v in more.values()) / len(more)
    assert 0.16 < share < 0.24
    assert all(speaker_split("c", s, 0.2, role="eval") == "heldout" for s in first)
    assert heldout_score("c", "spk1") != heldout_score("other", "spk1"), "the corpus name is part of the hash"


def test_demo_corpus_scan_splits_speakers_not_utterances(demo_dir):
    result = scan_corpus(demo_dir, corpus="demo_tiny")
    assert result.layout == "speaker_folders" and len(result.rows) == 192 and result.n_speakers == 24
    assert not result.rejects
    per_speaker = {}
    for row in result.rows:
        per_speaker.setdefault(row["speaker_id"], set()).add(row["split"])
        assert (row["sample_rate"], row["channels"], row["format"]) == (16000, 1, "FLAC")
    assert all(len(s) == 1 for s in per_speaker.values())
    assert 1 <= len(result.speakers_in("heldout")) <= 10
    assert scan_corpus(demo_dir, corpus="demo_tiny", role="eval").speakers_in("train") == []


def test_the_default_registry_holds_only_the_demo_corpus():
    registry = load_registry(REPO / "corpora.yaml")
    assert list(registry) == ["demo_tiny"]
    spec = registry["demo_tiny"]
    assert spec.root == REPO / "data" / "demo_tiny" and spec.layout == "speaker_folders" and spec.role == "train"
    assert (spec.root / "SOURCE.md").is_file()


def test_registry_from_the_environment_resolves_relative_roots_and_refuses_bad_entries(tmp_path, monkeypatch):
    config = tmp_path / "conf" / "corpora.yaml"
    config.parent.mkdir()
    config.write_text(
        "corpora:\n"
        "  libri:\n    root: ../data/LibriSpeech\n    layout: librispeech\n    options: {splits: [test-other]}\n"
        "  vox:\n    root: /abs/vox\n    layout: voxceleb1\n    role: eval\n    options: {nationalities: anglophone}\n"
    )
    monkeypatch.setenv("SPKENC_CORPORA", str(config))
    registry = load_registry()
    assert registry["libri"].root == tmp_path / "data" / "LibriSpeech"
    assert registry["libri"].options == {"splits": ["test-other"]} and registry["libri"].heldout_fraction == 0.2
    assert registry["vox"].role == "eval" and registry["vox"].root == Path("/abs/vox")
    for body, message in [
        ("corpora:\n  a:\n    root: x\n    colour: red\n", r"corpus 'a': unknown key\(s\) \['colour'\]"),
        ("corpora:\n  a:\n    root: x\n    layout: kaldi\n", "corpus 'a': unknown layout 'kaldi'"),
        ("corpora:\n  a b:\n    root: x\n", "corpus 'a b': names may hold only"),
        ("corpora:\n  a:\n    root: x\n    role: test\n", "role must be one of"),
        ("corpora:\n  a:\n    root: x\n    heldout_fraction: 2\n", "heldout_fraction must be in"),
        ("corpora:\n  a:\n    root: x\n    layout: librispeech\n    options: {nationalities: [uk]}\n", "unknown option"),
        ("datasets: {}\n", "expected one top-level key 'corpora'"),
        ("corpora: [\n", "not valid YAML"),
    ]:
        config.write_text(body)
        with pytest.raises(ValueError, match=message) as error:
            load_registry()
        assert str(error.value).startswith(str(config))
    with pytest.raises(FileNotFoundError, match="corpus registry not found"):
        load_registry(tmp_path / "nope.yaml")
