"""Keys, tokens and management-API helpers for the key, rotation and expiry tests.

Key pairs are generated in the test with `cryptography`; tokens are minted with PyJWT, except
the hostile ones (`alg: none`, HS/RS confusion), which are assembled by hand because PyJWT
refuses to build them. Nothing here uses herald's own code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
import jwt
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from websockets.exceptions import InvalidStatus

from herald_client import (
    ADMIN_KEY,
    HEARTBEAT_MS,
    HttpReply,
    Server,
    assert_delivery,
    assert_error_body,
    expect_refusal,
    http_request,
    now,
    open_ws,
    expect_silence,
    recv_json,
    start_server,
    token_payload,
)

HS_ALGS = ["HS256", "HS384", "HS512"]
RSA_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
ALGS = HS_ALGS + RSA_ALGS + ["ES256", "ES384", "EdDSA"]
#: One asymmetric algorithm of each family.
ASYM_FAMILIES = ["RS256", "PS384", "ES256", "ES384", "EdDSA"]

WWW_AUTH = 'Bearer error="invalid_token"'


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


@dataclass
class KeyPair:
    """A verification key as herald gets it, and what signs tokens for it."""

    alg: str
    #: The HMAC secret (str) or the private key object.
    signer: Any
    #: For asymmetric algs: the public key, PEM (SubjectPublicKeyInfo).
    public_pem: str | None
    #: The public key (or the secret, for HS*) as a JWK, without `kid`/`alg`.
    jwk_base: dict

    @property
    def is_hmac(self) -> bool:
        return self.alg.startswith("HS")

    def spec(self) -> dict:
        """`{"alg","secret"}` or `{"alg","pem"}`: the API's (and config's) key body."""
        if self.is_hmac:
            return {"alg": self.alg, "secret": self.signer}
        return {"alg": self.alg, "pem": self.public_pem}

    def jwk(self, kid: str | None, with_alg: bool = True) -> dict:
        j = dict(self.jwk_base)
        if kid is not None:
            j["kid"] = kid
        if with_alg:
            j["alg"] = self.alg
        return j

    def token(
        self,
        sub: str | None = "alice",
        *,
        kid: str | None,
        exp: int | None | str = "default",
        **claims: Any,
    ) -> str:
        payload = token_payload(sub, exp, claims)
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(payload, self.signer, algorithm=self.alg, headers=headers)

    def config_toml(self, kid: str, pem_file: Path | None = None) -> str:
        """A `[[projects.keys]]` table for this key (PEM inline, or in `pem_file`)."""
        text = f"\n[[projects.keys]]\nkid = {q(kid)}\nalg = {q(self.alg)}\n"
        if self.is_hmac:
            return text + f"secret = {q(self.signer)}\n"
        if pem_file is not None:
            pem_file.write_text(self.public_pem)
            return text + f"pem_file = {q(str(pem_file))}\n"
        return text + f"pem = {q(self.public_pem)}\n"


def _pem(public_key: Any) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def make_key(alg: str) -> KeyPair:
    """A fresh key for `alg`."""
    if alg in HS_ALGS:
        secret = secrets.token_urlsafe({"HS256": 32, "HS384": 48, "HS512": 64}[alg])
        return KeyPair(alg, secret, None, HMACAlgorithm.to_jwk(secret.encode(), as_dict=True))
    if alg in RSA_ALGS:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk_base = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk_base = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
        jwk_base = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        jwk_base = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        raise ValueError(alg)
    jwk_base = {k: v for k, v in jwk_base.items() if k not in ("kid", "alg", "key_ops", "use")}
    return KeyPair(alg, private, _pem(private.public_key()), jwk_base)


def q(s: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(s)


# --------------------------------------------------------------------------------------------
# Hand-made hostile tokens
# --------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def none_token(sub: str = "alice", kid: str | None = None, exp: int | None = None) -> str:
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    payload = {"sub": sub, "exp": exp if exp is not None else now() + 3600}
    return f"{_segment(header)}.{_segment(payload)}."


def hmac_token(
    secret: bytes, sub: str = "alice", kid: str | None = None, alg: str = "HS256", **claims: Any
) -> str:
    """An HS* token with an arbitrary byte string as the secret (PyJWT refuses PEM secrets)."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    payload = {"sub": sub, "exp": now() + 3600, **claims}
    signing_input = f"{_segment(header)}.{_segment(payload)}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    sig = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(sig)}"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def server_toml(projects: str, shards: int = 2, heartbeat_ms: int = HEARTBEAT_MS) -> str:
    """A config with the test admin key and the given `[[projects]]` tables."""
    return f"""\
[server]
shards = {shards}
drain_timeout_ms = 2000

[ws]
heartbeat_interval_ms = {heartbeat_ms}

[api]
admin_key = "{ADMIN_KEY}"
{projects}"""


def project_toml(pid: str, keys: str = "", **settings: Any) -> str:
    """A `[[projects]]` table: settings (TOML values via JSON) then key tables."""
    text = f"\n[[projects]]\nid = {q(pid)}\n"
    for k, v in settings.items():
        text += f"{k} = {json.dumps(v)}\n"
    return text + keys


# --------------------------------------------------------------------------------------------
# Management API
# --------------------------------------------------------------------------------------------


def _headers(key: str | None) -> dict:
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return h


def put_key(
    server: Server, project: str, kid: str, body: dict | bytes, key: str | None = ADMIN_KEY
) -> HttpReply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_request(
        "PUT", f"{server.api_url}/api/v1/projects/{project}/keys/{kid}", data, _headers(key)
    )


def delete_key(
    server: Server, project: str, kid: str, disconnect: bool = False, key: str | None = ADMIN_KEY
) -> HttpReply:
    url = f"{server.api_url}/api/v1/projects/{project}/keys/{kid}"
    if disconnect:
        url += "?disconnect=true"
    return http_request("DELETE", url, None, _headers(key))


def create_project(server: Server, body: dict | bytes, key: str | None = ADMIN_KEY) -> HttpReply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_request("POST", f"{server.api_url}/api/v1/projects", data, _headers(key))


def assert_status(r: HttpReply, status: int, error: str | None = None) -> None:
    assert r.status == status, f"expected {status}, got {r.status}: {r.body!r}"
    if error is not None:
        assert_error_body(r.body, error)
    elif status == 204:
        assert r.body == b"", r.body


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------


async def connect_ok(
    server: Server, project: str, token: str, sub: str = "alice", exp: int | None = None, **kw: Any
):
    """Opens a connection that must be accepted; checks the welcome's project and user."""
    ws = await open_ws(server, project, token, **kw)
    _, welcome = await recv_json(ws)
    assert welcome.get("type") == "welcome", welcome
    assert welcome["project"] == project, welcome
    assert welcome["user"] == sub, welcome
    if exp is not None:
        assert welcome["exp"] == exp, welcome
    return ws, welcome


async def refused_401(server: Server, project: str, token: str) -> None:
    """The handshake must be refused with 401 unauthorized and the Bearer challenge."""
    r = await expect_refusal(server, project, token, 401, "unauthorized")
    assert r.headers.get("WWW-Authenticate") == WWW_AUTH, dict(r.headers)


async def wait_until_accepted(
    server: Server, project: str, token: str, sub: str = "alice", timeout: float = 5.0
):
    """Retries a handshake until it is accepted (after an asynchronous change such as SIGHUP)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return await connect_ok(server, project, token, sub)
        except InvalidStatus as e:
            last = (e.response.status_code, bytes(e.response.body))
        await asyncio.sleep(0.1)
    raise AssertionError(f"handshake still refused after {timeout}s: {last!r}")


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def restart(
    servers: Any, old: Server, config: str | None = None, sig: int = signal.SIGTERM
) -> Server:
    """Stops `old` with `sig` (SIGTERM: a clean stop; SIGKILL: a crash) and starts the real
    binary again on the same work dir (same config file unless `config` is given, same
    `--state-dir`)."""
    workdir = old.stderr_path.parent
    old.stopped_by_test = True
    code = old.stop(sig, timeout=10)
    if sig == signal.SIGTERM:
        assert code == 0, f"herald exited with {code} on SIGTERM; stderr:\n{old.stderr_tail()}"
    if config is None:
        config = (workdir / "herald.toml").read_text()
    # Keep the first run's stderr next to the second's.
    n = len(list(workdir.glob("herald.stderr.*"))) + 1
    old.stderr_path.rename(workdir / f"herald.stderr.{n}")
    new = start_server(workdir, config=config)
    servers.started.append(new)
    return new


def wait_for_log(server: Server, needle: str, timeout: float = 5.0, after: int = 0) -> str:
    """Waits until stderr (from byte `after` on) contains `needle`; returns that part."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.stderr_path.read_bytes()[after:].decode("utf-8", "replace")
        if needle in text:
            return text
        if time.monotonic() >= deadline:
            raise AssertionError(f"no log line with {needle!r} within {timeout}s; stderr:\n{text[-3000:]}")
        time.sleep(0.05)


async def open_many(server: Server, project: str, key: KeyPair, kid: str, prefix: str, n: int):
    """n accepted connections with subs `<prefix>0..`, all with `kid`."""
    pairs = await asyncio.gather(
        *(
            connect_ok(server, project, key.token(f"{prefix}{i}", kid=kid), f"{prefix}{i}")
            for i in range(n)
        )
    )
    return [ws for ws, _ in pairs]


async def each_gets_one(conns: list, topic: str, data: Any, mid: str) -> None:
    """Every connection receives exactly this one delivery, then nothing."""
    frames = await asyncio.gather(*(recv_json(ws) for ws in conns))
    for _, msg in frames:
        assert_delivery(msg, topic, data, mid)
    await asyncio.gather(*(expect_silence(ws) for ws in conns))
