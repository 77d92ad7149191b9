//! The stack model back into a Compose document (`mlopsctl config`): what
//! mlopsctl will run, with interpolation done, anchors and merge keys
//! expanded, `env_file` merged into `environment`, profiles and `--skip`
//! applied, every service and option in one canonical spelling.
//!
//! Reading the document again (from the same stack directory, with the same
//! variables) gives the same model: every string value has its `$` doubled,
//! so that interpolation on the way back in gives the text that is here;
//! durations are written in milliseconds and sizes in bytes; ports and
//! volumes in Compose's long form, whose fields say what the short form
//! leaves to parsing.

use std::collections::BTreeMap;

use mlops_proto::stack::{Condition, MountKind, Service, Stack, StackOptions};
use serde_json::{Map, Value, json};

/// The stack as a Compose document (JSON values; [`to_yaml`] prints it).
pub fn to_compose(stack: &Stack) -> Value {
    let mut doc = Map::new();
    doc.insert("name".into(), s(&stack.project));
    doc.insert("services".into(), stack.services.iter().map(|(name, svc)| (name.clone(), service(svc))).collect());
    if !stack.networks.is_empty() {
        let nets = stack.networks.iter().map(|(k, n)| (k.clone(), resource(n.external, &n.name, &n.driver)));
        doc.insert("networks".into(), nets.collect());
    }
    if !stack.volumes.is_empty() {
        let vols = stack.volumes.iter().map(|(k, v)| (k.clone(), resource(v.external, &v.name, &v.driver)));
        doc.insert("volumes".into(), vols.collect());
    }
    let options = options(&stack.options);
    if !options.is_empty() {
        doc.insert("x-mlops".into(), Value::Object(options));
    }
    Value::Object(doc)
}

/// The document as YAML.
pub fn to_yaml(doc: &Value) -> String {
    serde_saphyr::to_string(doc).expect("a JSON value always serializes")
}

/// A string value, `$` doubled (see the module docs).
fn s(text: &str) -> Value {
    Value::String(text.replace('$', "$$"))
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().map(|i| s(i)).collect())
}

fn string_map(map: &BTreeMap<String, String>) -> Value {
    Value::Object(map.iter().map(|(k, v)| (k.clone(), s(v))).collect())
}

fn ms(duration: u64) -> Value {
    Value::String(format!("{duration}ms"))
}

fn resource(external: bool, name: &Option<String>, driver: &Option<String>) -> Value {
    let mut m = Map::new();
    if external {
        m.insert("external".into(), json!(true));
    }
    if let Some(n) = name {
        m.insert("name".into(), s(n));
    }
    if let Some(d) = driver {
        m.insert("driver".into(), s(d));
    }
    Value::Object(m)
}

fn service(svc: &Service) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    if let Some(image) = &svc.image {
        put("image", s(image));
    }
    if let Some(b) = &svc.build {
        let mut build = Map::new();
        build.insert("context".into(), s(&b.context));
        build.insert("dockerfile".into(), s(&b.dockerfile));
        if !b.args.is_empty() {
            build.insert("args".into(), string_map(&b.args));
        }
        if let Some(t) = &b.target {
            build.insert("target".into(), s(t));
        }
        put("build", Value::Object(build));
    }
    if let Some(c) = &svc.entrypoint {
        put("entrypoint", strings(c));
    }
    if let Some(c) = &svc.command {
        put("command", strings(c));
    }
    if !svc.environment.is_empty() {
        put("environment", string_map(&svc.environment));
    }
    if !svc.ports.is_empty() {
        let ports = svc.ports.iter().map(|p| {
            let mut port = Map::new();
            port.insert("target".into(), json!(p.container_port));
            if let Some(h) = p.host_port {
                port.insert("published".into(), json!(h));
            }
            if !p.host_ip.is_empty() {
                port.insert("host_ip".into(), s(&p.host_ip));
            }
            port.insert("protocol".into(), s(&p.protocol));
            Value::Object(port)
        });
        put("ports", ports.collect());
    }
    if !svc.expose.is_empty() {
        put("expose", strings(&svc.expose));
    }
    if !svc.volumes.is_empty() {
        let mounts = svc.volumes.iter().map(|v| {
            let mut mount = Map::new();
            let kind = match v.kind {
                MountKind::Volume => "volume",
                MountKind::Bind => "bind",
                MountKind::Tmpfs => "tmpfs",
            };
            mount.insert("type".into(), json!(kind));
            if !v.source.is_empty() {
                mount.insert("source".into(), s(&v.source));
            }
            mount.insert("target".into(), s(&v.target));
            if v.read_only {
                mount.insert("read_only".into(), json!(true));
            }
            Value::Object(mount)
        });
        put("volumes", mounts.collect());
    }
    if !svc.tmpfs.is_empty() {
        put("tmpfs", strings(&svc.tmpfs));
    }
    if !svc.networks.is_empty() {
        put("networks", strings(&svc.networks));
    }
    if let Some(mode) = &svc.network_mode {
        put("network_mode", s(mode));
    }
    if !svc.depends_on.is_empty() {
        let deps = svc.depends_on.iter().map(|(name, c)| {
            let condition = match c {
                Condition::ServiceStarted => "service_started",
                Condition::ServiceHealthy => "service_healthy",
                Condition::ServiceCompletedSuccessfully => "service_completed_successfully",
            };
            (name.clone(), json!({ "condition": condition }))
        });
        put("depends_on", deps.collect());
    }
    if let Some(h) = &svc.healthcheck {
        let mut check = Map::new();
        check.insert("test".into(), strings(&h.test));
        if let Some(v) = h.interval_ms {
            check.insert("interval".into(), ms(v));
        }
        if let Some(v) = h.timeout_ms {
            check.insert("timeout".into(), ms(v));
        }
        if let Some(v) = h.retries {
            check.insert("retries".into(), json!(v));
        }
        if let Some(v) = h.start_period_ms {
            check.insert("start_period".into(), ms(v));
        }
        put("healthcheck", Value::Object(check));
    }
    for (key, value) in [("restart", &svc.restart), ("user", &svc.user), ("working_dir", &svc.working_dir)] {
        if let Some(v) = value {
            put(key, s(v));
        }
    }
    if let Some(h) = &svc.hostname {
        put("hostname", s(h));
    }
    if !svc.extra_hosts.is_empty() {
        put("extra_hosts", strings(&svc.extra_hosts));
    }
    if !svc.labels.is_empty() {
        put("labels", string_map(&svc.labels));
    }
    if !svc.profiles.is_empty() {
        put("profiles", strings(&svc.profiles));
    }
    if svc.limits.cpus.is_some() || svc.limits.memory_bytes.is_some() {
        let mut limits = Map::new();
        if let Some(c) = svc.limits.cpus {
            limits.insert("cpus".into(), json!(c));
        }
        if let Some(m) = svc.limits.memory_bytes {
            limits.insert("memory".into(), Value::String(m.to_string()));
        }
        put("deploy", json!({ "resources": { "limits": limits } }));
    }
    if !svc.cap_add.is_empty() {
        put("cap_add", strings(&svc.cap_add));
    }
    if !svc.cap_drop.is_empty() {
        put("cap_drop", strings(&svc.cap_drop));
    }
    if svc.read_only {
        put("read_only", json!(true));
    }
    if svc.privileged {
        put("privileged", json!(true));
    }
    if let Some(pid) = &svc.pid {
        put("pid", s(pid));
    }
    if !svc.security_opt.is_empty() {
        put("security_opt", strings(&svc.security_opt));
    }
    if let Some(init) = svc.init {
        put("init", json!(init));
    }
    if let Some(logging) = &svc.logging {
        let mut l = serde_json::Map::new();
        if !logging.driver.is_empty() {
            l.insert("driver".into(), json!(logging.driver));
        }
        if !logging.options.is_empty() {
            l.insert("options".into(), json!(logging.options));
        }
        put("logging", serde_json::Value::Object(l));
    }
    if !svc.ulimits.is_empty() {
        let limits = svc.ulimits.iter().map(|(k, u)| (k.clone(), json!({ "soft": u.soft, "hard": u.hard })));
        put("ulimits", limits.collect());
    }
    if let Some(size) = svc.shm_size {
        put("shm_size", Value::String(size.to_string()));
    }
    if let Some(grace) = svc.stop_grace_period_ms {
        put("stop_grace_period", ms(grace));
    }
    Value::Object(m)
}

/// `x-mlops`, what it sets (the credentials are derived again on reading).
fn options(o: &StackOptions) -> Map<String, Value> {
    let mut m = Map::new();
    for (key, on) in [
        ("bootstrap_base_images", o.bootstrap_base_images),
        ("host_ca_bundle", o.host_ca_bundle),
        ("allow_host_access", o.allow_host_access),
    ] {
        if on {
            m.insert(key.into(), json!(true));
        }
    }
    if !o.secrets.is_empty() {
        m.insert("secrets".into(), strings(&o.secrets));
    }
    if !o.inject.is_empty() {
        m.insert("inject".into(), string_map(&o.inject));
    }
    if !o.ui.is_empty() {
        let ui = o.ui.iter().map(|(k, u)| {
            let mut e = Map::new();
            e.insert("service".into(), s(&u.service));
            e.insert("port".into(), json!(u.port));
            if !u.path.is_empty() {
                e.insert("path".into(), s(&u.path));
            }
            (k.clone(), Value::Object(e))
        });
        m.insert("ui".into(), ui.collect());
    }
    if !o.rotate.is_empty() {
        let hook = |h: &mlops_proto::stack::Hook| {
            let mut e = Map::new();
            e.insert("service".into(), s(&h.service));
            e.insert("command".into(), strings(&h.command));
            if !h.stdin.is_empty() {
                e.insert("stdin".into(), s(&h.stdin));
            }
            Value::Object(e)
        };
        let rotate = o.rotate.iter().map(|(k, r)| {
            let mut e = Map::new();
            if r.keep_old {
                e.insert("keep_old".into(), json!(true));
            }
            if let Some(h) = &r.before {
                e.insert("before".into(), hook(h));
            }
            if let Some(h) = &r.after {
                e.insert("after".into(), hook(h));
            }
            (k.clone(), Value::Object(e))
        });
        m.insert("rotate".into(), rotate.collect());
    }
    let p = &o.placement;
    let mut placement = Map::new();
    if !p.roles.is_empty() {
        let roles = p.roles.iter().map(|(k, r)| {
            let mut e = Map::new();
            e.insert("services".into(), strings(&r.services));
            if r.single {
                e.insert("single".into(), json!(true));
            }
            (k.clone(), Value::Object(e))
        });
        placement.insert("roles".into(), roles.collect());
    }
    if !p.every_host.is_empty() {
        placement.insert("every_host".into(), strings(&p.every_host));
    }
    if !p.remote_ports.is_empty() {
        placement.insert("remote_ports".into(), p.remote_ports.iter().map(|(k, v)| (k.clone(), json!(v))).collect());
    }
    if !p.scrape.is_empty() {
        let scrape = p.scrape.iter().map(|(k, sc)| (k.clone(), json!({ "port": sc.port, "file": s(&sc.file) })));
        placement.insert("scrape".into(), scrape.collect());
    }
    if !placement.is_empty() {
        m.insert("placement".into(), Value::Object(placement));
    }
    let g = &o.migrate;
    let mut migrate = Map::new();
    if !g.hold.is_empty() {
        migrate.insert("hold".into(), strings(&g.hold));
    }
    if !g.optional.is_empty() {
        migrate.insert("optional".into(), strings(&g.optional));
    }
    if let Some(d) = &g.database {
        let mut e = Map::new();
        e.insert("service".into(), s(&d.service));
        e.insert("volume".into(), s(&d.volume));
        e.insert("user".into(), s(&d.user));
        e.insert("database".into(), s(&d.database));
        if !d.verify.is_empty() {
            e.insert("verify".into(), string_map(&d.verify));
        }
        migrate.insert("database".into(), Value::Object(e));
    }
    let access = |a: &mlops_proto::stack::AirflowAccess| json!({ "service": s(&a.service), "admin_user": s(&a.admin_user), "admin_password": s(&a.admin_password) });
    if let Some(a) = &g.airflow {
        migrate.insert("airflow".into(), access(a));
    }
    if !migrate.is_empty() {
        m.insert("migrate".into(), Value::Object(migrate));
    }
    if let Some(a) = &o.users {
        m.insert("users".into(), access(a));
    }
    m
}
