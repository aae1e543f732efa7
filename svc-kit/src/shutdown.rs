//! One shutdown signal for the whole process: SIGTERM or SIGINT cancels a token that the
//! server, background tasks and open streams all watch.

use tokio_util::sync::CancellationToken;

/// A cloneable handle on the process-wide shutdown signal.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    /// The gRPC server's drain has started: `--shutdown-delay` after the signal (at once by
    /// default). Open streams end then, not at the signal: during the delay new calls are
    /// still served, and a stream that ended at once would only be reopened in a loop.
    drain: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the handle and spawns a task that triggers it on SIGTERM or SIGINT. A second
    /// signal ends the process at once (exit status 128 + the signal's number), for an
    /// operator who will not wait for the grace period: tokio keeps its handlers installed,
    /// so without this only SIGKILL would.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let mut signals = Signals::new();
            let (signal, _) = signals.next().await;
            tracing::info!(
                signal,
                "shutdown requested (a second signal stops the process at once)"
            );
            trigger.trigger();
            let (signal, code) = signals.next().await;
            tracing::warn!(
                signal,
                "second signal: exiting without finishing the shutdown"
            );
            // No telemetry flush: an unreachable collector would hold it for its timeout.
            std::process::exit(code);
        });
        shutdown
    }

    /// Starts the shutdown (idempotent).
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has started.
    pub async fn triggered(&self) {
        self.token.cancelled().await;
    }

    /// Marks the start of the gRPC server's drain ([`crate::serve`] does, after the delay).
    pub fn start_drain(&self) {
        self.drain.cancel();
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Resolves once the drain has started: when long-lived streams should end.
    pub async fn draining(&self) {
        self.drain.cancelled().await;
    }

    /// The underlying token, for APIs that take one (e.g. `run_until_cancelled`).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// Triggers `0` if it is dropped by a panic: a worker thread that dies must stop the process
/// (so that it is restarted) rather than leave it serving stale state.
pub struct TriggerOnPanic(pub Shutdown);

impl Drop for TriggerOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("a worker thread or task panicked; shutting down");
            self.0.trigger();
        }
    }
}

/// `work`, stopping the process's `shutdown` if it panics: for background tasks whose death
/// must not leave the service serving frozen state (broker status, pushed metrics, a bus
/// worker gone quiet) as healthy. The caller exits non-zero when the task's handle reports
/// the panic.
pub async fn stop_on_panic<F: std::future::Future>(shutdown: Shutdown, work: F) -> F::Output {
    let _stop = TriggerOnPanic(shutdown);
    work.await
}

/// The process's result after its parts stopped: `Err` naming every part (`(name,
/// panicked)`) that died of a panic, so that the process exits non-zero and its supervisor
/// restarts it.
pub fn exit_after(parts: &[(&str, bool)]) -> Result<(), String> {
    let died: Vec<&str> = parts
        .iter()
        .filter(|(_, panicked)| *panicked)
        .map(|(name, _)| *name)
        .collect();
    match died.is_empty() {
        true => Ok(()),
        false => Err(format!("{} panicked", died.join(" and "))),
    }
}

/// SIGTERM and SIGINT, as they come: each with its name and the exit status it implies.
struct Signals {
    #[cfg(unix)]
    handlers: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let handlers = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            Self { handlers }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn next(&mut self) -> (&'static str, i32) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.handlers {
            return tokio::select! {
                _ = term.recv() => ("SIGTERM", 128 + 15),
                _ = int.recv() => ("SIGINT", 128 + 2),
            };
        }
        // Without signal handlers we can still stop on Ctrl-C.
        let _ = tokio::signal::ctrl_c().await;
        ("SIGINT", 128 + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard also works inside a task: a panic unwinds through the future, which drops it.
    /// A task that returns leaves the shutdown alone.
    #[tokio::test]
    async fn a_panicking_task_triggers_the_shutdown() {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(stop_on_panic(shutdown.clone(), async {
            tokio::task::yield_now().await;
            panic!("background task failure");
        }));
        assert!(task.await.unwrap_err().is_panic());
        assert!(shutdown.is_triggered());
        let calm = Shutdown::new();
        assert_eq!(stop_on_panic(calm.clone(), async { 5 }).await, 5);
        assert!(!calm.is_triggered());
    }

    #[test]
    fn the_exit_names_every_part_that_panicked() {
        assert_eq!(exit_after(&[("a", false), ("b", false)]), Ok(()));
        assert_eq!(
            exit_after(&[("the probe", true), ("b", false), ("the worker", true)]),
            Err("the probe and the worker panicked".to_string())
        );
    }

    #[test]
    fn a_panicking_worker_triggers_the_shutdown_a_returning_one_does_not() {
        let shutdown = Shutdown::new();
        let ok = shutdown.clone();
        std::thread::spawn(move || {
            let _guard = TriggerOnPanic(ok);
        })
        .join()
        .unwrap();
        assert!(!shutdown.is_triggered());
        let dying = shutdown.clone();
        let died = std::thread::spawn(move || {
            let _guard = TriggerOnPanic(dying);
            panic!("worker failure");
        })
        .join();
        assert!(died.is_err());
        assert!(shutdown.is_triggered());
    }
}
