//! Longer scheduler time slices for the threads that run inferences.
//!
//! With more inferences than cores (two inference slots per function, several stages on one
//! machine), the kernel time-slices the inference threads every millisecond or two, and each
//! switch hands the next inference caches full of another one's tensors. Linux's EEVDF
//! scheduler (6.12 and later) lets a thread ask for a longer slice (`sched_runtime` of a
//! `SCHED_OTHER` or `SCHED_BATCH` thread; no privilege needed). The threads that run tract
//! ask for [`INFERENCE_SLICE`]; a thread with the default slice, such as the runtime's
//! network threads, still runs first when it wakes, as its deadline comes sooner. Kernels
//! without custom slices ignore or refuse the request, and nothing else changes; a thread
//! under another policy (real-time, deadline, idle) is left as it is. Measured in
//! BENCHMARKS.md ("Longer time slices for inference threads").

#![allow(unsafe_code)]

use std::cell::Cell;
use std::time::Duration;

/// The slice an inference thread asks for: about one inference of a ResNet-50 stage at 2
/// stages (23–38 ms), so that two inferences sharing a core mostly run one after the other.
/// 10 and 100 ms did no better on throughput, and 100 ms raised the p99 under load.
pub const INFERENCE_SLICE: Duration = Duration::from_millis(30);

/// `struct sched_attr` as of `SCHED_ATTR_SIZE_VER0` (`linux/sched/types.h`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

const SCHED_ATTR_SIZE_VER0: u32 = 48;

/// Asks, once per thread, for [`INFERENCE_SLICE`] (see the module documentation). Called by
/// whatever thread is about to run tract: the functions' and plain tract's in `shardseal
/// bench` alike.
pub(crate) fn ask_for_long_slices() {
    thread_local!(static ASKED: Cell<bool> = const { Cell::new(false) });
    if ASKED.with(|asked| asked.replace(true)) {
        return;
    }
    if let Err(error) = set_slice(INFERENCE_SLICE) {
        tracing::debug!(%error, "this thread keeps the scheduler's default time slice");
    }
}

/// Sets this thread's slice to `slice`, keeping its policy and nice value.
fn set_slice(slice: Duration) -> std::io::Result<()> {
    let mut attr = get_attr()?;
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Ok(());
    }
    attr.size = SCHED_ATTR_SIZE_VER0;
    attr.flags = 0;
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a valid `sched_attr` of the size it states, read by the kernel only
    // during the call; pid 0 is the calling thread.
    let result =
        unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// This thread's scheduling attributes.
fn get_attr() -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: the kernel writes at most `SCHED_ATTR_SIZE_VER0` bytes into `attr`, which has
    // that size; pid 0 is the calling thread.
    let result = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            SCHED_ATTR_SIZE_VER0,
            0u32,
        )
    };
    if result == 0 {
        Ok(attr)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel that reports fair threads' slices (EEVDF), the thread gets the slice it
    /// asked for; on any kernel, its policy and nice value stay.
    #[test]
    fn a_thread_gets_the_long_slice_and_keeps_its_policy_and_nice() {
        std::thread::spawn(|| {
            // SAFETY: setpriority on the calling thread (who 0) takes no pointer.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            let before = get_attr().unwrap();
            ask_for_long_slices();
            let after = get_attr().unwrap();
            assert_eq!(after.policy, before.policy);
            assert_eq!(after.nice, 3);
            if before.runtime != 0 {
                assert_eq!(after.runtime, INFERENCE_SLICE.as_nanos() as u64);
            }
            // Asked once per thread: a changed slice is not set back.
            set_slice(Duration::from_millis(5)).unwrap();
            ask_for_long_slices();
            if before.runtime != 0 {
                assert_eq!(get_attr().unwrap().runtime, 5_000_000);
            }
        })
        .join()
        .unwrap();
    }
}
