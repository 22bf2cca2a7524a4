//! Protection: IP allow/deny lists (global, checked at accept; per project, 403 at the
//! handshake), handshake and message rates, API requests per key.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use common::*;

/// An upgrade request for `project` with a fresh token.
fn upgrade_request(project: &str) -> String {
    let (jwt, _) = token(project, "alice");
    format!(
        "GET /ws/{project} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {jwt}\r\n\r\n"
    )
}

/// Sends an upgrade from `from` and returns everything the server sent until it closed.
fn exchange(from: &str, addr: SocketAddr, project: &str) -> Vec<u8> {
    let mut s = tcp_from(from, addr);
    // The write may fail if the server closed first; what matters is what comes back.
    let _ = s.write_all(upgrade_request(project).as_bytes());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.starts_with(b"HTTP/1.1 101") {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    buf
}

fn forbidden_count(server: &TestServer) -> u64 {
    let i = herald::ws::handshake::HandshakeOutcome::Forbidden.index();
    server.stat(|s| herald::metrics::read(&s.handshakes[i]))
}

/// A connection from 127.0.0.1 works.
fn works_from_localhost(server: &TestServer) {
    let (mut ws, _) = connect_user(server.listen, "shop", "bob");
    assert_eq!(
        request(&mut ws, r#"{"op":"ping","id":1}"#),
        serde_json::json!({"type":"pong","id":1})
    );
}

#[test]
fn global_deny_closes_the_socket_without_an_answer() {
    let server = TestServer::start(|c| c.access.deny = vec!["127.0.0.2/32".into()]);
    let answer = exchange("127.0.0.2", server.listen, "shop");
    assert!(
        answer.is_empty(),
        "a denied peer got an answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(forbidden_count(&server), 1);
    works_from_localhost(&server);
    // 127.0.0.3 is not in the deny list.
    assert!(exchange("127.0.0.3", server.listen, "shop").starts_with(b"HTTP/1.1 101"));
}

#[test]
fn global_allow_admits_only_its_networks() {
    let server = TestServer::start(|c| c.access.allow = vec!["127.0.0.3/32".into()]);
    assert!(exchange("127.0.0.3", server.listen, "shop").starts_with(b"HTTP/1.1 101"));
    assert!(exchange("127.0.0.1", server.listen, "shop").is_empty());
    assert!(exchange("127.0.0.4", server.listen, "shop").is_empty());
    assert_eq!(forbidden_count(&server), 2);
}

#[test]
fn deny_wins_over_allow() {
    let server = TestServer::start(|c| {
        c.access.allow = vec!["127.0.0.0/8".into()];
        c.access.deny = vec!["127.0.0.2".into()];
    });
    assert!(exchange("127.0.0.2", server.listen, "shop").is_empty());
    works_from_localhost(&server);
}

#[test]
fn per_project_deny_is_403_forbidden() {
    let server = TestServer::start(|c| c.projects[0].deny_ips = vec!["127.0.0.2/32".into()]);
    let answer = String::from_utf8(exchange("127.0.0.2", server.listen, "shop")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").expect("head ends") + 4..];
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(v["error"], "forbidden");
    assert_eq!(forbidden_count(&server), 1);
    // The other project and other addresses are not affected.
    assert!(exchange("127.0.0.2", server.listen, "blog").starts_with(b"HTTP/1.1 101"));
    works_from_localhost(&server);
}

#[test]
fn per_project_allow_refuses_other_addresses() {
    let server = TestServer::start(|c| c.projects[0].allow_ips = vec!["127.0.0.5/32".into()]);
    assert!(exchange("127.0.0.5", server.listen, "shop").starts_with(b"HTTP/1.1 101"));
    assert!(exchange("127.0.0.1", server.listen, "shop").starts_with(b"HTTP/1.1 403 "));
}

#[test]
fn global_lists_follow_a_registry_swap_without_dropping_connections() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect_user(server.listen, "shop", "bob");
    // What a SIGHUP reload does: build a new registry from the new config and swap it in.
    let mut cfg = config();
    cfg.access.deny = vec!["127.0.0.1/32".into()];
    let current = server.hub.registry.load_full();
    let next =
        herald::auth::Registry::build(&cfg, &herald::store::State::default(), Some(&current))
            .expect("registry builds");
    server.hub.registry.store(std::sync::Arc::new(next));
    assert!(exchange("127.0.0.1", server.listen, "shop").is_empty());
    // The open connection stays.
    assert_eq!(
        request(&mut ws, r#"{"op":"ping","id":2}"#),
        serde_json::json!({"type":"pong","id":2})
    );
    assert!(exchange("127.0.0.2", server.listen, "shop").starts_with(b"HTTP/1.1 101"));
}

/// The status line and `Retry-After` of the answer to an upgrade from `from`.
fn status_of(from: &str, addr: SocketAddr) -> (String, Option<String>) {
    let answer = String::from_utf8_lossy(&exchange(from, addr, "shop")).into_owned();
    let status = answer.lines().next().unwrap_or("").to_owned();
    let retry = answer
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .map(str::to_owned);
    (status, retry)
}

#[test]
fn handshake_burst_per_address_gets_429_with_retry_after() {
    let server = TestServer::start(|c| {
        // One shard: the per-shard bucket is the whole node's.
        c.server.shards = 1;
        c.limits.handshakes_per_ip_per_sec = 1;
        c.limits.handshake_burst_per_ip = 3;
    });
    for _ in 0..3 {
        assert!(
            status_of("127.0.0.2", server.listen)
                .0
                .starts_with("HTTP/1.1 101")
        );
    }
    let (status, retry) = status_of("127.0.0.2", server.listen);
    assert!(status.starts_with("HTTP/1.1 429 "), "{status}");
    assert_eq!(retry.as_deref(), Some("1"));
    let i = herald::ws::handshake::HandshakeOutcome::RateLimited.index();
    assert_eq!(server.stat(|s| herald::metrics::read(&s.handshakes[i])), 1);
    // Another source address has its own bucket.
    assert!(
        status_of("127.0.0.3", server.listen)
            .0
            .starts_with("HTTP/1.1 101")
    );
}

#[test]
fn message_burst_over_the_limit_closes_4029_and_others_keep_receiving() {
    let server = TestServer::start(|c| {
        // One per second sustained: no refill worth a message during the test.
        c.limits.messages_per_conn_per_sec = 1;
        c.limits.message_burst_per_conn = 20;
    });
    let (mut bystander, _) = connect_user(server.listen, "shop", "bob");
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    for i in 0..30 {
        send_text(&mut ws, &format!(r#"{{"op":"ping","id":{i}}}"#));
    }
    let (texts, code, reason) = read_until_close(&mut ws);
    let expected: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"type":"pong","id":{i}}}"#))
        .collect();
    assert_eq!(texts, expected, "the burst is answered, then the close");
    assert_eq!(
        (code, reason.as_str()),
        (4029, "message rate limit exceeded")
    );
    let i = herald::ws::close::CloseReason::RateLimited.counter_index();
    assert_eq!(server.stat(|s| herald::metrics::read(&s.closes[i])), 1);
    // The bystander on the same server is untouched.
    let id = server.publish("shop", "all", r#"{"n":1}"#);
    let msg: serde_json::Value = serde_json::from_str(&recv_text(&mut bystander)).unwrap();
    assert_eq!(msg["id"], serde_json::Value::String(id));
    assert_eq!(
        request(&mut bystander, r#"{"op":"ping","id":"b"}"#),
        serde_json::json!({"type":"pong","id":"b"})
    );
}

#[test]
fn messages_at_the_sustained_rate_are_never_limited() {
    let server = TestServer::start(|c| {
        c.limits.messages_per_conn_per_sec = 50;
        c.limits.message_burst_per_conn = 2;
    });
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    // 40 requests at ~20/s, well under 50/s, with a burst of only 2: never closed.
    for i in 0..40 {
        assert_eq!(
            request(&mut ws, &format!(r#"{{"op":"ping","id":{i}}}"#)),
            serde_json::json!({"type":"pong","id":i})
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    close(ws);
}

/// `POST /api/v1/publish` of one message to `project` with `key`.
fn publish_as(server: &TestServer, key: &str, project: &str) -> HttpResponse {
    let body = format!(r#"{{"project":"{project}","topic":"news","data":1}}"#);
    publish(server.api, key, &body)
}

#[test]
fn api_requests_over_the_per_key_burst_get_429_with_retry_after() {
    let server = TestServer::start(|c| {
        c.limits.api_requests_per_key_per_sec = 1;
        c.limits.api_burst_per_key = 3;
    });
    // Unauthenticated requests are 401 and take no key's tokens.
    for _ in 0..5 {
        assert_eq!(publish_as(&server, "wrong-key", "shop").status, 401);
    }
    for i in 0..3 {
        let r = publish_as(&server, SHOP_API_KEY, "shop");
        assert_eq!(r.status, 200, "request {i} of the burst: {}", r.text());
    }
    let r = publish_as(&server, SHOP_API_KEY, "shop");
    assert_refusal(&r, 429, "rate_limited");
    let retry: u32 = r
        .header("Retry-After")
        .expect("Retry-After on 429")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(retry > 0, "Retry-After {retry}");
    // Every authenticated endpoint counts against the same bucket.
    let r = http_request(server.api, "GET", "/api/v1/connections", SHOP_API_KEY, "");
    assert_refusal(&r, 429, "rate_limited");
    // Another project's key and the admin key have their own buckets.
    assert_eq!(publish_as(&server, BLOG_API_KEY, "blog").status, 200);
    for i in 0..3 {
        let r = publish_as(&server, ADMIN_KEY, "shop");
        assert_eq!(r.status, 200, "admin request {i}: {}", r.text());
    }
    assert_refusal(&publish_as(&server, ADMIN_KEY, "shop"), 429, "rate_limited");
    // A wrong key is still 401 while shop is limited; health and metrics need no key and are
    // never limited.
    assert_eq!(publish_as(&server, "wrong-key", "shop").status, 401);
    for _ in 0..5 {
        let h = http(
            server.api,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(h.status, 200);
        let m = http(
            server.api,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(m.status, 200);
    }
    // At 1 per second, a token is back after a second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = publish_as(&server, SHOP_API_KEY, "shop");
    assert_eq!(r.status, 200, "after the refill: {}", r.text());
    assert_refusal(
        &publish_as(&server, SHOP_API_KEY, "shop"),
        429,
        "rate_limited",
    );
    // Four refusals in all (shop twice, its listing, the admin key once), in /metrics.
    let m = http_request(server.api, "GET", "/metrics", "", "").text();
    assert!(
        m.lines().any(|l| l == "herald_api_rate_limited_total 4"),
        "{m}"
    );
}

#[test]
fn a_batch_publish_is_one_api_request() {
    let server = TestServer::start(|c| {
        c.limits.api_requests_per_key_per_sec = 1;
        c.limits.api_burst_per_key = 2;
    });
    let item = r#"{"project":"shop","topic":"news","data":1}"#;
    let batch = format!("[{}]", [item; 10].join(","));
    let send = || {
        http_request(
            server.api,
            "POST",
            "/api/v1/publish/batch",
            SHOP_API_KEY,
            &batch,
        )
    };
    for _ in 0..2 {
        let r = send();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["ids"].as_array().map(Vec::len), Some(10));
    }
    let r = send();
    assert_refusal(&r, 429, "rate_limited");
}

#[test]
fn fragments_and_pongs_take_tokens_too() {
    let server = TestServer::start(|c| {
        c.limits.messages_per_conn_per_sec = 1;
        c.limits.message_burst_per_conn = 5;
    });
    let mask = Some([1, 2, 3, 4]);
    // A message that never ends: empty continuation frames at line rate.
    let (mut raw, _) = RawClient::upgrade(server.listen, "shop", &token("shop", "alice").0);
    raw.send(&encode_frame(false, 0, 1, b"{", mask));
    for _ in 0..10 {
        raw.try_send(&encode_frame(false, 0, 0, b"", mask));
    }
    assert_eq!(raw.expect_close().0, 4029);
    // Unsolicited pongs.
    let (mut raw, _) = RawClient::upgrade(server.listen, "shop", &token("shop", "bob").0);
    for _ in 0..10 {
        raw.try_send(&masked(0xA, b""));
    }
    assert_eq!(raw.expect_close().0, 4029);
}
