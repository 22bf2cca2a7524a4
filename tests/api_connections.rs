//! The API port under hostile connections: heads trickled or never sent, bodies announced
//! and never sent, a flood of idle connections at `api.max_connections`, and requests hyper
//! cannot parse, each answered or closed as documented.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Reads until the server closes the connection; panics if it stays open past [`TIMEOUT`].
/// Returns what was read.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server kept the connection open: {e}"),
        }
    }
}

/// One keep-alive `GET /healthz` on an open connection; returns the answer's status line.
fn healthz_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(r#"{"status":"ok"}"#) {
        let n = s.read(&mut buf).expect("healthz answer");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `n` connections, each answered one `/healthz` and kept open (idle).
fn served_connections(api: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = tcp(api);
            assert_eq!(healthz_on(&mut s), "HTTP/1.1 200 OK");
            s
        })
        .collect()
}

#[test]
fn a_trickled_head_is_closed_by_the_header_timeout() {
    let server = TestServer::start(|c| c.api.header_read_timeout_ms = 500);
    let mut s = tcp(server.api);
    let writer = s.try_clone().expect("clone");
    let started = Instant::now();
    // One byte every 100 ms: the head would take 30 s to finish.
    let trickle = std::thread::spawn(move || {
        let mut w = writer;
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain([b'a'; 300].iter())
        {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let got = read_to_close(&mut s);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "closed only after the head would have been complete"
    );
    trickle.join().expect("writer");
}

#[test]
fn idle_connections_are_closed() {
    let server = TestServer::start(|c| c.api.header_read_timeout_ms = 500);
    // Never a byte.
    let mut silent = tcp(server.api);
    assert!(read_to_close(&mut silent).is_empty());
    // Idle after a keep-alive answer.
    let mut kept = tcp(server.api);
    assert_eq!(healthz_on(&mut kept), "HTTP/1.1 200 OK");
    let _ = read_to_close(&mut kept);

    // The inactivity deadline applies even when the head timeout is long.
    let server = TestServer::start(|c| {
        c.api.header_read_timeout_ms = 600_000;
        c.api.idle_timeout_ms = 500;
    });
    let mut silent = tcp(server.api);
    assert!(read_to_close(&mut silent).is_empty());
}

#[test]
fn a_body_that_does_not_arrive_is_answered_408() {
    let server = TestServer::start(|c| c.api.body_read_timeout_ms = 500);
    let mut s = tcp(server.api);
    s.write_all(
        format!(
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"project\":"
        )
        .as_bytes(),
    )
    .expect("write");
    let got = read_to_close(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    assert!(
        text.contains("content-type: application/json\r\n"),
        "{text}"
    );
    assert!(text.contains(r#""error":"request_timeout""#), "{text}");
}

#[test]
fn a_large_content_length_is_answered_413_before_the_body() {
    let server = TestServer::start(|c| c.api.body_read_timeout_ms = 600_000);
    for path in ["/api/v1/publish", "/api/v1/projects/shop/keys/big"] {
        let method = if path.ends_with("big") { "PUT" } else { "POST" };
        // The head only: the 413 must not wait for a body.
        let r = http(
            server.api,
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
                 Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_refusal(&r, 413, "payload_too_large");
    }
    // A client that sends its body anyway still reads the answer: the server reads and
    // drops the rest before closing, so no reset destroys the 413.
    for _ in 0..5 {
        let big = format!(
            r#"{{"project":"shop","topic":"t","data":"{}"}}"#,
            "x".repeat(3 << 20)
        );
        let r = http_request(server.api, "POST", "/api/v1/publish", ADMIN_KEY, &big);
        assert_refusal(&r, 413, "payload_too_large");
    }
}

/// At most `max` API connections, and no timeout closes one during a test.
fn patient_cap(c: &mut herald::config::Config, max: usize) {
    c.api.max_connections = max;
    c.api.header_read_timeout_ms = 600_000;
    c.api.idle_timeout_ms = 600_000;
}

#[test]
fn at_the_connection_cap_the_longest_idle_connection_makes_room() {
    let server = TestServer::start(|c| patient_cap(c, 8));
    // The cap's worth of idle connections, each known to be served (and now idle).
    let mut idle = served_connections(server.api, 8);
    assert_eq!(
        server
            .hub
            .api_connections
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );
    // An operator's health check still gets through, and so does a WebSocket client.
    let r = http(
        server.api,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (ws, _) = connect_user(server.listen, "shop", "alice");
    close(ws);
    // The connection idle the longest was closed to make room; the others still serve.
    assert!(read_to_close(&mut idle[0]).is_empty());
    for s in &mut idle[1..] {
        assert_eq!(healthz_on(s), "HTTP/1.1 200 OK");
    }
}

/// A request hyper refuses before routing, answered like every API error.
fn malformed(api: SocketAddr, request: &[u8], status: u16, code: &str) {
    let r = http(api, request);
    assert_refusal(&r, status, code);
}

#[test]
fn malformed_requests_get_json_errors() {
    let server = TestServer::start(|_| {});
    let api = server.api;
    malformed(
        api,
        b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        400,
        "bad_request",
    );
    malformed(
        api,
        b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
        400,
        "bad_request",
    );
    malformed(
        api,
        b"GET /health\xffz HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request",
    );
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    malformed(api, long.as_bytes(), 414, "uri_too_long");
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    malformed(api, many.as_bytes(), 431, "headers_too_large");
}

#[test]
fn connections_stalling_their_bodies_do_not_hold_the_cap() {
    let server = TestServer::start(|c| {
        c.api.max_connections = 4;
        c.api.body_read_timeout_ms = 600_000;
        c.api.idle_timeout_ms = 600_000;
    });
    // The cap's worth of authenticated requests whose bodies never finish.
    let mut stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = tcp(server.api);
            s.write_all(
                format!(
                    "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
                     {ADMIN_KEY}\r\nContent-Length: 100\r\n\r\n{{"
                )
                .as_bytes(),
            )
            .expect("write");
            s
        })
        .collect();
    wait_until("the stalled requests are admitted", || {
        server
            .hub
            .api_connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 4
    });
    // Health checks on kept-alive connections: each new one finds the cap full.
    let _checks = served_connections(server.api, 3);
    // Three of the stalled connections made room; the fourth still waits for its body.
    let closed = stalled
        .iter_mut()
        .map(closed_by_server)
        .filter(|c| *c)
        .count();
    assert_eq!(closed, 3);
}

/// Whether the server has closed `s` (EOF or reset) within 2 s.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn a_connection_writing_its_answer_is_not_evicted() {
    let server = TestServer::start(|c| {
        patient_cap(c, 4);
        // Enough projects that listing them is an answer the socket buffers cannot hold.
        for i in 0..20_000 {
            c.projects.push(herald::config::ProjectConfig {
                id: format!("tenant{i}-with-a-long-enough-name-to-make-the-list-big"),
                issuer: Some(format!("https://issuer-{i}.example.com/a/long/issuer/path")),
                audience: Some(format!("audience-of-tenant-{i}-0123456789")),
                ..herald::config::ProjectConfig::default()
            });
        }
    });
    // A reader too slow to take the answer: it is written while the connection waits.
    let mut slow = tcp(server.api);
    slow.write_all(
        format!(
            "GET /api/v1/projects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    // The answer is under way once its first bytes come (read a few: the rest stays unread).
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < b"HTTP/1.1 200".len() {
        let n = slow.read(&mut buf[..4]).expect("the answer starts");
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    // Then the cap fills with idle connections, and one more arrives.
    let mut idle = served_connections(server.api, 3);
    let r = http(
        server.api,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The longest idle made room, not the connection inside its answer.
    assert!(read_to_close(&mut idle[0]).is_empty());
    let answer = loop {
        if let Some(r) = parse_http(&got) {
            break r;
        }
        let n = slow.read(&mut buf).expect("the answer goes on");
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    };
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json()["projects"].as_array().map(Vec::len),
        Some(20_002)
    );
    assert!(got.len() > 4 << 20, "the answer is {} bytes", got.len());
}
