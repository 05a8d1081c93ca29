"""tandem's user configuration: one YAML file and TANDEM_* environment variables, validated by
pydantic and merged by pydantic-settings (the only place pydantic is used; inside, frozen
dataclasses). `tandem serve --config FILE`, `tandem batch --config
FILE`; with no file, `TandemConfig()` is the embedded default: local Ray, the two Qwen2.5-Coder
packs as targets, and the 0.5B pack as the shared draft.

Example (every field is optional):

    server:
      port: 50051
      auth_token_env: TANDEM_AUTH_TOKEN
    ray:
      address: null            # null: embedded local Ray; "auto" or "ray://host:10001": join
    draft_pool:
      model: qwen2.5-coder-0.5b-instruct
      replicas: 1
      quantize: auto           # pack for packs (their own GGUF grid), int4 otherwise
    targets:
      - name: qwen2.5-coder-1.5b-instruct
      - name: qwen2.5-coder-0.5b-instruct

Precedence (pydantic-settings): command-line flags > environment > the YAML file > defaults.
Environment variables are `TANDEM_` + the field path joined by `__`, e.g.
`TANDEM_SERVER__PORT=50052`, `TANDEM_RAY__ADDRESS=auto`, `TANDEM_DRAFT_POOL__REPLICAS=2`;
a list or a mapping is given as JSON (`TANDEM_TARGETS='[{"name": "qwen2.5-coder-1.5b-instruct"}]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from tandem.actors.devices import check_device_spec
from tandem.actors.prefix_cache import PREFIX_CACHE_BYTES
from tandem.deploy.packs import DEFAULT_DRAFT, DEFAULT_TARGET, DRAFT_QUANTIZE_DEFAULT, QUANTIZE_SETTINGS
from tandem.speculation.plan import DEFAULT_MAX_DRAFT_LEN, MAX_DRAFT_LEN, METHODS

Method = Literal[METHODS]  # the planner's names (speculation/plan.py)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("device", check_fields=False)
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_spec(v)


DEVICE_DOC_DEFAULT = "auto"
DEVICE_DOC = (
    'Where the pool\'s models run: "auto" (the GPU Ray gives each actor - set placement.num_gpus - '
    'else the CPU), "cpu", "cuda" or "cuda:N"'
)


class TLSConfig(_Strict):
    cert_file: Path = Field(description="PEM certificate chain for the gRPC port")
    key_file: Path = Field(description="PEM private key for the gRPC port")


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the gRPC server binds; 0.0.0.0 in containers")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    metrics_port: int | None = Field(9464, ge=0, le=65535, description="Prometheus /metrics port; null: off")
    metrics_host: str | None = Field(None, description="Address /metrics binds; null: the gRPC host")
    metrics_auth_token_env: str | None = Field(
        None, description="Environment variable holding a bearer token that /metrics scrapes must send; null: open"
    )
    auth_token_env: str | None = Field(
        None, description="Environment variable holding the bearer token; null: no auth"
    )
    tls: TLSConfig | None = Field(None, description="TLS for the gRPC port; null: plaintext")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request or response message")
    queue_size: int = Field(
        64, ge=1, description="Requests per target admitted beyond those running; more get RESOURCE_EXHAUSTED"
    )
    max_concurrent: int = Field(
        8, ge=1, description="Requests per target running at once (until their work on the actors has ended)"
    )
    heartbeat_s: float | None = Field(
        2.0, gt=0, description="Ping every actor this often; null: off (hung actors then go unnoticed)"
    )
    heartbeat_timeout_s: float = Field(
        10.0, gt=0, description="An actor that does not answer a ping this long is hung: out of rotation, restarted"
    )
    max_new_tokens_limit: int = Field(4096, ge=1, description="Upper bound a request may ask for")
    default_max_new_tokens: int = Field(256, ge=1, description="max_new_tokens when a request leaves it unset or 0")
    otlp_endpoint: str | None = Field(None, description="OTLP gRPC endpoint for traces and metrics; null: off")
    trace_rounds_sample_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of requests that get a span per speculation round"
    )


class RayConfig(_Strict):
    address: str | None = Field(None, description='null: embedded local Ray; "auto" or "ray://host:10001": join')
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (default: all)")
    namespace: str = Field("tandem", description="Ray namespace for tandem's named actors")
    shared_pools: bool = Field(
        False,
        description="Pools that several routers on one Ray cluster share: detached named actors the first "
        "router starts and later ones attach to, outliving any router (`tandem pools-down` ends them); needs "
        "a cluster to join (address or RAY_ADDRESS)",
    )
    router_lease_s: float = Field(
        30.0, ge=1.0, description="ray.shared_pools: a router unheard of this long is taken as gone, and the "
        "other routers close its requests' state on the actors",
    )


class PoolResources(_Strict):
    """Where a pool's actors run: custom Ray resources on a CPU box, GPUs on a cluster."""

    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per actor")
    accelerator_type: str | None = Field(None, description='Ray accelerator type, e.g. "H100"')

    def to_placement(self):
        """The actors-layer Placement (actors.pools) of this pool."""
        from tandem.actors.pools import Placement

        return Placement(resources=dict(self.resources), num_gpus=self.num_gpus, accelerator_type=self.accelerator_type)


class AutoscalingConfig(_Strict):
    """How pools with max_replicas > replicas follow traffic (actors/autoscale.py): desired
    replicas = ceil((requests in flight + queued) / target_ongoing_requests), within bounds."""

    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests in flight or queued per replica the pools aim for")
    upscale_delay_s: float = Field(5.0, ge=0, description="Add a replica once more were wanted this long")
    downscale_delay_s: float = Field(60.0, ge=0, description="Drain a replica once fewer were wanted this long")
    interval_s: float = Field(1.0, gt=0, description="How often the pools' demand is looked at")


# null: every core the actor may use on its node. Where a draft and a target actor then share a
# node's cores, the router drafts and verifies in turn (deploy/serve.py overlap_pays). Measured
# (2-core Xeon, 1.5B pack on ggml, code_dev through gRPC, 2026-12-05): one thread per actor,
# PEARL, 15.5 tok/s for one stream; two per actor, in turn, 18.3; with 8 streams at once the
# same 26.0 aggregate either way.
THREADS_DOC = "torch threads per {actor}; null: the cores of its node (drafting and verification then run in turn where they share them)"


def _bounds(replicas: int, max_replicas: int | None) -> None:
    if max_replicas is not None and max_replicas < replicas:
        raise ValueError(f"max_replicas ({max_replicas}) must be >= replicas ({replicas})")


class DraftPoolConfig(_Strict):
    model: str = Field(DEFAULT_DRAFT, description="Draft model: pack name, local folder or hub id")
    replicas: int = Field(1, ge=1, le=64, description="Draft actors at start, and the fewest when scaling")
    max_replicas: int | None = Field(
        None, ge=1, le=64, description="Most draft actors when scaling with traffic; null: fixed at replicas"
    )
    threads: int | None = Field(None, ge=1, description=THREADS_DOC.format(actor="draft actor"))
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    quantize: Literal[QUANTIZE_SETTINGS] = Field(
        DRAFT_QUANTIZE_DEFAULT,
        description='Draft weights: "pack" serves a model pack at 4 bits from its own GGUF grid; "auto": pack for '
        "packs, int4 otherwise; int8/int4 re-quantize (CPU kernels; on a GPU the draft runs dense)",
    )
    device: str = Field(DEVICE_DOC_DEFAULT, description=DEVICE_DOC)
    exits: list[int] = Field(default_factory=list, description="Extra exit depths (the full depth is always one)")
    exit_adapters: str | None = Field(
        "auto",
        description='Folder from `tandem train-exits`; "auto": its default folder when present; null or "none": no trained exits',
    )
    placement: PoolResources = Field(default_factory=lambda: PoolResources(resources={"draft_pool": 1}))
    load_timeout_s: float = Field(600.0, gt=0, description="Wait this long for room and model loading")
    kv_budget_bytes: int | None = Field(
        None, ge=1,
        description="KV cache bytes per draft actor; a request whose draft KV does not fit runs with speculation off. "
        "null: half the actor's free device memory once its weights are loaded",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> "DraftPoolConfig":
        _bounds(self.replicas, self.max_replicas)
        return self


class TargetConfig(_Strict):
    name: str = Field(description="Name clients ask for")
    model: str | None = Field(None, description="Model reference; default: the name")
    replicas: int = Field(1, ge=1, le=64, description="Target replicas at start, and the fewest when scaling")
    max_replicas: int | None = Field(
        None, ge=1, le=64, description="Most replicas when scaling with traffic; null: fixed at replicas"
    )
    shards: int = Field(1, ge=1, le=16, description="Pipeline stages (layer ranges) per replica")
    threads: int | None = Field(None, ge=1, description=THREADS_DOC.format(actor="target actor (each shard)"))
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    device: str = Field(DEVICE_DOC_DEFAULT, description=DEVICE_DOC)
    quantize: Literal[QUANTIZE_SETTINGS] = Field(
        "auto",
        description='Target weights: "pack" serves a model pack at 4 bits from its own GGUF grid (CPU); '
        '"auto": pack for packs, none otherwise; int8/int4 re-quantize; unsharded targets only',
    )
    kv_budget_bytes: int | None = Field(
        None, ge=1,
        description="KV cache bytes per target actor (each shard); requests wait for room past it. "
        "null: half the actor's free device memory once its weights are loaded",
    )
    prefix_cache_bytes: int = Field(
        PREFIX_CACHE_BYTES, ge=0,
        description="KV bytes per target actor for prompt prefixes that different prompts shared (a chat template's "
        "system turn), reused instead of prefilled again, output unchanged; beside kv_budget_bytes. "
        "0: off (reuse is a timing signal across clients). Unsharded targets only",
    )
    method: Method = Field("auto", description="Default speculation method for this target")
    max_draft_len: int = Field(DEFAULT_MAX_DRAFT_LEN, ge=1, le=MAX_DRAFT_LEN, description="Upper bound of the draft length the router may pick")
    sorted_thresholds: list[float] = Field(
        default_factory=list,
        description="S2D confidence threshold per draft exit below the deepest (default: the trained exits' calibration, else 0.8 each)",
    )
    placement: PoolResources = Field(default_factory=lambda: PoolResources(resources={"target_pool": 1}))

    @property
    def model_ref(self) -> str:
        return self.model or self.name

    @field_validator("sorted_thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        for i, t in enumerate(v):
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"sorted_thresholds[{i}] must be in [0, 1], got {t}")
        return v

    @model_validator(mode="after")
    def _replica_bounds(self) -> "TargetConfig":
        _bounds(self.replicas, self.max_replicas)
        if self.shards > 1 and self.quantize not in ("auto", "none"):
            raise ValueError(f"quantize {self.quantize!r} needs an unsharded target (shards 1); pipeline stages run dense")
        return self


BatchEngine = Literal["local", "pools"]  # tandem batch: in-process engines per Ray Data actor, or the server's pools


class BatchConfig(_Strict):
    min_actors: int = Field(1, ge=1, description="Autoscaling actor pool: fewest actors")
    max_actors: int = Field(2, ge=1, description="Autoscaling actor pool: most actors")
    method: Method = "auto"
    engine: BatchEngine = Field(
        "local", description='"local": in-process engines per Ray Data actor; "pools": the server\'s pools and router'
    )

    @model_validator(mode="after")
    def _bounds(self) -> "BatchConfig":
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


ENV_PREFIX = "TANDEM_"
ENV_NESTED = "__"


class TandemConfig(BaseSettings):
    """The whole configuration. `TandemConfig()` reads TANDEM_* environment overrides over the
    defaults; `load_config` adds a YAML file beneath them; `parse_config` validates a mapping
    alone (what a batch actor receives from its driver, already merged)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED, extra="forbid", frozen=True, yaml_file=None
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    draft_pool: DraftPoolConfig = Field(default_factory=DraftPoolConfig)
    targets: list[TargetConfig] = Field(
        default_factory=lambda: [TargetConfig(name=DEFAULT_TARGET), TargetConfig(name=DEFAULT_DRAFT)],
        min_length=1,
    )
    batch: BatchConfig = Field(default_factory=BatchConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (init kwargs) > environment > YAML file (model_config["yaml_file"]) > defaults
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @field_validator("targets")
    @classmethod
    def _unique_names(cls, targets: list[TargetConfig]) -> list[TargetConfig]:
        names = [t.name for t in targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique, repeated: {', '.join(dupes)}")
        return targets


class ConfigError(ValueError):
    """A config that does not validate; the message lists each field and why."""


def _env_overrides() -> list[str]:
    import os

    return sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and ENV_NESTED in k[len(ENV_PREFIX):]
                  or k in {ENV_PREFIX + f.upper() for f in TandemConfig.model_fields})


def load_config(path: str | Path | None, *, overrides: dict | None = None) -> TandemConfig:
    """The configuration `tandem serve` and `tandem batch` run with: `overrides` (their
    flags, as a nested mapping) over TANDEM_* environment variables over the YAML file at
    `path` (None: no file) over the defaults."""
    source = "config"
    cls = TandemConfig
    if path is not None:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config: file {str(p)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {p} is not valid YAML: {exc}") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        source = str(p)
        cls = type("TandemConfigFromFile", (TandemConfig,), {"model_config": {**TandemConfig.model_config, "yaml_file": p}})
    env = _env_overrides()
    if env:
        source += f" with environment {', '.join(env)}"
    try:
        cfg = cls(**(overrides or {}))
    except ValidationError as exc:
        raise _config_error(exc, source) from None
    except ValueError as exc:  # an environment value that is not valid JSON for a list or mapping
        raise ConfigError(f"{source} is invalid: {exc}") from None
    return TandemConfig.model_validate(cfg.model_dump()) if cls is not TandemConfig else cfg


def parse_config(raw: object, *, source: str = "config") -> TandemConfig:
    """Validate a mapping as it stands (no environment, no file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return TandemConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, source) from None


def _config_error(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return ConfigError(f"{source} is invalid:\n" + "\n".join(lines))
