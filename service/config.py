"""Service settings: environment variables (prefix ``UNIGUARD_``), an optional YAML/JSON file, then defaults.

Precedence (highest first): explicit arguments (CLI flags), environment variables, the config file named by
``UNIGUARD_CONFIG_FILE``, the defaults below. Every limit the service enforces lives here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "UNIGUARD_"
DEFAULT_MODEL_DIR = Path("models/uniguard-minilm")
REPO_ROOT = Path(__file__).resolve().parent.parent
PublicPath = Literal["/healthz", "/readyz", "/metrics", "/version", "/docs", "/redoc", "/openapi.json"]
PROBE_PATHS: tuple[PublicPath, ...] = ("/healthz", "/readyz", "/metrics")
# The playground page and its files: no API key needed (the page's own API calls send one).
PLAYGROUND_PATHS = frozenset(
    {"/", "/playground/playground.js", "/playground/playground.css", "/playground/favicon.svg"}
)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class SettingsError(ValueError):
    """A setting or the config file is invalid; the message names it."""


def resolve_model_dir(path: Path) -> Path:
    """A relative model folder is taken from the working directory, else from the repository root."""
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: cannot read config file (UNIGUARD_CONFIG_FILE): {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the config file must hold a mapping of setting names to values")
    return {str(k).lower().removeprefix(ENV_PREFIX.lower()): v for k, v in data.items()}


class _FileSource(PydanticBaseSettingsSource):
    """Values from the YAML/JSON file named by UNIGUARD_CONFIG_FILE (or the config_file init argument)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.data = _read_config_file(path) if path else {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """UniGuard service settings."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    config_file: Path | None = Field(default=None, description="optional YAML or JSON file with these settings")
    host: str = Field(default="127.0.0.1", description="bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    model_dir: Path = Field(default=DEFAULT_MODEL_DIR, description="exported model folder (with manifest.json)")
    provider: Literal["cpu", "cuda"] = Field(default="cpu", description="ONNX Runtime execution provider")
    intra_op_threads: int | None = Field(default=None, ge=1, description="ONNX Runtime threads (default: ORT's)")
    policy_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="extra policy folders (comma-separated), loaded after the defaults"
    )
    redis_url: str = Field(default="", description="Redis URL for the shared cache; empty = in-process LRU")
    cache_ttl_seconds: int = Field(default=86400, ge=1, description="cache entry lifetime")
    cache_max_entries: int = Field(default=100_000, ge=0, description="in-process LRU size (0 disables the cache)")
    cache_key_prefix: str = Field(default="uniguard:v1:", description="prefix of Redis keys")
    redis_timeout_s: float = Field(default=0.25, gt=0, description="Redis socket timeout per call")
    redis_backoff_max_s: float = Field(default=30.0, gt=0, description="longest pause before retrying a dead Redis")
    max_batch_size: int = Field(default=32, ge=1, description="most (text, policy) windows per model call")
    max_batch_tokens: int = Field(default=8192, ge=16, description="most padded tokens per model call")
    batch_target_ms: float = Field(
        default=50.0,
        ge=0,
        description="a batch holds at most the tokens the engine runs in this time (at its measured speed), so a small "
        "request waits at most about this long behind a big one; 0 = only the size and token limits",
    )
    max_wait_ms: float = Field(default=2.0, ge=0, description="longest wait for a batch to fill")
    max_queue: int = Field(
        default=16384,
        ge=1,
        description="most windows waiting; beyond it requests get 429 (a second bound: admission bounds the work)",
    )
    request_timeout_s: float = Field(default=10.0, gt=0, description="per-request deadline (then 504)")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After header value on 429")
    warmup_batches: int = Field(default=3, ge=0, description="dummy batches run at start-up before ready")
    max_texts_per_request: int = Field(default=64, ge=1, description="most texts in one /classify")
    max_policies_per_request: int = Field(default=16, ge=1, description="most policies (named + inline) per request")
    max_custom_policies: int = Field(default=8, ge=0, description="most inline policies per request")
    max_text_chars: int = Field(default=20_000, ge=1, description="longest text in characters")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="largest request body (then 413)")
    max_inflight_requests: int = Field(
        default=512,
        ge=1,
        description="most requests being handled at once, counted once their body is read; beyond it 429 "
        "(probes exempt)",
    )
    engine_tokens_per_s: float | None = Field(
        default=None, gt=0, description="engine speed for admission (model tokens/s); default: measured at start-up"
    )
    admission_budget_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of the request deadline that admitted work may fill at the engine's speed; beyond it "
        "429 (413 for a request that alone exceeds it)",
    )
    readiness_grace_s: float = Field(
        default=2.0, ge=0, description="/readyz answers 503 once the service has been saturated this long"
    )
    header_timeout_s: float = Field(
        default=5.0, gt=0, description="deadline for a connection to send a request's headers (then 408, closed)"
    )
    max_header_bytes: int = Field(
        default=65536, ge=1024, description="largest request line + headers (then 431, connection closed)"
    )
    body_timeout_s: float = Field(
        default=5.0, gt=0, description="deadline for a request's body once its headers are in (then 408, closed)"
    )
    keep_alive_timeout_s: int = Field(default=5, ge=1, description="idle keep-alive connections are closed after it")
    max_connections: int = Field(
        default=2048, ge=1, description="most open connections and tasks; beyond it uvicorn answers 503"
    )
    api_key_hashes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="sha256 hex of accepted API keys (comma-separated); empty = no authentication",
    )
    admin_key_hashes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="sha256 hex of the keys that may call /admin/* (comma-separated); setting one enables /admin/*",
    )
    admin_enabled: bool = Field(
        default=False,
        description="enable /admin/* without an admin key (then it needs an API key if those are configured)",
    )
    public_paths: Annotated[list[PublicPath], NoDecode] = Field(
        default_factory=lambda: list(PROBE_PATHS),
        description="paths that stay open without an API key when keys are configured (comma-separated)",
    )
    fail_mode: Literal["closed", "open"] = Field(
        default="closed", description="closed: errors when it cannot classify; open: answer safe, marked degraded"
    )
    playground: bool = Field(default=True, description="serve the playground page at / (false: 404)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="log level")

    @field_validator("policy_dirs", "api_key_hashes", "admin_key_hashes", "public_paths", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_key_hashes", "admin_key_hashes")
    @classmethod
    def _sha256_hex(cls, value: list[str]) -> list[str]:
        hashes = [v.lower() for v in value]
        bad = [i for i, h in enumerate(hashes) if not SHA256_HEX.match(h)]
        if bad:
            raise ValueError(
                f"entry {bad[0]} is not a sha256 hex digest (64 hex characters); store hashes, never keys: "
                "python -c 'import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())' KEY"
            )
        return hashes

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config_file") or os.environ.get(f"{ENV_PREFIX}CONFIG_FILE") or None
        return init_settings, env_settings, _FileSource(settings_cls, Path(path) if path else None)

    @property
    def resolved_model_dir(self) -> Path:
        return resolve_model_dir(self.model_dir)

    @property
    def is_default_model_dir(self) -> bool:
        """True when the model folder is the shipped default (a missing default starts in not-ready mode)."""
        return self.resolved_model_dir.resolve() == resolve_model_dir(DEFAULT_MODEL_DIR).resolve()


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and config file, with explicit overrides (None values ignored)."""
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc


def settings_help() -> str:
    """A table of every setting, its environment variable and default, for ``uniguard serve --help``."""
    lines = ["settings (environment variables; also accepted as keys in UNIGUARD_CONFIG_FILE):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None or default == [] else f" [default: {default}]"
        lines.append(f"  {ENV_PREFIX}{name.upper():<28} {field.description or ''}{shown}")
    return "\n".join(lines)
