//! Waiting for the signals that end a process: SIGTERM (Kubernetes) and SIGINT (a terminal).

use tokio::signal::unix::{signal, SignalKind};

/// Completes on the first SIGTERM or SIGINT. Returns the signal's name.
pub async fn terminate() -> &'static str {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; running until killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
