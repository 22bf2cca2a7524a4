//! The HTTP upgrade parser: arbitrary bytes must yield `Ok(None)`, a refusal that renders, or
//! an upgrade whose fields are consistent with the input.
#![no_main]

use herald::ws::handshake::{self, Refusal, TokenSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match handshake::parse(data) {
        Ok(None) => {}
        Err(r) => {
            assert!(matches!(r.status, 400 | 404), "{r:?}");
            let resp = r.response();
            assert!(resp.starts_with(b"HTTP/1.1 "));
        }
        Ok(Some(u)) => {
            assert!(u.len > 0 && u.len <= data.len());
            // The request alone (without trailing frame bytes) parses to the same upgrade.
            assert_eq!(handshake::parse(&data[..u.len]), Ok(Some(u.clone())));
            assert!(!u.project.is_empty() && !u.project.contains('/'));
            let resp = handshake::accept_response(&u.key, u.subprotocol);
            assert!(resp.starts_with(b"HTTP/1.1 101 "));
            let _ = Refusal::unknown_project(&u.project).response();
            let _ = Refusal::unauthorized("x").response();
            let _ = Refusal::forbidden("x").response();
            let _ = Refusal::at_capacity("x").response();
            // The loggable target never carries a query token.
            let head = std::str::from_utf8(&data[..u.len]).ok();
            if let (Some((_, TokenSource::Query)), Some(head)) = (&u.token, head) {
                let target = head.split(' ').nth(1).unwrap_or("");
                let red = handshake::redact(target);
                let (_, q) = red.split_once('?').unwrap_or((&red, ""));
                for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                    assert!(
                        k != "token" || v == "REDACTED",
                        "token leaks through redact: {red}"
                    );
                }
            }
        }
    }
    // Every prefix of the input is incomplete or fails the same way; it never panics.
    if data.len() > 1 {
        let _ = handshake::parse(&data[..data.len() / 2]);
    }
});
