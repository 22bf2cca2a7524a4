//! Projects, their keys, and token verification at the handshake.
//!
//! The [`Registry`] is built from the config plus the persisted API state ([`crate::store`])
//! and shared read-only by every shard behind a [`SharedRegistry`]: a change builds a new
//! registry and swaps it whole, never editing one in place. Keys are looked up by
//! (project, kid), never by kid alone, so one project's key can never open another project.
//! A project keeps its index for the life of the process (shard tables are keyed by it), even
//! when it leaves the config and comes back. Tokens are verified with `jsonwebtoken` and never
//! logged.

pub mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{
    Config, ConfigError, KeyConfig, MAX_KEYS_PER_PROJECT, ProjectConfig, read_api_key,
    read_inline_or_file, read_secret,
};
use crate::pubsub::ProjectId;
use crate::store::State;
pub use keys::{Key, KeyError, KeySource, KeySpec};

/// One tenant, as the shards see it.
pub struct Project {
    /// Dense index, stable for the life of the process; shard tables are keyed by it.
    pub idx: u32,
    /// The id clients and backends name.
    pub id: Arc<str>,
    /// The backend's API key.
    pub api_key: Option<String>,
    /// Verification keys: at most [`crate::config::MAX_KEYS_PER_PROJECT`].
    pub keys: Vec<Key>,
    /// Kids revoked through the API, in order.
    pub revoked: Vec<String>,
    /// The API key and the config's keys (`keys`, `jwks`) as read at start or the last
    /// reload: a change made through the API reuses them instead of re-reading files.
    config_material: ConfigMaterial,
    /// Tokens must carry `exp`.
    pub require_exp: bool,
    /// Clock leeway, seconds.
    pub leeway_secs: u64,
    /// Longest accepted token lifetime: `exp` at most this plus the leeway ahead of now,
    /// seconds.
    pub max_token_lifetime_secs: u64,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Clients may use the `publish` op.
    pub allow_client_publish: bool,
    /// Handshakes are refused (403) when false.
    pub enabled: bool,
    /// Connection cap; 0 = none.
    pub max_connections: usize,
    /// Allowed `Origin`s; empty = any.
    pub allowed_origins: Vec<String>,
    /// Client IP allow/deny lists (403 `forbidden`).
    pub ip_access: crate::protection::access::IpList,
    /// Open connections of this project on the node; survives registry swaps.
    pub nr_connections: Arc<AtomicUsize>,
    /// The 90%-of-cap warning was logged (re-armed below 80%); survives registry swaps.
    pub near_cap_warned: Arc<std::sync::atomic::AtomicBool>,
    /// Created through the API (not in the config file).
    pub from_api: bool,
    /// History of its topics (`[[projects.history]]`), first match applies.
    pub history: Vec<crate::history::Rule>,
}

/// What a project's config section yields once its files are read.
#[derive(Clone)]
struct ConfigMaterial {
    /// The backend's API key.
    api_key: Option<String>,
    /// (kid, spec) of the config keys, then of the config JWKS, in order.
    specs: Vec<(Option<String>, KeySpec, KeySource)>,
}

/// Most keys of one algorithm a token without a `kid` is tried against. With more, such a
/// token is refused ([`AuthError::KidRequired`]) rather than checked against each of them:
/// anyone may send a kid-less token, and each try is a signature check on the shard thread.
pub const MAX_KIDLESS_KEYS: usize = 4;

/// All projects and the admin key.
pub struct Registry {
    /// Projects by index; `None` for a project that left (its index stays reserved).
    projects: Vec<Option<Arc<Project>>>,
    /// Index by id, including projects that left.
    by_id: HashMap<Arc<str>, u32>,
    /// Admin API key.
    pub admin_key: Option<String>,
    /// Node-wide IP lists (`[access]`), checked right after accept.
    pub access: crate::protection::access::IpList,
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

/// A verified token: its claims and the `kid` of the key that verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Claims.
    pub claims: Claims,
    /// Key id of the verifying key (revoking it disconnects this connection).
    pub kid: Option<Arc<str>>,
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
    /// No `kid` in the token and more than [`MAX_KIDLESS_KEYS`] keys of its algorithm.
    #[error(
        "token has no kid and the project has {nr_keys} keys of this alg; \
         a token must name its key (kid) when more than {MAX_KIDLESS_KEYS} share its alg"
    )]
    KidRequired {
        /// The project's keys of the token's algorithm.
        nr_keys: usize,
    },
    /// Past `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// `exp` is further ahead than the project's `max_token_lifetime_secs` (and the leeway).
    #[error("token lifetime too long: exp is more than {max_secs} s ahead")]
    TooLongLived {
        /// The project's `max_token_lifetime_secs`.
        max_secs: u64,
    },
    /// A required claim is absent or a claim has the wrong value (`iss`, `aud`, `sub`).
    #[error("claim check failed: {0}")]
    Claim(&'static str),
    /// `iat` later than now plus the project's leeway.
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
    /// A `sub` or `device` that could not be addressed as a topic (empty, too long, a control
    /// character).
    #[error("claim `{claim}` {reason}")]
    BadId {
        /// `sub` or `device`.
        claim: &'static str,
        /// The rule it breaks.
        reason: crate::pubsub::NameError,
    },
}

/// The claims as they are decoded: [`Claims`] plus the ones only checked here.
#[derive(Deserialize)]
struct Decoded {
    #[serde(flatten)]
    claims: Claims,
    /// Issued-at (a NumericDate: integer or fractional seconds); `jsonwebtoken` does not check
    /// it.
    #[serde(default)]
    iat: Option<serde_json::Value>,
}

/// Why a registry could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Config problem (names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key of a project does not load.
    #[error("project `{project}`, key `{kid}`: {source}")]
    Key {
        /// Project id.
        project: String,
        /// Key id (or its position).
        kid: String,
        /// Why.
        source: KeyError,
    },
}

impl Registry {
    /// Builds the registry from the config and the API state. Indices and connection
    /// counters of projects already in `prev` are kept.
    ///
    /// # Errors
    /// A secret or key file cannot be read, or a key does not load.
    pub fn build(
        cfg: &Config,
        state: &State,
        prev: Option<&Registry>,
    ) -> Result<Self, RegistryError> {
        Self::build_changed(cfg, state, prev, None)
    }

    /// As [`Registry::build`], but when `changed` names a project, only that project is
    /// built (its keys parsed and probed); every other project already in `prev` is shared
    /// as it is (the same `Arc`), which is right when only `changed`'s settings or keys in
    /// `state` differ from what built `prev`. Such a change reads no file: the admin key and
    /// the changed project's API key and config keys are those `prev` was built with.
    ///
    /// # Errors
    /// As [`Registry::build`].
    pub fn build_changed(
        cfg: &Config,
        state: &State,
        prev: Option<&Registry>,
        changed: Option<&str>,
    ) -> Result<Self, RegistryError> {
        // A change to one project reads no file: the admin key and every file-based secret
        // stay as read at start or the last reload (a file staged for the next reload must
        // not take effect early, nor an unreadable one refuse a tenant's change).
        let admin_key = match (changed, prev) {
            (Some(_), Some(prev)) => prev.admin_key.clone(),
            _ => read_api_key("api.admin_key", &cfg.api.admin_key, &cfg.api.admin_key_file)?,
        };
        let mut by_id: HashMap<Arc<str>, u32> = prev.map(|p| p.by_id.clone()).unwrap_or_default();
        let mut next = by_id.values().map(|i| i + 1).max().unwrap_or(0);
        let mut projects: Vec<Option<Arc<Project>>> = vec![None; next as usize];
        let configured = cfg.projects.iter().map(|p| (p, false));
        let from_api = state
            .projects
            .values()
            .filter_map(|ps| ps.settings.as_ref())
            .filter(|p| !cfg.projects.iter().any(|c| c.id == p.id))
            .map(|p| (p, true));
        for (i, (pc, api)) in configured.chain(from_api).enumerate() {
            let idx = *by_id.entry(pc.id.as_str().into()).or_insert_with(|| {
                next += 1;
                next - 1
            });
            if projects.len() <= idx as usize {
                projects.resize(idx as usize + 1, None);
            }
            let before = prev.and_then(|p| p.project(&pc.id));
            if let (Some(before), Some(changed)) = (before, changed)
                && changed != pc.id
            {
                projects[idx as usize] = Some(before.clone());
                continue;
            }
            let shared = before
                .map(|p| (p.nr_connections.clone(), p.near_cap_warned.clone()))
                .unwrap_or_default();
            // Only a single-project change reuses what was read from files.
            let material = before
                .filter(|_| changed.is_some())
                .map(|p| p.config_material.clone());
            let project = Project::build(idx, i, pc, state, shared, api, material)?;
            projects[idx as usize] = Some(Arc::new(project));
        }
        let access = crate::protection::access::IpList::parse(&cfg.access.allow, &cfg.access.deny)
            .map_err(|(key, reason)| ConfigError::Invalid {
                key: format!("access.{key}"),
                reason,
            })?;
        Ok(Self {
            projects,
            by_id,
            admin_key,
            access,
        })
    }

    /// Builds from a config alone (no API state), for tools and tests.
    ///
    /// # Errors
    /// As [`Registry::build`].
    pub fn from_config(cfg: &Config) -> Result<Self, RegistryError> {
        Self::build(cfg, &State::default(), None)
    }

    /// The live project named `id`.
    pub fn project(&self, id: &str) -> Option<&Arc<Project>> {
        self.by_id
            .get(id)
            .and_then(|&i| self.projects[i as usize].as_ref())
    }

    /// The live project with registry index `idx`.
    pub fn project_at(&self, idx: u32) -> Option<&Arc<Project>> {
        self.projects.get(idx as usize).and_then(Option::as_ref)
    }

    /// Every live project.
    pub fn projects(&self) -> impl Iterator<Item = &Arc<Project>> {
        self.projects.iter().flatten()
    }
}

fn key_spec(at: &str, k: &KeyConfig) -> Result<KeySpec, ConfigError> {
    let secret = read_secret(&format!("{at}.secret"), &k.secret, &k.secret_file)?;
    let pem = read_inline_or_file(&k.pem, &k.pem_file)?;
    Ok(KeySpec {
        alg: k.alg.clone(),
        secret,
        pem,
        jwk: None,
    })
}

impl Project {
    fn build(
        idx: u32,
        position: usize,
        p: &ProjectConfig,
        state: &State,
        (nr_connections, near_cap_warned): (Arc<AtomicUsize>, Arc<std::sync::atomic::AtomicBool>),
        from_api: bool,
        material: Option<ConfigMaterial>,
    ) -> Result<Self, RegistryError> {
        let at = if from_api {
            format!("project `{}` (API)", p.id)
        } else {
            format!("projects[{position}]")
        };
        let id = ProjectId::parse(&p.id).map_err(|e| ConfigError::Invalid {
            key: format!("{at}.id"),
            reason: e.to_string(),
        })?;
        let key_err = |kid: String, source| RegistryError::Key {
            project: p.id.clone(),
            kid,
            source,
        };
        let material = match material {
            Some(m) => m,
            None => {
                let api_key = read_api_key(&format!("{at}.api_key"), &p.api_key, &p.api_key_file)?;
                let mut specs = Vec::new();
                for (j, k) in p.keys.iter().enumerate() {
                    specs.push((
                        k.kid.clone(),
                        key_spec(&format!("{at}.keys[{j}]"), k)?,
                        KeySource::Config,
                    ));
                }
                if let Some(doc) = read_inline_or_file(&p.jwks, &p.jwks_file)? {
                    for (kid, spec) in
                        keys::parse_jwks(&doc).map_err(|e| key_err("jwks".into(), e))?
                    {
                        specs.push((Some(kid), spec, KeySource::Jwks));
                    }
                }
                ConfigMaterial { api_key, specs }
            }
        };
        // (kid, spec) in order: config keys, the config JWKS, then keys registered through the
        // API (which replace a config key of the same kid); revoked kids are left out.
        let mut specs = material.specs.clone();
        let ps = state.projects.get(&p.id);
        if let Some(ps) = ps {
            for (kid, spec) in &ps.keys {
                specs.retain(|(k, _, _)| k.as_deref() != Some(kid.as_str()));
                specs.push((Some(kid.clone()), spec.clone(), KeySource::Api));
            }
            specs.retain(|(k, _, _)| !k.as_ref().is_some_and(|k| ps.revoked.contains(k)));
        }
        if specs.len() > MAX_KEYS_PER_PROJECT {
            return Err(ConfigError::Invalid {
                key: format!("{at}.keys"),
                reason: format!(
                    "{} keys (config keys, JWKS and keys added through the API), more than \
                     {MAX_KEYS_PER_PROJECT}",
                    specs.len()
                ),
            }
            .into());
        }
        let mut keys = Vec::with_capacity(specs.len());
        for (j, (kid, spec, source)) in specs.iter().enumerate() {
            let key = Key::from_spec(kid.as_deref(), spec)
                .map_err(|e| key_err(kid.clone().unwrap_or_else(|| format!("#{j}")), e))?;
            keys.push(Key {
                source: *source,
                ..key
            });
        }
        Ok(Self {
            idx,
            id: id.as_str().into(),
            api_key: material.api_key.clone(),
            keys,
            revoked: ps
                .map(|ps| ps.revoked.iter().cloned().collect())
                .unwrap_or_default(),
            config_material: material,
            require_exp: p.require_exp,
            leeway_secs: p.leeway_secs,
            max_token_lifetime_secs: p.max_token_lifetime_secs,
            issuer: p.issuer.clone(),
            audience: p.audience.clone(),
            allow_client_publish: p.allow_client_publish,
            enabled: p.enabled,
            max_connections: p.max_connections,
            allowed_origins: p.allowed_origins.clone(),
            ip_access: crate::protection::access::IpList::parse(&p.allow_ips, &p.deny_ips)
                .map_err(|(key, reason)| ConfigError::Invalid {
                    key: format!("{at}.{key}_ips"),
                    reason,
                })?,
            nr_connections,
            near_cap_warned,
            from_api,
            history: p
                .history
                .iter()
                .map(|h| crate::history::Rule {
                    pattern: h.topics.as_str().into(),
                    size: h.size,
                    ttl_ms: h.ttl_secs.saturating_mul(1000),
                })
                .collect(),
        })
    }

    /// Verifies `token` against this project's keys and settings.
    ///
    /// # Errors
    /// [`AuthError`] saying why (never containing the token).
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.kid.is_none() {
            let nr_keys = self.keys.iter().filter(|k| k.alg == header.alg).count();
            if nr_keys > MAX_KIDLESS_KEYS {
                return Err(AuthError::KidRequired { nr_keys });
            }
        }
        let candidates = self.keys.iter().filter(|k| match &header.kid {
            Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
            None => true,
        });
        let mut last = AuthError::UnknownKey;
        // With a kid there is at most one candidate; without, try each key of the same alg
        // (at most MAX_KIDLESS_KEYS, checked above).
        for key in candidates {
            if key.alg != header.alg {
                continue;
            }
            match jsonwebtoken::decode::<Decoded>(token, &key.decoding, &self.validation(key.alg)) {
                Ok(data) => {
                    self.check_claims(&data.claims)?;
                    self.check_lifetime(data.claims.claims.exp)?;
                    return Ok(Verified {
                        claims: data.claims.claims,
                        kid: key.kid.clone(),
                    });
                }
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

    /// What `jsonwebtoken` leaves to us: `iat` not in the future (beyond the leeway), and a
    /// `sub` (and `device`) that names a reachable topic.
    fn check_claims(&self, d: &Decoded) -> Result<(), AuthError> {
        if let Some(iat) = &d.iat {
            let iat = iat
                .as_f64()
                .filter(|t| t.is_finite())
                .ok_or(AuthError::Claim("iat must be a number"))?;
            if iat > now_secs().saturating_add(self.leeway_secs) as f64 {
                return Err(AuthError::IssuedInFuture);
            }
        }
        let bad = |claim| move |reason| AuthError::BadId { claim, reason };
        crate::pubsub::check_id(&d.claims.sub).map_err(bad("sub"))?;
        if let Some(device) = &d.claims.device {
            crate::pubsub::check_id(device).map_err(bad("device"))?;
        }
        Ok(())
    }

    /// Refuses an `exp` further ahead than `max_token_lifetime_secs` plus the leeway (an
    /// issuer's clock may run that far ahead), so no connection outlives the bound.
    fn check_lifetime(&self, exp: Option<u64>) -> Result<(), AuthError> {
        let latest = now_secs()
            .saturating_add(self.max_token_lifetime_secs)
            .saturating_add(self.leeway_secs);
        match exp {
            Some(exp) if exp > latest => Err(AuthError::TooLongLived {
                max_secs: self.max_token_lifetime_secs,
            }),
            _ => Ok(()),
        }
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

    /// Mints a token with the first HMAC key (for `herald token` and tests): `claims` plus
    /// `iat` (now) and the project's `iss` and `aud` when it requires them, so the project
    /// accepts it.
    ///
    /// # Errors
    /// The project has no HMAC key.
    pub fn mint(&self, claims: &Claims) -> Result<String, String> {
        #[derive(Serialize)]
        struct Minted<'a> {
            #[serde(flatten)]
            claims: &'a Claims,
            iat: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            iss: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            aud: Option<&'a str>,
        }
        let minted = Minted {
            claims,
            iat: now_secs(),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.encoding.is_some())
            .ok_or_else(|| format!("project `{}` has no HMAC key to sign with", self.id))?;
        let mut header = Header::new(key.alg);
        header.kid = key.kid.as_deref().map(str::to_owned);
        let enc = key.encoding.as_ref().expect("filtered on encoding above");
        jsonwebtoken::encode(&header, &minted, enc).map_err(|e| e.to_string())
    }

    /// Whether the `Origin` header is acceptable.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        self.allowed_origins.is_empty()
            || origin.is_some_and(|o| self.allowed_origins.iter().any(|a| a == o))
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

    fn project() -> Arc<Project> {
        Registry::from_config(&Config::development())
            .unwrap()
            .project("demo")
            .unwrap()
            .clone()
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
        let v = p.verify(&p.mint(&c).unwrap()).unwrap();
        assert_eq!(v.claims, c);
        assert_eq!(v.kid.as_deref(), Some("dev"));
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
        // Flip a character in the middle of the signature (the last one is partly padding
        // bits, so changing it may not change the decoded signature).
        let sig_start = good.rfind('.').unwrap() + 1;
        let mid = sig_start + (good.len() - sig_start) / 2;
        let mut tampered = good.clone().into_bytes();
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(p.verify(&tampered), Err(AuthError::BadSignature));
    }

    /// `exp` may be at most `max_token_lifetime_secs` plus the leeway ahead (default 30 days
    /// and 30 s); `exp` near 2^63 is refused rather than kept for ever.
    #[test]
    fn lifetime_is_bounded() {
        let p = project();
        let max = crate::config::DEFAULT_MAX_TOKEN_LIFETIME_SECS;
        assert_eq!(p.max_token_lifetime_secs, max);
        let at_bound = p.mint(&claims(Some(now_secs() + max))).unwrap();
        assert!(p.verify(&at_bound).is_ok());
        let too_far = AuthError::TooLongLived { max_secs: max };
        for exp in [now_secs() + max + p.leeway_secs + 60, 1 << 63, u64::MAX] {
            let t = p.mint(&claims(Some(exp))).unwrap();
            assert_eq!(p.verify(&t), Err(too_far.clone()), "exp {exp}");
        }
        assert_eq!(
            too_far.to_string(),
            "token lifetime too long: exp is more than 2592000 s ahead"
        );
    }

    #[test]
    fn same_kid_in_two_projects_never_crosses() {
        let mut cfg = Config::development();
        let mut other = cfg.projects[0].clone();
        other.id = "other".into();
        other.keys[0].secret = Some(crate::config::Secret("another-secret-0123456789".into()));
        cfg.projects.push(other);
        let r = Registry::from_config(&cfg).unwrap();
        let (demo, other) = (r.project("demo").unwrap(), r.project("other").unwrap());
        let t = other.mint(&claims(Some(now_secs() + 60))).unwrap();
        assert!(other.verify(&t).is_ok());
        assert_eq!(demo.verify(&t), Err(AuthError::BadSignature));
    }

    #[test]
    fn a_change_to_one_project_rebuilds_only_that_project() {
        let mut cfg = Config::development();
        let mut other = cfg.projects[0].clone();
        other.id = "other".into();
        cfg.projects.push(other);
        let r1 = Registry::from_config(&cfg).unwrap();
        let r2 = Registry::build_changed(&cfg, &State::default(), Some(&r1), Some("demo")).unwrap();
        assert!(Arc::ptr_eq(
            r1.project("other").unwrap(),
            r2.project("other").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            r1.project("demo").unwrap(),
            r2.project("demo").unwrap()
        ));
        // A full build (a reload) rebuilds every project.
        let r3 = Registry::build(&cfg, &State::default(), Some(&r2)).unwrap();
        assert!(!Arc::ptr_eq(
            r2.project("other").unwrap(),
            r3.project("other").unwrap()
        ));
    }

    #[test]
    fn indices_survive_rebuilds() {
        let cfg = Config::development();
        let r1 = Registry::from_config(&cfg).unwrap();
        let mut cfg2 = cfg.clone();
        let mut b = cfg.projects[0].clone();
        b.id = "b".into();
        cfg2.projects.insert(0, b);
        let r2 = Registry::build(&cfg2, &State::default(), Some(&r1)).unwrap();
        assert_eq!(r2.project("demo").unwrap().idx, 0);
        assert_eq!(r2.project("b").unwrap().idx, 1);
        assert!(Arc::ptr_eq(
            &r1.project("demo").unwrap().nr_connections,
            &r2.project("demo").unwrap().nr_connections
        ));
        let r3 = Registry::build(&cfg, &State::default(), Some(&r2)).unwrap();
        assert!(r3.project("b").is_none());
        let r4 = Registry::build(&cfg2, &State::default(), Some(&r3)).unwrap();
        assert_eq!(
            r4.project("b").unwrap().idx,
            1,
            "a returning project keeps its index"
        );
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

    /// API and admin keys have a minimum length too, inline or from a file.
    #[test]
    fn short_api_and_admin_keys_are_refused() {
        let err = |cfg: &Config| Registry::from_config(cfg).err().map(|e| e.to_string());
        let mut cfg = Config::development();
        cfg.api.admin_key = Some(crate::config::Secret("fifteen-bytes!!".into()));
        let e = err(&cfg).expect("short admin key refused");
        assert!(
            e.contains("api.admin_key") && e.contains("at least 16 bytes"),
            "{e}"
        );
        let mut cfg = Config::development();
        cfg.projects[0].api_key = Some(crate::config::Secret("short".into()));
        let e = err(&cfg).expect("short api key refused");
        assert!(e.contains("projects[0].api_key"), "{e}");
        let file = std::env::temp_dir().join(format!("herald-key-{}", std::process::id()));
        std::fs::write(&file, "short-key\n").unwrap();
        let mut cfg = Config::development();
        cfg.api.admin_key = None;
        cfg.api.admin_key_file = Some(file.clone());
        let e = err(&cfg).expect("short admin key file refused");
        std::fs::remove_file(&file).unwrap();
        assert!(e.contains("api.admin_key"), "{e}");
        let mut cfg = Config::development();
        cfg.projects[0].api_key = Some(crate::config::Secret("x".repeat(16)));
        assert!(err(&cfg).is_none(), "16 bytes is enough");
    }

    fn signed(claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("dev".into());
        let key = jsonwebtoken::EncodingKey::from_secret(crate::config::DEV_SECRET.as_bytes());
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// `iat` is honoured: later than now plus the leeway (30 s) is refused; a non-number too.
    #[test]
    fn iat_in_the_future_is_refused() {
        use serde_json::json;
        let p = project();
        let (now, exp) = (now_secs(), now_secs() + 600);
        for (iat, want) in [
            (json!(now), Ok(())),
            (json!(now + 20), Ok(())),
            (json!(now as f64 + 0.5), Ok(())),
            (json!(now + 120), Err(AuthError::IssuedInFuture)),
            (json!(1e300), Err(AuthError::IssuedInFuture)),
            (json!("soon"), Err(AuthError::Claim("iat must be a number"))),
        ] {
            let t = signed(&json!({"sub": "42", "exp": exp, "iat": iat}));
            assert_eq!(p.verify(&t).map(|_| ()), want, "iat {iat}");
        }
    }

    /// A `sub` (or `device`) that could not be addressed is refused at the handshake.
    #[test]
    fn unaddressable_ids_are_refused() {
        use crate::pubsub::NameError;
        use serde_json::json;
        let p = project();
        let exp = now_secs() + 600;
        let long = "x".repeat(crate::pubsub::MAX_ID_BYTES + 1);
        for (sub, want) in [
            ("", Some(NameError::IdLength)),
            (long.as_str(), Some(NameError::IdLength)),
            ("a\u{0}b", Some(NameError::Control('\0'))),
            ("a\nb", Some(NameError::Control('\n'))),
            ("auth0|5f1c", None),
            ("alice@example.com", None),
            ("José", None),
        ] {
            let t = signed(&json!({"sub": sub, "exp": exp}));
            let got = p.verify(&t).err();
            let want = want.map(|reason| AuthError::BadId {
                claim: "sub",
                reason,
            });
            assert_eq!(got, want, "sub {sub:?}");
        }
        let t = signed(&json!({"sub": "a", "exp": exp, "device": ""}));
        assert_eq!(
            p.verify(&t).err().map(|e| e.to_string()),
            Some("claim `device` must be 1 to 256 bytes of UTF-8".into())
        );
    }

    /// A kid-less token is tried against at most [`MAX_KIDLESS_KEYS`] keys of its alg; with
    /// more it is refused, whatever its signature. Tokens naming a kid are not affected.
    #[test]
    fn kidless_tokens_are_tried_against_at_most_4_keys() {
        let kidless = |secret: &str| {
            let c = serde_json::json!({"sub": "42", "exp": now_secs() + 600});
            let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &key).unwrap()
        };
        let mut cfg = Config::development();
        let base = cfg.projects[0].keys[0].clone();
        for n in 2..=MAX_KIDLESS_KEYS + 1 {
            let mut k = base.clone();
            k.kid = Some(format!("k{n}"));
            k.secret = Some(crate::config::Secret(format!(
                "secret-number-{n}-0123456789"
            )));
            cfg.projects[0].keys.push(k);
            let r = Registry::from_config(&cfg).unwrap();
            let p = r.project("demo").unwrap();
            let last = kidless(&format!("secret-number-{n}-0123456789"));
            if n <= MAX_KIDLESS_KEYS {
                assert_eq!(
                    p.verify(&last).map(|v| v.kid),
                    Ok(Some(format!("k{n}").into()))
                );
            } else {
                assert_eq!(p.verify(&last), Err(AuthError::KidRequired { nr_keys: n }));
                assert!(
                    p.verify(&signed(
                        &serde_json::json!({"sub": "42", "exp": now_secs() + 600})
                    ))
                    .is_ok()
                );
            }
        }
    }

    /// A project's keys are capped, counting the config keys, the JWKS and the API's.
    #[test]
    fn a_project_has_at_most_32_keys() {
        let cfg = crate::config::development_with_keys(MAX_KEYS_PER_PROJECT);
        assert!(Registry::from_config(&cfg).is_ok());
        let mut state = State::default();
        let ps = state.projects.entry("demo".into()).or_default();
        let spec = KeySpec {
            alg: "HS256".into(),
            secret: Some(crate::config::DEV_SECRET.into()),
            pem: None,
            jwk: None,
        };
        ps.keys.insert("k1".into(), spec.clone());
        assert!(
            Registry::build(&cfg, &state, None).is_ok(),
            "a replacement adds none"
        );
        state
            .projects
            .get_mut("demo")
            .unwrap()
            .keys
            .insert("api".into(), spec);
        let e = Registry::build(&cfg, &state, None)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "invalid `projects[0].keys`: 33 keys (config keys, JWKS and keys added through the API), \
                 more than 32"
            )
        );
    }

    /// A minted token carries the project's `iss` and `aud`, so a project requiring them
    /// accepts it.
    #[test]
    fn minted_tokens_satisfy_issuer_and_audience() {
        let mut cfg = Config::development();
        cfg.projects[0].issuer = Some("https://issuer.example".into());
        cfg.projects[0].audience = Some("herald".into());
        let r = Registry::from_config(&cfg).unwrap();
        let p = r.project("demo").unwrap();
        let c = claims(Some(now_secs() + 60));
        assert_eq!(p.verify(&p.mint(&c).unwrap()).unwrap().claims, c);
    }
}
