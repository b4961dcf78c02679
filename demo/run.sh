#!/usr/bin/env bash
# The mfa-gateway demo stack on one machine (loopback only):
#   legacy OIDC provider (node, oidc-provider, password login)  http://127.0.0.1:9000
#   MCP server (official Python SDK)                             http://127.0.0.1:9100/mcp
#   mfa-gateway (embedded memory:// store, user alice enrolled)  http://127.0.0.1:8080/mcp
# Needs python3 (3.11+, with venv), node (20+) and npm. Re-running is safe: what exists in
# demo/.state/ (venv, secrets, keys, alice's TOTP seed) is reused. Ctrl-C stops all three.
# Ports and the demo password can be changed with IDP_PORT, MCP_PORT, GATEWAY_PORT, DEMO_PASSWORD.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
STATE="$ROOT/demo/.state"
VENV="$STATE/venv"
LOGS="$STATE/logs"
IDP_PORT="${IDP_PORT:-9000}"
MCP_PORT="${MCP_PORT:-9100}"
GATEWAY_PORT="${GATEWAY_PORT:-8080}"
export DEMO_PASSWORD="${DEMO_PASSWORD:-correct horse battery staple}"
DEMO_USER=alice

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 is required (3.11 or newer)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 must be 3.11 or newer"
command -v node >/dev/null || die "node is required (20 or newer)"
command -v npm >/dev/null || die "npm is required"
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || die "node must be 20 or newer"

for port in "$IDP_PORT" "$MCP_PORT" "$GATEWAY_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port on 127.0.0.1 is in use (an earlier demo still running?)"
  fi
done

mkdir -p "$STATE"

# ---------------------------------------------------------------- Python: venv + package
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
py_stamp="$(stamp_of pyproject.toml)"
if [ "$(cat "$STATE/.pip-stamp" 2>/dev/null)" != "$py_stamp" ]; then
  say "installing mfa-gateway (and the MCP SDK for the demo server) into the venv"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . 'mcp>=2.3,<3'
  echo "$py_stamp" > "$STATE/.pip-stamp"
fi
GW="$VENV/bin/mfa-gateway"

# ---------------------------------------------------------------- Node: the legacy provider
npm_stamp="$(stamp_of demo/legacy_idp/package-lock.json)"
if [ ! -d demo/legacy_idp/node_modules ] || [ "$(cat "$STATE/.npm-stamp" 2>/dev/null)" != "$npm_stamp" ]; then
  say "npm ci in demo/legacy_idp"
  npm ci --prefix demo/legacy_idp --no-audit --no-fund --loglevel=error
  echo "$npm_stamp" > "$STATE/.npm-stamp"
fi

# ---------------------------------------------------------------- secrets and keys (0600)
umask 077  # from here on: secrets, keys, configs and logs readable by this user only
mkdir -p "$LOGS" "$STATE/secrets" "$STATE/keys" "$STATE/policies"
secret_file() {  # secret_file NAME COMMAND...: create once
  local file="$STATE/secrets/$1"; shift
  if [ ! -s "$file" ]; then "$@" > "$file.tmp" && mv "$file.tmp" "$file"; fi
}
secret_file encryption-key "$GW" keys generate --encryption-key
secret_file cookie-secret "$GW" keys generate --cookie-secret
secret_file upstream-client-secret "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))'
secret_file idp-post-client-secret "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))'
secret_file idp-introspection-secret "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))'
secret_file idp-cookie-key "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))'
if [ ! -s "$STATE/keys/demo-es256.pem" ]; then
  rm -f "$STATE/keys/demo-es256.pem"
  "$GW" keys generate --alg ES256 --out "$STATE/keys/demo-es256.pem" >/dev/null
fi
# The provider's account store: the password stays out of the process list.
DEMO_USER="$DEMO_USER" "$VENV/bin/python" -c '
import json, os
print(json.dumps({os.environ["DEMO_USER"]: {"password": os.environ["DEMO_PASSWORD"]}}))
' > "$STATE/secrets/idp-accounts.json"
chmod 600 "$STATE"/secrets/* "$STATE"/keys/*

# ---------------------------------------------------------------- configuration
cat > "$STATE/gateway.toml" <<EOF
# Written by demo/run.sh on every start (edit run.sh, not this file).
policies_dir = "policies"
authorization_policy = "default"

[server]
listen = "127.0.0.1:$GATEWAY_PORT"
public_url = "http://127.0.0.1:$GATEWAY_PORT"
dev_http_loopback = true

[store]
url = "memory://"
encryption_key = "file:secrets/encryption-key"

[upstream]
issuer = "http://127.0.0.1:$IDP_PORT"
client_id = "mfa-gateway"
client_secret = "file:secrets/upstream-client-secret"
token_endpoint_auth_method = "client_secret_basic"
scopes = ["openid", "profile", "email"]
allow_insecure_http_loopback = true

[[resources]]
path = "/mcp"
upstream = "http://127.0.0.1:$MCP_PORT/mcp"
policy = "default"
name = "Demo MCP server"
forward_token = "none"

[keys]
cookie_secret = "file:secrets/cookie-secret"

[[keys.signing]]
kid = "demo-es256"
file = "keys/demo-es256.pem"
alg = "ES256"

[logging]
level = "info"
format = "console"
EOF

cat > "$STATE/policies/default.toml" <<'EOF'
# Written by demo/run.sh on every start. Every other key keeps its default (policies/default.toml).
[stepup]
enrollment = "admin"
issuer_label = "mfa-gateway demo"

[mcp]
required_amr = ["mfa"]
scopes_supported = ["mcp"]

[[mcp.rules]]
method = "tools/call"
tool = "delete_everything"
effect = "deny"
description = "never let a client delete everything"

[[mcp.rules]]
method = "tools/call"
tool = "transfer_funds"
max_auth_age = "5m"
description = "moving money needs a TOTP step-up within the last 5 minutes"
EOF

"$GW" check-config --config "$STATE/gateway.toml" >/dev/null || die "the demo configuration is invalid"

# ---------------------------------------------------------------- start the peers
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_ready() {  # wait_ready NAME PID LOGFILE PATTERN
  for _ in $(seq 1 200); do
    grep -q "$4" "$3" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$3" >&2; die "$1 exited; log: $3"; }
    sleep 0.1
  done
  tail -n 20 "$3" >&2
  die "$1 did not start in 20 s; log: $3"
}

say "starting the legacy provider on http://127.0.0.1:$IDP_PORT (log: $LOGS/legacy_idp.log)"
LEGACY_IDP_CLIENT_SECRET="$(cat "$STATE/secrets/upstream-client-secret")" \
LEGACY_IDP_POST_CLIENT_SECRET="$(cat "$STATE/secrets/idp-post-client-secret")" \
LEGACY_IDP_INTROSPECTION_CLIENT="mcp-server:$(cat "$STATE/secrets/idp-introspection-secret")" \
LEGACY_IDP_COOKIE_KEY="$(cat "$STATE/secrets/idp-cookie-key")" \
NODE_NO_WARNINGS=1 \
  node demo/legacy_idp/server.mjs --port "$IDP_PORT" \
    --redirect-uri "http://127.0.0.1:$GATEWAY_PORT/oauth/callback" \
    --accounts-file "$STATE/secrets/idp-accounts.json" > "$LOGS/legacy_idp.log" 2>&1 &
PIDS+=($!)
wait_ready "legacy provider" "${PIDS[-1]}" "$LOGS/legacy_idp.log" "legacy-idp listening on"

say "starting the MCP server on http://127.0.0.1:$MCP_PORT/mcp (log: $LOGS/mcp_server.log)"
PYTHONUNBUFFERED=1 "$VENV/bin/python" demo/mcp_server.py --port "$MCP_PORT" \
  --record "$LOGS/mcp_records.jsonl" > "$LOGS/mcp_server.log" 2>&1 &
PIDS+=($!)
wait_ready "MCP server" "${PIDS[-1]}" "$LOGS/mcp_server.log" "mcp-server listening on"

say "starting the gateway on http://127.0.0.1:$GATEWAY_PORT"
# In the foreground: Ctrl-C reaches it directly (it stops gracefully), then the EXIT trap stops
# the provider and the MCP server.
"$VENV/bin/python" demo/launch_gateway.py --config "$STATE/gateway.toml" --user "$DEMO_USER" \
  --seed-file "$STATE/secrets/$DEMO_USER.totp"
