//! A shard about to write a publication to many connections, its previous such write being
//! less than two waits old, waits `server.write_coalesce_ms` first, so that publications
//! arriving meanwhile go out in the same send to each connection; sparse fan-outs,
//! publications that reach few connections, and a zero setting go out at once. Either way
//! every subscriber gets every message, exact and in order.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

/// Subscribers of a wide publication: the fewest a publication must reach to be held.
const WIDE: usize = 64;

/// A one-shard server waiting `wait_ms` before a dense fan-out's write, and `n` subscribers
/// of `feed`.
fn subscribers(wait_ms: u32, n: usize) -> (TestServer, Vec<Client>) {
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        c.server.write_coalesce_ms = wait_ms;
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

/// Publishes `seqs` to `topic` back to back; returns `(seq, id)` of each.
fn publish_all(server: &TestServer, topic: &str, seqs: &[u32]) -> Vec<(u32, String)> {
    seqs.iter()
        .map(|&seq| (seq, server.publish("shop", topic, &seq.to_string())))
        .collect()
}

/// Every client reads exactly `(seq, id)` of `topic`, in order.
fn read_all(clients: &mut [Client], topic: &str, want: &[(u32, String)]) {
    for ws in clients.iter_mut() {
        for (seq, id) in want {
            let (got_topic, data, got_id, _) = split_message(&recv_text(ws));
            assert_eq!(
                (got_topic.as_str(), data, &got_id),
                (topic, seq.to_string(), id)
            );
        }
    }
}

/// Publishes each of `seqs` to `feed` and has every client read it before the next, pausing
/// `pause` after each.
fn one_at_a_time(
    server: &TestServer,
    clients: &mut [Client],
    seqs: std::ops::RangeInclusive<u32>,
    pause: Duration,
) {
    for seq in seqs {
        let one = publish_all(server, "feed", &[seq]);
        read_all(clients, "feed", &one);
        std::thread::sleep(pause);
    }
}

fn stat(
    server: &TestServer,
    pick: fn(&herald::metrics::ShardStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    server.stat(|s| pick(s).load(Ordering::Relaxed))
}

fn waits(server: &TestServer) -> u64 {
    stat(server, |s| &s.coalesce_waits)
}

/// Three publications back to back after a quiet spell: the first goes out at once (nothing
/// wide was written lately), the second, following it closely, is held and the third arrives
/// while it waits, so the three take at most two sends per subscriber. (The shard's sweep tick writes
/// whatever is queued, held or not: a round with a tick inside it proves nothing and is played
/// again.)
#[test]
fn a_dense_fan_out_waits_and_takes_what_arrives_meanwhile() {
    let (server, mut clients) = subscribers(100, WIDE);
    for (round, seq) in (0..5).zip((1..).step_by(3)) {
        // Quiet for more than two waits: the next wide write is not held.
        std::thread::sleep(Duration::from_millis(250));
        let (sweeps, sends, held) = (
            stat(&server, |s| &s.sweeps),
            stat(&server, |s| &s.ring_sends),
            waits(&server),
        );
        let three = publish_all(&server, "feed", &[seq, seq + 1, seq + 2]);
        read_all(&mut clients, "feed", &three);
        if stat(&server, |s| &s.sweeps) != sweeps {
            continue;
        }
        assert!(waits(&server) > held, "round {round}: no write waited");
        let sends = stat(&server, |s| &s.ring_sends) - sends;
        assert!(
            (WIDE as u64..=2 * WIDE as u64).contains(&sends),
            "round {round}: three messages took {sends} sends to {WIDE} subscribers"
        );
        assert_eq!(server.slow_consumer_closes(), 0);
        return;
    }
    panic!("a sweep tick fell inside every round");
}

/// A wide write more than two waits after the previous one goes out at once.
#[test]
fn a_sparse_fan_out_goes_out_at_once() {
    let (server, mut clients) = subscribers(20, WIDE);
    one_at_a_time(&server, &mut clients, 1..=3, Duration::from_millis(300));
    assert_eq!(waits(&server), 0);
}

/// Publications that each reach fewer connections than a wide one never wait, even right
/// after a wide write and however many of them are queued together.
#[test]
fn narrow_publications_never_wait() {
    let (server, mut clients) = subscribers(100, WIDE);
    subscribe(&mut clients[0], "solo");
    let first = publish_all(&server, "feed", &[1]);
    read_all(&mut clients, "feed", &first);
    let solo = publish_all(&server, "solo", &[2, 3, 4]);
    read_all(&mut clients[..1], "solo", &solo);
    assert_eq!(waits(&server), 0);
}

/// With the setting at zero a dense fan-out never waits.
#[test]
fn zero_never_waits() {
    let (server, mut clients) = subscribers(0, WIDE);
    one_at_a_time(&server, &mut clients, 1..=4, Duration::ZERO);
    assert_eq!(waits(&server), 0);
}
