//! Sockets: the per-shard client listeners.

pub mod listener;
