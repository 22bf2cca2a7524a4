//! The STOMP frame parser on arbitrary bytes, whole and split in two at every point the first
//! byte picks: the frames read (or the error) must not depend on how the stream was split
//! into WebSocket messages, and nothing may panic or be left over after a whole frame.
#![no_main]

use herald::ws::codec::stomp::{self, Parser, Version};
use libfuzzer_sys::fuzz_target;

/// Every frame of `chunks`, fed in order, or the first error.
fn frames(chunks: &[&[u8]], version: Version) -> (Vec<stomp::Frame>, Option<stomp::ParseError>) {
    let mut p = Parser::default();
    let mut out = Vec::new();
    for c in chunks {
        p.feed(c);
        loop {
            match p.next_frame(version, 512) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let version = Version::ALL[usize::from(first) % 3];
    let cut = usize::from(first) % (rest.len() + 1);
    let whole = frames(&[rest], version);
    let split = frames(&[&rest[..cut], &rest[cut..]], version);
    // A frame over the limit may be refused at another point when split (an unfinished
    // frame is measured as it grows); any other outcome is the same.
    let too_large = |r: &Option<stomp::ParseError>| matches!(r, Some(stomp::ParseError::TooLarge { .. }));
    if !too_large(&whole.1) && !too_large(&split.1) {
        assert_eq!(whole, split, "split at {cut}");
    }
    for f in &whole.0 {
        if let Some(r) = f.header("receipt") {
            let b = stomp::receipt(version, r);
            assert!(b.ends_with(b"\n\n\0"));
        }
        let e = stomp::error(version, &String::from_utf8_lossy(&f.body), None);
        assert!(e.ends_with(b"\0"));
    }
});
