//! gRPC to an agent: TLS with the controller's client certificate, over a
//! stream the [`Transport`] opens (an SSH channel or loopback TCP).
//!
//! The agent's certificate must chain to the controller's CA and carry the
//! name issued for the host the controller means to reach
//! ([`mlops_pki::agent_tls_name`] of its inventory name); nothing else is
//! trusted, not even another host's agent.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use mlops_pki::Identity;
use mlops_proto::v1::agent_client::AgentClient;
use mlops_proto::v1::{GetFactsRequest, HelloRequest, HelloResponse, HostFacts};
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::ControllerError;
use crate::state::cert_name;
use crate::transport::SharedTransport;

/// How long a call that a live agent answers at once (`Hello`,
/// `GetFacts`) may take before the connection counts as broken.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// An idle connection is pinged this often...
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);
/// ...and closed, failing its calls, when a ping is not answered in this
/// time (generous: an agent in a VM under emulation can be slow).
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The client side of mTLS, built once per run and shared by all hosts.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    /// Trusting agents whose certificate chains to `ca_pem` and is not
    /// under a CA on the revocation list `crl_pem` (empty: none); presenting
    /// `identity`.
    pub fn new(ca_pem: &str, crl_pem: &str, identity: &Identity) -> Result<Self, ControllerError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let bad = |what: &str| ControllerError::Local(format!("invalid {what} in the controller's PKI"));
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile_certs(ca_pem) {
            roots.add(cert).map_err(|_| bad("CA certificate"))?;
        }
        let mut verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let crls = crls(crl_pem);
        if !crls.is_empty() {
            // An agent keyed by a removed operator is not trusted; the
            // operators' own leaves have no list of their own.
            verifier = verifier.with_crls(crls).allow_unknown_revocation_status();
        }
        let verifier = verifier.build().map_err(|_| bad("revocation list"))?;
        let chain = rustls_pemfile_certs(&identity.cert_pem);
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
            .map_err(|_| bad("client key"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|_| bad("TLS configuration"))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|_| bad("client certificate"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClientTls { config: Arc::new(config) })
    }
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).collect()
}

fn crls(pem: &str) -> Vec<rustls::pki_types::CertificateRevocationListDer<'static>> {
    rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).collect()
}

/// Whether `crl_pem` is a revocation list the root `root_pem` signed
/// that revokes `identity` (this controller's own chain): an agent
/// holding it refuses us, so we must not re-key it either.
pub fn crl_revokes_us(root_pem: &str, crl_pem: &str, identity: &Identity) -> bool {
    if mlops_proto::der::verified_crl_number(crl_pem, root_pem).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile_certs(root_pem) {
        if roots.add(cert).is_err() {
            return false;
        }
    }
    let Ok(verifier) = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .with_crls(crls(crl_pem))
        .allow_unknown_revocation_status()
        .build()
    else {
        return false;
    };
    let chain = rustls_pemfile_certs(&identity.cert_pem);
    let Some((leaf, intermediates)) = chain.split_first() else { return false };
    verifier.verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now()).is_err()
}

/// A TLS stream that remembers whether a read failed with the agent's
/// "certificate revoked" alert. In TLS 1.3 the server judges our
/// certificate after our side of the handshake is done, so its refusal
/// arrives on the first read, and the HTTP/2 layer reports the dead
/// connection to the pending call only as "connection closed". The flag
/// is set before that call fails (the failed read is what ends the
/// connection), so the call's error can say why.
struct Watched<IO> {
    inner: IO,
    revoked: Arc<std::sync::atomic::AtomicBool>,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let result = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Err(e)) = &result
            && revoked(e)
        {
            this.revoked.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        result
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection to one agent.
pub struct AgentConn {
    host: String,
    channel: Channel,
    client: AgentClient<Channel>,
    /// Set when the agent refused our certificate as revoked (see `Watched`).
    revoked: Arc<std::sync::atomic::AtomicBool>,
}

impl AgentConn {
    /// Connects through `transport` to the agent on `port`.
    pub async fn connect(transport: SharedTransport, port: u16, tls: &ClientTls) -> Result<Self, ControllerError> {
        let host = transport.host().to_string();
        let connector = TlsConnector::from(tls.config.clone());
        let revoked_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = revoked_flag.clone();
        let make_conn = tower::service_fn(move |_: Uri| {
            let transport = transport.clone();
            let connector = connector.clone();
            let flag = watch.clone();
            async move {
                let io = transport.tunnel(port).await?;
                let name = ServerName::try_from(mlops_pki::agent_tls_name(&cert_name(transport.host())))
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, io).await?;
                Ok::<_, std::io::Error>(TokioIo::new(Watched { inner: tls, revoked: flag.clone() }))
            }
        });
        // The URI only names the HTTP/2 authority; the connector decides where bytes go.
        let channel = Endpoint::from_static("http://mlops-agent")
            .connect_timeout(std::time::Duration::from_secs(10))
            // A connection whose far end went away without a word (a lost
            // EOF somewhere in SSH, TLS or HTTP/2; CI once saw `status`
            // wait forever on an agent that had refused it) fails every
            // call on it within a minute, however long the call may run.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // A failure travels in the trailers: room for it (the agent caps
            // what it sends far below this).
            .http2_max_header_list_size(64 * 1024)
            // Room for a few 1 MiB chunks of an image in flight (HTTP/2's
            // default window is 64 KiB: one round trip per 64 KiB); the
            // connection's holds three such streams (the image saves one
            // source serves at once) and room for the host's own calls.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect_with_connector(make_conn)
            .await
            .map_err(|e| {
                if revoked(&e) {
                    return ControllerError::Revoked { host: host.clone() };
                }
                ControllerError::AgentUnreachable {
                    host: host.clone(),
                    port,
                    message: error_chain(&e),
                    foreign_ca: unknown_issuer(&e),
                    other_host: not_valid_for_name(&e),
                    revoked: agent_revoked(&e),
                }
            })?;
        Ok(AgentConn { host, client: AgentClient::new(channel.clone()), channel, revoked: revoked_flag })
    }

    /// The first call on a connection; answered at once by a live agent,
    /// so it is bounded by [`ANSWER_TIMEOUT`].
    pub async fn hello(&mut self) -> Result<HelloResponse, ControllerError> {
        let req = HelloRequest { api_level: mlops_proto::API_LEVEL, controller_version: crate::VERSION.to_string() };
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, self.client.hello(req)).await;
        self.bounded("Hello", answer)
    }

    /// The host's facts; bounded like [`Self::hello`].
    pub async fn facts(&mut self) -> Result<HostFacts, ControllerError> {
        self.get_facts(false).await
    }

    /// [`Self::facts`] with what Docker's data takes (`HostFacts.docker_disk`;
    /// slower: the engine reads every image, container and volume).
    pub async fn facts_with_disk(&mut self) -> Result<HostFacts, ControllerError> {
        self.get_facts(true).await
    }

    async fn get_facts(&mut self, docker_disk: bool) -> Result<HostFacts, ControllerError> {
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, self.client.get_facts(GetFactsRequest { docker_disk })).await;
        self.bounded("GetFacts", answer)
    }

    fn bounded<T>(
        &self,
        call: &'static str,
        answer: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>,
    ) -> Result<T, ControllerError> {
        match answer {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.rpc(call, &status)),
            Err(_) if self.revoked.load(std::sync::atomic::Ordering::SeqCst) => {
                Err(ControllerError::Revoked { host: self.host.clone() })
            }
            Err(_) => Err(ControllerError::Transport {
                host: self.host.clone(),
                call,
                message: format!("no answer within {} s", ANSWER_TIMEOUT.as_secs()),
            }),
        }
    }

    /// The host's name, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The underlying channel, for other services on the same connection
    /// (such as `grpc.health.v1.Health`).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The raw client, for streaming calls.
    pub fn raw(&mut self) -> &mut AgentClient<Channel> {
        &mut self.client
    }

    fn rpc(&self, call: &'static str, status: &tonic::Status) -> ControllerError {
        if self.revoked.load(std::sync::atomic::Ordering::SeqCst) {
            return ControllerError::Revoked { host: self.host.clone() };
        }
        ControllerError::from_status(&self.host, call, status)
    }
}

/// The certificate problem a TLS handshake failed with, if any. (The
/// rustls error travels inside an `io::Error`, whose `source()` skips it,
/// so each `io::Error` on the chain is opened too.)
fn certificate_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::CertificateError> {
    let mut next: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(c)) = tls {
            return Some(c);
        }
        next = err.source();
    }
    None
}

/// Whether the agent's certificate does not chain to our CA: the agent was
/// installed by another controller.
fn unknown_issuer(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(certificate_error(e), Some(rustls::CertificateError::UnknownIssuer))
}

/// Whether the agent's certificate is under a revoked operator's CA (that
/// operator keyed it): a deploy from a current operator re-keys it.
fn agent_revoked(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(certificate_error(e), Some(rustls::CertificateError::Revoked))
}

/// Whether the agent refused our certificate as revoked: this operator
/// was removed.
pub(crate) fn revoked(e: &(dyn std::error::Error + 'static)) -> bool {
    // An alert that arrives after the handshake (TLS 1.3 sends the
    // server's verdict on our certificate then) reaches us as an I/O
    // error carrying only the text of rustls' error, not the error: so
    // it is compared with the text of the very error rustls makes.
    let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked);
    let alert_text = alert.to_string();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
            && (inner.downcast_ref::<rustls::Error>() == Some(&alert) || inner.to_string() == alert_text)
        {
            return true;
        }
        if err.downcast_ref::<rustls::Error>() == Some(&alert) {
            return true;
        }
        next = err.source();
    }
    false
}

/// Whether the agent's certificate was issued for another host.
fn not_valid_for_name(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        certificate_error(e),
        Some(rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. })
    )
}

/// `e: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}
