//! Socket helpers for both ends of the controller ↔ agent path.
//!
//! [`QuickAck`]: a TCP stream that acknowledges every segment at once.
//! sshd does not disable Nagle's algorithm on non-interactive connections or
//! on the sockets it opens for `direct-tcpip` forwards, so when it sends two
//! small packets in a row (a global request then a channel confirmation; two
//! TLS records of a tunnelled handshake) the second waits until the first is
//! acknowledged, and Linux delays that ACK by about 40 ms. The receiver can
//! prevent the stall by acknowledging at once; quick-ack mode is not sticky,
//! so it is re-armed after every read. Measured on the bench: a no-op deploy
//! went from about 150 ms to about 65 ms.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub struct QuickAck {
    inner: TcpStream,
}

impl QuickAck {
    pub fn new(inner: TcpStream) -> Self {
        let s = QuickAck { inner };
        s.rearm();
        s
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    #[allow(unsafe_code)]
    fn rearm(&self) {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, pointing at a live c_int
        // with its size. A failure only loses the optimisation.
        unsafe {
            libc::setsockopt(
                self.inner.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if poll.is_ready() {
            self.rearm();
        }
        poll
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
