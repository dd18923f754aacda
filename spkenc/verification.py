"""Corpus-level verification: embed a corpus's utterances, evaluate them, write the report.

`evaluate_corpus` is what `spkenc evaluate` runs; the `evaluation_embeddings` and
`verification_report` assets call `manifest_rows`, `embed_manifest`, `write_embedding_table`,
`read_embedding_table`, `evaluate_embedded`, `write_report_json` and `write_report_plots`.
The metrics themselves live in `spkenc.evaluation`.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from spkenc.config import EvalConfig
from spkenc.evaluation import VerificationReport, evaluate_embeddings, unit_rows

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

EMBEDDINGS_SCHEMA = pa.schema([
    ("utterance_id", pa.string()),
    ("speaker_id", pa.string()),
    ("corpus", pa.string()),
    ("embedding", pa.list_(pa.float32())),
    ("path", pa.string()),
    ("text", pa.string()),  # null where the text is unknown
])
_META_PREFIX = "spkenc."

__all__ = [
    "EMBEDDINGS_SCHEMA", "EmbeddedUtterances", "embed_manifest", "evaluate_corpus", "evaluate_embedded",
    "manifest_rows", "read_embedding_table", "speaker_similarity_matrix", "write_embedding_table", "write_report_json",
    "write_report_plots",
]


@dataclass(frozen=True)
class EmbeddedUtterances:
    """Row-aligned utterance embeddings: (n, E) float32 L2-normed `embeddings` and, per row,
    utterance id, speaker id, corpus, source path and text (None when unknown). `failures`
    lists the files that gave no embedding as {"path", "reason"} dicts."""

    utterance_ids: list[str]
    speaker_ids: list[str]
    corpora: list[str]
    paths: list[str]
    texts: list[Optional[str]]
    embeddings: np.ndarray
    failures: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.utterance_ids)

    def speaker_keys(self) -> list[str]:
        """Speaker ids, prefixed with "<corpus>/" when the rows span several corpora (two
        corpora may both have a speaker "19" who are different people)."""
        if len(set(self.corpora)) <= 1:
            return list(self.speaker_ids)
        return [f"{c}/{s}" for c, s in zip(self.corpora, self.speaker_ids)]

    def table(self) -> pa.Table:
        return pa.table({
            "utterance_id": self.utterance_ids, "speaker_id": self.speaker_ids, "corpus": self.corpora,
            "embedding": list(np.asarray(self.embeddings, dtype=np.float32)), "path": self.paths, "text": self.texts,
        }, schema=EMBEDDINGS_SCHEMA)


def embed_manifest(
    embedder: Any, rows: Sequence[Mapping[str, Any]], rate: Optional[float] = None, min_coverage: float = 0.75
) -> EmbeddedUtterances:
    """Preprocess (`spkenc.preprocess_wav`) and embed every manifest row's file.

    `rows` are manifest dicts with path, speaker_id, utterance_id and optionally corpus and
    text. `embedder` is a `spkenc.Embedder`. A file that cannot be read or holds no speech
    becomes a failure and the others go on.
    """
    from spkenc.file_inference import embed_files

    rows = list(rows)
    kept: list[tuple[Mapping[str, Any], np.ndarray]] = []
    failures: list[dict[str, str]] = []
    for row, result in zip(rows, embed_files(embedder, [r["path"] for r in rows], rate=rate, min_coverage=min_coverage)):
        if result.error is not None:
            failures.append({"path": str(row["path"]), "reason": result.error})
        else:
            kept.append((row, result.embedding))
    log.info("%d of %d file(s) embedded, %d failed", len(kept), len(rows), len(failures))
    dim = kept[0][1].shape[0] if kept else 0
    return EmbeddedUtterances(
        utterance_ids=[str(r["utterance_id"]) for r, _ in kept],
        speaker_ids=[str(r["speaker_id"]) for r, _ in kept],
        corpora=[str(r.get("corpus") or "") for r, _ in kept],
        paths=[str(r["path"]) for r, _ in kept],
        texts=[r.get("text") for r, _ in kept],
        embeddings=np.stack([e for _, e in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32),
        failures=failures,
    )


def write_embedding_table(embedded: EmbeddedUtterances, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write `EMBEDDINGS_SCHEMA` Parquet atomically; `metadata` goes into the file's key-value
    metadata under "spkenc.<key>" (e.g. the checkpoint that made the embeddings)."""
    from spkenc.shards import write_table_atomic

    table = embedded.table()
    extra = {f"{_META_PREFIX}{k}".encode(): str(v).encode() for k, v in (metadata or {}).items()}
    return write_table_atomic(table.replace_schema_metadata({**(table.schema.metadata or {}), **extra}), path)


def read_embedding_table(path: PathLike) -> tuple[EmbeddedUtterances, dict[str, str]]:
    """Read what `write_embedding_table` wrote: (embeddings, the "spkenc." metadata without
    its prefix). Raises ValueError naming the file when columns are missing or rows are bad."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no embeddings table (materialize evaluation_embeddings first)")
    table = pq.read_table(path)
    missing = sorted(set(EMBEDDINGS_SCHEMA.names) - set(table.column_names))
    if missing:
        raise ValueError(f"{path}: not an embeddings table, missing column(s) {missing}")
    embeddings = table.column("embedding").to_pylist()
    if any(e is None for e in embeddings) or len({len(e) for e in embeddings}) > 1:
        raise ValueError(f"{path}: embeddings must be non-null and of one length")
    raw = table.schema.metadata or {}
    metadata = {k.decode()[len(_META_PREFIX):]: v.decode() for k, v in raw.items() if k.decode().startswith(_META_PREFIX)}
    column = lambda name: table.column(name).to_pylist()  # noqa: E731
    matrix = np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1)
    return EmbeddedUtterances(column("utterance_id"), column("speaker_id"), column("corpus"), column("path"),
                              column("text"), matrix), metadata


def manifest_rows(manifest_paths: Sequence[PathLike], split: Optional[str] = "heldout") -> list[dict[str, Any]]:
    """The rows of corpus manifests (`spkenc.corpus.MANIFEST_SCHEMA` Parquet) in `split`
    ("heldout", "train", or None for all). Raises FileNotFoundError naming a missing manifest."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in map(Path, manifest_paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no corpus manifest (scan the corpus first: raw_corpus or spkenc preprocess)")
        rows.extend(r for r in pq.read_table(path).to_pylist() if split is None or r.get("split") == split)
    return rows


def evaluate_embedded(embedded: EmbeddedUtterances, config: EvalConfig = EvalConfig()) -> VerificationReport:
    """`spkenc.evaluation.evaluate_embeddings` on embedded utterances (texts used where known)."""
    texts = embedded.texts if any(t is not None for t in embedded.texts) else None
    return evaluate_embeddings(embedded.embeddings, embedded.speaker_keys(), embedded.utterance_ids, texts, config)


def evaluate_corpus(
    root: PathLike,
    checkpoint: PathLike,
    layout: str = "auto",
    config: EvalConfig = EvalConfig(),
    device: Optional[str] = None,
    batch_size: int = 64,
    precision: str = "fp32",
) -> tuple[VerificationReport, EmbeddedUtterances]:
    """Scan `root` in `layout`, embed every file with the `checkpoint`'s encoder
    (config.rate, config.min_coverage; `precision` as in `spkenc.Embedder`) and evaluate all
    of them (config.max_trials trials).

    Scan rejects and files without speech are returned in the embeddings' `failures`.
    Raises FileNotFoundError / ValueError for a bad root or layout, `CheckpointError` for a
    refused checkpoint, and ValueError when too little is left to evaluate.
    """
    from spkenc.corpus import scan_corpus
    from spkenc.inference import Embedder

    scan = scan_corpus(root, layout)
    if not scan.rows:
        raise ValueError(f"{root}: no readable audio files in layout {scan.layout} ({len(scan.rejects)} rejected)")
    embedder = Embedder.from_checkpoint(checkpoint, device=device, batch_size=batch_size, precision=precision)
    embedded = embed_manifest(embedder, scan.rows, rate=config.rate, min_coverage=config.min_coverage)
    failures = [{"path": r["path"], "reason": r["reason"]} for r in scan.rejects] + embedded.failures
    embedded = EmbeddedUtterances(embedded.utterance_ids, embedded.speaker_ids, embedded.corpora, embedded.paths,
                                  embedded.texts, embedded.embeddings, failures)
    if len(embedded) < 2:
        raise ValueError(f"{root}: only {len(embedded)} of {len(scan.rows)} file(s) could be embedded")
    return evaluate_embedded(embedded, config), embedded


def speaker_similarity_matrix(embeddings: np.ndarray, speaker_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(sorted speakers, (S, S) cosine similarity of their centroids).

    A speaker's centroid is the mean of its L2-normed utterance embeddings (GE2E, section 2.1).

    >>> names, m = speaker_similarity_matrix(np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), ["a", "a", "b"])
    >>> names, m.shape, float(m[0, 0].round(6))
    (['a', 'b'], (2, 2), 1.0)
    """
    x = unit_rows(embeddings)
    if len(speaker_ids) != len(x):
        raise ValueError(f"{len(speaker_ids)} speaker ids for {len(x)} embeddings")
    names, codes = np.unique(np.asarray(speaker_ids, dtype=str), return_inverse=True)
    centroids = np.zeros((len(names), x.shape[1]))
    np.add.at(centroids, codes, x)
    centroids = unit_rows(centroids)
    return names.tolist(), np.clip(centroids @ centroids.T, -1.0, 1.0)


def write_report_json(report: VerificationReport, path: PathLike) -> Path:
    """Write `report.summary()` as JSON, atomically (temporary file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report.summary(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_report_plots(report: VerificationReport, embedded: EmbeddedUtterances, out_dir: PathLike) -> dict[str, Path]:
    """The DET curve, score histograms, UMAP and speaker similarity matrix as PNGs in
    `out_dir`: {"det_curve": ..., "score_histograms": ..., "umap": ..., "similarity_matrix": ...}."""
    from spkenc import plots
    from spkenc.evaluation import det_curve

    out_dir = Path(out_dir)
    scores = np.concatenate([report.target_scores, report.nontarget_scores])
    labels = np.concatenate([np.ones(report.n_target, bool), np.zeros(report.n_nontarget, bool)])
    _, far, frr = det_curve(scores, labels)
    speakers = embedded.speaker_keys()
    names, matrix = speaker_similarity_matrix(embedded.embeddings, speakers)
    title = f"{report.n_speakers} speakers, {report.n_utterances} utterances"
    return {
        "det_curve": plots.plot_det_curve(far, frr, out_dir / "det_curve.png", eer=report.eer, title=f"DET curve ({title})"),
        "score_histograms": plots.plot_score_histograms(report.target_scores, report.nontarget_scores,
                                                        out_dir / "score_histograms.png", threshold=report.eer_threshold),
        "umap": plots.plot_umap(embedded.embeddings, speakers, out_dir / "umap.png", title=title),
        "similarity_matrix": plots.plot_similarity_matrix(matrix, names, out_dir / "similarity_matrix.png"),
    }
