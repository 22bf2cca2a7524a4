//! The node and its host: what the process sets up about itself before it serves
//! ([`process`]), the connection ceiling the host allows ([`hostcheck`]), and the systemd
//! readiness, reload, stop and watchdog notifications ([`notify`]).

pub mod hostcheck;
pub mod notify;
pub mod process;
