//! Unicast addressing: every `sub` the handshake accepts is reachable as `user.<sub>`, byte
//! for byte (a publish delivers the exact frame, the topic JSON-escaped), can be listed with
//! `?user=` and disconnected by user with 4003, whatever characters it holds.

mod common;

use common::*;
use serde_json::json;

/// Subjects real identity providers hand out, and a few harder ones.
fn subjects() -> Vec<String> {
    [
        "auth0|5f1c2a9e8b7d6c5e4f3a2b1c",
        "alice@example.com",
        "José Ñandú",
        "直美",
        "a/b.c d",
        r#"quote"and\back"#,
        "*",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(["é".repeat(128)]) // 256 bytes, the longest accepted
    .collect()
}

/// `GET /api/v1/connections?project=shop&user=<user>` (percent-encoded).
fn list_user(server: &TestServer, user: &str) -> HttpResponse {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("project", "shop")
        .append_pair("user", user)
        .finish();
    let path = format!("/api/v1/connections?{query}");
    http_request(server.api, "GET", &path, SHOP_API_KEY, "")
}

/// `POST /api/v1/disconnect {"project":"shop","user":<user>}`.
fn disconnect_user(server: &TestServer, user: &str) -> HttpResponse {
    let body = json!({"project": "shop", "user": user}).to_string();
    http_request(
        server.api,
        "POST",
        "/api/v1/disconnect",
        SHOP_API_KEY,
        &body,
    )
}

#[test]
fn every_accepted_sub_is_reachable_and_can_be_disconnected() {
    let server = TestServer::start(|_| {});
    let subs = subjects();
    let mut clients: Vec<_> = subs
        .iter()
        .map(|s| connect_user(server.listen, "shop", s).0)
        .collect();
    let (mut bystander, _) = connect_user(server.listen, "shop", "bystander");
    server.wait_connections(subs.len() + 1);

    for (i, (sub, ws)) in subs.iter().zip(clients.iter_mut()).enumerate() {
        let topic = format!("user.{sub}");
        let body = json!({"project": "shop", "topic": topic, "data": {"n": i}}).to_string();
        let after = now_ms();
        let r = publish(server.api, SHOP_API_KEY, &body);
        assert_eq!(r.status, 200, "{sub}: {}", r.text());
        let id = r.json()["id"].as_str().expect("id").to_owned();
        let text = recv_text(ws);
        let v: serde_json::Value = serde_json::from_str(&text).expect("a valid JSON frame");
        let ts = v["ts"].as_u64().expect("ts");
        assert!(ts >= after && ts <= now_ms(), "{sub}: ts {ts}");
        let exact = format!(
            r#"{{"type":"message","topic":{},"data":{{"n":{i}}},"id":"{id}","ts":{ts}}}"#,
            serde_json::to_string(&topic).expect("string")
        );
        assert_eq!(text, exact, "{sub}");

        let r = list_user(&server, sub);
        assert_eq!(r.status, 200, "{sub}: {}", r.text());
        let listed = r.json()["connections"].as_array().expect("array").clone();
        assert_eq!(listed.len(), 1, "{sub}: {listed:?}");
        assert_eq!(listed[0]["user"], sub.as_str());
    }
    // Nothing reached anyone else: the bystander's next frame is its own pong.
    assert_eq!(
        request(&mut bystander, r#"{"op":"ping","id":1}"#)["type"],
        "pong"
    );

    for (sub, ws) in subs.iter().zip(clients.iter_mut()) {
        let r = disconnect_user(&server, sub);
        assert_eq!(r.status, 200, "{sub}: {}", r.text());
        assert_eq!(r.json(), json!({ "disconnected": 1 }), "{sub}");
        assert_eq!(expect_close(ws).0, 4003, "{sub}");
    }
    server.wait_connections(1);
}

/// The user-topic rule is the handshake's rule: `user.` followed by what no token may carry
/// (nothing, a control character, more than 256 bytes) is refused with 400, naming the rule.
#[test]
fn user_topics_no_sub_could_have_are_400() {
    let server = TestServer::start(|_| {});
    for (topic, rule) in [
        ("user.".to_owned(), "must be 1 to 256 bytes of UTF-8"),
        ("user.a\nb".to_owned(), "control character"),
        (
            format!("user.{}", "x".repeat(257)),
            "must be 1 to 256 bytes of UTF-8",
        ),
    ] {
        let body = json!({"project": "shop", "topic": topic, "data": 1}).to_string();
        let r = publish(server.api, SHOP_API_KEY, &body);
        assert_refusal(&r, 400, "bad_request");
        let m = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(m.contains(rule), "{topic:?}: {m}");
        // The same user named to disconnect or list is refused the same way.
        let user = &topic["user.".len()..];
        assert_refusal(&disconnect_user(&server, user), 400, "bad_request");
        let r = list_user(&server, user);
        assert_refusal(&r, 400, "bad_request");
        let m = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(m.contains(rule), "{topic:?}: {m}");
    }
}
