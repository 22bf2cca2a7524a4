//! A reader that stops reading is closed with 4008 once its outbound queue passes
//! `ws.max_outbound_queue_bytes`; a well-behaved reader on the same topic loses nothing.

mod common;

use std::sync::mpsc;

use common::*;

const QUEUE_CAP: usize = 65_536;
/// Bytes of padding per publication (~32 KiB frames: two fit under the cap, three do not).
const PAD: usize = 32 * 1024;
/// Upper bound of the publishing loop.
const MAX_PUBLISHES: usize = 2000;

fn data(seq: usize) -> String {
    padded_data(seq, PAD)
}

fn seq_of(text: &str) -> usize {
    padded_seq(text, "feed", PAD)
}

#[test]
fn slow_reader_is_closed_4008_and_the_fast_reader_loses_nothing() {
    let server = TestServer::start(|c| c.ws.max_outbound_queue_bytes = QUEUE_CAP);

    // The slow reader: a small receive window.
    let mut slow = small_window_client(server.listen, "shop", "slow");
    subscribe(&mut slow, "feed");

    // The well-behaved reader reads on its own thread and reports each publication; the
    // publisher waits for that report before the next publish, so this reader never has more
    // than one publication queued at the server, however fast the publisher is.
    let (mut fast, _) = connect_user(server.listen, "shop", "fast");
    subscribe(&mut fast, "feed");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        loop {
            let text = recv_text(&mut fast);
            if text.contains(r#""data":"end""#) {
                return fast;
            }
            tx.send(seq_of(&text)).unwrap();
        }
    });

    // Publish until the server gives up on the slow reader.
    let mut published = 0;
    while server.slow_consumer_closes() == 0 {
        assert!(
            published < MAX_PUBLISHES,
            "{MAX_PUBLISHES} publications of {PAD} bytes and the slow reader is still open"
        );
        server.publish("shop", "feed", &data(published));
        // The fast reader got every publication, in order.
        assert_eq!(rx.recv_timeout(TIMEOUT), Ok(published));
        published += 1;
    }
    server.publish("shop", "feed", r#""end""#);

    let mut fast = reader.join().unwrap();
    assert_eq!(
        request(&mut fast, r#"{"op":"ping","id":1}"#),
        serde_json::json!({"type":"pong","id":1})
    );

    // The slow reader drains what reached it: a gapless prefix, then close 4008.
    let (texts, code, reason) = read_until_close(&mut slow);
    assert_eq!((code, reason.as_str()), (4008, "slow consumer"));
    let got: Vec<usize> = texts.iter().map(|t| seq_of(t)).collect();
    assert_eq!(got, (0..got.len()).collect::<Vec<_>>(), "a prefix, no gaps");
    assert!(
        got.len() < published,
        "the slow reader cannot have everything"
    );
    assert_eq!(server.slow_consumer_closes(), 1, "only the slow reader");
    server.wait_connections(1);

    // The node's count of queued bytes gave back what the closed reader's queue held.
    close(fast);
    server.wait_connections(0);
    wait_until("nothing queued on the node", || {
        herald::flow::Flow::queued_bytes(&server.hub.stats, &server.hub.mailboxes) == 0
    });
}
