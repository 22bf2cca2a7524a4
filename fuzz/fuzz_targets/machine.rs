//! The connection machine, open, fed arbitrary bytes in chunks at advancing times, with
//! heartbeats, expiry checks and close deadlines in between: it never panics, its queue
//! accounting stays exact, a phase never goes back, and a connection closes at most once.
#![no_main]

use herald::ws::conn::ConnPhase;
use herald::ws::machine::recorder::{BASE_SECS, TestHost, at_ms};
use herald::ws::machine::{self, Rate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let mut h = TestHost::open("t-open");
    h.sent();
    // The setup byte picks the limits: a small queue, a tight message or refresh rate.
    h.queue_cap = 64 + usize::from(setup & 0x0f) * 256;
    if setup & 0x10 != 0 {
        h.rules.messages = Rate {
            interval: 1_000,
            tolerance: 20_000,
        };
    }
    if setup & 0x20 != 0 {
        h.rules.refreshes = Rate {
            interval: 30_000,
            tolerance: 0,
        };
    }
    let chunk = usize::from(setup >> 6) * 7 + 1;
    let mut ms = 1;
    let mut round = 0u32;
    while !rest.is_empty() && !h.killed {
        let n = chunk.min(rest.len());
        let now = at_ms(ms);
        h.feed(now, &rest[..n]);
        rest = &rest[n..];
        round += 1;
        if round % 8 == 0 {
            let rules = h.rules.clone();
            let _ = machine::heartbeat(h.c(), &rules, now);
            let at = (BASE_SECS + 130) as u32;
            machine::on_expiry(&mut h, now, at);
        }
        ms += 5_000;
        h.check_invariants();
    }
    machine::on_close_deadline(&mut h);
    assert!(
        h.phases
            .windows(2)
            .all(|w| w[0] == ConnPhase::Open && w[1] == ConnPhase::Closing),
        "{:?}",
        h.phases
    );
    assert!(h.phases.len() <= 2, "{:?}", h.phases);
});
