"""Trainer configuration: frozen dataclasses with defaults, overridden by a YAML file and `key=value` pairs.

Overrides are strict: an unknown key is an error, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from stages.overrides import parse_sets, read_yaml, require, with_overrides  # noqa: F401 (parse_sets re-exported)


@dataclass(frozen=True)
class ModelConfig:
    flavour: str = "tiny"  # backbone/decoder pair: tiny, 1B (1B/100M), 3B (3B/250M), 8B (8B/300M)
    backbone: str | None = None  # override one side of the pair by flavour name, e.g. "1B"
    decoder: str | None = None
    num_codebooks: int = 32
    audio_vocab_size: int = 2051  # 2048 codes + specials, as in the released model
    text_vocab_size: int | None = None  # None: the tokenizer's size rounded up to 64
    max_seq_len: int = 2048
    rope_theta: float = 500000.0
    # Llama-3 RoPE scaling as in the released CSM (torchtune llama3_2, scale factor 32); null disables it.
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_from: str | None = None  # transformers-format CSM weights: local dir or hub id (e.g. sesame/csm-1b)


@dataclass(frozen=True)
class DataConfig:
    tokenizer: str = "meta-llama/Llama-3.2-1B"  # hub id or local path (dir or tokenizer.json)
    seq_len: int = 2048
    micro_batch_size: int = 4
    shuffle_buffer: int = 256  # samples; shards are resampled at random, so this only mixes windows
    num_workers: int = 2
    epoch_batches: int = 1000  # batches per rank per "epoch" (.with_epoch): keeps ranks in lockstep
    eval_fraction: float = 0.05  # sources held out for eval, chosen by hash (at least one when > 0)
    # "index": speakers renumbered 0,1,.. per sample (as CSM expects); "raw": the source's labels (S0, S1);
    # "corpus": the corpus speaker's number from `pipeline link-speakers` (speaker_map.parquet), one id per voice
    speaker_ids: str = "index"
    allow_unreleased_codec: bool = False  # codes from a Mimi without released weights are noise

    def __post_init__(self):
        require(self.speaker_ids in ("index", "raw", "corpus"), "speaker_ids",
                f"must be index, raw or corpus, got {self.speaker_ids!r}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    c0_weight: float = 1.0
    decoder_weight: float = 1.0
    decoder_fraction: float = 1 / 16  # compute amortization: share of audio frames the decoder trains on
    seed: int = 1234
    dtype: str = "bf16"  # autocast dtype on GPU; CPU always runs fp32
    compile: bool = False
    peak_tflops: float | None = None  # per device, for MFU; None: a known GPU's dense bf16 figure (train/flops.py)
    activation_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    checkpoint_format: str = "full"  # full: state.pt gathered on rank 0; sharded: torch.distributed.checkpoint
    # Sharded format only: the step waits for the copy of this rank's shards to host memory, not for the disk
    # (dcp.async_save; train/checkpoint.py). On by default: resume is the same as from a synchronous save (tests),
    # and the cost is one transient host copy of the rank's model + optimizer shards while the write runs; set
    # false where host memory is tight. Full format, or a torch without async_save: synchronous, and the log says so.
    async_checkpoint: bool = True
    sample_every: int = 1000  # generate sample_prompts into RUN/samples/ (0: never); WER when an ASR model loads
    sample_prompts: tuple[str, ...] = ("[0]Hello, how are you doing today?", "[1]I am fine, thanks. What about you?")
    # Fine-tuning: parameter-name prefixes left untrained (e.g. [backbone, text_embeddings]), and lr multipliers
    # by prefix, the longest matching prefix winning (e.g. {decoder: 1.0, backbone: 0.1}); a prefix must match.
    freeze: tuple[str, ...] = ()
    lr_scale: dict = field(default_factory=dict)

    def __post_init__(self):
        require(self.checkpoint_format in ("full", "sharded"), "checkpoint_format",
                f"must be full or sharded, got {self.checkpoint_format!r}")
        for prefix, scale in self.lr_scale.items():
            ok = isinstance(scale, (int, float, str)) and not isinstance(scale, bool)
            require(ok and float(scale) > 0, "lr_scale", f"{prefix}: must be a number > 0 (freeze it instead), got {scale!r}")
        object.__setattr__(self, "lr_scale", {k: float(v) for k, v in self.lr_scale.items()})


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling for `pipeline generate` and the training samples (Sesame's released defaults)."""

    temperature: float = 0.9  # 0: greedy
    top_k: int = 50
    max_seconds: float = 10.0
    seed: int = 0
    mimi: str | None = None  # local Mimi safetensors; None: the released file from the hub


@dataclass(frozen=True)
class ParallelConfig:
    mode: str = "auto"  # auto (ddp when WORLD_SIZE > 1), none, ddp, fsdp


@dataclass(frozen=True)
class EvaluateConfig:
    """`pipeline evaluate`: held-out loss, a fixed prompt set and the pronunciation tests (train/evaluate.py)."""

    loss_batches: int = 64  # held-out batches of data.micro_batch_size samples (the run's) for the loss
    prompts: tuple[str, ...] = (
        "Thanks for having me on the show, it is great to be here.",
        "I think the hardest part was getting everyone to agree on a date.",
        "We drove for six hours and the weather was terrible the whole way.",
        "Honestly, I did not expect the results to be that good.",
        "Could you say a little more about how that started?",
        "The library closes at nine, so we should probably hurry.",
    )  # said by speaker 0 right after a held-out context turn of speaker 0
    contexts: int = 6  # held-out samples whose first turn is a prompt's context, round robin (0: no context)
    max_seconds: float = 10.0  # per generation; hitting it is reported as not stopping
    temperature: float = 0.9
    top_k: int = 50
    seed: int = 0  # prompt i samples with seed + i
    mimi: str | None = None  # local Mimi safetensors; None: the released file from the hub
    asr: bool = True  # intelligibility with the pipeline's ASR (stages.asr, packaged Whisper)
    speaker_encoder: str | None = None  # resemblyzer weights; None: the package's pretrained.pt
    phoneme_model: str | None = None  # wav2vec2 phoneme CTC, hub id or path (facebook/wav2vec2-lv-60-espeak-cv-ft)
    pronunciation: tuple[str, ...] = ("homograph", "consistency")  # which of the seed's tests to run
    espeak_voice: str = "en-us"

    def __post_init__(self):
        require(self.loss_batches >= 0, "loss_batches", f"must be >= 0, got {self.loss_batches}")
        require(self.contexts >= 0, "contexts", f"must be >= 0, got {self.contexts}")
        require(self.max_seconds > 0, "max_seconds", f"must be > 0, got {self.max_seconds}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(set(self.pronunciation) <= {"homograph", "consistency"}, "pronunciation",
                f"tests are homograph and consistency, got {list(self.pronunciation)}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    cfg = Config()
    if path:
        cfg = with_overrides(cfg, read_yaml(path))
    if overrides:
        cfg = with_overrides(cfg, overrides)
    if not 0 < cfg.train.decoder_fraction <= 1:
        raise ValueError("train.decoder_fraction must be in (0, 1]")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} > model.max_seq_len {cfg.model.max_seq_len}")
    return cfg
