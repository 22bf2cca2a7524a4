//! `Idempotency-Key`s shared by the nodes of a cluster: with `[engine]`, a keyed publish is
//! remembered in Redis, so a retry sent to any node answers the first answer again and
//! publishes nothing.
//!
//! A key is `<prefix>~idem:<scope>:<endpoint>:<key>` (the scope is the caller's project id,
//! or `~admin` for the admin key), held [`TTL`]. Its value is `p:<fingerprint>` while the
//! first publish is on its way (taken with `SET NX`, so exactly one node publishes), then
//! `d:<fingerprint>:<answer>` once it is accepted. A publish that is refused removes the key:
//! it sent nothing, so its retry publishes. A retry that finds the key taken with the same
//! body waits for the answer (at most `engine.command_timeout_ms`, then 503 `busy` with
//! `Retry-After`); with another body it is 422 `idempotency_key_reused`. Redis not answering
//! is 503 `engine_unavailable`, before anything is published. The fingerprint is the body's
//! SHA-256, the same on every node and every build.

use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use sha2::{Digest, Sha256};

use super::error::IdempotencyError;
use super::idempotency::{self, Endpoint, TTL};
use super::{ApiError, Caller};
use crate::broker::control::ControlPlane;
use crate::broker::{EngineDown, PublishError};
use crate::hub::Hub;

/// How often a retry looks whether the first publish under its key is done.
const POLL: Duration = Duration::from_millis(20);

/// What Redis holds under a key.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// Nothing (expired, or the first publish was refused).
    Nothing,
    /// A publish of this fingerprint is on its way.
    Pending(String),
    /// A publish of this fingerprint was accepted with this answer.
    Done(String, Bytes),
}

impl Held {
    fn parse(v: Option<Vec<u8>>) -> Self {
        let Some(v) = v else {
            return Self::Nothing;
        };
        let text = String::from_utf8_lossy(&v);
        if let Some(fp) = text.strip_prefix("p:") {
            return Self::Pending(fp.to_owned());
        }
        match text.strip_prefix("d:").and_then(|r| r.split_once(':')) {
            Some((fp, answer)) => Self::Done(fp.to_owned(), Bytes::from(answer.to_owned())),
            None => Self::Nothing,
        }
    }
}

/// The outcome of a keyed publish.
pub(super) enum Outcome {
    /// Published now: this answer.
    Published(Bytes),
    /// Accepted before under this key: this answer again.
    Replayed(Bytes),
}

/// The fingerprint of a body: hex SHA-256.
fn fingerprint(body: &[u8]) -> String {
    Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The Redis key of `key` for `who` on `endpoint`.
fn redis_key(
    hub: &Hub,
    control: &ControlPlane,
    who: Caller,
    endpoint: Endpoint,
    key: &str,
) -> String {
    let scope = match who {
        Caller::Admin => "~admin".to_owned(),
        Caller::Project(idx) => hub
            .registry
            .load()
            .project_at(idx)
            .map_or_else(|| format!("~{idx}"), |p| p.id.to_string()),
    };
    let endpoint = match endpoint {
        Endpoint::Single => "single",
        Endpoint::Batch => "batch",
    };
    format!("{}~idem:{scope}:{endpoint}:{key}", control.prefix())
}

/// Redis did not answer: nothing was published.
fn unavailable(e: &str) -> ApiError {
    tracing::warn!("Idempotency-Key not checked in Redis, publish refused: {e}");
    PublishError::EngineUnavailable(EngineDown::NotConnected).into()
}

/// The single answer of a one-command pipeline.
fn first(v: Value) -> Value {
    match v {
        Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
        other => other,
    }
}

/// Runs `publish` unless the key was taken in Redis with the same body: then answers that
/// publish's answer (waiting for it if it is on its way).
///
/// # Errors
/// The publish's own, 422 `idempotency_key_reused`, 503 `busy` (the first publish under the
/// key is still on its way) or `engine_unavailable` (Redis did not answer).
pub(super) async fn once(
    hub: &Hub,
    control: &ControlPlane,
    who: Caller,
    endpoint: Endpoint,
    key: String,
    body: &[u8],
    publish: impl AsyncFnOnce() -> Result<Vec<String>, ApiError>,
) -> Result<Outcome, ApiError> {
    let rkey = redis_key(hub, control, who, endpoint, &key);
    let fp = fingerprint(body);
    let ttl_ms = TTL.as_millis() as u64;
    let deadline = tokio::time::Instant::now() + control.timeout();
    loop {
        let mut take = redis::pipe();
        take.cmd("SET")
            .arg(&rkey)
            .arg(format!("p:{fp}"))
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        if first(control.query(take).await.map_err(|e| unavailable(&e))?) == Value::Okay {
            break;
        }
        let mut get = redis::pipe();
        get.cmd("GET").arg(&rkey);
        let held = first(control.query(get).await.map_err(|e| unavailable(&e))?);
        let held = Held::parse(redis::from_redis_value(held).unwrap_or(None));
        match held {
            Held::Done(f, answer) if f == fp => return Ok(Outcome::Replayed(answer)),
            Held::Done(..) => return Err(IdempotencyError::Reused(key).into()),
            Held::Pending(f) if f != fp => return Err(IdempotencyError::Reused(key).into()),
            Held::Pending(_) if tokio::time::Instant::now() >= deadline => {
                return Err(ApiError::new(
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    format!(
                        "a publish with Idempotency-Key `{key}` is on its way on another \
                         request; nothing was sent, retry for its answer"
                    ),
                )
                .retry_after(1));
            }
            Held::Pending(_) => tokio::time::sleep(POLL).await,
            // Gone meanwhile: take it again.
            Held::Nothing => {}
        }
    }
    match publish().await {
        Ok(ids) => {
            let answer = idempotency::answer(endpoint, &ids);
            let mut done = redis::pipe();
            done.cmd("SET")
                .arg(&rkey)
                .arg([b"d:", fp.as_bytes(), b":", &answer[..]].concat())
                .arg("XX")
                .arg("PX")
                .arg(ttl_ms);
            if let Err(e) = control.query(done).await {
                tracing::warn!(
                    "the answer of a publish with an Idempotency-Key was not stored in Redis \
                     ({e}): a retry under the key waits, then is refused 503 `busy`, until \
                     the key expires"
                );
            }
            Ok(Outcome::Published(answer))
        }
        Err(e) => {
            let mut release = redis::pipe();
            release.cmd("DEL").arg(&rkey);
            let _ = control.query(release).await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_values_are_told_apart() {
        assert_eq!(Held::parse(None), Held::Nothing);
        assert_eq!(
            Held::parse(Some(b"p:ab".to_vec())),
            Held::Pending("ab".into())
        );
        assert_eq!(
            Held::parse(Some(br#"d:ab:{"id":"n-1"}"#.to_vec())),
            Held::Done("ab".into(), Bytes::from_static(br#"{"id":"n-1"}"#))
        );
        assert_eq!(fingerprint(b"x").len(), 64);
        assert_eq!(fingerprint(b"x"), fingerprint(b"x"));
        assert_ne!(fingerprint(b"x"), fingerprint(b"y"));
    }
}
