//! `mlopsctl users list|add|remove|set-role|set-password`: the accounts of a
//! deployed stack's Airflow (`x-mlops.users`: its API server and admin).
//!
//! Airflow's FAB auth manager keeps accounts and roles in the metadata
//! database and serves them at `/auth/fab/v1/users`. Each call runs a short
//! Python program inside the API server's container (the agent's `Exec`)
//! that logs in as the stack's admin and calls that API on the container's
//! loopback: nothing is published for it, and the program's input (the
//! admin's password, a new account's password) goes on its standard
//! input, never on a command line or in an environment another process
//! could read.
//!
//! The stack's admin is the deployment's (its password is a secret of the
//! stack, kept by `airflow-init`): it is not removed, demoted or given
//! another password here; `mlopsctl secrets rotate` changes it.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Setup, StackOptions};
use crate::ControllerError;
use crate::bootstrap;
use crate::progress::Report;
use mlops_inventory::Target;
use mlops_proto::stack::AirflowAccess;
use mlops_proto::v1::ExecRequest;

/// What `mlopsctl users` does.
#[derive(Debug, Clone)]
pub enum UsersAction {
    List,
    /// A new account; `password` `None`: one is generated (and reported once).
    Add {
        name: String,
        role: String,
        email: Option<String>,
        password: Option<String>,
    },
    Remove {
        name: String,
    },
    SetRole {
        name: String,
        role: String,
    },
    /// `password` `None`: one is generated (and reported once).
    SetPassword {
        name: String,
        password: Option<String>,
    },
}

impl UsersAction {
    /// The subcommand's name: `list`, `add`, `remove`, `set-role`, `set-password`.
    pub fn verb(&self) -> &'static str {
        match self {
            UsersAction::List => "list",
            UsersAction::Add { .. } => "add",
            UsersAction::Remove { .. } => "remove",
            UsersAction::SetRole { .. } => "set-role",
            UsersAction::SetPassword { .. } => "set-password",
        }
    }
}

/// One Airflow account, as the API lists it (never its password).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub roles: Vec<String>,
    pub email: String,
    pub active: bool,
    /// As Airflow writes it (UTC, ISO 8601); empty: never logged in.
    #[serde(default)]
    pub last_login: String,
}

/// What `mlopsctl users` did.
#[derive(Debug, Clone, Serialize)]
pub struct UsersReport {
    pub project: String,
    pub host: String,
    /// `list`, `add`, `remove`, `set-role`, `set-password`.
    pub action: &'static str,
    /// `list`: every account, by name.
    pub accounts: Vec<Account>,
    /// The account added or changed (`remove`: as it was).
    pub account: Option<Account>,
    /// A password this run generated: shown once, kept nowhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated_password: Option<String>,
}

/// Accounts per call of `list` (each call logs in once).
const PAGE: usize = 50;

/// Runs in the API server's container. Reads one JSON request on stdin,
/// prints one `MLOPS-RESULT <json>` line: `{"ok": true, ...}` or
/// `{"ok": false, "status": HTTP status, "error": Airflow's detail}`
/// (`roles`: the roles there are, when the one asked for is not).
const SCRIPT: &str = r#"
import json, sys, urllib.error as e, urllib.parse as p, urllib.request as u
req = json.load(sys.stdin)
base = "http://127.0.0.1:8080"
# No proxy, whatever the container's environment says: the admin's
# password goes to this container's own loopback only.
opener = u.build_opener(u.ProxyHandler({}))
def out(**kw):
    print("MLOPS-RESULT " + json.dumps(kw))
    sys.exit(0)
def call(step, method, path, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None if body is None else json.dumps(body).encode()
    try:
        with opener.open(u.Request(base + path, data=data, headers=headers, method=method), timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}
    except e.HTTPError as err:
        raw = err.read().decode(errors="replace")
        try:
            detail = json.loads(raw)
            detail = detail.get("detail", raw) if isinstance(detail, dict) else raw
        except ValueError:
            detail = raw
        return err.code, {"detail": detail if isinstance(detail, str) else json.dumps(detail)}
    except (OSError, ValueError) as err:
        out(ok=False, status=0, step=step, error="%s %s: %s" % (method, path.split("?")[0], err))
def account(x):
    return {"name": x["username"], "roles": sorted(r["name"] for r in x.get("roles") or []),
            "email": x.get("email") or "", "active": bool(x.get("active")), "last_login": x.get("last_login") or ""}
def fail(step, status, body, **kw):
    out(ok=False, step=step, status=status, error=str(body.get("detail", body)), **kw)
status, body = call("login", "POST", "/auth/token", {"username": req["admin"], "password": req["admin_password"]})
if status not in (200, 201):
    fail("login", status, body)
token = body["access_token"]
action = req["action"]
if action in ("add", "set-role"):
    status, body = call("api", "GET", "/auth/fab/v1/roles?limit=100", token=token)
    if status != 200:
        fail("api", status, body)
    roles = sorted(r["name"] for r in body.get("roles", []))
    if req["role"] not in roles:
        out(ok=False, step="role", status=400, error="no role `%s`" % req["role"], roles=roles)
user = "/auth/fab/v1/users/" + p.quote(req.get("name", ""), safe="")
if action == "list":
    query = "?order_by=username&limit=%d&offset=%d" % (req["limit"], req["offset"])
    status, body = call("api", "GET", "/auth/fab/v1/users" + query, token=token)
    if status != 200:
        fail("api", status, body)
    out(ok=True, accounts=[account(x) for x in body["users"]], total=body["total_entries"])
if action == "add":
    body = {"username": req["name"], "email": req["email"], "first_name": req["name"], "last_name": "-",
            "roles": [{"name": req["role"]}], "password": req["password"]}
    status, body = call("api", "POST", "/auth/fab/v1/users", body, token=token)
    if status not in (200, 201):
        fail("api", status, body)
    out(ok=True, account=account(body))
# The account as it is (FAB finds names without regard to case): never
# the stack's admin, whatever the spelling.
status, body = call("user", "GET", user, token=token)
if status != 200:
    fail("user", status, body)
if body["username"].lower() == req["admin"].lower():
    out(ok=False, step="admin", status=403, error="the stack's admin")
was = account(body)
if action == "set-role":
    status, body = call("user", "PATCH", user + "?update_mask=roles", {"roles": [{"name": req["role"]}]}, token=token)
elif action == "set-password":
    status, body = call("user", "PATCH", user + "?update_mask=password", {"password": req["password"]}, token=token)
elif action == "remove":
    status, body = call("user", "DELETE", user, token=token)
    if status == 204:
        out(ok=True, account=was)
else:
    out(ok=False, step="api", status=400, error="unknown action " + action)
if status not in (200, 201):
    fail("user", status, body)
out(ok=True, account=account(body))
"#;

/// Checks an account name before anything is asked of the host: FAB takes
/// almost any string, but a name is also a path segment, a log line and a
/// terminal's text.
fn check_name(name: &str) -> Result<(), ControllerError> {
    let fine = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
        && !name.starts_with('-');
    if fine {
        Ok(())
    } else {
        Err(ControllerError::usage(
            format!("`{name}` is not a usable account name"),
            Some("use up to 64 letters, digits, `.`, `_`, `-` or `@`, not starting with `-`"),
        ))
    }
}

/// A password given on stdin: one line, its newline dropped.
pub fn password_from(text: &str) -> Result<String, ControllerError> {
    let line = text.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(text);
    if line.is_empty() || line.contains('\n') {
        return Err(ControllerError::usage(
            "the password on standard input must be one non-empty line",
            Some("e.g. `printf '%s\\n' \"$PW\" | mlopsctl users add NAME --role Viewer --password-stdin`"),
        ));
    }
    if line.len() < 8 {
        return Err(ControllerError::usage(
            "the password on standard input is shorter than 8 characters",
            Some("leave out --password-stdin and mlopsctl generates one"),
        ));
    }
    Ok(line.to_string())
}

/// The host that runs the API server: the one selected, or the one
/// placement gives the service among the inventory's hosts.
fn api_host(setup: &Setup, stack: &mlops_proto::stack::Stack, service: &str) -> Result<Target, ControllerError> {
    if let [one] = setup.targets.as_slice() {
        return Ok(one.clone());
    }
    let layout = crate::placement::place(stack, &setup.all_hosts)?;
    let hosts = layout.hosts_of(service);
    let chosen: Vec<&Target> = setup.targets.iter().filter(|t| hosts.contains(&t.name.as_str())).collect();
    match chosen.as_slice() {
        [one] => Ok((*one).clone()),
        _ => Err(ControllerError::usage(
            format!(
                "`mlopsctl users` talks to the host that runs `{service}`; {} of the {} selected hosts do",
                chosen.len(),
                setup.targets.len()
            ),
            Some("name that host with --host, or with -i INVENTORY --limit NAME"),
        )),
    }
}

/// Runs `action` against the stack's Airflow.
pub async fn users(
    setup: &Setup,
    opts: &StackOptions,
    action: UsersAction,
    report: &dyn Report,
) -> Result<UsersReport, ControllerError> {
    let loaded = opts.load_model(&setup.state, report)?;
    let stack = &loaded.stack;
    let access = stack.options.users.clone().ok_or_else(|| {
        ControllerError::usage(
            format!("stack `{}` names no Airflow whose accounts mlopsctl manages", stack.project),
            Some("a stack says which in `x-mlops.users: {service: ..., admin_user: ..., admin_password: SECRET}`"),
        )
    })?;
    let mut generated = None;
    let mut password = |given: &Option<String>| -> String {
        given.clone().unwrap_or_else(|| {
            let made = crate::secrets::generate();
            generated = Some(made.clone());
            made
        })
    };
    let verb = action.verb();
    let (name, mut request) = match &action {
        UsersAction::List => (String::new(), json!({})),
        UsersAction::Add { name, role, email, password: given } => {
            // A name that is an address is its own email.
            let email = match email {
                Some(e) if !e.contains('@') || e.trim() != e || e.len() > 254 => {
                    return Err(ControllerError::usage(
                        format!("--email `{e}` is not an email address"),
                        Some("write it as NAME@DOMAIN, or leave it out (NAME@localhost)"),
                    ));
                }
                Some(e) => e.clone(),
                None if name.contains('@') => name.clone(),
                None => format!("{name}@localhost"),
            };
            (name.clone(), json!({"name": name, "role": role, "email": email, "password": password(given)}))
        }
        UsersAction::Remove { name } => (name.clone(), json!({"name": name})),
        UsersAction::SetRole { name, role } => (name.clone(), json!({"name": name, "role": role})),
        UsersAction::SetPassword { name, password: given } => {
            (name.clone(), json!({"name": name, "password": password(given)}))
        }
    };
    request["action"] = json!(verb);
    if !name.is_empty() {
        check_name(&name)?;
    }
    // FAB finds names without regard to case: `ADMIN` is the admin too.
    if name.eq_ignore_ascii_case(&access.admin_user) && !matches!(action, UsersAction::Add { .. }) {
        return Err(ControllerError::usage(
            format!("`{name}` is the stack's admin, kept by the deployment: `users {verb}` leaves it as it is"),
            Some(&format!(
                "its password is the secret {}: `mlopsctl secrets rotate {}`",
                access.admin_password, access.admin_password
            )),
        ));
    }

    let target = api_host(setup, stack, &access.service)?;
    let (transport, mut conn) = bootstrap::connect_agent(&target, &setup.ctx).await?;
    let result = async {
        let held = crate::secrets::held_by(&mut conn, &stack.project).await?;
        let admin_password = held.get(&access.admin_password).cloned().ok_or_else(|| {
            ControllerError::usage(
                format!("{} holds no {} for stack `{}`", target.name, access.admin_password, stack.project),
                Some("deploy the stack there first (`mlopsctl deploy`)"),
            )
        })?;
        request["admin"] = json!(access.admin_user);
        request["admin_password"] = json!(admin_password);
        if matches!(action, UsersAction::List) {
            let mut accounts = Vec::new();
            loop {
                request["limit"] = json!(PAGE);
                request["offset"] = json!(accounts.len());
                let page = call(&mut conn, &target.name, &stack.project, &access, &request).await?;
                let got: Vec<Account> =
                    serde_json::from_value(page["accounts"].clone()).map_err(|e| bad_reply(&target.name, &e))?;
                let total = page["total"].as_u64().unwrap_or(0) as usize;
                let empty = got.is_empty();
                accounts.extend(got);
                if empty || accounts.len() >= total {
                    break;
                }
            }
            return Ok::<_, ControllerError>((accounts, None));
        }
        let reply = call(&mut conn, &target.name, &stack.project, &access, &request).await?;
        let account: Account =
            serde_json::from_value(reply["account"].clone()).map_err(|e| bad_reply(&target.name, &e))?;
        Ok((Vec::new(), Some(account)))
    }
    .await;
    transport.close().await;
    let (accounts, account) = result?;
    Ok(UsersReport {
        project: stack.project.clone(),
        host: target.name.clone(),
        action: verb,
        accounts,
        account,
        generated_password: generated,
    })
}

fn bad_reply(host: &str, e: &serde_json::Error) -> ControllerError {
    ControllerError::Local(format!("{host}: Airflow's account API answered something unexpected: {e}"))
}

/// One run of [`SCRIPT`] with `request` on its stdin; its result, or the
/// error Airflow gave, with a hint where one helps.
async fn call(
    conn: &mut crate::client::AgentConn,
    host: &str,
    project: &str,
    access: &AirflowAccess,
    request: &Value,
) -> Result<Value, ControllerError> {
    let exec = ExecRequest {
        project: project.to_string(),
        service: access.service.clone(),
        command: vec!["python".into(), "-c".into(), SCRIPT.into()],
        stdin: serde_json::to_vec(request).expect("a JSON value serializes"),
        timeout_seconds: 120,
        purpose: format!("users {}", request["action"].as_str().unwrap_or_default()),
        ..Default::default()
    };
    let reply = conn.raw().exec(exec).await.map_err(|s| ControllerError::from_status(host, "Exec", &s))?.into_inner();
    let line = reply.output.lines().rev().find_map(|l| l.strip_prefix("MLOPS-RESULT "));
    let Some(result) = line.and_then(|l| serde_json::from_str::<Value>(l).ok()) else {
        return Err(ControllerError::Local(format!(
            "{host}: the account call in `{}` exited {} without a result: {}",
            access.service,
            reply.exit_code,
            tail(&reply.output)
        )));
    };
    if result["ok"] == json!(true) {
        return Ok(result);
    }
    Err(refusal(host, access, request, &result))
}

/// Airflow's refusal as an error: a missing or existing account, an
/// unknown role, a password it will not take (all leave everything as it
/// was: exit 2); a failed login or server error (exit 1).
fn refusal(host: &str, access: &AirflowAccess, request: &Value, result: &Value) -> ControllerError {
    let status = result["status"].as_u64().unwrap_or(0);
    let error = result["error"].as_str().unwrap_or("no detail").to_string();
    let name = request["name"].as_str().unwrap_or_default();
    match result["step"].as_str().unwrap_or_default() {
        "login" => {
            return ControllerError::Local(format!(
                "{host}: the stack's admin `{}` could not log in to Airflow (HTTP {status}: {error})",
                access.admin_user
            ));
        }
        "admin" => {
            return ControllerError::usage(
                format!("{host}: `{name}` is the stack's admin account (names are the same whatever their case)"),
                Some(&format!("its password is the secret {0}: `mlopsctl secrets rotate {0}`", access.admin_password)),
            );
        }
        "api" if status == 404 => {
            return ControllerError::Local(format!(
                "{host}: Airflow in `{}` has no FAB account API (/auth/fab/v1): it does not run the FAB auth manager",
                access.service
            ));
        }
        _ if status == 0 => {
            return ControllerError::Local(format!(
                "{host}: Airflow's API in `{}` did not answer: {error}",
                access.service
            ));
        }
        _ => {}
    }
    match status {
        404 => ControllerError::usage(
            format!("{host}: there is no account `{name}`"),
            Some("`mlopsctl users list` shows the accounts there are"),
        ),
        409 => ControllerError::usage(
            format!("{host}: Airflow refused: {error}"),
            Some(
                "an account's name and email are each used once; change the existing one with `users set-role` or `users set-password`",
            ),
        ),
        400 | 422 if result["roles"].is_array() => {
            let roles: Vec<&str> = result["roles"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            ControllerError::usage(
                format!("{host}: Airflow has no role `{}`", request["role"].as_str().unwrap_or_default()),
                Some(&format!("roles there: {}", roles.join(", "))),
            )
        }
        400 | 422 => ControllerError::usage(format!("{host}: Airflow refused: {error}"), None),
        _ => ControllerError::Local(format!("{host}: Airflow's account API failed (HTTP {status}): {error}")),
    }
}

/// The end of a command's output, for an error.
fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.trim().lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names() {
        for good in ["vic", "ana.lopez", "ops-team_2", "a@example.org"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "-rf", "a b", "x/../y", "über", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_from_stdin() {
        assert_eq!(password_from("correct horse\n").unwrap(), "correct horse");
        assert_eq!(password_from("correct horse\r\n").unwrap(), "correct horse");
        assert_eq!(password_from("no newline").unwrap(), "no newline");
        assert!(password_from("\n").is_err());
        assert!(password_from("short\n").is_err());
        assert!(password_from("two\nlines here\n").is_err());
    }

    #[test]
    fn refusals_name_what_to_do() {
        let access = AirflowAccess { service: "api".into(), admin_user: "admin".into(), admin_password: "PW".into() };
        let req = json!({"action": "set-role", "name": "vic", "role": "Boss"});
        let e = refusal(
            "h",
            &access,
            &req,
            &json!({"ok": false, "status": 400, "error": "no role", "roles": ["Admin", "Viewer"]}),
        );
        assert_eq!(e.to_string(), "h: Airflow has no role `Boss`");
        assert_eq!(e.hint().as_deref(), Some("roles there: Admin, Viewer"));
        let e = refusal("h", &access, &req, &json!({"ok": false, "step": "user", "status": 404, "error": "not found"}));
        assert_eq!(e.to_string(), "h: there is no account `vic`");
        let e = refusal("h", &access, &req, &json!({"ok": false, "step": "api", "status": 404, "error": "Not Found"}));
        assert!(e.to_string().contains("no FAB account API"), "{e}");
        assert!(matches!(e, ControllerError::Local(_)), "{e}");
        let e = refusal("h", &access, &req, &json!({"ok": false, "step": "admin", "status": 403, "error": "admin"}));
        assert!(matches!(e, ControllerError::Usage { .. }), "{e}");
        let e = refusal("h", &access, &req, &json!({"ok": false, "status": 401, "error": "bad", "step": "login"}));
        assert!(matches!(e, ControllerError::Local(_)), "{e}");
        let e = refusal("h", &access, &req, &json!({"ok": false, "status": 500, "error": "boom"}));
        assert!(matches!(e, ControllerError::Local(_)), "{e}");
    }
}
