//! `mlopsctl config`: the stack as mlopsctl will run it, like `docker
//! compose config`: interpolated, anchors and merges expanded, `env_file`
//! merged, profiles and `--skip` applied, in one canonical Compose spelling
//! ([`mlops_compose::emit`]) that reads back into the same model. The
//! values of the stack's secrets (`x-mlops.secrets`) are replaced by
//! [`MASK`]: this runs on the controller, reaches no host, and prints
//! nothing a host keeps secret. It is also the way to check a Compose file
//! without deploying it: invalid input is the same positioned error (exit 2)
//! a deploy would give.

use std::collections::BTreeMap;

use crate::ControllerError;
use crate::commands::{Setup, StackOptions};
use crate::progress::Report;

/// What a secret's value is shown as.
pub const MASK: &str = "********";

/// The resolved stack, and the Compose document that spells it.
pub struct Resolved {
    pub stack: mlops_proto::stack::Stack,
    pub document: serde_json::Value,
}

pub fn config(setup: &Setup, stack: &StackOptions, report: &dyn Report) -> Result<Resolved, ControllerError> {
    let dir = stack.dir(&setup.state)?;
    let (_, secret_names) = mlops_compose::preflight(&dir, stack.project.as_deref())?;
    let masked: BTreeMap<String, String> = secret_names.into_iter().map(|n| (n, MASK.to_string())).collect();
    let mut loaded = stack.load_model_with(&setup.state, report, &masked)?;
    without_absent_services(&mut loaded.stack);
    let document = mlops_compose::emit::to_compose(&loaded.stack);
    Ok(Resolved { stack: loaded.stack, document })
}

/// Leaves out of `x-mlops` what names a service that does not run (left
/// out by `--skip`, or by a profile not enabled), so that the document is a
/// Compose file of its own: its parts for those services mean nothing to
/// what runs. (`skip_services` keeps them for the commands: a rotation
/// whose step runs in a skipped service must be refused, not run without
/// its step.)
fn without_absent_services(stack: &mut mlops_proto::stack::Stack) {
    let present = |s: &String| stack.services.contains_key(s);
    let o = &mut stack.options;
    o.ui.retain(|_, ui| present(&ui.service));
    for rotation in o.rotate.values_mut() {
        rotation.before.take_if(|h| !present(&h.service));
        rotation.after.take_if(|h| !present(&h.service));
    }
    let p = &mut o.placement;
    for role in p.roles.values_mut() {
        role.services.retain(present);
    }
    p.roles.retain(|_, r| !r.services.is_empty());
    p.every_host.retain(present);
    p.remote_ports.retain(|s, _| present(s));
    p.scrape.retain(|s, _| present(s));
    let m = &mut o.migrate;
    m.hold.retain(present);
    m.database.take_if(|d| !present(&d.service));
    m.airflow.take_if(|a| !present(&a.service));
}
