//! Client listeners: one SO_REUSEPORT socket per shard on the same address, so the kernel
//! spreads accepts across cores with no shared accept queue.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Checks that no socket already listens on `addr` (nor on a wildcard address covering it),
/// before [`bind_reuseport`], which would otherwise join another process's listeners and let
/// the kernel split new connections between the two. The probe binds with `SO_REUSEADDR`
/// only: that succeeds next to sockets in `TIME_WAIT` but fails with `AddrInUse` next to a
/// listener, whatever that listener's options. Port 0 always passes (a fresh port).
///
/// # Errors
/// `AddrInUse` when something listens there; other socket errors as they come.
pub fn probe_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// Binds `n` listeners to `addr`. With port 0 the first picks the port and the others join it.
///
/// # Errors
/// Socket creation, option or bind failure (the address is named by the caller).
pub fn bind_reuseport(addr: SocketAddr, n: usize, backlog: u32) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        let listener: TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_refuses_a_listened_address() {
        let ls = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1, 16).unwrap();
        let addr = ls[0].local_addr().unwrap();
        let err = probe_free(addr).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(ls);
        probe_free(addr).unwrap();
        probe_free("127.0.0.1:0".parse().unwrap()).unwrap();
    }

    #[test]
    fn port_zero_is_shared() {
        let ls = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }
}
