//! The agent's engine RPCs where no engine answers: clear answers, no hang.

use std::sync::Arc;

use futures::StreamExt;
use mlops_controller::client::{AgentConn, ClientTls};
use mlops_controller::transport::Transport;
use mlops_e2e::{LocalAgent, bins};
use mlops_pki::Ca;
use mlops_proto::v1::{ConvergeRequest, EnsureDockerRequest, FailureKind};

#[tokio::test]
async fn without_an_engine_the_agent_says_so() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(pki.path()).unwrap();
    let agent = LocalAgent::start(&bins().agent, &ca).unwrap();
    let socket = agent.docker_socket.display().to_string();
    let tls = ClientTls::new(ca.cert_pem(), "", &ca.client_identity().unwrap()).unwrap();
    let mut conn = AgentConn::connect(Arc::new(Transport::local()), agent.port, &tls).await.unwrap();

    let facts = conn.facts().await.unwrap();
    let docker = facts.docker.unwrap();
    assert!(!docker.available && docker.error.contains(&socket), "{docker:?}");

    // Asked only to check, it reports and stops.
    let events: Vec<_> =
        conn.raw().ensure_docker(EnsureDockerRequest { install: false }).await.unwrap().into_inner().collect().await;
    let last = events.last().unwrap().as_ref().unwrap();
    assert!(last.done && !last.docker.as_ref().unwrap().available, "{events:?}");

    let stack = mlops_proto::stack::Stack {
        project: "noengine".into(),
        services: [("a".to_string(), mlops_proto::stack::Service { image: Some("x".into()), ..Default::default() })]
            .into(),
        ..Default::default()
    };
    let request = ConvergeRequest {
        stack_json: serde_json::to_string(&stack).unwrap(),
        holder: "test".into(),
        files_root: "stack-noengine".into(),
        health_timeout_seconds: 5,
        ..Default::default()
    };
    let err = conn.raw().converge(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains(&format!("no Docker engine answers at {socket}")), "{err}");
    // The failure is typed: its kind and the socket, not only a sentence.
    let failure = mlops_proto::failure::from_status(&err).expect("the agent's failure travels in the status");
    assert_eq!(failure.kind(), FailureKind::EngineUnreachable);
    assert_eq!(failure.path, socket);
    let e = mlops_controller::ControllerError::from_status("h", "Converge", &err);
    assert!(!e.is_transport_failure(), "an answer, not a broken connection");

    // A model that is not a stack is refused as such, naming the field.
    let bad = ConvergeRequest { stack_json: "{".into(), files_root: "x".into(), ..Default::default() };
    let err = conn.raw().converge(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let failure = mlops_proto::failure::from_status(&err).unwrap();
    assert_eq!((failure.kind(), failure.field.as_str()), (FailureKind::BadRequest, "stack_json"));
}
