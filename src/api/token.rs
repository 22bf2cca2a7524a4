//! `POST /api/v1/projects/{project}/console-token`: a short-lived client token the console
//! uses to tail one topic like any client would.
//!
//! What the token can do is bounded so that a project API key gains little from it: its
//! `sub` is [`CONSOLE_SUB`] (never a user's), its `topics` claim is the one topic asked for
//! (no `*` pattern, no `user.`/`device.` topic, which no client may subscribe to), and it
//! expires within [`CONSOLE_TOKEN_SECS`]: the connection is closed (4001) at `exp` like any
//! other. herald can only sign it for a project that has an HMAC key (a shared secret);
//! a project verified by public keys alone gets 409 `no_signing_key`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use tracing::info;

use super::error::ConsoleTokenError;
use super::{ApiError, ApiSettings, Caller, authorize, json, read_json};
use crate::auth::{Claims, now_secs};
use crate::hub::Hub;
use crate::pubsub::Topic;

/// The `sub` of every console token: the console is no user, and its implicit topic
/// (`user.herald-console`) is no user's either.
pub const CONSOLE_SUB: &str = "herald-console";

/// Longest lifetime of a console token, seconds: long enough to watch a topic for a while,
/// short enough that a token copied out of a browser is soon worthless. The console asks for
/// a new one when its connection closes with 4001. Shorter when the project's
/// `max_token_lifetime_secs` is.
pub const CONSOLE_TOKEN_SECS: u64 = 300;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    topic: String,
}

/// Mints the console's token for `topic` of `project`; answers it with its `exp`, `sub`,
/// `topic`, the WebSocket path and the client port.
pub(super) async fn console_token(
    hub: &Hub,
    settings: &ApiSettings,
    who: Caller,
    project: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    authorize(hub, who, project)?;
    let body: TokenBody = read_json(settings, req, "console token body").await?;
    let topic = Topic::parse(&body.topic).map_err(|e| ConsoleTokenError::Topic {
        topic: body.topic.clone(),
        why: e.to_string(),
    })?;
    if topic.as_str().contains('*') {
        return Err(ConsoleTokenError::Pattern(body.topic).into());
    }
    if topic.is_implicit_only() {
        return Err(ConsoleTokenError::Implicit(body.topic).into());
    }
    let registry = hub.registry.load();
    // Loaded again: the project may have gone since it was authorized.
    let p = registry
        .project(project)
        .ok_or_else(|| super::error::AuthError::UnknownProject(project.into()))?;
    if !p.enabled {
        return Err(ConsoleTokenError::Disabled(project.into()).into());
    }
    let lifetime = CONSOLE_TOKEN_SECS.min(p.max_token_lifetime_secs);
    let exp = now_secs() + lifetime;
    let claims = Claims {
        sub: CONSOLE_SUB.to_owned(),
        exp: Some(exp),
        topics: Some(vec![topic.as_str().to_owned()]),
        device: None,
    };
    let token = p
        .mint(&claims)
        .map_err(|_| ConsoleTokenError::NoSigningKey(project.into()))?;
    let key = match who {
        Caller::Admin => "admin",
        Caller::Project(_) => "project",
    };
    info!(
        project,
        topic = topic.as_str(),
        key,
        exp,
        "minted a console token"
    );
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "token": token,
            "sub": CONSOLE_SUB,
            "topic": topic.as_str(),
            "exp": exp,
            "path": format!("/ws/{project}"),
            "client_port": settings.client_port,
        }),
    ))
}
