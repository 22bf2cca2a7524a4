//! The API's connection layer: how many API connections may be open, how long one may sit
//! idle or trickle, and the JSON answer to a request hyper cannot parse.
//!
//! - [`Conns`] bounds the open API connections (`api.max_connections`). At the cap, the
//!   connection that has waited longest for a request head is closed to admit the new one,
//!   so a flood of idle or trickling connections cannot lock an operator's health check out;
//!   a connection awaiting a request body, or a request waiting its turn, counts as waiting
//!   too. Only when every connection is inside a request (its work running, or its answer
//!   being written) is the new one closed at accept.
//! - [`ApiIo`] wraps each socket: no byte moved in either direction for `api.idle_timeout_ms`
//!   while the connection waits for a request head or body, or while an answer's write is
//!   stuck, fails the connection (a request being handled is not idle), and hyper's own answer to a malformed request (a bare 400, 414 or
//!   431 with no body) is rewritten into the API's `{"error","message"}` JSON.
//!
//! It must not know routes: the router in `mod.rs` does.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Sleep;
use tracing::warn;

/// At most one line a second for a class of events; counts the lines it held back.
#[derive(Default)]
pub(super) struct LogThrottle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    /// `Some(suppressed)` when a line may be logged now (with the number of events held back
    /// since the previous line), `None` when this one is held back.
    pub(super) fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

struct Entry {
    /// Work for a request is running (or its answer is being written): the connection is
    /// not evicted.
    busy: bool,
    /// Since when the connection has waited for a request head.
    waiting_since: Instant,
    /// Told to close when evicted.
    evict: Arc<Notify>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    live: HashMap<u64, Entry>,
}

/// The open API connections, bounded by `api.max_connections`.
pub(super) struct Conns {
    max: usize,
    /// Where the count is published (`herald_api_connections`).
    hub: Arc<crate::hub::Hub>,
    table: Mutex<Table>,
    /// Throttles the "at the cap" lines.
    log: LogThrottle,
}

/// What [`Conns::admit`] decided about a new connection.
pub(super) enum Admission {
    /// Serve it; close it when `evict` is notified.
    Admitted(ConnSlot),
    /// Every connection is inside a request: close the new one.
    Refused,
}

/// One admitted connection; leaves the table on drop.
pub(super) struct ConnSlot {
    conns: Arc<Conns>,
    id: u64,
    /// Notified when the connection is evicted to admit a newer one.
    pub(super) evict: Arc<Notify>,
    /// A request was received and its answer is not all written: [`ApiIo`] does not count
    /// the time as idle, except while a body is awaited.
    handling: AtomicBool,
    /// The answer's body has ended: the request is over once hyper has written out what it
    /// buffered (its next flush of the socket).
    answered: AtomicBool,
}

impl Conns {
    /// A table for at most `max` connections (at least 1).
    pub(super) fn new(max: usize, hub: Arc<crate::hub::Hub>) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            hub,
            table: Mutex::new(Table::default()),
            log: LogThrottle::default(),
        })
    }

    fn publish_count(&self, t: &Table) {
        self.hub
            .api_connections
            .store(t.live.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table holds plain data updated in single statements: a panic cannot leave it
        // half-changed.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open connections now.
    pub(super) fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// Admits a new connection; at the cap, evicts the one waiting longest for a request
    /// head, or refuses when every connection is inside a request.
    pub(super) fn admit(self: &Arc<Self>) -> Admission {
        let mut t = self.lock();
        if t.live.len() >= self.max {
            let oldest = t
                .live
                .iter()
                .filter(|(_, e)| !e.busy)
                .min_by_key(|(_, e)| e.waiting_since)
                .map(|(id, _)| *id);
            let Some(oldest) = oldest else {
                drop(t);
                if let Some(suppressed) = self.log.allow() {
                    warn!(
                        max = self.max,
                        suppressed,
                        "API at api.max_connections and every connection is inside a request; \
                         closing a new connection at accept (logged at most once a second)"
                    );
                }
                return Admission::Refused;
            };
            if let Some(e) = t.live.remove(&oldest) {
                e.evict.notify_one();
            }
            if let Some(suppressed) = self.log.allow() {
                warn!(
                    max = self.max,
                    suppressed,
                    "API at api.max_connections; closing the connection idle the longest to \
                     admit a new one (logged at most once a second)"
                );
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let evict = Arc::new(Notify::new());
        t.live.insert(
            id,
            Entry {
                busy: false,
                waiting_since: Instant::now(),
                evict: evict.clone(),
            },
        );
        self.publish_count(&t);
        Admission::Admitted(ConnSlot {
            conns: self.clone(),
            id,
            evict,
            handling: AtomicBool::new(false),
            answered: AtomicBool::new(false),
        })
    }
}

impl ConnSlot {
    /// A request head arrived: the connection is inside a request (neither evicted nor idle)
    /// until its answer is written out ([`ConnSlot::answer_ended`], then the next flush).
    pub(super) fn request_started(&self) {
        self.answered.store(false, Ordering::Relaxed);
        self.handling.store(true, Ordering::Relaxed);
        self.set_busy(true);
    }

    /// The answer's body has ended (hyper dropped it); see [`ConnSlot::request_started`].
    pub(super) fn answer_ended(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// hyper flushed the socket with nothing left in its buffer: an ended answer is all out.
    fn flushed(&self) {
        if self.answered.swap(false, Ordering::Relaxed) {
            self.handling.store(false, Ordering::Relaxed);
            self.set_busy(false);
        }
    }

    /// Inside a request and not waiting for its body: idle time does not count.
    fn handling(&self) -> bool {
        self.handling.load(Ordering::Relaxed)
    }

    /// Inside a request (not evicted) or waiting (evictable, oldest wait first).
    fn set_busy(&self, busy: bool) {
        if let Some(e) = self.conns.lock().live.get_mut(&self.id) {
            e.busy = busy;
            if !busy {
                e.waiting_since = Instant::now();
            }
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        t.live.remove(&self.id);
        self.conns.publish_count(&t);
    }
}

/// A request's connection, found by handlers in the request's extensions.
#[derive(Clone)]
pub(super) struct SlotHandle(pub(super) Arc<ConnSlot>);

impl SlotHandle {
    /// While a body is awaited, the connection may be evicted like an idle one (a client
    /// that stalls its body must not hold a slot the cap needs) and `api.idle_timeout_ms`
    /// counts; when the guard drops it is inside the request again.
    pub(super) fn awaiting_body(&self) -> Waiting {
        self.0.handling.store(false, Ordering::Relaxed);
        self.0.set_busy(false);
        Waiting {
            slot: self.0.clone(),
            body: true,
        }
    }

    /// While a request waits its turn (a queued management change), the connection may be
    /// evicted: only work actually running holds a slot. Idle time does not count: the
    /// request is well-formed and in progress.
    pub(super) fn queued(&self) -> Waiting {
        self.0.set_busy(false);
        Waiting {
            slot: self.0.clone(),
            body: false,
        }
    }
}

/// See [`SlotHandle::awaiting_body`] and [`SlotHandle::queued`].
pub(super) struct Waiting {
    slot: Arc<ConnSlot>,
    /// Awaiting a body: idle time counted meanwhile.
    body: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.body {
            self.slot.handling.store(true, Ordering::Relaxed);
        }
        self.slot.set_busy(true);
    }
}

/// An answer's body that tells its connection when it ends (see [`ConnSlot::answer_ended`]):
/// until then, and until hyper has written it out, the connection is inside the request.
pub(super) struct AnswerBody<B> {
    inner: B,
    slot: Arc<ConnSlot>,
}

impl<B> AnswerBody<B> {
    pub(super) fn new(inner: B, slot: Arc<ConnSlot>) -> Self {
        Self { inner, slot }
    }
}

impl<B> Drop for AnswerBody<B> {
    fn drop(&mut self) {
        self.slot.answer_ended();
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for AnswerBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Logs why an API connection ended with an error: a timeout (`api.header_read_timeout_ms`
/// or `api.idle_timeout_ms`) at warn level, at most once a second across connections (a
/// slow-client flood is one line a second); anything else (a peer reset, a malformed
/// request, already logged) at debug level.
pub(super) fn log_connection_error(e: &hyper::Error, log: &LogThrottle) {
    let idle = std::iter::successors(std::error::Error::source(e), |s| s.source())
        .filter_map(|s| s.downcast_ref::<io::Error>())
        .any(|io| io.kind() == io::ErrorKind::TimedOut);
    let why = if idle {
        "no byte moved within api.idle_timeout_ms"
    } else if e.is_timeout() {
        "request head not complete within api.header_read_timeout_ms"
    } else {
        tracing::debug!(error = %e, "API connection ended with an error");
        return;
    };
    if let Some(suppressed) = log.allow() {
        warn!(
            suppressed,
            "API connection closed: {why} (logged at most once a second; `suppressed` such \
             closes since the previous line)"
        );
    }
}

/// The automatic answers hyper writes for a request it cannot parse, and what the API says
/// instead: status line, `error` code, message.
const PARSE_ERRORS: [(&str, &str, &str); 3] = [
    (
        "400 Bad Request",
        "bad_request",
        "malformed HTTP request (request line, header or Content-Length)",
    ),
    (
        "414 URI Too Long",
        "uri_too_long",
        "request target too long",
    ),
    (
        "431 Request Header Fields Too Large",
        "headers_too_large",
        "request head too large or too many header fields",
    ),
];

/// The JSON response replacing `head` when it is one of hyper's bare parse-error answers:
/// a status of [`PARSE_ERRORS`] with an empty body and no content type. The API's own
/// error responses always carry a JSON body, so they never match.
fn rewrite_parse_error(head: &[u8]) -> Option<(Vec<u8>, &'static str)> {
    // hyper's bare answer is a short head alone in its write; anything else is passed on
    // without a look.
    if head.len() > 512 || !head.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let (status, error, message) = PARSE_ERRORS
        .iter()
        .find(|(status, _, _)| rest.starts_with(status))?;
    let lower = text.to_ascii_lowercase();
    if !lower.ends_with("\r\n\r\n")
        || !lower.contains("\r\ncontent-length: 0\r\n")
        || lower.contains("\r\ncontent-type:")
    {
        return None;
    }
    let body = serde_json::json!({ "error": error, "message": message }).to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    Some((response.into_bytes(), error))
}

/// An API socket with an inactivity deadline and JSON parse-error answers (see the module
/// doc).
pub(super) struct ApiIo<T> {
    inner: T,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// A rewritten answer being written: bytes and how many are written.
    rewrite: Option<(Vec<u8>, usize)>,
    /// Throttles the malformed-request lines (shared by every connection).
    log: Arc<LogThrottle>,
    /// Set once the write side is shut: until then what the peer still sends is read and
    /// dropped (see [`LINGER`]).
    linger: Option<Pin<Box<Sleep>>>,
    /// The connection's slot: whether a request is being handled (no idle deadline then),
    /// and told when hyper's writes are all out.
    slot: Arc<ConnSlot>,
    /// The idle deadline was skipped because a request was being handled: it restarts from
    /// the next wait.
    paused: bool,
}

/// How long a closing connection reads and drops what the peer still sends after the last
/// answer (a body refused 413 before it was read, say). Closing a socket with unread bytes
/// makes the kernel send a reset, and a reset can destroy the answer before the client
/// reads it.
const LINGER: Duration = Duration::from_secs(2);

impl<T> ApiIo<T> {
    /// Wraps `inner`; `idle` without a byte moved, outside the handling of a request, fails
    /// the connection.
    pub(super) fn new(
        inner: T,
        idle: Duration,
        log: Arc<LogThrottle>,
        slot: Arc<ConnSlot>,
    ) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            rewrite: None,
            log,
            linger: None,
            slot,
            paused: false,
        }
    }

    fn touch(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "API connection idle past api.idle_timeout_ms",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ApiIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            // hyper polls the socket while a handler runs: that wait is not idleness.
            Poll::Pending if self.slot.handling() => {
                self.paused = true;
                Poll::Pending
            }
            Poll::Pending => {
                if self.paused {
                    // The wait for the next request starts now.
                    self.paused = false;
                    self.touch();
                }
                self.check_idle(cx).map(Err)
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ApiIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.rewrite.is_none()
            && let Some((bytes, error)) = rewrite_parse_error(buf)
        {
            if let Some(suppressed) = self.log.allow() {
                warn!(
                    error,
                    suppressed,
                    "API request refused before routing: {} (logged at most once a second)",
                    String::from_utf8_lossy(&buf[..buf.len().min(40)]).trim_end()
                );
            }
            self.rewrite = Some((bytes, 0));
        }
        let this = &mut *self;
        if let Some((bytes, written)) = &mut this.rewrite {
            // Answer hyper's write of its own head once the JSON answer is all out.
            while *written < bytes.len() {
                let n = match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        return this.check_idle(cx).map(Err);
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            this.rewrite = None;
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        // hyper flushes the socket once its buffer is all written.
        self.slot.flushed();
        Poll::Ready(Ok(()))
    }

    /// Shuts the write side, then reads and drops what the peer still sends until it
    /// closes, or for [`LINGER`] at most.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    if let Some(linger) = &mut this.linger {
                        ready!(linger.as_mut().poll(cx));
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    // Not vectored: hyper then writes a head as one buffer, which the parse-error rewrite
    // needs to see whole.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_parse_errors_become_json() {
        let (bytes, error) = rewrite_parse_error(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
        )
        .expect("rewritten");
        assert_eq!(error, "headers_too_large");
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(text.contains("content-type: application/json\r\n"));
        assert!(text.ends_with(r#""error":"headers_too_large","message":"request head too large or too many header fields"}"#), "{text}");
    }

    #[test]
    fn the_apis_own_answers_are_left_alone() {
        let own = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_parse_error(own).is_none());
        assert!(
            rewrite_parse_error(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").is_none()
        );
        assert!(
            rewrite_parse_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n")
                .is_none()
        );
    }
}
