//! The frame/session state machine, fed as the I/O driver (`conn.rs`) feeds it: whatever bytes
//! arrived, appended to the unconsumed tail of the last feed.
//!
//! Input: `[cfg, split_hi, split_lo, chunk, stream..]`. `cfg` picks the message cap and
//! whether a close event stops parsing; the stream is fed whole, split once at `split`, and in
//! `chunk`-byte pieces. All three must see the same events and end the same way.
#![no_main]

use herald::ws::close::CloseReason;
use herald::ws::session::{Event, Flow, Session};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Text(String),
    Fragment,
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Ev>,
    /// Bytes consumed in total, or the close reason.
    end: Result<usize, CloseReason>,
    /// Parsing stopped on a close event.
    stopped: bool,
    /// Unconsumed bytes left over (still masked).
    tail: Vec<u8>,
    mid_message: bool,
}

/// Drives one session over `chunks` like `conn.rs`: keep the tail, append the next chunk.
fn drive(chunks: &[&[u8]], max: usize, stop_on_close: bool) -> Outcome {
    let mut session = Session::default();
    let mut events = Vec::new();
    let mut inbuf: Vec<u8> = Vec::new();
    let mut total = 0usize;
    let mut stopped = false;
    for chunk in chunks {
        inbuf.extend_from_slice(chunk);
        let before = inbuf.len();
        let r = session.feed(&mut inbuf, max, &mut |ev| {
            let (e, flow) = match ev {
                Event::Text(t) => (Ev::Text(t.to_owned()), Flow::Continue),
                Event::Fragment => (Ev::Fragment, Flow::Continue),
                Event::Ping(p) => {
                    assert!(p.len() <= 125);
                    (Ev::Ping(p.to_vec()), Flow::Continue)
                }
                Event::Pong => (Ev::Pong, Flow::Continue),
                Event::Close(c) => {
                    if let Some(c) = c {
                        assert!((1000..5000).contains(&c), "close code {c}");
                    }
                    (
                        Ev::Close(c),
                        if stop_on_close {
                            Flow::Stop
                        } else {
                            Flow::Continue
                        },
                    )
                }
            };
            if let Ev::Text(t) = &e {
                assert!(t.len() <= max);
            }
            if flow == Flow::Stop {
                stopped = true;
            }
            events.push(e);
            flow
        });
        match r {
            Ok(consumed) => {
                assert!(consumed <= before);
                total += consumed;
                inbuf.drain(..consumed);
                if stopped {
                    break;
                }
            }
            Err(reason) => {
                let _ = (reason.code(), reason.text());
                return Outcome {
                    events,
                    end: Err(reason),
                    stopped,
                    tail: Vec::new(),
                    mid_message: session.is_mid_message(),
                };
            }
        }
    }
    Outcome {
        events,
        end: Ok(total),
        stopped,
        tail: inbuf,
        mid_message: session.is_mid_message(),
    }
}

const MAXES: [usize; 8] = [0, 1, 2, 16, 125, 1000, 1 << 20, usize::MAX];

/// After a stop the driver discards the rest, so how much of it had arrived does not matter.
fn ignore_tail_after_stop(mut o: Outcome) -> Outcome {
    if o.stopped {
        o.tail.clear();
    }
    o
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let cfg = data[0];
    let max = MAXES[usize::from(cfg & 7)];
    let stop_on_close = cfg & 8 != 0;
    let stream = &data[4..];
    let split = usize::from(u16::from_be_bytes([data[1], data[2]])) % (stream.len() + 1);
    let chunk = usize::from(data[3]).max(1);

    let whole = ignore_tail_after_stop(drive(&[stream], max, stop_on_close));
    let (a, b) = stream.split_at(split);
    let halves = ignore_tail_after_stop(drive(&[a, b], max, stop_on_close));
    assert_eq!(whole, halves, "split at {split}");
    let pieces: Vec<&[u8]> = stream.chunks(chunk).collect();
    let trickled = ignore_tail_after_stop(drive(&pieces, max, stop_on_close));
    assert_eq!(whole, trickled, "chunks of {chunk}");
});
