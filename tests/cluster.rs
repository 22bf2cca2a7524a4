//! Several nodes sharing publishes through Redis: real `herald serve` processes on loopback,
//! each with its own ports and state directory, and a `redis-server` of the test's own.
//!
//! A node subscribes to a topic's channel only once a local connection is subscribed. A
//! `subscribe` ack waits for that subscription
//! (`a_subscribe_is_acknowledged_once_redis_has_the_subscription`), and so does the welcome
//! for the implicit topics (`the_welcome_comes_once_redis_has_the_implicit_subscriptions`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The channel of `topic` in project `shop` under `prefix`.
fn shop_channel(prefix: &str, topic: &str) -> String {
    format!("{prefix}shop:{topic}")
}

/// A Redis of its own and three nodes sharing it under the prefix `<name>:`.
fn three_nodes(name: &str) -> (RedisServer, String, Vec<(HeraldProcess, Ready, TempDir)>) {
    let redis = RedisServer::start(name);
    let prefix = format!("{name}:");
    let nodes = cluster_nodes(3, name, &redis, &prefix);
    (redis, prefix, nodes)
}

/// Publishes `data` to `topic` of `shop` through `api`.
fn publish_shop(api: std::net::SocketAddr, topic: &str, data: &str) -> HttpResponse {
    publish(
        api,
        SHOP_API_KEY,
        &format!(r#"{{"project":"shop","topic":"{topic}","data":{data}}}"#),
    )
}

/// Publishes `data` to `topic` of `shop` through `api`, expects 200, and answers the message id.
fn published_id(api: std::net::SocketAddr, topic: &str, data: &str) -> String {
    let r = publish_shop(api, topic, data);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["id"].as_str().expect("an id").to_owned()
}

/// `what` came `after` the start of a Redis pause of `pause`: it waited for Redis (less a
/// margin for the pause's own start).
fn assert_waited_for_redis(after: Duration, pause: Duration, what: &str) {
    assert!(
        after >= pause - Duration::from_millis(50),
        "{what} came {after:?} into an {pause:?} pause of Redis"
    );
}

/// The next frames are one `resync` notice for each of `topics`, in any order.
fn expect_resync(ws: &mut Client, topics: &[&str]) {
    let notices: BTreeSet<String> = topics.iter().map(|_| recv_text(ws)).collect();
    let expected: BTreeSet<String> = topics
        .iter()
        .map(|t| format!(r#"{{"type":"resync","topic":"{t}","reason":"engine"}}"#))
        .collect();
    assert_eq!(notices, expected);
}

/// The next delivery's (topic, data as JSON text, id).
fn next_message(ws: &mut Client) -> (String, String, String) {
    let (topic, data, id, _) = split_message(&recv_text(ws));
    (topic, data, id)
}

#[test]
fn a_publish_to_any_node_reaches_subscribers_on_every_node() {
    let (redis, prefix, nodes) = three_nodes("any-node");
    let mut clients: Vec<Client> = nodes
        .iter()
        .map(|(_, ready, _)| {
            let (mut ws, _) = connect_user(ready.listen, "shop", "reader");
            subscribe(&mut ws, "news");
            ws
        })
        .collect();
    redis.wait_numsub(&shop_channel(&prefix, "news"), 3);
    let mut ids = BTreeSet::new();
    for (i, (_, ready, _)) in nodes.iter().enumerate() {
        let r = publish_shop(ready.api, "news", &format!(r#"{{"from":{i}}}"#));
        assert_eq!(r.status, 200, "{}", r.text());
        let id = r.json()["id"].as_str().expect("an id").to_owned();
        for ws in &mut clients {
            assert_eq!(
                next_message(ws),
                ("news".into(), format!(r#"{{"from":{i}}}"#), id.clone()),
                "every node delivers what node {i} accepted, with its id"
            );
        }
        assert!(ids.insert(id), "message ids are unique across nodes");
    }
}

#[test]
fn a_stomp_subscriber_on_another_node_gets_the_message_with_its_id_and_exact_body() {
    let (redis, prefix, nodes) = three_nodes("stomp-node");
    let at = nodes[1].1.listen;
    let (mut stomp, _) =
        tungstenite::client(format!("ws://{at}/stomp/shop"), tcp(at)).expect("the STOMP upgrade");
    let jwt = token("shop", "reader").0;
    stomp
        .send(tungstenite::Message::text(format!(
            "CONNECT\naccept-version:1.2\npasscode:{jwt}\n\n\0\
             SUBSCRIBE\nid:s1\ndestination:/topic/shop/news\nreceipt:r1\n\n\0"
        )))
        .expect("CONNECT and SUBSCRIBE");
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let text = recv_text(&mut stomp);
        if !text.trim_matches(['\r', '\n']).is_empty() {
            frames.push(text);
        }
    }
    assert!(
        frames[0].starts_with("CONNECTED\nversion:1.2\n"),
        "{frames:?}"
    );
    assert_eq!(frames[1], "RECEIPT\nreceipt-id:r1\n\n\0");
    redis.wait_numsub(&shop_channel(&prefix, "news"), 1);

    let data = r#"{"id":"not the message id","n": [1, 2.50]}"#;
    let r = publish_shop(nodes[0].1.api, "news", data);
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().expect("an id").to_owned();
    let message = loop {
        let text = recv_text(&mut stomp);
        if !text.trim_matches(['\r', '\n']).is_empty() {
            break text;
        }
    };
    assert_eq!(
        message,
        format!(
            "MESSAGE\nsubscription:s1\ndestination:/topic/shop/news\nmessage-id:{id}\n\
             content-type:application/json\ncontent-length:{}\n\n{data}\0",
            data.len()
        )
    );
}

#[test]
fn ten_thousand_messages_arrive_in_order_on_every_node() {
    const N: usize = 10_000;
    const BATCH: usize = 500;
    let (redis, prefix, nodes) = three_nodes("order");
    // Two subscribers on the first node, one on each other.
    let mut readers = Vec::new();
    for listen in [
        nodes[0].1.listen,
        nodes[0].1.listen,
        nodes[1].1.listen,
        nodes[2].1.listen,
    ] {
        let (mut ws, _) = connect_user(listen, "shop", "reader");
        subscribe(&mut ws, "ticks");
        readers.push(std::thread::spawn(move || {
            (0..N)
                .map(|_| {
                    let (_, data, _) = next_message(&mut ws);
                    let v: Value = serde_json::from_str(&data).expect("JSON data");
                    v["n"].as_u64().expect("a number") as usize
                })
                .collect::<Vec<_>>()
        }));
    }
    redis.wait_numsub(&shop_channel(&prefix, "ticks"), 3);
    // One publisher, through the middle node, in batches.
    let api = nodes[1].1.api;
    for start in (0..N).step_by(BATCH) {
        let items: Vec<String> = (start..start + BATCH)
            .map(|n| format!(r#"{{"project":"shop","topic":"ticks","data":{{"n":{n}}}}}"#))
            .collect();
        let r = http_request(
            api,
            "POST",
            "/api/v1/publish/batch",
            SHOP_API_KEY,
            &format!("[{}]", items.join(",")),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let expected: Vec<usize> = (0..N).collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.join().expect("reader");
        assert!(
            got == expected,
            "subscriber {i}: not every message in order"
        );
    }
}

#[test]
fn unicast_reaches_a_users_connections_on_two_nodes() {
    let (redis, prefix, nodes) = three_nodes("unicast");
    let (mut alice_0, _) = connect_user(nodes[0].1.listen, "shop", "alice");
    let (mut alice_2, _) = connect_user(nodes[2].1.listen, "shop", "alice");
    let (mut bob_1, _) = connect_user(nodes[1].1.listen, "shop", "bob");
    // The implicit `user.<sub>` topic is subscribed on the nodes holding the user only.
    redis.wait_numsub(&shop_channel(&prefix, "user.alice"), 2);
    redis.wait_numsub(&shop_channel(&prefix, "user.bob"), 1);
    let r = publish_shop(nodes[1].1.api, "user.alice", r#""for alice""#);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = publish_shop(nodes[0].1.api, "user.bob", r#""for bob""#);
    assert_eq!(r.status, 200, "{}", r.text());
    for ws in [&mut alice_0, &mut alice_2] {
        let (topic, data, _) = next_message(ws);
        assert_eq!(
            (topic.as_str(), data.as_str()),
            ("user.alice", r#""for alice""#)
        );
    }
    let (topic, data, _) = next_message(&mut bob_1);
    assert_eq!(
        (topic.as_str(), data.as_str()),
        ("user.bob", r#""for bob""#),
        "bob's first message is his own: alice's did not reach him"
    );
}

#[test]
fn a_node_receives_only_the_topics_its_connections_subscribe_to() {
    let redis = RedisServer::start("interest");
    let prefix = "int:";
    let (_a, a, _da) = cluster_node("interest-a", &redis, prefix);
    let (_b, b, _db) = cluster_node("interest-b", &redis, prefix);
    let (mut on_a, _) = connect_user(a.listen, "shop", "u1");
    let (mut on_b, _) = connect_user(b.listen, "shop", "u2");
    let only_a = shop_channel(prefix, "only-a");
    subscribe(&mut on_a, "only-a");
    redis.wait_numsub(&only_a, 1);
    redis.wait_numsub(&shop_channel(prefix, "all"), 2);
    let received = |api| metric(&scrape(api), "herald_engine_received_total", "");
    let b_before = received(b.api);
    assert_eq!(publish_shop(a.api, "only-a", "1").status, 200);
    assert_eq!(publish_shop(a.api, "all", r#""marker""#).status, 200);
    assert_eq!(next_message(&mut on_a).1, "1");
    assert_eq!(next_message(&mut on_a).1, r#""marker""#);
    // B takes the marker after anything Redis sent it before: only the marker came.
    assert_eq!(next_message(&mut on_b).1, r#""marker""#);
    assert_eq!(
        received(b.api) - b_before,
        1.0,
        "B received nothing for `only-a`"
    );

    // Unsubscribed: the channel lingers (`engine.unsubscribe_linger_ms`, 1 s), then goes.
    let ack = request(
        &mut on_a,
        r#"{"op":"unsubscribe","topic":"only-a","id":"u"}"#,
    );
    assert_eq!(ack["type"], "ack");
    assert_eq!(
        redis.numsub(&only_a),
        1,
        "still subscribed while it lingers"
    );
    redis.wait_numsub(&only_a, 0);
    // The node counts its channels once Redis has answered the unsubscribe.
    wait_until("the node to count `all` and `user.u1` only", || {
        metric(&scrape(a.api), "herald_engine_channels", "") == 2.0
    });
    // Subscribed again: the node subscribes again.
    subscribe(&mut on_a, "only-a");
    redis.wait_numsub(&only_a, 1);
    assert_eq!(publish_shop(b.api, "only-a", "2").status, 200);
    assert_eq!(next_message(&mut on_a).1, "2");

    // A topic that goes and comes back within the linger costs Redis no command: `flap` is
    // left and taken again at once, then `gone` is left for good. Once `gone` is dropped
    // (its linger started last), `flap`'s would have been too: it is still there, and the
    // only UNSUBSCRIBE since is `gone`'s.
    let unsubscribes = || {
        let mut c = redis.connection().unwrap();
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut c)
            .unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_unsubscribe:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    subscribe(&mut on_a, "flap");
    subscribe(&mut on_a, "gone");
    redis.wait_numsub(&shop_channel(prefix, "flap"), 1);
    redis.wait_numsub(&shop_channel(prefix, "gone"), 1);
    let before = unsubscribes();
    let ack = request(&mut on_a, r#"{"op":"unsubscribe","topic":"flap","id":"f"}"#);
    assert_eq!(ack["type"], "ack");
    subscribe(&mut on_a, "flap");
    let ack = request(&mut on_a, r#"{"op":"unsubscribe","topic":"gone","id":"g"}"#);
    assert_eq!(ack["type"], "ack");
    redis.wait_numsub(&shop_channel(prefix, "gone"), 0);
    assert_eq!(redis.numsub(&shop_channel(prefix, "flap")), 1);
    assert_eq!(unsubscribes() - before, 1, "one UNSUBSCRIBE, for `gone`");
}

#[test]
fn redis_going_away_refuses_publishes_keeps_clients_tells_them_and_recovers() {
    let mut redis = RedisServer::start("outage");
    let prefix = "out:";
    let (a_proc, a, _da) = cluster_node("outage-a", &redis, prefix);
    let (b_proc, b, _db) = cluster_node("outage-b", &redis, prefix);
    let mut clients: Vec<Client> = [a.listen, b.listen]
        .into_iter()
        .map(|listen| {
            let (mut ws, _) = connect_user(listen, "shop", "reader");
            subscribe(&mut ws, "news");
            ws
        })
        .collect();
    redis.wait_numsub(&shop_channel(prefix, "news"), 2);

    for api in [a.api, b.api] {
        let r = http_request(api, "GET", "/readyz", "", "");
        assert_eq!((r.status, r.text()), (200, r#"{"status":"ready"}"#.into()));
    }
    redis.stop();
    for api in [a.api, b.api] {
        wait_engine_up(api, false);
        let r = http_request(api, "GET", "/readyz", "", "");
        assert_eq!(
            (r.status, r.text()),
            (503, r#"{"status":"degraded"}"#.into())
        );
        let r = publish_shop(api, "news", r#""lost?""#);
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"], "engine_unavailable", "{}", r.text());
        assert_eq!(r.header("Retry-After"), Some("1"));
    }
    let r = http_request(
        a.api,
        "POST",
        "/api/v1/publish/batch",
        SHOP_API_KEY,
        r#"[{"project":"shop","topic":"news","data":1}]"#,
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "engine_unavailable");

    redis.restart();
    for api in [a.api, b.api] {
        wait_engine_up(api, true);
        let r = http_request(api, "GET", "/readyz", "", "");
        assert_eq!((r.status, r.text()), (200, r#"{"status":"ready"}"#.into()));
    }
    // Resubscribed from the interest table.
    redis.wait_numsub(&shop_channel(prefix, "news"), 2);
    redis.wait_numsub(&shop_channel(prefix, "all"), 2);
    // Each subscriber is told, per topic it holds, that it may have missed messages.
    for ws in &mut clients {
        expect_resync(ws, &["all", "user.reader", "news"]);
    }
    let r = publish_shop(b.api, "news", r#""back""#);
    assert_eq!(r.status, 200, "{}", r.text());
    for ws in &mut clients {
        // The same connections: nothing refused was delivered, the next message is the new one.
        assert_eq!(next_message(ws).1, r#""back""#);
    }
    for p in [&a_proc, &b_proc] {
        let log = p.stderr();
        assert_eq!(
            log.matches("engine unavailable").count(),
            1,
            "one line per change of state:\n{log}"
        );
        assert_eq!(log.matches("engine connected").count(), 2, "{log}");
    }
}

#[test]
fn check_config_names_a_bad_engine_setting() {
    let redis = RedisServer::start("check");
    let dir = TempDir::new("cluster-check");
    let check = |toml: &str| {
        let path = write_config(&dir, toml);
        run_herald(&["check-config", "--config", path.to_str().unwrap()])
    };
    let (status, out, err) = check(&cluster_toml(&dir, &redis, "chk:", |_| ()));
    assert!(status.success(), "{out}{err}");
    // The rules themselves are unit-tested beside the config; here, that the command applies
    // them and names the key without quoting the address.
    let (status, _, err) = check(&cluster_toml(&dir, &redis, "chk:", |e| {
        e.url = "rediss://127.0.0.1:6379".into();
        e.tls_ca_file = Some(dir.0.join("no-such-ca.pem"));
    }));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("invalid `engine.tls_ca_file`"), "{err}");
    assert!(!err.contains("6379"), "the address is never quoted: {err}");
    let (status, _, err) = check(&cluster_toml(&dir, &redis, "chk:", |e| {
        e.node = Some("a/b".into());
    }));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("invalid `engine.node`"), "{err}");

    // --connect: reaches Redis and checks its version.
    let connect = |toml: &str| {
        let path = write_config(&dir, toml);
        run_herald(&[
            "check-config",
            "--config",
            path.to_str().unwrap(),
            "--connect",
        ])
    };
    let (status, out, err) = connect(&cluster_toml(&dir, &redis, "chk:", |_| ()));
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("engine: Redis 7."), "{out}");
    assert!(out.trim_end().ends_with(": ok"), "{out}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (status, _, err) = connect(&cluster_toml(&dir, &redis, "chk:", |e| {
        e.url = format!("redis://:secret-pw@127.0.0.1:{closed}/0");
    }));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("engine: cannot connect"), "{err}");
    assert!(
        !err.contains("secret-pw"),
        "the address is never quoted: {err}"
    );
    let (status, _, err) = connect(&toml::to_string(&config()).unwrap());
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no [engine] section"), "{err}");
}

/// A Redis of its own and an in-process node on it under `prefix`, its engine up, with a
/// connection of user `reader` of `shop` (whose `all` is subscribed in Redis).
fn engine_node(name: &str, prefix: &str) -> (RedisServer, TestServer, Client) {
    let redis = RedisServer::start(name);
    let server = TestServer::start(|c| {
        c.engine = Some(herald::config::EngineConfig {
            url: redis.url(),
            prefix: prefix.into(),
            // Redis pauses in these tests end up to a cron tick late: no command or probe
            // may give up on a paused Redis in the meantime.
            command_timeout_ms: 10_000,
            ..Default::default()
        });
    });
    wait_engine_up(server.api, true);
    let (ws, _) = connect_user(server.listen, "shop", "reader");
    redis.wait_numsub(&shop_channel(prefix, "all"), 1);
    (redis, server, ws)
}

/// Makes Redis answer no client for `pause` (`CLIENT PAUSE ... ALL`); returns when it began.
fn pause_redis(redis: &RedisServer, pause: Duration) -> std::time::Instant {
    let paused_at = std::time::Instant::now();
    let mut c = redis.connection().unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(pause.as_millis() as u64)
        .arg("ALL")
        .query(&mut c)
        .unwrap();
    paused_at
}

/// The bridge side of a `subscribe` ack that waits for the engine: the completion event for
/// a topic comes only once Redis has the node's subscription. Redis is paused (`CLIENT
/// PAUSE`) while a client subscribes, so the event cannot come before the pause ends.
#[test]
fn the_subscription_event_comes_once_redis_has_the_subscription() {
    let prefix = "done:";
    let (redis, server, mut ws) = engine_node("completion", prefix);
    let shop = server.hub.registry.load().project("shop").unwrap().idx;

    let pause = Duration::from_millis(800);
    let paused_at = pause_redis(&redis, pause);
    subscribe(&mut ws, "news");
    let (tx, rx) = std::sync::mpsc::channel();
    server.hub.broker.when_subscribed(
        shop,
        "news",
        Box::new(move || {
            let _ = tx.send(std::time::Instant::now());
        }),
    );
    let at = rx.recv_timeout(TIMEOUT).expect("the subscription event");
    assert_waited_for_redis(at - paused_at, pause, "the event");
    assert_eq!(redis.numsub(&shop_channel(prefix, "news")), 1);

    // Subscribed already: the event comes at once.
    let (tx, rx) = std::sync::mpsc::channel();
    server.hub.broker.when_subscribed(
        shop,
        "news",
        Box::new(move || {
            let _ = tx.send(());
        }),
    );
    rx.recv_timeout(TIMEOUT).expect("at once");
}

/// A subscription that no longer receives while its connection stays open (a failover that
/// left it on a server nobody publishes to, or a link that hangs) is found by the liveness
/// probe on an idle node: the node turns unavailable and connects again.
#[test]
fn a_subscribe_is_acknowledged_once_redis_has_the_subscription() {
    let prefix = "ackw:";
    let (redis, server, mut ws) = engine_node("ack-waits", prefix);

    // Redis answers nothing for a while: the ack waits for it, a ping's answer does not.
    let pause = Duration::from_millis(800);
    let paused_at = pause_redis(&redis, pause);
    send_text(&mut ws, r#"{"op":"subscribe","topic":"fresh","id":1}"#);
    send_text(&mut ws, r#"{"op":"ping","id":2}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"pong","id":2}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"ack","id":1}"#);
    let acked = paused_at.elapsed();
    assert_waited_for_redis(acked, pause, "the ack");
    // Once acknowledged, the subscription is in Redis and a publish reaches the client.
    assert_eq!(redis.numsub(&shop_channel(prefix, "fresh")), 1);
    let id = published_id(server.api, "fresh", r#"{"n":1}"#);
    assert_eq!(
        next_message(&mut ws),
        ("fresh".into(), r#"{"n":1}"#.into(), id)
    );

    // A second subscriber of the topic on the node is acknowledged too (at once: the
    // subscription exists).
    let (mut other, _) = connect_user(server.listen, "shop", "other");
    subscribe(&mut other, "fresh");
}

/// The welcome waits for the node's Redis subscription of the connection's implicit topics
/// (`user.<sub>` is new on the node for a user's first connection). Redis is paused while the
/// connection opens: the 101 comes, the welcome only after the pause, and a reply to an op
/// the client sent meanwhile follows the welcome. From the welcome on, a publish to the user
/// reaches it.
#[test]
fn the_welcome_comes_once_redis_has_the_implicit_subscriptions() {
    let prefix = "welw:";
    let (redis, server, _reader) = engine_node("welcome-waits", prefix);

    let pause = Duration::from_millis(800);
    let paused_at = pause_redis(&redis, pause);
    let mut c = RawClient::connect(server.listen);
    let (jwt, _) = token("shop", "newcomer");
    c.send(upgrade_request("/ws/shop", &format!("Authorization: Bearer {jwt}\r\n")).as_bytes());
    let head = c.read_http_head();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    c.send(&masked(op::TEXT, br#"{"op":"ping","id":1}"#));
    let text = |f: Frame| String::from_utf8(f.payload).expect("UTF-8");
    let welcome = parse_welcome(&text(c.read_frame().expect("the welcome")));
    let welcomed = paused_at.elapsed();
    assert_waited_for_redis(welcomed, pause, "the welcome");
    assert_eq!(
        text(c.read_frame().expect("the pong")),
        r#"{"type":"pong","id":1}"#,
        "the reply to an op sent before the welcome follows it"
    );
    assert!(
        welcome.text.contains(r#""user":"newcomer""#),
        "{}",
        welcome.text
    );

    // Once welcomed, the user's topic is subscribed in Redis and a publish reaches it.
    assert_eq!(redis.numsub(&shop_channel(prefix, "user.newcomer")), 1);
    let id = published_id(server.api, "user.newcomer", r#"{"n":1}"#);
    let (topic, data, got, _) = split_message(&text(c.read_frame().expect("the message")));
    assert_eq!(
        (topic, data, got),
        ("user.newcomer".into(), r#"{"n":1}"#.into(), id)
    );

    // A second connection of the user is welcomed at once (the subscription exists).
    let (_again, _) = connect_user(server.listen, "shop", "newcomer");
}

#[test]
fn a_silent_subscription_is_found_by_the_liveness_probe() {
    let redis = RedisServer::start("probe");
    let relay = Relay::start(redis.port);
    let dir = TempDir::new("probe-node");
    let toml = cluster_toml(&dir, &redis, "probe:", |e| {
        e.url = format!("redis://127.0.0.1:{}/0", relay.port);
        e.probe_interval_ms = 200;
        // Long enough that only a frozen link fails a probe, not a loaded machine.
        e.command_timeout_ms = 2000;
    });
    let (node, ready) = HeraldProcess::start(&dir, &toml, &[]);
    wait_engine_up(ready.api, true);
    let (mut ws, _) = connect_user(ready.listen, "shop", "reader");
    subscribe(&mut ws, "news");
    redis.wait_numsub("probe:shop:news", 1);
    // The node's first two connections: publishing, then subscribing.
    assert_eq!(relay.nr_connections(), 2);

    // The subscription goes silent, the connection stays; nothing is published: only the
    // probe (published fine, never heard back) can tell.
    let lost = engine_disconnects(ready.api);
    relay.freeze(1, true);
    wait_engine_lost_and_back(ready.api, lost);
    node.wait_log("liveness probe not received back", 0);
    // Two fresh connections, and delivery works through them.
    assert_eq!(relay.nr_connections(), 4);
    expect_resync(&mut ws, &["all", "user.reader", "news"]);
    let r = publish_shop(ready.api, "news", "7");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(next_message(&mut ws).1, "7");

    // A link that hangs both ways: the probe is not even answered.
    let lost = engine_disconnects(ready.api);
    relay.freeze_all(&[2, 3], true);
    wait_engine_lost_and_back(ready.api, lost);
    node.wait_log("liveness probe not answered", 0);
    expect_resync(&mut ws, &["all", "user.reader", "news"]);
    let r = publish_shop(ready.api, "news", "8");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(next_message(&mut ws).1, "8");
}

/// A publish waiting for Redis's acknowledgement holds no thread: the API answers other
/// requests meanwhile, and the publish is answered once Redis takes it (here, after Redis
/// was paused for writes).
#[test]
fn the_api_serves_while_a_publish_waits_for_redis() {
    let redis = RedisServer::start("slow");
    let dir = TempDir::new("slow-node");
    let toml = cluster_toml(&dir, &redis, "slow:", |e| e.command_timeout_ms = 10_000);
    let (_node, ready) = HeraldProcess::start(&dir, &toml, &[]);
    wait_engine_up(ready.api, true);
    let (mut ws, _) = connect_user(ready.listen, "shop", "reader");
    subscribe(&mut ws, "news");
    redis.wait_numsub("slow:shop:news", 1);

    let mut c = redis.connection().unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("WRITE")
        .query(&mut c)
        .unwrap();
    let api = ready.api;
    let publisher = std::thread::spawn(move || publish_shop(api, "news", r#""late""#));
    // The node's PUBLISH is held by Redis for the pause.
    wait_until("the node's PUBLISH to wait in Redis", || {
        let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
        clients
            .lines()
            .any(|l| l.contains("flags=b") && l.contains("cmd=publish"))
    });
    let r = http_request(api, "GET", "/healthz", "", "");
    assert_eq!(r.status, 200);
    assert!(
        !publisher.is_finished(),
        "the health check was answered while the publish still waited for Redis"
    );
    let r = publisher.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(next_message(&mut ws).1, r#""late""#);
}

/// A node killed (SIGKILL) while messages are published: the other nodes deliver every
/// message in order, and the killed node's client, reconnected to another node, receives what
/// is published after its subscription.
#[test]
fn a_killed_node_costs_the_others_nothing_and_its_clients_move() {
    const FIRST: usize = 2000;
    const MORE: usize = 100;
    let (redis, prefix, mut nodes) = three_nodes("kill");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    for (_, ready, _) in &nodes[..2] {
        let (mut ws, _) = connect_user(ready.listen, "shop", "reader");
        subscribe(&mut ws, "load");
        let seen = seen.clone();
        readers.push(std::thread::spawn(move || {
            (0..FIRST + MORE)
                .map(|_| {
                    let n: usize = next_message(&mut ws).1.parse().expect("a number");
                    seen.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                    n
                })
                .collect::<Vec<_>>()
        }));
    }
    let (mut doomed, _) = connect_user(nodes[2].1.listen, "shop", "reader");
    subscribe(&mut doomed, "load");
    redis.wait_numsub(&shop_channel(&prefix, "load"), 3);

    let api = nodes[0].1.api;
    let publish_range = move |range: std::ops::Range<usize>| {
        for n in range {
            let r = publish_shop(api, "load", &n.to_string());
            assert_eq!(r.status, 200, "{}", r.text());
        }
    };
    let publisher = std::thread::spawn(move || publish_range(0..FIRST));
    wait_until("a quarter of the messages delivered", || {
        seen.load(std::sync::atomic::Ordering::Relaxed) >= FIRST / 4
    });
    nodes[2].0.child.kill().expect("SIGKILL");
    nodes[2].0.child.wait().expect("reaped");
    // Its client sees the connection end (not a read timeout), and comes back on another node.
    let ended = loop {
        match doomed.read() {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        !matches!(&ended, tungstenite::Error::Io(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the connection ended: {ended}"
    );
    let (mut moved, _) = connect_user(nodes[1].1.listen, "shop", "reader");
    subscribe(&mut moved, "load");
    redis.wait_numsub(&shop_channel(&prefix, "load"), 2);
    publisher.join().expect("publisher");
    publish_range(FIRST..FIRST + MORE);

    let expected: Vec<usize> = (0..FIRST + MORE).collect();
    for (i, reader) in readers.into_iter().enumerate() {
        assert!(
            reader.join().expect("reader") == expected,
            "node {i}: every message, in order"
        );
    }
    // The moved client: a run of consecutive messages ending with the last one published,
    // covering at least everything published after it subscribed.
    let mut got = Vec::new();
    while got.last() != Some(&(FIRST + MORE - 1)) {
        got.push(next_message(&mut moved).1.parse::<usize>().unwrap());
    }
    assert!(got.len() >= MORE, "{got:?}");
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
}

/// A STOMP SUBSCRIBE's RECEIPT, like herald.v1's ack, comes once Redis has the node's
/// subscription: a later frame's RECEIPT overtakes it while Redis is paused, and from the
/// RECEIPT on a publish reaches the subscription.
#[test]
fn a_stomp_subscribe_receipt_comes_once_redis_has_the_subscription() {
    let prefix = "stomprcpt:";
    let (redis, server, _ws) = engine_node("stomp-receipt", prefix);
    let at = server.listen;
    let (mut stomp, _) =
        tungstenite::client(format!("ws://{at}/stomp/shop"), tcp(at)).expect("the STOMP upgrade");
    let jwt = token("shop", "reader").0;
    stomp
        .send(tungstenite::Message::text(format!(
            "CONNECT\naccept-version:1.2\npasscode:{jwt}\n\n\0"
        )))
        .expect("CONNECT");
    assert!(recv_text(&mut stomp).starts_with("CONNECTED\n"));

    let pause = Duration::from_millis(800);
    let paused_at = pause_redis(&redis, pause);
    stomp
        .send(tungstenite::Message::text(
            "SUBSCRIBE\nid:s1\ndestination:/topic/fresh\nreceipt:sub\n\n\0\
             ACK\nid:x\nreceipt:ack\n\n\0",
        ))
        .expect("SUBSCRIBE and ACK");
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let text = recv_text(&mut stomp);
        if !text.trim_matches(['\r', '\n']).is_empty() {
            frames.push(text);
        }
    }
    let received = paused_at.elapsed();
    assert_eq!(
        frames,
        [
            "RECEIPT\nreceipt-id:ack\n\n\0",
            "RECEIPT\nreceipt-id:sub\n\n\0"
        ]
    );
    assert_waited_for_redis(received, pause, "the SUBSCRIBE's RECEIPT");
    assert_eq!(redis.numsub(&shop_channel(prefix, "fresh")), 1);
    let r = publish_shop(server.api, "fresh", r#"{"n":1}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let message = loop {
        let text = recv_text(&mut stomp);
        if !text.trim_matches(['\r', '\n']).is_empty() {
            break text;
        }
    };
    assert!(
        message.starts_with("MESSAGE\nsubscription:s1\ndestination:/topic/fresh\n"),
        "{message}"
    );
}

/// Two shards subscribe one topic while Redis has not answered the node's `SUBSCRIBE` yet:
/// the second shard finds the subscription pending (the first shard asked for it) and its ack
/// waits too, so neither client is acknowledged before Redis has the subscription.
#[test]
fn a_subscribe_on_another_shard_waits_for_the_pending_subscription() {
    let prefix = "pend:";
    let (redis, server, _ws) = engine_node("pending", prefix);
    let mut conns = connect_spread(server.listen, "shop", "spread", 2);
    let first = conns
        .iter()
        .position(|(_, w)| w.shard == 0)
        .expect("shard 0");
    let (mut a, _) = conns.swap_remove(first);
    let second = conns
        .iter()
        .position(|(_, w)| w.shard == 1)
        .expect("shard 1");
    let (mut b, _) = conns.swap_remove(second);

    let pause = Duration::from_millis(800);
    let paused_at = pause_redis(&redis, pause);
    for (ws, id) in [(&mut a, 1), (&mut b, 3)] {
        send_text(
            ws,
            &format!(r#"{{"op":"subscribe","topic":"pending","id":{id}}}"#),
        );
        send_text(ws, &format!(r#"{{"op":"ping","id":{}}}"#, id + 1));
        // The pong says the shard has made the subscription; its ack waits behind it.
        assert_eq!(
            recv_text(ws),
            format!(r#"{{"type":"pong","id":{}}}"#, id + 1)
        );
    }
    for (ws, id) in [(&mut a, 1), (&mut b, 3)] {
        assert_eq!(recv_text(ws), format!(r#"{{"type":"ack","id":{id}}}"#));
        let acked = paused_at.elapsed();
        assert_waited_for_redis(acked, pause, &format!("ack {id}"));
    }
    assert_eq!(redis.numsub(&shop_channel(prefix, "pending")), 1);
    let id = published_id(server.api, "pending", r#"{"n":1}"#);
    for ws in [&mut a, &mut b] {
        assert_eq!(
            next_message(ws),
            ("pending".into(), r#"{"n":1}"#.into(), id.clone())
        );
    }
}

/// A STOMP frame that is not a heart-beat.
fn recv_stomp(ws: &mut Client) -> String {
    loop {
        let text = recv_text(ws);
        if !text.trim_matches(['\r', '\n']).is_empty() {
            return text;
        }
    }
}

/// STOMP's `CONNECTED`, like the herald.v1 welcome, comes once Redis has the node's
/// subscriptions of the connection's implicit topics: with the token in `CONNECT` while Redis
/// is paused, and at once with the token at the upgrade when they exist already. From
/// `CONNECTED` on, a publish to the user reaches `/user/queue/...`.
#[test]
fn a_stomp_connected_comes_once_redis_has_the_implicit_subscriptions() {
    let prefix = "stompconn:";
    let (redis, server, _ws) = engine_node("stomp-connected", prefix);
    let at = server.listen;

    let (mut stomp, _) =
        tungstenite::client(format!("ws://{at}/stomp/shop"), tcp(at)).expect("the STOMP upgrade");
    let pause = Duration::from_millis(800);
    let paused_at = pause_redis(&redis, pause);
    let jwt = token("shop", "stomper").0;
    stomp
        .send(tungstenite::Message::text(format!(
            "CONNECT\naccept-version:1.2\npasscode:{jwt}\n\n\0"
        )))
        .expect("CONNECT");
    assert!(recv_stomp(&mut stomp).starts_with("CONNECTED\n"));
    let connected = paused_at.elapsed();
    assert_waited_for_redis(connected, pause, "CONNECTED");
    assert_eq!(redis.numsub(&shop_channel(prefix, "user.stomper")), 1);
    stomp
        .send(tungstenite::Message::text(
            "SUBSCRIBE\nid:q\ndestination:/user/queue/notice\nreceipt:r\n\n\0",
        ))
        .expect("SUBSCRIBE");
    assert_eq!(recv_stomp(&mut stomp), "RECEIPT\nreceipt-id:r\n\n\0");
    let r = publish_shop(server.api, "user.stomper", r#"{"n":1}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let message = recv_stomp(&mut stomp);
    assert!(
        message.starts_with("MESSAGE\nsubscription:q\ndestination:/user/queue/notice\n"),
        "{message}"
    );
    assert!(message.ends_with("\n\n{\"n\":1}\0"), "{message}");

    // The token at the upgrade: the implicit subscriptions are made then; CONNECT, sent once
    // Redis has them, is answered at once.
    let (jwt, _) = token("shop", "upgrader");
    let (mut early, _) = tungstenite::client(format!("ws://{at}/stomp/shop?token={jwt}"), tcp(at))
        .expect("the STOMP upgrade");
    redis.wait_numsub(&shop_channel(prefix, "user.upgrader"), 1);
    early
        .send(tungstenite::Message::text(
            "CONNECT\naccept-version:1.2\n\n\0",
        ))
        .expect("CONNECT");
    assert!(recv_stomp(&mut early).starts_with("CONNECTED\n"));
}

/// A `refresh` whose token brings a `device` claim subscribes the connection to
/// `device.<id>`; its ack waits for Redis's subscription of that topic like a `subscribe`
/// ack, and from the ack on a publish to the device reaches it.
#[test]
fn a_refresh_that_adds_a_device_is_acknowledged_once_redis_has_its_topic() {
    let prefix = "refdev:";
    let (redis, server, mut ws) = engine_node("refresh-device", prefix);
    let exp = now_secs() + 600;
    let jwt = mint(
        "shop",
        &serde_json::json!({"sub": "reader", "exp": exp, "device": "tablet-7"}),
    );

    let pause = Duration::from_millis(800);
    let paused_at = pause_redis(&redis, pause);
    send_text(
        &mut ws,
        &format!(r#"{{"op":"refresh","token":"{jwt}","id":1}}"#),
    );
    send_text(&mut ws, r#"{"op":"ping","id":2}"#);
    assert_eq!(recv_text(&mut ws), r#"{"type":"pong","id":2}"#);
    assert_eq!(
        recv_text(&mut ws),
        format!(r#"{{"type":"ack","id":1,"exp":{exp}}}"#)
    );
    let acked = paused_at.elapsed();
    assert_waited_for_redis(acked, pause, "the refresh ack");
    assert_eq!(redis.numsub(&shop_channel(prefix, "device.tablet-7")), 1);
    let id = published_id(server.api, "device.tablet-7", r#"{"n":1}"#);
    assert_eq!(
        next_message(&mut ws),
        ("device.tablet-7".into(), r#"{"n":1}"#.into(), id)
    );
}

/// `GET` on a node's API with the admin key; the JSON answer (200 asserted).
fn admin_get(api: std::net::SocketAddr, path: &str) -> Value {
    let r = http_request(api, "GET", path, ADMIN_KEY, "");
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

/// `POST /api/v1/disconnect` of `user` of `shop` through `api`.
fn disconnect_user(api: std::net::SocketAddr, user: &str) -> HttpResponse {
    let body = format!(r#"{{"project":"shop","user":"{user}"}}"#);
    http_request(api, "POST", "/api/v1/disconnect", SHOP_API_KEY, &body)
}

/// `DELETE /api/v1/connections/{id}` through `api` with `key`.
fn kick(api: std::net::SocketAddr, id: &str, key: &str) -> HttpResponse {
    http_request(api, "DELETE", &format!("/api/v1/connections/{id}"), key, "")
}

/// The node part of a connection id (`<local id>@<node>`).
fn node_of(id: &str) -> &str {
    id.split_once('@').expect("a cluster id names its node").1
}

#[test]
fn connections_are_listed_kicked_and_disconnected_across_nodes() {
    let (_redis, _prefix, nodes) = three_nodes("control");
    // alice on every node, bob on the last.
    let mut alices: Vec<Client> = nodes
        .iter()
        .map(|(_, ready, _)| connect_user(ready.listen, "shop", "alice").0)
        .collect();
    let (mut bob, _) = connect_user(nodes[2].1.listen, "shop", "bob");
    for (_, ready, _) in &nodes {
        let v = admin_get(ready.api, "/api/v1/connections?project=shop");
        let conns = v["connections"].as_array().expect("connections");
        assert_eq!(
            conns.len(),
            4,
            "every node lists every node's connections: {v}"
        );
        assert_eq!(v["partial"], false, "{v}");
        assert_eq!(v["nodes"].as_object().expect("nodes").len(), 3, "{v}");
        assert!(
            v["nodes"].as_object().unwrap().values().all(|s| s == "ok"),
            "{v}"
        );
        let names: BTreeSet<&str> = conns
            .iter()
            .map(|c| node_of(c["id"].as_str().unwrap()))
            .collect();
        assert_eq!(names.len(), 3, "ids name the three nodes: {v}");
    }
    // Filters and pages: alice's three connections, two per page, none twice.
    let api = nodes[0].1.api;
    let first = admin_get(api, "/api/v1/connections?project=shop&user=alice&limit=2");
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let second = admin_get(
        api,
        &format!("/api/v1/connections?project=shop&user=alice&limit=2&cursor={cursor}"),
    );
    assert_eq!(second["next_cursor"], Value::Null, "{second}");
    let ids: Vec<String> = first["connections"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["connections"].as_array().unwrap())
        .map(|c| {
            assert_eq!(c["user"], "alice");
            c["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3, "{ids:?}");

    // Kick bob (on the last node) through the first node's API.
    let v = admin_get(api, "/api/v1/connections?user=bob");
    let bob_id = v["connections"][0]["id"]
        .as_str()
        .expect("bob's id")
        .to_owned();
    let r = kick(api, &bob_id, ADMIN_KEY);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(expect_close(&mut bob).0, 4003);
    let r = kick(api, &bob_id, ADMIN_KEY);
    assert_refusal(&r, 404, "not_found");
    let r = kick(api, &bob_id, BLOG_API_KEY);
    assert_refusal(&r, 404, "not_found");

    // Statistics: every node's connections, per project.
    wait_until("bob's connection gone from the stats", || {
        admin_get(nodes[1].1.api, "/api/v1/stats")["cluster"]["connections"] == 3
    });
    let stats = admin_get(nodes[1].1.api, "/api/v1/stats");
    assert_eq!(
        stats["cluster"]["projects"]["shop"]["connections"], 3,
        "{stats}"
    );
    assert_eq!(stats["cluster"]["partial"], false, "{stats}");
    assert_eq!(
        stats["connections"], 1,
        "the node's own figures stay: {stats}"
    );
    // A project's page counts its connections on every node, and on each.
    let shop = admin_get(nodes[1].1.api, "/api/v1/projects/shop");
    assert_eq!(
        shop["connections"], 1,
        "the node's own figure stays: {shop}"
    );
    assert_eq!(shop["cluster"]["connections"], 3, "{shop}");
    assert_eq!(shop["cluster"]["partial"], false, "{shop}");
    let per_node = shop["cluster"]["per_node"].as_object().expect("per node");
    assert_eq!(per_node.len(), 3, "{shop}");
    for (node, v) in per_node {
        assert_eq!(shop["cluster"]["nodes"][node], "ok", "{shop}");
        assert_eq!(
            v["connections"],
            admin_get(nodes[1].1.api, "/api/v1/stats")["cluster"]["per_node"][node]["connections"],
            "{shop}"
        );
    }
    let blog = admin_get(nodes[1].1.api, "/api/v1/projects/blog");
    assert_eq!(blog["cluster"]["connections"], 0, "{blog}");

    // Disconnect alice everywhere through the middle node.
    let r = disconnect_user(nodes[1].1.api, "alice");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["disconnected"], 3, "{}", r.text());
    assert_eq!(r.json()["partial"], false, "{}", r.text());
    for ws in &mut alices {
        assert_eq!(expect_close(ws).0, 4003);
    }
}

#[test]
fn a_node_that_does_not_answer_is_reported_and_never_holds_the_request() {
    let (_redis, _prefix, mut nodes) = three_nodes("control-dead");
    let _clients: Vec<Client> = nodes
        .iter()
        .map(|(_, ready, _)| connect_user(ready.listen, "shop", "carol").0)
        .collect();
    let api = nodes[0].1.api;
    let v = admin_get(api, "/api/v1/connections");
    // A node other than the one asked (the listing is in node-name order, which need not be
    // the nodes' start order).
    let asked = format!(":{}", nodes[0].1.listen.port());
    let dead = v["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| node_of(c["id"].as_str().expect("an id")))
        .find(|n| !n.ends_with(&asked))
        .expect("a connection on another node")
        .to_owned();
    let dead_at = nodes
        .iter()
        .position(|(_, ready, _)| dead.ends_with(&format!(":{}", ready.listen.port())))
        .expect("the node named by its port");
    assert_ne!(dead_at, 0);
    nodes[dead_at].0.child.kill().expect("SIGKILL");
    nodes[dead_at].0.child.wait().expect("reaped");

    let started = std::time::Instant::now();
    let v = admin_get(api, "/api/v1/connections");
    assert!(
        started.elapsed() < TIMEOUT,
        "answered without the dead node"
    );
    assert_eq!(v["partial"], true, "{v}");
    assert_eq!(v["nodes"][&dead], "no_answer", "{v}");
    assert_eq!(v["connections"].as_array().unwrap().len(), 2, "{v}");
    let stats = admin_get(api, "/api/v1/stats");
    assert_eq!(stats["cluster"]["nodes"][&dead], "no_answer", "{stats}");
    assert_eq!(stats["cluster"]["connections"], 2, "{stats}");
    assert_eq!(stats["cluster"]["partial"], true, "{stats}");
    let shop = admin_get(api, "/api/v1/projects/shop");
    assert_eq!(shop["cluster"]["nodes"][&dead], "no_answer", "{shop}");
    assert_eq!(shop["cluster"]["connections"], 2, "{shop}");
    assert_eq!(shop["cluster"]["per_node"].get(&dead), None, "{shop}");
    assert_eq!(shop["cluster"]["partial"], true, "{shop}");
    // The node's dropped control requests are counted (none here: the queue never filled).
    let samples = scrape(api);
    assert!(
        samples
            .iter()
            .any(|(n, _, v)| n == "herald_engine_control_requests_dropped_total" && *v == 0.0),
        "herald_engine_control_requests_dropped_total exported"
    );
    let r = disconnect_user(api, "carol");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["disconnected"], 2, "{}", r.text());
    assert_eq!(r.json()["partial"], true, "{}", r.text());
    // A kick for the dead node's connection cannot be carried out: said so, not hung.
    let gone = format!("0-0-0@{dead}");
    let r = kick(api, &gone, ADMIN_KEY);
    assert_refusal(&r, 503, "node_unavailable");

    // Silent for 15 s, it is no longer a member: whole answers again, its ids unknown.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let whole = loop {
        let v = admin_get(api, "/api/v1/connections");
        if v["partial"] == false {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "still a member: {v}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(whole["nodes"].as_object().unwrap().len(), 2, "{whole}");
    assert_eq!(whole["nodes"].get(&dead), None, "{whole}");
    let r = kick(api, &gone, ADMIN_KEY);
    assert_refusal(&r, 404, "not_found");
}

/// `POST path` of `body` with `Idempotency-Key: key` through `api`.
fn publish_keyed(api: std::net::SocketAddr, path: &str, key: &str, body: &str) -> HttpResponse {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {SHOP_API_KEY}\r\n\
         Idempotency-Key: {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http(api, req.as_bytes())
}

#[test]
fn a_publish_retried_on_another_node_is_delivered_once() {
    let (redis, prefix, nodes) = three_nodes("idem");
    let (mut reader, _) = connect_user(nodes[2].1.listen, "shop", "reader");
    subscribe(&mut reader, "orders");
    redis.wait_numsub(&shop_channel(&prefix, "orders"), 1);
    let (a, b) = (nodes[0].1.api, nodes[1].1.api);

    let one = r#"{"project":"shop","topic":"orders","data":{"n":1}}"#;
    let first = publish_keyed(a, "/api/v1/publish", "order-1", one);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("idempotency-replayed"), None);
    let retry = publish_keyed(b, "/api/v1/publish", "order-1", one);
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.text(), first.text(), "the first answer, the same id");
    assert_eq!(retry.header("idempotency-replayed"), Some("true"));
    let other = r#"{"project":"shop","topic":"orders","data":{"n":2}}"#;
    let reused = publish_keyed(b, "/api/v1/publish", "order-1", other);
    assert_refusal(&reused, 422, "idempotency_key_reused");

    let batch = format!("[{one},{other}]");
    let first_batch = publish_keyed(b, "/api/v1/publish/batch", "order-2", &batch);
    assert_eq!(first_batch.status, 200, "{}", first_batch.text());
    let retry_batch = publish_keyed(nodes[2].1.api, "/api/v1/publish/batch", "order-2", &batch);
    assert_eq!(retry_batch.status, 200, "{}", retry_batch.text());
    assert_eq!(retry_batch.text(), first_batch.text());
    assert_eq!(retry_batch.header("idempotency-replayed"), Some("true"));

    // Then an unkeyed one: the subscriber got each accepted publish exactly once, in order.
    let r = publish_shop(a, "orders", r#""end""#);
    assert_eq!(r.status, 200, "{}", r.text());
    let got: Vec<String> = (0..4).map(|_| next_message(&mut reader).1).collect();
    assert_eq!(got, [r#"{"n":1}"#, r#"{"n":1}"#, r#"{"n":2}"#, r#""end""#]);
}
