//! What a publish answer promises: a publish answered 200 is delivered, one that could never be
//! delivered is refused 413 before anything is sent, a refused publish or batch sent nothing
//! to any shard, a retry under the same `Idempotency-Key` publishes once, and a publish is
//! answered once the shards' inboxes are shallow again.

mod common;

use std::net::SocketAddr;

use common::*;

/// `POST path` with the project's API key, extra header lines and a body.
fn post(api: SocketAddr, path: &str, headers: &str, body: &str) -> HttpResponse {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {SHOP_API_KEY}\r\n\
         {headers}Content-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    http(api, req.as_bytes())
}

fn body_to(topic: &str, data: &str) -> String {
    format!(r#"{{"project":"shop","topic":"{topic}","data":{data}}}"#)
}

/// Subscribers of `shop` (so of `all`) on every one of the server's two shards.
fn subscribers_on_both_shards(server: &TestServer) -> Vec<Client> {
    let subs = connect_spread(server.listen, "shop", "u", 1);
    server.wait_connections(subs.len());
    subs.into_iter().map(|(c, _)| c).collect()
}

/// The data of the next message each subscriber receives.
fn next_data(subs: &mut [Client]) -> Vec<String> {
    subs.iter_mut()
        .map(|ws| split_message(&recv_text(ws)).1)
        .collect()
}

#[test]
fn a_publish_of_the_largest_body_reaches_every_subscriber_of_all() {
    // The default limits: a body of api.max_body_bytes fits a connection's outbound queue.
    let server = TestServer::start(|_| {});
    let mut subs = subscribers_on_both_shards(&server);
    let max_body = herald::config::Config::default().api.max_body_bytes;
    let envelope = body_to("all", r#""""#).len();
    let data = format!(r#""{}""#, "x".repeat(max_body - envelope));
    let body = body_to("all", &data);
    assert_eq!(body.len(), max_body);
    let r = post(server.api, "/api/v1/publish", "", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    for ws in &mut subs {
        let (topic, got, got_id, _) = split_message(&recv_text(ws));
        assert_eq!((topic.as_str(), got_id.as_str()), ("all", id.as_str()));
        assert!(got == data, "data byte for byte");
    }
    assert_eq!(server.slow_consumer_closes(), 0);
}

#[test]
fn a_publish_no_connection_queue_could_hold_is_refused_413_and_sends_nothing() {
    const QUEUE_CAP: usize = 64 * 1024;
    let server = TestServer::start(|c| c.ws.max_outbound_queue_bytes = QUEUE_CAP);
    let mut subs = subscribers_on_both_shards(&server);
    let big = format!(r#""{}""#, "x".repeat(QUEUE_CAP));
    let r = post(server.api, "/api/v1/publish", "", &body_to("all", &big));
    assert_refusal(&r, 413, "message_too_large");
    let batch = format!("[{},{}]", body_to("all", "1"), body_to("all", &big));
    let r = post(server.api, "/api/v1/publish/batch", "", &batch);
    assert_refusal(&r, 413, "message_too_large");
    assert!(r.json()["message"].as_str().unwrap().starts_with("item 1:"));
    server.publish("shop", "all", r#""after""#);
    assert_eq!(next_data(&mut subs), vec![r#""after""#; subs.len()]);
    assert_eq!(server.slow_consumer_closes(), 0);
}

#[test]
fn a_publish_or_batch_that_a_full_inbox_refuses_reaches_no_shard() {
    let server = TestServer::start(|_| {});
    let mut subs = subscribers_on_both_shards(&server);
    // Shard 1's inbox has no room left.
    let inbox = &server.hub.mailboxes[1];
    let held = loop {
        // The whole inbox at once: this succeeds only once the shard has taken every
        // message, so nothing it takes afterwards can free room.
        if let Ok(r) = inbox.try_reserve(inbox.capacity(), 0) {
            break r;
        }
    };
    let r = post(server.api, "/api/v1/publish", "", &body_to("all", "1"));
    assert_refusal(&r, 503, "busy");
    assert_eq!(r.header("Retry-After"), Some("1"));
    let batch = format!("[{},{}]", body_to("all", "2"), body_to("all", "3"));
    let r = post(server.api, "/api/v1/publish/batch", "", &batch);
    assert_refusal(&r, 503, "busy");
    drop(held);
    server.publish("shop", "all", r#""after""#);
    assert_eq!(
        next_data(&mut subs),
        vec![r#""after""#; subs.len()],
        "nothing refused reached shard 0"
    );
}

#[test]
fn a_retry_with_the_same_idempotency_key_answers_the_same_ids_and_publishes_once() {
    let server = TestServer::start(|_| {});
    let mut subs = subscribers_on_both_shards(&server);
    let key = "Idempotency-Key: order-42\r\n";
    let first = post(server.api, "/api/v1/publish", key, &body_to("all", "1"));
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("Idempotency-Replayed"), None);
    let retry = post(server.api, "/api/v1/publish", key, &body_to("all", "1"));
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.header("Idempotency-Replayed"), Some("true"));
    assert_eq!(retry.body, first.body, "the same id");
    // The same key with another body is a mistake, not a retry.
    let r = post(server.api, "/api/v1/publish", key, &body_to("all", "2"));
    assert_refusal(&r, 422, "idempotency_key_reused");
    // Another project's key has its own keys.
    let body = body_to("all", "1").replace("shop", "blog");
    let req = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BLOG_API_KEY}\r\n\
         {key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(http(server.api, req.as_bytes()).status, 200);

    // A batch under a key: its retry answers the same ids.
    let batch = format!("[{},{}]", body_to("all", "3"), body_to("all", "4"));
    let b1 = post(server.api, "/api/v1/publish/batch", key, &batch);
    assert_eq!(b1.status, 200, "{}", b1.text());
    let b2 = post(server.api, "/api/v1/publish/batch", key, &batch);
    assert_eq!((b2.status, &b2.body), (200, &b1.body));

    // A refused publish is not remembered: its retry publishes.
    let inbox = &server.hub.mailboxes[0];
    let held = loop {
        // The whole inbox at once: this succeeds only once the shard has taken every
        // message, so nothing it takes afterwards can free room.
        if let Ok(r) = inbox.try_reserve(inbox.capacity(), 0) {
            break r;
        }
    };
    let key5 = "Idempotency-Key: order-43\r\n";
    let r = post(server.api, "/api/v1/publish", key5, &body_to("all", "5"));
    assert_refusal(&r, 503, "busy");
    drop(held);
    let r = post(server.api, "/api/v1/publish", key5, &body_to("all", "5"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Idempotency-Replayed"), None);

    server.publish("shop", "all", r#""end""#);
    for ws in &mut subs {
        let got: Vec<String> = (0..5).map(|_| split_message(&recv_text(ws)).1).collect();
        assert_eq!(got, ["1", "3", "4", "5", r#""end""#], "each publish once");
    }

    for bad in ["Idempotency-Key: \r\n", "Idempotency-Key: a b\r\n"] {
        let r = post(server.api, "/api/v1/publish", bad, &body_to("all", "6"));
        assert_refusal(&r, 400, "bad_request");
    }
    let two = "Idempotency-Key: a\r\nIdempotency-Key: b\r\n";
    let r = post(server.api, "/api/v1/publish", two, &body_to("all", "6"));
    assert_refusal(&r, 400, "bad_request");
}

#[test]
fn a_publish_is_answered_once_every_shard_inbox_is_shallow_again() {
    let server = TestServer::start(|_| {});
    let mut subs = subscribers_on_both_shards(&server);
    // Shard 1's inbox as deep as the shard still working through that many publishes.
    let deep = herald::shard::mailbox::SHALLOW_DEPTH + 1;
    let held = server.hub.mailboxes[1].try_reserve(deep, 0).unwrap();
    std::thread::scope(|t| {
        let publish = t.spawn(|| post(server.api, "/api/v1/publish", "", &body_to("all", "1")));
        // Delivered at once (it is queued), answered only once the inbox is shallow.
        assert_eq!(next_data(&mut subs), vec!["1"; subs.len()]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !publish.is_finished(),
            "answered while shard 1's inbox was deep"
        );
        drop(held);
        let r = publish.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    });
    // A shallow inbox holds nothing back.
    let r = post(server.api, "/api/v1/publish", "", &body_to("all", "2"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(next_data(&mut subs), vec!["2"; subs.len()]);
}
