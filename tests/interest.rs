//! Interest routing: a publication reaches only the shards holding subscribers of its topics
//! (a unicast wakes one shard), a subscription acked (or a welcome received) is routed to at
//! once, and the node's interest table holds only topics that still have subscribers.
//!
//! Which shards a publication reached is read from each shard's `publications` counter (one
//! per inbox message taken). Absence is shown without sleeping: after the publication under
//! test, a marker goes to `all`, which every shard with connections takes after it; once every
//! connection has the marker, the counters are final.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;
use herald::config::IoDriver;
use herald::metrics;

/// Connects users `<prefix>0`, `<prefix>1`, … until every shard holds one; returns one
/// (client, welcome) per shard, by shard id. Bounded: SO_REUSEPORT spreads by a hash of the
/// address pair, so 64 tries cover 4 shards with overwhelming probability.
fn one_user_per_shard(
    addr: SocketAddr,
    prefix: &str,
    nr_shards: usize,
) -> BTreeMap<u16, (String, Client)> {
    let mut by_shard = BTreeMap::new();
    for i in 0..64 {
        let user = format!("{prefix}{i}");
        let (ws, w) = connect_user(addr, "shop", &user);
        by_shard.entry(w.shard).or_insert((user, ws));
        if by_shard.len() == nr_shards {
            return by_shard;
        }
    }
    panic!("64 connections landed on shards {:?} only", by_shard.keys());
}

/// Each shard's count of publications taken from its inbox.
fn publications(server: &TestServer) -> Vec<u64> {
    server
        .hub
        .stats
        .iter()
        .map(|s| metrics::read(&s.publications))
        .collect()
}

/// Publishes a marker to `all` and waits until every connection has it as its next frame.
fn marker(server: &TestServer, conns: &mut BTreeMap<u16, (String, Client)>) {
    let id = server.publish("shop", "all", "\"marker\"");
    for (_, ws) in conns.values_mut() {
        let (topic, _, got, _) = split_message(&recv_text(ws));
        assert_eq!((topic.as_str(), got.as_str()), ("all", id.as_str()));
    }
}

/// How many publications each shard took since `before`.
fn woken_since(server: &TestServer, before: &[u64]) -> Vec<u64> {
    publications(server)
        .iter()
        .zip(before)
        .map(|(a, b)| a - b)
        .collect()
}

/// The registry index of `project`, as the interest table keys it.
fn project_idx(server: &TestServer, project: &str) -> u32 {
    server
        .hub
        .registry
        .load()
        .project(project)
        .expect("configured")
        .idx
}

fn unicast_scenario(nr_shards: usize) {
    let server = TestServer::with_shards(nr_shards, IoDriver::Auto);
    let mut conns = one_user_per_shard(server.listen, "u", nr_shards);
    let p = project_idx(&server, "shop");
    for target in 0..nr_shards as u16 {
        let before = publications(&server);
        let (user, ws) = conns.get_mut(&target).expect("one per shard");
        let topic = format!("user.{user}");
        assert_eq!(
            server.hub.interest.mask(p, &topic),
            1 << target,
            "the user's topic names its shard"
        );
        let sent = now_ms();
        let id = server.publish("shop", &topic, "1");
        expect_message(ws, &topic, "1", &id, sent);
        marker(&server, &mut conns);
        let woken = woken_since(&server, &before);
        let mut expected = vec![1; nr_shards];
        expected[target as usize] = 2;
        assert_eq!(
            woken, expected,
            "the unicast to shard {target} reached it alone (the marker reaches all)"
        );
    }
}

#[test]
fn a_unicast_wakes_only_its_users_shard_of_two() {
    unicast_scenario(2);
}

#[test]
fn a_unicast_wakes_only_its_users_shard_of_four() {
    unicast_scenario(4);
}

#[test]
fn a_topic_reaches_exactly_the_shards_of_its_subscribers() {
    let server = TestServer::with_shards(4, IoDriver::Auto);
    let mut conns = one_user_per_shard(server.listen, "u", 4);
    let p = project_idx(&server, "shop");
    for shard in [1u16, 3] {
        subscribe(&mut conns.get_mut(&shard).unwrap().1, "news");
    }
    assert_eq!(server.hub.interest.mask(p, "news"), 0b1010);
    assert_eq!(server.hub.interest.mask(p, "all"), 0b1111);
    let before = publications(&server);
    let sent = now_ms();
    let id = server.publish("shop", "news", "\"x\"");
    for shard in [1u16, 3] {
        expect_message(
            &mut conns.get_mut(&shard).unwrap().1,
            "news",
            "\"x\"",
            &id,
            sent,
        );
    }
    marker(&server, &mut conns);
    let woken = woken_since(&server, &before);
    assert_eq!(woken, [1, 2, 1, 2], "news went to shards 1 and 3 only");
    // A topic nobody subscribes to wakes no shard, and is still answered with an id.
    let before = publications(&server);
    server.publish("shop", "nobody", "1");
    marker(&server, &mut conns);
    let woken = woken_since(&server, &before);
    assert_eq!(woken, [1, 1, 1, 1], "only the marker");
}

/// A publish sent as soon as the ack (or the welcome) arrived reaches the subscriber, on
/// every shard, every time.
#[test]
fn a_publish_after_the_ack_or_welcome_always_arrives() {
    let server = TestServer::with_shards(2, IoDriver::Auto);
    let mut conns = one_user_per_shard(server.listen, "u", 2);
    for round in 0..100 {
        for (shard, (_, ws)) in conns.iter_mut() {
            let topic = format!("t.{shard}.{round}");
            subscribe(ws, &topic);
            let sent = now_ms();
            let id = server.publish("shop", &topic, &round.to_string());
            expect_message(ws, &topic, &round.to_string(), &id, sent);
        }
    }
    let mut seen = [0; 2];
    for round in 0..100 {
        let user = format!("fresh{round}");
        let (mut ws, w) = connect_user(server.listen, "shop", &user);
        seen[w.shard as usize] += 1;
        let sent = now_ms();
        let id = server.publish("shop", &format!("user.{user}"), "1");
        expect_message(&mut ws, &format!("user.{user}"), "1", &id, sent);
        close(ws);
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "both shards took some: {seen:?}"
    );
}

/// Subscribes, unsubscribes and disconnects leave in the table only the topics someone still
/// subscribes to: with the last connection gone it is empty.
#[test]
fn churn_leaves_only_topics_with_subscribers() {
    let server = TestServer::with_shards(4, IoDriver::Auto);
    let p = project_idx(&server, "shop");
    let stay = one_user_per_shard(server.listen, "stay", 4);
    for round in 0..3 {
        let mut churn: Vec<Client> = Vec::new();
        for i in 0..24 {
            let (mut ws, _) = connect_user(server.listen, "shop", &format!("c{i}"));
            subscribe(&mut ws, &format!("room.{}", i % 5));
            subscribe(&mut ws, "lobby");
            if (i + round) % 2 == 0 {
                let r = request(&mut ws, r#"{"op":"unsubscribe","topic":"lobby","id":"u"}"#);
                assert_eq!(r["type"], "ack", "{r}");
            }
            churn.push(ws);
        }
        assert!(server.hub.interest.mask(p, "room.0") != 0);
        for ws in churn {
            close(ws);
        }
        server.wait_connections(4);
        let mut left = server.hub.interest.entries();
        left.sort();
        let mut expected: Vec<(u32, String, u64)> = stay
            .iter()
            .map(|(shard, (user, _))| (p, format!("user.{user}"), 1 << shard))
            .collect();
        expected.push((p, "all".to_owned(), 0b1111));
        expected.sort();
        assert_eq!(
            left, expected,
            "round {round}: only `all` and the users still here"
        );
    }
    for (_, ws) in stay.into_values() {
        close(ws);
    }
    server.wait_connections(0);
    wait_until("the interest table to empty", || {
        server.hub.interest.is_empty()
    });
}
