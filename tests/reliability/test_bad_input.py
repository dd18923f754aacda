"""Issue 7, part 1: every bad-input case through the three entry points.

One corpus (tests/reliability/conftest.py) holds each bad case next to good real speech. It
goes once through a real `dagster asset materialize` of raw_corpus, trimmed_wavs and
mel_shards, once through `spkenc preprocess` and once through `spkenc embed`. Per case: a
bad file is a named reject (or an error row), a good one is processed, and no partial file is
left behind.
"""

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import resemblyzer
from hostile_corpus import CASES, REPO, assert_outputs_open, child_env, find_reject, leftovers, spkenc_cli

from spkenc.shards import read_shard

CKPT = Path(resemblyzer.__file__).parent / "pretrained.pt"
CORPUS = "hostile"
SCAN_ONLY = {"symlink_loop", "folder_named_like_audio"}  # folders: never a file to embed


def _run(command: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def dagster_run(bad_corpus, tmp_path_factory) -> dict:
    """raw_corpus, trimmed_wavs and mel_shards materialized by the dagster CLI on the corpus."""
    root, _ = bad_corpus
    base = tmp_path_factory.mktemp("dagster")
    registry = base / "corpora.yaml"
    registry.write_text(f'corpora:\n  {CORPUS}:\n    root: "{root}"\n    layout: speaker_folders\n')
    env = child_env(DAGSTER_HOME=str(base / "home"), SPKENC_WORK_DIR=str(base / "work"), SPKENC_CORPORA=str(registry))
    (base / "home").mkdir()
    _run([sys.executable, "-m", "pipelines.corpora", "sync"], env)
    _run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "pipelines.definitions",
          "--select", "raw_corpus,trimmed_wavs,mel_shards", "--partition", CORPUS], env)
    work = base / "work"
    rejects = [r for stage in ("scan", "trim", "mel") for r in pq.read_table(work / "rejects" / CORPUS / f"{stage}.parquet").to_pylist()]
    return {"work": work, "rejects": rejects, "trimmed": work / "trimmed" / CORPUS, "mels": work / "mels" / CORPUS}


@pytest.fixture(scope="module")
def cli_run(bad_corpus, tmp_path_factory) -> dict:
    """`spkenc preprocess` on the corpus, two workers."""
    root, _ = bad_corpus
    out = tmp_path_factory.mktemp("preprocess") / "out"
    done = _run(spkenc_cli("preprocess", str(root), str(out), "--layout", "speaker_folders", "--workers", "2"), child_env())
    return {"work": out, "rejects": pq.read_table(out / "rejects.parquet").to_pylist(), "trimmed": out / "trimmed",
            "mels": out / "mels", "log": done.stderr}


@pytest.fixture(scope="module")
def embed_run(bad_corpus, tmp_path_factory) -> dict[str, dict]:
    """`spkenc embed` on the whole corpus folder with RTVC's pretrained weights."""
    root, _ = bad_corpus
    output = tmp_path_factory.mktemp("embed") / "embeddings.parquet"
    done = _run(spkenc_cli("embed", str(root), "--checkpoint", str(CKPT), "--output", str(output), "--device", "cpu"),
                child_env())
    rows = pq.read_table(output).to_pylist()
    assert leftovers(output.parent) == []
    return {"rows": {r["path"]: r for r in rows}, "log": done.stderr}


def _trim_index(run: dict) -> dict[str, dict]:
    return {e["source"]: e for e in pq.read_table(run["trimmed"] / ".index.parquet").to_pylist()}


def _check_pipeline_case(run: dict, root: Path, case) -> None:
    source = str(root / case.path)
    reject = find_reject(run["rejects"], root, case)
    if not case.good:
        assert reject is not None, f"{case.name}: no reject for {source}"
        assert reject["stage"] == case.stage and case.reason in reject["reason"], reject
        return
    assert reject is None, f"{case.name}: a good file was rejected: {reject}"
    entry = _trim_index(run)[source]
    assert entry["reason"] is None and entry["outputs"], entry
    speaker = case.path.split("/")[0]
    shard = read_shard(run["mels"] / f"{speaker}.parquet")
    assert set(entry["outputs"]) <= set(shard.utterance_ids)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dagster_materialization_rejects_bad_and_keeps_good(dagster_run, bad_corpus, case):
    _check_pipeline_case(dagster_run, bad_corpus[0], case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_spkenc_preprocess_rejects_bad_and_keeps_good(cli_run, bad_corpus, case):
    _check_pipeline_case(cli_run, bad_corpus[0], case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_spkenc_embed_reports_bad_and_embeds_good(embed_run, bad_corpus, case):
    root, _ = bad_corpus
    rows = embed_run["rows"]
    path = str(root / case.path)
    if case.name in SCAN_ONLY:
        # a folder gets no row of its own: it is searched (folder.wav/inner.flac is a good case),
        # and a folder symlink is not followed, so a loop cannot repeat files
        assert path not in rows
        if case.name == "symlink_loop":
            assert not [p for p in rows if p.startswith(path + "/")]
        return
    row = rows[path]
    if case.good:
        assert row["error"] is None and len(row["embedding"]) == 256 and row["n_partials"] >= 1, row
    else:
        # embed trims silence as the pipeline does; it words "empty after trimming" its own way
        reason = "no speech left after silence trimming" if case.reason == "empty after trimming" else case.reason
        assert row["embedding"] is None and row["error"].startswith(f"{path}: ") and reason in row["error"], row
        assert path in embed_run["log"]  # the CLI names every failed file


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["dagster", "preprocess"])
def test_every_good_demo_file_is_processed_and_no_partial_file_is_left(entry, dagster_run, cli_run, bad_corpus, demo_files):
    run = dagster_run if entry == "dagster" else cli_run
    root, _ = bad_corpus
    index = _trim_index(run)
    demo_sources = [p for p in map(str, root.glob("so*/*.flac"))]
    assert len(demo_sources) >= 24
    for source in demo_sources:
        # demo files are real speech: trimmed, or (4 of 192 demo files) under the 1.6 s minimum
        assert index[source]["reason"] in (None, "under 1.6 s of speech"), index[source]
    kept = [s for s in demo_sources if index[s]["reason"] is None]
    assert len(kept) >= 0.8 * len(demo_sources)
    assert leftovers(run["work"]) == []
    assert assert_outputs_open(run["work"]) > len(kept)


def test_embed_rows_match_the_files_and_good_demo_files_all_embed(embed_run, bad_corpus):
    root, _ = bad_corpus
    rows = embed_run["rows"]
    for path in map(str, root.glob("so*/*.flac")):
        assert rows[path]["error"] is None and len(rows[path]["embedding"]) == 256
    assert not any("/loop/" in p for p in rows)
