//! Per-address protection: concurrent connections per address (429, and sockets closed unread
//! beyond the ceiling), handshakes in progress per address and per node (the oldest evicted at
//! the cap), handshake tokens taken at accept, and client addresses named by trusted proxies
//! (`X-Forwarded-For`, PROXY protocol v1/v2).

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

/// `n` sockets from `from` that send nothing.
fn idle_sockets(n: usize, from: &str, addr: SocketAddr) -> Vec<TcpStream> {
    (0..n).map(|_| tcp_from(from, addr)).collect()
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
    let i = herald::ws::handshake::HandshakeOutcome::RateLimited.index();
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
    let mut pending = idle_sockets(2, "127.0.0.2", server.listen);
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
fn at_the_pending_cap_the_oldest_handshake_is_evicted_for_the_newcomer() {
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        c.limits.max_pending_handshakes = 3;
    });
    // Three idle sockets, oldest first, each from its own address.
    let mut idle: Vec<TcpStream> = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        idle.push(tcp_from(from, server.listen));
        wait_until("the socket to be accepted", || {
            server.stat(|s| herald::metrics::read(&s.sweeps)) > 0
                && server.hub.stats[0]
                    .pending_handshakes
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == idle.len() as u64
        });
    }
    // A newcomer at the cap is served: the oldest handshake makes room.
    let (_ws, welcome) = connect_user(server.listen, "shop", "bob");
    assert!(welcome.text.contains(r#""user":"bob""#), "{}", welcome.text);
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed_unread(&mut idle[0]), "the oldest is closed unread");
    let evicted = herald::ws::handshake::HandshakeOutcome::Evicted.index();
    assert_eq!(
        server.stat(|s| herald::metrics::read(&s.handshakes[evicted])),
        1
    );
    // The younger ones are still served.
    for s in &mut idle[1..] {
        assert_eq!(answer(s, b"", "").0, 101);
    }
}

#[test]
fn pending_handshakes_per_address_are_bounded_at_accept() {
    let server = TestServer::start(|c| c.limits.max_pending_handshakes_per_ip = 2);
    let mut idle = idle_sockets(2, "127.0.0.2", server.listen);
    wait_until("the idle sockets to be counted", || {
        server.hub.ip_conns.pending(ip("127.0.0.2")) == 2
    });
    // A third from the address is closed unread; another address is untouched.
    let mut third = tcp_from("127.0.0.2", server.listen);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed_unread(&mut third));
    let limited = herald::ws::handshake::HandshakeOutcome::RateLimited.index();
    assert_eq!(
        server.stat(|s| herald::metrics::read(&s.handshakes[limited])),
        1
    );
    assert_eq!(upgrade_from("127.0.0.3", server.listen, "").0, 101);
    // A finished handshake frees its place: the address may start another.
    assert_eq!(answer(&mut idle[0], b"", "").0, 101);
    wait_until("the finished handshake to be uncounted", || {
        server.hub.ip_conns.pending(ip("127.0.0.2")) == 1
    });
    assert_eq!(upgrade_from("127.0.0.2", server.listen, "").0, 101);
    drop(idle);
    wait_until("the address's entry to go", || {
        server.hub.ip_conns.pending(ip("127.0.0.2")) == 0
    });
}

/// Sends `request` from `from` on a fresh socket and reads the answer's head.
fn send_from(from: &str, addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = tcp_from(from, addr);
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head)
}

/// Rate 1/s, burst 2, one shard: one bucket per address, and a time bound on what refills.
fn slow_bucket(c: &mut herald::config::Config) {
    c.server.shards = 1;
    c.limits.handshakes_per_ip_per_sec = 1;
    c.limits.handshake_burst_per_ip = 2;
}

#[test]
fn sockets_that_send_nothing_still_take_a_handshake_token() {
    let server = TestServer::start(slow_bucket);
    let t0 = std::time::Instant::now();
    // Two idle sockets take the address's whole burst at accept.
    let _idle = idle_sockets(2, "127.0.0.2", server.listen);
    let mut served = 0;
    for _ in 0..3 {
        let (status, head, _s) = upgrade_from("127.0.0.2", server.listen, "");
        match status {
            101 => served += 1,
            429 => assert!(head.contains("\r\nRetry-After: "), "{head}"),
            _ => panic!("{head}"),
        }
    }
    // Only what refilled since the idle sockets came (1 a second) can have been served.
    let refilled = t0.elapsed().as_secs();
    assert!(served <= refilled, "{served} served after {refilled} s");
    // Another address has its own bucket.
    assert_eq!(upgrade_from("127.0.0.3", server.listen, "").0, 101);
}

#[test]
fn malformed_requests_count_against_the_address() {
    let server = TestServer::start(slow_bucket);
    let t0 = std::time::Instant::now();
    let garbage = b"\x16\x03\x01garbage\r\n\r\n";
    let statuses: Vec<u16> = (0..6)
        .map(|_| send_from("127.0.0.2", server.listen, garbage).0)
        .collect();
    let (status, head, _s) = upgrade_from("127.0.0.2", server.listen, "");
    let refilled = t0.elapsed().as_secs() as usize;
    let bad = statuses.iter().filter(|s| **s == 400).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(bad + limited, 6, "{statuses:?}");
    // The burst of 2, then only what refilled: garbage is rate limited like an upgrade...
    assert!(
        (2..=2 + refilled).contains(&bad),
        "{statuses:?} after {refilled} s"
    );
    assert_eq!(&statuses[..2], [400, 400]);
    // ...and it used up the tokens a valid upgrade would have needed.
    if refilled == 0 {
        assert_eq!(status, 429, "{head}");
    }
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
