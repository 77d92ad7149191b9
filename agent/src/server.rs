//! The listener: TCP accept, TLS handshake (client certificate required),
//! then the tonic server with the Agent and standard health services.
//!
//! The caller passes the shutdown signal in (a future). When it fires, the
//! accept loop stops, heartbeat streams end, and `serve` returns after the
//! open connections close.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mlops_proto::net::QuickAck;
use mlops_proto::v1::agent_server::AgentServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::tls::Peer;
use tokio_stream::wrappers::ReceiverStream;

use crate::service::AgentService;

/// A handshake that has not finished by then is dropped, so a silent peer
/// cannot hold a slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many handshakes in progress. Anyone on the host can open
/// connections to the loopback port; past the cap the oldest pending one is
/// dropped to make room, so idle connections (held by a hostile local user)
/// cannot starve the controller, whose handshake takes milliseconds.
const MAX_HANDSHAKES: usize = 64;

/// Refusals logged per minute at most; the rest are counted and summed up
/// once a minute (a local user could otherwise fill the disk with them).
const REFUSALS_LOGGED_PER_MINUTE: u32 = 10;

/// Logs refused handshakes, at most [`REFUSALS_LOGGED_PER_MINUTE`] a minute.
struct RefusalLog {
    window_start: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    fn new() -> Self {
        RefusalLog { window_start: std::time::Instant::now(), logged: 0, suppressed: 0 }
    }

    fn refused(&mut self, peer: SocketAddr, why: &str) {
        if self.window_start.elapsed() >= Duration::from_secs(60) {
            if self.suppressed > 0 {
                tracing::warn!(
                    count = self.suppressed,
                    "more TLS handshakes refused in the last minute (not logged one by one)"
                );
            }
            *self = RefusalLog::new();
        }
        if self.logged < REFUSALS_LOGGED_PER_MINUTE {
            self.logged += 1;
            tracing::warn!(%peer, "TLS handshake refused: {why}");
        } else {
            self.suppressed += 1;
        }
    }
}

/// A TLS connection handed to tonic.
pub struct TlsConn {
    inner: TlsStream<QuickAck>,
    peer: Peer,
}

/// Handlers find the [`Peer`] (who connected) in the request's extensions.
impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
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

/// Serves until `shutdown` completes.
///
/// `make_service` receives the watch channel that tells long-lived streams
/// to end, so the caller builds the service with it.
pub async fn serve<F>(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    trusted_uids: Vec<u32>,
    make_service: impl FnOnce(watch::Receiver<bool>) -> AgentService,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let (conn_tx, conn_rx) = mpsc::channel::<io::Result<TlsConn>>(32);
    let acceptor =
        tokio::spawn(accept_loop(listener, TlsAcceptor::from(Arc::new(tls)), trusted_uids, conn_tx, stop_rx.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;
    let service = make_service(stop_rx);

    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Room for a few of the 1 MiB chunks of an image or file upload in
        // flight (HTTP/2's default window is 64 KiB: one round trip per 64 KiB).
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .add_service(health_service)
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            health.set_not_serving::<AgentServer<AgentService>>().await;
        })
        .await;
    // The accept loop watches the same signal; wait for it so no task
    // outlives `serve`.
    let _ = acceptor.await;
    result
}

/// The uid owning the other end of each of `peers` (loopback TCP
/// connections to `local`): the socket in `/proc/net/tcp` whose local
/// address is the peer and remote address is ours. A peer not found (not
/// loopback, or gone already) has none. One read of the table for all:
/// reading it walks the kernel's whole connection table, milliseconds on
/// a big machine, so it is read only when handshakes pile up.
fn peer_uids(peers: &[SocketAddr], local: SocketAddr) -> Vec<Option<u32>> {
    // The kernel prints an IPv4 address as the hex of its in-memory (network
    // order) u32 read as a native integer, and the port as plain hex.
    let hex = |a: &std::net::SocketAddrV4| format!("{:08X}:{:04X}", u32::from_ne_bytes(a.ip().octets()), a.port());
    let SocketAddr::V4(local) = local else { return vec![None; peers.len()] };
    let want_remote = hex(&local);
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else { return vec![None; peers.len()] };
    let owners: std::collections::HashMap<&str, u32> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 7 && f[2] == want_remote).then(|| Some((f[1], f[7].parse().ok()?))).flatten()
        })
        .collect();
    peers
        .iter()
        .map(|p| match p {
            SocketAddr::V4(p) => owners.get(hex(p).as_str()).copied(),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    trusted_uids: Vec<u32>,
    conns: mpsc::Sender<io::Result<TlsConn>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut handshakes = tokio::task::JoinSet::new();
    // Pending handshakes, oldest first, with where they come from. Once the
    // cap is reached their owners are looked up (see `peer_uids`) and those
    // of root and the operator (the controller's tunnels come from their
    // sshd sessions) leave the queue, so other local users can crowd out
    // only each other.
    let mut pending: std::collections::VecDeque<(tokio::task::AbortHandle, SocketAddr)> =
        std::collections::VecDeque::new();
    let local_addr = listener.local_addr().ok();
    let refusals = Arc::new(std::sync::Mutex::new(RefusalLog::new()));
    let mut evicted: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let conns = conns.clone();
                // sshd forwards the controller's bytes with Nagle on; see mlops_proto::net.
                let tcp = QuickAck::new(tcp);
                let mut trusted = false;
                if pending.len() >= MAX_HANDSHAKES {
                    // Crowded: who are they? Trusted ones leave the queue
                    // (never dropped), then the oldest other one goes.
                    let peers: Vec<SocketAddr> =
                        std::iter::once(peer).chain(pending.iter().map(|(_, p)| *p)).collect();
                    let owners = match local_addr {
                        Some(local) => peer_uids(&peers, local),
                        None => vec![None; peers.len()],
                    };
                    let is_trusted = |uid: Option<u32>| uid.is_some_and(|u| trusted_uids.contains(&u));
                    trusted = is_trusted(owners[0]);
                    let mut owners = owners[1..].iter();
                    pending.retain(|_| !owners.next().is_some_and(|uid| is_trusted(*uid)));
                    if !trusted && pending.len() >= MAX_HANDSHAKES && let Some((oldest, _)) = pending.pop_front() {
                        oldest.abort();
                        evicted += 1;
                        if evicted.is_power_of_two() {
                            tracing::warn!(
                                evicted,
                                "too many TLS handshakes at once; dropping the oldest (idle connections?)"
                            );
                        }
                    }
                }
                let refusals = refusals.clone();
                let handle = handshakes.spawn(async move {
                    let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp).into_fallible()).await {
                        Ok(Ok(tls)) => {
                            let who = Peer::from_certs(tls.get_ref().1.peer_certificates());
                            let _ = conns.send(Ok(TlsConn { inner: tls, peer: who })).await;
                            return;
                        }
                        // Refused clients (no certificate, another CA, revoked) land here.
                        Ok(Err((e, tcp))) => {
                            linger(tcp).await;
                            e.to_string()
                        }
                        Err(_) => "timed out".to_string(),
                    };
                    refusals.lock().expect("not poisoned").refused(peer, &why);
                });
                if !trusted {
                    pending.push_back((handle, peer));
                }
            }
            Some(done) = handshakes.join_next_with_id(), if !handshakes.is_empty() => {
                let id = match &done {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                pending.retain(|(h, _)| h.id() != id);
            }
        }
    }
    handshakes.shutdown().await;
}

/// Closes a refused connection so that the alert saying why reaches the
/// client: closing with its unread bytes (the HTTP/2 preface it sent after
/// its half of the handshake) would reset the connection, and a reset can
/// overtake the alert. So: end our side, then read what it sends until it
/// closes too, for at most a second.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = io.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uid_behind_a_loopback_connection_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let uids = peer_uids(&[peer, gone], listener.local_addr().unwrap());
        assert_eq!(uids, [Some(rustix::process::geteuid().as_raw()), None]);
    }
}
