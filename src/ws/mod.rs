//! The WebSocket side of a connection, layered like tungstenite: handshake (HTTP upgrade),
//! session (RFC 6455 frames, sans-IO), machine (the connection's life, sans-IO), codec (the
//! client protocols; ops is herald.v1's), sockjs (SockJS framing around a codec), frame
//! (server encoding), close (codes as data) and
//! conn (a connection's state). Nothing here imports `crate::shard`: the shard's I/O driver
//! runs these.

pub mod close;
pub mod codec;
pub mod conn;
pub mod frame;
pub mod handshake;
pub mod machine;
pub mod ops;
pub mod recovery;
pub mod session;
pub mod sockjs;
