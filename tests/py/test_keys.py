"""Verification keys of every algorithm, from the config (PEM, PEM file, inline JWKS,
JWKS file) and from the API (PEM/secret body, bare JWK), tokens minted by PyJWT with keys
generated here; every refusal (401) of a bad token; the same kid in two projects."""

from __future__ import annotations

import json

import jwt
import pytest

from conftest import Servers
from herald_client import close_all, now, run
from keytools import (
    ALGS,
    assert_status,
    connect_ok,
    hmac_token,
    make_key,
    none_token,
    project_toml,
    put_key,
    q,
    refused_401,
    server_toml,
)

# --------------------------------------------------------------------------------------------
# Every algorithm, every way of registering a key
# --------------------------------------------------------------------------------------------

#: Algorithms whose JWK implies the alg (EC curves, OKP): their JWKs are given without `alg`.
IMPLIED = {"ES256", "ES384", "EdDSA"}
#: Config keys given by file instead of inline.
BY_FILE = {"RS384", "ES384", "EdDSA"}


@pytest.fixture(scope="module")
def algs(tmp_path_factory):
    """One server with project `algs`: a config key (`cfg-<alg>`) and an inline-JWKS key
    (`jwks-<alg>`) for every algorithm, project `algsfile` whose keys come from a JWKS
    file, and project `algsapi` for the keys the tests PUT themselves (a project holds at
    most 32 keys)."""
    work = tmp_path_factory.mktemp("algs")
    cfg_keys = {a: make_key(a) for a in ALGS}
    jwks_keys = {a: make_key(a) for a in ALGS}
    file_keys = {a: make_key(a) for a in ("RS512", "ES256", "EdDSA")}
    keys_toml = ""
    for alg, k in cfg_keys.items():
        if alg in BY_FILE:
            keys_toml += k.config_toml(f"cfg-{alg}", pem_file=work / f"cfg-{alg}.pem")
        elif alg == "HS512":
            (work / "hs512.secret").write_text(k.signer + "\n")
            keys_toml += (
                f"\n[[projects.keys]]\nkid = \"cfg-HS512\"\nalg = \"HS512\"\n"
                f"secret_file = {q(str(work / 'hs512.secret'))}\n"
            )
        else:
            keys_toml += k.config_toml(f"cfg-{alg}")
    jwks = {
        "keys": [k.jwk(f"jwks-{a}", with_alg=a not in IMPLIED) for a, k in jwks_keys.items()]
    }
    jwks_file = work / "file.jwks.json"
    jwks_file.write_text(
        json.dumps({"keys": [k.jwk(f"file-{a}", with_alg=a != "ES256") for a, k in file_keys.items()]})
    )
    config = server_toml(
        project_toml("algs", jwks=json.dumps(jwks), keys=keys_toml)
        + project_toml("algsfile", jwks_file=str(jwks_file))
        + project_toml("algsapi")
    )
    servers = Servers(work)
    server = servers.start(config=config)
    yield {"server": server, "cfg": cfg_keys, "jwks": jwks_keys, "file": file_keys}
    servers.teardown()


def _accepted(server, project, key, kid, sub):
    async def go():
        exp = now() + 600
        ws, welcome = await connect_ok(
            server, project, key.token(sub, kid=kid, exp=exp), sub=sub, exp=exp
        )
        await ws.close()

    run(go(), timeout=20)


@pytest.mark.parametrize("alg", ALGS)
def test_config_key_accepted(algs, alg):
    """A config key (`pem`, `pem_file`, `secret` or `secret_file`) verifies PyJWT's token."""
    _accepted(algs["server"], "algs", algs["cfg"][alg], f"cfg-{alg}", f"cfg-user-{alg}")


@pytest.mark.parametrize("alg", ALGS)
def test_inline_jwks_key_accepted(algs, alg):
    """Config `jwks` (inline): RSA/oct JWKs carry `alg`; EC/OKP ones imply it by curve."""
    _accepted(algs["server"], "algs", algs["jwks"][alg], f"jwks-{alg}", f"jwks-user-{alg}")


@pytest.mark.parametrize("alg", ["RS512", "ES256", "EdDSA"])
def test_jwks_file_key_accepted(algs, alg):
    _accepted(algs["server"], "algsfile", algs["file"][alg], f"file-{alg}", f"file-user-{alg}")


@pytest.mark.parametrize("alg", ALGS)
def test_api_put_pem_or_secret_accepted(algs, alg):
    """`PUT .../keys/{kid}` with `{"alg","pem"}` (or `{"alg","secret"}`): 204, then usable."""
    server = algs["server"]
    key = make_key(alg)
    kid = f"api-{alg}"
    assert_status(put_key(server, "algsapi", kid, key.spec()), 204)
    _accepted(server, "algsapi", key, kid, f"api-user-{alg}")


@pytest.mark.parametrize("alg", ALGS)
def test_api_put_bare_jwk_accepted(algs, alg):
    """`PUT .../keys/{kid}` with a bare JWK (`kty`...); EC/OKP without `alg`, and without
    `kid` for half of them (the path names it)."""
    server = algs["server"]
    key = make_key(alg)
    kid = f"jwk-{alg}"
    jwk = key.jwk(kid if ALGS.index(alg) % 2 else None, with_alg=alg not in IMPLIED)
    assert_status(put_key(server, "algsapi", kid, jwk), 204)
    _accepted(server, "algsapi", key, kid, f"jwk-user-{alg}")


def test_token_without_kid_is_tried_against_every_key_of_its_alg(servers):
    """Two ES256 keys and an RS256 key; a kid-less token of the second ES256 key verifies, a
    kid-less token of an unknown key does not."""
    es_a, es_b, rs = make_key("ES256"), make_key("ES256"), make_key("RS256")
    config = server_toml(
        project_toml(
            "nokid",
            keys=es_a.config_toml("a") + es_b.config_toml("b") + rs.config_toml("r"),
        )
    )
    server = servers.start(config=config)

    async def go():
        for key in (es_a, es_b, rs):
            ws, _ = await connect_ok(server, "nokid", key.token("bob", kid=None), sub="bob")
            await ws.close()
        await refused_401(server, "nokid", make_key("ES256").token("bob", kid=None))
        # The right key but the wrong kid: the kid selects the key, no fallback to the others.
        await refused_401(server, "nokid", es_b.token("bob", kid="a"))

    run(go(), timeout=20)


# --------------------------------------------------------------------------------------------
# Refusals: 401 unauthorized
# --------------------------------------------------------------------------------------------

ISS = "https://issuer.example.test"
AUD = "herald-test"


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """Project `strict` (issuer, audience, leeway 0) with HS256 `hs`, RS256 `rs`, ES256 `es`,
    EdDSA `ed`; project `lenient` (default leeway 30 s, no iss/aud) with HS256 `hs`."""
    keys = {"hs": make_key("HS256"), "rs": make_key("RS256"), "es": make_key("ES256"),
            "ed": make_key("EdDSA")}
    lenient = make_key("HS256")
    config = server_toml(
        project_toml(
            "strict",
            issuer=ISS,
            audience=AUD,
            leeway_secs=0,
            keys="".join(k.config_toml(kid) for kid, k in keys.items()),
        )
        + project_toml("lenient", keys=lenient.config_toml("hs"))
    )
    servers = Servers(tmp_path_factory.mktemp("strict"))
    server = servers.start(config=config)
    yield {"server": server, "keys": keys, "lenient": lenient}
    servers.teardown()


def _good_claims(**over):
    c = {"iss": ISS, "aud": AUD}
    c.update(over)
    return c


@pytest.mark.parametrize("kid", ["hs", "rs", "es", "ed"])
def test_strict_project_accepts_good_tokens(strict, kid):
    """Control: with the right key, iss and aud each key's token is accepted."""
    key = strict["keys"][kid]

    async def go():
        ws, _ = await connect_ok(strict["server"], "strict", key.token("carol", kid=kid,
                                                                         **_good_claims()), "carol")
        await ws.close()

    run(go(), timeout=20)


REFUSED = {
    # Wrong key: the kid of a registered key, the signature of another key of the same alg.
    "wrong-key-hs": lambda s: make_key("HS256").token(kid="hs", **_good_claims()),
    "wrong-key-rs": lambda s: make_key("RS256").token(kid="rs", **_good_claims()),
    "wrong-key-es": lambda s: make_key("ES256").token(kid="es", **_good_claims()),
    "wrong-key-ed": lambda s: make_key("EdDSA").token(kid="ed", **_good_claims()),
    "wrong-key-es-no-kid": lambda s: make_key("ES256").token(kid=None, **_good_claims()),
    "unknown-kid": lambda s: s["keys"]["es"].token(kid="nope", **_good_claims()),
    # The es key's signature under the rs kid: the kid's key decides, alg must match it.
    "alg-of-another-kid": lambda s: s["keys"]["es"].token(kid="rs", **_good_claims()),
    "wrong-aud": lambda s: s["keys"]["rs"].token(kid="rs", **_good_claims(aud="other")),
    "wrong-iss": lambda s: s["keys"]["es"].token(kid="es", **_good_claims(iss="https://evil.test")),
    "missing-aud": lambda s: s["keys"]["hs"].token(kid="hs", iss=ISS),
    "missing-iss": lambda s: s["keys"]["hs"].token(kid="hs", aud=AUD),
    "expired": lambda s: s["keys"]["es"].token(kid="es", exp=now() - 5, **_good_claims()),
    "not-yet-valid": lambda s: s["keys"]["es"].token(kid="es", nbf=now() + 60, **_good_claims()),
    "no-sub": lambda s: s["keys"]["hs"].token(None, kid="hs", **_good_claims()),
    "no-exp": lambda s: s["keys"]["hs"].token(kid="hs", exp=None, **_good_claims()),
    "alg-none-with-kid": lambda s: none_token(kid="rs"),
    "alg-none-without-kid": lambda s: none_token(),
    # HS/RS confusion: HS256 signed with the RSA public key's PEM bytes as the HMAC secret.
    "hs-rs-confusion-with-kid": lambda s: hmac_token(
        s["keys"]["rs"].public_pem.encode(), kid="rs", **_good_claims()
    ),
    "hs-rs-confusion-without-kid": lambda s: hmac_token(
        s["keys"]["rs"].public_pem.encode(), **_good_claims()
    ),
    "hs-rs-confusion-pem-stripped": lambda s: hmac_token(
        s["keys"]["rs"].public_pem.strip().encode(), kid="rs", **_good_claims()
    ),
    "hs-es-confusion-with-kid": lambda s: hmac_token(
        s["keys"]["es"].public_pem.encode(), kid="es", **_good_claims()
    ),
    "hs512-rs-confusion-without-kid": lambda s: hmac_token(
        s["keys"]["rs"].public_pem.encode(), alg="HS512", **_good_claims()
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_401(strict, case):
    token = REFUSED[case](strict)
    run(refused_401(strict["server"], "strict", token), timeout=20)


def test_leeway_is_honoured(strict):
    """With the default 30 s leeway: nbf 10 s ahead and exp 10 s past are accepted; beyond the
    leeway both are refused."""
    key = strict["lenient"]
    server = strict["server"]

    async def go():
        for claims in ({"nbf": now() + 10}, {"exp": now() - 10}):
            ws, _ = await connect_ok(server, "lenient", key.token("dan", kid="hs", **claims), "dan")
            await ws.close()
        await refused_401(server, "lenient", key.token("dan", kid="hs", nbf=now() + 90))
        await refused_401(server, "lenient", key.token("dan", kid="hs", exp=now() - 90))

    run(go(), timeout=20)


# --------------------------------------------------------------------------------------------
# The same kid in two projects
# --------------------------------------------------------------------------------------------


def test_same_kid_in_two_projects_never_crosses(servers):
    """kid `k` (HS256) and `e` (ES256) exist in both projects with different keys, and kid
    `api` is PUT into both with different Ed25519 keys: each token opens its own project only."""
    keys = {
        p: {"k": make_key("HS256"), "e": make_key("ES256"), "api": make_key("EdDSA")}
        for p in ("p1", "p2")
    }
    config = server_toml(
        "".join(
            project_toml(p, keys=ks["k"].config_toml("k") + ks["e"].config_toml("e"))
            for p, ks in keys.items()
        )
    )
    server = servers.start(config=config)
    for p, ks in keys.items():
        assert_status(put_key(server, p, "api", ks["api"].spec()), 204)

    async def go():
        conns = []
        try:
            for p, other in (("p1", "p2"), ("p2", "p1")):
                for kid, key in keys[p].items():
                    ws, _ = await connect_ok(server, p, key.token(f"{p}-u", kid=kid), f"{p}-u")
                    conns.append(ws)
                    await refused_401(server, other, key.token(f"{p}-u", kid=kid))
                    # Without the kid, the other project's keys of that alg are all tried: none fits.
                    await refused_401(server, other, key.token(f"{p}-u", kid=None))
        finally:
            await close_all(conns)

    run(go(), timeout=30)


def test_one_rsa_key_under_several_algs_accepts_only_each_kids_alg(servers):
    """One RSA key registered under RS256, RS512 and PS256 kids at once (the same PEM, three
    algs): each kid accepts only a token of its own alg."""
    rsa_key = make_key("RS256")
    toml = ""
    for alg in ("RS256", "RS512", "PS256"):
        toml += f"\n[[projects.keys]]\nkid = {q(alg)}\nalg = {q(alg)}\npem = {q(rsa_key.public_pem)}\n"
    server = servers.start(config=server_toml(project_toml("rsa", keys=toml)))

    async def go():
        for alg in ("RS256", "RS512", "PS256"):
            tok = jwt.encode({"sub": "x", "exp": now() + 60}, rsa_key.signer, algorithm=alg,
                             headers={"kid": alg})
            ws, _ = await connect_ok(server, "rsa", tok, "x")
            await ws.close()
        # RS384 is not registered for this key; PS512 under the PS256 kid is the wrong alg.
        for alg, kid in (("RS384", "RS256"), ("PS512", "PS256"), ("RS256", "PS256")):
            tok = jwt.encode({"sub": "x", "exp": now() + 60}, rsa_key.signer, algorithm=alg,
                             headers={"kid": kid})
            await refused_401(server, "rsa", tok)

    run(go(), timeout=20)

