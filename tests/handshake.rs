//! The upgrade: the three token transports, the welcome frame, every refusal with its exact
//! status and error code, the connection cap and the handshake deadline.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use serde_json::json;

/// The welcome frame, byte for byte, for a token of `exp`.
fn welcome_text(conn: &str, user: &str, exp: u64, heartbeat_secs: u64) -> String {
    format!(
        r#"{{"type":"welcome","conn":"{conn}","project":"shop","user":"{user}","exp":{exp},"heartbeat":{heartbeat_secs}}}"#
    )
}

#[test]
fn bearer_header_transport_gets_the_exact_welcome() {
    let server = TestServer::start(|_| {});
    let (jwt, exp) = token("shop", "alice");
    let (mut ws, resp, w) = connect_via(server.listen, "shop", &jwt, Transport::Header);
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().get("Sec-WebSocket-Protocol").is_none());
    assert_eq!(w.text, welcome_text(&w.conn, "alice", exp, 25));
    // The connection works after the welcome.
    assert_eq!(
        request(&mut ws, r#"{"op":"ping","id":1}"#),
        json!({"type":"pong","id":1})
    );
}

#[test]
fn query_transport() {
    let server = TestServer::start(|_| {});
    let (jwt, exp) = token("shop", "alice");
    let (_ws, resp, w) = connect_via(server.listen, "shop", &jwt, Transport::Query);
    assert_eq!(resp.status(), 101);
    assert_eq!(w.text, welcome_text(&w.conn, "alice", exp, 25));
}

#[test]
fn subprotocol_transport_answers_herald_v1_without_the_token() {
    let server = TestServer::start(|_| {});
    let (jwt, exp) = token("shop", "bob");
    let (_ws, resp, w) = connect_via(server.listen, "shop", &jwt, Transport::Subprotocol);
    assert_eq!(resp.status(), 101);
    let protos: Vec<_> = resp
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(protos, ["herald.v1"]);
    for (name, value) in resp.headers() {
        let v = value.to_str().unwrap_or("");
        assert!(
            !v.contains(&jwt) && !v.contains("bearer."),
            "the token is echoed in {name}: {v}"
        );
    }
    assert_eq!(w.text, welcome_text(&w.conn, "bob", exp, 25));
}

#[test]
fn welcome_reports_the_heartbeat_in_whole_seconds() {
    let server = TestServer::start(|c| c.ws.heartbeat_interval_ms = 1500);
    let (jwt, exp) = token("shop", "alice");
    let (_ws, w) = connect(server.listen, "shop", &jwt);
    assert_eq!(w.text, welcome_text(&w.conn, "alice", exp, 2));
}

#[test]
fn malformed_upgrades_are_400_bad_request() {
    let server = TestServer::start(|_| {});
    let (jwt, _) = token("shop", "alice");
    let auth = format!("Authorization: Bearer {jwt}\r\n");

    let plain = format!("GET /ws/shop HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
    assert_refusal(&http(server.listen, plain.as_bytes()), 400, "bad_request");

    let bad_key = upgrade_request("/ws/shop", &auth).replace(WS_KEY, "c2hvcnQ=");
    assert_refusal(&http(server.listen, bad_key.as_bytes()), 400, "bad_request");

    let no_key =
        upgrade_request("/ws/shop", &auth).replace(&format!("Sec-WebSocket-Key: {WS_KEY}\r\n"), "");
    assert_refusal(&http(server.listen, no_key.as_bytes()), 400, "bad_request");

    let old_version = upgrade_request("/ws/shop", &auth)
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let r = http(server.listen, old_version.as_bytes());
    assert_refusal(&r, 400, "bad_request");
    // RFC 6455 §4.4: a version refusal names the version the server speaks.
    assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"));

    let post = upgrade_request("/ws/shop", &auth).replacen("GET", "POST", 1);
    assert_refusal(&http(server.listen, post.as_bytes()), 400, "bad_request");
}

#[test]
fn bad_tokens_are_401_unauthorized() {
    let server = TestServer::start(|_| {});
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = now_secs() + 3600;
    let alg_none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        b64.encode(json!({"sub": "alice", "exp": exp}).to_string())
    );
    let cases = [
        ("missing", String::new()),
        (
            "malformed",
            "Authorization: Bearer not-a-jwt\r\n".to_owned(),
        ),
        (
            "bad signature",
            format!(
                "Authorization: Bearer {}\r\n",
                mint_with(
                    "another-secret-0123456789abcdef",
                    &json!({"sub": "alice", "exp": exp})
                )
            ),
        ),
        (
            "expired (past exp + leeway)",
            format!(
                "Authorization: Bearer {}\r\n",
                mint("shop", &json!({"sub": "alice", "exp": now_secs() - 3600}))
            ),
        ),
        (
            "no exp",
            format!(
                "Authorization: Bearer {}\r\n",
                mint("shop", &json!({"sub": "alice"}))
            ),
        ),
        (
            "no sub",
            format!(
                "Authorization: Bearer {}\r\n",
                mint("shop", &json!({"exp": exp}))
            ),
        ),
        (
            "not yet valid",
            format!(
                "Authorization: Bearer {}\r\n",
                mint(
                    "shop",
                    &json!({"sub": "alice", "exp": exp, "nbf": now_secs() + 600})
                )
            ),
        ),
        (
            "token of another project",
            format!("Authorization: Bearer {}\r\n", token("blog", "alice").0),
        ),
        ("alg none", format!("Authorization: Bearer {alg_none}\r\n")),
        ("alg none in the query", String::new()),
    ];
    for (what, header) in &cases {
        let path = if *what == "alg none in the query" {
            format!("/ws/shop?token={alg_none}")
        } else {
            "/ws/shop".to_owned()
        };
        let r = http(server.listen, upgrade_request(&path, header).as_bytes());
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_refusal(&r, 401, "unauthorized");
    }
    // The refusals did not leave connections behind.
    assert_eq!(server.nr_connections(), 0);
}

#[test]
fn unknown_project_is_404() {
    let server = TestServer::start(|_| {});
    let (jwt, _) = token("shop", "alice");
    let r = http(
        server.listen,
        upgrade_request("/ws/nope", &format!("Authorization: Bearer {jwt}\r\n")).as_bytes(),
    );
    assert_refusal(&r, 404, "unknown_project");
}

#[test]
fn server_cap_is_503_at_capacity_and_frees_on_close() {
    let server = TestServer::start(|c| c.server.max_connections = 2);
    let (a, _) = connect_user(server.listen, "shop", "alice");
    let (_b, _) = connect_user(server.listen, "blog", "bob");
    let (jwt, _) = token("shop", "carol");
    let third = upgrade_request("/ws/shop", &format!("Authorization: Bearer {jwt}\r\n"));
    let r = http(server.listen, third.as_bytes());
    assert_refusal(&r, 503, "at_capacity");
    let retry: u64 = r
        .header("Retry-After")
        .expect("Retry-After on 503")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry > 0);
    assert_eq!(server.nr_connections(), 2);
    // Closing one frees its place.
    close(a);
    server.wait_connections(1);
    let (_c, w) = connect(server.listen, "shop", &jwt);
    assert!(w.text.contains(r#""user":"carol""#), "{}", w.text);
}

#[test]
fn handshake_deadline_drops_slow_and_silent_sockets() {
    let server = TestServer::start(|c| c.ws.handshake_timeout_ms = 300);
    // Half a request, then nothing.
    let mut half = RawClient::connect(server.listen);
    half.send(b"GET /ws/shop HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n");
    // Nothing at all.
    let mut silent = RawClient::connect(server.listen);
    for c in [&mut half, &mut silent] {
        let waited = c.expect_eof();
        assert!(
            waited < Duration::from_secs(3),
            "closed only after {waited:?}"
        );
    }
    // A prompt client is unaffected by the short deadline.
    let (_ws, _) = connect_user(server.listen, "shop", "alice");
}

/// A `sub` that could not be addressed as `user.<sub>` (empty, over 256 bytes, a control
/// character) and an `iat` later than now plus the leeway are refused with 401 and a reason.
#[test]
fn unaddressable_sub_and_future_iat_are_401() {
    let server = TestServer::start(|_| {});
    let exp = now_secs() + 3600;
    let long = "x".repeat(257);
    let cases = [
        (
            json!({"sub": "", "exp": exp}),
            "claim `sub` must be 1 to 256 bytes of UTF-8",
        ),
        (
            json!({"sub": long, "exp": exp}),
            "claim `sub` must be 1 to 256 bytes of UTF-8",
        ),
        (
            json!({"sub": "a\u{7}b", "exp": exp}),
            "claim `sub` control character '\\u{7}' is not allowed",
        ),
        (
            json!({"sub": "alice", "exp": exp, "iat": now_secs() + 600}),
            "token issued in the future (iat)",
        ),
    ];
    for (claims, message) in &cases {
        let header = format!("Authorization: Bearer {}\r\n", mint("shop", claims));
        let r = http(
            server.listen,
            upgrade_request("/ws/shop", &header).as_bytes(),
        );
        assert_refusal(&r, 401, "unauthorized");
        assert_eq!(r.json()["message"], *message, "{claims}");
    }
    // Within the leeway (30 s) an iat ahead of the clock is fine.
    let t = mint(
        "shop",
        &json!({"sub": "alice", "exp": exp, "iat": now_secs() + 10}),
    );
    let (ws, w) = connect(server.listen, "shop", &t);
    assert!(w.text.contains(r#""user":"alice""#), "{}", w.text);
    close(ws);
}

/// Two tokens are ambiguous (which one wins differed by transport): two Authorization
/// headers, two `token` parameters (also when one key is percent-encoded), two `bearer.`
/// subprotocols, or tokens in two places are refused with 400 before any token is read.
#[test]
fn several_tokens_are_400() {
    let server = TestServer::start(|_| {});
    let (a, _) = token("shop", "alice");
    let (b, _) = token("shop", "bob");
    let cases = [
        (
            "/ws/shop".to_owned(),
            format!("Authorization: Bearer {a}\r\nAuthorization: Bearer {b}\r\n"),
        ),
        (format!("/ws/shop?token={a}&token={b}"), String::new()),
        (format!("/ws/shop?token={a}&%74oken={b}"), String::new()),
        (format!("/ws/shop?token={a}&token={a}"), String::new()),
        (
            "/ws/shop".to_owned(),
            format!("Sec-WebSocket-Protocol: herald.v1, bearer.{a}, bearer.{b}\r\n"),
        ),
        (
            format!("/ws/shop?token={a}"),
            format!("Authorization: Bearer {a}\r\n"),
        ),
    ];
    for (path, headers) in &cases {
        let r = http(server.listen, upgrade_request(path, headers).as_bytes());
        assert_refusal(&r, 400, "bad_request");
        let m = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            m.contains("send exactly one") || m.contains("send it in exactly one"),
            "{m}"
        );
    }
    assert_eq!(server.nr_connections(), 0);
}
