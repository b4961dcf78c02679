"""Typed, validated model of `gateway.toml` and `policies/*.toml`.

Everything is read with `tomllib`, validated by pydantic into frozen models with unknown keys
forbidden, and every problem of every file is collected before failing once. Each problem is one
line: ``<file>: <dotted.key>: <what is wrong>``. Secrets are given as a literal, ``env:NAME`` or
``file:PATH`` and are resolved at load time into `SecretStr` (masked repr).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# --------------------------------------------------------------------------- value types

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """'15m' -> 900.0. Plain integers are seconds; strings need a unit."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '15m', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match and match.group(2):
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration like '15m', '12h' or '30s', got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB)?\s*$")
_SIZE_UNITS = {"B": 1, "KB": 1000, "KiB": 1024, "MB": 1000_000, "MiB": 1024 * 1024}


def parse_size(value: object) -> int:
    """'1MiB' -> 1048576. Plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]
    raise ValueError(f"expected a size like '64KiB' or '1MiB', got {value!r}")


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class SecretSourceError(ValueError):
    """A secret reference (`env:`/`file:`) could not be resolved."""


def resolve_secret(value: object, base_dir: Path | None = None) -> SecretStr:
    """Resolve ``env:NAME`` / ``file:PATH`` / a literal into a `SecretStr`."""
    if isinstance(value, SecretStr):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a string: a literal, 'env:NAME' or 'file:PATH'")
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise SecretSourceError(f"environment variable {name} is not set")
        return SecretStr(os.environ[name])
    if value.startswith("file:"):
        path = Path(value[5:])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return SecretStr(path.read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise SecretSourceError(f"cannot read secret file {path}: {exc.strerror}") from None
    return SecretStr(value)


def _secret(value: object, info: Any) -> SecretStr:
    ctx = info.context if info is not None and info.context else {}
    return resolve_secret(value, ctx.get("base_dir"))


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and the loopback ranges 127.0.0.0/8 and ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- gateway.toml


class ServerSettings(_Model):
    """`[server]`: where the gateway listens and the URL clients see."""

    listen: str = Field("127.0.0.1:8080", description="host:port to bind")
    # Declared before public_url so that public_url's validator sees it even when another
    # key of [server] is wrong (every problem is reported at once).
    dev_http_loopback: bool = Field(
        False, description="allow a plain-http public_url on loopback (development only)"
    )
    public_url: str = Field(
        ..., description="the issuer and base URL clients use; https except on loopback"
    )
    workers: int = Field(1, ge=1, le=64, description="processes sharing the port")
    allowed_origins: tuple[str, ...] = Field(
        (), description="Origins accepted on MCP paths in addition to public_url's"
    )
    trust_forwarded_headers: bool = Field(
        False, description="take the client IP from X-Forwarded-For (behind a trusted proxy)"
    )
    request_timeout: Duration = Field(
        30.0,
        description="deadline for a client to deliver its request (headers and body) and "
        "for an idle keep-alive connection; non-streaming upstream calls are bounded by it too",
    )
    shutdown_timeout: Duration = Field(
        15.0, description="on SIGTERM: how long open requests and streams may still finish"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected 'host:port', got {v!r}")
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str, info: ValidationInfo) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"expected an absolute https URL, got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        if parts.scheme == "http":
            if not is_loopback_host(parts.hostname):
                raise ValueError("plain http is allowed only on a loopback address")
            if not info.data.get("dev_http_loopback", False):
                raise ValueError(
                    "plain http needs server.dev_http_loopback = true (development only)"
                )
        return v.rstrip("/")

    @property
    def bind_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def bind_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def secure_cookies(self) -> bool:
        """`__Host-` and `Secure` whenever public_url is https (DESIGN §2.5)."""
        return self.public_url.startswith("https://")


class StoreSettings(_Model):
    """`[store]`: where state lives and the key that encrypts secrets at rest."""

    url: str = Field(
        "memory://",
        description=(
            "memory://, redis://, rediss://, unix://, "
            "redis+sentinel://[[user]:pw@]host:port[,host:port]/service[/db][?replica_acks=N] "
            "or redis+cluster://[[user]:pw@]host:port[,host:port...]/"
        ),
    )
    key_prefix: str = Field("mfagw:", description="prefix of every Redis key")
    encryption_key: Annotated[SecretStr, BeforeValidator(_secret)] = Field(
        ..., description="32 random bytes, base64url: AES-256-GCM key for seeds and tokens"
    )
    timeout: Duration = Field(2.0, description="time-out of every store operation")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster", "unix"):
            raise ValueError(  # the scheme only: the URL may carry a password
                "expected memory://, redis://, rediss://, unix://, redis+sentinel:// or "
                f"redis+cluster://, got a {scheme or 'scheme-less'!r} URL"
            )
        return v

    @field_validator("encryption_key")
    @classmethod
    def _key(cls, v: SecretStr) -> SecretStr:
        import base64
        import binascii

        raw = v.get_secret_value()
        try:
            decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            raise ValueError("must be base64url of 32 random bytes") from None
        if len(decoded) != 32:
            raise ValueError(
                f"must be base64url of exactly 32 bytes, got {len(decoded)} bytes "
                "(generate one with: mfa-gateway keys generate --encryption-key)"
            )
        return v

    @property
    def encryption_key_bytes(self) -> bytes:
        import base64

        raw = self.encryption_key.get_secret_value()
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))


class UpstreamSettings(_Model):
    """`[upstream]`: the legacy provider; the gateway is its confidential client."""

    # Declared before issuer so that issuer's validator sees it (see ServerSettings).
    allow_insecure_http_loopback: bool = Field(
        False, description="permit an http:// issuer, and only on a loopback address"
    )
    issuer: str = Field(..., description="the upstream issuer; discovery is read from it")
    client_id: str = Field(..., min_length=1)
    client_secret: Annotated[SecretStr, BeforeValidator(_secret)]
    scopes: tuple[str, ...] = Field(("openid", "profile", "email"))
    identity_claim: str = Field("sub", description="ID token / userinfo claim naming the user")
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = (
        "client_secret_basic"  # noqa: S105 - a method name, not a secret
    )
    use_userinfo: bool = Field(False, description="plain OAuth 2.0 provider: read userinfo")
    id_token_algs: tuple[str, ...] = Field(("RS256", "ES256", "PS256", "EdDSA"))
    timeout: Duration = Field(10.0, description="time-out of every call to the upstream")
    extra_authorize_params: Mapping[str, str] = Field(default_factory=dict)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str, info: ValidationInfo) -> str:
        parts = urlsplit(v)
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        if parts.scheme == "https" and parts.hostname:
            return v
        if parts.scheme == "http" and parts.hostname:
            if not is_loopback_host(parts.hostname):
                raise ValueError(f"must be an https URL, got {v!r}")
            if not info.data.get("allow_insecure_http_loopback", False):
                raise ValueError("plain http needs upstream.allow_insecure_http_loopback = true")
            return v
        raise ValueError(f"must be an https URL, got {v!r}")

    @field_validator("id_token_algs")
    @classmethod
    def _algs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in v if a == "none" or a.startswith("HS")]
        if bad:
            raise ValueError(f"'none' and HMAC algorithms are never allowed, got {bad}")
        return v


class ResourceSettings(_Model):
    """`[[resources]]`: one protected MCP server."""

    path: str = Field(..., description="public path, e.g. /mcp")
    upstream: str = Field(..., description="URL of the MCP server behind the gateway")
    policy: str = Field("default", description="name of a file in policies/ (without .toml)")
    forward_token: Literal["none", "upstream", "identity"] = "none"  # noqa: S105 - a mode
    name: str | None = Field(None, description="human name shown on consent pages")
    connect_timeout: Duration = 5.0
    read_timeout: Duration = Field(300.0, description="max silence on a response stream")
    allow_insecure_http_upstream: bool = Field(
        True, description="the MCP server is usually on a private network or loopback"
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or (v != v.rstrip("/") and v != "/"):
            raise ValueError(f"expected an absolute path without trailing slash, got {v!r}")
        if any(seg in (".", "..") for seg in v.split("/")) or "%" in v or "//" in v:
            raise ValueError(f"must be a normalised path, got {v!r}")
        if v.startswith(("/oauth", "/.well-known", "/healthz", "/readyz", "/metrics")):
            raise ValueError(f"collides with a gateway path: {v!r}")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {v!r}")
        return v.rstrip("/") if parts.path not in ("", "/") else v


class SigningKeySettings(_Model):
    """`[[keys.signing]]`: one private key file; all are published in the JWKS."""

    kid: str = Field(..., pattern=r"^[A-Za-z0-9._-]{1,64}$")
    file: str = Field(..., description="PEM private key (PKCS#8)")
    alg: Literal["ES256", "EdDSA"] = "ES256"


class TrustedIssuerSettings(_Model):
    """`[[keys.trusted_issuers]]`: another AS whose tokens the proxy accepts."""

    issuer: str
    jwks_uri: str
    algs: tuple[Literal["ES256", "RS256", "PS256", "EdDSA"], ...] = ("ES256", "RS256")
    cache_ttl: Duration = 300.0
    min_refresh_interval: Duration = 30.0


class KeySettings(_Model):
    """`[keys]`: token signing keys and the cookie/CSRF signing secret."""

    signing: tuple[SigningKeySettings, ...] = ()
    active_kid: str | None = None
    cookie_secret: Annotated[SecretStr, BeforeValidator(_secret)] = Field(
        ..., description="at least 32 characters; signs consent/transaction cookies and CSRF"
    )
    dev_generate: bool = Field(
        False, description="generate an in-memory key when none is configured (development only)"
    )
    trusted_issuers: tuple[TrustedIssuerSettings, ...] = ()

    @field_validator("cookie_secret")
    @classmethod
    def _cookie_secret(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @field_validator("signing")
    @classmethod
    def _unique_kids(cls, v: tuple[SigningKeySettings, ...]) -> tuple[SigningKeySettings, ...]:
        kids = [k.kid for k in v]
        if len(set(kids)) != len(kids):
            raise ValueError("kid values must be unique")
        return v

    @field_validator("active_kid")
    @classmethod
    def _active_kid(cls, v: str | None, info: ValidationInfo) -> str | None:
        signing = info.data.get("signing")
        if v is not None and signing is not None:
            kids = [k.kid for k in signing]
            if v not in kids:
                raise ValueError(f"{v!r} is not one of {kids}")
        return v

    @model_validator(mode="after")
    def _active(self) -> KeySettings:
        if not self.signing and not self.dev_generate:
            raise ValueError("signing: at least one key is required (or dev_generate = true)")
        return self

    @property
    def active(self) -> str | None:
        return self.active_kid or (self.signing[0].kid if self.signing else None)


class LoggingSettings(_Model):
    """`[logging]`."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class GatewayFile(_Model):
    """The raw shape of gateway.toml."""

    server: ServerSettings
    store: StoreSettings
    upstream: UpstreamSettings
    resources: tuple[ResourceSettings, ...] = Field(..., min_length=1)
    keys: KeySettings
    logging: LoggingSettings = LoggingSettings()
    policies_dir: str = Field(
        "policies", description="folder of policy files, relative to this file"
    )
    authorization_policy: str = Field(
        "default", description="policy whose registration and consent rules apply globally"
    )

    @field_validator("resources")
    @classmethod
    def _unique_paths(cls, v: tuple[ResourceSettings, ...]) -> tuple[ResourceSettings, ...]:
        paths = [r.path for r in v]
        dups = sorted({p for p in paths if paths.count(p) > 1})
        if dups:
            raise ValueError(f"duplicate path(s) {dups}")
        return v


# --------------------------------------------------------------------------- policies/*.toml


class StepUpPolicy(_Model):
    """`[stepup]`: TOTP parameters and brute-force limits."""

    digits: Literal[6, 7, 8] = 6
    period: int = Field(30, ge=15, le=120, description="seconds per time step")
    window: int = Field(1, ge=0, le=2, description="steps accepted either side of now")
    algorithm: Literal["SHA1", "SHA256", "SHA512"] = "SHA1"
    max_failures_per_user: int = Field(5, ge=1)
    max_failures_per_ip: int = Field(20, ge=1)
    failure_window: Duration = 900.0
    lockout: Duration = 900.0
    enrollment: Literal["admin", "first_login"] = "admin"
    issuer_label: str = Field("mfa-gateway", description="name shown in authenticator apps")
    recovery_codes: int = Field(10, ge=0, le=50)


class ConsentPolicy(_Model):
    """`[consent]`: how long a browser's approval of a client is remembered."""

    remember: Duration = Field(30 * 86400.0, description="0 asks every time")


class TokenPolicy(_Model):
    """`[tokens]`: lifetimes; refreshes never extend MFA past mfa_max_age."""

    access_token_ttl: Duration = 600.0
    refresh_token_ttl: Duration = 30 * 86400.0
    code_ttl: Duration = Field(60.0, le=600.0)
    transaction_ttl: Duration = Field(600.0, le=3600.0)
    mfa_max_age: Duration = 12 * 3600.0
    acr: str = Field("urn:mfa-gateway:totp", description="acr claim of issued tokens")


class PreRegisteredClient(_Model):
    """`[[registration.clients]]`."""

    client_id: str = Field(..., min_length=1, max_length=255)
    client_name: str | None = None
    client_secret: Annotated[
        SecretStr | None, BeforeValidator(lambda v, info: None if v is None else _secret(v, info))
    ] = None
    redirect_uris: tuple[str, ...] = Field(..., min_length=1)
    scopes: tuple[str, ...] | None = None


class RegistrationPolicy(_Model):
    """`[registration]`: which clients may use the gateway."""

    dynamic: bool = Field(True, description="RFC 7591 dynamic registration at /oauth/register")
    client_id_metadata_documents: bool = True
    registrations_per_ip_per_hour: int = Field(20, ge=1)
    allowed_custom_schemes: tuple[str, ...] = ()
    cimd_max_bytes: int = Field(5120, ge=256, le=65536)
    cimd_timeout: Duration = 5.0
    cimd_cache_ttl: Duration = 3600.0
    cimd_allow_private_addresses: bool = Field(
        False,
        description="TEST ONLY: let client-ID metadata documents live on loopback/private IPs",
    )
    cimd_allow_http: bool = Field(False, description="TEST ONLY: allow http:// client-ID URLs")
    clients: tuple[PreRegisteredClient, ...] = ()


class McpRule(_Model):
    """`[[mcp.rules]]`: matched by glob on the JSON-RPC method and, for tools/call, the tool."""

    method: str = Field("*", description="glob on the JSON-RPC method")
    tool: str | None = Field(None, description="glob on params.name of tools/call")
    effect: Literal["allow", "deny"] = "allow"
    require_scopes: tuple[str, ...] = ()
    max_auth_age: Duration | None = Field(None, description="step-up needed if older")
    acr_values: str | None = None
    description: str | None = None


class McpPolicy(_Model):
    """`[mcp]`: what a bearer token must prove to reach the MCP server."""

    required_amr: tuple[str, ...] = ("mfa",)
    scopes_supported: tuple[str, ...] = ("mcp",)
    default_scopes: tuple[str, ...] | None = None
    max_body: ByteSize = Field(1024 * 1024, description="cap on a JSON-RPC request body")
    default_effect: Literal["allow", "deny"] = "allow"
    rules: tuple[McpRule, ...] = ()
    session_ttl: Duration = 86400.0
    identity_token_ttl: Duration = 60.0


class Policy(_Model):
    """One file in policies/."""

    stepup: StepUpPolicy = StepUpPolicy()
    consent: ConsentPolicy = ConsentPolicy()
    tokens: TokenPolicy = TokenPolicy()
    registration: RegistrationPolicy = RegistrationPolicy()
    mcp: McpPolicy = McpPolicy()


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Settings:
    """Everything the gateway was configured with, validated."""

    server: ServerSettings
    store: StoreSettings
    upstream: UpstreamSettings
    resources: tuple[ResourceSettings, ...]
    keys: KeySettings
    logging: LoggingSettings
    policies: Mapping[str, Policy]
    authorization_policy: str
    config_path: Path

    @property
    def issuer(self) -> str:
        return self.server.public_url

    def policy_for(self, resource: ResourceSettings) -> Policy:
        return self.policies[resource.policy]

    @property
    def global_policy(self) -> Policy:
        return self.policies[self.authorization_policy]

    def resource_url(self, resource: ResourceSettings) -> str:
        """The canonical resource identifier (RFC 8707 / RFC 9728 `resource`)."""
        return self.server.public_url + resource.path

    def resource_by_url(self, url: str) -> ResourceSettings | None:
        for r in self.resources:
            if self.resource_url(r) == url:
                return r
        return None

    def resource_by_path(self, path: str) -> ResourceSettings | None:
        for r in self.resources:
            if path == r.path or path.startswith(r.path + "/"):
                return r
        return None


class ConfigError(Exception):
    """The configuration has problems; `problems` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _format_errors(filename: str, exc: ValidationError) -> list[str]:
    problems = []
    errors = exc.errors(include_url=False)
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        if err["type"] == "too_short" and any(
            len(other["loc"]) > len(err["loc"]) and other["loc"][: len(err["loc"])] == err["loc"]
            for other in errors
        ):
            continue  # "needs at least 1 item" only because every item was invalid: noise
        key = _loc(loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if err["type"] not in ("value_error", "assertion_error"):
                given = err["input"]
                if not isinstance(given, dict | list) and "secret" not in key:
                    msg += f", got {given!r}"
        # model-level validators prefix their own key: "issuer: must be ..."
        head, sep, rest = msg.partition(": ")
        if sep and re.fullmatch(r"[a-z_][a-z0-9_.\[\]]*", head) and not head.startswith("got"):
            key = f"{key}.{head}" if key else head
            msg = rest
        problems.append(f"{filename}: {key or '(top level)'}: {msg}")
    return problems


def _read_toml(path: Path, display: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problems.append(f"{display}: (file): not found")
    except OSError as exc:
        problems.append(f"{display}: (file): cannot read: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{display}: (file): not valid TOML: {exc}")
    return None


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, Mapping) else {}


def _tables(raw: Mapping[str, Any], key: str) -> list[tuple[int, Mapping[str, Any]]]:
    value = raw.get(key)
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, Mapping)]


def _check_references(
    raw: Mapping[str, Any],
    display: str,
    base: Path,
    policies_dir: Path,
    policy_names: set[str],
    problems: list[str],
) -> None:
    """Checks across keys and files, on the raw TOML so that they run even when some other key
    is invalid (every problem is reported at once)."""
    wanted: set[tuple[str, str]] = set()
    for i, res in _tables(raw, "resources"):
        name = res.get("policy", "default")
        if isinstance(name, str):
            wanted.add((f"resources[{i}].policy", name))
    auth_policy = raw.get("authorization_policy", "default")
    if isinstance(auth_policy, str):
        wanted.add(("authorization_policy", auth_policy))
    for key, name in sorted(wanted):
        broken = any(p.startswith(f"{policies_dir / name}.toml") for p in problems)
        if name not in policy_names and not broken and policies_dir.is_dir():
            problems.append(f"{display}: {key}: no policy file {name}.toml in {policies_dir}")
    for i, sk in _tables(_table(raw, "keys"), "signing"):
        file = sk.get("file")
        if isinstance(file, str) and file:
            kpath = Path(file) if Path(file).is_absolute() else base / file
            if not kpath.is_file():
                problems.append(f"{display}: keys.signing[{i}].file: no such file {kpath}")
    workers = _table(raw, "server").get("workers", 1)
    store_url = _table(raw, "store").get("url", "memory://")
    if (
        isinstance(workers, int)
        and workers > 1
        and isinstance(store_url, str)
        and store_url.startswith("memory:")
    ):
        problems.append(
            f"{display}: server.workers: the in-memory store serves one process only; "
            "use a redis:// store with workers > 1"
        )


def load_settings(config_path: str | os.PathLike[str]) -> Settings:
    """Read and validate gateway.toml and its policies; raise `ConfigError` with every problem."""
    path = Path(config_path)
    base = path.parent
    display = str(path)
    problems: list[str] = []
    raw = _read_toml(path, display, problems)
    if raw is None:
        raise ConfigError(problems)
    ctx = {"base_dir": base}
    gateway: GatewayFile | None = None
    try:
        gateway = GatewayFile.model_validate(raw, context=ctx)
    except ValidationError as exc:
        problems.extend(_format_errors(display, exc))

    policies_dir = base / str(raw.get("policies_dir", "policies"))
    policies: dict[str, Policy] = {}
    if policies_dir.is_dir():
        for pfile in sorted(policies_dir.glob("*.toml")):
            pdisplay = str(pfile)
            praw = _read_toml(pfile, pdisplay, problems)
            if praw is None:
                continue
            try:
                policies[pfile.stem] = Policy.model_validate(praw, context=ctx)
            except ValidationError as exc:
                problems.extend(_format_errors(pdisplay, exc))
    else:
        problems.append(f"{display}: policies_dir: folder {policies_dir} does not exist")

    _check_references(raw, display, base, policies_dir, set(policies), problems)
    if problems:
        raise ConfigError(problems)
    assert gateway is not None
    return Settings(
        server=gateway.server,
        store=gateway.store,
        upstream=gateway.upstream,
        resources=gateway.resources,
        keys=gateway.keys,
        logging=gateway.logging,
        policies=policies,
        authorization_policy=gateway.authorization_policy,
        config_path=path,
    )


def key_path(settings: Settings, file: str) -> Path:
    """A key file path from config, relative to the config file's folder."""
    p = Path(file)
    return p if p.is_absolute() else settings.config_path.parent / p
