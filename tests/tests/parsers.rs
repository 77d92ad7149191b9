//! The readers of untrusted text never panic, and every refusal says where
//! (see `mlops_e2e::fuzz`): a few thousand random and mutated inputs per
//! reader here; `cargo run --release -p mlops-bench --bin mlops-fuzz`
//! runs them for as long as asked.

#[test]
fn readers_never_panic_and_say_where_they_refuse() {
    let mut out = Vec::new();
    let clean = mlops_e2e::fuzz::report(20261128, 3000, None, &mut out);
    let text = String::from_utf8_lossy(&out);
    eprintln!("{text}");
    assert!(clean, "{text}");
    // Every reader both accepted and refused some inputs: the mutations
    // reach past the first syntax check.
    for line in text.lines().filter(|l| l.contains(" inputs in ")) {
        if line.starts_with("compose") || line.starts_with("inventory") || line.starts_with("sync manifest") {
            assert!(!line.contains(" 0 accepted") && !line.contains(" 0 refused"), "{line}");
        }
    }
}
