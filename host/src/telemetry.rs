//! Logging of the host itself (not of plugins: their logs go into run records).

use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `TRELLIS_LOG` (e.g. `info`, `trellis=debug`);
/// warnings and errors by default.
pub fn init() {
    let filter = EnvFilter::try_from_env("TRELLIS_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
