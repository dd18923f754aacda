"""spkenc: a GE2E speaker encoder, RTVC-compatible, with a data pipeline around it.

Public API (see README.md for examples). Submodules are imported lazily so that
`import spkenc` stays cheap for the command line.
"""

import importlib
from typing import Any

# name -> submodule that defines it
_EXPORTS = {
    "AudioConfig": "config",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "EvalConfig": "config",
    "load_audio": "audio",
    "preprocess_wav": "audio",
    "normalize_volume": "audio",
    "trim_long_silences": "audio",
    "wav_to_mel": "audio",
    "wav_to_mel_batch": "audio",
    "AudioError": "audio", "AudioInfo": "audio", "read_audio_info": "audio",
    "SpeakerEncoder": "model",
    "GE2ELoss": "ge2e",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "load_encoder": "checkpoint",
    "batch_eer": "ge2e",
    "Embedder": "inference",
    "equal_error_rate": "evaluation", "min_dcf": "evaluation", "evaluate_embeddings": "evaluation", "evaluate_corpus": "verification",
    "train": "training", "TrainProgress": "training", "ShardStore": "sampling", "sample_batch": "sampling",
    "DataConfig": "config", "scan_corpus": "corpus", "load_registry": "corpus", "trim_corpus": "preprocess", "build_mel_shards": "preprocess", "preprocess_corpus": "preprocess", "write_shard": "shards", "read_shard": "shards", "read_shard_meta": "shards", "read_utterances": "shards", "ShardError": "shards",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spkenc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"spkenc.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
