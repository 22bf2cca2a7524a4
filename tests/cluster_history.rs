//! History and recovery through the Redis engine: real `herald serve` processes sharing a
//! `redis-server` of the test's own. Topics with history are numbered in Redis, so every node
//! delivers the same offsets, and a client recovers on any node from the stream in Redis.

mod common;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

/// A node of the cluster under `prefix`: `shop` keeps `news*` (100 messages) and `tiny*`
/// (3 messages); recoveries replay at most 10.
fn history_node(name: &str, redis: &RedisServer, prefix: &str) -> (HeraldProcess, Ready, TempDir) {
    history_node_with(name, redis, prefix, 10, |_| ())
}

/// [`history_node`] replaying at most `max_replay`, with its `[engine]` as `tweak` makes it.
fn history_node_with(
    name: &str,
    redis: &RedisServer,
    prefix: &str,
    max_replay: u64,
    tweak: impl FnOnce(&mut herald::config::EngineConfig),
) -> (HeraldProcess, Ready, TempDir) {
    let dir = TempDir::new(name);
    let mut c: herald::config::Config =
        toml::from_str(&cluster_toml(&dir, redis, prefix, tweak)).expect("a config");
    c.server.history_max_replay = max_replay;
    let rule = |topics: &str, size| herald::config::HistoryConfig {
        topics: topics.into(),
        size,
        ttl_secs: 300,
    };
    let mut short = rule("short*", 100);
    short.ttl_secs = 1;
    c.projects[0].history = vec![
        rule("news*", 100),
        rule("tiny*", 3),
        short,
        rule("user.*", 100),
    ];
    let (p, ready) = HeraldProcess::start(&dir, &toml::to_string(&c).expect("toml"), &[]);
    wait_engine_up(ready.api, true);
    (p, ready, dir)
}

fn publish_shop(api: std::net::SocketAddr, topic: &str, n: i64) {
    let r = publish(
        api,
        SHOP_API_KEY,
        &format!(r#"{{"project":"shop","topic":"{topic}","data":{n}}}"#),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

fn subscribe_since(ws: &mut Client, topic: &str, since: Option<(&str, u64)>) -> Value {
    let mut op = json!({"op": "subscribe", "topic": topic, "id": 1});
    if let Some((epoch, offset)) = since {
        op["since"] = json!({"epoch": epoch, "offset": offset});
    }
    request(ws, &op.to_string())
}

/// `recover` of the implicit `user.<sub>` reads Redis too: a client that saw up to 2 on one
/// node recovers 3..5 on another, then gets live 6.
#[test]
fn the_implicit_topics_recover_on_another_node() {
    let redis = RedisServer::start("rhist-implicit");
    let prefix = "rhist-implicit:";
    let n0 = history_node("rhist-implicit-0", &redis, prefix);
    let n1 = history_node("rhist-implicit-1", &redis, prefix);
    let (mut a, _) = connect_user(n0.1.listen, "shop", "alice");
    let r = request(&mut a, r#"{"op":"recover","id":2,"since":{}}"#);
    let at = &r["history"]["user.alice"];
    let epoch = at["epoch"].as_str().expect("an epoch").to_owned();
    assert_eq!(at["offset"], 0, "{r}");
    for i in 1..=2 {
        publish_shop(n1.1.api, "user.alice", i);
    }
    assert_eq!(message_at(&mut a, "user.alice"), (1, 1));
    assert_eq!(message_at(&mut a, "user.alice"), (2, 2));
    close(a);
    for i in 3..=5 {
        publish_shop(n0.1.api, "user.alice", i);
    }
    let (mut b, _) = connect_user(n1.1.listen, "shop", "alice");
    let op = json!({"op": "recover", "id": 3,
                    "since": {"user.alice": {"epoch": epoch, "offset": 2}}});
    assert_eq!(
        request(&mut b, &op.to_string()),
        json!({"type": "ack", "id": 3,
               "history": {"user.alice": {"epoch": epoch, "offset": 5, "recovered": true}}})
    );
    for i in 3..=5 {
        assert_eq!(message_at(&mut b, "user.alice"), (i as u64, i));
    }
    publish_shop(n0.1.api, "user.alice", 6);
    assert_eq!(message_at(&mut b, "user.alice"), (6, 6));
}

/// A client that saw up to offset 2 on one node reconnects to another with `since` and gets
/// 3..5 read from Redis, then live 6; a subscriber on a third node got the same offsets.
#[test]
fn a_client_recovers_on_another_node_than_the_one_it_was_on() {
    let redis = RedisServer::start("rhist-recover");
    let prefix = "rhist-recover:";
    let nodes: Vec<_> = (0..3)
        .map(|i| history_node(&format!("rhist-recover-{i}"), &redis, prefix))
        .collect();
    let (mut a, _) = connect_user(nodes[0].1.listen, "shop", "alice");
    let ack = subscribe_since(&mut a, "news", None);
    let epoch = ack["epoch"].as_str().expect("an epoch").to_owned();
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 0})
    );
    let (mut watcher, _) = connect_user(nodes[2].1.listen, "shop", "watcher");
    let ack = subscribe_since(&mut watcher, "news", None);
    assert_eq!(ack["epoch"], epoch, "one epoch in the cluster: {ack}");
    for i in 1..=2 {
        publish_shop(nodes[1].1.api, "news", i);
    }
    assert_eq!(message_at(&mut a, "news"), (1, 1));
    assert_eq!(message_at(&mut a, "news"), (2, 2));
    close(a);
    for i in 3..=5 {
        publish_shop(nodes[2].1.api, "news", i);
    }
    // Node 1 has never had a subscriber of `news`: what it replays comes from Redis.
    let (mut b, _) = connect_user(nodes[1].1.listen, "shop", "alice");
    let ack = subscribe_since(&mut b, "news", Some((&epoch, 2)));
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 5, "recovered": true})
    );
    for i in 3..=5 {
        assert_eq!(message_at(&mut b, "news"), (i as u64, i));
    }
    publish_shop(nodes[0].1.api, "news", 6);
    assert_eq!(message_at(&mut b, "news"), (6, 6));
    for i in 1..=6 {
        assert_eq!(
            message_at(&mut watcher, "news"),
            (i as u64, i),
            "same offsets everywhere"
        );
    }
}

/// Recovery on another node is all or nothing: another epoch, more than the replay limit, or
/// more than the stream holds gives `recovered: false` with the reason, and nothing replayed
/// (the next delivery is live).
#[test]
fn an_impossible_recovery_on_another_node_replays_nothing_and_says_why() {
    let redis = RedisServer::start("rhist-refuse");
    let prefix = "rhist-refuse:";
    let n0 = history_node("rhist-refuse-0", &redis, prefix);
    let n1 = history_node("rhist-refuse-1", &redis, prefix);
    let (mut probe, _) = connect_user(n0.1.listen, "shop", "probe");
    let news = subscribe_since(&mut probe, "news", None)["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let tiny = subscribe_since(&mut probe, "tiny", None)["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    close(probe);
    for i in 1..=20 {
        publish_shop(n0.1.api, "news", i);
    }
    for i in 1..=6 {
        publish_shop(n0.1.api, "tiny", i);
    }
    // Each case publishes one more to its topic.
    let cases = [
        ("news", "another-epoch", 18, "epoch_changed", 20),
        ("news", news.as_str(), 5, "over_limit", 21),
        ("tiny", tiny.as_str(), 1, "too_many", 6),
    ];
    for (topic, epoch, offset, reason, top) in cases {
        let (mut ws, _) = connect_user(n1.1.listen, "shop", "bob");
        let ack = subscribe_since(&mut ws, topic, Some((epoch, offset)));
        assert_eq!(ack["recovered"], false, "{topic} {reason}: {ack}");
        assert_eq!(ack["reason"], reason, "{ack}");
        assert_eq!(ack["offset"], top, "{ack}");
        publish_shop(n0.1.api, topic, 100);
        assert_eq!(
            message_at(&mut ws, topic),
            (top + 1, 100),
            "nothing replayed, then live"
        );
        close(ws);
    }
}

/// A node cut off from Redis's messages for a while (its subscription goes silent, found by
/// the liveness probe) while another node publishes: once back, it delivers what it missed of
/// a topic with history from the stream, in order and once, with no resync notice; a topic
/// whose stream no longer holds what was missed (`tiny` keeps 3) and the topics without
/// history get the resync notice; then live messages follow.
#[test]
fn a_node_that_missed_messages_repairs_them_from_the_stream() {
    let redis = RedisServer::start("rhist-gap");
    let relay = Relay::start(redis.port);
    let prefix = "rhist-gap:";
    let (_a, a, _da) = history_node_with("rhist-gap-a", &redis, prefix, 10, |e| {
        e.url = format!("redis://127.0.0.1:{}/0", relay.port);
        e.probe_interval_ms = 200;
        e.command_timeout_ms = 500;
    });
    let b = history_node("rhist-gap-b", &redis, prefix);
    // The node's first two connections: publishing, then subscribing.
    assert_eq!(relay.nr_connections(), 2);
    let (mut ws, _) = connect_user(a.listen, "shop", "alice");
    assert_eq!(subscribe_since(&mut ws, "news", None)["offset"], 0);
    assert_eq!(subscribe_since(&mut ws, "tiny", None)["offset"], 0);
    publish_shop(b.1.api, "news", 1);
    publish_shop(b.1.api, "tiny", 1);
    assert_eq!(message_at(&mut ws, "news"), (1, 1));
    assert_eq!(message_at(&mut ws, "tiny"), (1, 1));

    relay.freeze(1, true);
    for i in 2..=4 {
        publish_shop(b.1.api, "news", i);
    }
    for i in 2..=6 {
        publish_shop(b.1.api, "tiny", i);
    }
    wait_engine_up(a.api, false);
    wait_engine_up(a.api, true);
    for i in 2..=4 {
        assert_eq!(
            message_at(&mut ws, "news"),
            (i as u64, i),
            "repaired, in order"
        );
    }
    let notices: std::collections::BTreeSet<String> = (0..3).map(|_| recv_text(&mut ws)).collect();
    let expected: std::collections::BTreeSet<String> = ["all", "user.alice", "tiny"]
        .iter()
        .map(|t| format!(r#"{{"type":"resync","topic":"{t}","reason":"engine"}}"#))
        .collect();
    assert_eq!(notices, expected);
    publish_shop(b.1.api, "news", 5);
    assert_eq!(message_at(&mut ws, "news"), (5, 5), "live, no duplicate");
    publish_shop(b.1.api, "tiny", 7);
    assert_eq!(message_at(&mut ws, "tiny"), (7, 7));
}

/// The next message of `topic` as (offset, data), skipping other frames; `None` once the
/// connection fails (its node died) or stays silent for the read timeout.
fn next_or_lost(ws: &mut Client) -> Option<(u64, i64)> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let m: Value = serde_json::from_str(&t).expect("JSON");
                if m["type"] == "message" {
                    return Some((m["offset"].as_u64()?, m["data"].as_i64()?));
                }
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// A node is killed (SIGKILL) while another publishes: its clients reconnect to the other
/// nodes with `since`, and every client ends with every message exactly once, in order.
#[test]
fn clients_of_a_killed_node_recover_elsewhere_every_message_once_in_order() {
    const N: i64 = 300;
    let redis = RedisServer::start("rhist-kill");
    let prefix = "rhist-kill:";
    let mut nodes: Vec<_> = (0..3)
        .map(|i| history_node_with(&format!("rhist-kill-{i}"), &redis, prefix, 1000, |_| ()))
        .collect();
    let others = [nodes[1].1.listen, nodes[2].1.listen];
    let api = nodes[1].1.api;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let first = nodes[0].1.listen;
            let ready_tx = ready_tx.clone();
            std::thread::spawn(move || {
                let (mut ws, _) = connect_user(first, "shop", &format!("u{i}"));
                let ack = subscribe_since(&mut ws, "news", None);
                let epoch = ack["epoch"].as_str().expect("an epoch").to_owned();
                ready_tx.send(()).unwrap();
                let mut got: Vec<(u64, i64)> = Vec::new();
                let mut nr_reconnects = 0;
                while got.len() < N as usize {
                    if let Some(m) = next_or_lost(&mut ws) {
                        got.push(m);
                        continue;
                    }
                    nr_reconnects += 1;
                    assert!(nr_reconnects < 5, "client {i} keeps losing its node");
                    let (w, _) = connect_user(others[i % 2], "shop", &format!("u{i}"));
                    ws = w;
                    let last = got.last().map_or(0, |m| m.0);
                    let ack = subscribe_since(&mut ws, "news", Some((&epoch, last)));
                    assert_eq!(ack["recovered"], true, "client {i}: {ack}");
                }
                (got, nr_reconnects)
            })
        })
        .collect();
    for _ in 0..clients.len() {
        ready_rx.recv_timeout(TIMEOUT).expect("clients subscribed");
    }
    for i in 1..=N {
        publish_shop(api, "news", i);
        if i == N / 3 {
            nodes[0].0.child.kill().expect("SIGKILL");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let want: Vec<(u64, i64)> = (1..=N).map(|i| (i as u64, i)).collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (got, nr_reconnects) = c.join().expect("client");
        assert_eq!(got, want, "client {i}");
        assert_eq!(nr_reconnects, 1, "client {i} moved once, its node killed");
    }
    nodes.clear();
}

/// A stream Redis drops (here for its TTL) starts again under another epoch with offsets from
/// 1: a subscriber that came in at offset 2 is told (`resync`) and gets the new stream's
/// messages, none dropped for the old offsets.
#[test]
fn a_stream_lost_in_redis_starts_again_for_its_subscribers() {
    let redis = RedisServer::start("rhist-lost");
    let prefix = "rhist-lost:";
    let n = history_node("rhist-lost-0", &redis, prefix);
    publish_shop(n.1.api, "short", 1);
    publish_shop(n.1.api, "short", 2);
    let (mut ws, _) = connect_user(n.1.listen, "shop", "alice");
    let ack = subscribe_since(&mut ws, "short", None);
    assert_eq!(ack["offset"], 2, "{ack}");
    let mut c = redis.connection().unwrap();
    wait_until("the stream expires in Redis", || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("{prefix}~m:shop:short"))
            .query(&mut c)
            .unwrap();
        n == 0
    });
    publish_shop(n.1.api, "short", 3);
    assert_eq!(
        recv_text(&mut ws),
        r#"{"type":"resync","topic":"short","reason":"engine"}"#
    );
    assert_eq!(
        message_at(&mut ws, "short"),
        (1, 3),
        "offsets from 1, delivered"
    );
    publish_shop(n.1.api, "short", 4);
    assert_eq!(message_at(&mut ws, "short"), (2, 4));
}
