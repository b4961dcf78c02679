// A "legacy" OAuth 2.0 / OpenID Connect provider for mfa-gateway's tests and demo.
//
// Built on the npm package `oidc-provider` (9.x) with its OWN small username/password login page
// (interaction routes) checking an account store. It knows nothing of MFA: ID tokens carry
// `amr: ["pwd"]` and `acr: "urn:legacy:pwd"`, never `mfa`. Enabled: authorization code flow with
// PKCE (S256, required for every client), refresh tokens (offline_access + prompt=consent),
// token introspection (RFC 7662), revocation (RFC 7009), userinfo and RFC 9207 `iss` in
// authorization responses. Plain http on loopback works (cookies are not `Secure` there).
//
// Usage (every secret may also come from the environment, so it does not show in `ps`):
//   node server.mjs --port 9000 \
//     --client-id mfa-gateway --client-secret S1 \          (LEGACY_IDP_CLIENT_SECRET)
//     --redirect-uri http://127.0.0.1:8080/oauth/callback \  (repeatable)
//     --post-client-id mfa-gateway-post --post-client-secret S2 \  (LEGACY_IDP_POST_CLIENT_SECRET)
//     --introspection-client mcp-server:S3 \                (LEGACY_IDP_INTROSPECTION_CLIENT)
//     --account 'alice:correct horse' \                     (repeatable; or --accounts-file F)
//     [--issuer http://127.0.0.1:9000] [--host 127.0.0.1] [--access-token-ttl 3600]
// `--port 0` picks a free port; the ready line names the issuer actually served:
//   legacy-idp listening on http://127.0.0.1:PORT

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const MAX_FORM_BYTES = 16 * 1024;
const AMR = ['pwd'];
const ACR = 'urn:legacy:pwd';

function fail(message) {
  process.stderr.write(`legacy-idp: ${message}\n`);
  process.exit(2);
}

// ------------------------------------------------------------------ configuration

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.LEGACY_IDP_PORT ?? '9000' },
    host: { type: 'string', default: '127.0.0.1' },
    issuer: { type: 'string' },
    'client-id': { type: 'string', default: 'mfa-gateway' },
    'client-secret': { type: 'string', default: process.env.LEGACY_IDP_CLIENT_SECRET },
    'redirect-uri': { type: 'string', multiple: true, default: [] },
    'post-client-id': { type: 'string', default: 'mfa-gateway-post' },
    'post-client-secret': { type: 'string', default: process.env.LEGACY_IDP_POST_CLIENT_SECRET },
    'introspection-client': {
      type: 'string', default: process.env.LEGACY_IDP_INTROSPECTION_CLIENT,
    },
    account: { type: 'string', multiple: true, default: [] },
    'accounts-file': { type: 'string' },
    'cookie-key': { type: 'string', default: process.env.LEGACY_IDP_COOKIE_KEY },
    'access-token-ttl': { type: 'string', default: '3600' },
    help: { type: 'boolean', default: false },
  },
  strict: true,
});

if (args.help) {
  const lines = fs.readFileSync(new URL(import.meta.url), 'utf8').split('\n');
  const header = lines.slice(0, lines.findIndex((line) => !line.startsWith('//')));
  process.stdout.write(`${header.map((line) => line.slice(3)).join('\n')}\n`);
  process.exit(0);
}

const port = Number.parseInt(args.port, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`--port: not a port: ${args.port}`);
if (!args['client-secret']) fail('--client-secret (or LEGACY_IDP_CLIENT_SECRET) is required');
if (!args['post-client-secret']) fail('--post-client-secret (or LEGACY_IDP_POST_CLIENT_SECRET) is required');
if (args['redirect-uri'].length === 0) fail('at least one --redirect-uri is required');
const accessTokenTtl = Number.parseInt(args['access-token-ttl'], 10);
if (!Number.isInteger(accessTokenTtl) || accessTokenTtl < 1) fail('--access-token-ttl: seconds > 0');

let introspection = null;
if (args['introspection-client']) {
  const sep = args['introspection-client'].indexOf(':');
  if (sep < 1) fail('--introspection-client: expected ID:SECRET');
  introspection = {
    clientId: args['introspection-client'].slice(0, sep),
    clientSecret: args['introspection-client'].slice(sep + 1),
  };
}

// accounts: { username: { password, name, email } }
const accounts = new Map();
function addAccount(username, info) {
  if (!username || typeof info.password !== 'string' || info.password.length === 0) {
    fail(`account ${JSON.stringify(username)}: a username and a non-empty password are required`);
  }
  accounts.set(username, {
    password: info.password,
    name: info.name ?? username[0].toUpperCase() + username.slice(1),
    email: info.email ?? `${username}@example.test`,
  });
}
if (args['accounts-file']) {
  let parsed;
  try {
    parsed = JSON.parse(fs.readFileSync(args['accounts-file'], 'utf8'));
  } catch (err) {
    fail(`--accounts-file: ${err.message}`);
  }
  for (const [username, info] of Object.entries(parsed)) {
    addAccount(username, typeof info === 'string' ? { password: info } : info);
  }
}
for (const spec of args.account) {
  const sep = spec.indexOf(':');
  if (sep < 1) fail('--account: expected USERNAME:PASSWORD');
  addAccount(spec.slice(0, sep), { password: spec.slice(sep + 1) });
}
if (accounts.size === 0) fail('no accounts: give --account USER:PASSWORD or --accounts-file');

function passwordMatches(username, password) {
  const account = accounts.get(username);
  // Hash both sides so the comparison is constant-time whatever the lengths.
  const want = crypto.createHash('sha256').update(account ? account.password : '\0').digest();
  const got = crypto.createHash('sha256').update(password ?? '').digest();
  return Boolean(account) && crypto.timingSafeEqual(want, got);
}

// ------------------------------------------------------------------ pages

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

function sendPage(res, status, title, body) {
  const html = `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${escapeHtml(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:sans-serif;max-width:26em;margin:3em auto;padding:0 1em}
label{display:block;margin:.8em 0 .2em}input{width:100%;padding:.4em;box-sizing:border-box}
button{margin-top:1em;padding:.5em 1.5em}.error{color:#b00020}.muted{color:#666;font-size:.9em}</style>
</head><body>
<h1>Legacy Corp sign-in</h1>
${body}
</body></html>`;
  res.writeHead(status, {
    'Content-Type': 'text/html; charset=utf-8',
    'Cache-Control': 'no-store',
    'X-Frame-Options': 'DENY',
    'Content-Security-Policy': "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    'Referrer-Policy': 'no-referrer',
    'X-Content-Type-Options': 'nosniff',
  });
  res.end(html);
}

function loginPage(res, { uid, clientName, username = '', error = null, status = 200 }) {
  const message = error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : '';
  sendPage(res, status, 'Sign in', `
<p>Sign in to continue to <strong>${escapeHtml(clientName)}</strong>.</p>
${message}
<form method="post" action="/interaction/${encodeURIComponent(uid)}/login" autocomplete="off">
  <label for="username">Username</label>
  <input id="username" name="username" value="${escapeHtml(username)}" autocomplete="username" required autofocus>
  <label for="password">Password</label>
  <input id="password" name="password" type="password" autocomplete="current-password" required>
  <button type="submit">Sign in</button>
</form>
<form method="post" action="/interaction/${encodeURIComponent(uid)}/abort">
  <button type="submit" class="muted">Cancel</button>
</form>
<p class="muted">This provider knows passwords only.</p>`);
}

// ------------------------------------------------------------------ provider

function generateSigningKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `legacy-${crypto.randomBytes(6).toString('hex')}`, alg: 'RS256', use: 'sig' };
}

function buildProvider(issuer) {
  const gatewayClient = (clientId, clientSecret, method) => ({
    client_id: clientId,
    client_secret: clientSecret,
    client_name: 'mfa-gateway',
    application_type: 'web',
    redirect_uris: args['redirect-uri'],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: method,
  });
  const clients = [
    gatewayClient(args['client-id'], args['client-secret'], 'client_secret_basic'),
    gatewayClient(args['post-client-id'], args['post-client-secret'], 'client_secret_post'),
  ];
  if (introspection) {
    // A resource server: it may only introspect, it never takes part in a flow.
    clients.push({
      client_id: introspection.clientId,
      client_secret: introspection.clientSecret,
      redirect_uris: [],
      response_types: [],
      grant_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    });
  }

  const configuration = {
    clients,
    jwks: { keys: [generateSigningKey()] },
    cookies: {
      // Distinct from the gateway's `mfagw_*` cookies: both share the browser's cookie jar on
      // 127.0.0.1 (cookies ignore ports).
      names: {
        session: 'legacy_session',
        interaction: 'legacy_interaction',
        resume: 'legacy_interaction_resume',
      },
      keys: [args['cookie-key'] || crypto.randomBytes(32).toString('base64url')],
      long: { httpOnly: true, sameSite: 'lax' },
      short: { httpOnly: true, sameSite: 'lax' },
    },
    acrValues: [ACR],
    // amr/acr reach the ID token only when tied to a scope.
    claims: {
      openid: ['sub', 'amr', 'acr', 'auth_time', 'sid'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    scopes: ['openid', 'offline_access', 'profile', 'email'],
    responseTypes: ['code'],
    clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
    pkce: { required: () => true },
    conformIdTokenClaims: true,
    clientBasedCORS: () => false,
    features: {
      devInteractions: { enabled: false },
      introspection: {
        enabled: true,
        // The resource server may introspect anything; a client only its own tokens.
        allowedPolicy: async (ctx, client, token) => (
          (introspection !== null && client.clientId === introspection.clientId)
          || token.clientId === client.clientId
        ),
      },
      revocation: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
      },
      userinfo: { enabled: true },
      resourceIndicators: { enabled: false },
      pushedAuthorizationRequests: { enabled: false },
      dPoP: { enabled: false },
      rpInitiatedLogout: { enabled: false },
    },
    rotateRefreshToken: true,
    ttl: {
      AccessToken: accessTokenTtl,
      AuthorizationCode: 60,
      IdToken: 3600,
      RefreshToken: 14 * 24 * 3600,
      Interaction: 600,
      Session: 24 * 3600,
      Grant: 14 * 24 * 3600,
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(ctx, sub) {
      const account = accounts.get(sub);
      if (!account) return undefined;
      return {
        accountId: sub,
        async claims() {
          return {
            sub,
            name: account.name,
            preferred_username: sub,
            email: account.email,
            email_verified: true,
          };
        },
      };
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.set('Cache-Control', 'no-store');
      ctx.set('X-Frame-Options', 'DENY');
      ctx.body = `<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Error</title></head>
<body><h1>Legacy Corp sign-in: error</h1>${Object.entries(out)
    .map(([k, v]) => `<p><strong>${escapeHtml(k)}</strong>: ${escapeHtml(v)}</p>`).join('')}</body></html>`;
    },
  };
  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (ctx, err) => {
    process.stderr.write(`legacy-idp: server_error ${err?.stack ?? err}\n`);
  });
  provider.on('grant.success', (ctx) => {
    process.stderr.write(`legacy-idp: token issued client=${ctx.oidc.client?.clientId}\n`);
  });
  provider.on('grant.error', (ctx, err) => {
    process.stderr.write(`legacy-idp: token refused client=${ctx.oidc.client?.clientId} error=${err.error}\n`);
  });
  return provider;
}

// ------------------------------------------------------------------ interaction routes

async function readForm(req) {
  const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if (type !== 'application/x-www-form-urlencoded') {
    const err = new Error('expected a urlencoded form');
    err.status = 415;
    throw err;
  }
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_FORM_BYTES) {
      const err = new Error('form too large');
      err.status = 413;
      throw err;
    }
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function autoConsent(provider, details) {
  const { params, session, prompt } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  return grant.save();
}

async function handleInteraction(provider, req, res, url) {
  const match = url.pathname.match(/^\/interaction\/([A-Za-z0-9_-]+)(\/(login|abort))?$/);
  if (!match) {
    sendPage(res, 404, 'Not found', '<p class="error">Not found.</p>');
    return;
  }
  const [, uid, , action] = match;
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    sendPage(res, 400, 'Error', '<p class="error">This sign-in request does not belong to this browser.</p>');
    return;
  }
  const client = await provider.Client.find(details.params.client_id);
  const clientName = client?.clientName ?? details.params.client_id;

  if (req.method === 'GET' && !action) {
    if (details.prompt.name === 'login') {
      loginPage(res, { uid, clientName });
      return;
    }
    if (details.prompt.name === 'consent') {
      // Consent is implied for the registered first-party client (the gateway).
      const grantId = await autoConsent(provider, details);
      await provider.interactionFinished(req, res, { consent: { grantId } }, {
        mergeWithLastSubmission: true,
      });
      return;
    }
    sendPage(res, 400, 'Error', '<p class="error">Unsupported sign-in step.</p>');
    return;
  }

  if (req.method === 'POST' && action === 'login') {
    if (details.prompt.name !== 'login') {
      sendPage(res, 400, 'Error', '<p class="error">Not expecting a sign-in now.</p>');
      return;
    }
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    if (!passwordMatches(username, form.get('password'))) {
      process.stderr.write(`legacy-idp: login failed user=${JSON.stringify(username.slice(0, 64))}\n`);
      loginPage(res, {
        uid, clientName, username, status: 401, error: 'Invalid username or password.',
      });
      return;
    }
    process.stderr.write(`legacy-idp: login ok user=${JSON.stringify(username)}\n`);
    await provider.interactionFinished(req, res, {
      login: { accountId: username, amr: AMR, acr: ACR, remember: false },
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (req.method === 'POST' && action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'the user cancelled the sign-in',
    }, { mergeWithLastSubmission: false });
    return;
  }

  res.writeHead(405, { Allow: 'GET, POST' });
  res.end();
}

// ------------------------------------------------------------------ server

const server = http.createServer();
server.requestTimeout = 30_000;
server.headersTimeout = 10_000;

server.listen(port, args.host, () => {
  const actual = server.address().port;
  const issuer = args.issuer ?? `http://${args.host}:${actual}`;
  const provider = buildProvider(issuer);
  const callback = provider.callback();

  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname.startsWith('/interaction/')) {
      handleInteraction(provider, req, res, url).catch((err) => {
        const expired = err instanceof errors.SessionNotFound;
        const status = err.status ?? (expired ? 400 : 500);
        if (status >= 500) process.stderr.write(`legacy-idp: interaction error ${err.stack}\n`);
        if (!res.headersSent) {
          sendPage(res, status, 'Error', `<p class="error">${expired
            ? 'This sign-in request has expired or was already used; start again.'
            : 'The sign-in request could not be processed.'}</p>`);
        } else {
          res.end();
        }
      });
      return;
    }
    callback(req, res);
  });
  process.stdout.write(`legacy-idp listening on ${issuer}\n`);
});

server.on('error', (err) => fail(`cannot listen: ${err.message}`));

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
