"""RTVC-format checkpoints: atomic writes, loads that can carry no code, strict encoder loading.

A checkpoint is a `torch.save` dict that RTVC and Resemblyzer load unchanged:

- `step` (int) and `model_state`: RTVC's key names, `similarity_weight` and
  `similarity_bias` first (RTVC registers them before its submodules), then `lstm.*`, `linear.*`;
- `optimizer_state`: an optimizer built over `rtvc_parameters(encoder, loss)`, the order of
  RTVC's `model.parameters()`, so RTVC's `optimizer.load_state_dict` accepts it;
- spkenc's own keys: `spkenc_format_version`, `audio_config`, `model_config`, `train_config`
  (plain dicts, or None when unknown) and whatever `extra` holds (`rng_state`, `sampler_state`...).

Every value is a tensor, dict, list, tuple, str, int, float, bool or None, so the file loads
with `torch.load(weights_only=True)`, which is the only way this module reads checkpoints.
"""

import dataclasses
import logging
import os
import pickle
import secrets
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from spkenc.ge2e import GE2ELoss
from spkenc.model import SpeakerEncoder, infer_model_config
from spkenc.pool import remove_dead_writer_temps

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOSS_KEYS = ("similarity_weight", "similarity_bias")
CONFIG_KEYS = ("audio_config", "model_config", "train_config")
_CORE_KEYS = ("step", "model_state", "optimizer_state", "spkenc_format_version", *CONFIG_KEYS)
_PLAIN_SCALARS = (str, int, float, bool, type(None))

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, carrying code, or mismatched keys.

    The message starts with the file (or `<checkpoint dict>`) and says why.
    """


def rtvc_parameters(encoder: SpeakerEncoder, loss: GE2ELoss) -> list[nn.Parameter]:
    """The parameters in the order of RTVC's `model.parameters()`: w, b, the 4 * n_layers LSTM
    tensors, linear.weight, linear.bias. Build the optimizer over this list so that RTVC can
    `optimizer.load_state_dict` the `optimizer_state` this module saves.

    >>> from spkenc.config import ModelConfig
    >>> len(rtvc_parameters(SpeakerEncoder(ModelConfig(8, 3, 4), n_mels=5), GE2ELoss()))
    16
    """
    return [loss.similarity_weight, loss.similarity_bias, *encoder.lstm.parameters(), *encoder.linear.parameters()]


def checkpoint_state(
    encoder: SpeakerEncoder,
    loss: Optional[GE2ELoss] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    step: int = 0,
    configs: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The checkpoint dict that `save_checkpoint` writes (tensors copied to the CPU).

    `configs` maps `audio_config` / `model_config` / `train_config` to a config dataclass or a
    plain dict; `model_config` always records the encoder's actual shape, and a given one that
    differs is a ValueError. Without `loss`, w and b are written with RTVC's initial values
    (10, -5) so that RTVC, which loads strictly, still accepts the file. `extra` adds keys;
    NumPy arrays become tensors, NumPy scalars Python numbers, paths strings. A value of any
    other type is a ValueError naming its key.
    """
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown checkpoint config key(s) {unknown}; known: {list(CONFIG_KEYS)}")
    clashes = sorted(set(extra or {}) & set(_CORE_KEYS))
    if clashes:
        raise ValueError(f"checkpoint extra key(s) {clashes} would overwrite spkenc's own keys")
    actual_model = encoder.config.to_dict()
    given_model = configs.get("model_config")
    if given_model is not None and _to_plain(given_model, "model_config") != actual_model:
        raise ValueError(f"model_config {_to_plain(given_model, 'model_config')} does not match the encoder's {actual_model}")
    if loss is None:
        loss = GE2ELoss()
    elif optimizer is not None and _optimized(optimizer) != [id(p) for p in rtvc_parameters(encoder, loss)]:
        log.warning("the optimizer is not over rtvc_parameters(encoder, loss): RTVC cannot load its optimizer_state")
    state = {
        "step": int(step),
        "model_state": {**loss.state_dict(), **encoder.state_dict()},
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "spkenc_format_version": FORMAT_VERSION,
        "audio_config": configs.get("audio_config"),
        "model_config": actual_model,
        "train_config": configs.get("train_config"),
        **(extra or {}),
    }
    return {key: _to_plain(value, key) for key, value in state.items()}


def save_checkpoint(
    path: PathLike,
    encoder: SpeakerEncoder,
    loss: Optional[GE2ELoss] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    step: int = 0,
    configs: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write an RTVC-format checkpoint (see `checkpoint_state`) atomically; return its path.

    The dict goes to a temporary file in the same folder, which is flushed and fsynced, then
    renamed over `path` (`os.replace`), and the folder is fsynced. A failed write (disk full,
    I/O error) raises OSError naming `path`, removes the temporary file and leaves the
    previous checkpoint, if any, unchanged; a killed process leaves the old file or the new one.
    """
    path = Path(path)
    state = checkpoint_state(encoder, loss, optimizer, step, configs, extra)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writer_temps(path.parent, f"{path.name}.")
        # O_EXCL on a random name, as mkstemp does, but with the umask's file mode, not 0600
        temp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException as error:
        temp_name.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise
    if os.name == "posix":
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    log.debug("wrote checkpoint %s (step %d)", path, state["step"])
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `torch.load(weights_only=True)`: no code in it can run.

    Raises CheckpointError naming the file when it is missing, truncated or corrupt, refused
    because it holds code or Python objects that are not plain weights, has no
    `model_state` dict, or comes from a newer spkenc format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickling_detail(str(error))
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"{path}: refused: it contains code or Python objects that are not plain weights ({detail}); "
                "nothing in it was run. Only tensors, dicts, lists, strings and numbers are accepted"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint, corrupt or not plain weights ({detail})") from None
    except Exception as error:  # a damaged file fails anywhere in torch's reader, in many ways
        reason = f"{type(error).__name__}: {_first_sentence(str(error))}" if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({reason})") from None
    _check_layout(state, str(path))
    return state


def load_encoder(
    checkpoint: Union[PathLike, Mapping[str, Any]],
    device: Union[str, torch.device, None] = None,
) -> tuple[SpeakerEncoder, dict[str, Any]]:
    """A SpeakerEncoder from a checkpoint file or dict, loaded strictly, and an info dict.

    The model's shape comes from the tensors (RTVC and Resemblyzer checkpoints store no
    config). Only `similarity_weight` / `similarity_bias` may be left over: they belong to
    GE2ELoss, are skipped, and are named in a log message. Any other missing or unexpected
    key, or a tensor of the wrong shape, is a CheckpointError listing them.

    info: `source`, `step` (None if absent), `spkenc_format_version`, `audio_config`,
    `train_config` (stored plain dicts, None in RTVC files), `model_config` (the encoder's,
    a plain dict), `n_mels`, and `skipped` ({key: float value} of w and b).
    """
    state, source = _as_checkpoint(checkpoint)
    model_state = state["model_state"]
    encoder_state = {key: value for key, value in model_state.items() if key not in LOSS_KEYS}
    try:
        config, n_mels = infer_model_config(encoder_state)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    stored = state.get("model_config")
    if stored is not None and stored != config.to_dict():
        raise CheckpointError(f"{source}: stored model_config {stored} does not match the tensors' shape {config.to_dict()}")
    encoder = SpeakerEncoder(config, n_mels=n_mels, device=device)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(encoder_state)), sorted(set(encoder_state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: encoder keys do not match: missing {missing}, unexpected {unexpected}")
    try:
        encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: {error}") from None
    skipped = {key: float(model_state[key].reshape(-1)[0]) for key in LOSS_KEYS if key in model_state}
    if skipped:
        log.info("%s: skipped the GE2E loss parameters %s (not part of the encoder)", source,
                 ", ".join(f"{key}={value:g}" for key, value in skipped.items()))
    info = {
        "source": source,
        "step": int(state["step"]) if state.get("step") is not None else None,
        "spkenc_format_version": state.get("spkenc_format_version"),
        "audio_config": state.get("audio_config"),
        "model_config": config.to_dict(),
        "train_config": state.get("train_config"),
        "n_mels": n_mels,
        "skipped": skipped,
    }
    return encoder, info


def load_loss_state(checkpoint: Union[PathLike, Mapping[str, Any]], loss: GE2ELoss) -> None:
    """Copy the checkpoint's `similarity_weight` / `similarity_bias` into `loss` (fine-tune, resume).

    The values land on the loss's own device; a missing or misshapen one is a CheckpointError.
    """
    state, source = _as_checkpoint(checkpoint)
    model_state = state["model_state"]
    missing = [key for key in LOSS_KEYS if key not in model_state]
    if missing:
        raise CheckpointError(f"{source}: no GE2E loss parameters {missing} in model_state")
    try:
        loss.load_state_dict({key: model_state[key] for key in LOSS_KEYS}, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: {error}") from None


def _optimized(optimizer: torch.optim.Optimizer) -> list[int]:
    return [id(param) for group in optimizer.param_groups for param in group["params"]]


def _write_error(path: Path, error: OSError) -> OSError:
    reason = error.strerror or str(error)
    return OSError(error.errno, f"could not write checkpoint {path} ({reason}); the previous file, if any, is unchanged")


def _as_checkpoint(checkpoint: Union[PathLike, Mapping[str, Any]]) -> tuple[Mapping[str, Any], str]:
    if isinstance(checkpoint, Mapping):
        _check_layout(checkpoint, "<checkpoint dict>")
        return checkpoint, "<checkpoint dict>"
    return load_checkpoint(checkpoint), str(checkpoint)


def _check_layout(state: Any, source: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a checkpoint: holds a {type(state).__name__}, not a dict")
    model_state = state.get("model_state")
    if not isinstance(model_state, Mapping):
        raise CheckpointError(f"{source}: not a checkpoint: no model_state dict (keys: {sorted(map(str, state))})")
    not_tensors = sorted(key for key, value in model_state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: model_state entries {not_tensors} are not tensors")
    version = state.get("spkenc_format_version")
    if version is not None and (not isinstance(version, int) or version > FORMAT_VERSION):
        raise CheckpointError(f"{source}: spkenc checkpoint format {version!r}; this spkenc reads up to {FORMAT_VERSION}")


def _unpickling_detail(message: str) -> str:
    """The informative line of torch's weights_only error (it buries it in advice)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return _first_sentence(line)
    return _first_sentence(lines[-1]) if lines else "unpickling failed"


def _first_sentence(text: str) -> str:
    """The first line up to its first full stop: torch's errors append long advice.

    >>> _first_sentence("Bad file. Try again. Or not.")
    'Bad file'
    """
    return text.strip().splitlines()[0].split(". ")[0].rstrip(".")


def _to_plain(value: Any, where: str) -> Any:
    """`value` as types that torch.load(weights_only=True) accepts, tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_plain(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        return {key: _to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ValueError(
        f"checkpoint value {where} is a {type(value).__name__}: only tensors, arrays, dicts, lists, tuples, "
        "str, int, float, bool and None can be saved"
    )


def export_checkpoint(source: PathLike, destination: PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the inference part of checkpoint `source` to `destination`: weights, w and b, step
    and configs, without the optimizer state, RNG state and loss history (a third of the size).
    `extra` adds keys (e.g. provenance). The result still loads in RTVC and Resemblyzer."""
    state = load_checkpoint(source)
    encoder, _ = load_encoder(state)
    loss = GE2ELoss()
    if "similarity_weight" in state["model_state"]:
        load_loss_state(state, loss)
    configs = {k: state[k] for k in CONFIG_KEYS if state.get(k) is not None and k != "model_config"}
    return save_checkpoint(destination, encoder, loss=loss, step=int(state["step"]), configs=configs, extra=extra)
