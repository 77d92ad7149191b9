//! Runs one task per host, at most `forks` at once. Every host gets its
//! own result: a failure (or a panic) on one never cancels the others.
//! [`per_host`] is what every command uses; [`run`] is the bare pool.

use std::future::Future;
use std::sync::Arc;

use mlops_inventory::Target;
use tokio::sync::Semaphore;

use crate::ControllerError;
use crate::bootstrap::Context;
use crate::progress::{Progress, Report, Step};

/// Runs `task` for every item, returning results in input order; a task
/// that panicked gets `Err` with a sentence saying so.
pub async fn run<T, R, F, Fut>(items: Vec<T>, forks: usize, task: F) -> Vec<Result<R, String>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(forks.max(1)));
    let task = Arc::new(task);
    let handles: Vec<_> = items
        .into_iter()
        .map(|item| {
            let limit = limit.clone();
            let task = task.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await.expect("never closed");
                task(item).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.map_err(|e| {
            if e.is_panic() { "the host task panicked (a bug in mlopsctl)".to_string() } else { e.to_string() }
        }));
    }
    out
}

/// What a command did on each host: successes and failures, by host name,
/// in target order.
#[derive(Debug)]
pub struct HostResults<R> {
    pub ok: Vec<(String, R)>,
    pub failed: Vec<(String, ControllerError)>,
}

impl<R> HostResults<R> {
    pub fn len(&self) -> usize {
        self.ok.len() + self.failed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `task` on every target, at most `forks` at once, each with its own
/// [`Progress`] (a failure is reported as the host's last step), and sorts
/// the results into successes and failures.
pub async fn per_host<R, F, Fut>(
    targets: &[Target],
    forks: usize,
    ctx: &Arc<Context>,
    report: &Arc<dyn Report>,
    task: F,
) -> HostResults<R>
where
    R: Send + 'static,
    F: Fn(Target, Arc<Context>, Progress) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, ControllerError>> + Send + 'static,
{
    let items = targets.iter().map(|t| (t.clone(), ())).collect();
    per_host_with(items, forks, ctx, report, move |target, (), ctx, progress| task(target, ctx, progress)).await
}

/// [`per_host`] where each host brings something of its own (such as the
/// connection an earlier fan-out left open).
pub async fn per_host_with<T, R, F, Fut>(
    items: Vec<(Target, T)>,
    forks: usize,
    ctx: &Arc<Context>,
    report: &Arc<dyn Report>,
    task: F,
) -> HostResults<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Target, T, Arc<Context>, Progress) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, ControllerError>> + Send + 'static,
{
    let (ctx, report) = (ctx.clone(), report.clone());
    let names: Vec<String> = items.iter().map(|(t, _)| t.name.clone()).collect();
    let results = run(items, forks, move |(target, item): (Target, T)| {
        let progress = Progress::new(Some(report.clone()), &target.name);
        let fut = task(target, item, ctx.clone(), progress.clone());
        async move {
            let r = fut.await;
            match &r {
                Ok(_) => progress.step(Step::Done),
                Err(e) => progress.step(Step::Failed { message: e.to_string() }),
            }
            r
        }
    })
    .await;
    let mut out = HostResults { ok: Vec::new(), failed: Vec::new() };
    for (name, r) in names.into_iter().zip(results) {
        match r {
            Ok(Ok(o)) => out.ok.push((name, o)),
            Ok(Err(e)) => out.failed.push((name, e)),
            Err(panic) => out.failed.push((name, ControllerError::Local(panic))),
        }
    }
    out
}

impl<R> HostResults<R> {
    /// Both lists in the order of `targets` (after results were merged
    /// from more than one fan-out).
    pub fn sort_by_targets(&mut self, targets: &[Target]) {
        let index = |name: &str| targets.iter().position(|t| t.name == name).unwrap_or(usize::MAX);
        self.ok.sort_by_key(|(n, _)| index(n));
        self.failed.sort_by_key(|(n, _)| index(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn bounded_parallelism_and_order() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let out = run((0..10).collect(), 3, move |i: u32| {
            let (r, p) = (r.clone(), p.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await;
        assert_eq!(out.into_iter().map(Result::unwrap).collect::<Vec<_>>(), (0..10).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_panic_stays_with_its_host() {
        let out = run(vec![1, 2, 3], 2, |i: u32| async move {
            assert!(i != 2, "boom");
            i
        })
        .await;
        assert!(out[0].is_ok() && out[2].is_ok());
        assert!(out[1].as_ref().unwrap_err().contains("panicked"));
    }
}
