//! `mlopsctl secrets`: a stack's generated credentials, from the state
//! directory.

use std::collections::BTreeMap;

use super::{Setup, StackOptions};
use crate::ControllerError;

/// The project and its secrets (name, value).
pub fn secrets(setup: &Setup, opts: &StackOptions) -> Result<(String, BTreeMap<String, String>), ControllerError> {
    let project = opts.project(&setup.state)?;
    let all = crate::secrets::load(&setup.state.path, &project)?;
    if all.is_empty() {
        return Err(ControllerError::usage(
            format!("no credentials for stack `{project}` yet"),
            Some("`mlopsctl deploy` generates them (with the same --state-dir)"),
        ));
    }
    Ok((project, all))
}
