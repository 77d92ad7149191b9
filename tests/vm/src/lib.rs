//! The VM tier's package. Its one test, `tests/vm.rs`, brings up two Debian
//! VMs (Vagrant, libvirt, QEMU; harness in `mlops_e2e::vagrant`) and drives
//! the real `mlopsctl` against them. It is a package of its own so that
//! `tests/run.sh` can run it beside the namespace tiers
//! (`cargo test --workspace --exclude mlops-vm-tier` and
//! `cargo test -p mlops-vm-tier` at once), which keeps a CI run within its
//! hour; `cargo test --workspace` runs it like any other package.
