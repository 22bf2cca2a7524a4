//! 5,000 concurrent authenticated connections on two shards all receive one broadcast.
//!
//! Client and server share the process: 5,000 × 2 sockets stay well under the 20,000
//! open-files limit.

mod common;

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const NR_CONNECTIONS: usize = 5000;
const NR_THREADS: usize = 4;
/// Bound of the waits that span all the connects (debug builds on two cores).
const SLOW: Duration = Duration::from_secs(60);
/// The broadcast, with spacing that must survive.
const DATA: &str = r#"{"hello": "everyone", "n": 5000}"#;

#[test]
fn five_thousand_connections_receive_one_broadcast() {
    // Clients read only at the end: a long heartbeat keeps the server from dropping them
    // for not answering pings in the meantime.
    let server = TestServer::start(|c| c.ws.heartbeat_interval_ms = 600_000);
    let addr = server.listen;
    let per_thread = NR_CONNECTIONS / NR_THREADS;
    // Each thread connects its share and reports the shards it landed on; once all are
    // connected the broadcast is published and each thread is told its id; each thread then
    // checks every one of its connections received it. Every wait is bounded.
    let (connected_tx, connected_rx) = mpsc::channel::<BTreeSet<u16>>();
    let mut threads = Vec::new();
    for t in 0..NR_THREADS {
        let (id_tx, id_rx) = mpsc::channel::<(String, u64)>();
        let connected_tx = connected_tx.clone();
        let handle = std::thread::spawn(move || {
            let mut conns = Vec::with_capacity(per_thread);
            let mut shards = BTreeSet::new();
            for i in 0..per_thread {
                let (ws, w) = connect_user(addr, "shop", &format!("u{t}-{i}"));
                shards.insert(w.shard);
                conns.push(ws);
            }
            connected_tx.send(shards).unwrap();
            let (id, before) = id_rx.recv_timeout(SLOW).expect("the broadcast id");
            for ws in &mut conns {
                expect_message(ws, "all", DATA, &id, before);
            }
            conns
        });
        threads.push((handle, id_tx));
    }
    drop(connected_tx);
    let mut shards = BTreeSet::new();
    for _ in 0..NR_THREADS {
        shards.extend(
            connected_rx
                .recv_timeout(SLOW)
                .expect("a client thread connected"),
        );
    }
    assert_eq!(
        shards,
        BTreeSet::from([0, 1]),
        "both shards hold connections"
    );
    assert_eq!(server.nr_connections(), NR_CONNECTIONS);
    let before = now_ms();
    let id = server.publish("shop", "all", DATA);
    for (_, id_tx) in &threads {
        id_tx.send((id.clone(), before)).unwrap();
    }
    let mut conns = Vec::new();
    for (t, _) in threads {
        conns.extend(t.join().expect("client thread"));
    }
    assert_eq!(conns.len(), NR_CONNECTIONS);
    // Per-shard gauges add up.
    let per_shard: Vec<i64> = server
        .hub
        .stats
        .iter()
        .map(|s| s.connections.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert_eq!(per_shard.iter().sum::<i64>(), NR_CONNECTIONS as i64);
    assert!(per_shard.iter().all(|&n| n > 0), "{per_shard:?}");
}
