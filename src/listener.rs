//! The listening socket both servers and the simulated provider accept on.

use std::io;
use std::net::{SocketAddr, TcpListener};

/// Connections the kernel completes and holds for a listener before it is accepted. The
/// standard library's `bind` asks for 128: a burst of more new connections than that (hundreds
/// of clients starting at once, or every worker opening its provider call at once) overflowed
/// it, and each connection past it waited for its SYN to be sent again a second later — past
/// the provider connect timeout (half the provider timeout) for the server's own calls. The
/// kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4, 128 before).
pub const LISTEN_BACKLOG: i32 = 1024;

/// A TCP listener on `addr` with a backlog of [`LISTEN_BACKLOG`]: what both servers and the
/// simulated provider accept on.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // As the standard library does: a restarted server may bind while old connections linger.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;

    /// 200 clients connect before anyone accepts (a burst): the kernel completes every one of
    /// them, where the standard library's backlog of 128 left the rest waiting for a second
    /// SYN a second later. (On a kernel whose `net.core.somaxconn` is lower, the burst is that
    /// size: no listener could hold more there.)
    #[test]
    fn a_burst_of_connections_beyond_128_is_held_for_accept() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(4096);
        for i in 0..somaxconn.min(200) {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => held.push(s),
                Err(e) => panic!("connection {i} not completed: {e}"),
            }
        }
        drop(listener);
    }
}
