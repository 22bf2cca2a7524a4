//! Client listeners: one SO_REUSEPORT socket per shard on the same address, so the kernel
//! spreads accepts across cores with no shared accept queue.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

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
    fn port_zero_is_shared() {
        let ls = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }
}
