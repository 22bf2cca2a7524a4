//! Connection management across the nodes of a cluster: listing, kick, disconnect-by-user
//! and statistics asked of every node over the engine's control plane
//! ([`crate::broker::control`]), and the requests other nodes send this one, executed here.
//!
//! With an engine a connection's id names its node: `<local id>@<node>`. Every answer names
//! the nodes asked (`"nodes": {"<node>": "ok" | "no_answer"}`) and says whether any did not
//! answer within `engine.command_timeout_ms` (`"partial": true`); a node that does not answer
//! never holds the request longer than that.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::warn;

use super::{ApiError, json};
use crate::broker::control::{Answer, ControlPlane, Request};
use crate::hub::Hub;
use crate::pubsub::ConnId;
use crate::shard::mailbox::{ConnInfo, KickOutcome};

/// A connection as the API lists it.
#[derive(Serialize, Deserialize)]
pub(super) struct ConnJson {
    pub(super) id: String,
    project: String,
    user: String,
    ip: String,
    connected_at: u64,
    topics: Vec<Box<str>>,
}

impl From<ConnInfo> for ConnJson {
    fn from(c: ConnInfo) -> Self {
        Self {
            id: c.id.to_string(),
            project: c.project.to_string(),
            user: c.user.into(),
            ip: c.peer.ip().to_string(),
            connected_at: c.connected_at,
            topics: c.topics,
        }
    }
}

/// What one node asks another.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Op {
    /// A page of the node's connections.
    List(ListOp),
    /// Close the node's connection `id` (a local id), of `project` if given.
    Kick { id: String, project: Option<String> },
    /// Close the user's connections on the node.
    Disconnect { project: String, user: String },
    /// The node's statistics.
    Stats,
}

/// A listing's filters and page, as sent to every node.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ListOp {
    /// Project id.
    pub project: Option<String>,
    pub topic: Option<Box<str>>,
    pub user: Option<Box<str>>,
    pub limit: usize,
    /// (node, local id) to list after; a node other than the cursor's lists from its first.
    pub cursor: Option<(String, String)>,
}

/// The outcome of a kick on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Kicked {
    Closed,
    NotFound,
    OtherProject,
}

/// Serves the requests of the other nodes on the API's runtime, each in a task of its own,
/// until the node stops. Call once, on that runtime.
pub(super) fn serve_requests<F, Fut>(hub: &Arc<Hub>, execute: F)
where
    F: Fn(Arc<Hub>, Op) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Value, ApiError>> + Send + 'static,
{
    let Some(control) = hub.broker.control() else {
        return;
    };
    let Some(mut requests) = control.take_requests() else {
        return;
    };
    let hub = hub.clone();
    tokio::spawn(async move {
        while let Some(Request { id, from, body }) = requests.recv().await {
            let hub = hub.clone();
            tokio::spawn(async move {
                let answer = match serde_json::from_value::<Op>(body) {
                    Ok(op) => execute(hub.clone(), op).await,
                    Err(e) => {
                        warn!(from, "control request not understood: {e}");
                        return;
                    }
                };
                let answer =
                    answer.unwrap_or_else(|e| json!({ "error": e.error, "message": e.message }));
                if let Some(control) = hub.broker.control() {
                    control.reply(&from, id, answer).await;
                }
            });
        }
    });
}

/// The cluster's members, or this node alone (and `partial`) when the engine cannot say.
async fn members(control: &ControlPlane) -> (Vec<String>, bool) {
    match control.members().await {
        Ok(m) => (m, false),
        Err(e) => {
            warn!("cluster membership unknown, answering for this node only: {e}");
            (vec![control.node().to_owned()], true)
        }
    }
}

/// The `nodes` and `partial` fields of an answer: every node asked and whether it answered
/// (this node always does).
fn report(me: &str, answers: &[(String, Answer)], unknown: bool) -> (Value, bool) {
    let mut nodes = Map::new();
    nodes.insert(me.to_owned(), "ok".into());
    let mut partial = unknown;
    for (n, a) in answers {
        let status = match a {
            Answer::Reply(v) if v.get("error").is_none() => "ok",
            _ => {
                partial = true;
                "no_answer"
            }
        };
        nodes.insert(n.clone(), status.into());
    }
    (Value::Object(nodes), partial)
}

/// The 503 of a request only one node can answer, and it did not.
fn unreachable(node: &str, control: &ControlPlane) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "node_unavailable",
        format!(
            "node `{node}` did not answer within {} ms; nothing is known to have changed, retry",
            control.timeout().as_millis()
        ),
    )
    .retry_after(1)
}

/// `GET /api/v1/connections` in a cluster: in (node, local id) order; the nodes after the
/// cursor's are asked at once, each for a page, and the pages are joined in node order.
pub(super) async fn list(
    control: &ControlPlane,
    mut q: ListOp,
    cursor: Option<String>,
    local: impl AsyncFnOnce(Option<ConnId>) -> Result<Vec<ConnJson>, ApiError>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if let Some(c) = &cursor {
        let bad = || ApiError::bad_request(format!("`cursor` `{c}` is not a cursor"));
        let (local, node) = c.split_once('@').ok_or_else(bad)?;
        ConnId::parse(local).ok_or_else(bad)?;
        q.cursor = Some((node.to_owned(), local.to_owned()));
    }
    let me = control.node().to_owned();
    let (mut nodes, unknown) = members(control).await;
    if let Some((first, _)) = &q.cursor {
        nodes.retain(|n| n >= first);
    }
    let limit = q.limit;
    let body = serde_json::to_value(Op::List(ListOp {
        project: q.project.clone(),
        topic: q.topic.clone(),
        user: q.user.clone(),
        limit,
        cursor: q.cursor.clone(),
    }))
    .expect("a request always serialises");
    let after = q
        .cursor
        .as_ref()
        .filter(|(node, _)| *node == me)
        .and_then(|(_, id)| ConnId::parse(id));
    let (local, answers) = tokio::join!(
        async {
            if nodes.contains(&me) {
                local(after).await
            } else {
                Ok(Vec::new())
            }
        },
        control.ask(&nodes, false, body)
    );
    let local = local?;
    let (report_nodes, partial) = report(&me, &answers, unknown);
    let mut pages: Vec<(String, Vec<ConnJson>)> = vec![(me.clone(), local)];
    for (n, a) in answers {
        if let Answer::Reply(mut v) = a {
            let page: Vec<ConnJson> =
                serde_json::from_value(v["connections"].take()).unwrap_or_default();
            pages.push((n, page));
        }
    }
    pages.sort_by(|a, b| a.0.cmp(&b.0));
    let mut found: Vec<ConnJson> = Vec::new();
    for (node, page) in pages {
        for mut c in page {
            c.id = format!("{}@{node}", c.id);
            found.push(c);
        }
    }
    let next_cursor = if found.len() > limit {
        found.truncate(limit);
        found.last().map(|c| c.id.clone())
    } else {
        None
    };
    Ok(json(
        StatusCode::OK,
        &json!({
            "connections": found,
            "next_cursor": next_cursor,
            "nodes": report_nodes,
            "partial": partial,
        }),
    ))
}

/// `DELETE /api/v1/connections/{id}` in a cluster: the id's node closes it. An id without a
/// node is this node's.
pub(super) async fn kick(
    control: &ControlPlane,
    id: &str,
    project: Option<String>,
    here: impl AsyncFnOnce(&str) -> Result<KickOutcome, ApiError>,
) -> Result<KickOutcome, ApiError> {
    let (local, node) = id.split_once('@').unwrap_or((id, control.node()));
    if node == control.node() {
        return here(local).await;
    }
    let (nodes, _) = members(control).await;
    if !nodes.iter().any(|n| n == node) {
        return Ok(KickOutcome::NotFound);
    }
    let body = serde_json::to_value(Op::Kick {
        id: local.to_owned(),
        project,
    })
    .expect("a request always serialises");
    let answers = control.ask(&[node.to_owned()], false, body).await;
    match answers.into_iter().next().map(|(_, a)| a) {
        Some(Answer::Reply(v)) => match serde_json::from_value::<Kicked>(v) {
            Ok(Kicked::Closed) => Ok(KickOutcome::Closed),
            Ok(Kicked::NotFound) => Ok(KickOutcome::NotFound),
            Ok(Kicked::OtherProject) => Ok(KickOutcome::OtherProject),
            Err(_) => Err(unreachable(node, control)),
        },
        _ => Err(unreachable(node, control)),
    }
}

/// `POST /api/v1/disconnect` in a cluster: every node closes the user's connections; the
/// answer sums them.
pub(super) async fn disconnect(
    control: &ControlPlane,
    project: String,
    user: &str,
    local: impl Future<Output = Result<usize, ApiError>>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (nodes, unknown) = members(control).await;
    let body = serde_json::to_value(Op::Disconnect {
        project,
        user: user.to_owned(),
    })
    .expect("a request always serialises");
    let (local, answers) = tokio::join!(local, control.ask(&nodes, true, body));
    let mut n = local?;
    for (_, a) in &answers {
        if let Answer::Reply(v) = a {
            n += v["disconnected"].as_u64().unwrap_or(0) as usize;
        }
    }
    let (nodes, partial) = report(control.node(), &answers, unknown);
    Ok(json(
        StatusCode::OK,
        &json!({ "disconnected": n, "nodes": nodes, "partial": partial }),
    ))
}

/// Every node's statistics ([`Op::Stats`]): the answers, and whether the members are unknown.
async fn node_stats(control: &ControlPlane) -> (Vec<(String, Answer)>, bool) {
    let (nodes, unknown) = members(control).await;
    let body = serde_json::to_value(Op::Stats).expect("a request always serialises");
    (control.ask(&nodes, true, body).await, unknown)
}

/// (node, statistics) of this node (`own`) and of every node that answered.
fn answered<'a>(
    me: &'a str,
    own: &'a Value,
    answers: &'a [(String, Answer)],
) -> impl Iterator<Item = (&'a str, &'a Value)> {
    std::iter::once((me, own)).chain(answers.iter().filter_map(|(n, a)| match a {
        Answer::Reply(v) => Some((n.as_str(), v)),
        Answer::NoAnswer => None,
    }))
}

/// The `cluster` part of `GET /api/v1/stats`: connections in all, per project and per node,
/// from every node's own statistics (`own` is this node's).
pub(super) async fn stats(control: &ControlPlane, own: &Value) -> Value {
    let (answers, unknown) = node_stats(control).await;
    let mut total = 0;
    let mut projects = Map::new();
    let mut per_node = Map::new();
    for (node, doc) in answered(control.node(), own, &answers) {
        let conns = doc["connections"].as_i64().unwrap_or(0);
        total += conns;
        per_node.insert(node.to_owned(), json!({ "connections": conns }));
        if let Some(ps) = doc["projects"].as_object() {
            for (p, v) in ps {
                let n = v["connections"].as_i64().unwrap_or(0);
                let entry = projects
                    .entry(p.clone())
                    .or_insert_with(|| json!({ "connections": 0 }));
                entry["connections"] = (entry["connections"].as_i64().unwrap_or(0) + n).into();
            }
        }
    }
    let (status, partial) = report(control.node(), &answers, unknown);
    json!({
        "connections": total,
        "projects": projects,
        "per_node": per_node,
        "nodes": status,
        "partial": partial,
    })
}

/// The `cluster` part of `GET /api/v1/projects/{project}`: the project's connections in all
/// and per node, from every node's statistics (`own` is this node's), with the nodes asked
/// as `GET /api/v1/stats` reports them.
pub(super) async fn project_connections(
    control: &ControlPlane,
    own: &Value,
    project: &str,
) -> Value {
    let (answers, unknown) = node_stats(control).await;
    let mut total = 0;
    let mut per_node = Map::new();
    for (node, doc) in answered(control.node(), own, &answers) {
        let n = doc["projects"][project]["connections"]
            .as_i64()
            .unwrap_or(0);
        total += n;
        per_node.insert(node.to_owned(), json!({ "connections": n }));
    }
    let (status, partial) = report(control.node(), &answers, unknown);
    json!({
        "connections": total,
        "per_node": per_node,
        "nodes": status,
        "partial": partial,
    })
}
