//! `POST /api/v1/publish` and `/api/v1/publish/batch`.
//!
//! `data` is kept as raw JSON (`RawValue`): validated by the parser, delivered byte for byte.
//! Everything is checked before anything is sent, so a bad request delivers nothing.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ApiError, ApiSettings, Caller, body, json};
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

fn send(hub: &Hub, c: &Checked<'_>) -> Result<String, ApiError> {
    hub.publish(c.project, &c.topics, c.data)
        .inspect(|_| crate::metrics::ShardStats::add(&hub.api_published, 1))
        .map_err(|e| match e {
            PublishError::Busy(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
            }
            PublishError::Draining => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", e.to_string())
            }
        })
}

fn parse_err(e: serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("invalid publish body: {e}"))
}

pub(super) async fn single(
    hub: &Hub,
    settings: &ApiSettings,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let bytes = body(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    let b: PublishBody<'_> = serde_json::from_slice(&bytes).map_err(parse_err)?;
    let checked = check(hub, who, b)?;
    let id = send(hub, &checked)?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "id": id })))
}

pub(super) async fn batch(
    hub: &Hub,
    settings: &ApiSettings,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let bytes = body(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    let items: Vec<PublishBody<'_>> = serde_json::from_slice(&bytes).map_err(parse_err)?;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "a batch holds 1 to {MAX_BATCH} publishes"
        )));
    }
    let checked = items
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            check(hub, who, b).map_err(|mut e| {
                e.message = format!("item {i}: {}", e.message);
                e
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ids = checked
        .iter()
        .map(|c| send(hub, c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "ids": ids })))
}
