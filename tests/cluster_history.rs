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

/// [`history_node`] reaching Redis through a [`Relay`] (its connections: publishing, then
/// subscribing), with `engine.probe_interval_ms` and `engine.command_timeout_ms` as given.
fn relayed_node(
    name: &str,
    redis: &RedisServer,
    prefix: &str,
    (probe_interval_ms, command_timeout_ms): (u64, u64),
) -> (Relay, (HeraldProcess, Ready, TempDir)) {
    let relay = Relay::start(redis.port);
    let node = history_node_with(name, redis, prefix, 10, |e| {
        e.url = format!("redis://127.0.0.1:{}/0", relay.port);
        e.probe_interval_ms = probe_interval_ms;
        e.command_timeout_ms = command_timeout_ms;
    });
    (relay, node)
}

/// The epoch of `shop`'s stream of `topic` in Redis.
fn epoch_in_redis(c: &mut redis::Connection, prefix: &str, topic: &str) -> String {
    redis::cmd("HGET")
        .arg(format!("{prefix}~m:shop:{topic}"))
        .arg("e")
        .query(c)
        .unwrap()
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
    recovers_user_alice(&mut b, &epoch, 2, 5);
    publish_shop(n0.1.api, "user.alice", 6);
    assert_eq!(message_at(&mut b, "user.alice"), (6, 6));
}

/// Sends `recover` of `user.alice` from `since` of `epoch`: the ack says recovered up to
/// `top`, and the messages after `since` (their data their offset) follow, in order.
fn recovers_user_alice(ws: &mut Client, epoch: &str, since: u64, top: u64) {
    let op = json!({"op": "recover", "id": 3,
                    "since": {"user.alice": {"epoch": epoch, "offset": since}}});
    assert_eq!(
        request(ws, &op.to_string()),
        json!({"type": "ack", "id": 3,
               "history": {"user.alice": {"epoch": epoch, "offset": top, "recovered": true}}})
    );
    for i in since + 1..=top {
        assert_eq!(message_at(ws, "user.alice"), (i, i as i64));
    }
}

/// The welcome tells the positions of the implicit topics in Redis, also on a node that never
/// received them: a client that got no message and kept the welcome's position recovers on
/// another node exactly what it missed.
#[test]
fn the_welcome_tells_the_position_of_the_stream_in_redis() {
    let redis = RedisServer::start("rhist-welcome");
    let prefix = "rhist-welcome:";
    let a = history_node("rhist-welcome-a", &redis, prefix);
    let b = history_node("rhist-welcome-b", &redis, prefix);
    for i in 1..=3 {
        publish_shop(b.1.api, "user.alice", i);
    }
    let mut c = redis.connection().unwrap();
    let epoch = epoch_in_redis(&mut c, prefix, "user.alice");
    // Node A has never had a subscriber of `user.alice`.
    let (ws, welcome) = connect_user(a.1.listen, "shop", "alice");
    let w: Value = serde_json::from_str(&welcome.text).expect("JSON");
    assert_eq!(
        w["history"],
        json!({"user.alice": {"epoch": epoch, "offset": 3}}),
        "{}",
        welcome.text
    );
    close(ws);
    for i in 4..=5 {
        publish_shop(a.1.api, "user.alice", i);
    }
    let (mut ws, _) = connect_user(b.1.listen, "shop", "alice");
    recovers_user_alice(&mut ws, &epoch, 3, 5);
    publish_shop(a.1.api, "user.alice", 6);
    assert_eq!(
        message_at(&mut ws, "user.alice"),
        (6, 6),
        "live, nothing replayed twice"
    );
}

/// Redis losing the publish script (`SCRIPT FLUSH`, or a failover to a server that never had
/// it) loses no publish: each is accepted, numbered next (no gap, no repeat) and delivered,
/// also a publish to a topic with history and one without at once.
#[test]
fn publishes_go_on_when_redis_loses_the_script() {
    let redis = RedisServer::start("rhist-noscript");
    let prefix = "rhist-noscript:";
    let n = history_node("rhist-noscript-0", &redis, prefix);
    let (mut ws, _) = connect_user(n.1.listen, "shop", "alice");
    assert_eq!(subscribe_since(&mut ws, "news", None)["offset"], 0);
    subscribe(&mut ws, "plain");
    let mut c = redis.connection().unwrap();
    let flush = |c: &mut redis::Connection| {
        let () = redis::cmd("SCRIPT").arg("FLUSH").query(c).unwrap();
    };
    for i in 1..=2 {
        publish_shop(n.1.api, "news", i);
        assert_eq!(message_at(&mut ws, "news"), (i as u64, i));
    }
    flush(&mut c);
    publish_shop(n.1.api, "news", 3);
    assert_eq!(message_at(&mut ws, "news"), (3, 3));
    flush(&mut c);
    let r = publish(
        n.1.api,
        SHOP_API_KEY,
        r#"{"project":"shop","topics":["news","plain"],"data":4}"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got: Vec<(String, Value)> = (0..2)
        .map(|_| {
            let m = recv_json(&mut ws);
            (m["topic"].as_str().unwrap().to_owned(), m)
        })
        .collect();
    assert_eq!(got[0].0, "news", "{got:?}");
    assert_eq!(
        (&got[0].1["offset"], &got[0].1["data"]),
        (&json!(4), &json!(4))
    );
    assert_eq!(got[1].0, "plain", "{got:?}");
    assert_eq!(got[1].1["data"], 4);
    publish_shop(n.1.api, "news", 5);
    assert_eq!(message_at(&mut ws, "news"), (5, 5), "once each, in order");
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("{prefix}~h:shop:news"))
        .query(&mut c)
        .unwrap();
    assert_eq!(len, 5, "one entry per publish");
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
    let prefix = "rhist-gap:";
    let (relay, (_a, a, _da)) = relayed_node("rhist-gap-a", &redis, prefix, (200, 2000));
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

    let lost = engine_disconnects(a.api);
    relay.freeze(1, true);
    for i in 2..=4 {
        publish_shop(b.1.api, "news", i);
    }
    for i in 2..=6 {
        publish_shop(b.1.api, "tiny", i);
    }
    wait_engine_lost_and_back(a.api, lost);
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
    // `news` repaired, `tiny` given up; `user.alice` (nothing delivered before) and `all`
    // (no history) are no gaps of a stream. Read from Redis: the welcome's `user.alice`,
    // the subscribes' `news` and `tiny`.
    let m = scrape(a.api);
    let count = |name: &str, outcome: &str| metric(&m, name, &format!("outcome=\"{outcome}\""));
    assert_eq!(count("herald_history_repairs_total", "repaired"), 1.0);
    assert_eq!(count("herald_history_repairs_total", "resync"), 1.0);
    assert_eq!(count("herald_history_engine_reads_total", "ok"), 3.0);
    assert_eq!(count("herald_history_engine_reads_total", "error"), 0.0);
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

/// A stream Redis loses with its epoch and offset (deleted here; evicted, or a restart
/// without persistence) starts again under another epoch with offsets from 1: a subscriber
/// that came in at offset 2 is told (`resync`) and gets the new stream's messages, none
/// dropped for the old offsets.
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
    let () = redis::cmd("DEL")
        .arg(format!("{prefix}~m:shop:short"))
        .arg(format!("{prefix}~h:shop:short"))
        .query(&mut c)
        .unwrap();
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

/// A jump in a topic's offsets (the node missed messages while its subscription stayed up)
/// is repaired from the stream on a task of its own: while the read waits (the node's command
/// connection frozen), another topic's message is delivered at once, and the topic's own
/// later messages wait behind the repair; then the missed ones come in order, then those that
/// waited, none twice.
#[test]
fn a_repair_holds_only_its_own_topic() {
    let redis = RedisServer::start("rhist-hold");
    let prefix = "rhist-hold:";
    let (relay, (_a, a, _da)) = relayed_node("rhist-hold-a", &redis, prefix, (60_000, 30_000));
    let (mut ws, _) = connect_user(a.listen, "shop", "alice");
    assert_eq!(subscribe_since(&mut ws, "news", None)["offset"], 0);
    subscribe(&mut ws, "plain");
    publish_shop(a.api, "news", 1);
    assert_eq!(message_at(&mut ws, "news"), (1, 1));
    let mut c = redis.connection().unwrap();
    let epoch = epoch_in_redis(&mut c, prefix, "news");
    let body = |n: u64| format!(r#"{n},"id":"t-{n}","ts":1}}"#);
    // Messages 2..4 reach the stream but not the node; 5 and 6 reach it.
    for n in 2..=6 {
        let () = redis::cmd("XADD")
            .arg(format!("{prefix}~h:shop:news"))
            .arg(format!("{n}-0"))
            .arg("d")
            .arg(body(n))
            .query(&mut c)
            .unwrap();
    }
    let () = redis::cmd("HSET")
        .arg(format!("{prefix}~m:shop:news"))
        .arg("s")
        .arg(6)
        .query(&mut c)
        .unwrap();
    // The node's command connection (its first), which reads the gap, stops answering.
    relay.freeze(0, true);
    for n in 5..=6 {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{prefix}shop:news"))
            .arg(format!("#{n}:{epoch}\n{}", body(n)))
            .query(&mut c)
            .unwrap();
    }
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{prefix}shop:plain"))
        .arg(body(100))
        .query(&mut c)
        .unwrap();
    let m = recv_json(&mut ws);
    assert_eq!(
        (&m["topic"], &m["data"]),
        (&json!("plain"), &json!(100)),
        "another topic goes on during the repair: {m}"
    );
    relay.freeze(0, false);
    for n in 2..=6 {
        assert_eq!(message_at(&mut ws, "news"), (n, n as i64), "in order, once");
    }
    publish_shop(a.api, "news", 7);
    assert_eq!(message_at(&mut ws, "news"), (7, 7), "live, no duplicate");
    let m = scrape(a.api);
    assert_eq!(
        metric(&m, "herald_history_repairs_total", r#"outcome="repaired""#),
        1.0
    );
}

/// Reads of streams asked while Redis is away wait for it, but not for a topic nobody
/// subscribes to any more: the read of a subscribe whose connection left is dropped, not
/// kept for ever.
#[test]
fn reads_asked_while_redis_is_away_are_dropped_once_nobody_waits() {
    let mut redis = RedisServer::start("rhist-pending");
    let prefix = "rhist-pending:";
    let n = history_node("rhist-pending-0", &redis, prefix);
    let pending = || metric(&scrape(n.1.api), "herald_history_engine_reads_pending", "");
    let (mut ws, _) = connect_user(n.1.listen, "shop", "alice");
    redis.stop();
    wait_engine_up(n.1.api, false);
    send_text(&mut ws, r#"{"op":"subscribe","topic":"news","id":1}"#);
    wait_until("the read waits for Redis", || pending() == 1.0);
    close(ws);
    wait_until("the read of the topic left is dropped", || pending() == 0.0);
    redis.restart();
    wait_engine_up(n.1.api, true);
    assert_eq!(pending(), 0.0);
    let (mut ws, _) = connect_user(n.1.listen, "shop", "bob");
    assert_eq!(subscribe_since(&mut ws, "news", None)["offset"], 0);
}

/// With the engine, a client whose missed messages are older than the topic's TTL is told
/// `expired`, on any node: the stream went with its TTL, its epoch and offsets did not, and
/// it goes on with them.
#[test]
fn messages_gone_for_their_age_are_expired_on_any_node() {
    let redis = RedisServer::start("rhist-expired");
    let prefix = "rhist-expired:";
    let n0 = history_node("rhist-expired-0", &redis, prefix);
    let n1 = history_node("rhist-expired-1", &redis, prefix);
    publish_shop(n0.1.api, "short", 1);
    publish_shop(n0.1.api, "short", 2);
    let mut c = redis.connection().unwrap();
    let epoch = epoch_in_redis(&mut c, prefix, "short");
    let exists = |c: &mut redis::Connection, key: &str| -> bool {
        redis::cmd("EXISTS")
            .arg(format!("{prefix}{key}:shop:short"))
            .query(c)
            .unwrap()
    };
    wait_until("the stream expires in Redis", || !exists(&mut c, "~h"));
    assert!(exists(&mut c, "~m"), "its epoch and offset outlive it");
    let (mut ws, _) = connect_user(n1.1.listen, "shop", "bob");
    assert_eq!(
        subscribe_since(&mut ws, "short", Some((&epoch, 1))),
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 2,
               "recovered": false, "reason": "expired"})
    );
    publish_shop(n0.1.api, "short", 3);
    assert_eq!(
        message_at(&mut ws, "short"),
        (3, 3),
        "same epoch, next offset"
    );
    let (mut ws, _) = connect_user(n0.1.listen, "shop", "carol");
    assert_eq!(
        subscribe_since(&mut ws, "short", Some((&epoch, 1))),
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 3,
               "recovered": false, "reason": "expired"})
    );
}
