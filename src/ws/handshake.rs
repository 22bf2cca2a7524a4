//! The HTTP upgrade: parse the request, find the token, and answer with `101` or a refusal.
//!
//! Pure functions over bytes (httparse for HTTP, tungstenite for the accept key): no sockets,
//! no clock. The token may sit in the query string, so the request path is never logged as
//! received: [`redact`] makes the loggable form.

use std::fmt::Write as _;

use serde::Serialize;

use super::sockjs;

/// Most headers an upgrade request may carry.
pub const MAX_HEADERS: usize = 64;

/// The subprotocol herald speaks; offered by browsers that carry the token as `bearer.<jwt>`.
pub const SUBPROTOCOL: &str = "herald.v1";

/// The STOMP subprotocols, highest version first: the first one offered is answered.
pub const STOMP_SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

/// Where the token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer`.
    Header,
    /// `?token=`.
    Query,
    /// `Sec-WebSocket-Protocol: bearer.<jwt>`.
    Subprotocol,
}

/// A well-formed upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The project named in the path.
    pub project: String,
    /// The token and where it came from; `None` when the client sent none.
    pub token: Option<(String, TokenSource)>,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// The subprotocol answered: `herald.v1` if offered, else the highest STOMP one offered.
    pub subprotocol: Option<&'static str>,
    /// The client speaks STOMP: it offered a STOMP subprotocol and not `herald.v1`, or came
    /// by the plain STOMP path `/stomp/{project}`, or by SockJS (unless it asked for
    /// herald.v1 with `?protocol=herald.v1`).
    pub stomp: bool,
    /// The upgrade is SockJS's WebSocket transport (`/sockjs/...`, see `super::sockjs`).
    pub sockjs: bool,
    /// `Origin`, if sent.
    pub origin: Option<String>,
    /// Every `X-Forwarded-For` value, in order, joined with `,` (believed only from a trusted
    /// proxy).
    pub forwarded_for: Option<String>,
    /// Bytes of the request (the rest of the buffer, if any, is WebSocket frames).
    pub len: usize,
}

/// How a handshake ended: the one name shared by the refusal, its log line and the
/// `herald_handshakes_total{outcome}` counter (whose label values are [`Self::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// `101`: the connection is open.
    Accepted,
    /// 400 (or 404 for a path outside `/ws/`): the request cannot be served.
    BadRequest,
    /// 401: no token, or a token that does not verify.
    Unauthorized,
    /// 403: refused by an address list, a disabled project or its `Origin` rules.
    Forbidden,
    /// 404: no such project.
    UnknownProject,
    /// 503: a connection cap, the pending-handshake cap, the descriptor reserve or a drain.
    AtCapacity,
    /// The upgrade request did not arrive within `ws.handshake_timeout_ms`.
    Timeout,
    /// 429: a per-address rate or connection limit.
    RateLimited,
    /// Closed unread to make room at `limits.max_pending_handshakes` (the oldest in progress).
    Evicted,
}

impl HandshakeOutcome {
    /// Every outcome, in counter order.
    pub const ALL: [Self; 9] = [
        Self::Accepted,
        Self::BadRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::UnknownProject,
        Self::AtCapacity,
        Self::Timeout,
        Self::RateLimited,
        Self::Evicted,
    ];

    /// The `outcome` label in `/metrics` and the key in the stats document.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::UnknownProject => "unknown_project",
            Self::AtCapacity => "at_capacity",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::Evicted => "evicted",
        }
    }

    /// Index of its counter (its place in [`Self::ALL`]).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A refusal before the upgrade: an HTTP status and the JSON error body of protocol.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// `error` field: `bad_request`, `unauthorized`, ...
    pub error: &'static str,
    /// `message` field, human text.
    pub message: String,
    /// `Retry-After` in seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

impl Refusal {
    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            error: "bad_request",
            message: message.into(),
            retry_after: None,
        }
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: 401,
            error: "unauthorized",
            message: message.into(),
            retry_after: None,
        }
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            status: 403,
            error: "forbidden",
            message: message.into(),
            retry_after: None,
        }
    }

    /// 404 `unknown_project`.
    pub fn unknown_project(project: &str) -> Self {
        Self {
            status: 404,
            error: "unknown_project",
            message: format!("no project `{project}`"),
            retry_after: None,
        }
    }

    /// 429 `rate_limited`, retry after `secs`.
    pub fn rate_limited(message: impl Into<String>, secs: u32) -> Self {
        Self {
            status: 429,
            error: "rate_limited",
            message: message.into(),
            retry_after: Some(secs.max(1)),
        }
    }

    /// 503 `at_capacity`.
    pub fn at_capacity(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            error: "at_capacity",
            message: message.into(),
            retry_after: Some(5),
        }
    }

    /// The outcome it is counted as.
    pub fn outcome(&self) -> HandshakeOutcome {
        match self.status {
            401 => HandshakeOutcome::Unauthorized,
            403 => HandshakeOutcome::Forbidden,
            429 => HandshakeOutcome::RateLimited,
            404 if self.error == "unknown_project" => HandshakeOutcome::UnknownProject,
            503 => HandshakeOutcome::AtCapacity,
            _ => HandshakeOutcome::BadRequest,
        }
    }

    /// The complete HTTP response; the connection is closed after it.
    pub fn response(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        let body = serde_json::to_string(&Body {
            error: self.error,
            message: &self.message,
        })
        .expect("strings always serialise");
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n",
            self.status,
            reason_phrase(self.status),
            body.len()
        );
        if self.status == 401 {
            head.push_str("WWW-Authenticate: Bearer error=\"invalid_token\"\r\n");
        }
        if self.status == 400 {
            head.push_str("Sec-WebSocket-Version: 13\r\n");
        }
        if let Some(s) = self.retry_after {
            let _ = write!(head, "Retry-After: {s}\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Parses an upgrade request from the start of `buf`.
///
/// Returns `Ok(None)` while the request is incomplete.
///
/// # Errors
/// A [`Refusal`] (400 or 404 for a path outside `/ws/`) to send back.
pub fn parse(buf: &[u8]) -> Result<Option<Upgrade>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::bad_request(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        Err(e) => return Err(Refusal::bad_request(format!("malformed HTTP request: {e}"))),
    };
    if req.method != Some("GET") {
        return Err(Refusal::bad_request("a WebSocket upgrade must be a GET"));
    }
    if req.version != Some(1) {
        return Err(Refusal::bad_request("a WebSocket upgrade needs HTTP/1.1"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let sockjs_route = sockjs::route(path);
    let from_query;
    let (project, stomp_path) = match (path.strip_prefix("/ws/"), path.strip_prefix("/stomp/")) {
        (Some(p), _) => (p, false),
        (_, Some(p)) => (p, true),
        _ => match sockjs_route {
            Some(sockjs::Route::WebSocket(Some(p))) => (p, false),
            Some(sockjs::Route::WebSocket(None)) => {
                from_query = sockjs::query_param(query, sockjs::PROJECT_PARAM).unwrap_or_default();
                if from_query.is_empty() {
                    return Err(Refusal::bad_request(
                        "the SockJS base /sockjs needs the project in a `projectId` query \
                         parameter (or use the base /sockjs/{project})",
                    ));
                }
                (from_query.as_str(), false)
            }
            _ => ("", false),
        },
    };
    if project.is_empty() || project.contains('/') {
        return Err(Refusal {
            status: 404,
            error: "not_found",
            message: "WebSocket endpoints are /ws/{project}, /stomp/{project} and SockJS's \
                      /sockjs/{project}/{server}/{session}/websocket"
                .into(),
            retry_after: None,
        });
    }
    let sockjs = matches!(sockjs_route, Some(sockjs::Route::WebSocket(_)));
    let sockjs_herald_v1 = sockjs
        && sockjs::query_param(query, sockjs::PROTOCOL_PARAM).as_deref() == Some(SUBPROTOCOL);

    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut version_ok = false;
    let mut key = None;
    let mut bearer = None;
    let mut nr_authorization = 0;
    let mut herald_v1 = false;
    let mut stomp_offered: Option<usize> = None;
    let mut proto_tokens = Vec::new();
    let mut origin = None;
    let mut forwarded_for: Option<String> = None;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("");
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version_ok = value.trim() == "13";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value.trim().to_owned());
        } else if name.eq_ignore_ascii_case("authorization") {
            nr_authorization += 1;
            let v = value.trim();
            // `get`: a non-ASCII byte may sit inside the first seven (slicing would panic).
            if v.len() > 7
                && v.get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
            {
                bearer = Some(v[7..].trim().to_owned());
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for t in tokens(value) {
                if t == SUBPROTOCOL {
                    herald_v1 = true;
                } else if let Some(i) = STOMP_SUBPROTOCOLS.iter().position(|p| *p == t) {
                    stomp_offered = Some(stomp_offered.map_or(i, |j| j.min(i)));
                } else if let Some(jwt) = t.strip_prefix("bearer.") {
                    proto_tokens.push(jwt.to_owned());
                }
            }
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(value.trim().to_owned());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            // Lossy, not all-or-nothing: a client-written entry with a non-UTF-8 byte must
            // not blank out the entries the proxies appended to its right.
            let value = String::from_utf8_lossy(h.value);
            match &mut forwarded_for {
                Some(all) => {
                    all.push(',');
                    all.push_str(&value);
                }
                None => forwarded_for = Some(value.into_owned()),
            }
        }
    }
    if !upgrade || !connection_upgrade {
        return Err(Refusal::bad_request(
            "not a WebSocket upgrade (needs Upgrade: websocket and Connection: Upgrade)",
        ));
    }
    if !version_ok {
        return Err(Refusal::bad_request("Sec-WebSocket-Version must be 13"));
    }
    let key = key.filter(|k| valid_key(k)).ok_or_else(|| {
        Refusal::bad_request("Sec-WebSocket-Key missing or not 16 base64-encoded bytes")
    })?;
    // Keys are compared decoded: `%74oken=` is a `token` parameter too.
    let mut query_tokens: Vec<String> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .collect();
    if nr_authorization > 1 {
        return Err(Refusal::bad_request(
            "more than one Authorization header: send exactly one",
        ));
    }
    if query_tokens.len() > 1 {
        return Err(Refusal::bad_request(
            "more than one `token` query parameter: send exactly one",
        ));
    }
    if proto_tokens.len() > 1 {
        return Err(Refusal::bad_request(
            "more than one `bearer.` subprotocol: send exactly one",
        ));
    }
    let mut found = [
        bearer.map(|t| (t, TokenSource::Header)),
        query_tokens.pop().map(|t| (t, TokenSource::Query)),
        proto_tokens.pop().map(|t| (t, TokenSource::Subprotocol)),
    ]
    .into_iter()
    .flatten();
    let token = found.next();
    if found.next().is_some() {
        return Err(Refusal::bad_request(
            "a token in more than one place (Authorization, ?token=, bearer. subprotocol): \
             send it in exactly one",
        ));
    }
    let stomp = stomp_path
        || (sockjs && !sockjs_herald_v1)
        || (!sockjs && stomp_offered.is_some() && !herald_v1);
    let subprotocol = if stomp {
        stomp_offered.map(|i| STOMP_SUBPROTOCOLS[i])
    } else {
        herald_v1.then_some(SUBPROTOCOL)
    };
    Ok(Some(Upgrade {
        project: project.to_owned(),
        token,
        key,
        subprotocol,
        stomp,
        sockjs,
        origin,
        forwarded_for,
        len,
    }))
}

fn tokens(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|t| !t.is_empty())
}

fn valid_key(k: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(k)
        .is_ok_and(|b| b.len() == 16)
}

/// The `101 Switching Protocols` response.
pub fn accept_response(key: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = subprotocol {
        let _ = write!(out, "Sec-WebSocket-Protocol: {p}\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The request target with the `token` query parameter's value replaced by `REDACTED`, for
/// logs.
pub fn redact(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    // Keys are compared decoded, as `parse` reads them: `%74oken=` is a token too.
    let q: Vec<String> = query
        .split('&')
        .map(|kv| {
            let key = kv.split_once('=').map_or(kv, |(k, _)| k);
            match form_urlencoded::parse(key.as_bytes()).next() {
                Some((k, _)) if k == "token" => "token=REDACTED".to_owned(),
                _ => kv.to_owned(),
            }
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, \
             Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    /// Found by fuzzing: a percent-encoded `token` key was read as the token but logged as
    /// received, and a bare `token` stayed unredacted.
    #[test]
    fn redact_catches_encoded_and_bare_token_keys() {
        let target = "/ws/shop?%74oken=s3cret&token&t%6Fken=x&a=1&tokens=2";
        // Several `token` keys are ambiguous: refused (and the target still redacts).
        assert_eq!(parse(req(target, "").as_bytes()).unwrap_err().status, 400);
        let u = parse(req("/ws/shop?%74oken=s3cret&tokens=2", "").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(u.token, Some(("s3cret".into(), TokenSource::Query)));
        assert_eq!(
            redact(target),
            "/ws/shop?token=REDACTED&token=REDACTED&token=REDACTED&a=1&tokens=2"
        );
    }

    #[test]
    fn three_token_transports() {
        let u = parse(req("/ws/shop", "Authorization: Bearer abc\r\n").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(u.project, "shop");
        assert_eq!(u.token, Some(("abc".into(), TokenSource::Header)));
        let u = parse(req("/ws/shop?x=1&token=a.b%2Ec", "").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(u.token, Some(("a.b.c".into(), TokenSource::Query)));
        let u = parse(
            req(
                "/ws/shop",
                "Sec-WebSocket-Protocol: herald.v1, bearer.x.y.z\r\n",
            )
            .as_bytes(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(u.token, Some(("x.y.z".into(), TokenSource::Subprotocol)));
        assert_eq!(u.subprotocol, Some(SUBPROTOCOL));
        let u = parse(req("/ws/shop", "").as_bytes()).unwrap().unwrap();
        assert_eq!(u.token, None);
    }

    /// The highest STOMP subprotocol offered is answered, unless `herald.v1` is offered too;
    /// `/stomp/{project}` speaks STOMP with or without one.
    #[test]
    fn stomp_by_subprotocol_or_by_path() {
        let with = |path: &str, offer: &str| {
            let extra = format!("Sec-WebSocket-Protocol: {offer}\r\n");
            let u = parse(req(path, &extra).as_bytes()).unwrap().unwrap();
            (u.stomp, u.subprotocol)
        };
        assert_eq!(
            with("/ws/shop", "v10.stomp, v11.stomp, v12.stomp"),
            (true, Some("v12.stomp"))
        );
        assert_eq!(
            with("/ws/shop", "v10.stomp, v11.stomp"),
            (true, Some("v11.stomp"))
        );
        assert_eq!(
            with("/ws/shop", "v12.stomp, herald.v1"),
            (false, Some("herald.v1"))
        );
        assert_eq!(with("/stomp/shop", "v10.stomp"), (true, Some("v10.stomp")));
        assert_eq!(with("/stomp/shop", "other"), (true, None));
        let u = parse(req("/stomp/shop", "").as_bytes()).unwrap().unwrap();
        assert_eq!(
            (u.project.as_str(), u.stomp, u.subprotocol),
            ("shop", true, None)
        );
        assert!(parse(req("/stomp/", "").as_bytes()).is_err());
    }

    /// SockJS's session URL: the project from the base's path or its `projectId`; STOMP
    /// unless the query asks for herald.v1; the token from `?token=` as on `/ws/`.
    #[test]
    fn sockjs_session_urls() {
        let up = |target: &str| parse(req(target, "").as_bytes());
        let u = up("/sockjs/shop/123/abcdefgh/websocket").unwrap().unwrap();
        assert_eq!(
            (u.project.as_str(), u.stomp, u.sockjs, u.subprotocol),
            ("shop", true, true, None)
        );
        let u = up("/sockjs/123/abcdefgh/websocket?token=t&projectId=blog")
            .unwrap()
            .unwrap();
        assert_eq!(
            (u.project.as_str(), u.stomp, u.sockjs),
            ("blog", true, true)
        );
        assert_eq!(u.token, Some(("t".into(), TokenSource::Query)));
        let u = up("/sockjs/shop/1/a/websocket?protocol=herald.v1")
            .unwrap()
            .unwrap();
        assert_eq!((u.stomp, u.sockjs), (false, true));
        let e = up("/sockjs/1/a/websocket").unwrap_err();
        assert_eq!((e.status, e.error), (400, "bad_request"));
        assert!(e.message.contains("projectId"), "{}", e.message);
        for target in ["/sockjs/shop/1/a/xhr_streaming", "/sockjs/shop/info"] {
            assert_eq!(up(target).unwrap_err().status, 404, "{target}");
        }
        assert!(!up("/ws/shop").unwrap().unwrap().sockjs);
    }

    /// Two tokens are ambiguous, whether in the same place or in two: refused with 400.
    #[test]
    fn several_tokens_are_refused() {
        let refused = [
            req(
                "/ws/shop",
                "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
            ),
            req(
                "/ws/shop",
                "Authorization: Bearer a\r\nauthorization: Basic b\r\n",
            ),
            req("/ws/shop?token=a&token=b", ""),
            req("/ws/shop?token=a&%74oken=b", ""),
            req("/ws/shop?token=a&x=1&token=a", ""),
            req(
                "/ws/shop",
                "Sec-WebSocket-Protocol: herald.v1, bearer.a, bearer.b\r\n",
            ),
            req("/ws/shop?token=a", "Authorization: Bearer b\r\n"),
            req(
                "/ws/shop",
                "Authorization: Bearer a\r\nSec-WebSocket-Protocol: bearer.b\r\n",
            ),
        ];
        for r in refused {
            let e = parse(r.as_bytes()).unwrap_err();
            assert_eq!((e.status, e.error), (400, "bad_request"), "{r}");
            assert!(e.message.contains("exactly one"), "{}", e.message);
        }
    }

    #[test]
    fn partial_and_trailing_bytes() {
        let r = req("/ws/shop", "");
        assert_eq!(parse(&r.as_bytes()[..20]), Ok(None));
        let mut with_frame = r.clone().into_bytes();
        with_frame.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        assert_eq!(parse(&with_frame).unwrap().unwrap().len, r.len());
    }

    #[test]
    fn refusals() {
        let plain = "GET /ws/shop HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(parse(plain.as_bytes()).unwrap_err().status, 400);
        let bad_key = req("/ws/shop", "").replace(KEY, "short");
        assert_eq!(parse(bad_key.as_bytes()).unwrap_err().status, 400);
        assert_eq!(parse(req("/other", "").as_bytes()).unwrap_err().status, 404);
        let post = req("/ws/shop", "").replacen("GET", "POST", 1);
        assert_eq!(parse(post.as_bytes()).unwrap_err().status, 400);
        assert_eq!(
            parse(b"\x16\x03\x01garbage\r\n\r\n").unwrap_err().status,
            400
        );
    }

    /// Each refusal is counted under its own outcome; a path outside `/ws/` (404 without a
    /// project) is a bad request, not an unknown project. Labels are the metric's.
    #[test]
    fn refusals_are_counted_by_outcome() {
        use HandshakeOutcome as O;
        let cases = [
            (Refusal::bad_request("x"), O::BadRequest, "bad_request"),
            (Refusal::unauthorized("x"), O::Unauthorized, "unauthorized"),
            (Refusal::forbidden("x"), O::Forbidden, "forbidden"),
            (
                Refusal::unknown_project("p"),
                O::UnknownProject,
                "unknown_project",
            ),
            (
                Refusal::rate_limited("x", 1),
                O::RateLimited,
                "rate_limited",
            ),
            (Refusal::at_capacity("x"), O::AtCapacity, "at_capacity"),
            (
                parse(req("/other", "").as_bytes()).unwrap_err(),
                O::BadRequest,
                "bad_request",
            ),
        ];
        for (r, outcome, label) in cases {
            assert_eq!(r.outcome(), outcome, "{r:?}");
            assert_eq!(outcome.label(), label);
        }
        for (i, o) in HandshakeOutcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i, "{o:?}");
        }
    }

    #[test]
    fn non_ascii_authorization_is_not_a_panic() {
        // Found by fuzz/handshake: byte 7 fell inside a multi-byte character.
        let u = parse(req("/ws/shop", "Authorization: MSJ9.c\u{39d}n\r\n").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(u.token, None);
        let u = parse(req("/ws/shop", "Authorization: Bearer \u{39d}\r\n").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(u.token, Some(("\u{39d}".into(), TokenSource::Header)));
    }

    #[test]
    fn responses() {
        let r = String::from_utf8(accept_response(KEY, Some(SUBPROTOCOL))).unwrap();
        assert!(
            r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{r}"
        );
        assert!(r.contains("Sec-WebSocket-Protocol: herald.v1\r\n"));
        let r = String::from_utf8(Refusal::unauthorized("token expired").response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(r.contains("WWW-Authenticate: Bearer error=\"invalid_token\"\r\n"));
        assert!(r.ends_with(r#"{"error":"unauthorized","message":"token expired"}"#));
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("/ws/a?token=secret&x=1"), "/ws/a?token=REDACTED&x=1");
        assert_eq!(redact("/ws/a"), "/ws/a");
    }
}
