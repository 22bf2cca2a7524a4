//! A shard writes a batch's sends either through its io_uring (`server.write_batch =
//! "io_uring"`, one system call for many connections) or with one `sendmsg` per connection:
//! either way every subscriber gets every message, whole, once and in order, including one
//! whose socket takes only part of a frame or nothing at all (a slow reader with a small
//! receive window) while the others read as fast as they can.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use herald::config::WriteBatch;

/// Subscribers reading as fast as they can.
const NR_FAST: usize = 24;
/// Publications.
const NR_MESSAGES: usize = 150;
/// Bytes of padding per publication: several of the slow reader's segments.
const PAD: usize = 8 * 1024;
/// Bytes of padding of the first publication: far more than the slow reader's new socket
/// takes at once, so its send is a partial write.
const BIG_PAD: usize = 512 * 1024;

fn read_all(ws: &mut Client) {
    for want in 1..=NR_MESSAGES {
        let got = padded_seq(&recv_text(ws), "feed", PAD);
        assert_eq!(got, want, "messages out of order");
    }
}

fn read_big(ws: &mut Client) {
    assert_eq!(padded_seq(&recv_text(ws), "feed", BIG_PAD), 0);
}

/// Broadcasts to fast readers and one slow reader; returns (sends through the ring, those
/// left unfinished: a partial write or a full socket buffer).
fn broadcast_with_slow_reader(write_batch: WriteBatch) -> (u64, u64) {
    let server = TestServer::start(|c| {
        c.server.shards = 1;
        c.server.write_batch = write_batch;
        // Room for everything the slow reader is sent before it reads.
        c.ws.max_outbound_queue_bytes = 4 << 20;
    });
    let mut slow = small_window_client(server.listen, "shop", "slow");
    subscribe(&mut slow, "feed");
    let fast: Vec<_> = (0..NR_FAST)
        .map(|i| {
            let (mut ws, _) = connect_user(server.listen, "shop", &format!("fast-{i}"));
            subscribe(&mut ws, "feed");
            std::thread::spawn(move || {
                read_big(&mut ws);
                read_all(&mut ws);
            })
        })
        .collect();
    // The slow reader's socket takes part of this, and the rest follows as it reads.
    server.publish("shop", "feed", &padded_data(0, BIG_PAD));
    read_big(&mut slow);
    // Its socket fills up and refuses more while it does not read.
    for seq in 1..=NR_MESSAGES {
        server.publish("shop", "feed", &padded_data(seq, PAD));
    }
    read_all(&mut slow);
    for reader in fast {
        reader
            .join()
            .expect("a fast reader got every message in order");
    }
    assert_eq!(server.slow_consumer_closes(), 0);
    // As operators read them: /metrics shows the shards' counters (a send's result is
    // counted once the shard has reaped it, which may be just after its reader got it).
    let stat = |pick: fn(&herald::metrics::ShardStats) -> &std::sync::atomic::AtomicU64| {
        server.stat(|s| pick(s).load(Ordering::Relaxed))
    };
    let mut shown = (0, 0);
    wait_until("/metrics to show the shards' write-ring counters", || {
        let m = scrape(server.api);
        shown = (
            metric(&m, "herald_ring_sends_total", "") as u64,
            metric(&m, "herald_ring_sends_unfinished_total", "") as u64,
        );
        shown == (stat(|s| &s.ring_sends), stat(|s| &s.ring_sends_unfinished))
    });
    shown
}

#[test]
fn io_uring_batches_deliver_in_order_through_partial_writes_and_full_buffers() {
    let (ring_sends, unfinished) = broadcast_with_slow_reader(WriteBatch::IoUring);
    // Every fast reader was written through the ring.
    assert!(
        ring_sends >= NR_FAST as u64,
        "{ring_sends} sends through the ring"
    );
    // The slow reader's socket took part of a frame, or nothing, in some batch.
    assert!(
        unfinished > 0,
        "no send through the ring was left unfinished"
    );
}

#[test]
fn sendmsg_writes_deliver_in_order_through_partial_writes_and_full_buffers() {
    let (ring_sends, unfinished) = broadcast_with_slow_reader(WriteBatch::Sendmsg);
    assert_eq!((ring_sends, unfinished), (0, 0));
}
