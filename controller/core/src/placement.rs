//! Which services run on which host: a stack's roles
//! (`x-mlops.placement.roles`) are inventory groups. A host runs the roles
//! of the groups it is in, or every role when it is in none of them (so a
//! one-host inventory, or `--host`, deploys the whole stack as before), and
//! every host runs `every_host`.
//!
//! [`place`] decides it for every host of the inventory (not only those a
//! `--limit` selects: the others keep running their part) and checks it: a
//! role no host runs, or a `single` role on two hosts, is refused before
//! any host is touched. [`render`] makes one host's part of the stack:
//! - only its services; `depends_on` on a service of another host is left
//!   out, and the hosts are deployed in [`Layout::waves`] instead (a host
//!   after the hosts whose services its services depend on);
//! - a service that runs on one other host is reached under its own name:
//!   an `extra_hosts` entry gives it that host's address (its inventory
//!   address, or `mlops_address`), so URLs in the Compose file stay as they
//!   are;
//! - `remote_ports` of its services are published on the host's inventory
//!   address only (never on every address), and only when some host of the
//!   stack does not run the service itself or the service has an instance
//!   per host;
//! - a service with `remote_ports` in a role of several hosts, or in
//!   `every_host`, has one instance per host, each with its own host name,
//!   `<service>-<host>` (the container's name for itself; also in
//!   `MLOPS_INSTANCE`), which every other host resolves to that host's
//!   address: a Spark worker advertises it to its master, a Celery worker
//!   records it for the API server to fetch task logs from, Prometheus
//!   scrapes each host's node exporter by it ([`scrape_targets`] writes the
//!   `file_sd` targets of `x-mlops.placement.scrape`);
//! - every service of a host that others reach has the host's address in
//!   `MLOPS_HOST_ADDRESS` (what a Spark driver tells its executors);
//! - volumes only its services use.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, ToSocketAddrs};

use mlops_inventory::{Connection, Target};
use mlops_proto::stack::{MountKind, Port, Stack};

use crate::ControllerError;

/// Where every service of a stack runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Host → the services it runs.
    pub services: BTreeMap<String, BTreeSet<String>>,
    /// Host → its roles (every role for a host in no role's group).
    pub roles: BTreeMap<String, Vec<String>>,
    /// Host → the address other hosts reach its services at.
    pub addresses: BTreeMap<String, IpAddr>,
    /// The hosts in the order they can be deployed: every host of a wave
    /// after the hosts of earlier waves its services depend on.
    pub waves: Vec<Vec<String>>,
    /// Whether the stack is split between hosts (else each host runs it all).
    pub split: bool,
}

impl Layout {
    /// The hosts that run `service`.
    pub fn hosts_of(&self, service: &str) -> Vec<&str> {
        self.services.iter().filter(|(_, s)| s.contains(service)).map(|(h, _)| h.as_str()).collect()
    }

    /// `waves` restricted to `names` (the hosts being deployed).
    pub fn waves_of(&self, names: &[String]) -> Vec<Vec<String>> {
        let mut waves: Vec<Vec<String>> =
            self.waves.iter().map(|w| w.iter().filter(|h| names.contains(h)).cloned().collect()).collect();
        // Hosts not in the layout (none today) go last.
        let placed: BTreeSet<&String> = self.waves.iter().flatten().collect();
        waves.push(names.iter().filter(|n| !placed.contains(n)).cloned().collect());
        waves.retain(|w| !w.is_empty());
        waves
    }
}

/// Decides where each service of `stack` runs on `hosts` (in inventory
/// order); an error when the inventory cannot run the stack.
pub fn place(stack: &Stack, hosts: &[Target]) -> Result<Layout, ControllerError> {
    let placement = &stack.options.placement;
    let present = |services: &[String]| -> Vec<String> {
        services.iter().filter(|s| stack.services.contains_key(*s)).cloned().collect()
    };
    // Roles whose services are all skipped (or in disabled profiles) are no roles.
    let roles: BTreeMap<&str, (Vec<String>, bool)> = placement
        .roles
        .iter()
        .map(|(name, role)| (name.as_str(), (present(&role.services), role.single)))
        .filter(|(_, (services, _))| !services.is_empty())
        .collect();
    let everything: BTreeSet<String> = stack.services.keys().cloned().collect();
    // No host in any role's group: each host runs the whole stack (the
    // stack deployed to several hosts side by side, as without roles).
    let grouped = hosts.iter().any(|h| h.groups.iter().any(|g| placement.roles.contains_key(g)));
    if roles.is_empty() || hosts.len() <= 1 || !grouped {
        let names: Vec<String> = hosts.iter().map(|t| t.name.clone()).collect();
        let all_roles: Vec<String> = roles.keys().map(|r| r.to_string()).collect();
        return Ok(Layout {
            services: names.iter().map(|n| (n.clone(), everything.clone())).collect(),
            roles: names.iter().map(|n| (n.clone(), all_roles.clone())).collect(),
            addresses: BTreeMap::new(),
            waves: vec![names],
            split: false,
        });
    }

    let mut layout = Layout {
        services: BTreeMap::new(),
        roles: BTreeMap::new(),
        addresses: BTreeMap::new(),
        waves: Vec::new(),
        split: true,
    };
    let every_host = present(&placement.every_host);
    for host in hosts {
        // A host in the group of a role whose services are all skipped
        // runs that role's nothing, not every role.
        let declared: Vec<&String> = host.groups.iter().filter(|g| placement.roles.contains_key(*g)).collect();
        let mine: Vec<String> = if declared.is_empty() {
            roles.keys().map(|r| r.to_string()).collect()
        } else {
            declared.into_iter().filter(|g| roles.contains_key(g.as_str())).cloned().collect()
        };
        let mut services: BTreeSet<String> = every_host.iter().cloned().collect();
        for role in &mine {
            services.extend(roles[role.as_str()].0.iter().cloned());
        }
        layout.services.insert(host.name.clone(), services);
        layout.roles.insert(host.name.clone(), mine);
    }
    for (role, (services, single)) in &roles {
        let on: Vec<&str> =
            layout.roles.iter().filter(|(_, r)| r.iter().any(|x| x == role)).map(|(h, _)| h.as_str()).collect();
        if on.is_empty() {
            return Err(ControllerError::usage(
                format!("no host of the inventory runs role `{role}` ({})", services.join(", ")),
                Some(&format!(
                    "add a host to inventory group `{role}`, or leave one host in no role group (it runs every role)"
                )),
            ));
        }
        if *single && on.len() > 1 {
            return Err(ControllerError::usage(
                format!(
                    "role `{role}` ({}) runs on one host only, but {} would run it",
                    services.join(", "),
                    on.join(", ")
                ),
                Some(&format!(
                    "keep one host in inventory group `{role}`; a host in no role group runs every role, so put such hosts in groups"
                )),
            ));
        }
    }

    // Two hosts whose instances of a service would have one name.
    for service in instanced(stack) {
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for host in layout.services.iter().filter(|(_, s)| s.contains(&service)).map(|(h, _)| h.as_str()) {
            if let Some(other) = seen.insert(instance_name(&service, host), host) {
                return Err(ControllerError::usage(
                    format!(
                        "hosts `{other}` and `{host}` would give their `{service}` the same host name `{}`",
                        instance_name(&service, host)
                    ),
                    Some("rename one of them in the inventory (names differing only in case or punctuation collide)"),
                ));
            }
        }
    }

    // Addresses of the hosts whose services others use: one some host
    // lacks, or an instance of its own that others reach by name (an
    // `every_host` service with `remote_ports`, such as a scraped exporter).
    let instanced = instanced(stack);
    for host in hosts {
        let serves_others = layout.services[&host.name].iter().any(|s| {
            (layout.services.values().any(|other| !other.contains(s)) && !every_host.contains(s))
                || instanced.contains(s)
        });
        if serves_others {
            layout.addresses.insert(host.name.clone(), address_of(host)?);
        }
    }

    // Waves: a host after the hosts running what its services depend on.
    let mut after: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (host, services) in &layout.services {
        let needs = after.entry(host.as_str()).or_default();
        for s in services {
            for dep in stack.services[s].depends_on.keys().filter(|d| !services.contains(*d)) {
                needs.extend(layout.services.iter().filter(|(_, o)| o.contains(dep)).map(|(h, _)| h.as_str()));
            }
        }
    }
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let order: Vec<&str> = hosts.iter().map(|t| t.name.as_str()).collect();
    while done.len() < order.len() {
        let wave: Vec<&str> =
            order.iter().copied().filter(|h| !done.contains(h) && after[h].iter().all(|d| done.contains(d))).collect();
        if wave.is_empty() {
            let stuck: Vec<&str> = order.iter().copied().filter(|h| !done.contains(h)).collect();
            return Err(ControllerError::usage(
                format!("hosts {} depend on each other's services (depends_on across hosts)", stuck.join(", ")),
                Some("move services that depend on each other into the same role"),
            ));
        }
        done.extend(wave.iter().copied());
        layout.waves.push(wave.into_iter().map(str::to_string).collect());
    }
    Ok(layout)
}

/// The address other hosts reach `host` at: `mlops_address`, else its
/// inventory address (resolved by this machine when it is a name).
fn address_of(host: &Target) -> Result<IpAddr, ControllerError> {
    let ip = address_given(host)?;
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Err(ControllerError::usage(
            format!("host `{}`: other hosts cannot reach it at {ip}", host.name),
            Some(&format!("set `mlops_address: <IP>` for host `{}` to the address the other hosts reach", host.name)),
        ));
    }
    Ok(ip)
}

fn address_given(host: &Target) -> Result<IpAddr, ControllerError> {
    let hint = format!("set `mlops_address: <IP>` for host `{}` in the inventory", host.name);
    if let Some(v) = host.vars.get("mlops_address") {
        let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
        return text.parse().map_err(|_| {
            ControllerError::usage(format!("host `{}`: mlops_address `{text}` is not an IP address", host.name), None)
        });
    }
    let Connection::Ssh { address, port, .. } = &host.connection else {
        return Err(ControllerError::usage(
            format!("host `{}` is this machine (no SSH): other hosts cannot be told its address", host.name),
            Some(&hint),
        ));
    };
    if let Ok(ip) = address.trim_matches(['[', ']']).parse() {
        return Ok(ip);
    }
    let found: Vec<IpAddr> =
        (address.as_str(), *port).to_socket_addrs().map(|a| a.map(|s| s.ip()).collect()).unwrap_or_default();
    found.iter().find(|ip| ip.is_ipv4()).or(found.first()).copied().ok_or_else(|| {
        ControllerError::usage(
            format!(
                "host `{}`: its address `{address}` does not resolve here, and other hosts must reach it",
                host.name
            ),
            Some(&hint),
        )
    })
}

/// Services with `remote_ports` in a role of several hosts, or on every
/// host: each host's is reached by its own instance name.
fn instanced(stack: &Stack) -> BTreeSet<String> {
    let p = &stack.options.placement;
    p.roles
        .values()
        .filter(|r| !r.single)
        .flat_map(|r| r.services.iter())
        .chain(p.every_host.iter())
        .filter(|s| p.remote_ports.contains_key(*s) && stack.services.contains_key(*s))
        .cloned()
        .collect()
}

/// The `file_sd` targets of each scraped service (`x-mlops.placement.scrape`):
/// (file, JSON). Split between hosts, one target group per host running a
/// service, by its instance name when it has one (a `host` label names the
/// host); else the service by its name.
pub fn scrape_targets(stack: &Stack, layout: &Layout) -> Vec<(String, String)> {
    let instanced = instanced(stack);
    let mut out = Vec::new();
    for (service, scrape) in &stack.options.placement.scrape {
        if !stack.services.contains_key(service) {
            continue;
        }
        let groups: Vec<serde_json::Value> = if layout.split && instanced.contains(service) {
            layout
                .hosts_of(service)
                .into_iter()
                .map(|h| {
                    serde_json::json!({
                        "targets": [format!("{}:{}", instance_name(service, h), scrape.port)],
                        "labels": {"host": h},
                    })
                })
                .collect()
        } else {
            vec![serde_json::json!({"targets": [format!("{service}:{}", scrape.port)]})]
        };
        let text = serde_json::to_string_pretty(&groups).expect("serializable") + "\n";
        out.push((scrape.file.clone(), text));
    }
    out
}

/// `<service>-<host>`, as a host name: lowercase letters, digits and `-`,
/// at most 63 characters.
pub fn instance_name(service: &str, host: &str) -> String {
    let mut name: String = format!("{service}-{host}")
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name.truncate(63);
    name.trim_matches('-').to_string()
}

/// `host`'s part of `stack` (see the module's documentation).
pub fn render(stack: &Stack, layout: &Layout, host: &str) -> Stack {
    if !layout.split {
        return stack.clone();
    }
    let mine = &layout.services[host];
    let mut out = stack.clone();
    out.services.retain(|name, _| mine.contains(name));
    // A service on exactly one other host is reached by its name there.
    let remote: Vec<String> = stack
        .services
        .keys()
        .filter(|s| !mine.contains(*s))
        .filter_map(|s| match layout.hosts_of(s).as_slice() {
            [one] => layout.addresses.get(*one).map(|ip| format!("{s}:{ip}")),
            _ => None,
        })
        .collect();
    let lacking = |service: &str| layout.services.values().any(|s| !s.contains(service));
    // Instances of reachable services that run on several hosts: their
    // names, and the address each resolves to.
    let instanced = instanced(stack);
    let mut instances: Vec<(String, String, IpAddr)> = Vec::new();
    for service in &instanced {
        for on in layout.hosts_of(service) {
            if let Some(ip) = layout.addresses.get(on) {
                instances.push((service.clone(), instance_name(service, on), *ip));
            }
        }
    }
    for (name, svc) in out.services.iter_mut() {
        svc.depends_on.retain(|dep, _| mine.contains(dep));
        if let Some(ip) = layout.addresses.get(host) {
            svc.environment.insert("MLOPS_HOST_ADDRESS".into(), ip.to_string());
        }
        if instanced.contains(name) && svc.network_mode.is_none() {
            let me = instance_name(name, host);
            svc.environment.insert("MLOPS_INSTANCE".into(), me.clone());
            svc.hostname = Some(me);
        }
        let shares_a_namespace =
            svc.network_mode.as_deref().is_some_and(|m| m.starts_with("service:") || m.starts_with("container:"));
        if !shares_a_namespace {
            // An instance's own name stays its container's own address.
            let others = instances
                .iter()
                .filter(|(s, n, _)| !(s == name && Some(n) == svc.hostname.as_ref()))
                .map(|(_, n, ip)| format!("{n}:{ip}"));
            for entry in remote.iter().cloned().chain(others) {
                if !svc.extra_hosts.contains(&entry) {
                    svc.extra_hosts.push(entry);
                }
            }
        }
        // Other hosts reach it: some host lacks it, or each host's own is
        // reached by its instance name (Prometheus scraping every host).
        if let (Some(ports), Some(ip)) = (stack.options.placement.remote_ports.get(name), layout.addresses.get(host))
            && (lacking(name) || instanced.contains(name))
        {
            for &port in ports {
                let p = Port {
                    host_ip: ip.to_string(),
                    host_port: Some(port),
                    container_port: port,
                    protocol: "tcp".into(),
                };
                if !svc.ports.contains(&p) {
                    svc.ports.push(p);
                }
            }
        }
    }
    let used: BTreeSet<&str> = out
        .services
        .values()
        .flat_map(|s| s.volumes.iter())
        .filter(|m| m.kind == MountKind::Volume)
        .map(|m| m.source.as_str())
        .collect();
    let used: BTreeSet<String> = used.into_iter().map(str::to_string).collect();
    out.volumes.retain(|name, _| used.contains(name));
    out.options.credentials.retain(|service, _| mine.contains(service));
    out.options.ui.retain(|_, ui| mine.contains(&ui.service));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACK: &str = r#"
name: p
x-mlops:
  placement:
    roles:
      db: {services: [db], single: true}
      web: {services: [web], single: true}
      workers: {services: [worker]}
    every_host: [exporter]
    remote_ports: {db: [5432], web: [8080]}
services:
  db: {image: db, volumes: ["data:/data"]}
  web: {image: web, depends_on: {db: {condition: service_healthy}}}
  worker: {image: w, depends_on: [db, web]}
  exporter: {image: e}
volumes:
  data:
"#;

    fn stack() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("compose.yaml"), STACK).unwrap();
        mlops_compose::load(dir.path(), &mlops_compose::LoadOptions::default()).unwrap().stack
    }

    fn host(name: &str, addr: &str, groups: &[&str]) -> Target {
        Target {
            name: name.into(),
            connection: Connection::Ssh { address: addr.into(), port: 22, user: "root".into(), identity_files: vec![] },
            agent_port: 7443,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            vars: Default::default(),
            origin: "test".into(),
        }
    }

    #[test]
    fn one_host_or_no_groups_runs_everything() {
        let s = stack();
        let one = place(&s, &[host("a", "10.0.0.1", &[])]).unwrap();
        assert!(!one.split);
        assert_eq!(render(&s, &one, "a"), s);
    }

    #[test]
    fn groups_place_roles_and_hosts_reach_each_other_by_service_name() {
        let s = stack();
        let hosts = [
            host("a", "10.0.0.1", &["db", "web"]),
            host("b", "10.0.0.2", &["workers"]),
            host("c", "10.0.0.3", &["workers"]),
        ];
        let l = place(&s, &hosts).unwrap();
        assert_eq!(l.services["a"], BTreeSet::from(["db".into(), "web".into(), "exporter".into()]));
        assert_eq!(l.services["b"], BTreeSet::from(["worker".into(), "exporter".into()]));
        assert_eq!(l.waves, vec![vec!["a".to_string()], vec!["b".into(), "c".into()]]);
        let b = render(&s, &l, "b");
        assert_eq!(b.services.keys().collect::<Vec<_>>(), ["exporter", "worker"]);
        assert!(b.services["worker"].depends_on.is_empty(), "across hosts: waves instead");
        assert!(b.services["worker"].extra_hosts.contains(&"db:10.0.0.1".to_string()));
        assert!(b.services["worker"].extra_hosts.contains(&"web:10.0.0.1".to_string()));
        assert!(b.volumes.is_empty(), "the db's volume stays on the db's host");
        let a = render(&s, &l, "a");
        let db_ports = &a.services["db"].ports;
        assert_eq!(db_ports.len(), 1);
        assert_eq!((db_ports[0].host_ip.as_str(), db_ports[0].host_port), ("10.0.0.1", Some(5432)));
        assert!(a.services["web"].depends_on.contains_key("db"), "on the same host the dependency stays");
        assert!(a.services["exporter"].ports.is_empty(), "every host runs it: nothing published");
    }

    #[test]
    fn instances_of_a_service_on_several_hosts_have_names_every_host_resolves() {
        let mut s = stack();
        s.options.placement.remote_ports.insert("worker".into(), vec![8793]);
        let hosts = [
            host("a", "10.0.0.1", &["db", "web"]),
            host("b", "10.0.0.2", &["workers"]),
            host("c", "10.0.0.3", &["workers"]),
        ];
        let l = place(&s, &hosts).unwrap();
        let b = render(&s, &l, "b");
        let w = &b.services["worker"];
        assert_eq!(w.hostname.as_deref(), Some("worker-b"));
        assert_eq!(w.environment["MLOPS_INSTANCE"], "worker-b");
        assert_eq!(w.environment["MLOPS_HOST_ADDRESS"], "10.0.0.2");
        assert!(w.extra_hosts.contains(&"worker-c:10.0.0.3".to_string()));
        assert!(
            !w.extra_hosts.iter().any(|e| e.starts_with("worker-b:")),
            "its own name is its own: {:?}",
            w.extra_hosts
        );
        assert!(b.services["exporter"].extra_hosts.contains(&"worker-b:10.0.0.2".to_string()));
        let a = render(&s, &l, "a");
        assert!(a.services["web"].extra_hosts.contains(&"worker-b:10.0.0.2".to_string()));
        assert_eq!(instance_name("airflow-worker", "Worker01.example.com"), "airflow-worker-worker01-example-com");
    }

    #[test]
    fn every_hosts_scraped_service_is_published_and_listed_by_instance_name() {
        let mut s = stack();
        s.options.placement.remote_ports.insert("exporter".into(), vec![9100]);
        s.options
            .placement
            .scrape
            .insert("exporter".into(), mlops_proto::stack::Scrape { port: 9100, file: "targets/exporter.json".into() });
        let one = place(&s, &[host("a", "10.0.0.1", &[])]).unwrap();
        let files = scrape_targets(&s, &one);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, "targets/exporter.json");
        let groups: serde_json::Value = serde_json::from_str(&files[0].1).unwrap();
        assert_eq!(groups, serde_json::json!([{"targets": ["exporter:9100"]}]), "one host: by service name");
        assert!(render(&s, &one, "a").services["exporter"].ports.is_empty(), "one host: nothing published");

        let hosts = [host("a", "10.0.0.1", &["db", "web"]), host("b", "10.0.0.2", &["workers"])];
        let l = place(&s, &hosts).unwrap();
        let groups: serde_json::Value = serde_json::from_str(&scrape_targets(&s, &l)[0].1).unwrap();
        assert_eq!(
            groups,
            serde_json::json!([
                {"targets": ["exporter-a:9100"], "labels": {"host": "a"}},
                {"targets": ["exporter-b:9100"], "labels": {"host": "b"}},
            ])
        );
        for (h, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
            let rendered = render(&s, &l, h);
            let ports = &rendered.services["exporter"].ports;
            assert_eq!(ports.len(), 1, "{h}: {ports:?}");
            assert_eq!((ports[0].host_ip.as_str(), ports[0].host_port), (ip, Some(9100)), "inventory address only");
        }
        let a = render(&s, &l, "a");
        assert!(a.services["exporter"].extra_hosts.contains(&"exporter-b:10.0.0.2".to_string()));

        // A host left with the exporter only (its role's services skipped)
        // is still reached at its address.
        mlops_compose::skip_services(&mut s, &["worker".into()]).unwrap();
        let l = place(&s, &hosts).unwrap();
        assert_eq!(l.services["b"], BTreeSet::from(["exporter".to_string()]));
        let b = render(&s, &l, "b");
        assert_eq!(b.services["exporter"].ports[0].host_ip, "10.0.0.2", "{:?}", b.services["exporter"].ports);
        assert!(render(&s, &l, "a").services["exporter"].extra_hosts.contains(&"exporter-b:10.0.0.2".to_string()));
    }

    #[test]
    fn a_host_in_no_role_group_runs_every_role() {
        let s = stack();
        let l = place(&s, &[host("a", "10.0.0.1", &[]), host("b", "10.0.0.2", &["workers"])]).unwrap();
        assert_eq!(l.services["a"].len(), 4);
        let a = render(&s, &l, "a");
        assert_eq!(a.services["web"].ports[0].host_port, Some(8080), "b has no web of its own");
    }

    #[test]
    fn an_inventory_that_cannot_run_the_stack_is_refused() {
        let s = stack();
        let e = place(&s, &[host("a", "10.0.0.1", &["db", "web"]), host("b", "10.0.0.2", &["db"])]).unwrap_err();
        assert!(e.to_string().contains("role `db` (db) runs on one host only, but a, b"), "{e}");
        let e = place(&s, &[host("a", "10.0.0.1", &["db"]), host("b", "10.0.0.2", &["workers"])]).unwrap_err();
        assert!(e.to_string().contains("no host of the inventory runs role `web`"), "{e}");
        assert!(e.hint().unwrap().contains("group `web`"));
        let mut local = host("a", "x", &["db", "web"]);
        local.connection = Connection::Local;
        let e = place(&s, &[local, host("b", "10.0.0.2", &["workers"])]).unwrap_err();
        assert!(e.hint().unwrap().contains("mlops_address"), "{e}");
    }

    #[test]
    fn hosts_in_no_role_group_each_run_the_whole_stack() {
        let s = stack();
        let l = place(&s, &[host("a", "10.0.0.1", &["control"]), host("b", "10.0.0.2", &[])]).unwrap();
        assert!(!l.split, "side by side, as without roles");
        assert_eq!(render(&s, &l, "b"), s);
    }

    #[test]
    fn instance_names_and_addresses_other_hosts_cannot_use_are_refused() {
        let mut s = stack();
        s.options.placement.remote_ports.insert("worker".into(), vec![8793]);
        let base = [host("a", "10.0.0.1", &["db", "web"])];
        let twins = [base[0].clone(), host("w.1", "10.0.0.2", &["workers"]), host("w-1", "10.0.0.3", &["workers"])];
        let e = place(&s, &twins).unwrap_err();
        assert!(e.to_string().contains("the same host name `worker-w-1`"), "{e}");
        for bad in ["127.0.1.1", "0.0.0.0"] {
            let e = place(&s, &[host("a", bad, &["db", "web"]), host("b", "10.0.0.2", &["workers"])]).unwrap_err();
            assert!(e.to_string().contains(&format!("cannot reach it at {bad}")), "{e}");
        }
    }

    #[test]
    fn skipped_services_leave_their_roles() {
        let mut s = stack();
        mlops_compose::skip_services(&mut s, &["worker".into()]).unwrap();
        // No host needs to be in `workers` any more, and b (in `workers`
        // only) runs just what every host runs.
        let l = place(&s, &[host("a", "10.0.0.1", &["db", "web"]), host("b", "10.0.0.2", &["workers"])]).unwrap();
        assert_eq!(l.services["b"], BTreeSet::from(["exporter".to_string()]));
    }

    #[test]
    fn the_example_cluster_inventory_places_the_platform() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = root.join("platform");
        let (_, secrets) = mlops_compose::preflight(&dir, None).unwrap();
        let env = secrets.iter().map(|s| (s.clone(), format!("generated-{s}"))).collect();
        let mut platform =
            mlops_compose::load(&dir, &mlops_compose::LoadOptions { env, ..Default::default() }).unwrap().stack;
        mlops_compose::skip_services(&mut platform, &["grafana".into()]).unwrap();
        let ssh = mlops_inventory::ssh_config::SshConfig::default();
        let hosts = mlops_inventory::load_targets(&root.join("inventories/cluster.yml"), None, &ssh).unwrap();
        let l = place(&platform, &hosts).unwrap();
        assert!(l.split);
        assert_eq!(
            l.services["worker1"],
            BTreeSet::from(["airflow-worker".into(), "node-exporter".into(), "spark-worker".into()])
        );
        assert_eq!(l.services["spark3"], BTreeSet::from(["node-exporter".into(), "spark-worker".into()]));
        assert_eq!(
            l.waves,
            vec![vec!["control1".to_string()], vec!["worker1".into(), "worker2".into(), "spark3".into()]]
        );
        let w = render(&platform, &l, "worker1");
        assert!(w.services["airflow-worker"].extra_hosts.contains(&"postgres:192.0.2.10".to_string()));
        assert!(w.services["airflow-worker"].extra_hosts.contains(&"airflow-apiserver:192.0.2.10".to_string()));
        let c = render(&platform, &l, "control1");
        assert!(c.services["spark-master"].extra_hosts.contains(&"spark-worker-spark3:192.0.2.23".to_string()));
        assert!(c.services["airflow-apiserver"].extra_hosts.contains(&"airflow-worker-worker2:192.0.2.22".to_string()));
        // The one-host default is the whole platform, unchanged.
        let one = place(&platform, &[Target::local()]).unwrap();
        assert_eq!(render(&platform, &one, "localhost"), platform);
    }
}
