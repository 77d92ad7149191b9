//! One deploy per stack at a time.
//!
//! A lock lives as long as the work that took it, in memory: nothing is
//! left on disk to go stale. Most work stops when its controller goes away
//! (Ctrl-C, crash, lost connection), and the lock is free at once. A
//! converge does not stop half-way (that would leave the host between two
//! revisions): it finishes, or returns to the last revision, on its own,
//! and its lock is marked [`Locks::orphan`]ed meanwhile. The next deploy
//! waits for such a lock instead of failing ([`Locks::acquire_after_orphan`]):
//! a dead controller's lock never blocks the next run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::EngineError;

#[derive(Debug, Clone)]
struct Holder {
    holder: String,
    since: String,
    /// Its controller went away; the work finishes on its own.
    orphaned: bool,
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
        held.insert(project.to_string(), Holder { holder: holder.to_string(), since, orphaned: false });
        Ok(Guard { locks: self.clone(), project: project.to_string() })
    }

    /// Marks the lock of `project` as held by work whose controller went away.
    pub fn orphan(&self, project: &str) {
        if let Some(h) = self.held.lock().expect("not poisoned").get_mut(project) {
            h.orphaned = true;
        }
    }

    /// Like [`Self::acquire`], but a lock held by orphaned work is waited
    /// for (up to `patience`; `waiting` is told once, with its holder).
    pub async fn acquire_after_orphan(
        &self,
        project: &str,
        holder: &str,
        patience: std::time::Duration,
        waiting: impl FnOnce(&str),
    ) -> Result<Guard, EngineError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut waiting = Some(waiting);
        loop {
            match self.acquire(project, holder) {
                Err(EngineError::Locked { holder: other, .. })
                    if self.is_orphaned(project) && tokio::time::Instant::now() < deadline =>
                {
                    if let Some(say) = waiting.take() {
                        say(&other);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// [`Self::acquire`], but `Ok(None)` when orphaned work holds the lock
    /// (to be waited for with [`Self::acquire_after_orphan`]).
    pub fn try_acquire(&self, project: &str, holder: &str) -> Result<Option<Guard>, EngineError> {
        match self.acquire(project, holder) {
            Ok(g) => Ok(Some(g)),
            Err(EngineError::Locked { .. }) if self.is_orphaned(project) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn is_orphaned(&self, project: &str) -> bool {
        self.held.lock().expect("not poisoned").get(project).is_some_and(|h| h.orphaned)
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

    #[tokio::test]
    async fn orphaned_work_is_waited_for_live_work_is_not() {
        let locks = Locks::default();
        let g = locks.acquire("p", "alice").unwrap();
        let patience = std::time::Duration::from_secs(5);
        let e = locks.acquire_after_orphan("p", "bob", patience, |_| {}).await.unwrap_err();
        assert!(e.to_string().contains("alice"), "a live holder is named at once: {e}");
        locks.orphan("p");
        let release = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            drop(g);
        };
        let mut told = String::new();
        let (got, ()) =
            tokio::join!(locks.acquire_after_orphan("p", "bob", patience, |h| told = h.to_string()), release);
        assert!(got.is_ok());
        assert_eq!(told, "alice");
        assert_eq!(locks.holder("p").as_deref(), Some("bob"));
    }
}
