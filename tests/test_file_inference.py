"""File-level inference: finding audio files, embedding them in groups, the Parquet table."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import resemblyzer
import soundfile as sf
import torch

from spkenc.audio import preprocess_wav
from spkenc.config import ModelConfig
from spkenc.file_inference import embed_files, find_audio_files, verify_files, write_embeddings
from spkenc.inference import Embedder
from spkenc.model import SpeakerEncoder

PRETRAINED = Path(resemblyzer.__file__).parent / "pretrained.pt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.from_checkpoint(PRETRAINED, device="cpu", batch_size=4)


def dead_embedder() -> Embedder:
    """A real (tiny) encoder whose ReLU output is always zero: RTVC would divide 0 by 0 here."""
    model = SpeakerEncoder(ModelConfig(hidden_size=8, n_layers=1, embedding_size=4))
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.fill_(-1.0)
    return Embedder(model, device="cpu")


def test_find_audio_files_walks_folders_sorted_and_keeps_named_files(tmp_path):
    for name in ["b/2.flac", "b/1.WAV", "a/x.ogg", "a/deep/y.m4a", "a/notes.txt", "c.opus"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_audio_files([tmp_path / "b", tmp_path / "a", tmp_path / "a" / "notes.txt"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["b/1.WAV", "b/2.flac", "a/deep/y.m4a", "a/x.ogg", "a/notes.txt"]


def test_embed_files_in_small_groups_equals_one_by_one(embedder, demo_files, tmp_path):
    paths = demo_files[:3] + [tmp_path / "missing.flac"] + demo_files[8:10]
    rows = list(embed_files(embedder, paths, group_s=3.0))  # ~1-2 files per group
    assert [r.path for r in rows] == [str(p) for p in paths]
    missing = rows[3]
    assert missing.embedding is None and str(tmp_path / "missing.flac") in missing.error
    for row, path in zip(rows, paths):
        if row is missing:
            continue
        wav = preprocess_wav(path)
        expected = embedder.embed_utterance(wav)
        assert row.error is None
        assert float(row.embedding @ expected) >= 0.99999
        assert row.duration_s == pytest.approx(len(wav) / 16000)
        assert row.n_partials == len(embedder.embed_utterance(wav, return_partials=True)[1])


def test_embed_files_names_each_file_whose_embedding_fails(demo_files):
    rows = list(embed_files(dead_embedder(), demo_files[:2]))
    for row, path in zip(rows, demo_files[:2]):
        assert row.embedding is None and row.n_partials == 0 and row.duration_s > 0
        assert row.error.startswith(str(path)) and "every partial embedding is zero" in row.error
    with pytest.raises(ValueError, match="every partial embedding is zero"):
        dead_embedder().embed_utterance(preprocess_wav(demo_files[0]))


def test_write_embeddings_replaces_the_file_atomically(embedder, demo_files, tmp_path):
    out = tmp_path / "embeds.parquet"
    out.write_text("an older table")
    rows = list(embed_files(embedder, demo_files[:2]))
    assert write_embeddings(rows, out) == out
    table = pq.read_table(out)
    assert table.column_names == ["path", "embedding", "n_partials", "duration_s", "error"]
    assert table.num_rows == 2
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), np.stack([r.embedding for r in rows]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeds.parquet"]


def test_verify_files(embedder, demo_files, tmp_path):
    same = verify_files(embedder, demo_files[0], demo_files[1])
    different = verify_files(embedder, demo_files[0], demo_files[8])
    assert -1 <= different < same <= 1
    assert verify_files(embedder, demo_files[0], demo_files[0]) == pytest.approx(1.0, abs=1e-6)
    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="silent.flac: no speech"):
        verify_files(embedder, demo_files[0], silent)
