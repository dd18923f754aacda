"""Where the pipeline keeps its files: the `SpkencPaths` resource.

`work_dir` is env `SPKENC_WORK_DIR`, default `<project root>/work`. Under it:
`corpora/<corpus>/manifest.parquet`, `rejects/<corpus>/<stage>.parquet`,
`trimmed/<corpus>/<speaker>/<utt>.wav`, `mels/<corpus>/<speaker>.parquet`,
`models/<run_name>/encoder.pt` and `eval/...`. The corpus registry is env `SPKENC_CORPORA`,
default `<project root>/corpora.yaml`.
"""

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_work_dir() -> Path:
    """`SPKENC_WORK_DIR`, else `<project root>/work`, as an absolute path."""
    return Path(os.environ.get("SPKENC_WORK_DIR") or PROJECT_ROOT / "work").resolve()


class SpkencPaths(dg.ConfigurableResource):
    """Paths of every pipeline output. Empty fields mean the environment defaults above."""

    work_dir: str = Field(default="", description="work folder; '' = $SPKENC_WORK_DIR or <project root>/work")
    corpora_file: str = Field(default="", description="corpus registry YAML; '' = $SPKENC_CORPORA or <project root>/corpora.yaml")

    @property
    def root(self) -> Path:
        return Path(self.work_dir).resolve() if self.work_dir else default_work_dir()

    def registry_path(self) -> Path:
        from spkenc.corpus import default_registry_path

        return Path(self.corpora_file).resolve() if self.corpora_file else default_registry_path()

    def manifest_path(self, corpus: str) -> Path:
        return self.root / "corpora" / corpus / "manifest.parquet"

    def rejects_path(self, corpus: str, stage: str) -> Path:
        return self.root / "rejects" / corpus / f"{stage}.parquet"

    def trimmed_dir(self, corpus: str) -> Path:
        return self.root / "trimmed" / corpus

    def mels_dir(self, corpus: str) -> Path:
        return self.root / "mels" / corpus

    def model_dir(self, run_name: str) -> Path:
        return self.root / "models" / run_name

    def eval_dir(self) -> Path:
        return self.root / "eval"
