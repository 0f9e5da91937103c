//! Which workers run, for `GET /readyz`: the app marks them, the API reads them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Which workers are running, for `GET /readyz`. A worker is marked running while its task lives (a
/// guard inside the task clears the mark even if the task panics).
#[derive(Default)]
pub struct Workers {
    running: Mutex<BTreeMap<&'static str, bool>>,
}

/// Clears a worker's mark when its task ends.
pub struct Running {
    workers: Arc<Workers>,
    name: &'static str,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.workers.set(self.name, false);
    }
}

impl Workers {
    /// Declares a worker that should run; it counts as not running until [`Self::start`].
    pub fn expect(&self, name: &'static str) {
        self.set(name, false);
    }

    /// Marks a worker running until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, name: &'static str) -> Running {
        self.set(name, true);
        Running { workers: self.clone(), name }
    }

    /// Spawns a worker's task, marked running for as long as the task lives.
    pub fn spawn<F>(self: &Arc<Self>, name: &'static str, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let running = self.start(name);
        tokio::spawn(async move {
            let _running = running;
            work.await
        })
    }

    fn set(&self, name: &'static str, running: bool) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(name, running);
    }

    /// `ok` or what is wrong, by worker.
    pub fn checks(&self) -> BTreeMap<String, String> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.iter().map(|(name, up)| (name.to_string(), if *up { "ok" } else { "not running" }.to_owned())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_whose_task_ended_is_reported() {
        let workers = Arc::new(Workers::default());
        workers.expect("poller");
        assert_eq!(workers.checks()["poller"], "not running");
        let running = workers.start("poller");
        assert_eq!(workers.checks()["poller"], "ok");
        drop(running);
        assert_eq!(workers.checks()["poller"], "not running");
    }
}
