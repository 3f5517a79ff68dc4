//! Pinning the calling thread to a core (optional everywhere: on a machine without that core the
//! thread runs unpinned and the caller logs it).

/// Pins the calling thread to `core`; false if there is no such core or the OS refused.
pub fn pin_current_thread(core: usize) -> bool {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.id == core)
        .is_some_and(core_affinity::set_for_current)
}
