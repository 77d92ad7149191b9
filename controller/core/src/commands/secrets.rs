//! `mlopsctl secrets`: a stack's credentials, as its hosts hold them (the
//! hosts are the truth; the state directory's copy is a cache, refreshed
//! here when the hosts agree, and read alone with `--cached`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::fanout::{HostResults, per_host};
use crate::progress::Report;
use crate::secrets::{Disagreement, holders};

/// What `secrets` found.
#[derive(Debug)]
pub struct SecretsReport {
    pub project: String,
    /// Every name with one value across the hosts that hold it.
    pub values: BTreeMap<String, String>,
    /// Names whose hosts hold different values (never printed as values).
    pub disagreements: Vec<Disagreement>,
    /// Names some hosts lack while others hold them (the next deploy
    /// stores them there): name and the hosts lacking it.
    pub missing: Vec<(String, Vec<String>)>,
    /// `hosts` or `cache`.
    pub source: &'static str,
    /// What each host holds (names only are worth printing), or why it did not answer.
    pub hosts: HostResults<Vec<String>>,
}

/// Reads the secrets of the stack's project from every host (or, with
/// `cached`, from the state directory alone).
pub async fn secrets(
    setup: &Setup,
    opts: &StackOptions,
    cached: bool,
    report: Arc<dyn Report>,
) -> Result<SecretsReport, ControllerError> {
    let project = opts.project(&setup.state)?;
    if cached {
        let values = crate::secrets::load(&setup.state.path, &project)?;
        if values.is_empty() {
            return Err(ControllerError::usage(
                format!("this controller holds no copy of the credentials of stack `{project}`"),
                Some("drop --cached to read them from the hosts"),
            ));
        }
        return Ok(SecretsReport {
            project,
            values,
            disagreements: Vec::new(),
            missing: Vec::new(),
            source: "cache",
            hosts: HostResults { ok: Vec::new(), failed: Vec::new() },
        });
    }
    let p = project.clone();
    let results = per_host(&setup.targets, setup.forks, &setup.ctx, &report, move |target, ctx, _progress| {
        let project = p.clone();
        async move {
            let (transport, mut conn) = bootstrap::connect_agent(&target, &ctx).await?;
            let held = crate::secrets::held_by(&mut conn, &project).await;
            transport.close().await;
            held
        }
    })
    .await;
    let (values, disagreements, missing) = compare(&results.ok);
    if results.ok.iter().all(|(_, held)| held.is_empty()) && results.failed.is_empty() {
        return Err(ControllerError::usage(
            format!("no host holds credentials for stack `{project}`"),
            Some("`mlopsctl deploy` generates them and stores them on every host of the stack"),
        ));
    }
    if disagreements.is_empty() && !values.is_empty() {
        crate::secrets::store_cache(&setup.state.path, &project, &values)?;
    }
    let hosts = HostResults {
        ok: results.ok.into_iter().map(|(h, held)| (h, held.into_keys().collect())).collect(),
        failed: results.failed,
    };
    Ok(SecretsReport { project, values, disagreements, missing, source: "hosts", hosts })
}

type Compared = (BTreeMap<String, String>, Vec<Disagreement>, Vec<(String, Vec<String>)>);

/// Sorts what the hosts hold into agreed values, disagreements and gaps.
fn compare(hosts: &[(String, BTreeMap<String, String>)]) -> Compared {
    let names: BTreeSet<&String> = hosts.iter().flat_map(|(_, held)| held.keys()).collect();
    let (mut values, mut disagreements, mut missing) = (BTreeMap::new(), Vec::new(), Vec::new());
    for name in names {
        let held = holders(name, hosts);
        if let [(_, _, value)] = held.values.as_slice() {
            values.insert(name.clone(), value.clone());
        } else {
            disagreements.push(held.disagreement(name));
        }
        if !held.lacking.is_empty() {
            missing.push((name.clone(), held.lacking));
        }
    }
    (values, disagreements, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_disagreement_and_gaps() {
        let host = |name: &str, pairs: &[(&str, &str)]| {
            (name.to_string(), pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        };
        let hosts =
            vec![host("a", &[("X", "1"), ("Y", "2")]), host("b", &[("X", "1"), ("Y", "3")]), host("c", &[("X", "1")])];
        let (values, disagreements, missing) = compare(&hosts);
        assert_eq!(values.len(), 1);
        assert_eq!(values["X"], "1");
        assert_eq!(disagreements.len(), 1);
        assert_eq!(disagreements[0].name, "Y");
        assert_eq!(disagreements[0].holders.len(), 2);
        assert_eq!(missing, vec![("Y".to_string(), vec!["c".to_string()])]);
    }
}
