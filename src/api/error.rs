//! The API's one error map: every error an endpoint meets becomes an [`ApiError`] here, by
//! `From` (so handlers use `?`), and an [`ApiError`] becomes the response: a status, the
//! `{"error","message"}` body of protocol.md, and `Retry-After` (429, 503) or
//! `WWW-Authenticate` (401). No other file decides a status for these errors.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::idempotency;
use crate::admin::AdminError;
use crate::broker::PublishError;
use crate::shard::fanout::FanoutError;

/// An API error: a status and the `{"error","message"}` body of protocol.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `error` code.
    pub error: &'static str,
    /// Human text.
    pub message: String,
    /// `Retry-After` seconds of a 429 or 503 (`None` = 1).
    pub retry_after_secs: Option<u32>,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// 400 `bad_request`: the request is malformed; `message` says how.
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 `not_found`: no such route, connection or key.
    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 403 `forbidden`: the caller's key may not do this.
    pub(super) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 405 `method_not_allowed`: `path` exists, but not with `method`.
    pub(super) fn method_not_allowed(method: &hyper::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// 500 `internal`: the node failed at something that should not fail.
    pub(super) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 503 `draining`: `shard` has stopped (its drain ended) and answers no more.
    pub(super) fn shard_stopped(shard: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            format!("shard {shard} has stopped"),
        )
    }

    /// This error with `Retry-After: secs`.
    pub(super) fn retry_after(self, secs: u32) -> Self {
        Self {
            retry_after_secs: Some(secs),
            ..self
        }
    }

    /// The response: status, JSON body and the headers the status calls for.
    pub(super) fn response(&self) -> Response<Full<Bytes>> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        let body = Body {
            error: self.error,
            message: &self.message,
        };
        let bytes = serde_json::to_vec(&body).expect("a struct of two strings serialises");
        let mut r = Response::new(Full::new(Bytes::from(bytes)));
        *r.status_mut() = self.status;
        let headers = r.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                headers.insert(
                    RETRY_AFTER,
                    HeaderValue::from(self.retry_after_secs.unwrap_or(1)),
                );
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        r
    }
}

/// Why a caller may not make a request: who it is, and what it may act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header (401).
    #[error("missing Authorization: Bearer <key>")]
    Missing,
    /// An `Authorization` header that is not `Bearer <key>` (401).
    #[error("Authorization must be Bearer <key>")]
    NotBearer,
    /// A bearer key that is no configured key (401).
    #[error("unknown API key")]
    UnknownKey,
    /// A project key asked for what only the admin key may do (403); names what.
    #[error("{0} needs the admin key")]
    AdminOnly(&'static str),
    /// A project key named a project other than its own, known or not (403).
    #[error("this API key does not act on project `{0}`")]
    OtherProject(String),
    /// The admin key named a project that does not exist (404 `unknown_project`).
    #[error("no project `{0}`")]
    UnknownProject(String),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match e {
            AuthError::Missing | AuthError::NotBearer | AuthError::UnknownKey => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            AuthError::AdminOnly(_) | AuthError::OtherProject(_) => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            AuthError::UnknownProject(_) => (StatusCode::NOT_FOUND, "unknown_project"),
        };
        Self::new(status, code, e.to_string())
    }
}

/// A key over its request rate (`limits.api_requests_per_key_per_sec`, burst
/// `limits.api_burst_per_key`): 429 `rate_limited`, retry in `retry_after_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this API key is over its {rate} requests per second (burst {burst}); retry in \
     {retry_after_secs} s"
)]
pub struct RateLimited {
    /// Requests per second.
    pub rate: u32,
    /// Requests at once.
    pub burst: u32,
    /// Whole seconds until a token is back.
    pub retry_after_secs: u32,
}

impl From<RateLimited> for ApiError {
    fn from(e: RateLimited) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string())
            .retry_after(e.retry_after_secs)
    }
}

/// Why a request body could not be read or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Declared or read over the limit (413 `payload_too_large`).
    #[error("body over {max} bytes")]
    TooLarge {
        /// The limit in bytes.
        max: usize,
    },
    /// Not complete within `api.body_read_timeout_ms` (408 `request_timeout`).
    #[error(
        "the body did not arrive within {} ms (api.body_read_timeout_ms)",
        within.as_millis()
    )]
    Timeout {
        /// The deadline that passed.
        within: Duration,
    },
    /// The connection failed while the body was read (400).
    #[error("cannot read body: {0}")]
    Read(String),
    /// Not JSON of the expected shape (400); `what` names the document, `detail` is the
    /// parser's message.
    #[error("invalid {what}: {detail}")]
    Json {
        /// The document: `publish body`, `project`, ...
        what: &'static str,
        /// What is wrong, where.
        detail: String,
    },
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        let (status, code) = match e {
            BodyError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            BodyError::Timeout { .. } => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            BodyError::Read(_) | BodyError::Json { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
        };
        Self::new(status, code, e.to_string())
    }
}

/// Why an `Idempotency-Key` request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyError {
    /// The header is given more than once (400).
    #[error("more than one Idempotency-Key header")]
    Repeated,
    /// The header's value is not a key (400); says why.
    #[error("{0}")]
    BadKey(String),
    /// The key was accepted with another body within the window (422
    /// `idempotency_key_reused`).
    #[error(
        "Idempotency-Key `{0}` was used with a different body within the last {ttl} s",
        ttl = idempotency::TTL.as_secs()
    )]
    Reused(String),
    /// No room for a new key (503 `busy`, nothing was sent); retry in `retry_after_secs`.
    #[error(
        "the node remembers all the Idempotency-Keys it may ({} MiB of the last {} s); \
         nothing was sent, retry in {retry_after_secs} s",
        idempotency::MAX_BYTES >> 20,
        idempotency::TTL.as_secs()
    )]
    Full {
        /// Whole seconds until the oldest key expires.
        retry_after_secs: u32,
    },
}

impl From<IdempotencyError> for ApiError {
    fn from(e: IdempotencyError) -> Self {
        let message = e.to_string();
        match e {
            IdempotencyError::Repeated | IdempotencyError::BadKey(_) => Self::bad_request(message),
            IdempotencyError::Reused(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                message,
            ),
            IdempotencyError::Full { retry_after_secs } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
                    .retry_after(retry_after_secs)
            }
        }
    }
}

/// Management changes refused for want of room (`busy`): too many of one key's (429), or of
/// all keys together (503), queued or in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ManagementBusy {
    /// This key has `.0` changes queued or in progress.
    #[error(
        "this API key has {0} project or key changes queued or in progress; retry when one is \
         done"
    )]
    PerKey(usize),
    /// `.0` changes are queued or in progress, all keys together.
    #[error("{0} project or key changes are queued or in progress; retry when one is done")]
    Total(usize),
}

impl From<ManagementBusy> for ApiError {
    fn from(e: ManagementBusy) -> Self {
        let status = match e {
            ManagementBusy::PerKey(_) => StatusCode::TOO_MANY_REQUESTS,
            ManagementBusy::Total(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, "busy", e.to_string())
    }
}

/// Why no console token was minted ([`super::token`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleTokenError {
    /// Not a topic name (400 `bad_request`).
    #[error("topic `{topic}`: {why}")]
    Topic {
        /// The name asked for.
        topic: String,
        /// The rule it breaks.
        why: String,
    },
    /// A name with `*`, which a `topics` claim reads as a pattern (400 `bad_request`).
    #[error("topic `{0}`: a console token names one topic, without `*`")]
    Pattern(String),
    /// A `user.` or `device.` topic, which no client may subscribe to (400 `bad_request`).
    #[error("topic `{0}`: user. and device. topics cannot be subscribed to, so not tailed")]
    Implicit(String),
    /// The project refuses handshakes (409 `project_disabled`).
    #[error("project `{0}` is disabled: its handshakes are refused")]
    Disabled(String),
    /// The project has no HMAC key, only public keys (409 `no_signing_key`).
    #[error(
        "project `{0}` has no HMAC key, so herald holds no secret to sign a token with (its \
         keys, if any, are public: RSA, EC, Ed25519 or JWKS); add an HMAC key to tail it \
         from the console"
    )]
    NoSigningKey(String),
}

impl From<ConsoleTokenError> for ApiError {
    fn from(e: ConsoleTokenError) -> Self {
        let (status, code) = match e {
            ConsoleTokenError::Topic { .. }
            | ConsoleTokenError::Pattern(_)
            | ConsoleTokenError::Implicit(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ConsoleTokenError::Disabled(_) => (StatusCode::CONFLICT, "project_disabled"),
            ConsoleTokenError::NoSigningKey(_) => (StatusCode::CONFLICT, "no_signing_key"),
        };
        Self::new(status, code, e.to_string())
    }
}

/// A refused management change: nothing changed.
impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let (status, code) = match e {
            AdminError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AdminError::UnknownProject(_) => (StatusCode::NOT_FOUND, "unknown_project"),
            AdminError::UnknownKey { .. } => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            AdminError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        Self::new(status, code, e.to_string())
    }
}

/// A refused publish: nothing was sent.
impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        let (status, code) = match e {
            PublishError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            PublishError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            PublishError::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
            PublishError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "message_too_large"),
            PublishError::EngineUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "engine_unavailable")
            }
            PublishError::EngineBusy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            PublishError::Overloaded(o) => {
                return Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
                    .retry_after(o.retry_after_secs());
            }
        };
        Self::new(status, code, e.to_string())
    }
}

/// A shard that did not take an order or answer a question in time: 503 `busy`.
impl From<FanoutError> for ApiError {
    fn from(e: FanoutError) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::EngineDown;

    /// Status, code and `Retry-After` of `e` as the wire has them.
    fn wire(e: impl Into<ApiError>) -> (u16, &'static str, Option<String>) {
        let e = e.into();
        let r = e.response();
        let retry = r
            .headers()
            .get(RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), e.error, retry)
    }

    fn none(status: u16, code: &'static str) -> (u16, &'static str, Option<String>) {
        (status, code, None)
    }

    fn retry(status: u16, code: &'static str, secs: u32) -> (u16, &'static str, Option<String>) {
        (status, code, Some(secs.to_string()))
    }

    #[test]
    fn auth_errors() {
        assert_eq!(wire(AuthError::Missing), none(401, "unauthorized"));
        assert_eq!(wire(AuthError::NotBearer), none(401, "unauthorized"));
        assert_eq!(wire(AuthError::UnknownKey), none(401, "unauthorized"));
        assert_eq!(wire(AuthError::AdminOnly("x")), none(403, "forbidden"));
        assert_eq!(
            wire(AuthError::OtherProject("p".into())),
            none(403, "forbidden")
        );
        assert_eq!(
            wire(AuthError::UnknownProject("p".into())),
            none(404, "unknown_project")
        );
        let e = ApiError::from(AuthError::UnknownKey).response();
        assert_eq!(e.headers()[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            ApiError::from(AuthError::OtherProject("blog".into())).message,
            "this API key does not act on project `blog`"
        );
    }

    #[test]
    fn rate_limits() {
        let e = RateLimited {
            rate: 5,
            burst: 10,
            retry_after_secs: 3,
        };
        assert_eq!(wire(e), retry(429, "rate_limited", 3));
        assert_eq!(
            ApiError::from(e).message,
            "this API key is over its 5 requests per second (burst 10); retry in 3 s"
        );
    }

    #[test]
    fn body_errors() {
        assert_eq!(
            wire(BodyError::TooLarge { max: 8 }),
            none(413, "payload_too_large")
        );
        assert_eq!(
            wire(BodyError::Timeout {
                within: Duration::from_millis(250)
            }),
            none(408, "request_timeout")
        );
        assert_eq!(wire(BodyError::Read("x".into())), none(400, "bad_request"));
        let json = BodyError::Json {
            what: "publish body",
            detail: "EOF".into(),
        };
        assert_eq!(wire(json.clone()), none(400, "bad_request"));
        assert_eq!(ApiError::from(json).message, "invalid publish body: EOF");
        assert_eq!(
            ApiError::from(BodyError::Timeout {
                within: Duration::from_millis(250)
            })
            .message,
            "the body did not arrive within 250 ms (api.body_read_timeout_ms)"
        );
    }

    #[test]
    fn idempotency_errors() {
        assert_eq!(wire(IdempotencyError::Repeated), none(400, "bad_request"));
        assert_eq!(
            wire(IdempotencyError::BadKey("x".into())),
            none(400, "bad_request")
        );
        assert_eq!(
            wire(IdempotencyError::Reused("k".into())),
            none(422, "idempotency_key_reused")
        );
        assert_eq!(
            wire(IdempotencyError::Full {
                retry_after_secs: 7
            }),
            retry(503, "busy", 7)
        );
    }

    #[test]
    fn management_busy() {
        assert_eq!(wire(ManagementBusy::PerKey(4)), retry(429, "busy", 1));
        assert_eq!(wire(ManagementBusy::Total(16)), retry(503, "busy", 1));
        assert_eq!(
            ApiError::from(ManagementBusy::PerKey(4)).message,
            "this API key has 4 project or key changes queued or in progress; retry when one is \
             done"
        );
        assert_eq!(
            ApiError::from(ManagementBusy::Total(16)).message,
            "16 project or key changes are queued or in progress; retry when one is done"
        );
    }

    #[test]
    fn admin_errors() {
        assert_eq!(
            wire(AdminError::BadRequest("x".into())),
            none(400, "bad_request")
        );
        assert_eq!(
            wire(AdminError::UnknownProject("p".into())),
            none(404, "unknown_project")
        );
        assert_eq!(
            wire(AdminError::UnknownKey {
                project: "p".into(),
                kid: "k".into()
            }),
            none(404, "not_found")
        );
        assert_eq!(
            wire(AdminError::Conflict("x".into())),
            none(409, "conflict")
        );
        assert_eq!(
            wire(AdminError::TooLarge("x".into())),
            none(413, "payload_too_large")
        );
        let store = crate::store::StoreError::Locked("/var/lib/herald".into());
        assert_eq!(wire(AdminError::Store(store)), retry(503, "unavailable", 1));
    }

    #[test]
    fn publish_errors() {
        assert_eq!(wire(PublishError::Busy(1)), retry(503, "busy", 1));
        assert_eq!(wire(PublishError::Draining), retry(503, "draining", 1));
        assert_eq!(wire(PublishError::Failed(0)), retry(503, "failed", 1));
        assert_eq!(
            wire(PublishError::EngineUnavailable(EngineDown::NotConnected)),
            retry(503, "engine_unavailable", 1)
        );
        assert_eq!(wire(PublishError::EngineBusy), retry(503, "busy", 1));
        let over = crate::flow::Overload::QueuedBytes { queued: 9, max: 8 };
        assert_eq!(
            wire(PublishError::Overloaded(over)),
            retry(503, "overloaded", 1)
        );
        assert_eq!(
            wire(PublishError::TooLarge { size: 9, max: 8 }),
            none(413, "message_too_large")
        );
    }

    #[test]
    fn fanout_errors() {
        let within = Duration::from_secs(2);
        assert_eq!(
            wire(FanoutError::NotTaken {
                shards: vec![1],
                within
            }),
            retry(503, "busy", 1)
        );
        assert_eq!(
            wire(FanoutError::NoAnswer {
                shards: vec![0],
                within
            }),
            retry(503, "busy", 1)
        );
    }

    #[test]
    fn console_token_errors() {
        let topic = ConsoleTokenError::Topic {
            topic: "$x".into(),
            why: "reserved".into(),
        };
        assert_eq!(wire(topic), none(400, "bad_request"));
        assert_eq!(
            wire(ConsoleTokenError::Pattern("a*".into())),
            none(400, "bad_request")
        );
        assert_eq!(
            wire(ConsoleTokenError::Implicit("user.a".into())),
            none(400, "bad_request")
        );
        assert_eq!(
            wire(ConsoleTokenError::Disabled("p".into())),
            none(409, "project_disabled")
        );
        assert_eq!(
            wire(ConsoleTokenError::NoSigningKey("p".into())),
            none(409, "no_signing_key")
        );
    }

    #[test]
    fn named_errors() {
        assert_eq!(wire(ApiError::shard_stopped(1)), retry(503, "draining", 1));
        assert_eq!(wire(ApiError::not_found("x")), none(404, "not_found"));
        assert_eq!(wire(ApiError::forbidden("x")), none(403, "forbidden"));
        assert_eq!(wire(ApiError::internal("x")), none(500, "internal"));
        assert_eq!(
            wire(ApiError::method_not_allowed(&hyper::Method::PUT, "/x")),
            none(405, "method_not_allowed")
        );
    }
}
