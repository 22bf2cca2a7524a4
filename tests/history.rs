//! Message history and recovery on a node of its own: offsets on deliveries, positions on
//! acks and the welcome, `subscribe` with `since` and `recover`, all or nothing, and gap-free,
//! duplicate-free sequences for clients that disconnect and reconnect under load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use herald::config::{Config, HistoryConfig};
use serde_json::{Value, json};
use tungstenite::Message;

/// `shop` keeps `news*` (size `size`, `ttl_secs`) and `user.*`; recoveries replay at most 10.
fn history(c: &mut Config, size: usize, ttl_secs: u64) {
    c.server.history_max_replay = 10;
    c.projects[0].history = vec![
        HistoryConfig {
            topics: "news*".into(),
            size,
            ttl_secs,
        },
        HistoryConfig {
            topics: "user.*".into(),
            size: 100,
            ttl_secs: 300,
        },
    ];
}

fn subscribe_since(ws: &mut Client, topic: &str, since: Option<(&str, u64)>) -> Value {
    let mut op = json!({"op": "subscribe", "topic": topic, "id": 1});
    if let Some((epoch, offset)) = since {
        op["since"] = json!({"epoch": epoch, "offset": offset});
    }
    request(ws, &op.to_string())
}

/// The epoch of `news` (read by a subscriber that then leaves), after which 1..=`n` are
/// published to it.
fn epoch_then_publish(server: &TestServer, n: i64) -> String {
    let (mut probe, _) = connect_user(server.listen, "shop", "probe");
    let epoch = subscribe_since(&mut probe, "news", None)["epoch"]
        .as_str()
        .expect("an epoch")
        .to_owned();
    close(probe);
    for i in 1..=n {
        server.publish("shop", "news", &i.to_string());
    }
    epoch
}

/// No text frame within a short while.
fn silence(ws: &mut Client) {
    let tcp = ws.get_ref();
    tcp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    match ws.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        Ok(Message::Ping(_) | Message::Pong(_)) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    ws.get_ref().set_read_timeout(Some(TIMEOUT)).unwrap();
}

/// A client that saw up to offset 2 reconnects with `since` and gets 3..5, then live 6..,
/// with `recovered: true`.
#[test]
fn a_client_recovers_what_it_missed_then_goes_live() {
    let server = TestServer::start(|c| history(c, 100, 300));
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    let ack = subscribe_since(&mut ws, "news", None);
    let epoch = ack["epoch"].as_str().expect("an epoch").to_owned();
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 0})
    );
    for n in 1..=2 {
        server.publish("shop", "news", &n.to_string());
    }
    assert_eq!(message_at(&mut ws, "news"), (1, 1));
    assert_eq!(message_at(&mut ws, "news"), (2, 2));
    close(ws);
    for n in 3..=5 {
        server.publish("shop", "news", &n.to_string());
    }
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    let ack = subscribe_since(&mut ws, "news", Some((&epoch, 2)));
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 5, "recovered": true})
    );
    for n in 3..=5 {
        assert_eq!(message_at(&mut ws, "news"), (n, n as i64));
    }
    for n in 6..=7 {
        server.publish("shop", "news", &n.to_string());
    }
    assert_eq!(message_at(&mut ws, "news"), (6, 6));
    assert_eq!(message_at(&mut ws, "news"), (7, 7));
    silence(&mut ws);
    // A topic without history has neither offsets nor positions.
    subscribe(&mut ws, "other");
    server.publish("shop", "other", "1");
    let m = recv_json(&mut ws);
    assert!(m.get("offset").is_none(), "{m}");
}

/// When the missed messages cannot all be had, the ack says why and nothing is replayed;
/// live messages follow from the stream's position.
#[test]
fn an_impossible_recovery_replays_nothing_and_says_why() {
    let server = TestServer::start(|c| history(c, 5, 300));
    let epoch = epoch_then_publish(&server, 8);
    let refused = |server: &TestServer, since: (&str, u64), reason: &str| {
        let (mut ws, _) = connect_user(server.listen, "shop", "alice");
        let ack = subscribe_since(&mut ws, "news", Some(since));
        let epoch = since.0;
        assert_eq!(
            ack,
            json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 8,
                   "recovered": false, "reason": reason})
        );
        silence(&mut ws);
        ws
    };
    // Another epoch (a stream lost, or another node's).
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    let ack = subscribe_since(&mut ws, "news", Some(("not-this-one", 7)));
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 8,
               "recovered": false, "reason": "epoch_changed"})
    );
    silence(&mut ws);
    // An offset the stream never gave in this epoch.
    refused(&server, (&epoch, 9), "epoch_changed");
    // The stream holds 4..8 only.
    refused(&server, (&epoch, 2), "too_many");
    // Within reach: 4..8.
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    let ack = subscribe_since(&mut ws, "news", Some((&epoch, 3)));
    assert_eq!(ack["recovered"], true, "{ack}");
    for n in 4..=8 {
        assert_eq!(message_at(&mut ws, "news"), (n, n as i64));
    }
    // Past the TTL (1 s).
    let server = TestServer::start(|c| history(c, 5, 1));
    let epoch = epoch_then_publish(&server, 8);
    std::thread::sleep(Duration::from_millis(2100));
    let mut ws = refused(&server, (&epoch, 6), "expired");
    server.publish("shop", "news", "9");
    assert_eq!(
        message_at(&mut ws, "news"),
        (9, 9),
        "live from the position"
    );
}

/// More missed than `server.history_max_replay` (10): nothing replayed.
#[test]
fn a_recovery_over_the_replay_limit_replays_nothing() {
    let server = TestServer::start(|c| history(c, 100, 300));
    let epoch = epoch_then_publish(&server, 20);
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    let ack = subscribe_since(&mut ws, "news", Some((&epoch, 9)));
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "epoch": epoch, "offset": 20,
               "recovered": false, "reason": "over_limit"})
    );
    silence(&mut ws);
    let ack = subscribe_since(&mut ws, "news.eu", Some((&epoch, 1)));
    assert_eq!(ack["reason"], "epoch_changed", "{ack}");
    let (mut ws, _) = connect_user(server.listen, "shop", "carol");
    let ack = subscribe_since(&mut ws, "news", Some((&epoch, 10)));
    assert_eq!(ack["recovered"], true, "exactly the limit: {ack}");
    for n in 11..=20 {
        assert_eq!(message_at(&mut ws, "news"), (n, n as i64));
    }
}

/// The implicit `user.<sub>` topic: the welcome tells its position, `recover` right after it
/// replays what was missed; a client that does not ask gets what came since the welcome
/// before the answer to its next op.
#[test]
fn the_welcome_tells_positions_and_recover_replays_the_implicit_topics() {
    let server = TestServer::start(|c| history(c, 100, 300));
    let (mut ws, w) = connect_user(server.listen, "shop", "alice");
    let welcome: Value = serde_json::from_str(&w.text).unwrap();
    let at = &welcome["history"]["user.alice"];
    let epoch = at["epoch"].as_str().expect("an epoch").to_owned();
    assert_eq!(at["offset"], 0, "{welcome}");
    assert!(
        welcome["history"].get("all").is_none(),
        "no history on `all`"
    );
    let r = request(
        &mut ws,
        &json!({"op": "recover", "id": 2, "since": {"user.alice": {"epoch": epoch, "offset": 0}}})
            .to_string(),
    );
    assert_eq!(
        r,
        json!({"type": "ack", "id": 2,
               "history": {"user.alice": {"epoch": epoch, "offset": 0, "recovered": true}}})
    );
    for n in 1..=2 {
        publish_to_user(&server, "alice", n);
    }
    assert_eq!(message_at(&mut ws, "user.alice"), (1, 1));
    assert_eq!(message_at(&mut ws, "user.alice"), (2, 2));
    let again = request(&mut ws, r#"{"op":"recover","id":3,"since":{}}"#);
    assert_eq!(again["code"], "bad_request", "{again}");
    close(ws);
    for n in 3..=4 {
        publish_to_user(&server, "alice", n);
    }
    let (mut ws, w) = connect_user(server.listen, "shop", "alice");
    let welcome: Value = serde_json::from_str(&w.text).unwrap();
    assert_eq!(welcome["history"]["user.alice"]["offset"], 4, "{welcome}");
    publish_to_user(&server, "alice", 5);
    silence(&mut ws);
    let r = request(
        &mut ws,
        &json!({"op": "recover", "since": {"user.alice": {"epoch": epoch, "offset": 2}}})
            .to_string(),
    );
    assert_eq!(r["history"]["user.alice"]["recovered"], true, "{r}");
    assert_eq!(r["history"]["user.alice"]["offset"], 5, "{r}");
    for n in 3..=5 {
        assert_eq!(message_at(&mut ws, "user.alice"), (n, n as i64));
    }
    close(ws);
    // No `recover`: held since the welcome, then sent before the next op's answer.
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    publish_to_user(&server, "alice", 6);
    silence(&mut ws);
    send_text(&mut ws, r#"{"op":"ping","id":9}"#);
    assert_eq!(message_at(&mut ws, "user.alice"), (6, 6));
    assert_eq!(recv_json(&mut ws), json!({"type": "pong", "id": 9}));
    publish_to_user(&server, "alice", 7);
    assert_eq!(message_at(&mut ws, "user.alice"), (7, 7));
}

fn publish_to_user(server: &TestServer, user: &str, n: i64) {
    server.publish("shop", &format!("user.{user}"), &n.to_string());
}

/// A publisher at about 5,000 messages a second on 50 topics; 500 clients (10 a topic) drop
/// their connection every few dozen messages and reconnect with `since`. Each ends with
/// every offset of its topic exactly once, in order, each with its own data.
#[test]
fn clients_reconnecting_under_load_see_every_message_once_in_order() {
    const NR_TOPICS: usize = 50;
    const NR_CLIENTS: usize = 500;
    const PUBLISH_FOR: Duration = Duration::from_secs(5);
    let server = TestServer::start(|c| {
        history(c, 2000, 300);
        c.server.history_max_replay = 2000;
        c.limits.handshakes_per_ip_per_sec = 0;
        c.limits.connections_per_ip = 0;
        c.limits.max_pending_handshakes_per_ip = 0;
        c.limits.messages_per_conn_per_sec = 0;
    });
    let project = server.hub.registry.load().project("shop").unwrap().idx;
    let done = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let addr = server.listen;
    let clients: Vec<_> = (0..NR_CLIENTS)
        .map(|i| {
            let done = done.clone();
            let ready = ready_tx.clone();
            std::thread::spawn(move || {
                let topic = format!("news.{}", i % NR_TOPICS);
                let mut seen: Vec<(u64, i64)> = Vec::new();
                let mut rng = i as u64 * 2_654_435_761 + 1;
                let (mut ws, _) = connect_user(addr, "shop", &format!("u{i}"));
                let ack = subscribe_since(&mut ws, &topic, None);
                let epoch = ack["epoch"].as_str().unwrap().to_owned();
                assert_eq!(ack["offset"], 0);
                ready.send(()).unwrap();
                let mut last = 0;
                let mut finishing = false;
                loop {
                    rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let take = 5 + (rng >> 33) % 40;
                    for _ in 0..take {
                        match read_message(&mut ws, &topic) {
                            Some(m) => {
                                last = m.0;
                                seen.push(m);
                            }
                            None => break,
                        }
                    }
                    if finishing {
                        return (topic, seen);
                    }
                    finishing = done.load(Ordering::Acquire);
                    drop(ws);
                    let (next, _) = connect_user(addr, "shop", &format!("u{i}"));
                    ws = next;
                    let ack = subscribe_since(&mut ws, &topic, Some((&epoch, last)));
                    assert_eq!(ack["recovered"], true, "{ack}");
                    if finishing {
                        // Everything up to the final position, then nothing more.
                        let top = ack["offset"].as_u64().unwrap();
                        while last < top {
                            let m = read_message(&mut ws, &topic).expect("the rest");
                            last = m.0;
                            seen.push(m);
                        }
                        return (topic, seen);
                    }
                }
            })
        })
        .collect();
    for _ in 0..NR_CLIENTS {
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("clients connect");
    }
    let mut counts = [0i64; NR_TOPICS];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < PUBLISH_FOR {
        // Paced at about 5,000 a second.
        let due = start.elapsed().as_micros() as u64 / 200;
        while sent < due {
            let k = sent as usize % NR_TOPICS;
            counts[k] += 1;
            let topic = herald::pubsub::Topic::parse(&format!("news.{k}")).unwrap();
            let data = serde_json::value::RawValue::from_string(counts[k].to_string()).unwrap();
            loop {
                match server
                    .hub
                    .publish(project, std::slice::from_ref(&topic), &data)
                {
                    Ok(_) => break,
                    Err(herald::hub::PublishError::Busy(_)) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    done.store(true, Ordering::Release);
    let mut nr_checked = 0;
    for c in clients {
        let (topic, seen) = c.join().expect("client thread");
        let k: usize = topic["news.".len()..].parse().unwrap();
        let want: Vec<(u64, i64)> = (1..=counts[k]).map(|n| (n as u64, n)).collect();
        assert_eq!(seen.len(), want.len(), "{topic}: count");
        assert!(seen == want, "{topic}: a gap, a duplicate or a mismatch");
        nr_checked += seen.len();
    }
    assert!(sent >= 20_000, "published {sent}");
    assert!(nr_checked >= 500 * 400, "checked {nr_checked}");
    let stats = &server.hub.history.stats;
    assert_eq!(
        stats
            .not_recovered
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>(),
        0
    );
    assert!(stats.recovered.load(Ordering::Relaxed) >= NR_CLIENTS as u64 * 2);
}

/// The next message of `topic`, or `None` when none comes for a second (the publisher has
/// stopped).
fn read_message(ws: &mut Client, topic: &str) -> Option<(u64, i64)> {
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let got = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let m: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(m["topic"], topic, "{m}");
                break Some((m["offset"].as_u64().unwrap(), m["data"].as_i64().unwrap()));
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break None;
            }
            other => panic!("{other:?}"),
        }
    };
    ws.get_ref().set_read_timeout(Some(TIMEOUT)).unwrap();
    got
}

/// Far more than the cap is stored (in a process of its own, whose memory is its own): the
/// store stays under the cap, by its metric, and the process's memory stays bounded.
#[test]
fn history_never_exceeds_its_cap() {
    const CAP: usize = 4 << 20;
    let dir = TempDir::new("history-cap");
    let mut cfg = config();
    history(&mut cfg, 100_000, 3600);
    cfg.server.history_max_bytes = CAP;
    cfg.server.state_dir = Some(dir.0.join("state"));
    cfg.limits.api_requests_per_key_per_sec = 0;
    let (node, ready) = HeraldProcess::start(&dir, &toml::to_string(&cfg).unwrap(), &[]);
    let topics: Vec<String> = (0..50).map(|k| format!("\"news.{k}\"")).collect();
    let body = format!(
        r#"{{"project":"shop","topics":[{}],"data":"{}"}}"#,
        topics.join(","),
        "x".repeat(1000)
    );
    let sample = |name: &str| {
        scrape(ready.api)
            .into_iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .2
    };
    let mut rss_full = 0;
    // 50 topics × 4,000 publishes of 1 kB: 200 MB through a 4 MiB store.
    for i in 0..4000 {
        let r = publish(ready.api, SHOP_API_KEY, &body);
        assert_eq!(r.status, 200, "{}", r.text());
        if i % 100 == 99 {
            assert!(sample("herald_history_bytes") <= CAP as f64);
        }
        if i == 400 {
            rss_full = rss_kib(node.pid());
        }
    }
    assert!(sample("herald_history_evicted_total") > 190_000.0);
    let held = sample("herald_history_entries");
    assert!(
        held > 1000.0 && held < (CAP / 1000) as f64,
        "{held} entries"
    );
    let grown = rss_kib(node.pid()).saturating_sub(rss_full);
    assert!(
        grown < 16 * 1024,
        "RSS grew {grown} KiB after the store was full"
    );
}

fn rss_kib(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Bad history settings are refused at start, naming the key and the rule.
#[test]
fn bad_history_settings_are_refused_by_name() {
    let refused = |tweak: &dyn Fn(&mut Config)| {
        let mut c = config();
        history(&mut c, 100, 300);
        tweak(&mut c);
        c.validate().unwrap_err().to_string()
    };
    let e = refused(&|c| c.projects[0].history[0].size = 0);
    assert!(e.contains("projects[0].history[0].size"), "{e}");
    let e = refused(&|c| c.projects[0].history[1].ttl_secs = 0);
    assert!(e.contains("projects[0].history[1].ttl_secs"), "{e}");
    let e = refused(&|c| c.projects[0].history[0].topics = "news!*".into());
    assert!(e.contains("projects[0].history[0].topics"), "{e}");
    let e = refused(&|c| c.server.history_max_replay = 0);
    assert!(e.contains("server.history_max_replay"), "{e}");
    let mut ok = config();
    history(&mut ok, 100, 300);
    ok.projects[0].history[0].topics = "all".into();
    ok.validate().unwrap();
}

/// A frame with an offset must still fit an empty connection queue: the offset's room is
/// counted when a publish to a topic with history is checked.
#[test]
fn the_offset_counts_toward_the_largest_frame() {
    let server = TestServer::start(|c| {
        history(c, 100, 300);
        c.ws.max_outbound_queue_bytes = 1000;
        c.api.max_body_bytes = 2000;
    });
    let fits = 1000 - herald::hub::MESSAGE_FRAME_OVERHEAD - "news".len() - 2;
    let body = |topic: &str, n: usize| {
        format!(
            r#"{{"project":"shop","topic":"{topic}","data":"{}"}}"#,
            "x".repeat(n)
        )
    };
    let r = publish(server.api, SHOP_API_KEY, &body("nows", fits));
    assert_eq!(r.status, 200, "no history: {}", r.text());
    let r = publish(server.api, SHOP_API_KEY, &body("news", fits));
    assert_eq!(r.status, 413, "{}", r.text());
    let r = publish(server.api, SHOP_API_KEY, &body("news", fits - 30));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A client that never sends an op still gets its implicit topics: the hold after the welcome
/// ends at the first message a second after it, with what was held first, in order.
#[test]
fn a_silent_client_gets_its_held_messages_with_the_first_after_the_hold() {
    let server = TestServer::start(|c| history(c, 100, 300));
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    publish_to_user(&server, "alice", 1);
    silence(&mut ws);
    std::thread::sleep(Duration::from_millis(1100));
    publish_to_user(&server, "alice", 2);
    assert_eq!(message_at(&mut ws, "user.alice"), (1, 1));
    assert_eq!(message_at(&mut ws, "user.alice"), (2, 2));
    publish_to_user(&server, "alice", 3);
    assert_eq!(message_at(&mut ws, "user.alice"), (3, 3));
    silence(&mut ws);
}
