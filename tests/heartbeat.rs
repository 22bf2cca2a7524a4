//! Heartbeats: the server pings every `ws.heartbeat_interval_ms`, drops a peer that stays
//! silent, and keeps a peer that answers (tungstenite answers pings while it reads).

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

const INTERVAL: Duration = Duration::from_millis(300);

fn server() -> TestServer {
    server_pinging_every(INTERVAL)
}

fn server_pinging_every(interval: Duration) -> TestServer {
    TestServer::start(|c| c.ws.heartbeat_interval_ms = interval.as_millis() as u64)
}

#[test]
fn silent_peer_is_pinged_then_dropped() {
    let server = server();
    // Before the connection exists, so before any ping: a late reader still measures at
    // least the time the server gave.
    let connecting = Instant::now();
    let (mut c, w) = RawClient::upgrade(server.listen, "shop", &token("shop", "alice").0);
    assert!(w.text.ends_with(r#","heartbeat":1}"#), "{}", w.text);
    let start = Instant::now();
    let mut pings = 0;
    while let Some(f) = c.read_frame() {
        assert_eq!(
            (f.fin, f.opcode, f.masked),
            (true, op::PING, false),
            "{f:?}"
        );
        assert!(f.payload.is_empty());
        pings += 1;
    }
    let waited = start.elapsed();
    assert!(pings >= 1, "dropped without a ping");
    assert!(waited <= INTERVAL * 5, "dropped only after {waited:?}");
    // A peer gets at least one interval to answer its ping.
    let given = connecting.elapsed();
    assert!(given >= INTERVAL - INTERVAL / 4, "dropped after {given:?}");
    server.wait_connections(0);
}

#[test]
fn reading_client_stays_connected_and_is_pinged_once_per_interval() {
    let server = server();
    let (mut ws, _) = connect_user(server.listen, "shop", "alice");
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < INTERVAL * 10 {
        match ws.read() {
            Ok(Message::Ping(p)) => {
                assert!(p.is_empty());
                pings += 1;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("connection lost after {:?}: {e}", start.elapsed()),
        }
    }
    // One ping per interval (10 intervals), with room for scheduling jitter.
    assert!((7..=13).contains(&pings), "{pings} pings in 10 intervals");
    ws.get_mut().set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(server.nr_connections(), 1);
    let before = now_ms();
    let id = server.publish("shop", "all", r#"{"still":"here"}"#);
    expect_message(&mut ws, "all", r#"{"still":"here"}"#, &id, before);
}

#[test]
fn peer_answering_within_the_interval_is_kept() {
    // Longer than the other tests' interval: half of it is the margin a loaded machine has
    // between reading a ping and the server's next look.
    let interval = Duration::from_secs(1);
    let server = server_pinging_every(interval);
    let (mut c, _) = RawClient::upgrade(server.listen, "shop", &token("shop", "alice").0);
    let start = Instant::now();
    while start.elapsed() < interval * 4 {
        let f = c
            .read_frame()
            .expect("dropped although every ping was answered");
        assert_eq!(f.opcode, op::PING);
        // Answer late, but well before the next ping is due. (A deliberate delay, not a
        // synchronisation.)
        std::thread::sleep(interval / 2);
        c.send(&masked(op::PONG, &f.payload));
    }
    c.send(&masked(op::TEXT, br#"{"op":"ping","id":1}"#));
    loop {
        let f = c
            .read_frame()
            .expect("dropped although every ping was answered");
        if f.opcode == op::TEXT {
            assert_eq!(f.payload, br#"{"type":"pong","id":1}"#);
            break;
        }
    }
}
