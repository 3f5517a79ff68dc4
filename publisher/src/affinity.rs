//! Pinning the calling thread to a core (optional everywhere: on a machine without that core the
//! thread runs unpinned and the caller logs it), and keeping threads off a core another thread
//! has to itself.

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// Pins the calling thread to `core`; false if there is no such core or the OS refused. Any
/// online core will do, whether or not the thread's current mask has it.
pub fn pin_current_thread(core: usize) -> bool {
    if core >= CpuSet::MAX_CPU {
        return false;
    }
    let mut mask = CpuSet::new();
    mask.set(core);
    sched_setaffinity(None, &mask).is_ok()
}

/// Takes `core` out of the calling thread's CPU mask, so that neither it nor the threads it
/// starts afterwards (they inherit the mask) run there. False, and the mask unchanged, when
/// `core` is not in the mask, is the only core in it, or the OS refused.
pub fn keep_off_core(core: usize) -> bool {
    let Ok(mut mask) = sched_getaffinity(None) else { return false };
    if core >= CpuSet::MAX_CPU || !mask.is_set(core) || mask.count() < 2 {
        return false;
    }
    mask.unset(core);
    sched_setaffinity(None, &mask).is_ok()
}

/// The calling thread's CPU mask as a list of cores (empty if it cannot be read).
pub fn current_cores() -> Vec<usize> {
    sched_getaffinity(None).map_or_else(|_| Vec::new(), |m| (0..CpuSet::MAX_CPU).filter(|&c| m.is_set(c)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_kept_off_a_core_hands_that_mask_to_the_threads_it_starts() {
        // On its own thread: the test harness's threads keep their masks.
        std::thread::spawn(|| {
            let before = current_cores();
            assert!(!before.is_empty(), "the mask can be read");
            let core = before[0];
            assert!(!pin_current_thread(CpuSet::MAX_CPU), "no such core");
            if before.len() < 2 {
                assert!(!keep_off_core(core), "the only core is kept");
                assert_eq!(current_cores(), before);
                return;
            }
            assert!(keep_off_core(core));
            let after = current_cores();
            assert!(!after.contains(&core));
            assert_eq!(after.len(), before.len() - 1);
            let child = std::thread::spawn(current_cores).join().unwrap();
            assert_eq!(child, after, "a thread started afterwards inherits the mask");
            assert!(!keep_off_core(core), "a core not in the mask is refused");
            assert!(pin_current_thread(core), "a core outside the mask can still be taken");
            assert_eq!(current_cores(), vec![core]);
        })
        .join()
        .unwrap();
    }
}
