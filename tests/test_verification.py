"""spkenc.verification: embedding manifests, the embeddings table, report JSON and plots."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spkenc.audio import preprocess_wav
from spkenc.config import EvalConfig, ModelConfig
from spkenc.inference import Embedder
from spkenc.model import SpeakerEncoder
from spkenc.verification import (
    EmbeddedUtterances,
    embed_manifest,
    evaluate_embedded,
    manifest_rows,
    read_embedding_table,
    speaker_similarity_matrix,
    write_embedding_table,
    write_report_json,
    write_report_plots,
)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.manual_seed(0)
    return Embedder(SpeakerEncoder(ModelConfig(hidden_size=16, n_layers=1, embedding_size=8)), device="cpu", n_threads=1)


def embedded_rows(n_speakers=3, n_per_speaker=4, corpora=("c",), texts=None, seed=0) -> EmbeddedUtterances:
    rng = np.random.default_rng(seed)
    n = n_speakers * n_per_speaker * len(corpora)
    x = np.abs(rng.standard_normal((n, 8))).astype(np.float32)
    return EmbeddedUtterances(
        utterance_ids=[f"u{i % n_per_speaker}" for i in range(n)],
        speaker_ids=[f"s{(i // n_per_speaker) % n_speakers}" for i in range(n)],
        corpora=[corpora[i // (n_speakers * n_per_speaker)] for i in range(n)],
        paths=[f"/data/{i}.flac" for i in range(n)],
        texts=texts or [None] * n,
        embeddings=x / np.linalg.norm(x, axis=1, keepdims=True),
    )


def test_embed_manifest_keeps_good_files_and_reports_bad_ones(tmp_path, demo_files, embedder):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio" * 50)
    silent = tmp_path / "silent.wav"
    import soundfile

    soundfile.write(silent, np.zeros(16000, np.float32), 16000)
    rows = [{"path": str(p), "speaker_id": p.parent.name, "utterance_id": p.stem, "corpus": "demo_tiny"} for p in demo_files[:3]]
    rows += [{"path": str(broken), "speaker_id": "x", "utterance_id": "broken"},
             {"path": str(silent), "speaker_id": "x", "utterance_id": "silent"}]
    embedded = embed_manifest(embedder, rows)
    assert len(embedded) == 3 and embedded.embeddings.shape == (3, 8)
    assert embedded.utterance_ids == [p.stem for p in demo_files[:3]] and embedded.corpora == ["demo_tiny"] * 3
    assert np.allclose(embedded.embeddings[1], embedder.embed_utterance(preprocess_wav(demo_files[1])), atol=1e-5)
    assert [f["path"] for f in embedded.failures] == [str(broken), str(silent)]
    assert embedded.failures[1]["reason"] == f"{silent}: no speech left after silence trimming"


def test_embedding_table_round_trip(tmp_path):
    embedded = embedded_rows(texts=[None, "hello"] * 6)
    path = write_embedding_table(embedded, tmp_path / "e" / "embeddings.parquet", {"checkpoint": "/m/encoder.pt", "step": 7})
    table = pq.read_table(path)
    assert table.column_names == ["utterance_id", "speaker_id", "corpus", "embedding", "path", "text"]
    back, metadata = read_embedding_table(path)
    assert metadata == {"checkpoint": "/m/encoder.pt", "step": "7"}
    assert back.speaker_ids == embedded.speaker_ids and back.texts == embedded.texts
    assert np.array_equal(back.embeddings, embedded.embeddings)


def test_bad_embedding_table_names_the_file(tmp_path):
    path = tmp_path / "other.parquet"
    with pytest.raises(FileNotFoundError, match=f"{path}: no embeddings table"):
        read_embedding_table(path)
    pq.write_table(pa.table({"utterance_id": ["a"], "speaker_id": ["s"]}), path)
    with pytest.raises(ValueError, match=rf"{path}: not an embeddings table, missing column\(s\) \['corpus', 'embedding'"):
        read_embedding_table(path)
    table = embedded_rows(1, 2).table()
    table = table.set_column(3, "embedding", pa.array([[0.1, 0.2], None], pa.list_(pa.float32())))
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=f"{path}: embeddings must be non-null"):
        read_embedding_table(path)


def test_speakers_of_different_corpora_are_different_people():
    embedded = embedded_rows(2, 3, corpora=("a", "b"))
    assert embedded.speaker_keys()[:3] == ["a/s0"] * 3 and len(set(embedded.speaker_keys())) == 4
    assert evaluate_embedded(embedded).n_speakers == 4
    assert embedded_rows(2, 3).speaker_keys() == ["s0"] * 3 + ["s1"] * 3


def test_evaluate_embedded_pairs_different_texts():
    texts = ["one", "two", "three", "four"] * 3  # speaker s_k reads the same 4 prompts
    report = evaluate_embedded(embedded_rows(3, 4, texts=texts))
    assert report.n_target == 3 * 6 and report.n_nontarget == 66 - 18 - 3 * 4  # same-prompt pairs across speakers left out


def test_manifest_rows(tmp_path, demo_dir):
    from spkenc.corpus import scan_corpus

    scan = scan_corpus(demo_dir, layout="speaker_folders", corpus="demo_tiny")
    manifest = scan.write(tmp_path / "manifest.parquet", tmp_path / "rejects.parquet")
    heldout = manifest_rows([manifest])
    assert heldout and {r["speaker_id"] for r in heldout} == set(scan.speakers_in("heldout"))
    assert len(manifest_rows([manifest], split=None)) == 192
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing.parquet'}: no corpus manifest"):
        manifest_rows([tmp_path / "missing.parquet"])


def test_report_json_and_plots(tmp_path):
    embedded = embedded_rows(3, 3)  # under 10 points: the UMAP plot falls back to PCA (test_plots covers UMAP)
    report = evaluate_embedded(embedded, EvalConfig(p_target_high=0.1))
    path = write_report_json(report, tmp_path / "r" / "report.json")
    assert json.loads(path.read_text()) == report.summary() and "min_dcf_0.1" in report.summary()
    plots = write_report_plots(report, embedded, tmp_path / "plots")
    assert sorted(plots) == ["det_curve", "score_histograms", "similarity_matrix", "umap"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.values())
    assert not [p for p in (tmp_path / "r").iterdir() if p.name != "report.json"]  # no temporary file left


def test_evaluate_corpus_skips_unreadable_files(tmp_path, demo_dir):
    import resemblyzer

    from spkenc.verification import evaluate_corpus

    root = tmp_path / "corpus"
    for speaker in ("so0006", "so0048"):
        shutil.copytree(demo_dir / speaker, root / speaker)
    (root / "so0048" / "empty.wav").write_bytes(b"")
    report, embedded = evaluate_corpus(root, Path(resemblyzer.__file__).parent / "pretrained.pt", layout="speaker_folders",
                                       config=EvalConfig(rate=1.3), device="cpu")
    assert (report.n_speakers, report.n_utterances, report.n_target) == (2, 16, 56)
    assert [f["path"] for f in embedded.failures] == [str(root / "so0048" / "empty.wav")]
    assert report.eer < 0.2


def test_speaker_similarity_matrix():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((9, 8)))
    names, m = speaker_similarity_matrix(x, list("bbbaaaccc"))
    assert names == ["a", "b", "c"] and m.shape == (3, 3)
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    ca, cb = unit[3:6].mean(0), unit[0:3].mean(0)
    assert m[0, 1] == pytest.approx(ca @ cb / np.linalg.norm(ca) / np.linalg.norm(cb))
