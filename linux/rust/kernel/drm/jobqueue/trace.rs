// SPDX-License-Identifier: GPL-2.0 OR MIT

//! The job queue's trace events (`include/trace/events/drm_jobqueue.h`).
//!
//! Each event costs a static branch when it is disabled.

use super::{
    Recovery,
    TimeoutAction, //
};
use crate::{
    bindings,
    declare_trace,
    dma_fence::DmaFence,
    prelude::*, //
};

declare_trace! {
    /// # Safety
    ///
    /// `name` must be a valid NUL-terminated string.
    unsafe fn drm_jobqueue_job_queue(
        name: *const c_char,
        fence_context: u64,
        fence_seqno: u64,
        credits: u32,
        deps: u32,
        job_count: u32,
        hw_job_count: u32,
    );
    /// # Safety
    ///
    /// None.
    unsafe fn drm_jobqueue_job_add_dep(fence_context: u64, fence_seqno: u64, ctx: u64, seqno: u64);
    /// # Safety
    ///
    /// `name` must be a valid NUL-terminated string.
    unsafe fn drm_jobqueue_job_run(
        name: *const c_char,
        fence_context: u64,
        fence_seqno: u64,
        hw_context: u64,
        hw_seqno: u64,
        job_count: u32,
        hw_job_count: u32,
    );
    /// # Safety
    ///
    /// `fence` must point to a valid `struct dma_fence`.
    unsafe fn drm_jobqueue_job_done(fence: *mut bindings::dma_fence);
    /// # Safety
    ///
    /// None.
    unsafe fn drm_jobqueue_job_cancel(fence_context: u64, fence_seqno: u64, error: c_int);
    /// # Safety
    ///
    /// `name` and `action` must be valid NUL-terminated strings.
    unsafe fn drm_jobqueue_job_timeout(
        name: *const c_char,
        fence_context: u64,
        fence_seqno: u64,
        action: *const c_char,
    );
    /// # Safety
    ///
    /// `name` and `what` must be valid NUL-terminated strings.
    unsafe fn drm_jobqueue_queue_stop(name: *const c_char, fence_context: u64, what: *const c_char);
    /// # Safety
    ///
    /// `name` and `what` must be valid NUL-terminated strings.
    unsafe fn drm_jobqueue_queue_start(
        name: *const c_char,
        fence_context: u64,
        what: *const c_char,
    );
}

/// A job was submitted.
pub(super) fn job_queue(
    name: &CStr,
    done: &DmaFence,
    credits: u32,
    deps: usize,
    waiting: u32,
    credits_in_use: u32,
) {
    let deps = u32::try_from(deps).unwrap_or(u32::MAX);
    // SAFETY: `name` is a valid string.
    unsafe {
        drm_jobqueue_job_queue(
            name.as_char_ptr(),
            done.context(),
            done.seqno(),
            credits,
            deps,
            waiting,
            credits_in_use,
        )
    }
}

/// A submitted job waits for `dep`.
pub(super) fn job_add_dep(done: &DmaFence, dep: &DmaFence) {
    // SAFETY: No requirements.
    unsafe { drm_jobqueue_job_add_dep(done.context(), done.seqno(), dep.context(), dep.seqno()) }
}

/// A job was handed to the hardware.
pub(super) fn job_run(
    name: &CStr,
    done: &DmaFence,
    hw: &DmaFence,
    waiting: u32,
    credits_in_use: u32,
) {
    // SAFETY: `name` is a valid string.
    unsafe {
        drm_jobqueue_job_run(
            name.as_char_ptr(),
            done.context(),
            done.seqno(),
            hw.context(),
            hw.seqno(),
            waiting,
            credits_in_use,
        )
    }
}

/// A job was retired; its done fence `done` has signalled, and the event records its error.
///
/// The fence's fields are only read when the event is enabled.
pub(super) fn job_done(done: &DmaFence) {
    // SAFETY: `done` is a valid fence for as long as the reference lives.
    unsafe { drm_jobqueue_job_done(done.as_raw()) }
}

/// A job ended without the hardware completing it.
pub(super) fn job_cancel(done: &DmaFence, error: Error) {
    // SAFETY: No requirements.
    unsafe { drm_jobqueue_job_cancel(done.context(), done.seqno(), error.to_errno()) }
}

/// A job timed out and the backend chose `action`.
pub(super) fn job_timeout(name: &CStr, done: &DmaFence, action: TimeoutAction) {
    let action = match action {
        TimeoutAction::NoHang => c"no hang",
        TimeoutAction::Reset(Recovery::Continue) => c"reset, continue",
        TimeoutAction::Reset(Recovery::Resubmit) => c"reset, resubmit",
        TimeoutAction::Reset(Recovery::Cancel(_)) => c"reset, cancel",
        TimeoutAction::ResetLater => c"reset later",
        TimeoutAction::DeviceGone => c"device gone",
    };
    // SAFETY: `name` and `action` are valid strings.
    unsafe {
        drm_jobqueue_job_timeout(
            name.as_char_ptr(),
            done.context(),
            done.seqno(),
            action.as_char_ptr(),
        )
    }
}

/// The queue was stopped.
pub(super) fn queue_stop(name: &CStr, context: u64) {
    // SAFETY: `name` and the literal are valid strings.
    unsafe { drm_jobqueue_queue_stop(name.as_char_ptr(), context, c"stopped".as_char_ptr()) }
}

/// A stop of the queue ended, asking for `recovery`; the jobs are recovered only when the last
/// stop ends (see the event in `include/trace/events/drm_jobqueue.h`).
pub(super) fn queue_start(name: &CStr, context: u64, recovery: Recovery) {
    let what = match recovery {
        Recovery::Continue => c"resumed: continue",
        Recovery::Resubmit => c"resumed: resubmit",
        Recovery::Cancel(_) => c"resumed: cancel",
    };
    // SAFETY: `name` and `what` are valid strings.
    unsafe { drm_jobqueue_queue_start(name.as_char_ptr(), context, what.as_char_ptr()) }
}
