//! Opening one client connection: a TCP socket bound to a chosen source address, the
//! WebSocket upgrade, the target's greeting and subscriptions. Every failure becomes a short
//! reason string (`timeout`, `refused`, `http_503`, `emfile`, ...) for the failure counts.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::target::{Frame, Target};

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Why a connection attempt failed, as a stable short name.
pub type Reason = String;

/// The reason name of an I/O error.
pub fn io_reason(e: &io::Error) -> Reason {
    match e.raw_os_error() {
        Some(libc::EMFILE) => return "emfile".into(),
        Some(libc::ENFILE) => return "enfile".into(),
        Some(libc::EADDRNOTAVAIL) => return "no_free_port".into(),
        Some(libc::EADDRINUSE) => return "addr_in_use".into(),
        Some(libc::ECONNREFUSED) => return "refused".into(),
        Some(libc::ECONNRESET) => return "reset".into(),
        Some(libc::EPIPE) => return "broken_pipe".into(),
        Some(libc::ETIMEDOUT) => return "timeout".into(),
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => return "no_memory".into(),
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "eof".into(),
        k => format!("io_{k:?}").to_lowercase(),
    }
}

/// The reason name of a WebSocket error.
pub fn ws_reason(e: &WsError) -> Reason {
    match e {
        WsError::Http(resp) => format!("http_{}", resp.status().as_u16()),
        WsError::Io(e) => io_reason(e),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
        WsError::Protocol(_) => "protocol_error".into(),
        WsError::Capacity(_) => "too_big".into(),
        WsError::Utf8(_) => "bad_utf8".into(),
        _ => "ws_error".into(),
    }
}

/// Client WebSocket settings: small buffers, since the bench holds many idle connections and
/// reads small frames (tungstenite's default read buffer is 128 KiB per connection).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// A non-blocking TCP socket, bound to `source` when given (port chosen at `connect`, so the
/// 4-tuple rather than the source address alone limits how many connections one source makes).
///
/// # Errors
/// Socket creation or bind failed (EMFILE and friends).
pub fn socket(source: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpSocket> {
    let s = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            let one: libc::c_int = 1;
            // SAFETY: a valid socket fd and a c_int option value of the right size.
            // IP_BIND_ADDRESS_NO_PORT is advisory: on failure the bind below still works,
            // only with one reserved port per socket.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(TcpSocket::from_std_stream(s.into()))
}

/// Where to connect and how long the whole opening may take.
pub struct Dial<'a> {
    /// The server under test.
    pub target: &'a dyn Target,
    /// Its client port.
    pub addr: SocketAddr,
    /// Source address of this connection, if any.
    pub source: Option<IpAddr>,
    /// Deadline for TCP connect + upgrade + welcome + subscribe acks.
    pub timeout: Duration,
}

/// Opens connection `conn` receiving `topics`: TCP connect, upgrade, the client's first frame
/// (when the target has one), the welcome frame (when the target sends one) and one acked subscribe per explicit topic.
///
/// # Errors
/// The failure's reason name.
pub async fn open(dial: &Dial<'_>, conn: u64, topics: &[String]) -> Result<Ws, Reason> {
    match tokio::time::timeout(dial.timeout, open_inner(dial, conn, topics)).await {
        Ok(r) => r,
        Err(_) => Err("timeout".into()),
    }
}

async fn open_inner(dial: &Dial<'_>, conn: u64, topics: &[String]) -> Result<Ws, Reason> {
    let target = dial.target;
    let request = target
        .ws_request(conn, topics)
        .map_err(|_| Reason::from("bad_request_setup"))?;
    let sock = socket(dial.source, dial.addr).map_err(|e| io_reason(&e))?;
    let tcp = sock.connect(dial.addr).await.map_err(|e| io_reason(&e))?;
    let (mut ws, _resp) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config()))
            .await
            .map_err(|e| ws_reason(&e))?;
    if let Some(hello) = target.hello() {
        ws.send(Message::text(hello))
            .await
            .map_err(|e| ws_reason(&e))?;
    }
    if target.has_welcome() {
        match next_frame(target, &mut ws).await? {
            Frame::Welcome => {}
            Frame::Error(code) => return Err(format!("error_{code}")),
            _ => return Err("no_welcome".into()),
        }
    }
    let mut id = 0u64;
    for topic in topics {
        let Some(op) = target.subscribe_op(topic, id) else {
            continue;
        };
        ws.send(Message::text(op))
            .await
            .map_err(|e| ws_reason(&e))?;
        loop {
            match next_frame(target, &mut ws).await? {
                Frame::Ack(a) if a == id => break,
                Frame::Error(code) => return Err(format!("subscribe_{code}")),
                _ => continue,
            }
        }
        id += 1;
    }
    Ok(ws)
}

/// The next text frame, classified; pings are answered by tungstenite on the next read.
async fn next_frame(target: &dyn Target, ws: &mut Ws) -> Result<Frame, Reason> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(target.classify(&t)),
            Some(Ok(Message::Close(f))) => {
                return Err(format!(
                    "closed_{}",
                    f.map(|f| u16::from(f.code)).unwrap_or(1005)
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ws_reason(&e)),
            None => return Err("eof".into()),
        }
    }
}

/// Closes politely: sends close 1000 and waits (bounded) for the server's close or EOF.
pub async fn close(mut ws: Ws, wait: Duration) {
    let _ = tokio::time::timeout(wait, async {
        if ws.close(None).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Parses `--source`: `A.B.C.D-A.B.C.E` (an inclusive IPv4 range), or a comma list of
/// addresses and ranges.
///
/// # Errors
/// A malformed address or an inverted range.
pub fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: std::net::Ipv4Addr = a.trim().parse()?;
                let b: std::net::Ipv4Addr = b.trim().parse()?;
                let (a, b) = (u32::from(a), u32::from(b));
                anyhow::ensure!(a <= b, "source range {part} is inverted");
                anyhow::ensure!(b - a < 1 << 16, "source range {part} is too large");
                out.extend((a..=b).map(|x| IpAddr::V4(x.into())));
            }
            None => out.push(part.parse()?),
        }
    }
    anyhow::ensure!(!out.is_empty(), "--source names no address");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        let s = parse_sources("127.0.0.2-127.0.0.4, 127.0.0.9").unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[3], "127.0.0.9".parse::<IpAddr>().unwrap());
        assert!(parse_sources("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_sources("").is_err());
    }

    #[test]
    fn reasons() {
        assert_eq!(
            io_reason(&io::Error::from_raw_os_error(libc::EMFILE)),
            "emfile"
        );
        assert_eq!(
            io_reason(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            "refused"
        );
    }
}
