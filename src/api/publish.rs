//! `POST /api/v1/publish` and `/api/v1/publish/batch`.
//!
//! `data` is kept as raw JSON (`RawValue`): validated by the parser, delivered byte for byte.
//! Everything is checked before anything is sent, so a bad request delivers nothing, and a
//! publish or a whole batch goes to every shard or to none (see [`crate::hub`]): a refusal
//! means nothing was sent. An `Idempotency-Key` header makes a retry safe
//! ([`super::idempotency`]).
//!
//! An accepted publish is answered once every shard's inbox is shallow again ([`pace`]): a
//! publisher faster than the shards then waits for them instead of queueing ahead of them, so
//! what it publishes next is not delivered later and later.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::Mutex;

use super::error::IdempotencyError;
use super::idempotency::{self, Endpoint, IdempotencyCache, Lookup};
use super::idempotency_shared;
use super::{ApiError, ApiSettings, Caller, JsonBody, authorize};
use crate::hub::Hub;
use crate::pubsub::Topic;

/// Most topics in one publish.
const MAX_TOPICS: usize = 64;
/// Most publishes in one batch.
const MAX_BATCH: usize = 1000;
/// The document a publish body is, in its errors.
const PUBLISH_BODY: &str = "publish body";
/// Longest the answer of an accepted publish waits for the shards' inboxes ([`pace`]); past
/// it the publish (already queued) is answered anyway.
const MAX_PACE: Duration = Duration::from_secs(1);

/// Waits, at most [`MAX_PACE`], until every shard's inbox holds at most
/// [`crate::shard::mailbox::SHALLOW_DEPTH`] messages. An accepted publish is answered after
/// this: a publisher then goes no faster than the shards deliver, and the inboxes stay short.
async fn pace(hub: &Hub) {
    let shallow = async {
        for mailbox in &hub.mailboxes {
            mailbox.shallow().await;
        }
    };
    let _ = tokio::time::timeout(MAX_PACE, shallow).await;
}

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
    let project = authorize(hub, who, &b.project)?;
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

/// The request's `Idempotency-Key`, if it has one.
fn idempotency_key(req: &Request<Incoming>) -> Result<Option<String>, IdempotencyError> {
    let mut values = req.headers().get_all("idempotency-key").iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(IdempotencyError::Repeated);
    }
    idempotency::parse_key(v.as_bytes())
        .map(|k| Some(k.to_owned()))
        .map_err(IdempotencyError::BadKey)
}

/// Runs `publish` (which answers the message ids) unless the same `Idempotency-Key` (of this
/// caller, on this endpoint) was accepted with the same body within the window: then answers
/// that again, publishing nothing. A new key the cache has no room for is refused, 503 `busy`,
/// before anything is published.
#[allow(clippy::too_many_arguments)]
async fn once(
    hub: &Hub,
    cache: &Mutex<IdempotencyCache>,
    who: Caller,
    endpoint: Endpoint,
    key: Option<String>,
    bytes: &[u8],
    nr_ids: usize,
    publish: impl AsyncFnOnce() -> Result<Vec<String>, ApiError>,
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
        return publish()
            .await
            .map(|ids| answer(idempotency::answer(endpoint, &ids), false));
    };
    // In a cluster the key is the cluster's: a retry to any node replays.
    if let Some(control) = hub.broker.control() {
        return Ok(
            match idempotency_shared::once(hub, control, who, endpoint, key, bytes, publish).await?
            {
                idempotency_shared::Outcome::Published(body) => answer(body, false),
                idempotency_shared::Outcome::Replayed(body) => answer(body, true),
            },
        );
    }
    let fp = idempotency::fingerprint(bytes);
    // Held across the publish (and its wait for an engine's acknowledgement): a concurrent
    // retry waits and then replays.
    let mut cache = cache.lock().await;
    // Taken under the lock, so the cache sees its keys in age order.
    let now = Instant::now();
    match cache.lookup(who, endpoint, &key, fp, nr_ids, now) {
        Lookup::Replay(body) => Ok(answer(body, true)),
        Lookup::Conflict => Err(IdempotencyError::Reused(key).into()),
        Lookup::Full { retry_after_secs } => {
            Err(IdempotencyError::Full { retry_after_secs }.into())
        }
        Lookup::New => {
            let ids = publish().await?;
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
    let body = JsonBody::read(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    let c = check(hub, who, body.parse(PUBLISH_BODY, false)?)?;
    let answer = once(
        hub,
        cache,
        who,
        Endpoint::Single,
        key,
        body.bytes(),
        1,
        async || {
            // Sent and, with an engine, acknowledged by it before the answer.
            let (id, publication) = hub.prepare(c.project, &c.topics, c.data)?;
            hub.send(std::slice::from_ref(&publication)).await?;
            crate::metrics::ShardStats::add(&hub.api_published, 1);
            Ok(vec![id])
        },
    )
    .await?;
    pace(hub).await;
    Ok(answer)
}

pub(super) async fn batch(
    hub: &Hub,
    settings: &ApiSettings,
    cache: &Mutex<IdempotencyCache>,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let key = idempotency_key(&req)?;
    let body = JsonBody::read(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    let items: Vec<PublishBody<'_>> = body.parse(PUBLISH_BODY, false)?;
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
    let answer = once(
        hub,
        cache,
        who,
        Endpoint::Batch,
        key,
        body.bytes(),
        checked.len(),
        async || {
            let (ids, publications): (Vec<_>, Vec<_>) = checked
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    hub.prepare(c.project, &c.topics, c.data)
                        .map_err(|e| item_err(i)(e.into()))
                })
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            // Every item to every shard, or none.
            hub.send(&publications).await?;
            crate::metrics::ShardStats::add(&hub.api_published, ids.len() as u64);
            Ok(ids)
        },
    )
    .await?;
    pace(hub).await;
    Ok(answer)
}
