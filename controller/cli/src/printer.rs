//! All output goes through the [`Printer`]: progress lines, warnings and
//! errors to stderr, results to stdout (tables, or JSON with `--output
//! json`). It is the library's [`Report`] for progress, and renders what
//! each command returns. Progress is one plain line per event, or, on a
//! terminal without `-v`, one live line per host ([`crate::live`]); either
//! way every line also goes to the run's log ([`crate::runlog`]).
//!
//! Errors print as uv does:
//! ```text
//! error: <what failed>
//!   Caused by: <why>
//!   hint: <what to do>
//! ```

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use mlops_controller::ControllerError;
use mlops_controller::bootstrap::{DeployOutcome, UninstallOutcome};
use mlops_controller::commands::backup::{BackupReport, RestoreReport, ScheduleReport};
use mlops_controller::commands::deploy::DeployReport;
use mlops_controller::commands::history::HostHistory;
use mlops_controller::commands::migrate::MigrateReport;
use mlops_controller::commands::operator::{Added, Joined, Listing, Removed};
use mlops_controller::commands::pki::RotateReport as PkiRotateReport;
use mlops_controller::commands::plan::PlanReport;
use mlops_controller::commands::rotate::RotateReport;
use mlops_controller::commands::secrets::SecretsReport;
use mlops_controller::commands::state::Moved;
use mlops_controller::commands::status::HostStatus;
use mlops_controller::commands::ui::UiOpened;
use mlops_controller::commands::users::UsersReport;
use mlops_controller::fanout::HostResults;
use mlops_controller::progress::{Event, Report, Step, bytes_human};
use mlops_controller::stack::{ServiceOutcome, StackOutcome, SyncOutcome};
use mlops_inventory::{Connection, InventoryError, Target};
use mlops_proto::v1::{HealthEvent, StackAction};
use mlops_ssh::SshError;
use serde_json::json;

use crate::cli::Output;
use crate::live::{Live, State};
use crate::runlog::RunLog;

/// Exit code: some host failed.
pub const EXIT_HOST_FAILED: i32 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: i32 = 2;

pub struct Printer {
    pub output: Output,
    /// Serializes lines from concurrent host tasks.
    lock: Mutex<()>,
    /// Width of the host column in progress lines.
    width: AtomicUsize,
    /// Live lines per host, on a terminal.
    live: Option<Live>,
    /// The run's log, once the command acts on hosts.
    log: OnceLock<RunLog>,
}

impl Report for Printer {
    fn progress(&self, event: &Event) {
        self.progress_event(event);
    }

    fn warn(&self, message: &str) {
        self.stderr_line(&format!("warning: {message}"));
    }

    fn info(&self, message: &str) {
        self.stderr_line(message);
    }
}

impl Printer {
    /// `live`: one live line per host instead of a line per event (for a
    /// terminal).
    pub fn new(output: Output, live: bool) -> Self {
        Printer {
            output,
            lock: Mutex::new(()),
            width: AtomicUsize::new(4),
            live: live.then(Live::new),
            log: OnceLock::new(),
        }
    }

    /// Keeps a log of this run (`command`) in the state directory; a log
    /// that cannot be made is a warning, not a failure.
    pub fn open_log(&self, state: &std::path::Path, command: &str) {
        match RunLog::create(state, command) {
            Ok(log) => {
                let _ = self.log.set(log);
            }
            Err(e) => self.warn(&format!("no log of this run is kept: cannot write to {}/logs: {e}", state.display())),
        }
    }

    /// The end of the run: the live lines stay as they are, and after a
    /// failure the log's path is printed.
    pub fn finish(&self, code: i32) {
        self.settle();
        if code != 0
            && let Some(log) = self.log.get()
        {
            self.stderr_line(&format!("the full log of this run: {}", log.path().display()));
        }
    }

    /// Ends the live display before results or a closing summary print.
    fn settle(&self) {
        if let Some(live) = &self.live {
            let _guard = self.lock.lock().expect("not poisoned");
            live.settle();
        }
    }

    /// Aligns progress lines to the longest host name.
    pub fn set_targets(&self, targets: &[Target]) {
        self.width.store(targets.iter().map(|t| t.name.len()).max().unwrap_or(4), Ordering::Relaxed);
    }

    fn stderr_line(&self, line: &str) {
        let line = neutralise(line);
        if let Some(log) = self.log.get() {
            log.line(&line);
        }
        let _guard = self.lock.lock().expect("not poisoned");
        if self.live.as_ref().is_some_and(|live| live.println(&line)) {
            return;
        }
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    /// Result text or JSON on stdout.
    pub fn stdout(&self, text: &str) {
        self.settle();
        let _guard = self.lock.lock().expect("not poisoned");
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(neutralise(text).as_bytes());
        if !text.ends_with('\n') {
            let _ = out.write_all(b"\n");
        }
    }

    pub fn json(&self, value: &serde_json::Value) {
        self.stdout(&serde_json::to_string_pretty(value).expect("serializable"));
    }

    /// A host's step: its plain line (to stderr, or to the live line of
    /// the host), and to the log.
    fn progress_event(&self, event: &Event) {
        let width = self.width.load(Ordering::Relaxed);
        let text = Self::step_text(&event.step).map(|t| neutralise(&t).into_owned());
        let line = text.as_ref().map(|what| format!("  {:width$}  {:>6}  {what}", event.host, secs(event.elapsed)));
        // After the result printed (`logs -f` goes on), plain lines again.
        let Some(live) = self.live.as_ref().filter(|live| !live.is_settled()) else {
            if let Some(line) = line {
                self.stderr_line(&line);
            }
            return;
        };
        if let (Some(log), Some(line)) = (self.log.get(), &line) {
            log.line(line);
        }
        let shown;
        let state = match (&event.step, &text) {
            (Step::Transfer { what, done, total }, _) => {
                shown = neutralise(what).into_owned();
                State::Transfer { what: &shown, done: *done, total: *total }
            }
            (Step::Done, _) => State::Done,
            (Step::Failed { .. }, Some(text)) => State::Failed(text),
            (_, Some(text)) => State::Step(text),
            (_, None) => return,
        };
        let _guard = self.lock.lock().expect("not poisoned");
        live.update(&event.host, &format!("{:width$}", event.host), &state);
    }

    /// Prints an error with its causes and hint.
    pub fn error(&self, err: &anyhow::Error) {
        self.settle();
        self.stderr_line(&render_error(err.as_ref(), ""));
    }

    /// A step as its plain line says it; `None` for what is only the state
    /// of a live line.
    fn step_text(step: &Step) -> Option<String> {
        Some(match step {
            Step::Connecting { address } => format!("connecting to {address}"),
            Step::Connected => "connected".into(),
            Step::Probed { os, arch, service_manager } => format!("{os} {arch}, {service_manager}"),
            Step::Uploading { bytes } => format!("uploading agent ({})", bytes_human(*bytes)),
            Step::Uploaded => "agent uploaded".into(),
            Step::UpToDate => "agent up to date".into(),
            Step::Installing { reason } => format!("installing agent ({reason})"),
            Step::Installed { pid } => match pid {
                Some(pid) => format!("agent started (pid {pid})"),
                None => "agent started".into(),
            },
            Step::Handshake => "mTLS handshake".into(),
            Step::Ready { agent_version } => format!("ready: agent {agent_version}"),
            Step::Docker { message } => format!("docker: {message}"),
            Step::Synced { files, written, removed, bytes } => {
                format!(
                    "files synced: {files} in the tree, {written} written, {removed} removed, {} sent",
                    bytes_human(*bytes)
                )
            }
            Step::Service { service, action, detail } => {
                let who = if service.is_empty() { String::new() } else { format!("{service}: ") };
                let what = action_words(*action);
                if detail.is_empty() { format!("{who}{what}") } else { format!("{who}{what} {detail}") }
            }
            Step::Image { tag, detail } => format!("image {tag}: {detail}"),
            Step::Retry { message } => format!("retry: {message}"),
            Step::Failed { message } => format!("FAILED: {message}"),
            // The state of a live line, not a line of its own.
            Step::Transfer { .. } | Step::Done => return None,
        })
    }

    /// The per-host results of a command as JSON: `ok`, `failed` and one
    /// entry per host with its result or its error and hint.
    fn report_json<R: serde::Serialize>(&self, command: &str, r: &HostResults<R>) {
        self.report_json_with(command, r, json!({}));
    }

    /// [`Self::report_json`] with the fields of `extra` added at the top.
    fn report_json_with<R: serde::Serialize>(&self, command: &str, r: &HostResults<R>, extra: serde_json::Value) {
        let mut hosts: Vec<serde_json::Value> =
            r.ok.iter().map(|(h, o)| json!({"host": h, "ok": true, "result": o})).collect();
        hosts.extend(
            r.failed.iter().map(|(h, e)| json!({"host": h, "ok": false, "error": mlops_controller::client::error_chain(e), "hint": e.hint()})),
        );
        let mut out = json!({"command": command, "ok": r.ok.len(), "failed": r.failed.len(), "hosts": hosts});
        if let (Some(out), serde_json::Value::Object(extra)) = (out.as_object_mut(), extra) {
            out.extend(extra);
        }
        self.json(&out);
    }

    /// The closing lines on stderr: every failed host, with cause and hint.
    fn summarize<R>(&self, what: &str, r: &HostResults<R>) {
        self.settle();
        if r.failed.is_empty() {
            self.stderr_line(&format!("{what}: {} host(s) succeeded", r.ok.len()));
            return;
        }
        let names: Vec<&str> = r.failed.iter().map(|(h, _)| h.as_str()).collect();
        let mut text =
            format!("error: {what} failed on {} of {} host(s): {}", r.failed.len(), r.len(), names.join(", "));
        for (host, e) in &r.failed {
            text.push_str(&format!("\n  {host}:\n{}", render_error(e, "    ")));
        }
        self.stderr_line(&text);
    }

    pub fn deploy(&self, r: &DeployReport, targets: &[Target]) -> i32 {
        match self.output {
            Output::Json => self.report_json_with("deploy", &r.hosts, json!({"phases": r.phases})),
            Output::Text => {
                if !r.hosts.ok.is_empty() {
                    let rows: Vec<Vec<String>> = r.hosts.ok.iter().map(|(_, o)| agent_row(o)).collect();
                    self.stdout(&table(
                        &["HOST", "AGENT", "BINARY", "RESTARTED", "OS", "ARCH", "CPUS", "MEMORY", "DISK", "DOCKER"],
                        &rows,
                    ));
                    let stacks: Vec<(&str, &StackOutcome)> =
                        r.hosts.ok.iter().filter_map(|(h, o)| o.stack.as_ref().map(|s| (h.as_str(), s))).collect();
                    if !stacks.is_empty() {
                        self.stdout("");
                        self.stdout(&services_table(
                            stacks.iter().flat_map(|(h, s)| s.services.iter().map(move |svc| (*h, svc))),
                        ));
                        if let Some(model) = &r.stack
                            && !model.options.ui.is_empty()
                        {
                            self.stdout("");
                            self.stdout(&access_table(model, targets));
                            self.stdout(&format!(
                                "credentials: user admin; passwords with `mlopsctl secrets --project {}`",
                                model.project
                            ));
                        }
                        for (h, s) in &stacks {
                            self.stderr_line(&format!(
                                "{h}: stack `{}`: {}; files: {} written, {} removed, {} uploaded",
                                s.project,
                                s.summary,
                                s.sync.written,
                                s.sync.removed,
                                bytes_human(s.sync.uploaded_bytes)
                            ));
                        }
                    }
                }
                if r.phases.len() > 1 {
                    let phases: Vec<String> =
                        r.phases.iter().map(|p| format!("{} {:.1} s", p.name, p.ms as f64 / 1000.0)).collect();
                    self.stderr_line(&format!("time: {}", phases.join(", ")));
                }
                self.summarize("deploy", &r.hosts);
            }
        }
        exit_code(&r.hosts)
    }

    pub fn sync(&self, r: &HostResults<SyncOutcome>) -> i32 {
        match self.output {
            Output::Json => self.report_json("sync", r),
            Output::Text => {
                for (h, s) in &r.ok {
                    self.stdout(&format!(
                        "{h}: {} file(s): {} written, {} removed, {} unchanged; {} uploaded ({})",
                        s.files,
                        s.written,
                        s.removed,
                        s.unchanged,
                        bytes_human(s.uploaded_bytes),
                        s.path
                    ));
                }
                self.summarize("sync", r);
            }
        }
        exit_code(r)
    }

    pub fn down(&self, project: &str, r: &HostResults<String>) -> i32 {
        match self.output {
            Output::Json => self.report_json("down", r),
            Output::Text => {
                for (h, s) in &r.ok {
                    self.stdout(&format!("{h}: stack `{project}`: {s}"));
                }
                self.summarize("down", r);
            }
        }
        exit_code(r)
    }

    pub fn uninstall(&self, r: &HostResults<UninstallOutcome>) -> i32 {
        match self.output {
            Output::Json => self.report_json("agent uninstall", r),
            Output::Text => {
                for (_, o) in &r.ok {
                    if o.was_installed {
                        self.stdout(&format!("{}: agent removed ({})", o.host, o.removed.join(", ")));
                    } else {
                        self.stdout(&format!("{}: no agent installed", o.host));
                    }
                }
                self.summarize("agent uninstall", r);
            }
        }
        exit_code(r)
    }

    pub fn pki_rotate(&self, r: &PkiRotateReport) -> i32 {
        // The step that decides: the last one that ran.
        let final_step = r.new_only.as_ref().unwrap_or(&r.both);
        match self.output {
            Output::Json => {
                let hosts = |h: &HostResults<DeployOutcome>| {
                    let mut v: Vec<serde_json::Value> =
                        h.ok.iter().map(|(n, _)| json!({"host": n, "ok": true})).collect();
                    v.extend(h.failed.iter().map(|(n, e)| {
                        json!({"host": n, "ok": false, "error": mlops_controller::client::error_chain(e), "hint": e.hint()})
                    }));
                    v
                };
                let mut out = r.summary();
                out["command"] = json!("pki rotate");
                out["trust_both"] = json!(hosts(&r.both));
                out["new_only"] = r.new_only.as_ref().map_or(serde_json::Value::Null, |h| json!(hosts(h)));
                self.json(&out);
            }
            Output::Text => {
                let (old, new) = (&r.old_ca[..12], &r.new_ca[..12]);
                match &r.new_only {
                    Some(done) => {
                        for (h, _) in &done.ok {
                            self.stdout(&format!("{h}: re-keyed; trusts CA {new} only"));
                        }
                        for (h, _) in &done.failed {
                            self.stdout(&format!("{h}: re-keyed, but still trusts CA {old} too (`mlopsctl deploy` finishes it)"));
                        }
                        self.stdout(&format!("the controller's CA is now {new}; {old} is kept under pki/retired/{old}"));
                    }
                    None => self.stdout(&format!(
                        "not every host could be re-keyed, so CA {new} was not promoted; the controller still uses {old}. \
                         Run `mlopsctl pki rotate` again (it resumes)"
                    )),
                }
                if !r.not_in_run.is_empty() {
                    self.stderr_line(&format!(
                        "warning: host(s) not in this run still trust only the old CA: {}; `mlopsctl deploy` to them re-keys them",
                        r.not_in_run.join(", ")
                    ));
                }
                self.summarize("pki rotate", final_step);
            }
        }
        exit_code(final_step)
    }

    /// For commands whose output is streamed (logs, watch): only failures.
    pub fn streamed(&self, what: &str, r: &HostResults<()>) -> i32 {
        if !r.failed.is_empty() {
            self.summarize(what, r);
        }
        exit_code(r)
    }

    pub fn secrets(&self, r: &SecretsReport) -> i32 {
        let disagreements: Vec<serde_json::Value> = r
            .disagreements
            .iter()
            .map(|d| json!({"name": d.name, "holders": d.holders.iter().map(|(fp, hosts)| json!({"sha256_prefix": fp, "hosts": hosts})).collect::<Vec<_>>()}))
            .collect();
        match self.output {
            Output::Json => {
                let failed: Vec<serde_json::Value> = r.hosts.failed.iter().map(|(h, e)| json!({"host": h, "error": mlops_controller::client::error_chain(e), "hint": e.hint()})).collect();
                let held: serde_json::Map<String, serde_json::Value> =
                    r.hosts.ok.iter().map(|(h, names)| (h.clone(), json!(names))).collect();
                self.json(&json!({
                    "project": r.project, "source": r.source, "secrets": r.values,
                    "disagreements": disagreements,
                    "missing": r.missing.iter().map(|(n, hosts)| json!({"name": n, "hosts": hosts})).collect::<Vec<_>>(),
                    "held_by": held, "failed": failed,
                }));
            }
            Output::Text => {
                let rows: Vec<Vec<String>> = r.values.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
                self.stdout(&table(&["NAME", "VALUE"], &rows));
                match r.source {
                    "cache" => self.stderr_line(&format!(
                        "stack `{}`: this controller's copy (--cached); the hosts hold the truth",
                        r.project
                    )),
                    _ => self.stderr_line(&format!("stack `{}`: as held by {} host(s)", r.project, r.hosts.ok.len())),
                }
                for (name, hosts) in &r.missing {
                    self.warn(&format!(
                        "{} lack{} `{name}`; the next `mlopsctl deploy` stores it there",
                        hosts.join(", "),
                        if hosts.len() == 1 { "s" } else { "" }
                    ));
                }
                for d in &r.disagreements {
                    self.stderr_line(&format!(
                        "error: the hosts hold different values of `{}`: {}\n  hint: each host keeps what its containers and data were made with; deploy them as separate projects (--project) or leave the odd ones out with --limit",
                        d.name,
                        d.describe()
                    ));
                }
                if !r.hosts.failed.is_empty() {
                    self.summarize("secrets", &r.hosts);
                }
            }
        }
        if r.disagreements.is_empty() && r.hosts.failed.is_empty() { 0 } else { EXIT_HOST_FAILED }
    }

    pub fn rotated(&self, r: &RotateReport) -> i32 {
        let mut failed: Vec<&(String, ControllerError)> = r.refused.failed.iter().collect();
        for d in &r.deploys {
            failed.extend(d.hosts.failed.iter());
        }
        match self.output {
            Output::Json => self.json(&json!({
                "project": r.project, "secret": r.name, "done": r.done, "steps": r.steps,
                "deploys": r.deploys.iter().map(|d| json!({
                    "hosts": d.hosts.ok.iter().map(|(h, o)| json!({"host": h, "changed": o.stack.as_ref().map_or(0, |s| s.changed)})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "failed": failed.iter().map(|(h, e)| json!({"host": h, "error": mlops_controller::client::error_chain(e), "hint": e.hint()})).collect::<Vec<_>>(),
            })),
            Output::Text => {
                for s in &r.steps {
                    let last = s.output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
                    let verdict = if s.exit_code == 0 { "ok".to_string() } else { format!("failed (exit code {})", s.exit_code) };
                    self.stdout(&format!("{}: {} {verdict}{}", s.host, s.step, if last.is_empty() { String::new() } else { format!(" ({})", neutralise(last)) }));
                }
                for d in &r.deploys {
                    for (h, o) in &d.hosts.ok {
                        let changed = o.stack.as_ref().map_or(0, |s| s.changed);
                        self.stdout(&format!("{h}: deployed with the new value; {changed} service(s) recreated, all healthy"));
                    }
                }
                if r.done {
                    self.stdout(&format!("`{}` of stack `{}` rotated; `mlopsctl secrets` shows the new value", r.name, r.project));
                } else if !failed.is_empty() {
                    let mut text = format!("error: the rotation of `{}` stopped", r.name);
                    for (h, e) in &failed {
                        text.push_str(&format!("\n  {h}:\n{}", render_error(e, "    ")));
                    }
                    self.stderr_line(&text);
                }
            }
        }
        if r.done { 0 } else { EXIT_HOST_FAILED }
    }

    pub fn operator_added(&self, a: &Added) -> i32 {
        match self.output {
            Output::Json => self.json(
                &json!({"operator": a.name, "out": a.out, "bundle": (!a.bundle.is_empty()).then_some(&a.bundle)}),
            ),
            Output::Text => {
                if a.out.is_none() {
                    self.stdout(a.bundle.trim_end());
                }
                self.stderr_line(&format!(
                    "operator `{}` added{}; on their machine: `mlopsctl operator join BUNDLE` (CI: MLOPS_OPERATOR_BUNDLE and MLOPS_PASSPHRASE or MLOPS_AGE_IDENTITY)",
                    a.name,
                    a.out.as_ref().map(|p| format!(", bundle in {}", p.display())).unwrap_or_default()
                ));
            }
        }
        0
    }

    pub fn operator_joined(&self, j: &Joined) -> i32 {
        match self.output {
            Output::Json => self.json(&json!(j)),
            Output::Text => self.stdout(&format!(
                "joined as operator `{}` in {} (root CA {})",
                j.name,
                j.state_dir.display(),
                &j.root_fingerprint[..12]
            )),
        }
        0
    }

    pub fn operator_list(&self, l: &Listing) -> i32 {
        match self.output {
            Output::Json => self.json(&json!(l)),
            Output::Text => {
                self.stdout(&format!(
                    "this controller: operator `{}` ({}); revocation list {}",
                    l.me,
                    if l.root { "holds the root CA" } else { "joined under the root CA" },
                    l.crl_number
                ));
                if !l.operators.is_empty() {
                    let rows: Vec<Vec<String>> = l
                        .operators
                        .iter()
                        .map(|o| {
                            vec![
                                o.name.clone(),
                                unix_date(o.added_unix),
                                o.revoked_unix.map_or_else(|| "-".into(), unix_date),
                                o.fingerprint[..12].to_string(),
                            ]
                        })
                        .collect();
                    self.stdout(&table(&["OPERATOR", "ADDED", "REVOKED", "CA"], &rows));
                }
            }
        }
        0
    }

    pub fn operator_removed(&self, r: &Removed) -> i32 {
        match self.output {
            Output::Json => {
                let mut v =
                    serde_json::to_value(json!({"operator": r.name, "crl_number": r.crl_number})).expect("json");
                v["hosts"] = json!(r.hosts.ok.iter().map(|(h, _)| h).collect::<Vec<_>>());
                v["failed"] = json!(r.hosts.failed.iter().map(|(h, e)| json!({"host": h, "error": mlops_controller::client::error_chain(e), "hint": e.hint()})).collect::<Vec<_>>());
                self.json(&v);
            }
            Output::Text => {
                for (h, _) in &r.hosts.ok {
                    self.stdout(&format!("{h}: refuses operator `{}` (revocation list {})", r.name, r.crl_number));
                }
                if !r.hosts.failed.is_empty() {
                    self.summarize("operator remove", &r.hosts);
                    self.stderr_line("  hint: hosts not reached still accept the operator until a deploy from a current operator reaches them");
                }
            }
        }
        exit_code(&r.hosts)
    }

    pub fn state_moved(&self, what: &str, m: &Moved) -> i32 {
        match self.output {
            Output::Json => self.json(&json!({"done": what, "state": m})),
            Output::Text => self.stdout(&format!(
                "{what} {} file(s) of {} (operator `{}`, {})",
                m.files,
                m.state_dir.display(),
                m.operator,
                if m.root { "root CA" } else { "joined operator" }
            )),
        }
        0
    }

    pub fn history(&self, project: &str, r: &HostResults<HostHistory>) -> i32 {
        match self.output {
            Output::Json => {
                let hosts: Vec<serde_json::Value> = r
                    .ok
                    .iter()
                    .map(|(h, hist)| {
                        let newest = hist.revisions.last().map(|r| r.number);
                        json!({
                            "host": h,
                            "revisions": hist.revisions.iter().map(|r| json!({"number": r.number, "current": Some(r.number) == newest, "unix_ms": r.unix_ms, "operator": r.operator, "action": r.action, "deploy_id": r.deploy_id, "confirmed_by": r.confirmed_by, "summary": r.summary, "images": r.images, "config_hashes": r.config_hashes})).collect::<Vec<_>>(),
                            "entries": hist.entries.iter().map(|e| json!({"unix_ms": e.unix_ms, "operator": e.operator, "cert_sha256": e.cert_sha256, "action": e.action, "outcome": e.outcome, "detail": e.detail})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                let failed: Vec<serde_json::Value> = r.failed.iter().map(|(h, e)| json!({"host": h, "error": mlops_controller::client::error_chain(e), "hint": e.hint()})).collect();
                self.json(&json!({"project": project, "hosts": hosts, "failed": failed}));
            }
            Output::Text => {
                let revisions: Vec<Vec<String>> =
                    r.ok.iter()
                        .flat_map(|(h, hist)| {
                            let newest = hist.revisions.last().map(|r| r.number);
                            hist.revisions.iter().map(move |rev| {
                                vec![
                                    h.clone(),
                                    format!("{}{}", rev.number, if Some(rev.number) == newest { " *" } else { "" }),
                                    unix_date((rev.unix_ms / 1000) as i64),
                                    neutralise(&rev.operator).into_owned(),
                                    neutralise(&rev.action).into_owned(),
                                    neutralise(&rev.deploy_id).into_owned(),
                                    neutralise(&rev.summary).into_owned(),
                                ]
                            })
                        })
                        .collect();
                let rows: Vec<Vec<String>> =
                    r.ok.iter()
                        .flat_map(|(h, hist)| {
                            hist.entries.iter().map(move |e| {
                                vec![
                                    h.clone(),
                                    unix_date((e.unix_ms / 1000) as i64),
                                    neutralise(&e.operator).into_owned(),
                                    e.action.clone(),
                                    e.outcome.clone(),
                                    neutralise(&e.detail).into_owned(),
                                ]
                            })
                        })
                        .collect();
                if rows.is_empty() && revisions.is_empty() {
                    self.stderr_line(&format!("nothing recorded for stack `{project}` yet"));
                } else {
                    if !revisions.is_empty() {
                        self.stdout(&table(
                            &["HOST", "REVISION", "WHEN (UTC)", "OPERATOR", "ACTION", "DEPLOY", "SUMMARY"],
                            &revisions,
                        ));
                        self.stdout("(* runs now; `mlopsctl rollback [--to N]` returns to a kept revision)\n");
                    }
                    self.stdout(&table(&["HOST", "WHEN (UTC)", "OPERATOR", "ACTION", "OUTCOME", "DETAIL"], &rows));
                }
                if !r.failed.is_empty() {
                    self.summarize("history", r);
                }
            }
        }
        exit_code(r)
    }

    pub fn plan(&self, p: &PlanReport) -> i32 {
        match self.output {
            Output::Json => self.report_json_with(
                "plan",
                &p.hosts,
                json!({"project": p.project, "batches": p.batches, "generated_secrets": p.generated}),
            ),
            Output::Text => {
                let mut out = Vec::new();
                for (h, o) in &p.hosts.ok {
                    out.push(format!(
                        "{h}{}:",
                        if p.batches > 1 { format!(" (batch {}/{})", o.batch, p.batches) } else { String::new() }
                    ));
                    if o.agent != "running" {
                        out.push(format!("  agent: {}", neutralise(&o.agent)));
                    }
                    if o.docker.contains(' ') || o.docker == "install" {
                        out.push(format!("  docker: {}", neutralise(&o.docker)));
                    }
                    if o.files_changed + o.files_removed > 0 {
                        out.push(format!(
                            "  files: {} to write, {} to remove ({} to send)",
                            o.files_changed,
                            o.files_removed,
                            bytes_human(o.bytes_to_send)
                        ));
                    }
                    for i in o.images.iter().filter(|i| i.action != "current") {
                        let from = i.from.as_deref().map(|f| format!(" from {f}")).unwrap_or_default();
                        out.push(format!("  image {}: {}{from}", i.tag, i.action));
                    }
                    for tag in &o.pulls {
                        out.push(format!("  image {tag}: pull"));
                    }
                    for s in &o.services {
                        let why = if s.reasons.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " ({})",
                                s.reasons.iter().map(|r| neutralise(r).into_owned()).collect::<Vec<_>>().join(", ")
                            )
                        };
                        out.push(format!("  {}: {}{why}", s.service, s.action));
                    }
                    for orphan in &o.orphans {
                        out.push(format!("  {orphan}: remove (no longer in the stack)"));
                    }
                }
                if !p.generated.is_empty() {
                    out.push(format!("secrets to generate: {}", p.generated.join(", ")));
                }
                if !out.is_empty() {
                    self.stdout(&out.join("\n"));
                }
                self.stderr_line(&format!(
                    "plan of stack `{}`: nothing was changed; `mlopsctl deploy` with the same flags does this",
                    p.project
                ));
                if !p.hosts.failed.is_empty() {
                    self.summarize("plan", &p.hosts);
                }
            }
        }
        exit_code(&p.hosts)
    }

    pub fn rollback(&self, project: &str, r: &HostResults<String>) -> i32 {
        match self.output {
            Output::Json => self.report_json("rollback", r),
            Output::Text => {
                for (h, s) in &r.ok {
                    self.stdout(&format!("{h}: stack `{project}`: {}", neutralise(s)));
                }
                self.summarize("rollback", r);
            }
        }
        exit_code(r)
    }

    pub fn migrate(&self, r: &MigrateReport) -> i32 {
        match self.output {
            Output::Json => self.json(&json!({"command": "migrate", "ok": true, "result": r})),
            Output::Text => {
                for s in &r.steps {
                    let took = if r.dry_run { String::new() } else { format!(" ({:.1} s)", s.ms as f64 / 1000.0) };
                    self.stdout(&format!("{}: {}{took}", s.step, neutralise(&s.detail)));
                }
                if let Some(d) = &r.database {
                    self.stdout(&format!(
                        "  {}: {} in {:.1} s, sha256 {}",
                        d.volume,
                        bytes_human(d.bytes),
                        d.ms as f64 / 1000.0,
                        d.sha256
                    ));
                }
                for v in &r.volumes {
                    let when = if v.earlier { ", by an earlier attempt" } else { "" };
                    self.stdout(&format!(
                        "  volume {}: {} in {:.1} s{when}, sha256 {}",
                        v.volume,
                        bytes_human(v.bytes),
                        v.ms as f64 / 1000.0,
                        v.sha256
                    ));
                }
                if r.dry_run {
                    self.stderr_line(&format!("migrate --dry-run: nothing was changed on {} or {}", r.from, r.to));
                } else {
                    self.stdout(&neutralise(&r.inventory));
                    self.stderr_line(&format!(
                        "migrate: stack `{}` moved from {} to {}; it did not serve for {:.1} s{}",
                        r.project,
                        r.from,
                        r.to,
                        r.downtime_ms as f64 / 1000.0,
                        if r.decommissioned {
                            format!("; {} decommissioned", r.from)
                        } else {
                            format!("; {} is stopped and intact", r.from)
                        }
                    ));
                }
            }
        }
        0
    }

    pub fn backup(&self, r: &BackupReport) -> i32 {
        match self.output {
            Output::Json => self.json(&json!({"command": "backup", "ok": true, "result": r})),
            Output::Text => {
                let m = &r.manifest;
                let files = m.database.iter().map(|d| (format!("database in `{}`", d.file.name), &d.file));
                let files = files.chain(m.volumes.iter().map(|v| (format!("volume {}", v.name), v)));
                for (what, f) in files {
                    self.stdout(&format!(
                        "  {what}: {} ({} compressed), sha256 {}",
                        bytes_human(f.bytes),
                        bytes_human(f.file_bytes),
                        f.sha256
                    ));
                }
                for old in &r.removed {
                    self.stdout(&format!("  removed the older backup {}", old.display()));
                }
                self.stdout(&r.dir.display().to_string());
                let kept = r.kept_on.as_ref().map_or(String::new(), |k| format!(", kept on {k}"));
                self.stderr_line(&format!(
                    "backup: stack `{}` on {} copied in {:.1} s{kept}",
                    r.project,
                    r.host,
                    r.ms as f64 / 1000.0
                ));
            }
        }
        0
    }

    pub fn backup_schedule(&self, r: &ScheduleReport) -> i32 {
        match self.output {
            Output::Json => self.json(&json!({"command": "backup", "ok": true, "result": r})),
            Output::Text => {
                let dir = neutralise(&r.dir);
                match r.every_seconds {
                    Some(every) => self.stdout(&format!(
                        "{}: a backup of stack `{}` every {every} s, the newest {} kept in {dir}; next at unix time {}",
                        r.host, r.project, r.keep, r.next_unix
                    )),
                    None => self.stdout(&format!("{}: no backup schedule for stack `{}`", r.host, r.project)),
                }
                if r.taken + r.failed > 0 {
                    self.stdout(&format!(
                        "  taken {}, failed {}, last at unix time {}",
                        r.taken, r.failed, r.last_unix
                    ));
                }
                if !r.last_error.is_empty() {
                    self.stdout(&format!("  last error: {}", neutralise(&r.last_error)));
                }
                for k in &r.kept {
                    self.stdout(&format!("  {dir}/{}", neutralise(k)));
                }
            }
        }
        0
    }

    /// `users`: a table for `list`; else the account as it now is, or a
    /// generated password alone on stdout (shown once).
    pub fn users(&self, r: &UsersReport) -> i32 {
        match self.output {
            Output::Json => self.json(&json!({"command": "users", "ok": true, "result": r})),
            Output::Text => {
                let row = |a: &mlops_controller::commands::users::Account| {
                    vec![
                        neutralise(&a.name).into_owned(),
                        neutralise(&a.roles.join(",")).into_owned(),
                        neutralise(&a.email).into_owned(),
                        if a.active { "yes" } else { "no" }.to_string(),
                        if a.last_login.is_empty() {
                            "never".to_string()
                        } else {
                            neutralise(&a.last_login).into_owned()
                        },
                    ]
                };
                let header = ["NAME", "ROLES", "EMAIL", "ACTIVE", "LAST LOGIN"];
                if r.action == "list" {
                    self.stdout(&table(&header, &r.accounts.iter().map(row).collect::<Vec<_>>()));
                    self.stderr_line(&format!("stack `{}` on {}: {} account(s)", r.project, r.host, r.accounts.len()));
                    return 0;
                }
                if let Some(a) = &r.account {
                    let done = match r.action {
                        "add" => "added".to_string(),
                        "remove" => "removed".to_string(),
                        "set-role" => format!("now has role {}", neutralise(&a.roles.join(","))),
                        _ => "has a new password".to_string(),
                    };
                    self.stderr_line(&format!(
                        "users: `{}` {done} (stack `{}` on {})",
                        neutralise(&a.name),
                        r.project,
                        r.host
                    ));
                    // A generated password is then stdout's only line
                    // (`PW=$(mlopsctl users add ...)`).
                    if r.action != "remove" && r.generated_password.is_none() {
                        self.stdout(&table(&header, &[row(a)]));
                    }
                }
                if let Some(pw) = &r.generated_password {
                    self.stderr_line("the generated password follows on stdout (shown once, kept nowhere)");
                    self.stdout(pw);
                }
            }
        }
        0
    }

    pub fn restore(&self, r: &RestoreReport) -> i32 {
        match self.output {
            Output::Json => self.json(&json!({"command": "restore", "ok": true, "result": r})),
            Output::Text => {
                for s in &r.steps {
                    self.stdout(&format!("{}: {} ({:.1} s)", s.step, neutralise(&s.detail), s.ms as f64 / 1000.0));
                }
                let on = r.from_host.as_ref().map_or(String::new(), |h| format!(" on {h}"));
                self.stderr_line(&format!(
                    "restore: stack `{}` restored on {} from {}{on}",
                    r.project,
                    r.host,
                    r.from.display()
                ));
            }
        }
        0
    }

    /// A migration, backup or restore that stopped on its way: what went
    /// wrong (a migration started the old host again when it had stopped
    /// it; the warnings above say so).
    pub fn failed(&self, command: &str, e: &ControllerError) -> i32 {
        match self.output {
            Output::Json => self.json(&json!({
                "command": command,
                "ok": false,
                "error": mlops_controller::client::error_chain(e),
                "hint": e.hint(),
            })),
            Output::Text => self.stderr_line(&render_error(e, "")),
        }
        EXIT_HOST_FAILED
    }

    pub fn ui_opened(&self, opened: &UiOpened) {
        self.stdout(&opened.url);
        if let Some(note) = &opened.forwarding {
            self.stderr_line(note);
        }
    }

    pub fn health_event(&self, host: &str, ev: &HealthEvent) {
        match self.output {
            Output::Json => self.stdout(
                &json!({"host": host, "unix_ms": ev.unix_ms, "docker_time_ns": ev.docker_time_ns, "service": ev.service, "state": ev.state, "health": ev.health, "health_output": ev.health_output})
                    .to_string(),
            ),
            Output::Text => {
                let health = if ev.health.is_empty() { String::new() } else { format!(" ({})", ev.health) };
                let output = if ev.health_output.is_empty() { String::new() } else { format!(": {}", ev.health_output) };
                self.stdout(&format!("{} {host} {} {}{health}{output}", clock(ev.unix_ms), ev.service, ev.state));
            }
        }
    }

    /// A piece of a service's output, on our stdout or stderr as the
    /// container wrote it; with several hosts each line is prefixed.
    pub fn log_chunk(&self, host: &str, stream: &str, data: &[u8], prefix: bool) {
        // Containers' output is the result: it prints below the hosts' lines.
        self.settle();
        let _guard = self.lock.lock().expect("not poisoned");
        use std::io::IsTerminal;
        let (mut out, terminal): (Box<dyn Write>, bool) = if stream == "stderr" {
            (Box::new(std::io::stderr().lock()), std::io::stderr().is_terminal())
        } else {
            (Box::new(std::io::stdout().lock()), std::io::stdout().is_terminal())
        };
        // A container's output goes to a file or pipe as it is; to a
        // terminal, its control sequences are shown, not obeyed.
        if prefix {
            for line in String::from_utf8_lossy(data).split_inclusive('\n') {
                let line = if terminal { neutralise(line) } else { line.into() };
                let _ = write!(out, "{host} | {line}");
            }
        } else if terminal {
            let _ = out.write_all(neutralise(&String::from_utf8_lossy(data)).as_bytes());
        } else {
            let _ = out.write_all(data);
        }
        let _ = out.flush();
    }

    pub fn status(&self, hosts: &[HostStatus]) -> i32 {
        let failed = hosts.iter().filter(|h| !h.ok()).count();
        match self.output {
            Output::Json => {
                let list: Vec<serde_json::Value> = hosts
                    .iter()
                    .map(|h| {
                        let mut v = serde_json::to_value(&h.outcome).expect("serializable");
                        match &h.services {
                            Some(Ok(list)) => v["services"] = json!(list),
                            Some(Err(e)) => v["services_error"] = json!(e),
                            None => {}
                        }
                        if let Some(last) = &h.last {
                            v["last_change"] = json!(last);
                        }
                        v
                    })
                    .collect();
                self.json(&json!({"command": "status", "ok": hosts.len() - failed, "failed": failed, "hosts": list}));
            }
            Output::Text => {
                let rows: Vec<Vec<String>> = hosts
                    .iter()
                    .map(|h| {
                        let o = &h.outcome;
                        let agent = o.agent.as_ref();
                        vec![
                            o.host.clone(),
                            match (o.reachable, agent.is_some()) {
                                (true, true) => "yes".into(),
                                (true, false) => "no agent".into(),
                                _ => "no".into(),
                            },
                            agent.map_or("-".into(), |a| a.version.clone()),
                            agent.map_or("-".into(), |a| duration_human(a.uptime_seconds)),
                            o.facts.as_ref().map_or("-".into(), |f| docker_cell(f.docker, &f.docker_version)),
                            o.error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                self.stdout(&table(&["HOST", "REACHABLE", "AGENT", "UPTIME", "DOCKER", "ERROR"], &rows));
                // Disk: the file system of Docker's data, and what the data takes.
                let disks: Vec<Vec<String>> = hosts
                    .iter()
                    .filter_map(|h| Some((h.outcome.host.as_str(), h.outcome.facts.as_ref()?.docker_disk.as_ref()?)))
                    .map(|(host, d)| {
                        let usage = |n: u64| if d.error.is_empty() { bytes_human(n) } else { "?".into() };
                        vec![
                            host.to_string(),
                            neutralise(&d.root_dir).into_owned(),
                            format!("{} of {}", bytes_human(d.available_bytes), bytes_human(d.total_bytes)),
                            usage(d.images_bytes),
                            usage(d.containers_bytes),
                            usage(d.volumes_bytes),
                            usage(d.build_cache_bytes),
                        ]
                    })
                    .collect();
                if !disks.is_empty() {
                    self.stdout("");
                    let head = ["HOST", "DOCKER DATA", "FREE", "IMAGES", "CONTAINERS", "VOLUMES", "BUILD CACHE"];
                    self.stdout(&table(&head, &disks));
                }
                for h in hosts {
                    if let Some(d) = h.outcome.facts.as_ref().and_then(|f| f.docker_disk.as_ref())
                        && !d.error.is_empty()
                    {
                        let why = neutralise(&d.error);
                        self.stderr_line(&format!("{}: what Docker's data takes is unknown: {why}", h.outcome.host));
                    }
                }
                let listed: Vec<(&str, &ServiceOutcome)> = hosts
                    .iter()
                    .filter_map(|h| match &h.services {
                        Some(Ok(list)) => Some(list.iter().map(move |svc| (h.outcome.host.as_str(), svc))),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                if !listed.is_empty() {
                    self.stdout("");
                    self.stdout(&services_table(listed.into_iter()));
                }
                for h in hosts {
                    if let Some(last) = &h.last {
                        self.stderr_line(&format!(
                            "{}: last change {} UTC by {}: {} ({})",
                            h.outcome.host,
                            unix_date((last.unix_ms / 1000) as i64),
                            neutralise(&last.operator),
                            last.action,
                            last.outcome
                        ));
                    }
                }
                for h in hosts {
                    if let Some(Err(e)) = &h.services {
                        self.warn(&format!("{}: cannot list the stack's services: {e}", h.outcome.host));
                    }
                    if let Some(hint) = &h.outcome.hint {
                        self.stderr_line(&format!("  hint ({}): {hint}", h.outcome.host));
                    }
                }
            }
        }
        if failed == 0 { 0 } else { EXIT_HOST_FAILED }
    }
}

/// The words a progress line uses for what the agent did.
fn action_words(action: StackAction) -> &'static str {
    match action {
        StackAction::NetworkCreated => "network created",
        StackAction::NetworkRemoved => "network removed",
        StackAction::VolumeCreated => "volume created",
        StackAction::VolumeRemoved => "volume removed",
        StackAction::BuildStarted => "building",
        StackAction::BuildProgress => "build:",
        StackAction::Built => "built",
        StackAction::Pulling => "pulling",
        StackAction::Waiting => "wait",
        StackAction::Created => "create",
        StackAction::Recreated => "recreate",
        StackAction::Started => "start",
        StackAction::Unchanged => "unchanged",
        StackAction::Healthy => "healthy",
        StackAction::Removed => "remove",
        StackAction::OrphanRemoved => "remove orphan:",
        StackAction::Done => "done",
        StackAction::RollingBack => "ROLLING BACK:",
        StackAction::Watching => "watching:",
        StackAction::Unspecified => "?",
    }
}

/// Text from a host (agent messages, build output, container logs) made
/// safe for a terminal: control characters other than newline and tab
/// (escape sequences, carriage returns, C1 codes) and the bidirectional
/// overrides that reorder what is shown are written as `\xNN` or
/// `\u{NNNN}` instead of being obeyed.
pub fn neutralise(text: &str) -> std::borrow::Cow<'_, str> {
    fn obeyed(c: char) -> bool {
        (c.is_control() && c != '\n' && c != '\t') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(obeyed) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !obeyed(c) => out.push(c),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn exit_code<R>(r: &HostResults<R>) -> i32 {
    if r.failed.is_empty() { 0 } else { EXIT_HOST_FAILED }
}

fn agent_row(o: &DeployOutcome) -> Vec<String> {
    vec![
        o.host.clone(),
        o.agent.version.clone(),
        if o.uploaded { "uploaded".into() } else { "-".into() },
        o.installed.clone().unwrap_or_else(|| "-".into()),
        o.facts.os.clone(),
        o.facts.arch.clone(),
        o.facts.cpus.to_string(),
        format!("{} free of {}", bytes_human(o.facts.memory_available_bytes), bytes_human(o.facts.memory_total_bytes)),
        format!("{} free", bytes_human(o.facts.disk_available_bytes)),
        o.stack.as_ref().filter(|s| !s.docker_version.is_empty()).map_or_else(
            || docker_cell(o.facts.docker, &o.facts.docker_version),
            |s| docker_cell(true, &s.docker_version),
        ),
    ]
}

fn docker_cell(available: bool, version: &str) -> String {
    if available { format!("yes ({version})") } else { "no".into() }
}

fn services_table<'a>(rows: impl Iterator<Item = (&'a str, &'a ServiceOutcome)>) -> String {
    let rows: Vec<Vec<String>> = rows
        .map(|(h, s)| {
            vec![
                h.to_string(),
                s.service.clone(),
                s.state.clone(),
                if s.health.is_empty() { "-".into() } else { s.health.clone() },
                if s.changed { "yes".into() } else { "-".into() },
                s.container_id.chars().take(12).collect(),
            ]
        })
        .collect();
    table(&["HOST", "SERVICE", "STATE", "HEALTH", "CHANGED", "CONTAINER"], &rows)
}

/// The access table: where each UI is, for each host.
fn access_table(stack: &mlops_proto::stack::Stack, targets: &[Target]) -> String {
    let mut rows = Vec::new();
    for t in targets {
        for (name, ui) in &stack.options.ui {
            let url = match t.connection {
                Connection::Local => format!("http://127.0.0.1:{}{}", ui.port, ui.path),
                Connection::Ssh { .. } => format!("`mlopsctl ui {name} --host {}`", t.name),
            };
            rows.push(vec![t.name.clone(), name.clone(), ui.service.clone(), url]);
        }
    }
    table(&["HOST", "UI", "SERVICE", "URL"], &rows)
}

/// `HH:MM:SS.mmm` (UTC) of Unix milliseconds.
fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", (s / 3600) % 24, (s / 60) % 60, s % 60, unix_ms % 1000)
}

/// `error: ...` with `Caused by:` lines and a `hint:`; `indent` prefixes every line.
pub fn render_error(err: &(dyn std::error::Error + 'static), indent: &str) -> String {
    let mut lines = vec![format!("{indent}error: {err}")];
    let mut last = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // `#[error(transparent)]` repeats its source; say each thing once.
        if text != last {
            lines.push(format!("{indent}  Caused by: {text}"));
        }
        last = text;
        next = cause.source();
    }
    if let Some(hint) = hint_of(err) {
        lines.push(format!("{indent}  hint: {hint}"));
    }
    lines.join("\n")
}

/// The first hint any error in the chain offers.
pub fn hint_of(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        let hint = if let Some(e) = e.downcast_ref::<ControllerError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<SshError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<InventoryError>() {
            e.hint()
        } else if let Some(e) = e.downcast_ref::<mlops_compose::ComposeError>() {
            e.hint()
        } else {
            None
        };
        if hint.is_some() {
            return hint;
        }
        next = e.source();
    }
    None
}

pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

pub fn duration_human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A plain text table: a header row and left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time: days to a civil date as in
/// Howard Hinnant's `civil_from_days`.
pub fn unix_date(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanized() {
        assert_eq!(bytes_human(512), "512 B");
        assert_eq!(bytes_human(8 * 1024 * 1024 + 1), "8.0 MiB");
        assert_eq!(duration_human(3725), "1h2m");
        assert_eq!(table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]), "A    BB\nxyz  1");
        assert_eq!(unix_date(0), "1970-01-01 00:00:00");
        assert_eq!(unix_date(1_796_000_000), "2026-11-30 00:53:20");
        assert_eq!(unix_date(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn control_sequences_are_shown_not_obeyed() {
        assert_eq!(neutralise("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(neutralise("\x1b[2J\x1b]0;title\x07done\r"), "\\x1b[2J\\x1b]0;title\\x07done\\x0d");
        assert_eq!(neutralise("a\u{9b}b\u{202e}c"), "a\\x9bb\\u{202e}c");
    }
}
