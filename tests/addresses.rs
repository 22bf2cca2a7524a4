//! Per-address protection: concurrent connections per address (429, and sockets closed unread
//! beyond the ceiling), the pending-handshake cap, and client addresses named by trusted
//! proxies (`X-Forwarded-For`, PROXY protocol v1/v2).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// An upgrade request for user `alice` of `shop`, with `extra` header lines.
fn upgrade(extra: &str) -> String {
    let (jwt, _) = token("shop", "alice");
    format!(
        "GET /ws/shop HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {jwt}\r\n{extra}\r\n"
    )
}

/// Sends `prefix` + an upgrade on `s` and reads the answer's head: the status line and the
/// whole head text. An upgraded socket stays open (the caller holds it).
fn answer(s: &mut TcpStream, prefix: &[u8], extra: &str) -> (u16, String) {
    let mut req = prefix.to_vec();
    req.extend_from_slice(upgrade(extra).as_bytes());
    let _ = s.write_all(&req);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            return (status, head);
        }
        match s.read(&mut chunk) {
            Ok(0) => return (0, String::from_utf8_lossy(&buf).into_owned()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (0, String::new()),
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
}

/// An upgrade from `from`; returns the status and the open socket.
fn upgrade_from(from: &str, addr: SocketAddr, extra: &str) -> (u16, String, TcpStream) {
    let mut s = tcp_from(from, addr);
    let (status, head) = answer(&mut s, b"", extra);
    (status, head, s)
}

/// Whether the server closes `s` without sending a byte.
fn closed_unread(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Ok(n) => panic!(
            "expected a silent close, got {:?}",
            String::from_utf8_lossy(&b[..n])
        ),
        Err(e) => panic!("expected a silent close, got {e}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

/// The `ip` of every connection in the listing.
fn listed_ips(server: &TestServer) -> Vec<String> {
    let r = http_request(server.api, "GET", "/api/v1/connections", ADMIN_KEY, "");
    assert_eq!(r.status, 200, "{}", r.text());
    let mut ips: Vec<String> = r.json()["connections"]
        .as_array()
        .expect("connections array")
        .iter()
        .map(|c| c["ip"].as_str().expect("ip string").to_owned())
        .collect();
    ips.sort();
    ips
}

#[test]
fn connections_per_address_over_the_limit_get_429_and_free_up() {
    let server = TestServer::start(|c| c.limits.connections_per_ip = 2);
    let (a, _, first) = upgrade_from("127.0.0.2", server.listen, "");
    let (b, _, _second) = upgrade_from("127.0.0.2", server.listen, "");
    assert_eq!((a, b), (101, 101));
    let (status, head, _) = upgrade_from("127.0.0.2", server.listen, "");
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("\r\nRetry-After: 5"), "{head}");
    let i = herald::metrics::ShardStats::outcome("rate_limited");
    assert_eq!(server.stat(|s| herald::metrics::read(&s.handshakes[i])), 1);
    // Another address is unaffected.
    assert_eq!(upgrade_from("127.0.0.3", server.listen, "").0, 101);
    // One leaves: its address may connect again.
    drop(first);
    wait_until("the address's count to drop", || {
        server.hub.ip_conns.count(ip("127.0.0.2")) == 1
    });
    assert_eq!(upgrade_from("127.0.0.2", server.listen, "").0, 101);
}

#[test]
fn beyond_the_address_ceiling_sockets_are_closed_unread() {
    let server = TestServer::start(|c| {
        c.limits.connections_per_ip = 1;
        // Ceiling: 1 + 2 sockets from one address.
        c.limits.handshake_burst_per_ip = 2;
    });
    let (status, _, _held) = upgrade_from("127.0.0.2", server.listen, "");
    assert_eq!(status, 101);
    // Two more sockets, request not sent yet: accepted and counted (they will be answered).
    let mut pending: Vec<TcpStream> = (0..2)
        .map(|_| tcp_from("127.0.0.2", server.listen))
        .collect();
    wait_until("the pending sockets to be counted", || {
        server.hub.ip_conns.count(ip("127.0.0.2")) == 3
    });
    let mut over = tcp_from("127.0.0.2", server.listen);
    assert!(closed_unread(&mut over));
    // The accepted ones get their answer: 429.
    for s in &mut pending {
        let (status, head) = answer(s, b"", "");
        assert_eq!(status, 429, "{head}");
    }
    // Other addresses are untouched by the ceiling.
    assert_eq!(upgrade_from("127.0.0.3", server.listen, "").0, 101);
}

#[test]
fn pending_handshake_cap_closes_new_sockets_unread() {
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        c.limits.max_pending_handshakes = 3;
    });
    let mut half_open: Vec<TcpStream> = (0..3).map(|_| tcp(server.listen)).collect();
    let i = herald::metrics::ShardStats::outcome("at_capacity");
    // Until the server has accepted the three, a fourth may still get in: retry until one
    // is refused.
    wait_until("a socket beyond the cap to be closed", || {
        let mut s = tcp(server.listen);
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(s.read(&mut b), Ok(0))
    });
    assert!(server.stat(|s| herald::metrics::read(&s.handshakes[i])) >= 1);
    // The pending ones finish normally, and the slots free up.
    let (status, _) = answer(&mut half_open[0], b"", "");
    assert_eq!(status, 101);
    let (_ws, welcome) = connect_user(server.listen, "shop", "bob");
    assert!(welcome.text.contains(r#""user":"bob""#), "{}", welcome.text);
}

#[test]
fn forwarded_for_names_the_client_only_from_a_trusted_proxy() {
    let server = TestServer::start(|c| {
        c.proxy.trusted = vec!["127.0.0.2".into()];
        c.limits.connections_per_ip = 1;
        c.projects[0].deny_ips = vec!["203.0.113.9".into()];
    });
    let via_proxy = |xff: &str| {
        upgrade_from(
            "127.0.0.2",
            server.listen,
            &format!("X-Forwarded-For: {xff}\r\n"),
        )
    };
    // Through the proxy: the client's address decides.
    let (status, head, _denied) = via_proxy("203.0.113.9");
    assert_eq!(status, 403, "{head}");
    let (status, _, _c1) = via_proxy("6.6.6.6, 198.51.100.1");
    assert_eq!(status, 101);
    // Two clients behind one proxy are two addresses, each with its own limit...
    let (status, _, _c2) = via_proxy("198.51.100.2");
    assert_eq!(status, 101);
    // ...and the same client twice is over its limit of 1.
    assert_eq!(via_proxy("198.51.100.2").0, 429);
    // From an untrusted peer the header is ignored: the peer itself is the client.
    let (status, _, _c3) = upgrade_from(
        "127.0.0.3",
        server.listen,
        "X-Forwarded-For: 203.0.113.9\r\n",
    );
    assert_eq!(status, 101);
    assert_eq!(
        listed_ips(&server),
        ["127.0.0.3", "198.51.100.1", "198.51.100.2"]
    );
    assert_eq!(server.hub.ip_conns.count(ip("127.0.0.2")), 0);
}

#[test]
fn proxy_protocol_names_the_client_from_a_trusted_proxy_only() {
    let server = TestServer::start(|c| {
        c.proxy.trusted = vec!["127.0.0.2".into()];
        c.proxy.proxy_protocol = true;
        c.access.deny = vec!["203.0.113.0/24".into()];
    });
    // v1, in the same segment as the request.
    let mut s1 = tcp_from("127.0.0.2", server.listen);
    let (status, _) = answer(
        &mut s1,
        b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 8080\r\n",
        "",
    );
    assert_eq!(status, 101);
    // v2 (binary), IPv6 client, sent in two writes.
    let v2 = [
        &b"\r\n\r\n\0\r\nQUIT\n"[..],
        &[0x21, 0x21, 0x00, 36],
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        &[0x17, 0x70, 0x1f, 0x90],
    ]
    .concat();
    let mut s2 = tcp_from("127.0.0.2", server.listen);
    s2.write_all(&v2[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (status, _) = answer(&mut s2, &v2[10..], "");
    assert_eq!(status, 101);
    // A denied client named in the header: closed without an answer, like a direct peer.
    let mut s3 = tcp_from("127.0.0.2", server.listen);
    s3.write_all(b"PROXY TCP4 203.0.113.5 10.0.0.1 5000 8080\r\n")
        .unwrap();
    assert!(closed_unread(&mut s3));
    // A trusted proxy that sends no header: 400.
    let mut s4 = tcp_from("127.0.0.2", server.listen);
    assert_eq!(answer(&mut s4, b"", "").0, 400);
    // An untrusted peer may not send one: 400; without one it is served as itself.
    let mut s5 = tcp_from("127.0.0.3", server.listen);
    assert_eq!(
        answer(
            &mut s5,
            b"PROXY TCP4 198.51.100.8 10.0.0.1 5000 8080\r\n",
            ""
        )
        .0,
        400
    );
    let (status, _, _s6) = upgrade_from("127.0.0.3", server.listen, "");
    assert_eq!(status, 101);
    assert_eq!(
        listed_ips(&server),
        ["127.0.0.3", "198.51.100.7", "2001:db8::7"]
    );
}

#[test]
fn forwarded_for_that_names_no_client_is_refused_not_trusted_as_the_proxy() {
    let server = TestServer::start(|c| {
        c.proxy.trusted = vec!["127.0.0.2".into()];
        c.access.deny = vec!["198.51.100.66".into()];
    });
    // A client-written entry with a non-UTF-8 byte does not hide the entry the proxy appended.
    let mut s = tcp_from("127.0.0.2", server.listen);
    let mut req = upgrade("").into_bytes();
    let end = req.len() - 2;
    req.splice(
        end..end,
        b"X-Forwarded-For: \xff\xfe, 198.51.100.66\r\n"
            .iter()
            .copied(),
    );
    let _ = s.write_all(&req);
    let mut got = [0u8; 12];
    s.read_exact(&mut got).expect("an answer");
    assert_eq!(
        &got, b"HTTP/1.1 403",
        "the denied client behind the bad entry is refused"
    );
    // Garbage alone names no client: 400, not the proxy's own address.
    for bad in ["garbage", "", "1.2.3.4, not-an-address"] {
        let mut s = tcp_from("127.0.0.2", server.listen);
        let (status, head) = answer(&mut s, b"", &format!("X-Forwarded-For: {bad}\r\n"));
        assert_eq!(status, 400, "{bad:?}: {head}");
    }
    assert_eq!(server.hub.ip_conns.count(ip("127.0.0.2")), 0);
}
