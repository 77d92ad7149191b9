use std::collections::BTreeMap;
use std::path::Path;

use super::*;

fn parse_with(text: &str, env: &[(&str, &str)]) -> Result<Loaded, ComposeError> {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let opts = LoadOptions { project: Some("demo".into()), ..Default::default() };
    parse(text, Path::new("compose.yaml"), Path::new("/nonexistent"), &env, &opts)
}

fn ok(text: &str) -> Loaded {
    parse_with(text, &[]).unwrap()
}

#[test]
fn a_full_service() {
    let l = ok(r#"
x-common: &common
  restart: unless-stopped
  labels:
    team: data
services:
  db:
    image: postgres:15
    <<: *common
    environment:
      POSTGRES_PASSWORD: secret
      EMPTY:
    volumes:
      - pgdata:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready"]
      interval: 5s
      timeout: 1m30s
      retries: 5
      start_period: 500ms
  web:
    build:
      context: ./web
      dockerfile: Dockerfile.web
      args: [VERSION=1.2]
      target: prod
    command: gunicorn -w "2 3" app:app
    entrypoint: ["/bin/sh", "-c"]
    environment: ["A=1", "B=two"]
    ports: ["127.0.0.1:8080:80", "9000", "53:53/udp", {target: 443, published: 8443}]
    volumes: ["./conf/app.ini:/etc/app.ini:ro", "/var/log:/logs", {type: tmpfs, target: /tmp}]
    networks: [front]
    depends_on:
      db:
        condition: service_healthy
    user: "1000:1000"
    working_dir: /app
    profiles: []
    deploy:
      resources:
        limits: {cpus: "0.5", memory: 512m}
volumes:
  pgdata:
networks:
  front:
"#);
    let s = &l.stack;
    assert_eq!(s.project, "demo");
    let db = &s.services["db"];
    assert_eq!(db.restart.as_deref(), Some("unless-stopped"), "merge key applied");
    assert_eq!(db.labels["team"], "data");
    assert_eq!(db.environment.get("EMPTY"), None, "unset variables stay unset");
    let hc = db.healthcheck.as_ref().unwrap();
    assert_eq!(
        (hc.interval_ms, hc.timeout_ms, hc.retries, hc.start_period_ms),
        (Some(5000), Some(90_000), Some(5), Some(500))
    );
    assert_eq!(
        db.volumes[0],
        Mount {
            kind: MountKind::Volume,
            source: "pgdata".into(),
            target: "/var/lib/postgresql/data".into(),
            read_only: false
        }
    );
    let web = &s.services["web"];
    let b = web.build.as_ref().unwrap();
    assert_eq!(
        (b.context.as_str(), b.dockerfile.as_str(), b.args["VERSION"].as_str(), b.target.as_deref()),
        ("./web", "Dockerfile.web", "1.2", Some("prod"))
    );
    assert_eq!(web.command.as_ref().unwrap(), &["gunicorn", "-w", "2 3", "app:app"]);
    assert_eq!(web.environment["B"], "two");
    assert_eq!(
        web.ports[0],
        Port { host_ip: "127.0.0.1".into(), host_port: Some(8080), container_port: 80, protocol: "tcp".into() }
    );
    assert_eq!(web.ports[1].host_port, None);
    assert_eq!(web.ports[2].protocol, "udp");
    assert_eq!(web.ports[3].host_port, Some(8443));
    assert!(web.volumes[0].read_only && web.volumes[0].kind == MountKind::Bind);
    assert_eq!(web.volumes[2].kind, MountKind::Tmpfs);
    assert_eq!(web.depends_on["db"], Condition::ServiceHealthy);
    assert_eq!(web.limits.memory_bytes, Some(512 * 1024 * 1024));
    assert_eq!(web.limits.cpus, Some(0.5));
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(s.start_order().unwrap(), ["db", "web"]);
}

#[test]
fn interpolation_and_its_errors_have_positions() {
    let l = parse_with(
        "services:\n  a:\n    image: \"busybox:${TAG:-latest}\"\n    environment:\n      X: $$HOME-${MISSING}\n",
        &[],
    )
    .unwrap();
    assert_eq!(l.stack.services["a"].image.as_deref(), Some("busybox:latest"));
    assert_eq!(l.stack.services["a"].environment["X"], "$HOME-");
    assert_eq!(l.warnings.len(), 1);
    assert_eq!(l.warnings[0].to_string(), "compose.yaml:5:10: variable MISSING is not set; using an empty string");

    let e = parse_with("services:\n  a:\n    image: ${IMAGE:?name the image}\n", &[]).unwrap_err();
    assert_eq!(e.to_string(), "compose.yaml:3:12: required variable IMAGE is missing a value: name the image");
    let l = parse_with("services:\n  a:\n    image: ${IMAGE:?name the image}\n", &[("IMAGE", "x")]).unwrap();
    assert_eq!(l.stack.services["a"].image.as_deref(), Some("x"));
}

#[test]
fn unknown_keys_warn_with_their_line() {
    let l = ok("services:\n  a:\n    image: x\n    sysctls: {a: 1}\n    x-note: fine\nsecrets: {}\nx-anything: 1\n");
    let w: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].starts_with("compose.yaml:4:5: unknown key `sysctls` in service `a` is ignored"), "{w:?}");
    assert!(w[1].starts_with("compose.yaml:6:1: unknown top-level key `secrets`"), "{w:?}");
}

#[test]
fn bad_input_names_line_and_column() {
    let e = parse_with("services:\n  a:\n    image: x\n   ports: [1]\n", &[]).unwrap_err();
    assert!(matches!(e, ComposeError::Yaml { .. }), "{e}");
    assert!(e.to_string().contains("line 4"), "{e}");

    let e = parse_with("services:\n  a:\n    image: x\n    ports: [\"80:http\"]\n", &[]).unwrap_err();
    assert_eq!(e.to_string(), "compose.yaml:4:13: port `80:http`: `http` is not a port number");

    let e = parse_with("services:\n  a:\n    image: x\n    depends_on: [b]\n", &[]).unwrap_err();
    assert!(e.to_string().contains("depends on `b`, which is not a service"), "{e}");

    let e = parse_with("services:\n  a:\n    image: x\n    volumes: [data:/d]\n", &[]).unwrap_err();
    assert!(e.to_string().contains("volume `data`, which is not declared"), "{e}");

    let e = parse_with(
        "services:\n  a:\n    build: .\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [a]\n",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");

    let e = parse_with("services:\n  a:\n    restart: sometimes\n    image: x\n", &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "compose.yaml:3:14: restart `sometimes`: use no, always, unless-stopped, on-failure or on-failure:N"
    );

    let e = parse_with("services:\n  a:\n    command: \"echo 'unterminated\"\n    image: x\n", &[]).unwrap_err();
    assert!(e.to_string().contains("command: an unterminated quote"), "{e}");
}

#[test]
fn profiles_select_services() {
    let text = "services:\n  a:\n    image: x\n  dbg:\n    image: y\n    profiles: [debug]\n";
    let l = ok(text);
    assert_eq!(l.stack.services.keys().collect::<Vec<_>>(), ["a"]);
    let env = BTreeMap::new();
    let opts = LoadOptions { project: Some("p".into()), profiles: vec!["debug".into()], ..Default::default() };
    let l = parse(text, Path::new("c.yaml"), Path::new("."), &env, &opts).unwrap();
    assert_eq!(l.stack.services.len(), 2);
}

#[test]
fn logging_is_read_checked_and_printed_back() {
    let text = "services:\n  a:\n    image: x\n    logging:\n      driver: local\n      options: {max-size: 10m, max-file: 3}\n";
    let l = ok(text);
    let logging = l.stack.services["a"].logging.clone().unwrap();
    assert_eq!(logging.driver, "local");
    assert_eq!(logging.options["max-size"], "10m");
    assert_eq!(logging.options["max-file"], "3", "a number is taken as Compose takes it");
    let dir = tempfile::tempdir().unwrap();
    round_trips(text, dir.path(), &[]);
    for (bad, says) in [
        ("logging: {driver: \"a b\"}", ":4:23: logging.driver `a b` is not a log driver's name"),
        ("logging: {drivre: local}", ":4:15: logging: unknown key `drivre`"),
    ] {
        let text = format!("services:\n  a:\n    image: x\n    {bad}\n");
        let e = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
}

#[test]
fn a_ui_is_listed_only_with_its_service() {
    let text = "x-mlops:\n  ui:\n    a: {service: a, port: 1}\n    dbg: {service: dbg, port: 2}\nservices:\n  a:\n    image: x\n  dbg:\n    image: y\n    profiles: [debug]\n";
    assert_eq!(ok(text).stack.options.ui.keys().collect::<Vec<_>>(), ["a"], "the profile is off");
    let env = BTreeMap::new();
    let opts = LoadOptions { project: Some("p".into()), profiles: vec!["debug".into()], ..Default::default() };
    let l = parse(text, Path::new("c.yaml"), Path::new("."), &env, &opts).unwrap();
    assert_eq!(l.stack.options.ui.len(), 2);
    let typo = text.replace("{service: dbg", "{service: dgb");
    let e = parse_with(&typo, &[]).unwrap_err().to_string();
    assert!(e.contains(":4:") && e.contains("x-mlops.ui `dbg`: no service `dgb`"), "{e}");
}

#[test]
fn load_reads_dotenv_and_env_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join(".env"), "TAG=1.0\nFROM_DOTENV=yes\n").unwrap();
    std::fs::write(d.join("app.env"), "A=from-file\nB=from-file\n").unwrap();
    std::fs::write(d.join("compose.yaml"), "name: My_Stack\nservices:\n  a:\n    image: img:${TAG}\n    env_file: app.env\n    environment:\n      B: inline\n      C: ${FROM_DOTENV}\n").unwrap();
    let opts = LoadOptions { env: [("TAG".to_string(), "2.0".to_string())].into(), ..Default::default() };
    let l = load(d, &opts).unwrap();
    assert_eq!(l.stack.project, "my_stack");
    let a = &l.stack.services["a"];
    assert_eq!(a.image.as_deref(), Some("img:2.0"), "the environment wins over .env");
    assert_eq!(
        (a.environment["A"].as_str(), a.environment["B"].as_str(), a.environment["C"].as_str()),
        ("from-file", "inline", "yes")
    );
    assert!(matches!(load(&d.join("nope"), &LoadOptions::default()), Err(ComposeError::Read { .. })));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(load(empty.path(), &LoadOptions::default()), Err(ComposeError::NotFound { .. })));
}

#[test]
fn helpers() {
    assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
    assert_eq!(parse_duration_ms("250ms"), Some(250));
    assert_eq!(parse_duration_ms("3"), Some(3000));
    assert_eq!(parse_duration_ms("soon"), None);
    assert_eq!(parse_bytes("2g"), Some(2 * 1024 * 1024 * 1024));
    assert_eq!(parse_bytes("100"), Some(100));
    assert_eq!(parse_bytes("1.5m"), Some(1_572_864));
    assert_eq!(parse_bytes("5GiB"), Some(5 << 30));
    assert_eq!(parse_bytes("1t"), Some(1 << 40));
    assert_eq!(parse_bytes("2kb"), Some(2048));
    assert_eq!(parse_bytes("g"), None);
    assert_eq!(parse_bytes("5x"), None);
    assert_eq!(split_words(r#"a "b c" 'd e' f\ g"#).unwrap(), ["a", "b c", "d e", "f g"]);
    // As Compose splits: `#` starts no comment.
    assert_eq!(split_words("echo a #b 'c #d' x#y").unwrap(), ["echo", "a", "#b", "c #d", "x#y"]);
    assert_eq!(split_words("#first").unwrap(), ["#first"]);
    assert_eq!(normalize_project("My Stack!"), Some("mystack".into()));
}

/// The platform's settings come from its .env; mlopsctl's own environment
/// wins over it, and a copy of the bundle without it fails naming the
/// setting and the file.
#[test]
fn the_platform_settings_come_from_its_env_file() {
    let platform = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../platform");
    let (_, secrets) = preflight(&platform, None).unwrap();
    let env: BTreeMap<String, String> = secrets.iter().map(|s| (s.clone(), "x".to_string())).collect();
    let mut set = env.clone();
    set.insert("MLOPS_LOG_MAX_SIZE".into(), "1m".into());
    let l = load(&platform, &LoadOptions { env: set, ..Default::default() }).unwrap();
    assert_eq!(l.stack.services["postgres"].logging.as_ref().unwrap().options["max-size"], "1m");
    assert_eq!(l.stack.services["postgres"].logging.as_ref().unwrap().options["max-file"], "5", "from .env");

    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(platform.join("compose.yaml"), copy.path().join("compose.yaml")).unwrap();
    let err = load(copy.path(), &LoadOptions { env, ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("MLOPS_LOG_MAX_SIZE") && err.contains("set in .env beside compose.yaml"), "{err}");
}

/// The platform bundle parses cleanly: no warnings, every option understood.
#[test]
fn the_platform_bundle_parses_without_warnings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../platform");
    let (project, secrets) = preflight(&dir, None).unwrap();
    assert_eq!(project, "mlops");
    let env = secrets.iter().map(|s| (s.clone(), format!("generated-{s}"))).collect();
    let l = load(&dir, &LoadOptions { env, ..Default::default() }).unwrap();
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let o = &l.stack.options;
    assert!(o.bootstrap_base_images && o.host_ca_bundle, "{o:?}");
    assert_eq!(o.inject["exporter/mlops-airflow-exporter"], "mlops-airflow-exporter");
    assert_eq!(o.ui["airflow"].port, 28080);
    assert!(l.stack.services.contains_key("grafana"));
    // Every service is hardened (through the anchors, merges of merges included).
    for (name, svc) in &l.stack.services {
        assert_eq!(svc.security_opt, ["no-new-privileges:true"], "{name}");
        assert_eq!(svc.cap_drop, ["ALL"], "{name}");
        assert!(svc.host_access().iter().all(|a| a.contains("/proc") || a.contains("/sys")), "{name}");
        // And its log is rotated, as .env says.
        let log = svc.logging.as_ref().unwrap_or_else(|| panic!("{name}: its log is not rotated"));
        assert_eq!(log.driver, "json-file", "{name}");
        assert_eq!((log.options["max-size"].as_str(), log.options["max-file"].as_str()), ("20m", "5"), "{name}");
    }
    // Retention: Prometheus's flags and the maintenance DAG's variables.
    let prometheus = l.stack.services["prometheus"].command.clone().unwrap();
    for flag in ["--storage.tsdb.retention.time=15d", "--storage.tsdb.retention.size=5GB"] {
        assert!(prometheus.iter().any(|a| a == flag), "{prometheus:?}");
    }
    let worker = &l.stack.services["airflow-worker"].environment;
    assert_eq!(worker["AIRFLOW_VAR_MLOPS_AIRFLOW_LOG_RETENTION_DAYS"], "30");
    assert_eq!(worker["AIRFLOW_VAR_MLOPS_AIRFLOW_DB_RETENTION_DAYS"], "90");
    // No generated secret is interpolated into a command line.
    for (name, svc) in &l.stack.services {
        for arg in svc.command.iter().flatten().chain(svc.entrypoint.iter().flatten()) {
            assert!(!arg.contains("generated-"), "{name}: a secret on the command line: {arg}");
        }
    }
    // The mlflow profile: off, nothing of it; on, its services (hardened,
    // no secret on a command line), its UI.
    assert!(
        !l.stack.services.keys().any(|s| s.contains("mlflow") || s.ends_with("-ml")),
        "{:?}",
        l.stack.services.keys()
    );
    assert!(!o.ui.contains_key("mlflow"));
    assert!(!l.stack.volumes.contains_key("mlflow-artifacts"), "a volume of the profile's alone is not made");
    assert!(!o.placement.roles["airflow"].services.contains(&"airflow-worker-ml".to_string()));
    let env = secrets.iter().map(|s| (s.clone(), format!("generated-{s}"))).collect();
    let ml = load(&dir, &LoadOptions { env, profiles: vec!["mlflow".into()], ..Default::default() }).unwrap();
    assert!(ml.warnings.is_empty(), "{:?}", ml.warnings);
    assert_eq!(ml.stack.options.ui["mlflow"].port, 15000);
    assert!(ml.stack.volumes.contains_key("mlflow-artifacts"));
    for name in ["mlflow-init", "mlflow", "airflow-worker-ml"] {
        let svc = &ml.stack.services[name];
        assert_eq!(svc.cap_drop, ["ALL"], "{name}");
        for arg in svc.command.iter().flatten() {
            assert!(!arg.contains("generated-"), "{name}: a secret on the command line: {arg}");
        }
    }
    assert_eq!(ml.stack.services["mlflow"].build.as_ref().unwrap().target.as_deref(), Some("ml"));
    assert_eq!(l.stack.services["airflow-worker"].build.as_ref().unwrap().target.as_deref(), Some("airflow"));
    let mut stack = l.stack.clone();
    skip_services(&mut stack, &["grafana".into()]).unwrap();
    assert!(!stack.options.ui.contains_key("grafana"));
    assert!(skip_services(&mut l.stack.clone(), &["postgres".into()]).unwrap_err().contains("depends on it"));
}

#[test]
fn a_warning_is_said_once_per_place() {
    // As in Airflow's own Compose file: a script naming an unset variable
    // twice, in an anchor that several services merge.
    let text = "x-common: &common\n  image: x\n  command: [\"sh\", \"-c\", \"id ${AIRFLOW_UID}; echo ${AIRFLOW_UID}\"]\nservices:\n  a:\n    <<: *common\n  b:\n    <<: *common\n";
    let loaded = parse_with(text, &[]).unwrap();
    let unset: Vec<String> =
        loaded.warnings.iter().map(ToString::to_string).filter(|w| w.contains("AIRFLOW_UID")).collect();
    assert_eq!(unset.len(), 1, "{unset:#?}");
}

#[test]
fn hardening_keys() {
    let l = ok(r#"
services:
  app:
    image: app
    cap_drop: [ALL]
    cap_add: [NET_BIND_SERVICE]
    read_only: true
    security_opt: ["no-new-privileges:true"]
    tmpfs: ["/tmp:size=64m", /run]
    init: true
    ulimits:
      nofile: {soft: 1024, hard: 4096}
      nproc: 512
    shm_size: 256m
    stop_grace_period: 1m30s
    extra_hosts: ["db.internal:10.0.0.5", "cache=10.0.0.6"]
    expose: ["8080", "53/udp"]
  isolated:
    image: app
    network_mode: none
"#);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let s = &l.stack.services["app"];
    assert_eq!(
        (s.cap_drop.clone(), s.cap_add.clone()),
        (vec!["ALL".to_string()], vec!["NET_BIND_SERVICE".to_string()])
    );
    assert!(s.read_only && s.init == Some(true));
    assert_eq!(s.tmpfs, ["/tmp:size=64m", "/run"]);
    assert_eq!(s.ulimits["nofile"], Ulimit { soft: 1024, hard: 4096 });
    assert_eq!(s.ulimits["nproc"], Ulimit { soft: 512, hard: 512 });
    assert_eq!(s.shm_size, Some(256 << 20));
    assert_eq!(s.stop_grace_period_ms, Some(90_000));
    assert_eq!(s.extra_hosts, ["db.internal:10.0.0.5", "cache:10.0.0.6"]);
    assert_eq!(s.expose, ["8080/tcp", "53/udp"]);
    assert!(l.stack.service_networks("isolated").is_empty());
}

#[test]
fn host_access_is_refused_unless_the_stack_opts_in() {
    for (key, shows) in [
        ("privileged: true", "privileged: true"),
        ("pid: host", "pid: host"),
        ("network_mode: host", "network_mode: host"),
        ("volumes: [\"/var/run/docker.sock:/var/run/docker.sock\"]", "gives the host away"),
        ("volumes: [\"//run/.:/host-run:ro\"]", "gives the host away"),
        ("cap_add: [SYS_ADMIN]", "cap_add: SYS_ADMIN"),
        ("security_opt: [\"seccomp=unconfined\"]", "seccomp=unconfined"),
    ] {
        let text = format!("services:\n  agent:\n    image: x\n    {key}\n");
        let e = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(shows) && e.contains("allow_host_access") && e.contains("compose.yaml:2"), "{key}: {e}");
        let allowed = format!("x-mlops: {{allow_host_access: true}}\n{text}");
        assert!(parse_with(&allowed, &[]).is_ok(), "{key} with the opt-in");
    }
    for (bad, says) in [
        ("pid: container:x", "only `host`"),
        ("network_mode: bridge", "only `host` and `none`"),
        ("cap_drop: [\"net admin\"]", "not a capability"),
        ("security_opt: [\"whatever\"]", "no-new-privileges"),
        ("tmpfs: relative", "absolute path"),
        ("ulimits: {nofile: {soft: 1}}", "both soft and hard"),
        ("shm_size: lots", "not a size"),
        ("extra_hosts: [\"nohost\"]", "HOST:IP"),
        ("expose: [\"http\"]", "PORT or PORT/tcp|udp"),
    ] {
        let text = format!("services:\n  s:\n    image: x\n    {bad}\n");
        let e = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains("compose.yaml:4"), "{bad}: {e}");
    }
}

#[test]
fn a_yaml_bomb_is_refused_not_expanded() {
    // "Billion laughs": nine levels of ten aliases each.
    let mut text = String::from("x-0: &l0 [\"lol\"]\n");
    for i in 1..10 {
        let refs: Vec<String> = (0..10).map(|_| format!("*l{}", i - 1)).collect();
        text.push_str(&format!("x-{i}: &l{i} [{}]\n", refs.join(", ")));
    }
    text.push_str("services:\n  a:\n    image: x\n    command: *l9\n");
    let started = std::time::Instant::now();
    let e = parse_with(&text, &[]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(e.contains("compose.yaml"), "refused with a position: {e}");
}

#[test]
fn placement_names_services_once_each() {
    let base = "services:\n  db: {image: a}\n  web: {image: b}\n  extra: {image: c, profiles: [later]}\n";
    let good = format!(
        "x-mlops:\n  placement:\n    roles:\n      db: {{services: [db], single: true}}\n      web: {{services: [web, extra]}}\n    remote_ports: {{db: [5432]}}\n{base}"
    );
    let placement = ok(&good).stack.options.placement;
    assert!(placement.roles["db"].single && !placement.roles["web"].single);
    assert_eq!(placement.remote_ports["db"], [5432]);
    let scraped = format!(
        "x-mlops:\n  placement:\n    every_host: [db, web]\n    scrape: {{db: {{port: 9, file: m/t.json}}}}\n{base}"
    );
    let scrape = &ok(&scraped).stack.options.placement.scrape["db"];
    assert_eq!((scrape.port, scrape.file.as_str()), (9, "m/t.json"));
    let cases = [
        ("roles: {db: {services: [db]}}", "service `web` is in no role"),
        ("roles: {db: {services: [db, web]}, web: {services: [web]}}", "`web` is in role db and in role web"),
        ("roles: {db: {services: [db, nope]}, web: {services: [web]}}", "names `nope`, which is not a service"),
        (
            "roles: {db: {services: [db]}, web: {services: [web]}}\n    remote_ports: {db: [99999]}",
            "`99999` is not a port",
        ),
        ("roles: {\"a b\": {services: [db, web]}}", "is not an inventory group name"),
        (
            "every_host: [db, web]\n    scrape: {nope: {port: 1, file: t.json}}",
            "placement.scrape: `nope` is not a service",
        ),
        ("every_host: [db, web]\n    scrape: {db: {port: 0, file: t.json}}", "`0` is not a port number"),
        (
            "every_host: [db, web]\n    scrape: {db: {port: 9, file: ../t.json}}",
            "not a path inside the stack directory",
        ),
        ("every_host: [db, web]\n    scrape: {db: {port: 9, file: /t.json}}", "not a path inside the stack directory"),
        ("every_host: [db, web]\n    scrape: {db: {file: t.json}}", "scrape.db needs `port` and `file`"),
    ];
    for (placement, message) in cases {
        let text = format!("x-mlops:\n  placement:\n    {placement}\n{base}");
        let e = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(message), "{placement}: {e}");
        assert!(e.contains("compose.yaml:"), "positioned: {e}");
    }
}

/// `emit` then `parse` gives the model back: the text `mlopsctl config`
/// prints is a Compose file that means what was read.
fn round_trips(text: &str, dir: &Path, profiles: &[&str]) -> Stack {
    let (_, secrets) = preflight_text(text);
    let mut env: BTreeMap<String, String> = secrets.into_iter().map(|n| (n.clone(), format!("v$lue-of-{n}"))).collect();
    // The settings `load` would read beside the file.
    if let Ok(dotenv) = std::fs::read_to_string(dir.join(".env")) {
        env.extend(interpolate::parse_dotenv(&dotenv).unwrap());
    }
    let opts = LoadOptions { profiles: profiles.iter().map(|p| p.to_string()).collect(), ..Default::default() };
    let first = parse(text, Path::new("compose.yaml"), dir, &env, &opts).unwrap().stack;
    let yaml = emit::to_yaml(&emit::to_compose(&first));
    let again = parse(&yaml, Path::new("config.yaml"), dir, &env, &opts)
        .unwrap_or_else(|e| panic!("the emitted file does not parse: {e}\n{yaml}"))
        .stack;
    assert_eq!(first, again, "emitted:\n{yaml}");
    // And once more: the canonical spelling is a fixed point.
    assert_eq!(yaml, emit::to_yaml(&emit::to_compose(&again)));
    first
}

/// The `x-mlops.secrets` names of Compose text (what `preflight` reads
/// from a file).
fn preflight_text(text: &str) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compose.yaml");
    std::fs::write(&path, text).unwrap();
    preflight(&path, Some("p")).unwrap()
}

#[test]
fn the_platform_round_trips_through_its_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../platform");
    let text = std::fs::read_to_string(dir.join("compose.yaml")).unwrap();
    let stack = round_trips(&text, &dir, &[]);
    assert!(stack.services.len() > 10, "the whole platform: {:?}", stack.services.keys());
    assert!(!stack.options.secrets.is_empty());
    let with_mlflow = round_trips(&text, &dir, &["mlflow"]);
    assert_eq!(with_mlflow.services.len(), stack.services.len() + 3);
}

#[test]
fn what_airflow_s_style_of_compose_file_uses_round_trips() {
    // The features Airflow's published docker-compose.yaml leans on:
    // an anchored common block merged into services and extended,
    // `$$` escapes, defaults in interpolation, a multi-line script as a
    // command, profiles, conditions, and a healthcheck of each form.
    let text = r#"
x-common: &common
  image: ${IMAGE:-apache/airflow:3.0.0}
  environment: &env
    AIRFLOW__CORE__EXECUTOR: CeleryExecutor
    AIRFLOW__CORE__FERNET_KEY: ''
    LOAD_EXAMPLES: 'true'
    PORT: "8080"
    RATIO: "1.0"
  volumes:
    - ${PROJ_DIR:-.}/dags:/opt/airflow/dags
    - ./logs:/opt/airflow/logs:ro
  user: "${UID:-50000}:0"
  depends_on: &deps
    redis: {condition: service_healthy}
services:
  redis:
    image: redis:7.2-bookworm
    expose: [6379]
    healthcheck:
      test: ["CMD", "redis-cli", "ping"]
      interval: 10s
      timeout: 30s
      retries: 50
      start_period: 1m30s
    restart: always
  api:
    <<: *common
    command: api-server --port 8080
    ports: ["127.0.0.1:8080:8080", "9090/udp"]
    healthcheck:
      test: ["CMD-SHELL", 'airflow jobs check --hostname "$${HOSTNAME}"']
    deploy: {resources: {limits: {cpus: "1.5", memory: 512m}}}
    ulimits: {nofile: {soft: 1024, hard: 2048}, nproc: 64}
    shm_size: 64m
    stop_grace_period: 1m
    extra_hosts: ["db.local:10.0.0.2"]
  init:
    <<: *common
    entrypoint: /bin/bash
    command:
      - -c
      - |
        export AIRFLOW_UID=$$(id -u)
        echo "done: ${UID:-none}" # not a YAML comment
    environment:
      <<: *env
      _AIRFLOW_DB_MIGRATE: 'true'
    depends_on:
      <<: *deps
  cli:
    <<: *common
    profiles: [debug]
    healthcheck: {disable: true}
volumes:
  data: {}
  outside: {external: true, name: shared-data}
networks:
  back: {driver: bridge}
"#;
    let dir = tempfile::tempdir().unwrap();
    let without = round_trips(text, dir.path(), &[]);
    assert!(!without.services.contains_key("cli"));
    let with = round_trips(text, dir.path(), &["debug"]);
    assert_eq!(with.services["cli"].healthcheck.as_ref().unwrap().test, ["NONE"]);
    assert_eq!(with.services["init"].command.as_ref().unwrap()[1].lines().next(), Some("export AIRFLOW_UID=$(id -u)"));
}

/// `x-mlops.users` names a service of the stack and a secret of it; both
/// are checked, with the place in the file.
#[test]
fn users_names_a_service_and_a_secret() {
    let base = "services:\n  api:\n    image: a\n";
    let good = format!(
        "x-mlops:\n  secrets: [ADMIN_PW]\n  users: {{service: api, admin_user: admin, admin_password: ADMIN_PW}}\n{base}"
    );
    let users = ok(&good).stack.options.users.unwrap();
    assert_eq!((users.service.as_str(), users.admin_user.as_str()), ("api", "admin"));
    let cases = [
        ("users: {service: web, admin_user: admin, admin_password: ADMIN_PW}", "x-mlops.users: no service `web`"),
        ("users: {service: api, admin_user: admin, admin_password: OTHER}", "`OTHER` is not one of x-mlops.secrets"),
        ("users: {service: api}", "x-mlops.users needs `service`, `admin_user` and `admin_password`"),
    ];
    for (users, message) in cases {
        let text = format!("x-mlops:\n  secrets: [ADMIN_PW]\n  {users}\n{base}");
        let e = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(message), "{users}: {e}");
        assert!(e.contains("compose.yaml:"), "positioned: {e}");
    }
}
