//! Error messages with the values they quote left out, so a secret next to a mistake never
//! reaches a log or an answer. A leaf: it imports nothing of the crate.

/// serde's messages with the offending value left out: `invalid type: string "hunter2",
/// expected u64` becomes `invalid type: string, expected u64`, `unknown variant `x`` becomes
/// `unknown variant`. Key names (`unknown field `x``) are kept: they name the mistake. Also for
/// serde_json's messages about documents that may hold keys (a JWKS, the state file).
pub fn redact_values(message: &str) -> String {
    let message = message.trim_end();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // The last separator: the quoted value may contain one.
            let (unexpected, expected) = match rest.rsplit_once(", expected ") {
                Some((u, e)) => (u, Some(e)),
                None => (rest, None),
            };
            let kind: String = unexpected
                .split(['"', '`', '\''])
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            let mut out = format!("{prefix}{kind}");
            if let Some(e) = expected {
                out.push_str(", expected ");
                out.push_str(e);
            }
            return out;
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let tail = ["`, expected ", "`, there are no variants"]
            .iter()
            .find_map(|sep| rest.rfind(sep).map(|i| &rest[i + 1..]))
            .unwrap_or_default();
        return format!("unknown variant{tail}");
    }
    message.to_owned()
}
