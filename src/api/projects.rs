//! Project and key management endpoints: `POST /api/v1/projects`,
//! `PUT|DELETE /api/v1/projects/{project}/keys/{kid}`, and reading them back:
//! `GET /api/v1/projects`, `GET /api/v1/projects/{project}` (settings and keys' kid, alg and
//! kind; never an API key or key material). The work is done by
//! [`crate::admin::Admin`]; this maps HTTP to it and its errors to statuses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use std::collections::HashMap;
use std::sync::Arc;

use tracing::warn;

use super::error::{AuthError, ManagementBusy};
use super::serve::{LogThrottle, SlotHandle};
use super::{ApiError, ApiSettings, Caller, Ctx, JsonBody, authorize, json, require_admin};
use crate::admin::{Admin, AdminError};
use crate::auth::keys::{KeySpec, MAX_KEY_BYTES, spec_from_jwk};
use crate::config::ProjectConfig;
use crate::hub::Hub;
use crate::shard::mailbox::ShardMsg;

/// Management changes one API key may have queued or running at once; beyond, 429 `busy`.
/// A change costs a registry build and an fsync, so a few in a row already keep the
/// management thread busy.
pub(super) const MAX_MANAGEMENT_PER_KEY: usize = 4;

/// Management changes queued or running at once, all keys together; beyond, 503 `busy`.
/// Each holds an API connection, so this stays far below `api.max_connections`.
pub(super) const MAX_MANAGEMENT_QUEUED: usize = 16;

/// Management changes: one at a time (a change reads and replaces the whole state), and a
/// bounded number waiting, per API key and in all, so that no key can fill the API's
/// connections with requests waiting their turn.
#[derive(Default)]
pub(super) struct Management {
    turn: tokio::sync::Mutex<()>,
    /// Changes queued or running, per caller.
    waiting: std::sync::Mutex<HashMap<Caller, usize>>,
    /// Throttles the "busy" lines.
    log: LogThrottle,
}

/// A place among the changes queued or running; given back on drop.
struct Ticket<'a> {
    management: &'a Management,
    who: Caller,
}

impl Management {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<Caller, usize>> {
        // Plain counts updated in single statements: a panic cannot leave them half-changed.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for `who`'s change, or 429 `busy` when `who` has
    /// [`MAX_MANAGEMENT_PER_KEY`] queued or running, 503 `busy` when all keys together have
    /// [`MAX_MANAGEMENT_QUEUED`].
    fn ticket(&self, who: Caller) -> Result<Ticket<'_>, ApiError> {
        let mut waiting = self.waiting();
        let total: usize = waiting.values().sum();
        let mine = waiting.get(&who).copied().unwrap_or(0);
        let refusal = if mine >= MAX_MANAGEMENT_PER_KEY {
            Some(ManagementBusy::PerKey(MAX_MANAGEMENT_PER_KEY))
        } else if total >= MAX_MANAGEMENT_QUEUED {
            Some(ManagementBusy::Total(MAX_MANAGEMENT_QUEUED))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(waiting);
            let e = ApiError::from(refusal);
            if let Some(suppressed) = self.log.allow() {
                warn!(
                    caller = ?who,
                    status = e.status.as_u16(),
                    suppressed,
                    "management change refused: {} (logged at most once a second)",
                    e.message
                );
            }
            return Err(e);
        }
        *waiting.entry(who).or_default() += 1;
        Ok(Ticket {
            management: self,
            who,
        })
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut waiting = self.management.waiting();
        if let Some(n) = waiting.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.who);
            }
        }
    }
}

/// Runs `who`'s management change on a blocking thread, one change at a time: key parsing,
/// probe signatures and the state file's fsync never run on the API runtime, so publishes
/// and health checks go on meanwhile. Waiting for the turn is asynchronous, bounded
/// ([`Management::ticket`]), and leaves the connection evictable (`slot`).
async fn off_runtime<T: Send + 'static>(
    ctx: &Ctx,
    who: Caller,
    slot: Option<&SlotHandle>,
    change: impl FnOnce(&Admin) -> Result<T, AdminError> + Send + 'static,
) -> Result<T, ApiError> {
    let _ticket = ctx.management.ticket(who)?;
    let _turn = {
        let _queued = slot.map(SlotHandle::queued);
        ctx.management.turn.lock().await
    };
    let admin = Arc::clone(&ctx.admin);
    match tokio::task::spawn_blocking(move || change(&admin)).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(ApiError::internal(format!(
            "the management change failed: {e}"
        ))),
    }
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// A project as `GET` shows it: settings and its keys, no secret.
fn project_json(p: &crate::auth::Project) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = p
        .keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "kid": k.kid.as_deref(),
                "alg": format!("{:?}", k.alg),
                "kind": k.kind(),
                "source": k.source.as_str(),
            })
        })
        .collect();
    serde_json::json!({
        "id": &*p.id,
        "source": if p.from_api { "api" } else { "config" },
        "enabled": p.enabled,
        "connections": p.nr_connections.load(std::sync::atomic::Ordering::Relaxed),
        "max_connections": p.max_connections,
        "require_exp": p.require_exp,
        "leeway_secs": p.leeway_secs,
        "max_token_lifetime_secs": p.max_token_lifetime_secs,
        "issuer": p.issuer,
        "audience": p.audience,
        "allow_client_publish": p.allow_client_publish,
        "allowed_origins": p.allowed_origins,
        "keys": keys,
        "revoked_kids": p.revoked,
    })
}

/// `GET /api/v1/projects`: every project the caller acts on (all for the admin key, its own
/// for a project key), in id order.
pub(super) fn list(hub: &Hub, who: Caller) -> Response<Full<Bytes>> {
    let registry = hub.registry.load();
    let mut projects: Vec<&std::sync::Arc<crate::auth::Project>> = registry
        .projects()
        .filter(|p| who.may_act_on(p.idx))
        .collect();
    projects.sort_by(|a, b| a.id.cmp(&b.id));
    let projects: Vec<serde_json::Value> = projects.into_iter().map(|p| project_json(p)).collect();
    json(StatusCode::OK, &serde_json::json!({ "projects": projects }))
}

/// `GET /api/v1/projects/{project}`: 403 for another project's key, 404 for an unknown
/// project (admin key). With an engine, `cluster` adds the project's connections on every
/// node.
pub(super) async fn show(
    hub: &Hub,
    who: Caller,
    project: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    authorize(hub, who, project)?;
    let mut doc = {
        let registry = hub.registry.load();
        // Loaded again: the project may have gone since.
        let p = registry
            .project(project)
            .ok_or_else(|| AuthError::UnknownProject(project.into()))?;
        project_json(p)
    };
    if let Some(control) = hub.broker.control() {
        let own = super::connections::stats_json(hub);
        doc["cluster"] = super::cluster::project_connections(control, &own, project).await;
    }
    Ok(json(StatusCode::OK, &doc))
}

pub(super) async fn create(
    ctx: &Ctx,
    who: Caller,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    require_admin(who, "creating a project")?;
    let settings = &ctx.settings;
    let slot = req.extensions().get::<SlotHandle>().cloned();
    let body = JsonBody::read(req, settings.max_body_bytes, settings.body_read_timeout).await?;
    // Redacted: serde quotes the offending value, which may be a secret in the wrong field.
    let p: ProjectConfig = body.parse("project", true)?;
    let id = p.id.clone();
    off_runtime(ctx, who, slot.as_ref(), move |admin| {
        admin.create_project(p)
    })
    .await?;
    Ok(json(StatusCode::CREATED, &serde_json::json!({ "id": id })))
}

pub(super) async fn put_key(
    ctx: &Ctx,
    who: Caller,
    project: &str,
    kid: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let settings: &ApiSettings = &ctx.settings;
    authorize(&ctx.hub, who, project)?;
    let slot = req.extensions().get::<SlotHandle>().cloned();
    let value: serde_json::Value = JsonBody::read(req, MAX_KEY_BYTES, settings.body_read_timeout)
        .await?
        .parse("key body", false)?;
    let is_jwk = value.get("kty").is_some();
    let spec = if is_jwk {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(value)
            .map_err(|e| ApiError::bad_request(format!("invalid JWK: {e}")))?;
        if jwk.common.key_id.as_deref().is_some_and(|k| k != kid) {
            return Err(ApiError::bad_request(
                "the JWK's kid differs from the kid in the path",
            ));
        }
        spec_from_jwk(jwk).map_err(|e| ApiError::bad_request(e.to_string()))?
    } else {
        // `{"alg", "pem"}`, `{"alg", "secret"}` or `{"alg", "jwk": {...}}`.
        serde_json::from_value::<KeySpec>(value).map_err(|e| {
            ApiError::bad_request(format!(
                "a key is {{\"alg\",\"pem\"}}, {{\"alg\",\"secret\"}}, {{\"alg\",\"jwk\"}} or a JWK: {e}"
            ))
        })?
    };
    let (project, kid) = (project.to_owned(), kid.to_owned());
    off_runtime(ctx, who, slot.as_ref(), move |admin| {
        admin.put_key(&project, &kid, spec)
    })
    .await?;
    Ok(no_content())
}

pub(super) async fn delete_key(
    ctx: &Ctx,
    who: Caller,
    project: &str,
    kid: &str,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let hub = &ctx.hub;
    authorize(hub, who, project)?;
    let disconnect = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .any(|(k, v)| k == "disconnect" && matches!(&*v, "true" | "1"))
        })
        .unwrap_or(false);
    let (p, k) = (project.to_owned(), kid.to_owned());
    let slot = req.extensions().get::<SlotHandle>();
    let idx = off_runtime(ctx, who, slot, move |admin| {
        match admin.delete_key(&p, &k) {
            // A retried revoke (its disconnect orders did not all go out): send them again.
            Err(AdminError::UnknownKey { .. }) if disconnect => {
                admin.revoked_key(&p, &k).ok_or(AdminError::UnknownKey {
                    project: p.clone(),
                    kid: k.clone(),
                })
            }
            other => other,
        }
    })
    .await?;
    if disconnect {
        order_revoke(hub, idx, kid.into()).await?;
    }
    Ok(no_content())
}

/// Tells every shard to close the connections a revoked key verified (4003), through
/// [`Hub::shards`]: a non-blocking send per shard, retried asynchronously while its inbox is
/// full, up to [`crate::shard::fanout::ORDER_WITHIN`] for all shards together.
///
/// # Errors
/// 503 `busy` naming the shards whose inbox stayed full (the key is revoked for new
/// handshakes all the same).
async fn order_revoke(hub: &Hub, project: u32, kid: Arc<str>) -> Result<(), ApiError> {
    hub.shards()
        .send_all(|_| ShardMsg::RevokeKey {
            project,
            kid: kid.clone(),
        })
        .await
        .map_err(|e| {
            let mut e = ApiError::from(e);
            e.message = format!(
                "key revoked, but {}; retry the DELETE with disconnect=true",
                e.message
            );
            e
        })
}
