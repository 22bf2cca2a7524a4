//! SockJS framing on arbitrary text, three ways.
//!
//! The client's message (`sockjs::decode`: a JSON array of strings, or one string): what it
//! reads, written back as a JSON array, reads the same.
//!
//! The server's framing (`sockjs::wrap`) of each message read, sent as a text frame: one
//! `a["..."]` frame whose array reads back as that message alone.
//!
//! The connection machine's STOMP conversation in a SockJS session (a connection past its
//! `CONNECT`, through `ws::machine::recorder`), fed the input as one SockJS message: no panic,
//! exact queue accounting, at most one close. (The recorder queues the machine's raw parts,
//! `ERROR` frames and closes, as they are, where the shard wraps them in SockJS framing, so
//! the framing of what it queues is not checked here.)
#![no_main]

use herald::ws::machine::recorder::{TestHost, at_ms, text};
use herald::ws::{frame, sockjs};
use libfuzzer_sys::fuzz_target;

/// The payload of one unmasked server frame, `None` if `f` is not exactly one.
fn payload(f: &[u8]) -> Option<&[u8]> {
    let (len, at) = match f.get(1)? & 0x7f {
        126 => (usize::from(u16::from_be_bytes([*f.get(2)?, *f.get(3)?])), 4),
        127 => (
            usize::try_from(u64::from_be_bytes(f.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    (f.len() == at + len).then(|| &f[at..])
}

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    if let Ok(messages) = sockjs::decode(&input) {
        let again = serde_json::to_string(&messages).expect("strings always serialise");
        assert_eq!(sockjs::decode(&again), Ok(messages.clone()), "{again}");
        for m in &messages {
            let wrapped = sockjs::wrap(&[&frame::text(m.as_bytes())]);
            assert_eq!(wrapped.len(), 1, "a text frame stays one frame");
            let p = payload(&wrapped[0]).expect("one whole frame");
            assert_eq!(wrapped[0][0], 0x81, "a final text frame");
            let array = p.strip_prefix(b"a").expect("an `a` frame");
            let array = std::str::from_utf8(array).expect("UTF-8");
            assert_eq!(sockjs::decode(array), Ok(vec![m.clone()]), "{array}");
        }
    }

    let mut h = TestHost::open_stomp();
    h.c().sockjs = true;
    h.feed(at_ms(1), &text(&input));
    h.check_invariants();
});
