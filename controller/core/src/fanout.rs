//! Runs one task per host, at most `forks` at once. Every host gets its
//! own result: a failure (or a panic) on one never cancels the others.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Runs `task` for every item, returning results in input order.
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
