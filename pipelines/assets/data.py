"""The data assets, one partition per registered corpus: raw_corpus -> trimmed_wavs -> mel_shards.

Each asset resolves its paths from `SpkencPaths`, calls one spkenc function and reports
metadata; the files are the asset (no IO manager values).
"""

import base64
import tempfile
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from pipelines.corpora import corpus_partitions
from pipelines.resources import SpkencPaths
from spkenc.config import AudioConfig, DataConfig, TrainConfig

_D = DataConfig()


class RawCorpusConfig(dg.Config):
    heldout_fraction: Optional[float] = Field(default=None, description="share of speakers held out; None = the registry's value (default 0.2)")


class TrimmedWavsConfig(dg.Config):
    workers: Optional[int] = Field(default=None, description="worker processes; None = all cores")
    max_segment_s: float = Field(default=_D.max_segment_s, description="longer recordings are cut into segments of at most this")


class MelShardsConfig(dg.Config):
    workers: Optional[int] = Field(default=None, description="worker processes; None = all cores")
    mel_dtype: str = Field(default=_D.mel_dtype, description="float32 or float16")
    utterances_per_speaker: int = Field(default=TrainConfig().utterances_per_speaker, description="speakers with fewer usable utterances are flagged")


def _histogram_md(durations_s: list[float]) -> dg.MetadataValue:
    from spkenc.plots import plot_duration_histogram

    if not durations_s:
        return dg.MetadataValue.md("_no trimmed utterances_")
    with tempfile.TemporaryDirectory() as folder:
        png = plot_duration_histogram(durations_s, Path(folder) / "durations.png").read_bytes()
    return dg.MetadataValue.md(f"![trimmed durations](data:image/png;base64,{base64.b64encode(png).decode()})")


@dg.asset(partitions_def=corpus_partitions, group_name="data", kinds={"parquet"})
def raw_corpus(context: dg.AssetExecutionContext, config: RawCorpusConfig, paths: SpkencPaths) -> dg.MaterializeResult:
    """Manifest of every audio file of the corpus (header facts, train/heldout split) and the scan rejects."""
    from spkenc.corpus import load_registry

    corpus = context.partition_key
    registry = load_registry(paths.registry_path())
    if corpus not in registry:
        raise dg.Failure(f"corpus {corpus!r} is not in {paths.registry_path()} (registered: {sorted(registry)})")
    scan = registry[corpus].scan(heldout_fraction=config.heldout_fraction)
    manifest = scan.write(paths.manifest_path(corpus), paths.rejects_path(corpus, "scan"))
    return dg.MaterializeResult(metadata={
        "layout": scan.layout,
        "n_files": len(scan.rows),
        "n_speakers": scan.n_speakers,
        "n_train_speakers": len(scan.speakers_in("train")),
        "n_heldout_speakers": len(scan.speakers_in("heldout")),
        "n_rejects": len(scan.rejects),
        "hours": sum(r["duration_s"] for r in scan.rows) / 3600,
        "manifest": dg.MetadataValue.path(str(manifest)),
    })


@dg.asset(partitions_def=corpus_partitions, group_name="data", deps=[raw_corpus], kinds={"wav"})
def trimmed_wavs(context: dg.AssetExecutionContext, config: TrimmedWavsConfig, paths: SpkencPaths) -> dg.MaterializeResult:
    """16 kHz PCM16 wavs: resampled, volume-normalized, long silences trimmed (incremental)."""
    from spkenc.corpus import write_rejects
    from spkenc.preprocess import trim_corpus

    corpus = context.partition_key
    result = trim_corpus(paths.manifest_path(corpus), paths.trimmed_dir(corpus), workers=config.workers,
                         config=AudioConfig(), data_config=DataConfig(max_segment_s=config.max_segment_s))
    rejects = write_rejects(result.rejects, paths.rejects_path(corpus, "trim"))
    return dg.MaterializeResult(metadata={
        "n_kept": result.n_kept,
        "n_rejected": result.n_rejected,
        "n_outputs": result.n_outputs,
        "n_processed": result.n_processed,
        "n_skipped": result.n_skipped,
        "hours_before": result.hours_before,
        "hours_after": result.hours_after,
        "peak_worker_rss_mb": result.peak_worker_rss_mb,
        "duration_histogram": _histogram_md(result.durations_s),
        "folder": dg.MetadataValue.path(str(result.out_dir)),
        "rejects": dg.MetadataValue.path(str(rejects)),
    })


@dg.asset(
    partitions_def=corpus_partitions,
    group_name="data",
    deps=[trimmed_wavs],
    kinds={"parquet"},
    check_specs=[
        dg.AssetCheckSpec("mel_frames_are_finite", asset="mel_shards", description="every mel frame of every shard is finite"),
        dg.AssetCheckSpec("shards_have_full_partial", asset="mel_shards", description="every shard has an utterance of >= 160 frames"),
        dg.AssetCheckSpec("shards_have_enough_utterances", asset="mel_shards", description="speakers with fewer usable utterances than utterances_per_speaker, with their count"),
    ],
)
def mel_shards(context: dg.AssetExecutionContext, config: MelShardsConfig, paths: SpkencPaths) -> dg.MaterializeResult:
    """One Parquet file of 40-channel mel frames per speaker (spkenc.shards format)."""
    from spkenc.corpus import write_rejects
    from spkenc.preprocess import build_mel_shards
    from spkenc.shards import check_shards

    corpus, audio = context.partition_key, AudioConfig()
    result = build_mel_shards(paths.trimmed_dir(corpus), paths.mels_dir(corpus), corpus=corpus,
                              workers=config.workers, config=audio, mel_dtype=config.mel_dtype)
    write_rejects(result.rejects, paths.rejects_path(corpus, "mel"))
    if not result.paths:
        raise dg.Failure(f"corpus {corpus!r}: no usable utterance left for mel shards (see {paths.root / 'rejects' / corpus})")
    report = check_shards(result.paths, audio.partial_n_frames, config.utterances_per_speaker)
    return dg.MaterializeResult(
        metadata={
            "n_speakers": result.n_speakers,
            "n_utterances": result.n_utterances,
            "n_frames": result.n_frames,
            "bytes_on_disk": result.n_bytes,
            "n_written": result.n_written,
            "n_skipped": result.n_skipped,
            "folder": dg.MetadataValue.path(str(result.out_dir)),
        },
        check_results=[
            dg.AssetCheckResult(check_name="mel_frames_are_finite", passed=not report.non_finite,
                                metadata={"shards_with_non_finite_utterances": report.non_finite}),
            dg.AssetCheckResult(check_name="shards_have_full_partial", passed=not report.without_full_partial,
                                metadata={"shards_without_full_partial": report.without_full_partial}),
            dg.AssetCheckResult(check_name="shards_have_enough_utterances", passed=not report.short_speakers,
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"utterances_per_speaker": config.utterances_per_speaker,
                                          "short_speakers": report.short_speakers}),
        ],
    )
