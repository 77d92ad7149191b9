//! The agent admits only clients with a certificate from the controller's
//! CA. Runs the real agent binary on a loopback port (no SSH involved).

use std::sync::Arc;
use std::time::Duration;

use mlops_controller::client::{AgentConn, ClientTls};
use mlops_controller::transport::Transport;
use mlops_e2e::{LocalAgent, bins};
use mlops_pki::Ca;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn start_agent(ca: &Ca) -> LocalAgent {
    LocalAgent::start(&bins().agent, ca).unwrap()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Connects with `config` and tries one exchange. The server checks the
/// client certificate after the TLS 1.3 handshake, so its refusal shows
/// as an alert on the first read.
async fn try_tls(port: u16, config: rustls::ClientConfig) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(ServerName::try_from(mlops_pki::agent_tls_name("localhost")).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

fn roots(ca: &Ca) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn client_config(trust: &Ca, identity: Option<&mlops_pki::Identity>) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(trust));
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain =
                rustls::pki_types::CertificateDer::pem_slice_iter(id.cert_pem.as_bytes()).map(Result::unwrap).collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

#[tokio::test]
async fn only_clients_of_the_controllers_ca_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(&dir.path().join("pki")).unwrap();
    let other = Ca::open_or_create(&dir.path().join("other-pki")).unwrap();
    let agent = start_agent(&ca);

    // The controller's own client: gRPC works.
    let tls = ClientTls::new(ca.cert_pem(), "", &ca.client_identity().unwrap()).unwrap();
    let mut conn = AgentConn::connect(Arc::new(Transport::local()), agent.port, &tls).await.unwrap();
    let hello = conn.hello().await.unwrap();
    assert_eq!(hello.api_level, mlops_proto::API_LEVEL);
    assert_eq!(hello.binary_sha256, mlops_e2e::sha256_file(&bins().agent).unwrap());
    let facts = conn.facts().await.unwrap();
    assert!(facts.cpus >= 1 && facts.memory_total_bytes > 0);

    // The same TLS settings with the right certificate pass the raw check,
    // so the refusals below are about the certificate and nothing else.
    try_tls(agent.port, client_config(&ca, Some(&ca.client_identity().unwrap()))).await.expect("accepted");

    // No client certificate.
    let err = try_tls(agent.port, client_config(&ca, None)).await.unwrap_err();
    assert!(err.contains("CertificateRequired"), "{err}");

    // A certificate from another CA.
    let err = try_tls(agent.port, client_config(&ca, Some(&other.client_identity().unwrap()))).await.unwrap_err();
    assert!(err.contains("UnknownCA") || err.contains("BadCertificate"), "{err}");
    let tls_other = ClientTls::new(ca.cert_pem(), "", &other.client_identity().unwrap()).unwrap();
    let refused = match AgentConn::connect(Arc::new(Transport::local()), agent.port, &tls_other).await {
        Ok(mut c) => c.hello().await.map(drop),
        Err(e) => Err(e),
    };
    assert!(refused.is_err(), "a foreign client gets no RPC");

    // And the controller does not trust an agent of another CA either.
    let foreign_agent = start_agent(&other);
    let e = AgentConn::connect(Arc::new(Transport::local()), foreign_agent.port, &tls).await.err().expect("refused");
    assert!(e.to_string().contains("UnknownIssuer") || e.to_string().contains("invalid peer certificate"), "{e}");

    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("TLS handshake refused") || log.contains("refused"), "{log}");
}

#[tokio::test]
async fn heartbeat_streams_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(dir.path()).unwrap();
    let agent = start_agent(&ca);
    let tls = ClientTls::new(ca.cert_pem(), "", &ca.client_identity().unwrap()).unwrap();
    let mut conn = AgentConn::connect(Arc::new(Transport::local()), agent.port, &tls).await.unwrap();
    let mut stream =
        conn.raw().heartbeat(mlops_proto::v1::HeartbeatRequest { interval_ms: 200 }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!((first.seq, second.seq), (0, 1));
    assert!(second.unix_ms >= first.unix_ms + 150, "paced by the interval");
    assert!(second.agent_rss_bytes > 0 && (0.0..=1.0).contains(&second.cpu_busy));

    let bad = conn.raw().heartbeat(mlops_proto::v1::HeartbeatRequest { interval_ms: 0 }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn the_standard_health_service_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(dir.path()).unwrap();
    let agent = start_agent(&ca);
    let tls = ClientTls::new(ca.cert_pem(), "", &ca.client_identity().unwrap()).unwrap();
    let conn = AgentConn::connect(Arc::new(Transport::local()), agent.port, &tls).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(conn.channel());
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest { service: "mlops.agent.v1.Agent".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}
