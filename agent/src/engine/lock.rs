//! One deploy per stack at a time.
//!
//! A lock lives as long as the RPC that took it: when the controller goes
//! away (Ctrl-C, crash, lost connection), the call's future is dropped, the
//! guard with it, and the lock is free again. Nothing is left on disk to go
//! stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::EngineError;

#[derive(Debug, Clone)]
struct Holder {
    holder: String,
    since: String,
}

#[derive(Debug, Clone, Default)]
pub struct Locks {
    held: Arc<Mutex<HashMap<String, Holder>>>,
}

/// Releases the lock when dropped.
#[derive(Debug)]
pub struct Guard {
    locks: Locks,
    project: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.locks.held.lock().expect("not poisoned").remove(&self.project);
    }
}

impl Locks {
    /// Takes the lock of `project` for `holder`, or says who has it.
    pub fn acquire(&self, project: &str, holder: &str) -> Result<Guard, EngineError> {
        let mut held = self.held.lock().expect("not poisoned");
        if let Some(h) = held.get(project) {
            return Err(EngineError::Locked {
                project: project.to_string(),
                holder: h.holder.clone(),
                since: h.since.clone(),
            });
        }
        let since = format!("unix time {}", super::now_ms() / 1000);
        held.insert(project.to_string(), Holder { holder: holder.to_string(), since });
        Ok(Guard { locks: self.clone(), project: project.to_string() })
    }

    pub fn holder(&self, project: &str) -> Option<String> {
        self.held.lock().expect("not poisoned").get(project).map(|h| h.holder.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_told_and_drop_releases() {
        let locks = Locks::default();
        let g = locks.acquire("p", "alice@a pid 1").unwrap();
        let e = locks.acquire("p", "bob").unwrap_err().to_string();
        assert!(e.contains("alice@a pid 1"), "{e}");
        assert!(locks.acquire("other", "bob").is_ok(), "per stack");
        drop(g);
        assert!(locks.acquire("p", "bob").is_ok());
    }
}
