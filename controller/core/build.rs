//! Embeds the platform bundle (`platform/`: compose.yaml, Dockerfiles,
//! configs, DAGs) into the controller library (and so into `mlopsctl`), so
//! that `mlopsctl deploy` needs nothing but the binary. The exporter crate's sources stay out: only its
//! Dockerfile belongs to the bundle.

use std::fmt::Write;
use std::path::{Path, PathBuf};

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("platform/ is readable").flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        if rel.starts_with("exporter/") && rel != "exporter/Dockerfile" || rel.contains("__pycache__") {
            continue;
        }
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.join("../../platform").canonicalize().expect("platform/ exists beside controller/");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    let mut code = String::from(
        "/// The platform bundle: (path, executable, contents).\npub static BUNDLE: &[(&str, bool, &[u8])] = &[\n",
    );
    for f in &files {
        use std::os::unix::fs::PermissionsExt;
        println!("cargo:rerun-if-changed={}", f.display());
        let rel = f.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        let exec = std::fs::metadata(f).unwrap().permissions().mode() & 0o111 != 0;
        writeln!(code, "    ({rel:?}, {exec}, include_bytes!({:?})),", f.display().to_string()).unwrap();
    }
    code.push_str("];\n");
    std::fs::write(PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("bundle.rs"), code).unwrap();
}
