//! Longer scheduler time slices for the threads that run inferences.
//!
//! With more inferences than cores (two inference slots per function, several stages on one
//! machine), the kernel time-slices the inference threads every millisecond or two, and each
//! switch hands the next inference caches full of another one's tensors. Linux's EEVDF
//! scheduler (6.12 and later) lets a thread ask for a longer slice (`sched_runtime` of a
//! `SCHED_OTHER` or `SCHED_BATCH` thread; no privilege needed). A thread holds
//! [`INFERENCE_SLICE`] while it runs tract ([`LongSlice`]); a thread with the default
//! slice, such as the runtime's network threads, still runs first when it wakes, as its
//! deadline comes sooner. Kernels without custom slices ignore or refuse the request, and
//! nothing else changes; a thread under another policy (real-time, deadline, idle) is left
//! as it is. Measured in BENCHMARKS.md ("Longer time slices for inference threads").

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

/// The calling thread's long slice while this lives (see the module documentation): asked
/// for right before tract runs and given back right after, so that the thread wakes for its
/// next job (opening a request, say) with the default slice and is not kept waiting behind
/// the thread that woke it. Plain tract in `shardseal bench` holds one the same way.
pub(crate) struct LongSlice {
    held: bool,
}

impl LongSlice {
    /// Asks for [`INFERENCE_SLICE`]. A thread whose request was refused once does not ask
    /// again.
    pub(crate) fn hold() -> Self {
        thread_local!(static REFUSED: Cell<bool> = const { Cell::new(false) });
        if REFUSED.with(Cell::get) {
            return Self { held: false };
        }
        match set_slice(INFERENCE_SLICE) {
            Ok(held) => Self { held },
            Err(error) => {
                REFUSED.with(|refused| refused.set(true));
                tracing::debug!(%error, "this thread keeps the scheduler's default time slice");
                Self { held: false }
            }
        }
    }
}

impl Drop for LongSlice {
    fn drop(&mut self) {
        if self.held {
            // A slice of zero is the kernel's default again.
            let _ = set_slice(Duration::ZERO);
        }
    }
}

/// Sets this thread's slice to `slice` (zero: the default), keeping its policy and nice
/// value; `false` if its policy is not one with slices.
fn set_slice(slice: Duration) -> std::io::Result<bool> {
    let mut attr = get_attr()?;
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Ok(false);
    }
    attr.size = SCHED_ATTR_SIZE_VER0;
    attr.flags = 0;
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a valid `sched_attr` of the size it states, read by the kernel only
    // during the call; pid 0 is the calling thread.
    let result =
        unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if result == 0 {
        Ok(true)
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

    /// On a kernel that reports fair threads' slices (EEVDF), the thread holds the long
    /// slice while it runs and the default again after; on any kernel, its policy and nice
    /// value stay.
    #[test]
    fn a_thread_holds_the_long_slice_and_keeps_its_policy_and_nice() {
        std::thread::spawn(|| {
            // SAFETY: setpriority on the calling thread (who 0) takes no pointer.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            let before = get_attr().unwrap();
            let slices = before.runtime != 0;
            for _ in 0..2 {
                let held = LongSlice::hold();
                let during = get_attr().unwrap();
                assert_eq!(during.policy, before.policy);
                assert_eq!(during.nice, 3);
                if slices {
                    assert!(held.held);
                    assert_eq!(during.runtime, INFERENCE_SLICE.as_nanos() as u64);
                }
                drop(held);
                let after = get_attr().unwrap();
                assert_eq!((after.policy, after.nice), (before.policy, 3));
                assert_eq!(after.runtime, before.runtime);
            }
        })
        .join()
        .unwrap();
    }
}
