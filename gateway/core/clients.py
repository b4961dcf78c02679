"""What a client is, and which client metadata the gateway accepts (RFC 7591, CIMD draft).

Pure: no I/O. `Client` is the one record every endpoint works with, whatever its origin: a
pre-registered client from policy, a dynamically registered one (`POST /oauth/register`) or a
client-ID metadata document (an https URL as `client_id`). `parse_client_metadata` validates a
registration request or a fetched document (R23, R24); `check_cimd_url` the shape of a
metadata-document URL (https, a path, no fragment, userinfo or dot segments).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

from gateway.core.errors import InvalidClientMetadata, InvalidRedirectUri
from gateway.core.redirects import validate_redirect_uri

ClientKind = Literal["static", "dynamic", "cimd"]
PUBLIC: Final = "none"
AUTH_METHODS: tuple[str, ...] = ("none", "client_secret_basic", "client_secret_post")
GRANT_TYPES: tuple[str, ...] = ("authorization_code", "refresh_token")
MAX_REDIRECT_URIS = 10
MAX_NAME_LENGTH = 100
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]+")


@dataclass(frozen=True)
class Client:
    """A client the gateway knows; `secret_hash` is set only for confidential clients."""

    client_id: str
    kind: ClientKind
    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str = PUBLIC
    secret_hash: str | None = None
    client_name: str | None = None
    grant_types: tuple[str, ...] = GRANT_TYPES
    scopes: tuple[str, ...] | None = None
    application_type: str = "web"
    created_at: float = 0.0
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def confidential(self) -> bool:
        return self.secret_hash is not None

    @property
    def display_name(self) -> str:
        return self.client_name or self.client_id

    def allows_grant(self, grant_type: str) -> bool:
        return grant_type in self.grant_types

    def to_record(self) -> dict[str, Any]:
        """The JSON-able form kept by `ClientStore` (never a plaintext secret)."""
        return {
            "client_id": self.client_id,
            "kind": self.kind,
            "redirect_uris": list(self.redirect_uris),
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "secret_hash": self.secret_hash,
            "client_name": self.client_name,
            "grant_types": list(self.grant_types),
            "scopes": None if self.scopes is None else list(self.scopes),
            "application_type": self.application_type,
            "created_at": self.created_at,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Client:
        """Rebuild from `to_record`; `ValueError` if the record is not one of ours."""
        try:
            kind = data["kind"]
            if kind not in ("static", "dynamic", "cimd"):
                raise ValueError("unknown client kind")
            scopes = data.get("scopes")
            return cls(
                client_id=str(data["client_id"]),
                kind=kind,
                redirect_uris=tuple(str(u) for u in data["redirect_uris"]),
                token_endpoint_auth_method=str(data.get("token_endpoint_auth_method", "none")),
                secret_hash=data.get("secret_hash") or None,
                client_name=data.get("client_name") or None,
                grant_types=tuple(str(g) for g in data.get("grant_types", GRANT_TYPES)),
                scopes=None if scopes is None else tuple(str(s) for s in scopes),
                application_type=str(data.get("application_type", "web")),
                created_at=float(data.get("created_at", 0.0)),
                extra={str(k): str(v) for k, v in dict(data.get("extra") or {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError("malformed client record") from exc


@dataclass(frozen=True)
class ClientMetadata:
    """Validated RFC 7591 client metadata (from a registration or a metadata document)."""

    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str
    grant_types: tuple[str, ...]
    response_types: tuple[str, ...]
    client_name: str | None
    scopes: tuple[str, ...] | None
    application_type: str
    extra: Mapping[str, str]


def _string_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidClientMetadata(f"{name} must be an array of strings")
    return list(value)


def _optional_text(doc: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or _PRINTABLE.fullmatch(value) is None:
        raise InvalidClientMetadata(f"{name} must be a short printable string")
    return value


def _https_url(doc: Mapping[str, Any], name: str) -> str | None:
    value = _optional_text(doc, name, 2000)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or "@" in parts.netloc:
        raise InvalidClientMetadata(f"{name} must be an https URL")
    return value


def parse_client_metadata(
    doc: object,
    *,
    allowed_custom_schemes: Iterable[str] = (),
    supported_scopes: Sequence[str] = (),
    metadata_document: bool = False,
) -> ClientMetadata:
    """Validate client metadata; `InvalidRedirectUri` / `InvalidClientMetadata` (R23, R24).

    A metadata document (`metadata_document=True`) describes a public client: it may not carry
    a shared secret and must use `token_endpoint_auth_method: none`.
    """
    if not isinstance(doc, Mapping):
        raise InvalidClientMetadata("client metadata must be a JSON object")
    if "redirect_uris" not in doc:
        raise InvalidRedirectUri("redirect_uris is required")
    raw_uris = doc["redirect_uris"]
    if not isinstance(raw_uris, list) or not raw_uris:
        raise InvalidRedirectUri("redirect_uris must be a non-empty array")
    if len(raw_uris) > MAX_REDIRECT_URIS:
        raise InvalidRedirectUri("too many redirect_uris")
    schemes = tuple(allowed_custom_schemes)
    uris = tuple(
        dict.fromkeys(validate_redirect_uri(u, allowed_custom_schemes=schemes) for u in raw_uris)
    )

    default_method = "none" if metadata_document else "client_secret_basic"
    method = doc.get("token_endpoint_auth_method", default_method)
    if method not in AUTH_METHODS:
        raise InvalidClientMetadata(
            "token_endpoint_auth_method must be none, client_secret_basic or client_secret_post"
        )
    if metadata_document:
        if method != "none":
            raise InvalidClientMetadata("a metadata document client must be public (none)")
        if any(k in doc for k in ("client_secret", "client_secret_expires_at")):
            raise InvalidClientMetadata("a metadata document must not carry a client secret")

    grants = tuple(
        dict.fromkeys(_string_list(doc.get("grant_types", ["authorization_code"]), "grant_types"))
    )
    if "authorization_code" not in grants or any(g not in GRANT_TYPES for g in grants):
        raise InvalidClientMetadata(
            "grant_types must include authorization_code and may add only refresh_token"
        )
    responses = tuple(
        dict.fromkeys(_string_list(doc.get("response_types", ["code"]), "response_types"))
    )
    if responses != ("code",):
        raise InvalidClientMetadata('response_types must be ["code"]')

    app_type = doc.get("application_type", "web")
    if app_type not in ("web", "native"):
        raise InvalidClientMetadata("application_type must be web or native")

    scopes: tuple[str, ...] | None = None
    raw_scope = doc.get("scope")
    if raw_scope is not None:
        if not isinstance(raw_scope, str):
            raise InvalidClientMetadata("scope must be a space-separated string")
        known = tuple(dict.fromkeys(s for s in raw_scope.split(" ") if s in supported_scopes))
        # Nothing we know of: no narrowing (the authorization endpoint filters by policy anyway).
        scopes = known or None

    extra: dict[str, str] = {}
    for name in ("client_uri", "logo_uri", "tos_uri", "policy_uri"):
        url = _https_url(doc, name)
        if url is not None:
            extra[name] = url
    for name in ("software_id", "software_version"):
        text = _optional_text(doc, name, 200)
        if text is not None:
            extra[name] = text

    return ClientMetadata(
        redirect_uris=uris,
        token_endpoint_auth_method=method,
        grant_types=grants,
        response_types=responses,
        client_name=_optional_text(doc, "client_name", MAX_NAME_LENGTH),
        scopes=scopes,
        application_type=app_type,
        extra=extra,
    )


class CimdUrlError(ValueError):
    """A `client_id` that is not an acceptable client-ID metadata document URL."""


class CimdError(Exception):
    """A metadata document could not be used; the message is a log reason, never content."""


def looks_like_cimd(client_id: str) -> bool:
    """True for client ids that are URLs (they can only be metadata documents)."""
    return client_id.startswith(("https://", "http://"))


def check_cimd_url(url: str, *, allow_http: bool = False) -> str:
    """Return `url` if it may name a metadata document; `CimdUrlError` otherwise (R24)."""
    if "#" in url:
        raise CimdUrlError("must not have a fragment")
    if len(url) > 2000 or re.fullmatch(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]+", url) is None:
        raise CimdUrlError("not a plain URL")
    parts = urlsplit(url)
    if parts.scheme != "https" and not (allow_http and parts.scheme == "http"):
        raise CimdUrlError("must be https")
    if "@" in parts.netloc:
        raise CimdUrlError("must not have userinfo")
    if not parts.hostname:
        raise CimdUrlError("must have a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise CimdUrlError("has an invalid port") from None
    if not parts.path or parts.path == "/":
        raise CimdUrlError("must have a path")
    segments = parts.path.split("/")[1:]
    if any(unquote(seg) in (".", "..") for seg in segments):
        raise CimdUrlError("must not have dot segments")
    return url
