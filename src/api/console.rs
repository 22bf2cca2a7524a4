//! The operator console: a few static files, embedded at build time, served at `/console`.
//!
//! The page holds no secret and does nothing by itself: the browser signs in with an API key
//! (kept in session storage) and calls the same `/api/v1` endpoints, with the same
//! authorization, as any other client of the API. This file only serves the files, with
//! their content type, a validator (`ETag`, so a reload costs a 304) and a strict
//! Content-Security-Policy: scripts and styles from these files only, nothing inline, no
//! other origin but the node's own client port for the live tail.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, HOST, HeaderValue, IF_NONE_MATCH,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{Request, Response, StatusCode};

use super::{ApiError, ApiSettings};

/// One embedded file.
struct Asset {
    /// Its name under `/console/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// A hash of `body`, computed at build time: the `ETag`.
    etag: u64,
}

/// FNV-1a, 64 bits: cheap, in a `const`, and plenty to tell two builds' files apart.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

macro_rules! asset {
    ($name:literal, $type:literal) => {{
        const BODY: &[u8] = include_bytes!(concat!("../../console/", $name));
        Asset {
            name: $name,
            content_type: $type,
            body: BODY,
            etag: fnv1a(BODY),
        }
    }};
}

/// Every file of the console; `index.html` is also `/console` and `/console/`.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("console.js", "text/javascript; charset=utf-8"),
];

/// The policy for a page served as `host` (the request's `Host`, port stripped): the
/// page's own files and the node's client port on the same host for the live tail.
fn content_security_policy(host: Option<&str>, client_port: u16) -> String {
    let tail = host
        .filter(|h| {
            !h.is_empty()
                && h.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
                })
        })
        .map(|h| format!(" ws://{h}:{client_port} wss://{h}:{client_port}"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{tail}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// The host part of a `Host` header: `h:port` → `h`, `[v6]:port` → `[v6]`.
fn host_name(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// `GET /console`, `/console/` and `/console/{file}`: the file, or 304 when the browser
/// holds it already; 404 `not_found` for any other name.
pub(super) fn serve(
    settings: &ApiSettings,
    file: &str,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let name = if file.is_empty() { "index.html" } else { file };
    let asset = ASSETS
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no console file `{name}`")))?;
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut r = if fresh {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(asset.body)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(host_name);
    let csp = content_security_policy(host, settings.client_port);
    let h = r.headers_mut();
    // Revalidated on every load (a 304 when unchanged), so a new binary's console is never
    // mixed with the old one's files.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(CONTENT_SECURITY_POLICY, v);
    }
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_the_client_port_of_the_page_host() {
        let p = content_security_policy(Some("127.0.0.1"), 8080);
        assert!(p.contains("connect-src 'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080;"));
        assert!(p.starts_with("default-src 'none'; script-src 'self'; style-src 'self';"));
        let odd = content_security_policy(Some("a b;script-src *"), 8080);
        assert!(odd.contains("connect-src 'self'; "), "{odd}");
    }

    #[test]
    fn host_name_strips_the_port() {
        assert_eq!(host_name("127.0.0.1:8081"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8081"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("example.com"), "example.com");
    }

    #[test]
    fn the_console_stays_small() {
        let total: usize = ASSETS.iter().map(|a| a.body.len()).sum();
        assert!(total < 200 * 1024, "the console weighs {total} bytes");
    }
}
