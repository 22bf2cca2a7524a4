//! The client protocol: `ops::parse` on arbitrary text, then every reply builder with what it
//! returned. Replies must always be valid JSON objects.
#![no_main]

use herald::ws::ops::{self, ErrorCode, Op};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

/// Valid JSON by the grammar (RawValue: a lone `\ud800` escape is grammatical JSON, echoed
/// as sent; decoding it to a Rust string would fail, but that is the client's business).
fn json_object(s: &str) {
    serde_json::from_str::<&RawValue>(s).unwrap_or_else(|e| panic!("reply not JSON ({e}): {s}"));
    assert!(s.starts_with('{') && s.ends_with('}'), "{s}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(req) = ops::parse(text) else {
        // Not JSON: the caller closes with 1007.
        assert!(serde_json::from_str::<&RawValue>(text).is_err());
        return;
    };
    if let Some(id) = req.id {
        let c = id.get().as_bytes()[0];
        assert!(
            c == b'"' || c == b'-' || c.is_ascii_digit(),
            "id {}",
            id.get()
        );
    }
    json_object(&ops::ack(req.id, None));
    json_object(&ops::ack(req.id, Some(None)));
    json_object(&ops::ack(req.id, Some(Some(u64::MAX))));
    json_object(&ops::pong(req.id));
    let msg = match &req.op {
        Ok(Op::Publish(topic, d)) => {
            serde_json::from_str::<&RawValue>(d.get()).expect("data is raw JSON");
            (*topic).to_owned()
        }
        Ok(Op::Subscribe(t, _) | Op::Unsubscribe(t) | Op::Refresh(t)) => (*t).to_owned(),
        Ok(Op::Ping | Op::Recover(_)) => String::new(),
        Err(m) => m.clone(),
    };
    for code in [
        ErrorCode::BadRequest,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Limit,
    ] {
        json_object(&ops::error(req.id, code, &msg));
    }
    json_object(&ops::error(req.id, ErrorCode::BadRequest, text));
});
