//! `POST /api/v1/publish` and `/api/v1/publish/batch`.
//!
//! `data` is kept as raw JSON (`RawValue`): validated by the parser, delivered byte for byte.
//! Everything is checked before anything is sent, so a bad request delivers nothing, and a
//! publish or a whole batch goes to every shard or to none (see [`crate::hub`]): a refusal
//! means nothing was sent. An `Idempotency-Key` header makes a retry safe
//! ([`super::idempotency`]).

use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::idempotency::{self, Endpoint, IdempotencyCache, Lookup};
use super::{ApiError, ApiSettings, Caller, body};
use crate::hub::{Hub, PublishError};
use crate::pubsub::Topic;

/// Most topics in one publish.
const MAX_TOPICS: usize = 64;
/// Most publishes in one batch.
const MAX_BATCH: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(alias = "projectId")]
    project: String,
    topic: Option<String>,
    topics: Option<Vec<String>>,
    #[serde(
        alias = "payload",
        borrow,
        default,
        deserialize_with = "crate::ws::ops::present"
    )]
    data: Option<&'a RawValue>,
}

/// A checked publish, ready to send.
struct Checked<'a> {
    project: u32,
    topics: Vec<Topic>,
    data: &'a RawValue,
}

fn check<'a>(hub: &Hub, who: Caller, b: PublishBody<'a>) -> Result<Checked<'a>, ApiError> {
    let registry = hub.registry.load();
    let project = registry.project(&b.project).map(|p| p.idx);
    let project = match (project, who) {
        (Some(idx), who) if who.may_act_on(idx) => idx,
        (_, Caller::Project(_)) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this API key does not act on project `{}`", b.project),
            ));
        }
        (None, Caller::Admin) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_project",
                format!("no project `{}`", b.project),
            ));
        }
        (Some(_), Caller::Admin) => unreachable!("admin acts on every project"),
    };
    let names = match (b.topic, b.topics) {
        (Some(t), None) => vec![t],
        (None, Some(ts)) if !ts.is_empty() && ts.len() <= MAX_TOPICS => ts,
        (None, Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "`topics` needs 1 to {MAX_TOPICS} names"
            )));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("give `topic` or `topics`, not both"));
        }
        (None, None) => return Err(ApiError::bad_request("`topic` or `topics` is required")),
    };
    let mut topics = Vec::with_capacity(names.len());
    for n in &names {
        let t = Topic::parse(n).map_err(|e| ApiError::bad_request(format!("topic `{n}`: {e}")))?;
        if !topics.contains(&t) {
            topics.push(t);
        }
    }
    let data = b
        .data
        .ok_or_else(|| ApiError::bad_request("`data` is required"))?;
    Ok(Checked {
        project,
        topics,
        data,
    })
}

/// The API error for a refused publish (nothing was sent in every case).
fn refused(e: PublishError) -> ApiError {
    let (status, code) = match e {
        PublishError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        PublishError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        PublishError::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
        PublishError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "message_too_large"),
    };
    ApiError::new(status, code, e.to_string())
}

fn parse_err(e: serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("invalid publish body: {e}"))
}

/// The request's `Idempotency-Key`, if it has one.
fn idempotency_key(req: &Request<Incoming>) -> Result<Option<String>, ApiError> {
    let mut values = req.headers().get_all("idempotency-key").iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "more than one Idempotency-Key header",
        ));
    }
    idempotency::parse_key(v.as_bytes())
        .map(|k| Some(k.to_owned()))
        .map_err(ApiError::bad_request)
}

/// Runs `publish` (which answers the message ids) unless the same `Idempotency-Key` (of this
/// caller, on this endpoint) was accepted with the same body within the window: then answers
/// that again, publishing nothing. A new key the cache has no room for is refused, 503 `busy`,
/// before anything is published.
fn once(
    cache: &Mutex<IdempotencyCache>,
    who: Caller,
    endpoint: Endpoint,
    key: Option<String>,
    bytes: &[u8],
    nr_ids: usize,
    publish: impl FnOnce() -> Result<Vec<String>, ApiError>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let answer = |body: Bytes, replayed: bool| {
        let mut r = Response::new(Full::new(body));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if replayed {
            r.headers_mut()
                .insert("idempotency-replayed", HeaderValue::from_static("true"));
        }
        r
    };
    let Some(key) = key else {
        return publish().map(|ids| answer(idempotency::answer(endpoint, &ids), false));
    };
    let fp = idempotency::fingerprint(bytes);
    // Held across the publish (no await inside): a concurrent retry waits and then replays.
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    // Taken under the lock, so the cache sees its keys in age order.
    let now = Instant::now();
    match cache.lookup(who, endpoint, &key, fp, nr_ids, now) {
        Lookup::Replay(body) => Ok(answer(body, true)),
        Lookup::Conflict => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!(
                "Idempotency-Key `{key}` was used with a different body within the last {} s",
                idempotency::TTL.as_secs()
            ),
        )),
        Lookup::Full { retry_after_secs } => Err(ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "the node remembers all the Idempotency-Keys it may ({} MiB of the last {} s); \
                     nothing was sent, retry in {retry_after_secs} s",
                    idempotency::MAX_BYTES >> 20,
                    idempotency::TTL.as_secs()
                ),
            )
        }),
        Lookup::New => {
            let ids = publish()?;
            cache.remember(who, endpoint, &key, fp, &ids, now);
            Ok(answer(idempotency::answer(endpoint, &ids), false))
        }
    }
}

pub(super) async fn single(
    hub: &Hub,
    settings: &ApiSettings,
    cache: &Mutex<IdempotencyCache>,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let key = idempotency_key(&req)?;
    let bytes = body(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    let b: PublishBody<'_> = serde_json::from_slice(&bytes).map_err(parse_err)?;
    let c = check(hub, who, b)?;
    once(cache, who, Endpoint::Single, key, &bytes, 1, || {
        let id = hub.publish(c.project, &c.topics, c.data).map_err(refused)?;
        crate::metrics::ShardStats::add(&hub.api_published, 1);
        Ok(vec![id])
    })
}

pub(super) async fn batch(
    hub: &Hub,
    settings: &ApiSettings,
    cache: &Mutex<IdempotencyCache>,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let key = idempotency_key(&req)?;
    let bytes = body(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    let items: Vec<PublishBody<'_>> = serde_json::from_slice(&bytes).map_err(parse_err)?;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1 to {MAX_BATCH} publishes"
        )));
    }
    let item_err = |i: usize| {
        move |mut e: ApiError| {
            e.message = format!("item {i}: {}", e.message);
            e
        }
    };
    let checked = items
        .into_iter()
        .enumerate()
        .map(|(i, b)| check(hub, who, b).map_err(item_err(i)))
        .collect::<Result<Vec<_>, _>>()?;
    once(
        cache,
        who,
        Endpoint::Batch,
        key,
        &bytes,
        checked.len(),
        || {
            let (ids, publications): (Vec<_>, Vec<_>) = checked
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    hub.prepare(c.project, &c.topics, c.data)
                        .map_err(|e| item_err(i)(refused(e)))
                })
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            // Every item to every shard, or none.
            hub.send(&publications).map_err(refused)?;
            crate::metrics::ShardStats::add(&hub.api_published, ids.len() as u64);
            Ok(ids)
        },
    )
}
