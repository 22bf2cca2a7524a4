//! What keeps one client, address or key from taking the node: the node-wide and per-project
//! IP deny lists ([`access`]), the handshake and connection limits per source address
//! ([`limiter`]), the API's per-key request buckets ([`ratelimit`]), and the PROXY protocol
//! header with the list of proxies trusted to name the client ([`proxy`]).

pub mod access;
pub mod limiter;
pub mod proxy;
pub mod ratelimit;
