//! Close codes as data: every reason herald closes a connection, with its code and the text
//! sent in the close frame. One place maps a cause to its code.

/// Why herald closes a connection; each maps to one close code of protocol.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed normally and we answer (1000).
    Normal,
    /// Server shutting down or draining: reconnect elsewhere (1001).
    GoingAway,
    /// RFC 6455 violation (1002); the text says which.
    Protocol(&'static str),
    /// A binary frame where text is required (1003).
    Unsupported,
    /// Invalid UTF-8 or invalid JSON (1007).
    InvalidData(&'static str),
    /// Repeated bad requests (1008).
    Policy(&'static str),
    /// A message over `ws.max_message_bytes` (1009).
    TooBig,
    /// Internal error (1011).
    Internal,
    /// Token expired (4001).
    TokenExpired,
    /// Kicked or key revoked (4003).
    Kicked,
    /// Outbound queue over its cap (4008).
    SlowConsumer,
    /// Message rate limit exceeded (4029).
    RateLimited,
}

impl CloseReason {
    /// The close code sent on the wire.
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::Protocol(_) => 1002,
            Self::Unsupported => 1003,
            Self::InvalidData(_) => 1007,
            Self::Policy(_) => 1008,
            Self::TooBig => 1009,
            Self::Internal => 1011,
            Self::TokenExpired => 4001,
            Self::Kicked => 4003,
            Self::SlowConsumer => 4008,
            Self::RateLimited => 4029,
        }
    }

    /// The reason text of the close frame (at most 123 bytes).
    pub fn text(self) -> &'static str {
        match self {
            Self::Normal => "",
            Self::GoingAway => "server shutting down",
            Self::Protocol(s) | Self::InvalidData(s) | Self::Policy(s) => s,
            Self::Unsupported => "binary frames are not supported",
            Self::TooBig => "message too big",
            Self::Internal => "internal error",
            Self::TokenExpired => "token expired",
            Self::Kicked => "disconnected by the server",
            Self::SlowConsumer => "slow consumer",
            Self::RateLimited => "message rate limit exceeded",
        }
    }

    /// Index for per-code counters (see [`CLOSE_CODES`]).
    pub fn counter_index(self) -> usize {
        CLOSE_CODES
            .iter()
            .position(|&c| c == self.code())
            .expect("every code is listed")
    }
}

/// Every close code herald sends, for metrics.
pub const CLOSE_CODES: [u16; 12] = [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4001, 4003, 4008, 4029,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_fit_a_control_frame() {
        for r in [
            CloseReason::Normal,
            CloseReason::GoingAway,
            CloseReason::Unsupported,
            CloseReason::TooBig,
            CloseReason::Internal,
            CloseReason::TokenExpired,
            CloseReason::Kicked,
            CloseReason::SlowConsumer,
            CloseReason::RateLimited,
        ] {
            assert!(r.text().len() <= 123);
            assert_eq!(CLOSE_CODES[r.counter_index()], r.code());
        }
    }
}
