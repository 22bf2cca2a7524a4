//! Verification keys: what an operator or a backend gives (`KeySpec`: HMAC secret, PEM public
//! key, or JWK), parsed and checked once into a [`Key`] that verifies tokens.
//!
//! Every key is probed at registration (a dummy verification), so a malformed PEM or a key of
//! the wrong type for its `alg` is refused when it is registered, not at a client's handshake.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

/// Largest key document accepted (a PEM, a JWK or a JWKS), in bytes.
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// Shortest HMAC key, in bytes, whatever form it comes in (a secret in the config or the API,
/// or the decoded `k` of an `oct` JWK): shorter keys are guessable offline from one token.
pub const MIN_HMAC_BYTES: usize = 16;

/// Why a key was refused. The message is safe to return and log: it never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// `alg` is not one herald verifies.
    #[error(
        "unknown alg `{0}` (expected HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 or EdDSA)"
    )]
    UnknownAlg(String),
    /// The material does not fit the algorithm (e.g. a PEM for an HMAC alg).
    #[error("{0}")]
    Mismatch(String),
    /// The PEM does not parse as a public key of the algorithm's family.
    #[error("malformed PEM for {alg}: expected a {family} public key")]
    BadPem {
        /// The algorithm named.
        alg: String,
        /// The key family it needs.
        family: &'static str,
    },
    /// The JWK does not parse or is incomplete.
    #[error("bad JWK: {0}")]
    BadJwk(String),
    /// A JWKS entry without `kid` (rotation picks keys by kid, so one is required).
    #[error("every key of a JWKS needs a `kid` (entry {0} has none)")]
    JwksWithoutKid(usize),
    /// Over [`MAX_KEY_BYTES`].
    #[error("key document over {MAX_KEY_BYTES} bytes")]
    TooLarge,
    /// An HMAC key under [`MIN_HMAC_BYTES`] (an empty one included).
    #[error("HMAC keys must be at least {MIN_HMAC_BYTES} bytes (this one has {0})")]
    ShortHmac(usize),
}

/// A key as given: serialisable, so the state store can keep what the API registered.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Algorithm name (`HS256`, `RS256`, `ES256`, `EdDSA`, ...).
    pub alg: String,
    /// HMAC secret (HS* only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// PEM public key (RS*, PS*, ES*, EdDSA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pem: Option<String>,
    /// A JWK (any family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwk: Option<Jwk>,
}

impl std::fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySpec")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// One verification key of a project, ready to verify.
pub struct Key {
    /// `kid` it answers to, if any.
    pub kid: Option<std::sync::Arc<str>>,
    /// Where it was given.
    pub source: KeySource,
    /// Its algorithm; a token must name the same.
    pub alg: Algorithm,
    /// For verifying.
    pub(crate) decoding: DecodingKey,
    /// For minting (`herald token`); HMAC keys only.
    pub(crate) encoding: Option<EncodingKey>,
}

/// Parses an algorithm name.
///
/// # Errors
/// [`KeyError::UnknownAlg`].
pub fn parse_alg(s: &str) -> Result<Algorithm, KeyError> {
    s.parse::<Algorithm>()
        .map_err(|_| KeyError::UnknownAlg(s.to_owned()))
}

fn family_name(f: AlgorithmFamily) -> &'static str {
    match f {
        AlgorithmFamily::Hmac => "HMAC",
        AlgorithmFamily::Rsa => "RSA",
        AlgorithmFamily::Ec => "EC",
        AlgorithmFamily::Ed => "Ed25519",
    }
}

/// Where a project's key was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The project's `keys` in the config file.
    Config,
    /// The project's `jwks` / `jwks_file` in the config file.
    Jwks,
    /// Registered through the API (`PUT /api/v1/projects/{p}/keys/{kid}`).
    Api,
}

impl KeySource {
    /// Its name in the API's project answers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Jwks => "jwks",
            Self::Api => "api",
        }
    }
}

impl Key {
    /// The kind of key material: `hmac` (a shared secret), `rsa`, `ec` or `ed25519` (public
    /// keys).
    pub fn kind(&self) -> &'static str {
        match self.alg.family() {
            AlgorithmFamily::Hmac => "hmac",
            AlgorithmFamily::Rsa => "rsa",
            AlgorithmFamily::Ec => "ec",
            AlgorithmFamily::Ed => "ed25519",
        }
    }

    /// Builds and probes a key.
    ///
    /// # Errors
    /// [`KeyError`] saying what is wrong with the material.
    pub fn from_spec(kid: Option<&str>, spec: &KeySpec) -> Result<Self, KeyError> {
        let alg = parse_alg(&spec.alg)?;
        let family = alg.family();
        let given = [
            spec.secret.is_some(),
            spec.pem.is_some(),
            spec.jwk.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(KeyError::Mismatch(
                "give exactly one of secret, pem or jwk".into(),
            ));
        }
        let (decoding, encoding) = if let Some(secret) = &spec.secret {
            if family != AlgorithmFamily::Hmac {
                return Err(KeyError::Mismatch(format!(
                    "{} needs a public key (pem or jwk), not a secret",
                    spec.alg
                )));
            }
            if secret.len() > MAX_KEY_BYTES {
                return Err(KeyError::TooLarge);
            }
            check_hmac_len(secret.len())?;
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Some(EncodingKey::from_secret(secret.as_bytes())),
            )
        } else if let Some(pem) = &spec.pem {
            if pem.len() > MAX_KEY_BYTES {
                return Err(KeyError::TooLarge);
            }
            let bad = || KeyError::BadPem {
                alg: spec.alg.clone(),
                family: family_name(family),
            };
            let key = match family {
                AlgorithmFamily::Hmac => {
                    return Err(KeyError::Mismatch(format!(
                        "{} is an HMAC alg: give a secret, not a PEM",
                        spec.alg
                    )));
                }
                AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem.as_bytes()),
                AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem.as_bytes()),
                AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem.as_bytes()),
            }
            .map_err(|_| bad())?;
            probe(&key, alg).map_err(|_| bad())?;
            (key, None)
        } else {
            let jwk = spec.jwk.as_ref().expect("counted above");
            let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError::BadJwk(e.to_string()))?;
            if key.family() != family {
                return Err(KeyError::Mismatch(format!(
                    "the JWK is a {} key but alg is {}",
                    family_name(key.family()),
                    spec.alg
                )));
            }
            if family == AlgorithmFamily::Hmac {
                check_hmac_len(key.try_get_as_bytes().map_or(0, <[u8]>::len))?;
            }
            probe(&key, alg).map_err(|e| KeyError::BadJwk(e.to_string()))?;
            let encoding = match &jwk.algorithm {
                AlgorithmParameters::OctetKey(_) => {
                    key.try_get_as_bytes().ok().map(EncodingKey::from_secret)
                }
                _ => None,
            };
            (key, encoding)
        };
        Ok(Self {
            kid: kid.map(Into::into),
            source: KeySource::Config,
            alg,
            decoding,
            encoding,
        })
    }
}

/// The one minimum every HMAC key meets, whatever form it was given in.
fn check_hmac_len(len: usize) -> Result<(), KeyError> {
    if len < MIN_HMAC_BYTES {
        return Err(KeyError::ShortHmac(len));
    }
    Ok(())
}

/// Checks that the key material can verify `alg` signatures, parsing it as the verifier
/// (aws-lc) will: a PEM or JWK that decodes but holds no usable key (another curve, a malformed
/// point, a JWK's RSA modulus outside 2,048–8,192 bits) is refused when the key is given, not
/// at every token.
fn probe(key: &DecodingKey, alg: Algorithm) -> Result<(), String> {
    use aws_lc_rs::signature::{self as sig, VerificationAlgorithm};
    use jsonwebtoken::DecodingKeyKind;
    let verifier: &'static dyn VerificationAlgorithm = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => return Ok(()),
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        Algorithm::EdDSA => &sig::ED25519,
        other => return Err(format!("{other:?} is not supported")),
    };
    match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) => sig::UnparsedPublicKey::new(verifier, bytes)
            .parse()
            .map(drop)
            .map_err(|e| e.to_string()),
        DecodingKeyKind::RsaModulusExponent { n, .. } => {
            let leading = n.iter().take_while(|b| **b == 0).count();
            let bits = n[leading..]
                .first()
                .map_or(0, |b| (n.len() - leading) * 8 - b.leading_zeros() as usize);
            if (2048..=8192).contains(&bits) {
                Ok(())
            } else {
                Err(format!(
                    "an RSA modulus of {bits} bits (2048 to 8192 are verified)"
                ))
            }
        }
    }
}

/// The algorithm a JWK declares, or the one its curve implies (EC, OKP).
fn jwk_alg(jwk: &Jwk) -> Option<&'static str> {
    if let Some(a) = jwk.common.key_algorithm {
        return Some(match a {
            KeyAlgorithm::HS256 => "HS256",
            KeyAlgorithm::HS384 => "HS384",
            KeyAlgorithm::HS512 => "HS512",
            KeyAlgorithm::ES256 => "ES256",
            KeyAlgorithm::ES384 => "ES384",
            KeyAlgorithm::RS256 => "RS256",
            KeyAlgorithm::RS384 => "RS384",
            KeyAlgorithm::RS512 => "RS512",
            KeyAlgorithm::PS256 => "PS256",
            KeyAlgorithm::PS384 => "PS384",
            KeyAlgorithm::PS512 => "PS512",
            KeyAlgorithm::EdDSA => "EdDSA",
            _ => return None,
        });
    }
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Some("ES256"),
            EllipticCurve::P384 => Some("ES384"),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Some("EdDSA"),
        _ => None,
    }
}

/// A key spec from one JWK, with `alg` taken from the JWK (or its curve).
///
/// # Errors
/// No usable `alg`.
pub fn spec_from_jwk(jwk: Jwk) -> Result<KeySpec, KeyError> {
    let alg = jwk_alg(&jwk).ok_or_else(|| {
        KeyError::BadJwk("the JWK needs an `alg` (RSA and oct keys do not imply one)".into())
    })?;
    Ok(KeySpec {
        alg: alg.into(),
        secret: None,
        pem: None,
        jwk: Some(jwk),
    })
}

/// Parses a JWKS document into (kid, spec) pairs.
///
/// # Errors
/// Not a JWKS, an entry without `kid`, or an entry without a usable `alg`.
pub fn parse_jwks(text: &str) -> Result<Vec<(String, KeySpec)>, KeyError> {
    if text.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLarge);
    }
    // serde's message may quote a value of the document, which may be key material.
    let set: JwkSet = serde_json::from_str(text)
        .map_err(|e| KeyError::BadJwk(crate::redact::redact_values(&e.to_string())))?;
    set.keys
        .into_iter()
        .enumerate()
        .map(|(i, jwk)| {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or(KeyError::JwksWithoutKid(i))?;
            Ok((kid, spec_from_jwk(jwk)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(alg: &str) -> KeySpec {
        KeySpec {
            alg: alg.into(),
            secret: None,
            pem: None,
            jwk: None,
        }
    }

    #[test]
    fn hmac_rules() {
        let ok = KeySpec {
            secret: Some("0123456789abcdef".into()),
            ..spec("HS256")
        };
        assert!(Key::from_spec(Some("a"), &ok).is_ok());
        let short = KeySpec {
            secret: Some("short".into()),
            ..spec("HS256")
        };
        assert_eq!(
            Key::from_spec(None, &short).err(),
            Some(KeyError::ShortHmac(5))
        );
        let rs_secret = KeySpec {
            secret: Some("0123456789abcdef".into()),
            ..spec("RS256")
        };
        assert!(matches!(
            Key::from_spec(None, &rs_secret),
            Err(KeyError::Mismatch(_))
        ));
        assert!(matches!(
            Key::from_spec(None, &spec("HS256")),
            Err(KeyError::Mismatch(_))
        ));
        assert_eq!(
            Key::from_spec(
                None,
                &KeySpec {
                    secret: Some("x".repeat(17)),
                    ..spec("none")
                }
            )
            .err(),
            Some(KeyError::UnknownAlg("none".into()))
        );
    }

    /// Material that decodes as a public key of the right family but that the verifier cannot
    /// use is refused when the key is given: a P-384 key under ES256 (it passes under ES384; a
    /// 2,048-bit RSA key passes).
    #[test]
    fn unusable_public_keys_are_refused_at_load() {
        use p384::pkcs8::{EncodePublicKey, LineEnding};
        use rsa::rand_core::OsRng;
        let pem_spec = |alg: &str, pem: String| KeySpec {
            pem: Some(pem),
            ..spec(alg)
        };
        let rsa_pem = |bits: usize| {
            let key = rsa::RsaPrivateKey::new(&mut OsRng, bits).expect("RSA key");
            key.to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .expect("RSA public PEM")
        };
        assert!(Key::from_spec(None, &pem_spec("RS256", rsa_pem(2048))).is_ok());
        let p384 = p384::SecretKey::random(&mut OsRng)
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("P-384 public PEM");
        assert!(
            matches!(
                Key::from_spec(None, &pem_spec("ES256", p384.clone())),
                Err(KeyError::BadPem { .. })
            ),
            "a P-384 key under ES256"
        );
        assert!(Key::from_spec(None, &pem_spec("ES384", p384)).is_ok());
    }

    #[test]
    fn malformed_pem_is_refused() {
        for alg in ["RS256", "PS256", "ES256", "EdDSA"] {
            let bad = KeySpec {
                pem: Some("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into()),
                ..spec(alg)
            };
            assert!(
                matches!(Key::from_spec(None, &bad), Err(KeyError::BadPem { .. })),
                "{alg}"
            );
            let garbage = KeySpec {
                pem: Some("not a pem".into()),
                ..spec(alg)
            };
            assert!(matches!(
                Key::from_spec(None, &garbage),
                Err(KeyError::BadPem { .. })
            ));
        }
    }

    #[test]
    fn jwks() {
        let ok = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"e1",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        let keys = parse_jwks(ok).unwrap();
        assert_eq!(keys[0].0, "e1");
        assert_eq!(keys[0].1.alg, "EdDSA");
        assert!(Key::from_spec(Some("e1"), &keys[0].1).is_ok());
        let no_kid = r#"{"keys":[{"kty":"OKP","crv":"Ed25519",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert_eq!(parse_jwks(no_kid).err(), Some(KeyError::JwksWithoutKid(0)));
        assert!(matches!(parse_jwks("{}"), Err(KeyError::BadJwk(_))));
    }

    /// The HMAC minimum holds for a JWK too: bare, inside `{"alg","jwk"}`, or in a JWKS,
    /// and an empty `k` is no exception.
    #[test]
    fn hmac_minimum_applies_to_every_form() {
        use base64::Engine;
        let b64 = |k: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k);
        let oct = |k: &[u8]| -> Jwk {
            serde_json::from_value(serde_json::json!({"kty":"oct","alg":"HS256","k": b64(k)}))
                .unwrap()
        };
        for (len, expect) in [
            (0, Some(KeyError::ShortHmac(0))),
            (8, Some(KeyError::ShortHmac(8))),
        ]
        .into_iter()
        .chain([(15, Some(KeyError::ShortHmac(15))), (16, None)])
        {
            let k = vec![b'k'; len];
            let bare = spec_from_jwk(oct(&k)).unwrap();
            assert_eq!(
                Key::from_spec(Some("j"), &bare).err(),
                expect,
                "bare JWK, {len} bytes"
            );
            let wrapped = KeySpec {
                jwk: Some(oct(&k)),
                ..spec("HS256")
            };
            assert_eq!(
                Key::from_spec(Some("j"), &wrapped).err(),
                expect,
                "alg+jwk, {len} bytes"
            );
            let doc = format!(
                r#"{{"keys":[{{"kty":"oct","alg":"HS256","kid":"j","k":"{}"}}]}}"#,
                b64(&k)
            );
            let (_, from_set) = parse_jwks(&doc).unwrap().pop().unwrap();
            assert_eq!(
                Key::from_spec(Some("j"), &from_set).err(),
                expect,
                "JWKS, {len} bytes"
            );
            let secret = KeySpec {
                secret: Some(String::from_utf8(k).unwrap()),
                ..spec("HS256")
            };
            assert_eq!(
                Key::from_spec(Some("j"), &secret).err(),
                expect,
                "secret, {len} bytes"
            );
        }
    }
}
