//! Connection management, gathered from every shard through reply-carrying `ShardMsg`s:
//! `GET /api/v1/connections`, `DELETE /api/v1/connections/{id}`, `POST /api/v1/disconnect`,
//! and the node's `GET /api/v1/stats`.
//!
//! The API thread never blocks on a shard: every command goes through [`Hub::shards`] (a
//! non-blocking send retried while an inbox is full, the answer on a tokio oneshot, one overall
//! deadline; a shard late at either answers 503 `busy`).
//!
//! With `[engine]` each endpoint answers for the whole cluster ([`super::cluster`] asks the
//! other nodes); the node's own part, and other nodes' requests ([`execute`]), are answered
//! here.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use super::cluster::{self, ConnJson};
use super::{ApiError, ApiSettings, Caller, authorize, json, read_json, require_admin};
use crate::hub::Hub;
use crate::metrics;
use crate::pubsub::{ConnId, Topic};
use crate::shard::mailbox::{ConnInfo, KickOutcome, ListQuery, ShardMsg};
use crate::ws::close::CLOSE_CODES;
use crate::ws::handshake::HandshakeOutcome;

/// Page size when `limit` is not given.
const DEFAULT_LIMIT: usize = 100;
/// Largest page.
const MAX_LIMIT: usize = 1000;

/// The id of the project at registry index `idx`, as other nodes know it.
fn project_id(hub: &Hub, idx: u32) -> Option<String> {
    hub.registry
        .load()
        .project_at(idx)
        .map(|p| p.id.to_string())
}

/// Asks `shard` a question and awaits the answer ([`Hub::shards`]).
async fn ask<T>(
    hub: &Hub,
    shard: usize,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> ShardMsg,
) -> Result<T, ApiError> {
    hub.shards()
        .ask_one(shard, make)
        .await?
        .ok_or_else(|| ApiError::shard_stopped(shard))
}

/// Resolves the project a request names ([`authorize`]); a project key that names none
/// means its own, the admin key naming none means every project.
fn project_scope(hub: &Hub, who: Caller, named: Option<&str>) -> Result<Option<u32>, ApiError> {
    match (who, named) {
        (_, Some(name)) => Ok(Some(authorize(hub, who, name)?)),
        (Caller::Project(idx), None) => Ok(Some(idx)),
        (Caller::Admin, None) => Ok(None),
    }
}

/// `GET /api/v1/connections?project=&topic=&user=&limit=&cursor=`.
///
/// Connections are in id order (shard, slot, generation). Shards are asked one after the
/// other, from the cursor's shard on, for what is still missing plus one (to know whether a
/// next page exists); a connection open for the whole listing keeps its slot, so it is
/// listed exactly once however others come and go.
pub(super) async fn list(
    hub: &Hub,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (mut project, mut topic, mut user, mut limit, mut cursor) = (None, None, None, None, None);
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        let v = v.into_owned();
        match &*k {
            "project" => project = Some(v),
            "topic" => topic = Some(v),
            "user" => user = Some(v),
            "limit" => limit = Some(v),
            "cursor" => cursor = Some(v),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`"
                )));
            }
        }
    }
    let project = project_scope(hub, who, project.as_deref())?;
    let topic = match topic {
        Some(t) => Some(
            Topic::parse(&t)
                .map_err(|e| ApiError::bad_request(format!("topic `{t}`: {e}")))?
                .as_str()
                .into(),
        ),
        None => None,
    };
    let user = match user {
        Some(u) => Some(Box::<str>::from(checked_user(u)?)),
        None => None,
    };
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`limit` is 1 to {MAX_LIMIT}"
                )));
            }
        },
    };
    let cursor_text = cursor.filter(|c| !c.is_empty());
    if let Some(control) = hub.broker.control() {
        let q = cluster::ListOp {
            project: project.and_then(|p| project_id(hub, p)),
            topic: topic.clone(),
            user: user.clone(),
            limit,
            cursor: None,
        };
        let local = async |after| {
            let found = list_local(hub, project, topic, user, limit, after).await?;
            Ok(found.into_iter().map(Into::into).collect())
        };
        return cluster::list(control, q, cursor_text, local).await;
    }
    let cursor = match cursor_text {
        None => None,
        Some(c) => Some(
            ConnId::parse(&c)
                .ok_or_else(|| ApiError::bad_request(format!("`cursor` `{c}` is not a cursor")))?,
        ),
    };
    let mut found = list_local(hub, project, topic, user, limit, cursor).await?;
    let next_cursor = if found.len() > limit {
        found.truncate(limit);
        found.last().map(|c| c.id.to_string())
    } else {
        None
    };
    let connections: Vec<ConnJson> = found.into_iter().map(Into::into).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "connections": connections, "next_cursor": next_cursor }),
    ))
}

/// This node's connections matching the filters after `cursor`, in id order: up to
/// `limit + 1` (one more than a page, to know whether a next page exists).
pub(super) async fn list_local(
    hub: &Hub,
    project: Option<u32>,
    topic: Option<Box<str>>,
    user: Option<Box<str>>,
    limit: usize,
    cursor: Option<ConnId>,
) -> Result<Vec<ConnInfo>, ApiError> {
    let first = cursor.map_or(0, |c| c.shard as usize);
    let mut found: Vec<ConnInfo> = Vec::new();
    for shard in first..hub.nr_shards() {
        let want = limit + 1 - found.len();
        let query = ListQuery {
            project,
            topic: topic.clone(),
            user: user.clone(),
            after: cursor
                .filter(|c| c.shard as usize == shard)
                .map(|c| (c.slot, c.generation)),
            limit: want,
        };
        found.extend(ask(hub, shard, |reply| ShardMsg::List { query, reply }).await?);
        if found.len() > limit {
            break;
        }
    }
    Ok(found)
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// `DELETE /api/v1/connections/{id}`: 204 and close 4003, 404 for an unknown or stale id,
/// 403 for another project's connection with a project key.
pub(super) async fn kick(
    hub: &Hub,
    who: Caller,
    id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let not_found = || ApiError::not_found(format!("no open connection `{id}`"));
    let project = match who {
        Caller::Admin => None,
        Caller::Project(idx) => Some(idx),
    };
    let outcome = match hub.broker.control() {
        Some(control) => {
            let project_id = project.and_then(|p| project_id(hub, p));
            let here = async |local: &str| kick_local(hub, local, project).await;
            cluster::kick(control, id, project_id, here).await?
        }
        None => kick_local(hub, id, project).await?,
    };
    match outcome {
        KickOutcome::Closed => Ok(no_content()),
        KickOutcome::NotFound => Err(not_found()),
        KickOutcome::OtherProject => Err(ApiError::forbidden(format!(
            "connection `{id}` belongs to another project"
        ))),
    }
}

/// Closes (4003) this node's connection `id` (a local id) if it is open and, with `project`,
/// belongs to that project.
pub(super) async fn kick_local(
    hub: &Hub,
    id: &str,
    project: Option<u32>,
) -> Result<KickOutcome, ApiError> {
    let Some(conn) = ConnId::parse(id).filter(|c| (c.shard as usize) < hub.nr_shards()) else {
        return Ok(KickOutcome::NotFound);
    };
    ask(hub, conn.shard as usize, |reply| ShardMsg::Kick {
        slot: conn.slot,
        generation: conn.generation,
        project,
        reply,
    })
    .await
}

/// Executes another node's request ([`cluster::serve_requests`]) on this node.
pub(super) async fn execute(hub: Arc<Hub>, op: cluster::Op) -> Result<Value, ApiError> {
    let project_idx = |id: &str| hub.registry.load().project(id).map(|p| p.idx);
    match op {
        cluster::Op::List(q) => {
            let me = hub.broker.control().map(|c| c.node().to_owned());
            let project = match &q.project {
                Some(id) => match project_idx(id) {
                    Some(idx) => Some(idx),
                    None => return Ok(serde_json::json!({ "connections": [] })),
                },
                None => None,
            };
            let after = q
                .cursor
                .filter(|(node, _)| Some(node) == me.as_ref())
                .and_then(|(_, id)| ConnId::parse(&id));
            let found = list_local(&hub, project, q.topic, q.user, q.limit, after).await?;
            let found: Vec<ConnJson> = found.into_iter().map(Into::into).collect();
            Ok(serde_json::json!({ "connections": found }))
        }
        cluster::Op::Kick { id, project } => {
            let project = match project {
                Some(p) => match project_idx(&p) {
                    Some(idx) => Some(idx),
                    None => return Ok(serde_json::json!(cluster::Kicked::OtherProject)),
                },
                None => None,
            };
            let outcome = match kick_local(&hub, &id, project).await? {
                KickOutcome::Closed => cluster::Kicked::Closed,
                KickOutcome::NotFound => cluster::Kicked::NotFound,
                KickOutcome::OtherProject => cluster::Kicked::OtherProject,
            };
            Ok(serde_json::json!(outcome))
        }
        cluster::Op::Disconnect { project, user } => {
            let n = match project_idx(&project) {
                Some(idx) => disconnect_local(&hub, idx, user.into()).await?,
                None => 0,
            };
            Ok(serde_json::json!({ "disconnected": n }))
        }
        cluster::Op::Stats => Ok(stats_json(&hub)),
    }
}

/// A `user` as the API names one: the token's `sub`, byte for byte, under the rule the
/// handshake applies to it (so a user no token can carry is a 400, not an empty answer).
fn checked_user(user: String) -> Result<String, ApiError> {
    match crate::pubsub::check_id(&user) {
        Ok(()) => Ok(user),
        Err(e) => Err(ApiError::bad_request(format!("`user` {e}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    #[serde(alias = "projectId")]
    project: String,
    user: String,
}

/// `POST /api/v1/disconnect {"project","user"}`: closes (4003) all of the user's connections
/// on every shard; answers how many.
pub(super) async fn disconnect(
    hub: &Hub,
    settings: &ApiSettings,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let b: DisconnectBody = read_json(settings, req, "disconnect body").await?;
    let user: Box<str> = checked_user(b.user)?.into();
    let project = authorize(hub, who, &b.project)?;
    if let Some(control) = hub.broker.control() {
        let project_id = project_id(hub, project).unwrap_or_default();
        let local = disconnect_local(hub, project, user.clone());
        return cluster::disconnect(control, project_id, &user, local).await;
    }
    let n = disconnect_local(hub, project, user).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "disconnected": n }),
    ))
}

/// Closes (4003) all of `user`'s connections of `project` on this node; how many.
pub(super) async fn disconnect_local(
    hub: &Hub,
    project: u32,
    user: Box<str>,
) -> Result<usize, ApiError> {
    // Every shard gets the order before any answer is awaited, so they close concurrently.
    let answers = hub
        .shards()
        .ask_all(|_, reply| ShardMsg::DisconnectUser {
            project,
            user: user.clone(),
            reply,
        })
        .await?;
    // A stopped shard has no connection left.
    Ok(answers.into_iter().filter_map(|(_, k)| k).sum())
}

/// `GET /api/v1/stats` (admin key): connections per shard and per project, message counters,
/// inbox depths. Read from the shards' counters without asking the shards.
pub(super) async fn stats(hub: &Hub, who: Caller) -> Result<Response<Full<Bytes>>, ApiError> {
    require_admin(who, "node statistics")?;
    let mut doc = stats_json(hub);
    if let Some(control) = hub.broker.control() {
        doc["cluster"] = cluster::stats(control, &doc).await;
    }
    Ok(json(StatusCode::OK, &doc))
}

/// The stats document (also used by tests through the API).
pub fn stats_json(hub: &Hub) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let r = metrics::read;
    let mut shards = Vec::new();
    let (mut published_client, mut delivered, mut dropped, mut slow) = (0, 0, 0, 0);
    let (mut bytes_in, mut bytes_out, mut connections) = (0, 0, 0i64);
    let mut handshakes = [0u64; HandshakeOutcome::ALL.len()];
    let mut closes = [0u64; CLOSE_CODES.len()];
    for (i, s) in hub.stats.iter().enumerate() {
        let conns = s
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(0);
        connections += conns;
        published_client += r(&s.published);
        delivered += r(&s.delivered);
        dropped += r(&s.dropped);
        slow += r(&s.slow_consumer_closes);
        bytes_in += r(&s.bytes_in);
        bytes_out += r(&s.bytes_out);
        for (t, c) in handshakes.iter_mut().zip(&s.handshakes) {
            *t += r(c);
        }
        for (t, c) in closes.iter_mut().zip(&s.closes) {
            *t += r(c);
        }
        shards.push(json!({
            "shard": i,
            "connections": conns,
            "inbox_depth": hub.mailboxes[i].depth(),
            "publications": r(&s.publications),
            "delivered": r(&s.delivered),
            "dropped": r(&s.dropped),
        }));
    }
    let mut projects = Map::new();
    for p in hub.registry.load().projects() {
        projects.insert(
            p.id.to_string(),
            json!({ "connections": p.nr_connections.load(std::sync::atomic::Ordering::Relaxed) }),
        );
    }
    let handshakes: Map<String, Value> = HandshakeOutcome::ALL
        .iter()
        .zip(handshakes)
        .map(|(k, v)| (k.label().to_owned(), v.into()))
        .collect();
    let closes: Map<String, Value> = CLOSE_CODES
        .iter()
        .zip(closes)
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    json!({
        "connections": connections,
        "shards": shards,
        "projects": projects,
        "messages": {
            "published": metrics::read(&hub.api_published) + published_client,
            "delivered": delivered,
            "dropped": dropped,
        },
        "slow_consumer_closes": slow,
        "handshakes": handshakes,
        "closes": closes,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    })
}
