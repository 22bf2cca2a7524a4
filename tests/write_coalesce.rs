//! A shard holds a write to many connections that closely follows its previous one for
//! `server.write_coalesce_us`, so that messages arriving meanwhile go out in the same send to
//! each connection; writes to few connections, sparse fan-outs, and a zero setting go out at
//! once. Either way every subscriber gets every message, exact and in order.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

/// Subscribers of a wide write: the fewest a write must reach to be held.
const WIDE: usize = 64;

/// A one-shard server waiting `wait_us` before a close wide write, and `n` subscribers of
/// `feed`.
fn subscribers(wait_us: u32, n: usize) -> (TestServer, Vec<Client>) {
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        c.server.write_coalesce_us = wait_us;
    });
    let clients = (0..n)
        .map(|i| {
            let (mut ws, _) = connect_user(server.listen, "shop", &format!("reader-{i}"));
            subscribe(&mut ws, "feed");
            ws
        })
        .collect();
    (server, clients)
}

/// Publishes `seqs` back to back; returns their ids.
fn publish_all(server: &TestServer, seqs: &[u32]) -> Vec<String> {
    seqs.iter()
        .map(|seq| server.publish("shop", "feed", &seq.to_string()))
        .collect()
}

/// Every client reads exactly `(seq, id)` in order.
fn read_all(clients: &mut [Client], want: &[(u32, String)]) {
    for ws in clients.iter_mut() {
        for (seq, id) in want {
            let (topic, data, got_id, _) = split_message(&recv_text(ws));
            assert_eq!(
                (topic.as_str(), data, &got_id),
                ("feed", seq.to_string(), id)
            );
        }
    }
}

fn waits(server: &TestServer) -> u64 {
    server.stat(|s| s.coalesce_waits.load(Ordering::Relaxed))
}

fn ring_sends(server: &TestServer) -> u64 {
    server.stat(|s| s.ring_sends.load(Ordering::Relaxed))
}

/// Two publications right after a wide write share one send per subscriber: the first is
/// held, the second arrives while it waits.
#[test]
fn a_close_wide_write_waits_and_takes_what_arrives_meanwhile() {
    let (server, mut clients) = subscribers(500_000, WIDE);
    let first = publish_all(&server, &[1]);
    read_all(&mut clients, &[(1, first[0].clone())]);
    assert_eq!(waits(&server), 0, "the first wide write is not held");
    let sends_before = ring_sends(&server);
    let ids = publish_all(&server, &[2, 3]);
    read_all(&mut clients, &[(2, ids[0].clone()), (3, ids[1].clone())]);
    assert_eq!(waits(&server), 1, "the second wide write waited once");
    assert_eq!(
        ring_sends(&server) - sends_before,
        WIDE as u64,
        "both messages went out in one send per subscriber"
    );
    assert_eq!(server.slow_consumer_closes(), 0);
}

/// A wide write long after the previous one (more than eight waits) goes out at once.
#[test]
fn a_sparse_wide_write_goes_out_at_once() {
    let (server, mut clients) = subscribers(20_000, WIDE);
    let first = publish_all(&server, &[1]);
    read_all(&mut clients, &[(1, first[0].clone())]);
    std::thread::sleep(Duration::from_millis(400));
    let second = publish_all(&server, &[2]);
    read_all(&mut clients, &[(2, second[0].clone())]);
    assert_eq!(waits(&server), 0);
}

/// Writes to fewer connections than a wide write reaches never wait, even right after a wide
/// write.
#[test]
fn a_narrow_write_never_waits() {
    let (server, mut clients) = subscribers(500_000, WIDE);
    subscribe(&mut clients[0], "solo");
    let first = publish_all(&server, &[1]);
    read_all(&mut clients, &[(1, first[0].clone())]);
    let ids: Vec<_> = (2..=4)
        .map(|seq| server.publish("shop", "solo", &seq.to_string()))
        .collect();
    for (seq, id) in (2..).zip(ids) {
        let (topic, data, got_id, _) = split_message(&recv_text(&mut clients[0]));
        assert_eq!(
            (topic.as_str(), data, got_id),
            ("solo", seq.to_string(), id)
        );
    }
    assert_eq!(waits(&server), 0);
}

/// With the setting at zero a wide write never waits.
#[test]
fn zero_never_waits() {
    let (server, mut clients) = subscribers(0, WIDE);
    for seq in 1..=4 {
        let id = publish_all(&server, &[seq]);
        read_all(&mut clients, &[(seq, id[0].clone())]);
    }
    assert_eq!(waits(&server), 0);
}
