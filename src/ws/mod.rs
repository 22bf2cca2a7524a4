//! The WebSocket side of a connection, layered like tungstenite: handshake (HTTP upgrade),
//! session (RFC 6455 frames, sans-IO), ops (the client protocol), frame (server encoding),
//! close (codes as data) and conn (the I/O driver tying them to a shard).

pub mod close;
pub mod codec;
pub mod conn;
pub mod frame;
pub mod handshake;
pub mod machine;
pub mod ops;
pub mod session;
