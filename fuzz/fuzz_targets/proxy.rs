//! What a trusted proxy sends first: a PROXY protocol header (v1 text or v2 binary) and
//! `X-Forwarded-For` values. Arbitrary bytes must yield a consistent answer, never a panic.
#![no_main]

use herald::protection::proxy::{ProxyHeader, TrustedProxies, parse_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_header(data) {
        ProxyHeader::Incomplete | ProxyHeader::Invalid(_) => {}
        ProxyHeader::Complete { len, .. } => {
            assert!(len > 0 && len <= data.len(), "len {len} of {}", data.len());
            // The header alone parses the same.
            assert_eq!(parse_header(&data[..len]), parse_header(data));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let proxies = TrustedProxies::new(&["10.0.0.0/8".into(), "::1".into()], false)
            .expect("literal networks");
        if let Some(ip) = proxies.forwarded_client(text) {
            // The client is one of the listed entries.
            let listed = |e: &str| {
                let e = e.trim();
                e.parse::<std::net::IpAddr>().is_ok_and(|x| x == ip)
                    || e.parse::<std::net::SocketAddr>()
                        .is_ok_and(|x| x.ip() == ip)
            };
            assert!(text.split(',').any(listed), "{ip} not in {text:?}");
        }
    }
});
