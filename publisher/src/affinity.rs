//! Pinning the calling thread to a core (optional everywhere: on a machine without that core the
//! thread runs unpinned and the caller logs it).

use rustix::thread::{sched_setaffinity, CpuSet};

/// Pins the calling thread to `core`; false if there is no such core or the OS refused. Any
/// online core will do, whether or not the thread's current mask has it. Threads the caller
/// starts afterwards inherit the one-core mask: pin after starting them.
pub fn pin_current_thread(core: usize) -> bool {
    if core >= CpuSet::MAX_CPU {
        return false;
    }
    let mut mask = CpuSet::new();
    mask.set(core);
    sched_setaffinity(None, &mask).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::thread::sched_getaffinity;

    /// The calling thread's CPU mask as a list of cores.
    fn current_cores() -> Vec<usize> {
        let mask = sched_getaffinity(None).unwrap();
        (0..CpuSet::MAX_CPU).filter(|&c| mask.is_set(c)).collect()
    }

    #[test]
    fn a_pinned_thread_runs_on_its_core_and_hands_that_mask_to_the_threads_it_starts() {
        // On its own thread: the test harness's threads keep their masks.
        std::thread::spawn(|| {
            let before = current_cores();
            assert!(!before.is_empty(), "the mask can be read");
            let core = *before.last().unwrap();
            let started_before = std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                current_cores()
            });
            assert!(!pin_current_thread(CpuSet::MAX_CPU), "no such core");
            assert!(pin_current_thread(core));
            assert_eq!(current_cores(), vec![core]);
            assert_eq!(std::thread::spawn(current_cores).join().unwrap(), vec![core], "inherited");
            assert_eq!(started_before.join().unwrap(), before, "a thread started earlier keeps its mask");
        })
        .join()
        .unwrap();
    }
}
