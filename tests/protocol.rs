//! The frame layer after a valid upgrade (RFC 6455 violations and their close codes, on raw
//! sockets) and the client ops (replies and the error replies that keep a connection open).

mod common;

use common::*;
use serde_json::{Value, json};

/// A server with a small message cap and a small bad-request budget.
fn server() -> TestServer {
    TestServer::start(|c| {
        c.ws.max_message_bytes = 1024;
        c.ws.max_bad_requests = 3;
    })
}

fn raw(server: &TestServer) -> RawClient {
    RawClient::upgrade(server.listen, "shop", &token("shop", "alice").0).0
}

#[test]
fn violations_close_with_their_codes() {
    let server = server();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked text frame",
            encode_frame(true, 0, op::TEXT, br#"{"op":"ping"}"#, None),
            1002,
        ),
        (
            "invalid UTF-8",
            masked(op::TEXT, &[b'"', 0xff, 0xfe, b'"']),
            1007,
        ),
        (
            "UTF-8 truncated mid-character",
            masked(op::TEXT, "\"é\"".as_bytes().split_at(2).0),
            1007,
        ),
        ("invalid JSON", masked(op::TEXT, b"{\"op\":"), 1007),
        (
            "text over max_message_bytes",
            masked(op::TEXT, &[b' '; 1025]),
            1009,
        ),
        (
            "fragments summing over max_message_bytes",
            [
                encode_frame(false, 0, op::TEXT, &[b' '; 600], Some([1, 2, 3, 4])),
                encode_frame(true, 0, op::CONT, &[b' '; 600], Some([1, 2, 3, 4])),
            ]
            .concat(),
            1009,
        ),
        (
            "continuation without a start",
            masked(op::CONT, b"{}"),
            1002,
        ),
        ("ping over 125 bytes", masked(op::PING, &[b'p'; 126]), 1002),
        (
            "fragmented ping",
            encode_frame(false, 0, op::PING, b"p", Some([1, 2, 3, 4])),
            1002,
        ),
        (
            "RSV1 set",
            encode_frame(true, 0b100, op::TEXT, b"{}", Some([1, 2, 3, 4])),
            1002,
        ),
        (
            "RSV3 set",
            encode_frame(true, 0b001, op::TEXT, b"{}", Some([1, 2, 3, 4])),
            1002,
        ),
        ("reserved opcode 0x3", masked(0x3, b""), 1002),
        ("binary frame", masked(op::BINARY, b"\x00\x01"), 1003),
        (
            "close with a one-byte payload",
            masked(op::CLOSE, &[3]),
            1002,
        ),
        (
            "close with the reserved code 1005",
            masked(op::CLOSE, &1005u16.to_be_bytes()),
            1002,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut c = raw(&server);
        c.send(&bytes);
        let (got, _) = c.expect_close();
        assert_eq!(got, code, "{what}");
        // Answer the close (the server may already have closed the socket after a framing
        // violation, so a failed write is fine); the server then closes the socket.
        c.try_send(&masked(op::CLOSE, &code.to_be_bytes()));
        c.expect_eof();
    }
}

#[test]
fn message_of_exactly_max_message_bytes_is_accepted() {
    let server = server();
    let mut c = raw(&server);
    let head = r#"{"op":"ping","id":""#;
    let pad = "x".repeat(1024 - head.len() - 2);
    let text = format!(r#"{head}{pad}"}}"#);
    assert_eq!(text.len(), 1024);
    c.send(&masked(op::TEXT, text.as_bytes()));
    let f = c.read_frame().expect("reply");
    assert_eq!(f.opcode, op::TEXT);
    assert_eq!(
        String::from_utf8(f.payload).unwrap(),
        format!(r#"{{"type":"pong","id":"{pad}"}}"#)
    );
}

#[test]
fn fragmented_text_is_reassembled_around_a_ping() {
    let server = server();
    let mut c = raw(&server);
    let m = Some([9, 8, 7, 6]);
    c.send(&encode_frame(false, 0, op::TEXT, br#"{"op":"pi"#, m));
    c.send(&masked(op::PING, b"mid"));
    c.send(&encode_frame(false, 0, op::CONT, br#"ng","id""#, m));
    c.send(&encode_frame(true, 0, op::CONT, b":5}", m));
    let pong = c.read_frame().expect("pong frame");
    assert_eq!(
        (pong.fin, pong.opcode, pong.payload.as_slice()),
        (true, op::PONG, &b"mid"[..])
    );
    let reply = c.read_frame().expect("reply");
    assert_eq!((reply.fin, reply.opcode), (true, op::TEXT));
    assert_eq!(reply.payload, br#"{"type":"pong","id":5}"#);
}

#[test]
fn a_frame_arriving_byte_by_byte_is_parsed() {
    let server = server();
    let mut c = raw(&server);
    for b in masked(op::TEXT, br#"{"op":"ping","id":"slow"}"#) {
        c.send(&[b]);
    }
    let reply = c.read_frame().expect("reply");
    assert_eq!(reply.payload, br#"{"type":"pong","id":"slow"}"#);
}

#[test]
fn ping_frame_is_answered_with_the_same_payload() {
    let server = server();
    let mut c = raw(&server);
    c.send(&masked(op::PING, b"hello \x00\xff"));
    let f = c.read_frame().expect("pong");
    assert_eq!(f.rsv, 0);
    assert!(!f.masked);
    assert_eq!(
        (f.fin, f.opcode, f.payload.as_slice()),
        (true, op::PONG, &b"hello \x00\xff"[..])
    );
    // An empty ping too.
    c.send(&masked(op::PING, b""));
    let f = c.read_frame().expect("pong");
    assert_eq!((f.opcode, f.payload.len()), (op::PONG, 0));
}

#[test]
fn client_close_is_echoed_and_the_socket_closed() {
    let server = server();
    let mut c = raw(&server);
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    c.send(&masked(op::CLOSE, &payload));
    assert_eq!(c.expect_close().0, 1000);
    c.expect_eof();
    server.wait_connections(0);
}

#[test]
fn a_close_or_bad_frame_pipelined_behind_the_upgrade_gets_the_101_and_welcome_first() {
    let server = server();
    // A close (echoed 1000), and an unmasked frame (a protocol error, 1002).
    let cases = [
        (masked(op::CLOSE, &1000u16.to_be_bytes()), 1000),
        (encode_frame(true, 0, op::TEXT, b"{}", None), 1002),
    ];
    for (frame, code) in cases {
        let mut c = RawClient::connect(server.listen);
        let mut bytes = upgrade_request(
            "/ws/shop",
            &format!("Authorization: Bearer {}\r\n", token("shop", "alice").0),
        )
        .into_bytes();
        bytes.extend_from_slice(&frame);
        c.send(&bytes);
        let head = c.read_http_head();
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "expected 101, got {head}"
        );
        let f = c.read_frame().expect("welcome frame");
        assert_eq!(f.opcode, op::TEXT);
        let welcome: Value = serde_json::from_slice(&f.payload).expect("JSON welcome");
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(c.expect_close().0, code);
        c.expect_eof();
    }
    server.wait_connections(0);
}

#[test]
fn the_listing_and_unsubscribed_messages_keep_subscription_order_after_an_unsubscribe() {
    let server = TestServer::start(|_| {});
    let exp = now_secs() + 3600;
    let tok = mint("shop", &json!({"sub": "u1", "exp": exp}));
    let (mut ws, _) = connect(server.listen, "shop", &tok);
    for t in ["a", "b", "c", "d"] {
        subscribe(&mut ws, t);
    }
    let r = request(&mut ws, r#"{"op":"unsubscribe","topic":"a","id":"u"}"#);
    assert_eq!(r["type"], "ack", "{r}");
    // The connection listing keeps the order too: implicit topics, then explicit ones.
    let r = http_request(
        server.api,
        "GET",
        "/api/v1/connections?user=u1",
        ADMIN_KEY,
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["connections"][0]["topics"],
        json!(["all", "user.u1", "b", "c", "d"])
    );
    let narrow = mint("shop", &json!({"sub": "u1", "exp": exp, "topics": ["c"]}));
    send_text(
        &mut ws,
        &format!(r#"{{"op":"refresh","token":"{narrow}","id":"r"}}"#),
    );
    let got: Vec<Value> = (0..3).map(|_| recv_json(&mut ws)).collect();
    assert_eq!(
        got,
        [
            json!({"type": "unsubscribed", "topic": "b", "reason": "not_allowed"}),
            json!({"type": "unsubscribed", "topic": "d", "reason": "not_allowed"}),
            json!({"type": "ack", "id": "r", "exp": exp}),
        ]
    );
}

#[test]
fn error_replies_keep_the_connection_open() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    let cases = [
        (r#"{"op":"dance","id":1}"#, json!(1), "bad_request"),
        (r#"{"id":"x"}"#, json!("x"), "bad_request"),
        (r#"{"op":"subscribe","id":2}"#, json!(2), "bad_request"),
        (r#"[1,2,3]"#, Value::Null, "bad_request"),
        (
            r#"{"op":"subscribe","topic":"bad topic!","id":3}"#,
            json!(3),
            "bad_request",
        ),
        (
            r#"{"op":"subscribe","topic":"$sys","id":4}"#,
            json!(4),
            "bad_request",
        ),
        (
            r#"{"op":"subscribe","topic":"user.x","id":5}"#,
            json!(5),
            "forbidden",
        ),
        (
            r#"{"op":"subscribe","topic":"user.alice","id":6}"#,
            json!(6),
            "forbidden",
        ),
        (
            r#"{"op":"subscribe","topic":"device.d1","id":7}"#,
            json!(7),
            "forbidden",
        ),
        (
            r#"{"op":"unsubscribe","topic":"news","id":8}"#,
            json!(8),
            "not_found",
        ),
        (
            r#"{"op":"publish","topic":"news","data":1,"id":9}"#,
            json!(9),
            "forbidden",
        ),
    ];
    for (req, id, code) in cases {
        let reply = request(&mut ws, req);
        let mut keys: Vec<&str> = reply
            .as_object()
            .unwrap_or_else(|| panic!("{reply}"))
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let want: &[&str] = if id.is_null() {
            &["code", "message", "type"]
        } else {
            &["code", "id", "message", "type"]
        };
        assert_eq!(keys, want, "{req} → {reply}");
        assert_eq!(reply["type"], "error", "{req} → {reply}");
        assert_eq!(reply["code"], code, "{req} → {reply}");
        if !id.is_null() {
            assert_eq!(reply["id"], id, "{req} → {reply}");
        }
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        request(&mut ws, r#"{"op":"ping","id":"still-here"}"#),
        json!({"type":"pong","id":"still-here"})
    );
}

#[test]
fn ops_are_answered_with_their_id() {
    let server = TestServer::start(|_| {});
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    send_text(&mut ws, r#"{"op":"ping"}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"pong"}"#);
    send_text(&mut ws, r#"{"op":"ping","id":"a\"b"}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"pong","id":"a\"b"}"#);
    send_text(&mut ws, r#"{"op":"subscribe","topic":"news","id":7}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"ack","id":7}"#);
    // Subscribing twice is harmless and delivers once.
    send_text(&mut ws, r#"{"op":"subscribe","topic":"news","id":8}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"ack","id":8}"#);
    let before = now_ms();
    let id = server.publish("shop", "news", "1");
    expect_message(&mut ws, "news", "1", &id, before);
    send_text(&mut ws, r#"{"op":"unsubscribe","topic":"news","id":9}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"ack","id":9}"#);
    send_text(&mut ws, r#"{"op":"unsubscribe","topic":"news","id":10}"#);
    assert_eq!(recv_json(&mut ws)["code"], "not_found");
    // After the unsubscribe, news no longer arrives: the next frame is the marker on `all`.
    server.publish("shop", "news", "2");
    let marker = server.publish("shop", "all", r#""marker""#);
    let (topic, _, id, _) = split_message(&recv_text(&mut ws));
    assert_eq!((topic.as_str(), id.as_str()), ("all", marker.as_str()));
}

#[test]
fn token_topics_claim_restricts_subscriptions() {
    let server = TestServer::start(|_| {});
    let jwt = mint(
        "shop",
        &json!({"sub": "alice", "exp": now_secs() + 600, "topics": ["news", "chat.*"]}),
    );
    let (mut ws, _) = connect(server.listen, "shop", &jwt);
    for allowed in ["news", "chat.room1", "chat.a.b"] {
        subscribe(&mut ws, allowed);
    }
    for refused in ["sports", "chat", "newsletter", "new", "chatroom"] {
        let reply = request(
            &mut ws,
            &format!(r#"{{"op":"subscribe","topic":"{refused}","id":"{refused}"}}"#),
        );
        assert_eq!(reply["type"], "error", "{refused}: {reply}");
        assert_eq!(reply["code"], "forbidden", "{refused}: {reply}");
        assert_eq!(reply["id"], refused);
    }
    // The implicit subscriptions are not restricted by the claim.
    let before = now_ms();
    let id = server.publish("shop", "user.alice", r#"{"to":"alice"}"#);
    expect_message(&mut ws, "user.alice", r#"{"to":"alice"}"#, &id, before);
    let id = server.publish("shop", "chat.room1", "[1]");
    expect_message(&mut ws, "chat.room1", "[1]", &id, before);
}

#[test]
fn too_many_bad_requests_close_1008() {
    let server = server();
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    for i in 0..3 {
        let reply = request(&mut ws, &format!(r#"{{"op":"nope","id":{i}}}"#));
        assert_eq!(reply["code"], "bad_request", "{reply}");
        assert_eq!(reply["id"], i);
    }
    // Good requests do not count.
    assert_eq!(
        request(&mut ws, r#"{"op":"ping","id":"ok"}"#),
        json!({"type":"pong","id":"ok"})
    );
    send_text(&mut ws, r#"{"op":"nope","id":3}"#);
    let (texts, code, _) = read_until_close(&mut ws);
    assert_eq!(code, 1008);
    assert!(texts.len() <= 1, "{texts:?}");
}
