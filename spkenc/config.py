"""One home for every number: frozen dataclasses whose defaults are RTVC's values.

Each field name is the one word used for that idea everywhere: the Dagster config field,
the MLflow param and the checkpoint key.

>>> AudioConfig().n_fft, AudioConfig().hop_length
(400, 160)
>>> ModelConfig.from_dict({"hidden_size": 64}).hidden_size
64
>>> ModelConfig.from_dict({"hidden": 64})
Traceback (most recent call last):
...
ValueError: ModelConfig: unknown key(s) ['hidden']; known keys: ['hidden_size', 'n_layers', 'embedding_size']
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, TypeVar

T = TypeVar("T", bound="_Config")


class _Config:
    """Mixin: strict construction from a mapping and a plain-dict view."""

    @classmethod
    def from_dict(cls: type[T], values: Optional[Mapping[str, Any]] = None) -> T:
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {known}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: T, **changes: Any) -> T:
        return type(self).from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class AudioConfig(_Config):
    """Audio front end: resampling, volume, VAD trimming and mel frames (RTVC's params.py)."""

    sample_rate_hz: int = 16000
    mel_window_length_ms: int = 25
    mel_window_step_ms: int = 10
    n_mels: int = 40
    partial_n_frames: int = 160
    vad_window_length_ms: int = 30
    vad_moving_average_width: int = 8
    vad_max_silence_length: int = 6
    vad_mode: int = 3
    audio_norm_target_dbfs: float = -30.0

    def __post_init__(self) -> None:
        if self.sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be positive, got {self.sample_rate_hz}")
        if self.vad_window_length_ms not in (10, 20, 30):
            raise ValueError(f"vad_window_length_ms must be 10, 20 or 30, got {self.vad_window_length_ms}")
        if self.sample_rate_hz not in (8000, 16000, 32000, 48000):
            raise ValueError(f"webrtcvad needs 8, 16, 32 or 48 kHz, got {self.sample_rate_hz}")

    @property
    def n_fft(self) -> int:
        """Samples per mel window (400 at 16 kHz)."""
        return self.sample_rate_hz * self.mel_window_length_ms // 1000

    @property
    def hop_length(self) -> int:
        """Samples between mel frames (160 at 16 kHz)."""
        return self.sample_rate_hz * self.mel_window_step_ms // 1000

    @property
    def vad_window_samples(self) -> int:
        """Samples per VAD window (480 at 16 kHz)."""
        return self.vad_window_length_ms * self.sample_rate_hz // 1000

    @property
    def min_utterance_s(self) -> float:
        """Shortest trimmed utterance that still yields one partial (1.6 s)."""
        return self.partial_n_frames * self.mel_window_step_ms / 1000


@dataclass(frozen=True)
class ModelConfig(_Config):
    """The speaker encoder: a 3-layer LSTM over 40 mels, then Linear + ReLU + L2 norm."""

    hidden_size: int = 256
    n_layers: int = 3
    embedding_size: int = 256


@dataclass(frozen=True)
class TrainConfig(_Config):
    """GE2E training (RTVC's recipe). `lr_schedule` is "constant", "cosine" or "step"."""

    speakers_per_batch: int = 64
    utterances_per_speaker: int = 10
    learning_rate_init: float = 1e-4
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 100_000
    lr_decay_gamma: float = 0.5
    w_init: float = 10.0
    b_init: float = -5.0
    wb_grad_scale: float = 0.01
    clip_grad_norm: float = 3.0
    steps: int = 1000
    save_every: int = 100
    backup_every: int = 1000
    seed: int = 0
    short_speaker_policy: str = "exclude"
    bf16: bool = False
    log_every: int = 10  # RTVC's vis_every: metrics go to the tracker every this many steps
    umap_every: int = 100  # RTVC's umap_every: UMAP of the held-out probe set
    n_probe_speakers: int = 10
    n_probe_utterances: int = 10
    crop_n_frames: int = 0  # training crop length in frames; 0 = AudioConfig.partial_n_frames (160)
    aug_volume_db: float = 0.0  # spkenc.augment: gain uniform in +-this many dB
    aug_speed: float = 0.0  # speed factor uniform in [1 - x, 1 + x]
    aug_noise_prob: float = 0.0  # share of crops mixed with another training speaker's recording
    aug_noise_snr_db_min: float = 10.0
    aug_noise_snr_db_max: float = 30.0
    # Masking (SpecAugment, Park et al. 2019): per crop, one band of 0..aug_freq_mask mel channels
    # and one span of 0..aug_time_mask frames are set to zero power. It hides part of the input
    # without changing whose voice it is, unlike babble or a per-crop speed change.
    aug_freq_mask: int = 0
    aug_time_mask: int = 0
    # Speaker augmentation: every training speaker also enters the draw as a new speaker played
    # at each of these speed factors (tempo and pitch), as in Yamamoto et al., Interspeech 2019.
    speaker_speeds: tuple[float, ...] = ()
    # Each batch draws its speakers from one corpus (chosen in proportion to its speakers), filling
    # up from the others only when that corpus has too few: negatives from the same recording
    # conditions are the hard ones. False is RTVC's draw over all corpora together.
    single_corpus_batches: bool = False
    # Corpus name -> weight of its speakers in the draw (unnamed corpora weigh 1). With
    # single-corpus batches a corpus is picked with probability proportional to weight x speakers;
    # in mixed batches each of its speakers is `weight` times as likely to be drawn. {} is RTVC's draw.
    corpus_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # Regularization against memorizing few training speakers (not in RTVC). `weight_decay` is
    # decoupled (AdamW, Loshchilov & Hutter 2019): after each Adam step the encoder's weight
    # matrices are multiplied by 1 - lr x weight_decay; biases and the loss's w and b are not decayed, and the
    # optimizer stays RTVC's Adam. `lstm_dropout` is nn.LSTM's dropout between its layers, active
    # in training only. Neither changes the checkpoint's format.
    weight_decay: float = 0.0
    lstm_dropout: float = 0.0
    # The mels are linear power (median about 2e-4, 99th percentile about 2), and Resemblyzer's
    # trained encoder meets them with first-layer input weights 14x larger in mean magnitude than
    # at initialization (0.45 against 0.031). Adam moves a weight by about one learning rate per
    # step whatever its gradient, so from scratch they hardly grow. This multiplies Adam's step on
    # `lstm.weight_ih_l0` alone (1.0 = RTVC); the optimizer state keeps RTVC's layout.
    input_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"lr_schedule must be constant, cosine or step, got {self.lr_schedule!r}")
        if self.short_speaker_policy not in ("exclude", "repeat"):
            raise ValueError(
                f"short_speaker_policy must be exclude or repeat, got {self.short_speaker_policy!r}"
            )
        if self.speakers_per_batch < 2 or self.utterances_per_speaker < 2:
            raise ValueError(
                "GE2E needs at least 2 speakers x 2 utterances per batch, got "
                f"{self.speakers_per_batch} x {self.utterances_per_speaker}"
            )
        for name in ("save_every", "backup_every", "log_every", "umap_every", "lr_decay_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.crop_n_frames < 0 or self.aug_volume_db < 0 or not 0 <= self.aug_speed < 0.5:
            raise ValueError(
                f"crop_n_frames and aug_volume_db must be non-negative and aug_speed in [0, 0.5), got "
                f"{self.crop_n_frames}, {self.aug_volume_db}, {self.aug_speed}"
            )
        if not 0 <= self.aug_freq_mask < 40 or self.aug_time_mask < 0:
            raise ValueError(
                f"aug_freq_mask must be in [0, 40) mel channels and aug_time_mask non-negative, got "
                f"{self.aug_freq_mask}, {self.aug_time_mask}"
            )
        if not 0 <= self.aug_noise_prob <= 1 or self.aug_noise_snr_db_min > self.aug_noise_snr_db_max:
            raise ValueError(
                f"aug_noise_prob must be in [0, 1] and aug_noise_snr_db_min <= aug_noise_snr_db_max, got "
                f"{self.aug_noise_prob}, {self.aug_noise_snr_db_min}, {self.aug_noise_snr_db_max}"
            )
        speeds = tuple(float(f) for f in self.speaker_speeds)
        object.__setattr__(self, "speaker_speeds", speeds)  # lists from Dagster, YAML and checkpoints
        if any(not 0.5 <= f <= 1.5 or f == 1.0 for f in speeds) or len(set(speeds)) < len(speeds):
            raise ValueError(f"speaker_speeds must be distinct factors in [0.5, 1.5] other than 1.0, got {list(speeds)}")
        weights = {str(k): float(v) for k, v in dict(self.corpus_weights).items()}
        object.__setattr__(self, "corpus_weights", weights)
        if any(not (0 < w < float("inf")) for w in weights.values()):
            raise ValueError(f"corpus_weights must be positive and finite, got {weights}")
        if not (0 <= self.weight_decay and self.learning_rate_init * self.weight_decay < 1):
            raise ValueError(
                f"weight_decay must be non-negative with learning_rate_init x weight_decay below 1 (the per-step "
                f"shrink factor), got {self.weight_decay} at learning rate {self.learning_rate_init}"
            )
        if not 0 < self.input_lr_scale < float("inf"):
            raise ValueError(f"input_lr_scale must be positive and finite, got {self.input_lr_scale}")
        if not 0 <= self.lstm_dropout < 1:
            raise ValueError(f"lstm_dropout must be in [0, 1), got {self.lstm_dropout}")
        if self.steps < 0 or self.seed < 0:
            raise ValueError(f"steps and seed must be non-negative, got steps={self.steps}, seed={self.seed}")


@dataclass(frozen=True)
class EvalConfig(_Config):
    """Verification trials and scoring."""

    max_trials: int = 0  # 0 means all cross pairs
    trial_seed: int = 0
    p_target_low: float = 0.01
    p_target_high: float = 0.05
    eer_ceiling: float = 0.5
    rate: Optional[float] = None  # None: RTVC partial slicing; a float: Resemblyzer's rate rule
    min_coverage: float = 0.75


@dataclass(frozen=True)
class DataConfig(_Config):
    """Corpus split and preprocessing outputs (the data pipeline's knobs beyond the audio front end).

    `heldout_fraction`: share of a corpus's speakers held out for evaluation, chosen by a stable
    hash of (corpus, speaker). `max_segment_s`: a recording longer than this is cut into equal
    segments of at most this length, each preprocessed on its own, so memory stays bounded
    (RTVC's corpora have no utterance this long). `mel_dtype`: float32 or float16 mel shards.
    """

    heldout_fraction: float = 0.2
    max_segment_s: float = 120.0
    mel_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {self.heldout_fraction}")
        if self.max_segment_s < 10.0:
            raise ValueError(f"max_segment_s must be at least 10 s, got {self.max_segment_s}")
        if self.mel_dtype not in ("float32", "float16"):
            raise ValueError(f"mel_dtype must be float32 or float16, got {self.mel_dtype!r}")
