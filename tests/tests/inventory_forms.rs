//! Inventories as Ansible users keep them: the same hosts, groups and
//! variables written as an INI file, a YAML file, a directory of both, the
//! JSON `ansible-inventory --list` prints and a script, each with
//! `group_vars/` and `host_vars/`. The real `mlopsctl inventory` reads each
//! and must print what the real `ansible-inventory --list` prints for the
//! same files (ansible-core from PyPI, pinned in `tests/ansible-core.txt`,
//! installed by this test into its own virtualenv under target/), and the
//! forms must agree with each other, `--limit` included.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use mlops_e2e::{TestEnv, bins, output_within};
use serde_json::Value;

/// `ansible-inventory` of the pinned ansible-core, installed once per run
/// (and again only when the pins change). PyPI must be reachable: without
/// it the test fails, it does not skip.
fn ansible_inventory() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let b = bins();
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| b.workspace.join("target"), PathBuf::from);
        let venv = target.join("test-ansible-core/venv");
        let requirements = b.workspace.join("tests/ansible-core.txt");
        let want = std::fs::read_to_string(&requirements).unwrap();
        let stamp = venv.join("installed-from.txt");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
            let _ = std::fs::remove_dir_all(&venv);
            let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success());
            assert!(ok, "python3 -m venv {} failed (apt-get install python3-venv)", venv.display());
            let out = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--no-deps", "-r"])
                .arg(&requirements)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "pip install -r tests/ansible-core.txt failed (PyPI must be reachable): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&stamp, &want).unwrap();
        }
        venv.join("bin/ansible-inventory")
    })
}

/// What `ansible-inventory --list` prints for `path`, with no ansible.cfg
/// of this machine's in the way, and parse failures as errors (by default
/// Ansible only warns and goes on with an empty inventory).
fn ansible_list(env: &TestEnv, path: &Path, limit: Option<&str>) -> Value {
    let cfg = env.write("ansible.cfg", "[defaults]\n").unwrap();
    let mut cmd = Command::new(ansible_inventory());
    cmd.arg("-i").arg(path).arg("--list");
    if let Some(limit) = limit {
        cmd.args(["--limit", limit]);
    }
    cmd.current_dir(env.dir.path())
        .env("ANSIBLE_CONFIG", &cfg)
        .env("ANSIBLE_HOME", env.dir.path().join("ansible-home"))
        .env("ANSIBLE_INVENTORY_UNPARSED_FAILED", "true")
        .env("ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED", "true");
    let out = output_within(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "ansible-inventory -i {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    normalize(serde_json::from_slice(&out.stdout).unwrap())
}

fn ours(env: &TestEnv, path: &Path, limit: Option<&str>) -> Value {
    let mut args = vec!["inventory", "-i", path.to_str().unwrap()];
    if let Some(limit) = limit {
        args.extend(["--limit", limit]);
    }
    let out = env.ctl(&args).expect_code(0);
    normalize(serde_json::from_str(&out.stdout).unwrap())
}

/// Orders aside (hosts and children lists are compared as sets), and
/// without Ansible's serialization profile name.
fn normalize(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("_meta").and_then(Value::as_object_mut) {
        meta.remove("profile");
    }
    for group in v.as_object_mut().unwrap().values_mut() {
        for key in ["hosts", "children"] {
            if let Some(list) = group.get_mut(key).and_then(Value::as_array_mut) {
                list.sort_by_key(|x| x.to_string());
            }
        }
    }
    v
}

fn same(what: &str, got: &Value, want: &Value) {
    assert!(
        got == want,
        "{what}\n--- mlopsctl\n{}\n--- ansible-inventory\n{}",
        serde_json::to_string_pretty(got).unwrap(),
        serde_json::to_string_pretty(want).unwrap()
    );
}

fn write(root: &Path, rel: &str, text: &str) -> PathBuf {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

const INI: &str = r#"# production, as an Ansible user writes it
bastion ansible_host=192.0.2.1

[airflow]
af[01:02] mlops_role=worker
af03:2222 ansible_host=192.0.2.13 mlops_address='10.0.0.13' note="two words" # a comment

[spark]
sp[1:3]

[spark:vars]
spark_worker_cores=4
tier=spark-inv

[platform:children]
airflow
spark

[platform:vars]
tier=platform-inv
retries=3
enabled=True
flags=['a', 'b']
opts={'x': 1, 'y': None}
octal_like=0755
plain=hello world

[all:vars]
ansible_user=root
"#;

/// The same inventory in YAML (values typed as the INI's come out).
const YAML: &str = r#"all:
  vars:
    ansible_user: root
  hosts:
    bastion:
      ansible_host: 192.0.2.1
  children:
    platform:
      vars:
        tier: platform-inv
        retries: 3
        enabled: true
        flags: [a, b]
        opts: {x: 1, y: null}
        octal_like: "0755"
        plain: hello world
      children:
        airflow:
          hosts:
            af01: {mlops_role: worker}
            af02: {mlops_role: worker}
            af03:2222:
              ansible_host: 192.0.2.13
              mlops_address: "10.0.0.13"
              note: two words
        spark:
          vars:
            spark_worker_cores: 4
            tier: spark-inv
          hosts:
            sp[1:3]:
"#;

/// Beside each inventory: group_vars/all is above every group variable of
/// the inventory file itself (Ansible's precedence), a group's directory of
/// files, a host's file.
fn vars_dirs(dir: &Path) {
    write(dir, "group_vars/all.yml", "ntp: pool.example\ntier: all-dir\n");
    write(dir, "group_vars/spark/main.yml", "tier: spark-dir\n");
    write(dir, "group_vars/spark/zz-more.yaml", "extra: 1\n");
    write(dir, "host_vars/af01.yml", "ansible_port: 2201\nmlops_role: scheduler\n");
}

#[test]
fn every_inventory_form_reads_as_ansible_reads_it() {
    let env = TestEnv::new().unwrap();
    let root = env.dir.path().to_path_buf();

    let ini = write(&root, "ini/hosts", INI);
    vars_dirs(&root.join("ini"));
    let yaml = write(&root, "yaml/hosts.yml", YAML);
    vars_dirs(&root.join("yaml"));

    let want = ansible_list(&env, &ini, None);
    // The precedence this fixture is about, as Ansible printed it.
    assert_eq!(want["_meta"]["hostvars"]["sp1"]["tier"], "spark-dir", "{want}");
    assert_eq!(want["_meta"]["hostvars"]["af02"]["tier"], "all-dir", "{want}");
    assert_eq!(want["_meta"]["hostvars"]["af01"]["mlops_role"], "scheduler", "{want}");
    same("INI with group_vars/ and host_vars/", &ours(&env, &ini, None), &want);
    same("YAML", &ours(&env, &yaml, None), &ansible_list(&env, &yaml, None));
    same("YAML against INI", &ours(&env, &yaml, None), &want);

    // The --list JSON, as a file (mlopsctl reads it; Ansible reads it only
    // from a script) and printed by a script.
    let listed = env.write("listed.json", &serde_json::to_string(&want).unwrap()).unwrap();
    same("--list JSON file against INI", &ours(&env, &listed, None), &want);
    let script = write(
        &root,
        "script/inventory.py",
        &format!(
            "#!/usr/bin/env python3\nimport sys\nif sys.argv[1:] == ['--list']:\n    print(open({:?}).read())\nelse:\n    print('{{}}')\n",
            listed.display().to_string()
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    same("script", &ours(&env, &script, None), &ansible_list(&env, &script, None));
    same("script against INI", &ours(&env, &script, None), &want);

    // A directory: an INI file and a YAML file, vars directories inside.
    let multi = root.join("multi");
    write(&multi, "10-airflow.ini", &INI[..INI.find("[spark]").unwrap()]);
    write(
        &multi,
        "20-rest.yml",
        "all:\n  vars:\n    ansible_user: root\nplatform:\n  children:\n    airflow:\n    spark:\n      vars:\n        spark_worker_cores: 4\n        tier: spark-inv\n      hosts:\n        sp[1:3]:\n  vars:\n    tier: platform-inv\n    retries: 3\n    enabled: true\n    flags: [a, b]\n    opts: {x: 1, y: null}\n    octal_like: \"0755\"\n    plain: hello world\n",
    );
    write(&multi, "README.md", "skipped, as Ansible skips it\n");
    vars_dirs(&multi);
    same("directory", &ours(&env, &multi, None), &ansible_list(&env, &multi, None));
    same("directory against INI", &ours(&env, &multi, None), &want);

    // --limit gives the same hosts from every form.
    for limit in ["spark", "platform:!sp2", "af0*", "airflow:&platform", "bastion,sp3"] {
        let want = ansible_list(&env, &ini, Some(limit));
        for path in [&ini, &yaml, &listed, &multi] {
            same(&format!("--limit {limit} on {}", path.display()), &ours(&env, path, Some(limit)), &want);
        }
    }
}

#[test]
fn the_example_inventories_agree_with_each_other_and_with_ansible() {
    let env = TestEnv::new().unwrap();
    let dir = bins().workspace.join("inventories");
    let (yaml, ini) = (dir.join("example.yml"), dir.join("hosts.ini"));
    let want = ansible_list(&env, &yaml, None);
    same("example.yml", &ours(&env, &yaml, None), &want);
    same("hosts.ini against example.yml", &ours(&env, &ini, None), &want);
    same("hosts.ini", &ours(&env, &ini, Some("workers:!gpu1")), &ansible_list(&env, &ini, Some("workers:!gpu1")));
}

#[test]
fn inventory_errors_name_the_file_and_line() {
    let env = TestEnv::new().unwrap();
    let tmp = env.dir.path().display().to_string();
    let err = |path: &Path| {
        let out = env.ctl(&["inventory", "-i", path.to_str().unwrap()]).expect_code(2);
        out.stderr.replace(&tmp, "$TMP")
    };
    let path = env.write("hosts", "[web]\nw1\n[db:vars]\nx=1\n").unwrap();
    assert_eq!(
        err(&path),
        "error: $TMP/hosts:3:1: `[db:vars]` is for group `db`, which no section declares\n  hint: declare it with `[db]` (its hosts) or `[db:children]`\n"
    );
    let path = env.write("hosts2", "[web]\nw1 ansible_port=http\n").unwrap();
    assert_eq!(err(&path), "error: $TMP/hosts2:2:1: host `w1`: `ansible_port` must be a port number (1-65535)\n");
    // A variable from group_vars/ is named by its own file.
    let dir = env.dir.path().join("gv");
    write(&dir, "hosts", "[web]\nw1\n");
    write(&dir, "group_vars/web.yml", "# the port\nansible_port: many\n");
    assert_eq!(
        err(&dir.join("hosts")),
        "error: $TMP/gv/group_vars/web.yml:2:15: host `w1`: `ansible_port` must be a port number (1-65535)\n"
    );
    let script = write(env.dir.path(), "inv.sh", "#!/bin/sh\necho 'no such cloud' >&2\nexit 1\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = err(&script);
    assert!(
        text.starts_with("error: inventory script `$TMP/inv.sh` --list: it failed (exit status: 1): no such cloud\n  hint: run it yourself"),
        "{text}"
    );
}
