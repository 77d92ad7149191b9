//! `mlopsctl pki rotate`: a new CA for the controller and a new key and
//! certificate for every agent, with no moment where the controller and an
//! agent do not trust each other.
//!
//! 1. A second CA is made (`pki/next/`, kept until the end, so an
//!    interrupted rotation resumes with the same one).
//! 2. Every host gets an install bundle trusting both CAs, with a new server
//!    key and certificate issued by the new CA; the controller trusts both
//!    CAs meanwhile and still presents its old client certificate.
//! 3. Only when every host has that, the new CA is promoted (the old one is
//!    kept under `pki/retired/`) and the controller gets a new client
//!    certificate from it.
//! 4. Every host gets the bundle trusting the new CA only.
//!
//! A host that fails in step 2 stops the rotation before anything is
//! promoted (run it again); one that fails in step 4 still trusts both CAs
//! and is finished by the next `deploy` or `pki rotate`. Each install
//! restarts the agent (a fraction of a second); the stack's containers do
//! not notice.

use std::collections::BTreeMap;
use std::sync::Arc;

use mlops_pki::Ca;
use serde::Serialize;

use super::Setup;
use crate::ControllerError;
use crate::bootstrap::{self, Bundle, Context, DeployOutcome};
use crate::client::ClientTls;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::state::cert_name;

/// What a rotation did.
pub struct RotateReport {
    /// sha256 of the CA certificates, hex.
    pub old_ca: String,
    pub new_ca: String,
    /// Step 2: agents trusting both CAs, holding a certificate of the new one.
    pub both: HostResults<DeployOutcome>,
    /// Step 4: agents trusting the new CA only; `None` when step 2 failed
    /// somewhere and nothing was promoted.
    pub new_only: Option<HostResults<DeployOutcome>>,
    /// Hosts with a certificate of the old CA that were not in this run:
    /// they keep trusting only the old CA until a `deploy` re-keys them.
    pub not_in_run: Vec<String>,
}

#[derive(Serialize)]
struct Summary<'a> {
    old_ca: &'a str,
    new_ca: &'a str,
    promoted: bool,
    not_in_run: &'a [String],
}

impl RotateReport {
    /// The fields of the report that are not per host, for JSON output.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::to_value(Summary {
            old_ca: &self.old_ca,
            new_ca: &self.new_ca,
            promoted: self.new_only.is_some(),
            not_in_run: &self.not_in_run,
        })
        .expect("serializable")
    }
}

fn context_with(setup: &Setup, tls: ClientTls, tls_cas: &str) -> Arc<Context> {
    let ctx = &setup.ctx;
    Arc::new(Context {
        binary: ctx.binary.clone(),
        tls,
        ssh: ctx.ssh.clone(),
        identities: ctx.identities.clone(),
        take_over: false,
        // The setup's CAs, and the ones this step hands out.
        our_cas_pem: format!("{}{}", ctx.our_cas_pem, tls_cas),
        state: None,
    })
}

async fn push(
    setup: &Setup,
    ctx: &Arc<Context>,
    bundles: BTreeMap<String, Bundle>,
    report: &Arc<dyn Report>,
) -> HostResults<DeployOutcome> {
    let bundles = Arc::new(bundles);
    per_host(&setup.targets, setup.forks, ctx, report, move |target, ctx, progress| {
        let bundles = bundles.clone();
        async move { bootstrap::deploy_host(&target, &ctx, &bundles[&target.name], None, &progress).await }
    })
    .await
}

pub async fn rotate(setup: &Setup, report: Arc<dyn Report>) -> Result<RotateReport, ControllerError> {
    let pki = setup.state.path.join("pki");
    let old = Ca::open(&pki)?;
    if !old.is_root() {
        return Err(ControllerError::usage(
            "this controller holds an operator's CA: only the root's holder rotates the CA",
            Some("run `mlopsctl pki rotate` on the controller that added you as an operator"),
        ));
    }
    let crl = old.crl()?;
    let resumed = old.has_next();
    let next = old.next()?;
    report.info(&format!(
        "{} CA rotation: {} -> {} on {} host(s)",
        if resumed { "resuming the" } else { "starting a" },
        &old.fingerprint()[..12],
        &next.fingerprint()[..12],
        setup.targets.len()
    ));
    let mut not_in_run: Vec<String> = std::fs::read_dir(pki.join("hosts"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let in_run: Vec<String> = setup.targets.iter().map(|t| cert_name(&t.name)).collect();
    not_in_run.retain(|h| !in_run.contains(h));
    not_in_run.sort();

    // Step 2: trust both, new server identity.
    let both_pem = format!("{}{}", old.cert_pem(), next.cert_pem());
    let mut bundles = BTreeMap::new();
    for t in &setup.targets {
        bundles.insert(t.name.clone(), Bundle::new(&both_pem, &crl, next.server_identity(&cert_name(&t.name))?, t));
    }
    let ctx = context_with(setup, ClientTls::new(&both_pem, &crl.pem, &old.client_identity()?)?, &both_pem);
    let both = push(setup, &ctx, bundles, &report).await;
    let (old_ca, new_ca) = (old.fingerprint().to_string(), next.fingerprint().to_string());
    if !both.failed.is_empty() {
        return Ok(RotateReport { old_ca, new_ca, both, new_only: None, not_in_run });
    }

    // Step 3: promote; step 4: trust the new CA only.
    drop(next);
    let new = Ca::promote_next(&pki)?;
    report.info(&format!("every host trusts the new CA; it is now the controller's ({})", &new.fingerprint()[..12]));
    let mut bundles = BTreeMap::new();
    for t in &setup.targets {
        bundles.insert(t.name.clone(), Bundle::new(new.cert_pem(), &crl, new.server_identity(&cert_name(&t.name))?, t));
    }
    let ctx = context_with(setup, ClientTls::new(new.cert_pem(), &crl.pem, &new.client_identity()?)?, new.cert_pem());
    let new_only = push(setup, &ctx, bundles, &report).await;
    Ok(RotateReport { old_ca, new_ca, both, new_only: Some(new_only), not_in_run })
}
