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

/// Who owns the client end of the loopback connections to the agent's
/// port. Asked of the kernel one connection at a time over `sock_diag`
/// netlink (what `ss` uses: an exact lookup, microseconds). Where that is
/// missing (a kernel without `inet_diag`), read from `/proc/net/tcp`:
/// reading it walks the whole connection table, some 20 ms with a few
/// thousand connections, so it is read at most every [`OWNERS_MAX_AGE`]
/// unless a connection must be decided on and the table read does not know
/// it yet. (Reading it for every connection accepted, as the agent once
/// did, slowed accepting to 50 a second under a flood of connects; the
/// controller's connection then waited in the listen queue and `status`
/// timed out in CI.)
struct Owners {
    local: Option<std::net::SocketAddrV4>,
    /// The `sock_diag` netlink socket, while it answers.
    diag: Option<std::os::fd::OwnedFd>,
    /// Client address (as the kernel prints it) → uid.
    table: std::collections::HashMap<String, u32>,
    read_at: Option<std::time::Instant>,
}

/// How old the table of owners may be when a new connection is looked up.
const OWNERS_MAX_AGE: Duration = Duration::from_millis(20);

impl Owners {
    fn new(local: Option<SocketAddr>) -> Self {
        let local = match local {
            Some(SocketAddr::V4(l)) => Some(l),
            _ => None,
        };
        // A kernel without the inet_diag handlers answers every lookup
        // "no such socket" (ENOENT): netlink is used only once it finds
        // the agent's own listener.
        let diag = local.and_then(|l| {
            let fd = diag_socket().ok()?;
            let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
            matches!(diag_uid(&fd, l, any), Ok(Some(_))).then_some(fd)
        });
        Owners { local, diag, table: std::collections::HashMap::new(), read_at: None }
    }

    /// The kernel prints an IPv4 address as the hex of its in-memory
    /// (network order) u32 read as a native integer, and the port as plain hex.
    fn hex(a: &std::net::SocketAddrV4) -> String {
        format!("{:08X}:{:04X}", u32::from_ne_bytes(a.ip().octets()), a.port())
    }

    /// Reads `/proc/net/tcp` (when netlink does not answer).
    fn read(&mut self) {
        self.read_at = Some(std::time::Instant::now());
        self.table.clear();
        let Some(local) = self.local.filter(|_| self.diag.is_none()) else { return };
        let want_remote = Self::hex(&local);
        let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else { return };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 7
                && f[2] == want_remote
                && let Ok(uid) = f[7].parse()
            {
                self.table.insert(f[1].to_string(), uid);
            }
        }
    }

    fn read_if_older_than(&mut self, age: Duration) {
        if self.diag.is_none() && self.read_at.is_none_or(|t| t.elapsed() >= age) {
            self.read();
        }
    }

    /// The uid behind `peer`, accepted at `accepted`: `Some(Some(uid))`,
    /// `Some(None)` when nobody has it (not loopback, or gone already),
    /// `None` when not known yet (the table read is older than the
    /// connection and does not have it).
    fn uid(&mut self, peer: SocketAddr, accepted: std::time::Instant) -> Option<Option<u32>> {
        let (SocketAddr::V4(p), Some(local)) = (peer, self.local) else { return Some(None) };
        if let Some(fd) = &self.diag {
            match diag_uid(fd, p, local) {
                Ok(uid) => return Some(uid),
                Err(e) => {
                    tracing::warn!("sock_diag netlink failed ({e}); reading /proc/net/tcp instead");
                    self.diag = None;
                    self.read();
                }
            }
        }
        match self.table.get(&Self::hex(&p)) {
            Some(uid) => Some(Some(*uid)),
            None if self.read_at.is_some_and(|t| t >= accepted) => Some(None),
            None => None,
        }
    }
}

/// A `NETLINK_SOCK_DIAG` socket; answers come back within the request's
/// `sendto`, the timeout is a bound should one not.
fn diag_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink, sockopt};
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_millis(200)))?;
    Ok(fd)
}

/// The uid of the TCP socket whose own address is `client` and whose peer
/// is `server`, by an exact `SOCK_DIAG_BY_FAMILY` lookup
/// (`linux/inet_diag.h`); `None` when there is no such socket, or only
/// what is left of one already closed (no inode: the kernel says uid 0).
fn diag_uid(
    fd: &std::os::fd::OwnedFd,
    client: std::net::SocketAddrV4,
    server: std::net::SocketAddrV4,
) -> std::io::Result<Option<u32>> {
    use rustix::net::{RecvFlags, SendFlags, netlink::SocketAddrNetlink};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    // nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes).
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel answers
    req.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    // inet_diag_sockid: ports and addresses in network order.
    let sockid = |a: std::net::SocketAddrV4, b: std::net::SocketAddrV4| {
        let mut id = Vec::with_capacity(48);
        id.extend_from_slice(&a.port().to_be_bytes());
        id.extend_from_slice(&b.port().to_be_bytes());
        id.extend_from_slice(&a.ip().octets());
        id.extend_from_slice(&[0; 12]);
        id.extend_from_slice(&b.ip().octets());
        id.extend_from_slice(&[0; 12]);
        id
    };
    let want = sockid(client, server);
    req.extend_from_slice(&want);
    req.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    req.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    rustix::net::sendto(fd, &req, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))?;
    let mut buf = [0u8; 1024];
    let n = rustix::net::recv(fd, &mut buf, RecvFlags::empty())?.0;
    let msg = &buf[..n.min(buf.len())];
    let u16_at = |o: usize| msg.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |o: usize| msg.get(o..o + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match u16_at(4) {
        Some(NLMSG_ERROR) => {
            let errno = -(u32_at(16).unwrap_or(0) as i32);
            if errno == libc::ENOENT { Ok(None) } else { Err(std::io::Error::from_raw_os_error(errno)) }
        }
        Some(SOCK_DIAG_BY_FAMILY) if n >= 16 + 72 => {
            // inet_diag_msg: family, state, timer, retrans, then the id
            // (the same four fields first), then expires, rqueue, wqueue,
            // uid. A listener on the client's port would answer too: the
            // id must be the connection's.
            if msg[20..20 + 36] != want[..36] || u32_at(16 + 4 + 48 + 16) == Some(0) {
                return Ok(None);
            }
            Ok(u32_at(16 + 4 + 48 + 12))
        }
        _ => Err(std::io::Error::other(format!("unexpected sock_diag answer ({n} bytes)"))),
    }
}

/// A handshake under way.
struct Pending {
    handle: tokio::task::AbortHandle,
    peer: SocketAddr,
    accepted: std::time::Instant,
    /// Whether the peer is root or the operator, once known.
    trusted: Option<bool>,
}

/// Decides on every pending handshake that `owners` knows, then lets the
/// trusted ones leave the queue (they are never dropped).
fn sort_out(pending: &mut std::collections::VecDeque<Pending>, owners: &mut Owners, trusted_uids: &[u32]) {
    for p in pending.iter_mut().filter(|p| p.trusted.is_none()) {
        p.trusted = owners.uid(p.peer, p.accepted).map(|uid| uid.is_some_and(|u| trusted_uids.contains(&u)));
    }
    pending.retain(|p| p.trusted != Some(true));
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    trusted_uids: Vec<u32>,
    conns: mpsc::Sender<io::Result<TlsConn>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut handshakes = tokio::task::JoinSet::new();
    // Pending handshakes, oldest first. Once the cap is reached their
    // owners are looked up (see `Owners`) and those of root and the
    // operator (the controller's tunnels come from their sshd sessions)
    // leave the queue, so other local users can crowd out only each other.
    let mut pending: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    let mut owners = Owners::new(listener.local_addr().ok());
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
                let now = std::time::Instant::now();
                let mut trusted = false;
                if pending.len() >= MAX_HANDSHAKES {
                    // Crowded: who are they? Trusted ones leave the queue
                    // (never dropped), then the oldest other one goes.
                    owners.read_if_older_than(OWNERS_MAX_AGE);
                    trusted = owners.uid(peer, now).flatten().is_some_and(|u| trusted_uids.contains(&u));
                    sort_out(&mut pending, &mut owners, &trusted_uids);
                    while !trusted && pending.len() >= MAX_HANDSHAKES {
                        if pending.front().is_some_and(|p| p.trusted.is_none()) {
                            // Not known yet: a fresh read knows every
                            // connection accepted so far.
                            owners.read();
                            sort_out(&mut pending, &mut owners, &trusted_uids);
                            continue;
                        }
                        let Some(oldest) = pending.pop_front() else { break };
                        oldest.handle.abort();
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
                    pending.push_back(Pending { handle, peer, accepted: now, trusted: None });
                }
            }
            Some(done) = handshakes.join_next_with_id(), if !handshakes.is_empty() => {
                let id = match &done {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                pending.retain(|p| p.handle.id() != id);
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
    fn the_uid_behind_a_loopback_connection_is_found_by_netlink() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut owners = Owners::new(listener.local_addr().ok());
        assert!(owners.diag.is_some(), "sock_diag netlink is there");
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(owners.uid(peer, std::time::Instant::now()), Some(Some(me)));
        // Nobody's: no such connection (even with a listener on its port).
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(owners.uid(other.local_addr().unwrap(), std::time::Instant::now()), Some(None));
        assert!(owners.diag.is_some(), "netlink kept answering");
        assert!(owners.read_at.is_none(), "the table was never read");
    }

    #[test]
    fn without_netlink_the_table_is_read_and_a_stale_one_is_not_believed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut owners = Owners::new(listener.local_addr().ok());
        owners.diag = None;
        let before = std::time::Instant::now();
        // Read before the connection exists: it does not know it, and says
        // that it does not know rather than "nobody".
        owners.read();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        let accepted = std::time::Instant::now();
        assert_eq!(owners.uid(peer, accepted), None);
        // Not old enough to be read again.
        owners.read_if_older_than(Duration::from_secs(3600));
        assert_eq!(owners.uid(peer, accepted), None);
        owners.read_if_older_than(Duration::ZERO);
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(owners.uid(peer, accepted), Some(Some(me)));
        // A connection the fresh table does not have is nobody's (gone).
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(owners.uid(gone, accepted), Some(None));
        assert_eq!(owners.uid(gone, std::time::Instant::now()), None);

        // The queue: the trusted one leaves, the unknown one stays undecided.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let handle = || rt.spawn(async {}).abort_handle();
        let mut pending: std::collections::VecDeque<Pending> = [
            Pending { handle: handle(), peer, accepted, trusted: None },
            Pending { handle: handle(), peer: gone, accepted: before, trusted: None },
            Pending { handle: handle(), peer: gone, accepted: std::time::Instant::now(), trusted: None },
        ]
        .into();
        sort_out(&mut pending, &mut owners, &[me]);
        let left: Vec<Option<bool>> = pending.iter().map(|p| p.trusted).collect();
        assert_eq!(left, [Some(false), None]);
        sort_out(&mut pending, &mut owners, &[]);
        assert_eq!(pending.len(), 2, "nothing decided twice");
    }
}
