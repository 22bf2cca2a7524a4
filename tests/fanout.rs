//! Delivery across shards: broadcast, multicast (topics) and unicast reach exactly the
//! connections they should, on every shard, exactly once, in order, byte for byte, and never
//! cross a project boundary.
//!
//! Absence is shown without sleeping: after the publication under test, a marker is published
//! to `all`; a connection that must not have received the publication sees the marker as its
//! next frame (delivery to one connection is in publish order).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::*;
use herald::config::IoDriver;

/// `data` with odd spacing, a `1.50` that a re-serialiser would turn into `1.5`, escapes and
/// non-ASCII: it must arrive byte for byte.
const ODD_DATA: &str =
    "{\"b\": 1,   \"a\":[1.50, -0.0, 1e3] ,\"s\":\"caf\u{e9} \\u00e9 \\\"q\\\"\",\"n\":null }";

/// Connects as `user` repeatedly until the connections cover `nr_shards` distinct shards (or
/// at least `min` connections were made). Bounded: SO_REUSEPORT spreads by a hash of the
/// address pair, so 64 tries cover 4 shards with overwhelming probability.
fn connect_spread(
    addr: SocketAddr,
    project: &str,
    user: &str,
    nr_shards: usize,
    min: usize,
) -> Vec<(Client, Welcome)> {
    let mut conns = Vec::new();
    for _ in 0..64 {
        conns.push(connect_user(addr, project, user));
        if conns.len() >= min && shards_of(&conns).len() >= nr_shards {
            return conns;
        }
    }
    panic!(
        "64 connections landed on shards {:?} only",
        shards_of(&conns)
    );
}

fn shards_of(conns: &[(Client, Welcome)]) -> BTreeSet<u16> {
    conns.iter().map(|(_, w)| w.shard).collect()
}

/// The next frame of every connection is the marker publication on `all`.
fn expect_marker<'a>(conns: impl IntoIterator<Item = &'a mut Client>, marker: &str) {
    for ws in conns {
        let text = recv_text(ws);
        let (topic, data, id, _) = split_message(&text);
        assert_eq!(
            (topic.as_str(), data.as_str(), id.as_str()),
            ("all", "\"marker\"", marker),
            "a connection got something else before the marker: {text}"
        );
    }
}

/// The clients of (client, welcome) pairs.
fn clients(conns: &mut [(Client, Welcome)]) -> impl Iterator<Item = &mut Client> {
    conns.iter_mut().map(|(ws, _)| ws)
}

fn broadcast_scenario(nr_shards: usize, driver: IoDriver) {
    let server = TestServer::with_shards(nr_shards, driver);
    let mut shop = connect_spread(server.listen, "shop", "u", nr_shards, 8);
    let mut blog = connect_spread(server.listen, "blog", "u", 1, 3);
    let seen: BTreeSet<u16> = shards_of(&shop);
    assert_eq!(
        seen,
        (0..nr_shards as u16).collect(),
        "every shard owns some"
    );
    let mut ids: BTreeSet<String> = shop.iter().map(|(_, w)| w.conn.clone()).collect();
    ids.extend(blog.iter().map(|(_, w)| w.conn.clone()));
    assert_eq!(
        ids.len(),
        shop.len() + blog.len(),
        "connection ids are unique"
    );
    server.wait_connections(shop.len() + blog.len());

    let before = now_ms();
    let id = server.publish("shop", "all", ODD_DATA);
    for (ws, _) in shop.iter_mut() {
        expect_message(ws, "all", ODD_DATA, &id, before);
    }
    // Exactly once: the next shop frame is the next publication; blog saw none of shop's.
    let marker = server.publish("shop", "all", "\"marker\"");
    expect_marker(clients(&mut shop), &marker);
    let marker = server.publish("blog", "all", "\"marker\"");
    expect_marker(clients(&mut blog), &marker);
}

#[test]
fn broadcast_two_shards_io_uring() {
    broadcast_scenario(2, IoDriver::Auto);
}

#[test]
fn broadcast_two_shards_epoll() {
    broadcast_scenario(2, IoDriver::Legacy);
}

#[test]
fn broadcast_four_shards() {
    broadcast_scenario(4, IoDriver::Auto);
}

#[test]
fn topic_reaches_only_its_subscribers() {
    let server = TestServer::start(|_| {});
    let mut subs = connect_spread(server.listen, "shop", "s", 2, 3);
    let mut others = connect_spread(server.listen, "shop", "o", 2, 3);
    for ws in clients(&mut subs) {
        subscribe(ws, "news");
    }
    // The same topic name in another project is another topic.
    let (mut blog_news, _) = connect_user(server.listen, "blog", "s");
    subscribe(&mut blog_news, "news");

    let before = now_ms();
    let id = server.publish("shop", "news", r#"{"headline":"x"}"#);
    for ws in clients(&mut subs) {
        expect_message(ws, "news", r#"{"headline":"x"}"#, &id, before);
    }
    let marker = server.publish("shop", "all", "\"marker\"");
    expect_marker(clients(&mut subs), &marker);
    expect_marker(clients(&mut others), &marker);
    let marker = server.publish("blog", "all", "\"marker\"");
    expect_marker([&mut blog_news], &marker);
}

#[test]
fn unicast_reaches_every_connection_of_the_user_on_every_shard() {
    let server = TestServer::start(|_| {});
    let mut alice = connect_spread(server.listen, "shop", "alice", 2, 2);
    assert!(shards_of(&alice).len() == 2, "alice is on both shards");
    let mut bobs = connect_spread(server.listen, "shop", "bob", 2, 2);
    // Another project's alice is another user.
    let mut blog_alice = connect_spread(server.listen, "blog", "alice", 1, 2);
    // A user whose name extends alice's is another user too.
    let mut alice2 = vec![connect_user(server.listen, "shop", "alice2")];

    let before = now_ms();
    let id = server.publish("shop", "user.alice", r#"{"for":"alice"}"#);
    for (ws, _) in alice.iter_mut() {
        expect_message(ws, "user.alice", r#"{"for":"alice"}"#, &id, before);
    }
    let marker = server.publish("shop", "all", "\"marker\"");
    expect_marker(clients(&mut alice), &marker);
    expect_marker(clients(&mut bobs), &marker);
    expect_marker(clients(&mut alice2), &marker);
    let marker = server.publish("blog", "all", "\"marker\"");
    expect_marker(clients(&mut blog_alice), &marker);
}

#[test]
fn device_claim_adds_a_device_topic() {
    let server = TestServer::start(|_| {});
    let jwt = mint(
        "shop",
        &serde_json::json!({"sub": "alice", "exp": now_secs() + 600, "device": "phone-1"}),
    );
    let (mut phone, _) = connect(server.listen, "shop", &jwt);
    let mut laptop = vec![connect_user(server.listen, "shop", "alice")];
    let before = now_ms();
    let id = server.publish("shop", "device.phone-1", "42");
    expect_message(&mut phone, "device.phone-1", "42", &id, before);
    let marker = server.publish("shop", "all", "\"marker\"");
    expect_marker(clients(&mut laptop), &marker);
}

#[test]
fn publish_to_two_topics_reaches_a_subscriber_of_both_twice() {
    let server = TestServer::start(|_| {});
    let (mut both, _) = connect_user(server.listen, "shop", "u1");
    subscribe(&mut both, "a");
    subscribe(&mut both, "b");
    let (mut only_a, _) = connect_user(server.listen, "shop", "u2");
    subscribe(&mut only_a, "a");
    let (mut neither, _) = connect_user(server.listen, "shop", "u3");

    let body = r#"{"project":"shop","topics":["a","b"],"data":{"k":[1, 2]}}"#;
    let before = now_ms();
    let r = publish(server.api, SHOP_API_KEY, body);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();

    let mut got = BTreeSet::new();
    for _ in 0..2 {
        let text = recv_text(&mut both);
        let (topic, data, mid, ts) = split_message(&text);
        assert_eq!(
            (data.as_str(), mid.as_str()),
            (r#"{"k":[1, 2]}"#, id.as_str())
        );
        assert!(ts >= before && ts <= now_ms());
        got.insert(topic);
    }
    assert_eq!(got, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    expect_message(&mut only_a, "a", r#"{"k":[1, 2]}"#, &id, before);

    let marker = server.publish("shop", "all", "\"marker\"");
    expect_marker([&mut both, &mut only_a, &mut neither], &marker);
}

#[test]
fn publishes_arrive_in_order_without_loss() {
    const N: usize = 200;
    let server = TestServer::start(|_| {});
    let mut conns = connect_spread(server.listen, "shop", "u", 2, 6);
    for (ws, _) in conns.iter_mut() {
        subscribe(ws, "seq");
    }
    let ids: Vec<String> = (0..N)
        .map(|i| server.publish("shop", "seq", &format!(r#"{{"i":{i}}}"#)))
        .collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), N, "message ids are unique");
    for (ws, w) in conns.iter_mut() {
        for (i, id) in ids.iter().enumerate() {
            let text = recv_text(ws);
            let (topic, data, mid, _) = split_message(&text);
            assert_eq!(
                (topic.as_str(), data, mid.as_str()),
                ("seq", format!(r#"{{"i":{i}}}"#), id.as_str()),
                "conn {} at position {i}",
                w.conn
            );
        }
    }
    let marker = server.publish("shop", "all", "\"marker\"");
    expect_marker(clients(&mut conns), &marker);
}

#[test]
fn project_keys_cannot_cross_projects() {
    let server = TestServer::start(|_| {});
    let (mut blog, _) = connect_user(server.listen, "blog", "u");
    let r = publish(
        server.api,
        SHOP_API_KEY,
        r#"{"project":"blog","topic":"all","data":1}"#,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "forbidden");
    // The admin key acts on every project; the refused publish delivered nothing.
    let r = publish(
        server.api,
        ADMIN_KEY,
        r#"{"project":"blog","topic":"all","data":"marker"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let marker = r.json()["id"].as_str().unwrap().to_owned();
    expect_marker([&mut blog], &marker);
}
