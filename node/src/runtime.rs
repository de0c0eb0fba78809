//! The tokio runtime and process signals.

use std::future::Future;

/// Runs `f` on a multi-threaded runtime (worker count from `PDSNO_WORKER_THREADS`, else
/// the number of CPUs).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("pdsno");
    if let Some(n) = std::env::var("PDSNO_WORKER_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        b.worker_threads(n.max(1));
    }
    match b.build() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM (see [`shutdown_signal`]). Call inside the runtime.
pub fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let cancel = tokio_util::sync::CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        c.cancel();
    });
    cancel
}

/// Resolves on SIGINT or SIGTERM. SIGHUP (which would otherwise end the process) is
/// answered with a log line: nothing is reloaded yet, the node keeps running.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).ok();
        match signal(SignalKind::terminate()) {
            Ok(mut term) => loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        tracing::info!("SIGHUP: nothing to reload (restart the node to apply configuration changes); still running");
                    }
                }
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
