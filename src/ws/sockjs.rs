//! SockJS's WebSocket transport, sans-IO: the paths a `new SockJS(url)` client uses, the
//! `/info` answer that makes it choose WebSocket, and the SockJS framing around a codec's
//! frames (`o` on open, `h` heart-beats, `a["..."]` messages, `c[code,"reason"]` before a
//! close). The client's messages arrive as a JSON array of strings, each one codec message.
//!
//! Bases: `/sockjs/{project}`, and `/sockjs` with the project in a `projectId` query
//! parameter. `sockjs-client` asks `GET <base>/info` (the base's query string kept), then
//! opens `<base>/<server>/<session>/websocket` (the query string kept again, so a `?token=`
//! in the SockJS URL reaches the upgrade). The HTTP-polling transports (`xhr`,
//! `xhr_streaming`, `eventsource`, `iframe`, `jsonp`) are not served: 404.
//!
//! Framing is a layer over the codecs' WebSocket frames: a frame made for one connection is
//! re-wrapped as it is queued ([`wrap`]); a publish's delivery pieces are wrapped once per
//! publish ([`Delivery`]), never per connection.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame;

/// The path prefix of every SockJS base.
pub const PREFIX: &str = "/sockjs";

/// The query parameter naming the project on the base `/sockjs` (the Spring push center's).
pub const PROJECT_PARAM: &str = "projectId";

/// The query parameter choosing the codec inside SockJS: `protocol=herald.v1`; STOMP
/// otherwise (browsers' SockJS offers no WebSocket subprotocol).
pub const PROTOCOL_PARAM: &str = "protocol";

/// The `o` frame that opens a SockJS session, shared.
pub static OPEN: Bytes = Bytes::from_static(&[0x81, 0x01, b'o']);

/// The `h` heart-beat frame, shared.
pub static HEARTBEAT: Bytes = Bytes::from_static(&[0x81, 0x01, b'h']);

/// Most headers a plain SockJS request may carry (as an upgrade request).
const MAX_HEADERS: usize = 64;

/// Where a request under [`PREFIX`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `<base>/info`: the project from the path, if the base names one.
    Info(Option<&'a str>),
    /// `<base>/<server>/<session>/websocket`: the project from the path, if the base names
    /// one.
    WebSocket(Option<&'a str>),
    /// Another SockJS transport or an unknown path: not served.
    NotServed,
}

/// The route of a request path (without its query), or `None` outside [`PREFIX`].
pub fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix(PREFIX)?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    let segs: Vec<&str> = rest.split('/').skip(1).collect();
    // A server or session id is a non-empty segment without dots (sockjs-protocol).
    let id = |s: &str| !s.is_empty() && !s.contains('.');
    let project = |s: &str| !s.is_empty();
    Some(match segs.as_slice() {
        ["info"] => Route::Info(None),
        [p, "info"] if project(p) => Route::Info(Some(p)),
        [s, n, "websocket"] if id(s) && id(n) => Route::WebSocket(None),
        [p, s, n, "websocket"] if project(p) && id(s) && id(n) => Route::WebSocket(Some(p)),
        _ => Route::NotServed,
    })
}

/// The value of a query parameter (decoded), the first if repeated.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A plain HTTP request to a SockJS path (anything but a WebSocket upgrade).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    /// `OPTIONS` (a CORS preflight) rather than `GET`.
    pub preflight: bool,
    /// Where it goes.
    pub route: PlainRoute,
    /// `Origin`, if sent.
    pub origin: Option<String>,
    /// `Access-Control-Request-Headers`, if sent.
    pub request_headers: Option<String>,
}

/// What a [`Plain`] request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainRoute {
    /// `/info` of the project named.
    Info(String),
    /// `/info` of the base `/sockjs` without a `projectId`.
    InfoWithoutProject,
    /// A method other than `GET`/`OPTIONS`, a transport other than WebSocket, or an unknown
    /// path.
    NotServed,
}

/// Reads a complete plain HTTP request to a SockJS path from the start of `buf`: `None`
/// while the request is incomplete, and for anything that is not a SockJS path or is a
/// WebSocket upgrade (the handshake reads those).
pub fn plain_request(buf: &[u8]) -> Option<Plain> {
    // Cheap first: only a request line naming a SockJS path is parsed here.
    let target = buf.iter().position(|&b| b == b' ').map(|i| &buf[i + 1..])?;
    if !target.starts_with(PREFIX.as_bytes()) {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(buf), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let route = route(path)?;
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(|v| v.trim().to_owned())
    };
    let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade && matches!(route, Route::WebSocket(_)) {
        return None;
    }
    let method = req.method.unwrap_or("");
    let preflight = method == "OPTIONS";
    let route = match route {
        _ if method != "GET" && !preflight => PlainRoute::NotServed,
        Route::Info(Some(p)) => PlainRoute::Info(p.to_owned()),
        Route::Info(None) => match query_param(query, PROJECT_PARAM) {
            Some(p) if !p.is_empty() => PlainRoute::Info(p),
            _ => PlainRoute::InfoWithoutProject,
        },
        Route::WebSocket(_) | Route::NotServed => PlainRoute::NotServed,
    };
    Some(Plain {
        preflight,
        route,
        origin: header("origin"),
        request_headers: header("access-control-request-headers"),
    })
}

/// The CORS headers of every SockJS answer: `sockjs-client` asks `/info` with credentials
/// (`withCredentials`), so the origin is echoed rather than `*`.
fn cors(out: &mut String, origin: Option<&str>) {
    match origin.filter(|o| *o != "null" && !o.is_empty()) {
        Some(o) => {
            // A header value cannot hold a line end; an origin never does.
            let o = o.replace(['\r', '\n'], "");
            out.push_str(&format!(
                "Access-Control-Allow-Origin: {o}\r\nAccess-Control-Allow-Credentials: true\r\n"
            ));
        }
        None => out.push_str("Access-Control-Allow-Origin: *\r\n"),
    }
    out.push_str("Vary: Origin\r\n");
}

/// The answer to `GET <base>/info` (`entropy`: a random number the client may use) or to
/// its `OPTIONS` preflight; the connection is closed after it.
pub fn info_response(req: &Plain, entropy: u32) -> Vec<u8> {
    let mut head = String::new();
    if req.preflight {
        head.push_str(
            "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Methods: OPTIONS, GET\r\n\
             Access-Control-Max-Age: 31536000\r\nCache-Control: public, max-age=31536000\r\n",
        );
        if let Some(h) = &req.request_headers {
            head.push_str(&format!(
                "Access-Control-Allow-Headers: {}\r\n",
                h.replace(['\r', '\n'], "")
            ));
        }
        cors(&mut head, req.origin.as_deref());
        head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
        return head.into_bytes();
    }
    let body = format!(
        r#"{{"websocket":true,"cookie_needed":false,"origins":["*:*"],"entropy":{entropy}}}"#
    );
    head.push_str(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=UTF-8\r\n\
         Cache-Control: no-store, no-cache, no-transform, must-revalidate, max-age=0\r\n",
    );
    cors(&mut head, req.origin.as_deref());
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A client's SockJS message is not a JSON string or array of strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a SockJS message must be a JSON array of strings")]
pub struct BadFrame;

/// The codec messages a client's SockJS message carries: a JSON array of strings (what
/// `sockjs-client` sends), or one JSON string.
///
/// # Errors
/// [`BadFrame`]: anything else (the connection is closed 1007).
pub fn decode(text: &str) -> Result<Vec<String>, BadFrame> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Messages {
        Many(Vec<String>),
        One(String),
    }
    match serde_json::from_str(text).map_err(|_| BadFrame)? {
        Messages::Many(v) => Ok(v),
        Messages::One(s) => Ok(vec![s]),
    }
}

/// Appends `text` JSON-escaped, without the quotes. Escaping is per character, so the
/// escaped pieces of a text, concatenated, are the escaped text.
fn escape_into(out: &mut BytesMut, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    let quoted = serde_json::to_string(&*text).expect("strings always serialise");
    out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
}

/// The opcode and payload of a server frame made by [`frame`] (unmasked, unfragmented),
/// `None` if it is not one. A head made by [`frame::text_head`] yields the part of the payload
/// it holds.
fn split_frame(f: &[u8]) -> Option<(u8, &[u8])> {
    let (&b0, &b1) = (f.first()?, f.get(1)?);
    let header = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    Some((b0 & 0x0f, f.get(header..)?))
}

/// A codec's frames for one connection, given as their pieces in order, as the SockJS
/// session carries them: a text frame becomes `a["<text>"]`; a close frame is preceded by
/// `c[code,"reason"]`; pings and pongs pass as they are.
pub fn wrap(parts: &[&Bytes]) -> Vec<Bytes> {
    let whole: Bytes = match parts {
        [one] => (*one).clone(),
        _ => {
            let mut b = BytesMut::new();
            for p in parts {
                b.extend_from_slice(p);
            }
            b.freeze()
        }
    };
    let Some((opcode, payload)) = split_frame(&whole) else {
        return vec![whole];
    };
    match opcode {
        1 => {
            let mut text = BytesMut::with_capacity(payload.len() + 8);
            text.extend_from_slice(b"a[\"");
            escape_into(&mut text, payload);
            text.extend_from_slice(b"\"]");
            vec![frame::text(&text)]
        }
        8 => {
            let code = payload
                .get(..2)
                .map_or(1000, |c| u16::from_be_bytes([c[0], c[1]]));
            let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
            let c = format!(
                "c[{code},{}]",
                serde_json::to_string(&reason).expect("strings always serialise")
            );
            vec![frame::text(c.as_bytes()), whole]
        }
        _ => vec![whole],
    }
}

/// A publish's delivery pieces in SockJS framing, made once per publish: a frame is a head
/// made per topic (herald.v1) or per subscription (STOMP), then the shared rest.
#[derive(Debug, Default)]
pub struct Delivery {
    /// herald.v1: the body every topic shares, escaped, closing the array.
    body: Option<Bytes>,
    /// STOMP: the shared headers, the data and the NUL, escaped, closing the array.
    stomp: Option<Bytes>,
}

impl Delivery {
    /// herald.v1's frame for a topic: its head (made here, per topic) and the shared body.
    /// `head` and `body` are the codec's delivery pieces.
    pub fn herald_v1(&mut self, head: &Bytes, body: &Bytes) -> [Bytes; 2] {
        let rest = self
            .body
            .get_or_insert_with(|| {
                let mut b = BytesMut::with_capacity(body.len() + 16);
                escape_into(&mut b, body);
                b.put_slice(b"\"]");
                b.freeze()
            })
            .clone();
        let start = split_frame(head).map_or(&head[..], |(_, p)| p);
        [opened_head(start, rest.len()), rest]
    }

    /// STOMP's shared rest of a `MESSAGE` (`shared`: `stomp::Publication::stomp_parts`),
    /// escaped once.
    pub fn stomp_rest(&mut self, shared: &[Bytes; 3]) -> Bytes {
        self.stomp
            .get_or_insert_with(|| {
                let mut b = BytesMut::new();
                for part in shared {
                    escape_into(&mut b, part);
                }
                b.put_slice(b"\"]");
                b.freeze()
            })
            .clone()
    }
}

/// The head of an `a["...` frame whose escaped text starts with `start` (unescaped) and goes
/// on for `rest_len` bytes held elsewhere (already escaped, closing the array).
pub fn opened_head(start: &[u8], rest_len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(start.len() + 8);
    b.put_slice(b"a[\"");
    escape_into(&mut b, start);
    frame::text_head(&b, rest_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|f| String::from_utf8_lossy(split_frame(f).unwrap().1).into_owned())
            .collect()
    }

    #[test]
    fn routes() {
        assert_eq!(route("/sockjs/info"), Some(Route::Info(None)));
        assert_eq!(route("/sockjs/shop/info"), Some(Route::Info(Some("shop"))));
        assert_eq!(
            route("/sockjs/123/abcdefgh/websocket"),
            Some(Route::WebSocket(None))
        );
        assert_eq!(
            route("/sockjs/shop/123/abcdefgh/websocket"),
            Some(Route::WebSocket(Some("shop")))
        );
        for p in [
            "/sockjs",
            "/sockjs/shop",
            "/sockjs/shop/123/abc/xhr_streaming",
            "/sockjs/123/abc/xhr",
            "/sockjs/shop/websocket",
            "/sockjs/shop/1.2/abc/websocket",
        ] {
            assert_eq!(route(p), Some(Route::NotServed), "{p}");
        }
        assert_eq!(route("/sockjsx/info"), None);
        assert_eq!(route("/ws/shop"), None);
    }

    #[test]
    fn plain_requests() {
        let req = |text: &str| plain_request(text.as_bytes());
        let info =
            req("GET /sockjs/info?token=t&projectId=shop&t=1 HTTP/1.1\r\nOrigin: http://a\r\n\r\n")
                .unwrap();
        assert_eq!(info.route, PlainRoute::Info("shop".into()));
        assert_eq!(info.origin.as_deref(), Some("http://a"));
        assert!(!info.preflight);
        let info = req("OPTIONS /sockjs/shop/info HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            (info.route, info.preflight),
            (PlainRoute::Info("shop".into()), true)
        );
        assert_eq!(
            req("GET /sockjs/info HTTP/1.1\r\n\r\n").unwrap().route,
            PlainRoute::InfoWithoutProject
        );
        assert_eq!(
            req("POST /sockjs/shop/1/a/xhr HTTP/1.1\r\n\r\n")
                .unwrap()
                .route,
            PlainRoute::NotServed
        );
        assert_eq!(
            req("GET /sockjs/shop/info HTTP/1.1\r\n"),
            None,
            "incomplete"
        );
        assert_eq!(req("GET /ws/shop HTTP/1.1\r\n\r\n"), None);
        let up = "GET /sockjs/1/a/websocket HTTP/1.1\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(req(up), None, "an upgrade is the handshake's");
    }

    #[test]
    fn info_answers_what_sockjs_client_reads() {
        let info =
            plain_request(b"GET /sockjs/shop/info HTTP/1.1\r\nOrigin: http://page:81\r\n\r\n")
                .unwrap();
        let r = String::from_utf8(info_response(&info, 7)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("Access-Control-Allow-Origin: http://page:81\r\n"),
            "{r}"
        );
        assert!(
            r.contains("Access-Control-Allow-Credentials: true\r\n"),
            "{r}"
        );
        assert!(r.ends_with(
            r#"{"websocket":true,"cookie_needed":false,"origins":["*:*"],"entropy":7}"#
        ));
        let pre = plain_request(b"OPTIONS /sockjs/shop/info HTTP/1.1\r\n\r\n").unwrap();
        let r = String::from_utf8(info_response(&pre, 7)).unwrap();
        assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
        assert!(r.contains("Access-Control-Allow-Origin: *\r\n"), "{r}");
        assert!(
            r.contains("Access-Control-Allow-Methods: OPTIONS, GET\r\n"),
            "{r}"
        );
    }

    #[test]
    fn client_messages() {
        assert_eq!(
            decode(r#"["a","b\u0000"]"#),
            Ok(vec!["a".into(), "b\0".into()])
        );
        assert_eq!(decode(r#""one""#), Ok(vec!["one".into()]));
        assert_eq!(decode("[1]"), Err(BadFrame));
        assert_eq!(decode("CONNECT"), Err(BadFrame));
    }

    #[test]
    fn frames_are_wrapped() {
        let text = frame::text(b"MESSAGE\ndestination:/topic/a\n\n{\"x\":\"\xc3\xa9\"}\0");
        assert_eq!(
            payload(&wrap(&[&text])),
            [r#"a["MESSAGE\ndestination:/topic/a\n\n{\"x\":\"é\"}\u0000"]"#]
        );
        let close = frame::close_code(4008, "slow consumer");
        let w = wrap(&[&close]);
        assert_eq!(payload(&w[..1]), [r#"c[4008,"slow consumer"]"#]);
        assert_eq!(w[1], close, "then the close frame itself");
        let ping = frame::ping();
        assert_eq!(wrap(&[&ping]), [ping]);
        let head = frame::text_head(b"ab", 2);
        let tail = Bytes::from_static(b"cd");
        assert_eq!(payload(&wrap(&[&head, &tail])), [r#"a["abcd"]"#]);
    }

    /// A delivery's pieces, escaped once, make the frame the per-connection wrap makes.
    #[test]
    fn shared_delivery_pieces_equal_the_wrapped_frame() {
        let body = Bytes::from_static(b"{\"k\":\"v\\n\"},\"id\":\"m\",\"ts\":1}");
        let head = frame::text_head(br#"{"type":"message","topic":"news","data":"#, body.len());
        let mut d = Delivery::default();
        let [h, rest] = d.herald_v1(&head, &body);
        let mut whole = h.to_vec();
        whole.extend_from_slice(&rest);
        assert_eq!(Bytes::from(whole), wrap(&[&head, &body])[0]);
        let [_, again] = d.herald_v1(&head, &body);
        assert_eq!(again.as_ptr(), rest.as_ptr(), "escaped once per publish");
    }
}
