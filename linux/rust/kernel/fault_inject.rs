// SPDX-License-Identifier: GPL-2.0

//! Fault injection: making the allocations of the current task fail on purpose.
//!
//! With `CONFIG_FAULT_INJECTION` every task has a counter, `fail_nth` (`/proc/<pid>/fail-nth`
//! from userspace). Set to `n`, it makes the `n`-th fault-injection point that the task passes
//! fail, whatever probability the fault attributes in debugfs give: each point that gets as far as
//! `should_fail_ex()` in task context (a slab allocation with failslab, a page allocation with
//! fail_page_alloc, ...) counts it down, and the one that takes it to 0 fails. It stays at 0 once
//! it has fired, which is how its owner learns that the failure was injected.
//!
//! Allocations that may reclaim (`GFP_KERNEL`) get that far only once failslab's (or
//! fail_page_alloc's) `ignore-gfp-wait` is off, which only debugfs can do; allocations that do not
//! reclaim (`GFP_NOWAIT`) always do. [`gfp_kernel_can_fail`] tells which holds. Every failure
//! injected is reported in the kernel log, with a stack dump at the default `verbose` of 2, unless
//! the allocation has `__GFP_NOWARN` (`GFP_NOWAIT` has) or the attribute's `verbose` is 0.
//!
//! - [`FailNth`] arms the counter of the current task and tells whether the failure it stood for
//!   was injected.
//! - [`sweep`] runs an operation once per allocation it makes, failing each one in turn, and
//!   checks that every failure ends in a clean `ENOMEM` or is absorbed by a fallback.
//! - [`check_fail_nth`] checks that the counter behaves as described here.
//! - With `CONFIG_KUNIT`, the `kunit` submodule lets the cases of a suite built on them skip where
//!   `GFP_KERNEL` allocations cannot fail, and run again when the suite is run again through
//!   debugfs.
//!
//! # Examples
//!
//! ```
//! use kernel::fault_inject::FailNth;
//!
//! // Fail the first allocation of this task from now on.
//! let mut fail = FailNth::arm(1);
//! let result = KVec::<u64>::with_capacity(16, GFP_NOWAIT);
//! let fired = fail.disarm();
//! if cfg!(CONFIG_FAILSLAB) {
//!     // The vector's memory was that allocation.
//!     assert!(fired && result.is_err());
//! }
//! ```
//!
//! See also the [fault injection documentation].
//!
//! [fault injection documentation]: srctree/Documentation/fault-injection/fault-injection.rst
//!
//! C header: [`include/linux/fault-inject.h`](srctree/include/linux/fault-inject.h)

use crate::{
    prelude::*,
    task::Task,
    types::NotThreadSafe, //
};

/// Sets the `fail_nth` of the current task.
fn set_fail_nth(n: u32) {
    // SAFETY: `Task::current_raw()` is the task running this, valid while it runs, and `fail_nth`
    // an aligned `unsigned int` of it. The task itself reads and writes it with READ_ONCE() and
    // WRITE_ONCE() (`should_fail_ex()`), which a volatile access matches; procfs accesses it from
    // other tasks with plain accesses, which race with those as much as with this.
    unsafe { core::ptr::write_volatile(&raw mut (*Task::current_raw()).fail_nth, n) };
}

/// Returns the `fail_nth` of the current task.
fn fail_nth() -> u32 {
    // SAFETY: As in `set_fail_nth`.
    unsafe { core::ptr::read_volatile(&raw const (*Task::current_raw()).fail_nth) }
}

/// Makes the `n`-th fault-injection point of the current task fail, until disarmed or dropped.
///
/// A guard over `current->fail_nth`: [`FailNth::arm`] sets it, [`FailNth::disarm`] (or dropping
/// the guard) sets it back to 0 and records whether the failure was injected. The guard belongs to
/// the task that armed it, so it is not [`Send`]. A task should hold one guard at a time: the
/// counter is one per task.
///
/// # Invariants
///
/// While `armed` is true, the current task's `fail_nth` was set by [`FailNth::arm`] and has not
/// been reset by this guard.
///
/// # Examples
///
/// ```
/// use kernel::fault_inject::FailNth;
///
/// let fail = FailNth::arm(1);
/// let first = KBox::new(1u64, GFP_NOWAIT);
/// if cfg!(CONFIG_FAILSLAB) {
///     assert!(fail.fired() && first.is_err());
/// }
/// // Allocations no longer fail.
/// drop(fail);
/// let second = KBox::new(2u64, GFP_NOWAIT)?;
/// # Ok::<(), Error>(())
/// ```
#[must_use = "dropping the guard disarms it"]
pub struct FailNth {
    armed: bool,
    fired: bool,
    _not_send: NotThreadSafe,
}

impl FailNth {
    /// Makes the `n`-th fault-injection point the current task passes from now on fail; 0 makes
    /// none fail.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::fault_inject::FailNth;
    ///
    /// let mut none = FailNth::arm(0);
    /// let result = KBox::new(0u64, GFP_NOWAIT);
    /// assert!(!none.disarm());
    /// assert!(result.is_ok());
    /// ```
    pub fn arm(n: u32) -> Self {
        if n > 0 {
            set_fail_nth(n);
        }
        // INVARIANT: `fail_nth` was just set if `armed` is true.
        Self {
            armed: n > 0,
            fired: false,
            _not_send: NotThreadSafe,
        }
    }

    /// Returns whether the failure was injected: the `n`-th point was reached.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::fault_inject::FailNth;
    ///
    /// let fail = FailNth::arm(1);
    /// assert!(!fail.fired());
    /// let result = KBox::new(0u64, GFP_NOWAIT);
    /// if cfg!(CONFIG_FAILSLAB) {
    ///     assert!(fail.fired() && result.is_err());
    /// }
    /// ```
    pub fn fired(&self) -> bool {
        if self.armed {
            fail_nth() == 0
        } else {
            self.fired
        }
    }

    /// Stops the injection if it was still armed, and returns whether the failure was injected.
    ///
    /// Calling it again returns the same.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::fault_inject::FailNth;
    ///
    /// let mut fail = FailNth::arm(1);
    /// let fired = fail.disarm();
    /// // Nothing was allocated meanwhile.
    /// assert!(!fired);
    /// let result = KBox::new(0u64, GFP_NOWAIT);
    /// assert!(!fail.disarm());
    /// assert!(result.is_ok());
    /// ```
    pub fn disarm(&mut self) -> bool {
        if self.armed {
            self.fired = fail_nth() == 0;
            set_fail_nth(0);
            // INVARIANT: `fail_nth` was reset.
            self.armed = false;
        }
        self.fired
    }
}

impl Drop for FailNth {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// Returns whether `GFP_KERNEL` allocations of the current task can be made to fail.
///
/// They can with failslab (`CONFIG_FAILSLAB`) once its `ignore-gfp-wait` is off. Tries one such
/// allocation with `fail_nth` armed.
///
/// # Examples
///
/// ```
/// use kernel::fault_inject::gfp_kernel_can_fail;
///
/// if gfp_kernel_can_fail() {
///     // Sweep operations that allocate with `GFP_KERNEL`.
/// }
/// ```
pub fn gfp_kernel_can_fail() -> bool {
    let mut fail = FailNth::arm(1);
    let probe = KBox::new(0u64, GFP_KERNEL);
    fail.disarm();
    probe.is_err()
}

/// Checks that `fail_nth` behaves as this module describes: a `GFP_NOWAIT` allocation fails in
/// any case, a `GFP_KERNEL` one only where [`gfp_kernel_can_fail`], and a failure uses the counter
/// up. Returns `EINVAL` if not.
///
/// Where `GFP_KERNEL` allocations cannot fail, the slab allocator may still make a nested
/// allocation that can (refilling a per-CPU cache, for example), which uses the counter up
/// while the allocation itself succeeds: [`sweep`] counts such a point as absorbed, and so does
/// this check.
///
/// Needs failslab (`CONFIG_FAILSLAB`).
///
/// # Examples
///
/// ```
/// use kernel::fault_inject::check_fail_nth;
///
/// if cfg!(CONFIG_FAILSLAB) {
///     check_fail_nth()?;
/// }
/// # Ok::<(), Error>(())
/// ```
pub fn check_fail_nth() -> Result {
    // The cache of the probes warmed up first, so that the probes take its fast path.
    drop(KBox::new(0u64, GFP_KERNEL)?);
    let mut fail = FailNth::arm(1);
    let nowait = KBox::new(0u64, GFP_NOWAIT).is_err();
    let nowait_fired = fail.disarm();
    let mut fail = FailNth::arm(1);
    let gfp_kernel = KBox::new(0u64, GFP_KERNEL).is_err();
    let gfp_kernel_fired = fail.disarm();
    match (nowait, nowait_fired, gfp_kernel, gfp_kernel_fired) {
        (true, true, true, true) | (true, true, false, _) => Ok(()),
        _ => Err(EINVAL),
    }
}

/// The most allocations one operation may make before [`sweep`] gives up.
pub const MAX_POINTS: u32 = 2000;

/// What [`sweep`] found for one operation.
///
/// # Examples
///
/// See [`sweep`].
#[derive(Clone, Copy, Debug)]
pub struct Sweep {
    /// Allocations the operation made: the failure points.
    pub points: u32,
    /// Failure points at which the operation failed with `ENOMEM`; at the others, the kernel had
    /// a fallback and the operation succeeded.
    pub enomem: u32,
}

/// Runs `op` once per allocation it makes, the `n`-th run with its `n`-th allocation failing,
/// until a run makes fewer than `n`: that one must succeed.
///
/// The allocations the kernel makes around those of `op` (kmemleak's objects, the slab
/// allocator's own) vary from run to run, so which of them the `n`-th is varies too: how many runs
/// end in `ENOMEM` is not exact, and an allocation of `op` can escape a sweep.
///
/// `prepare` runs before each run, `check` after it, with its result; neither has allocations
/// failing. A run whose allocation failed must fail with `ENOMEM` or succeed (the kernel had a
/// fallback: kmemleak's object pool, a lower slab order); one without must succeed. Otherwise,
/// or if `check` fails, the sweep prints the failure point and returns the error; `prepare`'s
/// errors are returned as they are. After [`MAX_POINTS`] runs it returns `E2BIG`.
///
/// Prints the counts as `fault injection: NAME: N failure points, N ENOMEM, N absorbed`.
///
/// Allocations that may reclaim fail only where [`gfp_kernel_can_fail`].
///
/// # Examples
///
/// A KUnit case that fails every allocation of making a vector in turn:
///
/// ```
/// use core::cell::Cell;
/// use kernel::fault_inject::{
///     gfp_kernel_can_fail,
///     sweep, //
/// };
///
/// fn vector_fails_cleanly() -> Result {
///     if !gfp_kernel_can_fail() {
///         return Ok(());
///     }
///     let made = Cell::new(None);
///     let s = sweep(
///         "KVec::with_capacity",
///         || Ok(()),
///         || {
///             made.set(Some(KVec::<u64>::with_capacity(64, GFP_KERNEL)?));
///             Ok(())
///         },
///         // A vector was made if and only if the run succeeded.
///         |result| match (made.take(), result) {
///             (Some(_), Ok(())) | (None, Err(_)) => Ok(()),
///             _ => Err(EINVAL),
///         },
///     )?;
///     assert!(s.enomem >= 1 && s.enomem <= s.points);
///     Ok(())
/// }
/// ```
pub fn sweep(
    name: &str,
    mut prepare: impl FnMut() -> Result,
    mut op: impl FnMut() -> Result,
    mut check: impl FnMut(Result) -> Result,
) -> Result<Sweep> {
    let mut enomem = 0;
    for n in 1..=MAX_POINTS {
        prepare()?;
        let mut fail = FailNth::arm(n);
        let result = op();
        let fired = fail.disarm();
        match result {
            Err(e) if !fired || e != ENOMEM => {
                pr_err!("fault injection: {name}: point {n}: {e:?} (failure injected: {fired})\n");
                return Err(e);
            }
            Err(_) => enomem += 1,
            Ok(()) => {}
        }
        if let Err(e) = check(result) {
            pr_err!("fault injection: {name}: point {n}: check failed: {e:?}\n");
            return Err(e);
        }
        if !fired {
            let points = n - 1;
            pr_info!(
                "fault injection: {name}: {points} failure points, {enomem} ENOMEM, {} absorbed\n",
                points - enomem
            );
            return Ok(Sweep { points, enomem });
        }
    }
    pr_err!("fault injection: {name}: more than {MAX_POINTS} allocations\n");
    Err(E2BIG)
}

/// KUnit support for suites that inject allocation failures.
///
/// Such a suite skips its cases where `GFP_KERNEL` allocations cannot fail (at boot, failslab's
/// `ignore-gfp-wait` is on), and is run again through `/sys/kernel/debug/kunit/<suite>/run` once
/// it is off. KUnit runs a case again only if it did not skip, so the suite's last case resets
/// them all with [`reset_cases`](crate::fault_inject::kunit::reset_cases).
#[cfg(CONFIG_KUNIT)]
pub mod kunit {
    use super::gfp_kernel_can_fail;
    use crate::prelude::*;

    /// Returns whether `GFP_KERNEL` allocations of the current task can be made to fail; if not,
    /// marks the running KUnit case skipped.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::fault_inject::kunit::armed_or_skip;
    ///
    /// // The beginning of a KUnit case.
    /// fn allocations_fail_cleanly() -> Result {
    ///     if !armed_or_skip() {
    ///         return Ok(());
    ///     }
    ///     // Sweeps.
    ///     Ok(())
    /// }
    /// ```
    pub fn armed_or_skip() -> bool {
        if gfp_kernel_can_fail() {
            return true;
        }
        skip(c"GFP_KERNEL allocations cannot fail: failslab ignore-gfp-wait is on");
        false
    }

    /// Marks the running KUnit case, if any, skipped with `reason`, as `kunit_mark_skipped()`
    /// does.
    fn skip(reason: &CStr) {
        // SAFETY: FFI call without requirements.
        let test = unsafe { bindings::kunit_get_current_test() };
        if test.is_null() {
            return;
        }
        // SAFETY: `test` is not null, so it is the `struct kunit` of the case the current task
        // runs, valid while the case runs; only this task writes it meanwhile.
        unsafe {
            (*test).status = bindings::kunit_status_KUNIT_SKIPPED;
            let comment = &mut (*test).status_comment;
            for (d, s) in comment.iter_mut().zip(reason.to_bytes_with_nul()) {
                *d = c_char::from_ne_bytes([*s]);
            }
        }
    }

    /// Resets the status of every case of `cases`, so that each runs when the suite is run again
    /// through debugfs: KUnit does not run a case again whose status is skipped.
    ///
    /// # Safety
    ///
    /// `cases` is valid for reads and writes, and nothing else accesses the cases while this runs.
    /// Both hold when `cases` is the case array of the suite whose case calls this (`TEST_CASES`
    /// in a [`#[kunit_tests]`](macros::kunit_tests) module): KUnit runs the cases of a suite one
    /// after the other, and waits meanwhile.
    ///
    /// # Examples
    ///
    /// The last case of a [`#[kunit_tests]`](macros::kunit_tests) module (not run here: a suite
    /// cannot be declared in an example):
    ///
    /// ```ignore
    /// use kernel::fault_inject::{
    ///     check_fail_nth,
    ///     kunit::reset_cases, //
    /// };
    ///
    /// #[test]
    /// fn fail_nth_semantics() -> Result {
    ///     // SAFETY: `TEST_CASES` is this suite's case array; KUnit runs its cases one after the
    ///     // other.
    ///     unsafe { reset_cases(&raw mut TEST_CASES) };
    ///     check_fail_nth()
    /// }
    /// ```
    pub unsafe fn reset_cases<const N: usize>(cases: *mut [bindings::kunit_case; N]) {
        let cases = cases.cast::<bindings::kunit_case>();
        for i in 0..N {
            // SAFETY: `i < N`, so `cases.add(i)` is within the array, which is valid and not
            // accessed by anything else meanwhile by the safety requirements.
            unsafe {
                let case = cases.add(i);
                // The array ends with a zeroed case.
                if (*case).run_case.is_none() {
                    break;
                }
                (*case).status = bindings::kunit_status_KUNIT_SUCCESS;
            }
        }
    }
}
