//! Tokens and keys: reads what the bench needs from a herald config file (without depending
//! on the server crate) and mints JWTs for the connections.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// The public HS256 secret of herald's embedded development default (project `demo`).
pub const DEV_SECRET: &str = "herald-dev-secret-do-not-use-in-production";
/// The admin key of herald's embedded development default.
pub const DEV_ADMIN_KEY: &str = "herald-dev-admin";
/// The project of herald's embedded development default.
pub const DEV_PROJECT: &str = "demo";

/// The part of a herald config the bench uses. Unknown keys are ignored: the server owns the
/// schema (`herald check-config` validates it).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    server: RawServer,
    api: RawApi,
    projects: Vec<RawProject>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawServer {
    listen: Option<String>,
    api_listen: Option<String>,
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawApi {
    admin_key: Option<String>,
    admin_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProject {
    id: String,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    keys: Vec<RawKey>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawKey {
    kid: Option<String>,
    alg: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
}

/// What a herald config file tells the bench.
#[derive(Debug, Clone)]
pub struct HeraldFacts {
    /// The chosen project.
    pub project: String,
    /// Its keys in order: (kid, alg, HMAC secret for HS* keys).
    pub keys: Vec<(Option<String>, String, Option<String>)>,
    /// The key to publish with: the project's API key, else the admin key.
    pub api_key: Option<String>,
    /// `server.listen` as written.
    pub listen: Option<String>,
    /// `server.api_listen` as written.
    pub api_listen: Option<String>,
    /// `server.state_dir`, when set.
    pub state_dir: Option<PathBuf>,
}

impl HeraldFacts {
    /// The key tokens should match: the first of algorithm `alg`, else the first HMAC key.
    /// Returns (kid, alg, secret).
    pub fn key_for(&self, alg: Option<&str>) -> Option<(Option<String>, String, Option<String>)> {
        match alg {
            Some(a) => self.keys.iter().find(|k| k.1.eq_ignore_ascii_case(a)),
            None => self
                .keys
                .iter()
                .find(|k| k.1.starts_with("HS") && k.2.is_some()),
        }
        .cloned()
    }
}

fn secret(inline: &Option<String>, file: &Option<PathBuf>) -> Result<Option<String>> {
    if let Some(s) = inline {
        return Ok(Some(s.clone()));
    }
    match file {
        Some(p) => Ok(Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim_end()
                .to_owned(),
        )),
        None => Ok(None),
    }
}

/// Reads `path` and picks `project` (or the first project).
///
/// # Errors
/// The file cannot be read or parsed, the project is not in it, or a secret file is missing.
pub fn read_herald_config(path: &Path, project: Option<&str>) -> Result<HeraldFacts> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: RawConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let p = match project {
        Some(id) => raw.projects.iter().find(|p| p.id == id),
        None => raw.projects.first(),
    };
    let Some(p) = p else {
        bail!(
            "{}: no project {}",
            path.display(),
            project.unwrap_or("(the file has no [[projects]])")
        );
    };
    let mut keys = Vec::new();
    for k in &p.keys {
        let s = if k.alg.starts_with("HS") {
            secret(&k.secret, &k.secret_file)?
        } else {
            None
        };
        keys.push((k.kid.clone(), k.alg.clone(), s));
    }
    let api_key = match secret(&p.api_key, &p.api_key_file)? {
        Some(k) => Some(k),
        None => secret(&raw.api.admin_key, &raw.api.admin_key_file)?,
    };
    Ok(HeraldFacts {
        project: p.id.clone(),
        keys,
        api_key,
        listen: raw.server.listen,
        api_listen: raw.server.api_listen,
        state_dir: raw.server.state_dir,
    })
}

/// How to sign tokens: everything a worker process needs to mint its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenSpec {
    /// JWT algorithm name (`HS256`, `RS256`, `ES256`, `EdDSA`, ...).
    pub alg: String,
    /// HMAC secret (HS* algorithms).
    pub secret: Option<String>,
    /// PEM private key (RS*, PS*, ES*, EdDSA).
    pub key_pem: Option<String>,
    /// `kid` header, when the server's key has one.
    pub kid: Option<String>,
    /// Token lifetime, in seconds.
    pub ttl_secs: u64,
}

/// Signs tokens for `sub`s.
pub struct Minter {
    header: Header,
    key: EncodingKey,
    ttl_secs: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

impl Minter {
    /// Builds a minter from its spec.
    ///
    /// # Errors
    /// Unknown algorithm, or a missing or unreadable key.
    pub fn new(spec: &TokenSpec) -> Result<Self> {
        let alg = Algorithm::from_str(&spec.alg)
            .map_err(|_| anyhow::anyhow!("unknown JWT algorithm `{}`", spec.alg))?;
        let pem = || {
            spec.key_pem
                .as_deref()
                .map(str::as_bytes)
                .with_context(|| format!("--alg {} needs --key-file (a PEM private key)", spec.alg))
        };
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(
                spec.secret
                    .as_deref()
                    .context("HS* tokens need --secret or --herald-config")?
                    .as_bytes(),
            ),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => EncodingKey::from_rsa_pem(pem()?).context("RSA PEM key")?,
            Algorithm::ES256 | Algorithm::ES384 => {
                EncodingKey::from_ec_pem(pem()?).context("EC PEM key")?
            }
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem()?).context("Ed25519 PEM key")?,
            other => bail!("JWT algorithm {other:?} is not supported by the bench"),
        };
        let mut header = Header::new(alg);
        header.kid = spec.kid.clone();
        Ok(Self {
            header,
            key,
            ttl_secs: spec.ttl_secs,
        })
    }

    /// A token for `sub`, valid from now for the configured lifetime.
    ///
    /// # Errors
    /// Signing failed (a key that does not fit the algorithm).
    pub fn mint(&self, sub: &str) -> Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            sub,
            iat: now,
            exp: now + self.ttl_secs,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).context("signing a token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_first_project_and_falls_back_to_admin_key() {
        let dir = std::env::temp_dir().join(format!("hb-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("h.toml");
        std::fs::write(
            &f,
            "[server]\nlisten = \"127.0.0.1:0\"\n[api]\nadmin_key = \"adm\"\n\
             [[projects]]\nid = \"p1\"\n[[projects.keys]]\nkid = \"k\"\nalg = \"HS256\"\n\
             secret = \"0123456789abcdef\"\n[[projects]]\nid = \"p2\"\napi_key = \"pk\"\n",
        )
        .unwrap();
        let f1 = read_herald_config(&f, None).unwrap();
        assert_eq!(f1.project, "p1");
        assert_eq!(f1.api_key.as_deref(), Some("adm"));
        let (kid, alg, s) = f1.key_for(None).unwrap();
        assert_eq!(
            (kid.as_deref(), alg.as_str(), s.as_deref()),
            (Some("k"), "HS256", Some("0123456789abcdef"))
        );
        assert!(f1.key_for(Some("ES256")).is_none());
        let f2 = read_herald_config(&f, Some("p2")).unwrap();
        assert_eq!(f2.api_key.as_deref(), Some("pk"));
        assert!(read_herald_config(&f, Some("nope")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mints_verifiable_hs256() {
        let m = Minter::new(&TokenSpec {
            alg: "HS256".into(),
            secret: Some("0123456789abcdef".into()),
            key_pem: None,
            kid: Some("k1".into()),
            ttl_secs: 60,
        })
        .unwrap();
        let t = m.mint("u1").unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let d = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef"),
            &v,
        )
        .unwrap();
        assert_eq!(d.claims["sub"], "u1");
        assert_eq!(d.header.kid.as_deref(), Some("k1"));
        assert!(
            Minter::new(&TokenSpec {
                alg: "ES256".into(),
                secret: None,
                key_pem: None,
                kid: None,
                ttl_secs: 60
            })
            .is_err()
        );
    }
}
