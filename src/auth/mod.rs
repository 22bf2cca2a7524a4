//! Projects, their keys, and token verification at the handshake.
//!
//! The [`Registry`] is built from the config and shared read-only by every shard behind a
//! [`SharedRegistry`] (swapped whole on change, never edited in place). Keys are looked up by
//! (project, kid), never by kid alone, so one project's key can never open another project.
//! Tokens are verified with `jsonwebtoken`; tokens are never logged.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, ProjectConfig, read_secret};
use crate::pubsub::ProjectId;

/// Signature algorithms a key may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAlg(pub Algorithm);

impl KeyAlg {
    /// Parses an algorithm name. HMAC only for now.
    ///
    /// # Errors
    /// A message naming the accepted values.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "HS256" => Ok(Self(Algorithm::HS256)),
            "HS384" => Ok(Self(Algorithm::HS384)),
            "HS512" => Ok(Self(Algorithm::HS512)),
            other => Err(format!(
                "unknown alg `{other}` (expected HS256, HS384 or HS512)"
            )),
        }
    }
}

/// One verification key of a project.
pub struct Key {
    /// `kid` it answers to, if any.
    pub kid: Option<String>,
    /// Its algorithm; a token must name the same.
    pub alg: Algorithm,
    /// For verifying.
    decoding: DecodingKey,
    /// For minting (`herald token`); HMAC keys only.
    encoding: Option<EncodingKey>,
}

/// One tenant, as the shards see it.
pub struct Project {
    /// Dense index, stable for the life of the process; shard tables are keyed by it.
    pub idx: u32,
    /// The id clients and backends name.
    pub id: Arc<str>,
    /// The backend's API key.
    pub api_key: Option<String>,
    /// Verification keys.
    pub keys: Vec<Key>,
    /// Tokens must carry `exp`.
    pub require_exp: bool,
    /// Clock leeway, seconds.
    pub leeway_secs: u64,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Clients may use the `publish` op.
    pub allow_client_publish: bool,
}

/// All projects and the admin key.
pub struct Registry {
    /// Projects by index.
    pub projects: Vec<Arc<Project>>,
    /// Index by id.
    by_id: HashMap<Arc<str>, u32>,
    /// Admin API key.
    pub admin_key: Option<String>,
}

/// The registry every shard and the API read; replaced whole on change.
pub type SharedRegistry = Arc<ArcSwap<Registry>>;

/// Claims herald reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Topics the connection may subscribe to (`prefix*` allowed); absent = any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
    /// Device id: adds the `device.<id>` topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Why a token was refused. The message is safe to send to the client and to log: it never
/// contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in any of the three places.
    #[error("no token: send Authorization: Bearer, ?token= or the bearer.<jwt> subprotocol")]
    Missing,
    /// Not a JWT, or a header/claims that do not parse.
    #[error("malformed token")]
    Malformed,
    /// The `kid` names no key of this project, or no key has the token's algorithm.
    #[error("no key of this project matches the token's kid/alg")]
    UnknownKey,
    /// Signature check failed.
    #[error("bad signature")]
    BadSignature,
    /// Past `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// A required claim is absent or a claim has the wrong value (`iss`, `aud`, `sub`).
    #[error("claim check failed: {0}")]
    Claim(&'static str),
}

impl Registry {
    /// Builds the registry from a validated config, reading secret files.
    ///
    /// # Errors
    /// A secret file cannot be read.
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        let admin_key = read_secret("api.admin_key", &cfg.api.admin_key, &cfg.api.admin_key_file)?;
        let mut projects = Vec::new();
        let mut by_id = HashMap::new();
        for (i, p) in cfg.projects.iter().enumerate() {
            let project = Arc::new(Project::from_config(i as u32, p)?);
            by_id.insert(project.id.clone(), i as u32);
            projects.push(project);
        }
        Ok(Self {
            projects,
            by_id,
            admin_key,
        })
    }

    /// The project named `id`.
    pub fn project(&self, id: &str) -> Option<&Arc<Project>> {
        self.by_id.get(id).map(|&i| &self.projects[i as usize])
    }
}

impl Project {
    fn from_config(idx: u32, p: &ProjectConfig) -> Result<Self, ConfigError> {
        let id = ProjectId::parse(&p.id).map_err(|e| ConfigError::Invalid {
            key: format!("projects[{idx}].id"),
            reason: e.to_string(),
        })?;
        let api_key = read_secret(
            &format!("projects[{idx}].api_key"),
            &p.api_key,
            &p.api_key_file,
        )?;
        let mut keys = Vec::new();
        for (j, k) in p.keys.iter().enumerate() {
            let at = format!("projects[{idx}].keys[{j}]");
            let alg = KeyAlg::parse(&k.alg)
                .map_err(|reason| ConfigError::Invalid {
                    key: format!("{at}.alg"),
                    reason,
                })?
                .0;
            let secret = read_secret(&format!("{at}.secret"), &k.secret, &k.secret_file)?
                .ok_or_else(|| ConfigError::Invalid {
                    key: format!("{at}.secret"),
                    reason: "an HMAC key needs secret or secret_file".into(),
                })?;
            keys.push(Key {
                kid: k.kid.clone(),
                alg,
                decoding: DecodingKey::from_secret(secret.as_bytes()),
                encoding: Some(EncodingKey::from_secret(secret.as_bytes())),
            });
        }
        Ok(Self {
            idx,
            id: id.as_str().into(),
            api_key,
            keys,
            require_exp: p.require_exp,
            leeway_secs: p.leeway_secs,
            issuer: p.issuer.clone(),
            audience: p.audience.clone(),
            allow_client_publish: p.allow_client_publish,
        })
    }

    /// Verifies `token` against this project's keys and settings.
    ///
    /// # Errors
    /// [`AuthError`] saying why (never containing the token).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let mut candidates = self.keys.iter().filter(|k| match &header.kid {
            Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
            None => true,
        });
        let mut last = AuthError::UnknownKey;
        // With a kid there is at most one candidate; without, try each key of the same alg.
        for key in candidates.by_ref() {
            if key.alg != header.alg {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation(key.alg)) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = map_jwt_error(&e);
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway_secs;
        v.validate_nbf = true;
        v.validate_exp = true;
        let mut required = vec!["sub"];
        if self.require_exp {
            required.push("exp");
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        v
    }

    /// Mints a token with the first HMAC key (for `herald token` and tests).
    ///
    /// # Errors
    /// The project has no HMAC key.
    pub fn mint(&self, claims: &Claims) -> Result<String, String> {
        let key = self
            .keys
            .iter()
            .find(|k| k.encoding.is_some())
            .ok_or_else(|| format!("project `{}` has no HMAC key to sign with", self.id))?;
        let mut header = Header::new(key.alg);
        header.kid = key.kid.clone();
        let enc = key.encoding.as_ref().expect("filtered on encoding above");
        jsonwebtoken::encode(&header, claims, enc).map_err(|e| e.to_string())
    }
}

fn map_jwt_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => AuthError::BadSignature,
        K::ExpiredSignature => AuthError::Expired,
        K::ImmatureSignature => AuthError::NotYetValid,
        K::InvalidIssuer => AuthError::Claim("iss"),
        K::InvalidAudience => AuthError::Claim("aud"),
        K::InvalidSubject => AuthError::Claim("sub"),
        K::MissingRequiredClaim(c) => match c.as_str() {
            "exp" => AuthError::Claim("exp required"),
            "iss" => AuthError::Claim("iss required"),
            "aud" => AuthError::Claim("aud required"),
            _ => AuthError::Claim("sub required"),
        },
        K::InvalidAlgorithm => AuthError::UnknownKey,
        _ => AuthError::Malformed,
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> Project {
        let cfg = Config::development();
        Project::from_config(0, &cfg.projects[0]).unwrap()
    }

    fn claims(exp: Option<u64>) -> Claims {
        Claims {
            sub: "42".into(),
            exp,
            topics: None,
            device: None,
        }
    }

    #[test]
    fn round_trip() {
        let p = project();
        let c = claims(Some(now_secs() + 60));
        assert_eq!(p.verify(&p.mint(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn refusals() {
        let p = project();
        let expired = p.mint(&claims(Some(now_secs() - 3600))).unwrap();
        assert_eq!(p.verify(&expired), Err(AuthError::Expired));
        let no_exp = p.mint(&claims(None)).unwrap();
        assert_eq!(p.verify(&no_exp), Err(AuthError::Claim("exp required")));
        assert_eq!(p.verify("not.a.jwt"), Err(AuthError::Malformed));
        let good = p.mint(&claims(Some(now_secs() + 60))).unwrap();
        let mut tampered = good.clone();
        tampered.pop();
        tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(p.verify(&tampered), Err(AuthError::BadSignature));
        // Another secret, same kid.
        let other = Key {
            kid: Some("dev".into()),
            alg: Algorithm::HS256,
            decoding: DecodingKey::from_secret(b"another-secret-0123456789"),
            encoding: Some(EncodingKey::from_secret(b"another-secret-0123456789")),
        };
        let q = Project {
            keys: vec![other],
            ..project()
        };
        let foreign = q.mint(&claims(Some(now_secs() + 60))).unwrap();
        assert_eq!(p.verify(&foreign), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_is_refused() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let h = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let c = b64.encode(format!(r#"{{"sub":"42","exp":{}}}"#, now_secs() + 60));
        assert_eq!(
            project().verify(&format!("{h}.{c}.")),
            Err(AuthError::Malformed)
        );
    }
}
