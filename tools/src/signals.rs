//! SIGINT / SIGTERM → a stop flag that every loop polls, so ports are dropped and shared-memory
//! files removed on the way out (iceoryx2's own handler is disabled in `mdbus-bus`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};

/// A flag set on the first SIGINT or SIGTERM. A second signal terminates at once.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Order matters: the conditional shutdown fires only if the flag is already set.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))
            .context("installing signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&flag)).context("installing signal handler")?;
    }
    Ok(flag)
}

/// A flag set by each SIGHUP (reload the configuration).
pub fn reload_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&flag)).context("installing SIGHUP handler")?;
    Ok(flag)
}
