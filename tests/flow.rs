//! Node-wide flow control: once the outbound data queued on the node reaches
//! `flow.max_queued_bytes`, publishes are refused 503 `overloaded` with `Retry-After` (a batch
//! whole, a client's `publish` with error `limit`), counted by reason; what was accepted still
//! reaches every subscriber, and publishing works again once the queues drain.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use herald::flow::Flow;

/// The node's budget for queued outbound bytes.
const BUDGET: u64 = 2 << 20;
/// Subscribers that stop reading.
const NR_STALLED: usize = 16;
/// Bytes of padding per publication.
const PAD: usize = 8 * 1024;
/// Upper bound of the publishing loop: far more than the budget holds.
const MAX_PUBLISHES: usize = 400;

fn padded_seq_feed(text: &str) -> usize {
    padded_seq(text, "feed", PAD)
}

/// A subscriber of `feed` that does not read: what it is sent stays queued at the server.
fn stalled_reader(server: &TestServer, user: &str) -> Client {
    let mut ws = small_window_client(server.listen, "shop", user);
    subscribe(&mut ws, "feed");
    ws
}

fn queued_bytes(server: &TestServer) -> u64 {
    Flow::queued_bytes(&server.hub.stats, &server.hub.mailboxes)
}

/// The node's queued total once it has stopped changing while `caught_up` holds (the readers
/// that read have everything: what is left is the stalled readers'). What is written to a
/// stalled reader first fills its socket's send buffer in the kernel, and the kernel may take
/// more after a publish was refused (the buffer grows as acknowledgements come in, late when
/// the machine is busy): the node's figure falls with every byte the kernel takes, so a
/// refusal is exact only once nothing moves any more.
fn settled_queued_bytes(server: &TestServer, caught_up: impl Fn() -> bool) -> u64 {
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut last = queued_bytes(server);
    let mut nr_same = 0;
    while nr_same < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued total did not settle: {last} B"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = queued_bytes(server);
        nr_same = if now == last && caught_up() {
            nr_same + 1
        } else {
            0
        };
        last = now;
    }
    last
}

/// The value of one sample of `/metrics`.
fn sample(server: &TestServer, name: &str, labels: &str) -> f64 {
    scrape(server.api)
        .into_iter()
        .find(|(n, l, _)| n == name && l == labels)
        .unwrap_or_else(|| panic!("no sample {name}{{{labels}}}"))
        .2
}

#[test]
fn a_fast_publisher_is_refused_503_over_the_budget_and_every_accepted_message_arrives() {
    let server = TestServer::start(|c| {
        c.server.shards = 2;
        c.flow.max_queued_bytes = BUDGET;
        c.projects[0].allow_client_publish = true;
    });
    let mut stalled: Vec<Client> = (0..NR_STALLED)
        .map(|i| stalled_reader(&server, &format!("stalled-{i}")))
        .collect();
    // The well-behaved reader reads on its own thread until the end marker.
    let (mut reader, _) = connect_user(server.listen, "shop", "reader");
    subscribe(&mut reader, "feed");
    let nr_read = Arc::new(AtomicUsize::new(0));
    let reading = std::thread::spawn({
        let nr_read = nr_read.clone();
        move || {
            let mut got = Vec::new();
            loop {
                let text = recv_text(&mut reader);
                if text.contains(r#""data":"end""#) {
                    return (reader, got);
                }
                got.push(padded_seq_feed(&text));
                nr_read.store(got.len(), Ordering::Release);
            }
        }
    });
    // A client that publishes with the `publish` op.
    let (mut client, _) = connect_user(server.listen, "shop", "client");

    // Publish until the node pushes back and stays over its budget once the kernel has taken
    // what it takes into the stalled readers' send buffers.
    let mut accepted = 0;
    let mut nr_refused = 0;
    let refusal = loop {
        assert!(
            accepted < MAX_PUBLISHES,
            "{MAX_PUBLISHES} publications of {PAD} bytes to {NR_STALLED} stalled readers and \
             no refusal (queued: {} B)",
            queued_bytes(&server)
        );
        let body = format!(
            r#"{{"project":"shop","topic":"feed","data":{}}}"#,
            padded_data(accepted, PAD)
        );
        let r = publish(server.api, api_key_of("shop"), &body);
        if r.status == 200 {
            accepted += 1;
            continue;
        }
        nr_refused += 1;
        let reader_has_all = || nr_read.load(Ordering::Acquire) == accepted;
        if settled_queued_bytes(&server, reader_has_all) >= BUDGET {
            break r;
        }
    };
    assert_eq!(refusal.status, 503, "{}", refusal.text());
    assert_eq!(refusal.json()["error"], "overloaded", "{}", refusal.text());
    assert_eq!(refusal.header("Retry-After"), Some("1"));
    let queued = queued_bytes(&server);
    assert!(queued >= BUDGET, "refused at {queued} B, under the budget");
    // The node passes its budget by at most the fan-out of the publishes still in the shards'
    // inboxes when the last one was admitted (a publication there counts its own bytes, not
    // yet one frame per subscriber): with one publisher waiting for each answer, the last
    // and the two before it.
    let frame = (PAD + 200) as u64;
    assert!(
        queued < BUDGET + 3 * (NR_STALLED as u64 + 1) * frame,
        "{queued} B queued, budget {BUDGET} B"
    );
    assert!(
        accepted > 1,
        "the budget holds several publications: {accepted}"
    );
    assert_eq!(
        sample(&server, "herald_outbound_queued_bytes", ""),
        queued as f64
    );
    assert_eq!(
        sample(&server, "herald_outbound_budget_bytes", ""),
        BUDGET as f64
    );

    // A batch is refused whole, each of its publications counted.
    let batch = format!(
        r#"[{{"project":"shop","topic":"feed","data":{}}},{{"project":"shop","topic":"feed","data":{}}}]"#,
        padded_data(MAX_PUBLISHES, PAD),
        padded_data(MAX_PUBLISHES + 1, PAD)
    );
    let r = http_request(
        server.api,
        "POST",
        "/api/v1/publish/batch",
        api_key_of("shop"),
        &batch,
    );
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("overloaded"))
    );
    assert_eq!(r.header("Retry-After"), Some("1"));

    // A client's publish gets the `limit` error.
    let reply = request(
        &mut client,
        r#"{"op":"publish","topic":"feed","data":"client","id":1}"#,
    );
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str(), &reply["id"]),
        (Some("error"), Some("limit"), &serde_json::json!(1)),
        "{reply}"
    );
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("flow.max_queued_bytes")),
        "{reply}"
    );
    // Singles, batch of two, client.
    assert_eq!(
        sample(
            &server,
            "herald_publish_rejected_total",
            r#"reason="queued_bytes""#
        ),
        f64::from(nr_refused + 3)
    );
    assert_eq!(
        server.slow_consumer_closes(),
        0,
        "no reader passed its own cap"
    );

    // A stalled reader that goes away unread gives its queue back to the node.
    let before = queued_bytes(&server);
    drop(stalled.pop());
    wait_until("the gone reader's queue to be given back", || {
        queued_bytes(&server) < before
    });

    // The stalled readers read again: each gets every accepted publication, in order, and
    // nothing refused.
    let drained: Vec<_> = stalled
        .drain(..)
        .map(|mut ws| {
            std::thread::spawn(move || {
                let got: Vec<usize> = (0..accepted)
                    .map(|_| padded_seq_feed(&recv_text(&mut ws)))
                    .collect();
                (ws, got)
            })
        })
        .collect();
    for t in drained {
        let (ws, got) = t.join().unwrap();
        assert_eq!(got, (0..accepted).collect::<Vec<_>>());
        stalled.push(ws);
    }
    wait_until("the queues to drain", || queued_bytes(&server) == 0);

    // Publishing works again, and reaches everyone.
    server.publish("shop", "feed", &padded_data(accepted, PAD));
    for ws in &mut stalled {
        assert_eq!(padded_seq_feed(&recv_text(ws)), accepted);
    }
    server.publish("shop", "feed", r#""end""#);
    let (reader, got) = reading.join().unwrap();
    assert_eq!(
        got,
        (0..=accepted).collect::<Vec<_>>(),
        "the reader got every accepted publication and nothing refused"
    );

    // Closing every connection gives every byte back.
    for ws in stalled.into_iter().chain([reader, client]) {
        close(ws);
    }
    server.wait_connections(0);
    wait_until("nothing queued", || queued_bytes(&server) == 0);
}
