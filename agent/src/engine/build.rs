//! Image builds: the context as a tar (honouring `.dockerignore`), a hash
//! that decides whether a build is needed at all, and the base images a
//! Dockerfile names (present, pulled, or, when the stack opts in and no
//! registry answers, built from the host's Debian mirror with debootstrap).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{BuildImageOptionsBuilder, CreateImageOptionsBuilder};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use mlops_proto::ignore::Ignore;

use super::EngineError;

/// A build context, packed.
pub struct Context {
    pub tar: Vec<u8>,
    /// sha256 over the packed files, Dockerfile path, args and target.
    pub hash: String,
    pub dockerfile_text: String,
}

/// Packs `dir` (minus `.dockerignore`d paths; the Dockerfile and
/// `.dockerignore` always go, as Docker sends them) into a deterministic
/// tar: sorted, owner 0, mtime 0, so the same files give the same hash.
pub fn pack(
    dir: &Path,
    dockerfile: &str,
    args: &BTreeMap<String, String>,
    target: Option<&str>,
) -> Result<Context, EngineError> {
    pack_with(dir, dockerfile, args, target, &[])
}

/// The host's CA bundle, as `x-mlops.host_ca_bundle` adds it to contexts.
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const HOST_CA_IN_CONTEXT: &str = ".mlops/host-ca.crt";

/// [`pack`], plus `extra` files (name in the context, contents).
pub fn pack_with(
    dir: &Path,
    dockerfile: &str,
    args: &BTreeMap<String, String>,
    target: Option<&str>,
    extra: &[(String, Vec<u8>)],
) -> Result<Context, EngineError> {
    let ignore_path = dir.join(".dockerignore");
    let ignore = Ignore::parse(&std::fs::read_to_string(&ignore_path).unwrap_or_default())
        .map_err(|e| failed("", format!("{}: {e}", ignore_path.display()), ""))?;
    let dockerfile_path = dir.join(dockerfile);
    let dockerfile_text = std::fs::read_to_string(&dockerfile_path)
        .map_err(|e| failed("", format!("cannot read Dockerfile {}: {e}", dockerfile_path.display()), ""))?;
    let mut files = Vec::new();
    walk(dir, dir, &ignore, dockerfile, &mut files)?;
    files.sort();
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    for rel in &files {
        let full = dir.join(rel);
        builder.append_path_with_name(&full, rel).map_err(EngineError::io_at("packing", &full))?;
    }
    for (name, data) in extra {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, name, &data[..]).map_err(EngineError::io(format!("packing {name}")))?;
    }
    let tar = builder.into_inner().map_err(EngineError::io("packing the build context"))?;
    let mut h = Sha256::new();
    h.update(&tar);
    h.update(dockerfile.as_bytes());
    for (k, v) in args {
        h.update(format!("\0{k}={v}").as_bytes());
    }
    h.update(format!("\0target={}", target.unwrap_or("")).as_bytes());
    Ok(Context { tar, hash: hex::encode(h.finalize()), dockerfile_text })
}

fn walk(root: &Path, dir: &Path, ignore: &Ignore, dockerfile: &str, out: &mut Vec<PathBuf>) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(dir).map_err(EngineError::io_at("reading", dir))?;
    for entry in entries {
        let entry = entry.map_err(EngineError::io_at("reading", dir))?;
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("below the root").to_path_buf();
        let rel_s = rel.to_string_lossy().replace('\\', "/");
        let always = rel_s == dockerfile || rel_s == ".dockerignore";
        let file_type = entry.file_type().map_err(EngineError::io_at("reading", &path))?;
        if file_type.is_dir() {
            // A directory is walked even when excluded: `!` rules may re-include below it.
            walk(root, &path, ignore, dockerfile, out)?;
            if !ignore.excluded(&rel_s) {
                out.push(rel);
            }
        } else if always || !ignore.excluded(&rel_s) {
            out.push(rel);
        }
    }
    Ok(())
}

/// The base images of a Dockerfile: every `FROM` that is not `scratch` or
/// an earlier stage, with `ARG`s (declared before the first `FROM`, with
/// defaults, overridden by build args) substituted.
pub fn base_images(dockerfile: &str, args: &BTreeMap<String, String>) -> Vec<String> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut seen_from = false;
    // Join continuation lines.
    let text = dockerfile.replace("\\\n", " ");
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        let Some(instr) = words.next() else { continue };
        match instr.to_ascii_uppercase().as_str() {
            "ARG" if !seen_from => {
                if let Some(decl) = words.next() {
                    let (k, v) = decl.split_once('=').map_or((decl, ""), |(k, v)| (k, v));
                    let v = args.get(k).cloned().unwrap_or_else(|| v.trim_matches('"').to_string());
                    vars.insert(k.to_string(), v);
                }
            }
            "FROM" => {
                seen_from = true;
                let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                let Some(image) = rest.first() else { continue };
                let mut image = image.to_string();
                for (k, v) in &vars {
                    image = image.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
                }
                if let [_, as_kw, name] = rest.as_slice()
                    && as_kw.eq_ignore_ascii_case("as")
                {
                    stages.push(name.to_lowercase());
                }
                if image != "scratch" && !stages.contains(&image.to_lowercase()) && !out.contains(&image) {
                    out.push(image);
                }
            }
            _ => {}
        }
    }
    out
}

/// Makes sure `image` is present: already there; or, with `bootstrap` and
/// a `debian:<suite>[-slim]` name, built from the host's Debian mirror
/// (no registry is tried: the option exists for hosts without one); or
/// pulled. `say` reports progress.
pub async fn ensure_base(
    docker: &Docker,
    image: &str,
    bootstrap: bool,
    say: &(dyn Fn(String) + Sync),
) -> Result<(), EngineError> {
    if docker.inspect_image(image).await.is_ok() {
        return Ok(());
    }
    if bootstrap && let Some(suite) = debian_suite(image) {
        say(format!("base image {image} is not here; building it with debootstrap from this host's Debian mirror"));
        return debootstrap_image(docker, image, &suite, say).await;
    }
    say(format!("pulling base image {image}"));
    pull(docker, image).await.map_err(|e| {
        let why = match e {
            EngineError::ImageMissing { message, .. } => message,
            other => other.to_string(),
        };
        failed(
            image,
            if bootstrap {
                format!("the base image is not on this host and cannot be pulled ({why}); debootstrap can only make debian:<suite> images")
            } else {
                format!(
                    "the base image is not on this host and cannot be pulled ({why}); load it with `docker load`, or set `x-mlops: {{bootstrap_base_images: true}}` to build Debian bases from the host's mirror"
                )
            },
            "",
        )
    })
}

/// Pulls `image` (`name[:tag]`, default tag `latest`).
pub async fn pull(docker: &Docker, image: &str) -> Result<(), EngineError> {
    let (name, tag) = split_tag(image);
    let options = CreateImageOptionsBuilder::new().from_image(name).tag(tag).build();
    let mut stream = docker.create_image(Some(options), None, None);
    let missing =
        |message: String| EngineError::ImageMissing { service: String::new(), image: image.to_string(), message };
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| missing(e.to_string()))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(missing(err));
        }
    }
    Ok(())
}

pub fn split_tag(image: &str) -> (&str, &str) {
    // The tag follows the last `:` after the last `/` (a registry port is not a tag).
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (&image[..slash + i], &image[slash + i + 1..]),
        None => (image, "latest"),
    }
}

/// `debian:bookworm`, `debian:bookworm-slim`, `docker.io/library/debian:12` → the suite.
fn debian_suite(image: &str) -> Option<String> {
    let (name, tag) = split_tag(image);
    let name = name.trim_start_matches("docker.io/").trim_start_matches("library/");
    if name != "debian" {
        return None;
    }
    let tag = tag.trim_end_matches("-slim");
    Some(match tag {
        "12" | "stable" | "latest" => "bookworm".to_string(),
        "11" => "bullseye".to_string(),
        "13" => "trixie".to_string(),
        t if t.chars().all(|c| c.is_ascii_lowercase()) => t.to_string(),
        _ => return None,
    })
}

/// The host's Debian mirror, from apt's sources.
pub fn debian_mirror() -> Option<String> {
    let deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next())
        .map(str::to_string);
    from_deb822.or_else(|| {
        std::fs::read_to_string("/etc/apt/sources.list").ok()?.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "deb").then(|| w.find(|x| x.starts_with("http")).map(str::to_string)).flatten()
        })
    })
}

async fn debootstrap_image(
    docker: &Docker,
    image: &str,
    suite: &str,
    say: &(dyn Fn(String) + Sync),
) -> Result<(), EngineError> {
    let mirror =
        debian_mirror().ok_or_else(|| failed(image, "no Debian mirror found in /etc/apt/sources.list(.d)", ""))?;
    if !Path::new("/usr/sbin/debootstrap").exists() {
        say("installing debootstrap".into());
        let out = tokio::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "debootstrap"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .await
            .map_err(EngineError::io("running apt-get"))?;
        if !out.status.success() {
            return Err(failed(image, "installing debootstrap failed", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    let dir = std::env::temp_dir().join(format!("mlops-debootstrap-{}-{}", suite, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    say(format!("debootstrap --variant=minbase {suite} from {mirror} (about a minute)"));
    let out = tokio::process::Command::new("debootstrap")
        .args(["--variant=minbase", suite])
        .arg(&dir)
        .arg(&mirror)
        .output()
        .await
        .map_err(EngineError::io("running debootstrap"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        // debootstrap says why on stdout or stderr, depending on the step.
        let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let why: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let why = why[why.len().saturating_sub(3)..].join(" | ");
        return Err(failed(image, format!("debootstrap {suite} from {mirror} failed"), why));
    }
    say(format!("importing {image}"));
    let tar_dir = dir.clone();
    let tar = tokio::task::spawn_blocking(move || {
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", &tar_dir)?;
        b.into_inner()
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r)
    .map_err(EngineError::io("packing the debootstrap tree"));
    let _ = std::fs::remove_dir_all(&dir);
    let tar = tar?;
    let (name, tag) = split_tag(image);
    // Import through `POST /images/create?fromSrc=-` with repo and tag.
    let create = CreateImageOptionsBuilder::new().from_src("-").repo(name).tag(tag).build();
    let mut stream = docker.create_image(Some(create), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = stream.next().await {
        let info = item?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(failed(image, format!("importing the debootstrap tree: {err}"), ""));
        }
    }
    docker
        .inspect_image(image)
        .await
        .map_err(|e| failed(image, format!("imported, but it cannot be inspected: {e}"), ""))?;
    Ok(())
}

/// A build failure (the service is named by the caller, see
/// [`EngineError::in_service`]).
fn failed(image: &str, message: impl Into<String>, output: impl Into<String>) -> EngineError {
    EngineError::BuildFailed {
        service: String::new(),
        image: image.to_string(),
        message: message.into(),
        output: output.into(),
    }
}

/// What to build: the tag, and the build's parameters.
pub struct BuildSpec<'a> {
    pub tag: &'a str,
    pub dockerfile: &'a str,
    pub args: &'a BTreeMap<String, String>,
    pub target: Option<&'a str>,
    pub labels: BTreeMap<String, String>,
}

/// Builds `spec.tag` from a packed context; returns the image ID.
pub async fn build(
    docker: &Docker,
    spec: BuildSpec<'_>,
    ctx: Context,
    say: &(dyn Fn(String) + Sync),
) -> Result<String, EngineError> {
    let BuildSpec { tag, dockerfile, args, target, labels } = spec;
    let buildargs: std::collections::HashMap<String, String> = args.clone().into_iter().collect();
    let labels: std::collections::HashMap<String, String> = labels.into_iter().collect();
    let mut options = BuildImageOptionsBuilder::new()
        .dockerfile(dockerfile)
        .t(tag)
        .rm(true)
        .forcerm(true)
        .buildargs(&buildargs)
        .labels(&labels);
    if let Some(t) = target {
        options = options.target(t);
    }
    let mut stream = docker.build_image(options.build(), None, Some(bollard::body_full(ctx.tar.into())));
    let mut tail: Vec<String> = Vec::new();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| failed(tag, e.to_string(), tail.join(" | ")))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(failed(tag, err.trim(), tail.join(" | ")));
        }
        if let Some(line) = info.stream {
            let line = line.trim_end().to_string();
            if line.starts_with("Step ") {
                say(line.clone());
            }
            if !line.is_empty() {
                tail.push(line);
                if tail.len() > 8 {
                    tail.remove(0);
                }
            }
        }
    }
    let inspect = docker.inspect_image(tag).await?;
    inspect.id.ok_or_else(|| failed(tag, "the built image has no ID", ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_images_with_args_and_stages() {
        let df = "ARG BASE=debian:bookworm-slim\nARG TAG\nFROM ${BASE} AS builder\nRUN x\nFROM --platform=linux/amd64 builder\nFROM scratch\nFROM python:$TAG\n";
        let args = [("TAG".to_string(), "3.11".to_string())].into();
        assert_eq!(base_images(df, &args), ["debian:bookworm-slim", "python:3.11"]);
    }

    #[test]
    fn tags_and_suites() {
        assert_eq!(split_tag("debian:bookworm"), ("debian", "bookworm"));
        assert_eq!(split_tag("localhost:5000/x"), ("localhost:5000/x", "latest"));
        assert_eq!(debian_suite("debian:bookworm-slim").as_deref(), Some("bookworm"));
        assert_eq!(debian_suite("debian:12").as_deref(), Some("bookworm"));
        assert_eq!(debian_suite("ubuntu:22.04"), None);
    }

    #[test]
    fn packing_is_deterministic_and_ignores() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(d.join(".dockerignore"), "*.tmp\n").unwrap();
        std::fs::write(d.join("a.txt"), "a").unwrap();
        std::fs::write(d.join("b.tmp"), "b").unwrap();
        let one = pack(d, "Dockerfile", &BTreeMap::new(), None).unwrap();
        let two = pack(d, "Dockerfile", &BTreeMap::new(), None).unwrap();
        assert_eq!(one.hash, two.hash);
        let names: Vec<String> = tar::Archive::new(&one.tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"a.txt".to_string()) && !names.contains(&"b.tmp".to_string()), "{names:?}");
        std::fs::write(d.join("b.tmp"), "changed").unwrap();
        assert_eq!(pack(d, "Dockerfile", &BTreeMap::new(), None).unwrap().hash, one.hash, "ignored files do not count");
        std::fs::write(d.join("a.txt"), "changed").unwrap();
        assert_ne!(pack(d, "Dockerfile", &BTreeMap::new(), None).unwrap().hash, one.hash);
        let args = [("X".to_string(), "1".to_string())].into();
        assert_ne!(pack(d, "Dockerfile", &args, None).unwrap().hash, one.hash);
    }
}
#[cfg(test)]
#[test]
fn extra_files_are_in_the_context() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let ctx = pack_with(
        dir.path(),
        "Dockerfile",
        &BTreeMap::new(),
        None,
        &[(HOST_CA_IN_CONTEXT.to_string(), b"CA".to_vec())],
    )
    .unwrap();
    let mut names = Vec::new();
    for e in tar::Archive::new(&ctx.tar[..]).entries().unwrap() {
        let e = e.unwrap();
        names.push((e.path().unwrap().display().to_string(), e.header().entry_type().as_byte()));
    }
    assert!(names.iter().any(|(n, _)| n == ".mlops/host-ca.crt"), "{names:?}");
}
