#!/usr/bin/env python3
"""Checks a Portcullis token from the outside, with PyJWT.

    pyjwt_check.py JWKS_URL TOKEN ISSUER [AUDIENCE]

Fetches the JWKS, picks the key by the token's `kid`, verifies the EdDSA
signature (only EdDSA is allowed), the RFC 9068 `typ` header, `iss`, `aud`
(the issuer unless AUDIENCE is given: an upstream name for a per-hop token)
and every claim of DESIGN section 5 with its JSON type. Prints `OK` and exits
0, or prints what is wrong and exits 1.

Needs `pip install pyjwt cryptography`.
"""

import sys

import jwt

CLAIMS = [
    "iss", "sub", "aud", "exp", "iat", "nbf", "jti",
    "client_id", "task_id", "agent_type", "scope",
]
INTEGER_CLAIMS = {"exp", "iat", "nbf"}


def fail(why):
    print(f"FAIL: {why}")
    sys.exit(1)


def main(argv):
    if len(argv) not in (4, 5):
        fail("usage: pyjwt_check.py JWKS_URL TOKEN ISSUER [AUDIENCE]")
    jwks_url, token, issuer = argv[1], argv[2], argv[3]
    audience = argv[4] if len(argv) == 5 else issuer

    header = jwt.get_unverified_header(token)
    if header.get("alg") != "EdDSA":
        fail(f"alg is {header.get('alg')!r}, not EdDSA")
    if str(header.get("typ", "")).lower() not in ("at+jwt", "application/at+jwt"):
        fail(f"typ is {header.get('typ')!r}, not at+jwt")
    if not header.get("kid"):
        fail("no kid in the header")

    key = jwt.PyJWKClient(jwks_url).get_signing_key_from_jwt(token)
    if key.key_id != header["kid"]:
        fail("the JWKS key does not carry the token's kid")
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["EdDSA"],
        audience=audience,
        issuer=issuer,
        options={"require": CLAIMS, "verify_signature": True},
    )

    for name in CLAIMS:
        value = claims.get(name)
        if name in INTEGER_CLAIMS:
            if not isinstance(value, int) or isinstance(value, bool):
                fail(f"{name} is not an integer: {value!r}")
        elif not isinstance(value, str):
            fail(f"{name} is not a string: {value!r}")
    if claims["aud"] != audience:
        fail(f"aud is {claims['aud']!r}, not {audience!r}")
    if not claims["iat"] <= claims["nbf"] < claims["exp"]:
        fail("iat <= nbf < exp does not hold")
    if claims["exp"] - claims["iat"] > 15 * 60:
        fail("lives longer than 15 minutes")
    if audience != issuer and claims["exp"] - claims["iat"] > 60:
        fail("a per-hop token lives longer than 60 s")
    if not claims["scope"].split():
        fail("empty scope")

    # The same token must not pass with any other algorithm allowed alone.
    for alg in ("HS256", "RS256", "ES256"):
        try:
            jwt.decode(token, key.key, algorithms=[alg], audience=audience, issuer=issuer)
        except jwt.exceptions.InvalidTokenError:
            continue
        fail(f"the token verified under {alg}")

    print("OK")


if __name__ == "__main__":
    main(sys.argv)
