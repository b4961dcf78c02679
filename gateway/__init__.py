"""mfa-gateway: a TOTP step-up and MFA-enforcing reverse proxy for MCP servers."""

__version__ = "0.1.0"
