//! `mlops-bench-images`: an image shipped from one host's engine to
//! another's through the agents and this controller (`SaveImage` piped
//! into `LoadImage`, as a deploy to several hosts does), against
//! `docker save | docker load` between the same two engines; the peak
//! memory of the controller and both agents while it streams; and a host
//! that already has the image ID (nothing sent). Prints figures and
//! asserts nothing about time.
//!
//! The engines are two test hosts' own dockerd (never this machine's).
//! The agents run on loopback ports (mutual TLS, no SSH), and the baseline
//! pipe has no SSH either: both sides move the same bytes between the same
//! engines. Then the same image over SSH, as users move it: a deploy by
//! mlopsctl to two more test hosts (sshd, agents installed by it) against
//! `ssh a docker save | ssh b docker load`.
//! Build first: `cargo build --release -p mlopsctl -p mlops-agent -p mlops-bench`.
//! `MLOPS_BENCH_IMAGE_MB` sets the image's size (default 256).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mlops_controller::client::{AgentConn, ClientTls};
use mlops_controller::images::{self, Arrival, ImageSources, Source};
use mlops_controller::progress::Progress;
use mlops_controller::stack::{self, StackPlan};
use mlops_controller::sync::{HashCache, scan};
use mlops_controller::transport::Transport;
use mlops_e2e::{LocalAgent, TestEnv, TestHost, TestStack};
use mlops_pki::Ca;

const ROUNDS: usize = 3;

fn main() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let agent = mlops_bench::agent_binary()?;
    let mb: usize = std::env::var("MLOPS_BENCH_IMAGE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let pki = tempfile::tempdir()?;
    let ca = Ca::open_or_create(pki.path())?;
    let (host_a, host_b) = (TestHost::with_docker("bench-img-a")?, TestHost::with_docker("bench-img-b")?);
    let agent_a = LocalAgent::start_with(&agent, &ca, Some(&host_a.docker_socket()))?;
    let agent_b = LocalAgent::start_with(&agent, &ca, Some(&host_b.docker_socket()))?;
    let tls = ClientTls::new(ca.cert_pem(), "", &ca.client_identity()?)?;

    // An image of `mb` MB that does not compress (neither side compresses).
    let dir = TestStack::new("name: \"{project}\"\nservices:\n  app:\n    build: ./img\n")?;
    let img = dir.path().join("img");
    std::fs::write(img.join("Dockerfile"), "FROM scratch\nCOPY busybox /bin/busybox\nCOPY blob /blob\n")?;
    let mut blob = vec![0u8; mb << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(img.join("blob"), &blob)?;
    drop(blob);
    let loaded = mlops_compose::load(dir.path(), &mlops_compose::LoadOptions::default())?;
    let tag = loaded.stack.image_of("app");
    let plan = StackPlan {
        project: loaded.stack.project.clone(),
        stack_json: serde_json::to_string(&loaded.stack)?,
        parts: Default::default(),
        tree: Arc::new(scan(&loaded.dir, &mut HashCache::default())?),
        install_docker: false,
        health_timeout_seconds: 60,
        holder: "mlops-bench-images".into(),
        sync_only: false,
        rotating: Vec::new(),
        min_healthy_seconds: 0,
        no_rollback: false,
        deploy_id: String::new(),
        images: true,
        local_images: false,
        min_free_bytes: 0,
    };

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let progress = Progress::new(None, "bench");
        let mut a = AgentConn::connect(Arc::new(Transport::local()), agent_a.port, &tls).await?;
        let mut b = AgentConn::connect(Arc::new(Transport::local()), agent_b.port, &tls).await?;
        for conn in [&mut a, &mut b] {
            stack::sync(conn, &plan.staged_root(), &plan.tree, &progress).await?;
        }
        let start = Instant::now();
        let built = images::build(&mut a, &plan, vec![tag.clone()], &progress).await?;
        println!("image {tag} built on host a in {:.1} s", start.elapsed().as_secs_f64());
        let id = built.iter().find(|i| i.tag == tag).map(|i| i.id.clone()).unwrap_or_default();
        let wanted = images::plan(&mut b, &plan).await?;
        let key = (tag.clone(), wanted[0].context_hash.clone());
        let sources = ImageSources::new(HashMap::from([(key, Ok(Source::new("a", a.raw().clone(), id, true)))]));

        let pids = [std::process::id() as i32, agent_a.pid() as i32, agent_b.pid() as i32];
        let (mut ours, mut theirs, mut peaks) = (Vec::new(), Vec::new(), [0u64; 3]);
        let mut size = 0;
        for _ in 0..ROUNDS {
            let _ = host_b.docker_result(&["rmi", "-f", &tag]);
            let sampler = Sampler::start(pids);
            let start = Instant::now();
            let out = images::fetch(&mut b, &wanted, &sources, &progress).await?;
            ours.push(start.elapsed());
            for (peak, seen) in peaks.iter_mut().zip(sampler.stop()) {
                *peak = (*peak).max(seen);
            }
            if out[0].arrival != Arrival::Shipped {
                bail!("expected the image shipped, got {:?}", out[0]);
            }
            size = out[0].bytes;

            let _ = host_b.docker_result(&["rmi", "-f", &tag]);
            let pipe = format!(
                "docker -H unix://{} save {tag} | docker -H unix://{} load -q",
                host_a.docker_socket().display(),
                host_b.docker_socket().display()
            );
            let start = Instant::now();
            let status = std::process::Command::new("sh").args(["-c", &pipe]).status()?;
            theirs.push(start.elapsed());
            if !status.success() {
                bail!("`{pipe}` failed");
            }
        }
        let mbs = |d: &Duration| size as f64 / 1e6 / d.as_secs_f64();
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let (o, t) = (median(&mut ours), median(&mut theirs));
        println!("image tarball: {:.1} MB", size as f64 / 1e6);
        mlops_bench::report("shipped through the agents (SaveImage -> controller -> LoadImage)", &ours, ">= docker save | docker load");
        mlops_bench::report("docker save | docker load, same engines", &theirs, "baseline");
        println!(
            "throughput: agents {:.0} MB/s, docker pipe {:.0} MB/s; agents' time / pipe's time = {:.2} (target <= 1)",
            mbs(&o),
            mbs(&t),
            o.as_secs_f64() / t.as_secs_f64()
        );
        println!(
            "peak RSS while shipping: controller {:.1} MB, sending agent {:.1} MB, receiving agent {:.1} MB (image {:.0} MB)",
            peaks[0] as f64 / 1e6,
            peaks[1] as f64 / 1e6,
            peaks[2] as f64 / 1e6,
            size as f64 / 1e6
        );

        // A host that has the image under another name: tagged, nothing sent.
        host_b.docker_result(&["tag", &tag, "bench-kept:1"])?;
        let mut tagged = Vec::new();
        for _ in 0..ROUNDS {
            host_b.docker_result(&["rmi", &tag])?;
            let start = Instant::now();
            let out = images::fetch(&mut b, &wanted, &sources, &progress).await?;
            tagged.push(start.elapsed());
            if out[0].arrival != Arrival::Tagged || out[0].bytes != 0 {
                bail!("expected the image tagged with nothing sent, got {:?}", out[0]);
            }
        }
        mlops_bench::report("host already has the image ID: tagged, 0 bytes sent", &tagged, "nothing sent");
        Ok::<_, anyhow::Error>(())
    })?;
    over_ssh(&dir, &tag)
}

/// The same image between two test hosts over SSH, as users move it: a
/// deploy by mlopsctl (built on one host, streamed from its agent through
/// both SSH tunnels and this controller into the other's engine; the
/// receiving host's figures from the deploy's JSON) against
/// `ssh a docker save | ssh b docker load`, the same bytes through this
/// machine too.
fn over_ssh(stack: &TestStack, tag: &str) -> Result<()> {
    let target = mlops_bench::target_dir();
    let (mlopsctl, agent) = (target.join("release/mlopsctl"), target.join("release/mlops-agent"));
    if !mlopsctl.exists() {
        bail!("{} does not exist\n  hint: cargo build --release -p mlopsctl -p mlops-agent", mlopsctl.display());
    }
    stack.write_compose(
        "name: \"{project}\"\nservices:\n  app:\n    build: ./img\n    command: [\"/bin/busybox\", \"sleep\", \"3600\"]\n",
    )?;
    let mut env = TestEnv::with_binaries(&mlopsctl, &agent)?;
    // Builds and ships images of several hundred MB.
    env.ctl_deadline = std::time::Duration::from_secs(30 * 60);
    let (a, b) = (env.docker_host("bench-ssh-a")?, env.docker_host("bench-ssh-b")?);
    let (key, dir) = (env.key.display().to_string(), stack.path().display().to_string());
    let deploy = |hosts: &[&TestHost]| -> Result<serde_json::Value> {
        let specs: Vec<String> = hosts.iter().map(|h| h.spec("root")).collect();
        let mut args = vec!["deploy", "--identity", &key, "--stack", &dir, "--output", "json"];
        for s in &specs {
            args.extend(["--host", s.as_str()]);
        }
        let run = env.ctl(&args);
        if run.code != 0 {
            bail!("deploy failed ({}):\n{}", run.code, run.stderr);
        }
        Ok(run.json())
    };
    // Nothing of the stack on b: its container, the image and the tags
    // that keep it for revisions.
    let clear = |h: &TestHost| -> Result<()> {
        for id in h.docker_result(&["ps", "-aq"])?.split_whitespace() {
            h.docker_result(&["rm", "-f", id])?;
        }
        for id in h.docker_result(&["images", "-q", "--filter", "reference=mlops-kept"])?.split_whitespace() {
            let _ = h.docker_result(&["rmi", "-f", id]);
        }
        let _ = h.docker_result(&["rmi", "-f", tag]);
        Ok(())
    };
    deploy(&[&a])?;
    let ssh = |h: &TestHost, command: String| {
        format!(
            "ssh -T -i {} -p {} -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} root@{} '{command}'",
            env.key.display(),
            h.port,
            env.known_hosts.display(),
            h.addr
        )
    };
    let pipe = format!(
        "{} | {}",
        ssh(&a, format!("docker -H unix://{} save {tag}", a.docker_socket().display())),
        ssh(&b, format!("docker -H unix://{} load -q", b.docker_socket().display()))
    );
    let (mut ours, mut theirs, mut size) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..ROUNDS {
        clear(&b)?;
        let json = deploy(&[&a, &b])?;
        let host = json["hosts"].as_array().into_iter().flatten().find(|h| h["host"] == b.spec("root"));
        let image = host.map(|h| h["result"]["stack"]["images"][0].clone()).unwrap_or_default();
        if image["arrival"] != "shipped" {
            bail!("expected the image shipped to b, got {image}");
        }
        size = image["bytes"].as_u64().unwrap_or(0);
        ours.push(Duration::from_millis(image["ms"].as_u64().unwrap_or(0)));

        clear(&b)?;
        let start = Instant::now();
        let status = std::process::Command::new("sh").args(["-c", &pipe]).status()?;
        theirs.push(start.elapsed());
        if !status.success() {
            bail!("`{pipe}` failed");
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    mlops_bench::report(
        "over SSH: shipped by a deploy (agent -> SSH -> mlopsctl -> SSH -> agent)",
        &ours,
        ">= the ssh pipe",
    );
    mlops_bench::report("over SSH: ssh a docker save | ssh b docker load", &theirs, "baseline");
    let (o, t) = (median(&mut ours), median(&mut theirs));
    let mbs = |d: &Duration| size as f64 / 1e6 / d.as_secs_f64();
    println!(
        "over SSH: {:.1} MB; deploy {:.0} MB/s, ssh pipe {:.0} MB/s; throughput deploy / pipe = {:.2} (target >= 1)",
        size as f64 / 1e6,
        mbs(&o),
        mbs(&t),
        t.as_secs_f64() / o.as_secs_f64()
    );
    Ok(())
}

/// The largest resident set seen of each process, sampled every 10 ms.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<[u64; 3]>,
}

impl Sampler {
    fn start(pids: [i32; 3]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = [0u64; 3];
            while !flag.load(Ordering::Relaxed) {
                for (p, pid) in peak.iter_mut().zip(pids) {
                    *p = (*p).max(mlops_e2e::rss_bytes(pid).unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> [u64; 3] {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler does not panic")
    }
}
