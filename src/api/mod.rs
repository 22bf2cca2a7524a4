//! The HTTP API port, on hyper, on a dedicated control-plane thread with its own (tokio)
//! runtime. It never touches a connection: it sends commands to shards through the hub's
//! mailboxes and reads the shards' counters.

mod cluster;
mod connections;
mod console;
mod error;
mod idempotency;
mod idempotency_shared;
mod projects;
mod publish;

mod serve;
mod token;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

pub use crate::protection::ratelimit::{KeyId, KeyLimiter};
pub use error::ApiError;

use error::{AuthError, BodyError, RateLimited};

use crate::admin::Admin;
use crate::hub::{Hub, Phase};
pub use crate::settings::ApiSettings;

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).expect("API bodies always serialise");
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    // Answers are per caller (and one holds a client token): never kept by a cache.
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The admin key: every project.
    Admin,
    /// A project's API key: that project only (registry index).
    Project(u32),
}

impl Caller {
    /// Whether the caller may act on project `idx`.
    pub fn may_act_on(self, idx: u32) -> bool {
        match self {
            Self::Admin => true,
            Self::Project(p) => p == idx,
        }
    }
}

/// Identifies the bearer key, comparing in constant time against every configured key:
/// who it is, and whose request-rate bucket it takes from.
fn caller(hub: &Hub, req: &Request<Incoming>) -> Result<(Caller, KeyId), AuthError> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Missing)?;
    let key = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(AuthError::NotBearer)?
        .trim()
        .as_bytes();
    let registry = hub.registry.load();
    let mut found = None;
    if let Some(admin) = &registry.admin_key
        && bool::from(admin.as_bytes().ct_eq(key))
    {
        found = Some((Caller::Admin, KeyId::Admin));
    }
    for p in registry.projects() {
        if let Some(k) = &p.api_key
            && bool::from(k.as_bytes().ct_eq(key))
        {
            found = found.or_else(|| Some((Caller::Project(p.idx), KeyId::Project(p.id.clone()))));
        }
    }
    found.ok_or(AuthError::UnknownKey)
}

/// Authenticates the request (401 as [`caller`]), then takes a token from its key's bucket
/// (429 `rate_limited` when empty). Every `/api/v1` endpoint starts here; an unauthenticated
/// request takes no key's token.
fn admit(ctx: &Ctx, req: &Request<Incoming>) -> Result<Caller, ApiError> {
    let (who, key) = caller(&ctx.hub, req)?;
    match ctx.limiter.take(&key, Instant::now()) {
        Ok(()) => Ok(who),
        Err(refusal) => {
            ctx.hub
                .api_rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(suppressed) = refusal.log {
                warn!(
                    key = %key,
                    rate = ctx.limiter.rate(),
                    burst = ctx.limiter.burst(),
                    retry_after_secs = refusal.retry_after_secs,
                    suppressed,
                    "API key over its request rate, answering 429 (logged at most once a second \
                     per key; `suppressed` refusals since the previous line)"
                );
            }
            Err(RateLimited {
                rate: ctx.limiter.rate(),
                burst: ctx.limiter.burst(),
                retry_after_secs: refusal.retry_after_secs,
            }
            .into())
        }
    }
}

/// Refuses anything but the admin key (403 for a project key), for `what` in the message.
fn require_admin(who: Caller, what: &'static str) -> Result<(), AuthError> {
    match who {
        Caller::Admin => Ok(()),
        Caller::Project(_) => Err(AuthError::AdminOnly(what)),
    }
}

/// The one rule for "may this key act on this project": the admin key acts on every
/// project, a project's API key on its own only. Answers the project's registry index.
///
/// # Errors
/// [`AuthError::OtherProject`] (403) for a project key naming any project but its own,
/// known or not, so that a project key never learns which other projects exist;
/// [`AuthError::UnknownProject`] (404) for the admin key naming a project that does not
/// exist.
fn authorize(hub: &Hub, who: Caller, project: &str) -> Result<u32, AuthError> {
    let idx = hub.registry.load().project(project).map(|p| p.idx);
    match (idx, who) {
        (Some(idx), who) if who.may_act_on(idx) => Ok(idx),
        (_, Caller::Project(_)) => Err(AuthError::OtherProject(project.to_owned())),
        (_, Caller::Admin) => Err(AuthError::UnknownProject(project.to_owned())),
    }
}

/// A request body read whole: at most `max` bytes, within the body deadline.
struct JsonBody(Bytes);

impl JsonBody {
    /// Reads the body of `req`, up to `max` bytes. A declared `Content-Length` over `max` is
    /// refused before a byte of the body is read; a body not complete within
    /// `api.body_read_timeout_ms` (`deadline`) is refused.
    ///
    /// # Errors
    /// [`BodyError::TooLarge`] (413), [`BodyError::Timeout`] (408), [`BodyError::Read`] (400).
    async fn read(
        req: Request<Incoming>,
        max: usize,
        deadline: Duration,
    ) -> Result<Self, BodyError> {
        // hyper has parsed Content-Length into the body's exact size.
        if hyper::body::Body::size_hint(req.body())
            .upper()
            .is_some_and(|n| n > max as u64)
        {
            return Err(BodyError::TooLarge { max });
        }
        let _evictable = req
            .extensions()
            .get::<serve::SlotHandle>()
            .map(serve::SlotHandle::awaiting_body);
        match tokio::time::timeout(deadline, Limited::new(req.into_body(), max).collect()).await {
            Err(_) => Err(BodyError::Timeout { within: deadline }),
            Ok(Ok(b)) => Ok(Self(b.to_bytes())),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(BodyError::TooLarge { max })
            }
            Ok(Err(e)) => Err(BodyError::Read(e.to_string())),
        }
    }

    /// The body's bytes, as they came.
    fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Parses the body as JSON of type `T`, which may borrow from it; `what` names the
    /// document in the error.
    ///
    /// # Errors
    /// [`BodyError::Json`] (400) with the parser's message; for a document that may hold
    /// secrets (`redact`), without the offending value.
    fn parse<'a, T: serde::Deserialize<'a>>(
        &'a self,
        what: &'static str,
        redact: bool,
    ) -> Result<T, BodyError> {
        serde_json::from_slice(&self.0).map_err(|e| {
            let detail = if redact {
                // serde quotes the offending value, which may be a secret in the wrong field.
                crate::redact::redact_values(&e.to_string())
            } else {
                e.to_string()
            };
            BodyError::Json { what, detail }
        })
    }
}

/// Reads a JSON body of type `T` ([`JsonBody::read`] with the API's body limit, then
/// [`JsonBody::parse`]).
///
/// # Errors
/// Every [`BodyError`].
async fn read_json<T: serde::de::DeserializeOwned>(
    settings: &ApiSettings,
    req: Request<Incoming>,
    what: &'static str,
) -> Result<T, BodyError> {
    JsonBody::read(req, settings.max_body_bytes, settings.body_read_timeout)
        .await?
        .parse(what, false)
}

/// What every handler gets.
#[derive(Clone)]
struct Ctx {
    hub: Arc<Hub>,
    admin: Arc<Admin>,
    settings: Arc<ApiSettings>,
    /// Request-rate buckets per API key, shared by every API connection.
    limiter: Arc<KeyLimiter>,
    /// Answers of accepted publishes by `Idempotency-Key` (an async lock: it is held while a
    /// keyed publish waits for the engine's acknowledgement).
    idempotency: Arc<tokio::sync::Mutex<idempotency::IdempotencyCache>>,
    /// One management change (project or key) at a time, each on a blocking thread; a
    /// bounded number waiting.
    management: Arc<projects::Management>,
}

async fn route(ctx: Ctx, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    Ok(match dispatch(&ctx, &method, &path, req).await {
        Ok(r) => r,
        Err(e) => {
            debug!(%method, %path, status = e.status.as_u16(), error = e.error, message = ?e.message, "API error");
            e.response()
        }
    })
}

/// Routes a request: health, readiness, metrics and the console's files answer anyone;
/// every `/api/v1` endpoint is [`admit`]ted first (401, then 429).
async fn dispatch(
    ctx: &Ctx,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_allowed = || Err(ApiError::method_not_allowed(method, path));
    let (hub, settings) = (&ctx.hub, &ctx.settings);
    match (segments.as_slice(), method) {
        (["healthz"], &Method::GET) => {
            Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
        }
        (["readyz"], &Method::GET) => Ok(readyz(hub)),
        (["metrics"], &Method::GET) => metrics(hub, &req),
        (["console"], &Method::GET) => console::serve(settings, "", &req),
        (["console", file], &Method::GET) => console::serve(settings, file, &req),
        (["api", "v1", "publish"], &Method::POST) => {
            publish::single(hub, settings, &ctx.idempotency, admit(ctx, &req)?, req).await
        }
        (["api", "v1", "publish", "batch"], &Method::POST) => {
            publish::batch(hub, settings, &ctx.idempotency, admit(ctx, &req)?, req).await
        }
        (["api", "v1", "connections"], &Method::GET) => {
            connections::list(hub, admit(ctx, &req)?, req).await
        }
        (["api", "v1", "connections", id], &Method::DELETE) => {
            connections::kick(hub, admit(ctx, &req)?, id).await
        }
        (["api", "v1", "disconnect"], &Method::POST) => {
            connections::disconnect(hub, settings, admit(ctx, &req)?, req).await
        }
        (["api", "v1", "stats"], &Method::GET) => connections::stats(hub, admit(ctx, &req)?).await,
        (["api", "v1", "projects"], &Method::GET) => Ok(projects::list(hub, admit(ctx, &req)?)),
        (["api", "v1", "projects", project], &Method::GET) => {
            projects::show(hub, admit(ctx, &req)?, project).await
        }
        (["api", "v1", "projects"], &Method::POST) => {
            projects::create(ctx, admit(ctx, &req)?, req).await
        }
        (["api", "v1", "projects", project, "console-token"], &Method::POST) => {
            token::console_token(hub, settings, admit(ctx, &req)?, project, req).await
        }
        (["api", "v1", "projects", project, "keys", kid], &Method::PUT) => {
            projects::put_key(ctx, admit(ctx, &req)?, project, kid, req).await
        }
        (["api", "v1", "projects", project, "keys", kid], &Method::DELETE) => {
            projects::delete_key(ctx, admit(ctx, &req)?, project, kid, &req).await
        }
        (["healthz" | "readyz" | "metrics" | "console"], _)
        | (["console", _], _)
        | (["api", "v1", "projects", _, "console-token"], _)
        | (
            [
                "api",
                "v1",
                "publish" | "projects" | "connections" | "disconnect" | "stats",
            ],
            _,
        )
        | (["api", "v1", "connections" | "projects", _], _)
        | (["api", "v1", "publish", "batch"], _)
        | (["api", "v1", "projects", _, "keys", _], _) => not_allowed(),
        _ => Err(ApiError::not_found(format!("no route {path}"))),
    }
}

/// `GET /metrics`: the Prometheus exposition, built from the counters now. Unauthenticated,
/// like `/healthz`, so a scraper needs no key.
/// The format follows `Accept` ([`crate::exposition::Format::negotiate`]).
fn metrics(hub: &Arc<Hub>, req: &Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = crate::exposition::Format::negotiate(accept);
    let text = crate::exposition::encode_as(hub, format)
        .map_err(|_| ApiError::internal("metrics encoding failed"))?;
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(format.content_type()),
    );
    r.headers_mut().insert(
        hyper::header::VARY,
        hyper::header::HeaderValue::from_static("accept"),
    );
    Ok(r)
}

fn readyz(hub: &Hub) -> Response<Full<Bytes>> {
    if hub.failed_shard().is_some() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "status": "failed" }),
        );
    }
    let phase = hub.phase();
    let engine_down = hub
        .broker
        .engine()
        .is_some_and(|e| !e.up.load(std::sync::atomic::Ordering::Acquire));
    let (status, text) = match phase {
        // Serving, but not reaching the cluster's engine: publishes are refused and the node
        // hears nothing from the other nodes.
        Phase::Running if engine_down => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
        Phase::Running => (StatusCode::OK, "ready"),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Phase::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped"),
    };
    json(status, &serde_json::json!({ "status": text }))
}

/// The running API thread.
pub struct ApiHandle {
    /// Bound address.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiHandle {
    /// Stops accepting and joins the thread.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds the API port and serves it on its own thread.
///
/// # Errors
/// Bind failure.
pub fn start(
    hub: Arc<Hub>,
    admin: Arc<Admin>,
    addr: SocketAddr,
    settings: ApiSettings,
) -> std::io::Result<ApiHandle> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limiter = Arc::new(KeyLimiter::new(
        settings.requests_per_key_per_sec,
        settings.burst_per_key,
    ));
    let settings = Arc::new(settings);
    let idempotency = Arc::default();
    let conns = serve::Conns::new(settings.max_connections, hub.clone());
    let parse_log = Arc::new(serve::LogThrottle::default());
    let management = Arc::new(projects::Management::default());
    let timeout_log = Arc::new(serve::LogThrottle::default());
    let thread = std::thread::Builder::new()
        .name("herald-api".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!("API runtime failed to start: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("API listener: {e}");
                        return;
                    }
                };
                let accept_log = serve::LogThrottle::default();
                // The shards this thread sends to are woken once the ready requests are
                // answered, one wake-up per shard for all of them.
                let flush = Arc::new(tokio::sync::Notify::new());
                let _deferred = crate::shard::mailbox::defer_wakes({
                    let flush = flush.clone();
                    move || flush.notify_one()
                });
                tokio::spawn(async move {
                    loop {
                        flush.notified().await;
                        crate::shard::mailbox::flush_deferred_wakes();
                    }
                });
                cluster::serve_requests(&hub, connections::execute);
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        accepted = listener.accept() => {
                            let stream = match accepted {
                                Ok((stream, _)) => stream,
                                Err(e) => {
                                    if let Some(suppressed) = accept_log.allow() {
                                        warn!(
                                            error = %e,
                                            open = conns.len(),
                                            suppressed,
                                            "API accept failed (logged at most once a second)"
                                        );
                                    }
                                    // Out of descriptors: let connections close before retrying.
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            };
                            let serve::Admission::Admitted(slot) = conns.admit() else {
                                drop(stream);
                                continue;
                            };
                            let slot = Arc::new(slot);
                            let ctx = Ctx {
                                hub: hub.clone(),
                                admin: admin.clone(),
                                settings: settings.clone(),
                                limiter: limiter.clone(),
                                idempotency: Arc::clone(&idempotency),
                                management: management.clone(),
                            };
                            let io = serve::ApiIo::new(
                                stream,
                                settings.idle_timeout,
                                parse_log.clone(),
                                slot.clone(),
                            );
                            let header_read_timeout = settings.header_read_timeout;
                            let timeout_log = timeout_log.clone();
                            tokio::spawn(async move {
                                let evict = slot.evict.clone();
                                let service = service_fn(move |mut req: Request<Incoming>| {
                                    slot.request_started();
                                    req.extensions_mut().insert(serve::SlotHandle(slot.clone()));
                                    let ctx = ctx.clone();
                                    let slot = slot.clone();
                                    async move {
                                        // Inside the request until the answer is written out.
                                        let r = route(ctx, req).await?;
                                        Ok::<_, Infallible>(
                                            r.map(|b| serve::AnswerBody::new(b, slot)),
                                        )
                                    }
                                });
                                let conn = http1::Builder::new()
                                    .timer(TokioTimer::new())
                                    .header_read_timeout(header_read_timeout)
                                    .serve_connection(TokioIo::new(io), service);
                                tokio::select! {
                                    r = conn => {
                                        if let Err(e) = r {
                                            serve::log_connection_error(&e, &timeout_log);
                                        }
                                    }
                                    () = evict.notified() => {
                                        debug!("API connection closed to admit a newer one");
                                    }
                                }
                            });
                            // Let the new connection read its request before more are
                            // accepted: under a flood of connects, a fresh one (an operator's
                            // health check) would otherwise be the longest waiting before it
                            // was read, and be evicted unanswered.
                            tokio::task::yield_now().await;
                        }
                    }
                }
            });
        })?;
    Ok(ApiHandle {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
