//! File sync between the controller library and the real agent (on a
//! loopback port, mutual TLS; no SSH needed for what is tested here).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mlops_controller::client::{AgentConn, ClientTls};
use mlops_controller::progress::Progress;
use mlops_controller::stack;
use mlops_controller::sync::{HashCache, LocalTree, scan};
use mlops_controller::transport::Transport;
use mlops_e2e::{LocalAgent, bins};
use mlops_pki::Ca;
use mlops_proto::v1::{SyncChunk, SyncCommitRequest, SyncEntry, SyncManifest};
use proptest::prelude::*;

struct Fixture {
    agent: LocalAgent,
    tls: ClientTls,
    _pki: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::open_or_create(pki.path()).unwrap();
    let agent = LocalAgent::start(&bins().agent, &ca).unwrap();
    let tls = ClientTls::new(ca.cert_pem(), "", &ca.client_identity().unwrap()).unwrap();
    Fixture { agent, tls, _pki: pki }
}

async fn connect(f: &Fixture) -> AgentConn {
    AgentConn::connect(Arc::new(Transport::local()), f.agent.port, &f.tls).await.unwrap()
}

fn scan_dir(dir: &Path) -> Arc<LocalTree> {
    Arc::new(scan(dir, &mut HashCache::default()).unwrap())
}

/// Every entry below `dir`: path -> (kind, content or link target, mode).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (char, Vec<u8>, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (char, Vec<u8>, u32)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.file_type().is_symlink() {
                out.insert(rel, ('l', std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes(), 0));
            } else if meta.is_dir() {
                out.insert(rel, ('d', Vec::new(), mode));
                walk(root, &p, out);
            } else {
                out.insert(rel, ('f', std::fs::read(&p).unwrap(), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Writes a tree: `files` (path -> content, executable), plus a symlink to
/// the first top-level file.
fn write_tree(dir: &Path, files: &BTreeMap<String, (Vec<u8>, bool)>) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    // A path that another path lies below must be a directory, not a file.
    let keep: Vec<(&String, &(Vec<u8>, bool))> =
        files.iter().filter(|(p, _)| !files.keys().any(|o| o.starts_with(&format!("{p}/")))).collect();
    for (p, (data, exec)) in &keep {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(if *exec { 0o755 } else { 0o644 })).unwrap();
    }
    if let Some((p, _)) = keep.iter().find(|(p, _)| !p.contains('/'))
        && !dir.join("lnk").exists()
    {
        std::os::unix::fs::symlink(p.as_str(), dir.join("lnk")).unwrap();
    }
}

fn tree_strategy() -> impl Strategy<Value = BTreeMap<String, (Vec<u8>, bool)>> {
    prop::collection::btree_map(
        "[a-c]{1,2}(/[a-c]{1,2}){0,2}",
        (prop::collection::vec(any::<u8>(), 0..3000), any::<bool>()),
        0..20,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Any tree, synced, is the same tree on the host; and any second tree
    /// synced over it replaces it exactly (changes, additions, removals).
    #[test]
    fn synced_trees_are_identical(first in tree_strategy(), second in tree_strategy()) {
        let f = fixture();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let src = tempfile::tempdir().unwrap();
        let local = src.path().join("tree");
        let remote = f.agent.state.join("trees/prop");
        rt.block_on(async {
            let mut conn = connect(&f).await;
            for files in [&first, &second] {
                write_tree(&local, files);
                let tree = scan_dir(&local);
                let out = stack::sync(&mut conn, "prop", &tree, &Progress::silent("prop")).await.unwrap();
                prop_assert_eq!(snapshot(&local), snapshot(&remote));
                prop_assert_eq!(out.files, tree.entries.iter().filter(|e| !e.is_dir).count());
            }
            // Nothing changed: nothing sent, nothing written.
            let again = stack::sync(&mut conn, "prop", &scan_dir(&local), &Progress::silent("prop")).await.unwrap();
            prop_assert_eq!((again.uploaded_bytes, again.written, again.removed), (0, 0, 0));
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn an_interrupted_sync_leaves_the_old_tree_and_the_next_one_completes_it() {
    let f = fixture();
    let mut conn = connect(&f).await;
    let src = tempfile::tempdir().unwrap();
    let local = src.path().join("t");
    let old: BTreeMap<String, (Vec<u8>, bool)> = [("keep.txt".to_string(), (b"old".to_vec(), false))].into();
    write_tree(&local, &old);
    stack::sync(&mut conn, "intr", &scan_dir(&local), &Progress::silent("intr")).await.unwrap();
    let remote = f.agent.state.join("trees/intr");
    let before = snapshot(&remote);

    // A new version with 10 files; the upload stops after 4 of them, as when
    // the controller is killed, and no commit follows.
    let new: BTreeMap<String, (Vec<u8>, bool)> =
        (0..10).map(|i| (format!("f{i}"), (vec![i as u8; 100_000 + i], false))).collect();
    write_tree(&local, &new);
    let tree = scan_dir(&local);
    let plan = conn.raw().sync_begin(tree.manifest("intr")).await.unwrap().into_inner();
    assert_eq!(plan.missing.len(), 10);
    let partial: Vec<String> = plan.missing[..4].to_vec();
    let chunks = tree.chunks(plan.sync_id.clone(), partial);
    conn.raw().sync_upload(tokio_stream::wrappers::ReceiverStream::new(chunks)).await.unwrap();
    assert_eq!(snapshot(&remote), before, "the tree did not change");

    // The next sync sends only what is missing and completes the tree.
    let out = stack::sync(&mut conn, "intr", &tree, &Progress::silent("intr")).await.unwrap();
    assert_eq!(out.uploaded_blobs, 6, "the 4 blobs already sent are not sent again");
    assert_eq!(snapshot(&remote), snapshot(&local));
}

#[tokio::test]
async fn traversal_and_bad_uploads_are_refused() {
    let f = fixture();
    let mut conn = connect(&f).await;
    let sha = "a".repeat(64);
    let file =
        |path: &str| SyncEntry { path: path.into(), size: 1, mode: 0o644, sha256: sha.clone(), ..Default::default() };
    let link =
        |path: &str, target: &str| SyncEntry { path: path.into(), symlink_target: target.into(), ..Default::default() };
    let cases = [
        ("root", vec![file("../escape")]),
        ("root", vec![file("/etc/passwd")]),
        ("root", vec![file("a/../../x")]),
        ("root", vec![link("l", "/etc")]),
        ("root", vec![link("d/l", "../../x")]),
        ("root", vec![link("l", "sub"), file("l/x")]),
        ("../root", vec![file("x")]),
        ("root", vec![SyncEntry { sha256: "not-a-hash".into(), ..file("x") }]),
    ];
    for (root, entries) in cases {
        let what = format!("{root} {entries:?}");
        let err = conn.raw().sync_begin(SyncManifest { root: root.into(), entries }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
    }
    assert!(!f.agent.state.join("trees/root").exists(), "nothing was written");
    assert!(!f.agent.state.join("escape").exists());

    // Data that does not match its hash is refused; a commit without the
    // data changes nothing.
    let plan = conn
        .raw()
        .sync_begin(SyncManifest { root: "root".into(), entries: vec![file("x")] })
        .await
        .unwrap()
        .into_inner();
    let bad = SyncChunk { sync_id: plan.sync_id.clone(), sha256: sha.clone(), offset: 0, data: b"z".to_vec() };
    let err = conn.raw().sync_upload(tokio_stream::iter([bad])).await.unwrap_err();
    assert!(err.message().contains("hashes to"), "{err}");
    let err = conn.raw().sync_commit(SyncCommitRequest { sync_id: plan.sync_id }).await.unwrap_err();
    assert!(err.message().contains("were not uploaded"), "{err}");
    assert!(!f.agent.state.join("trees/root/x").exists());
}
