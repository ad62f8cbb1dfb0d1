// SPDX-License-Identifier: GPL-2.0 OR MIT

//! Jobs: what one `drm_panthor_queue_submit` of a GROUP_SUBMIT asks a queue to run.
//!
//! A job is the user's command stream ([`CallInfo`]) and its synchronisation operations
//! ([`SyncOp`]): fences to wait for before it runs and syncobjs to hand its done fence to. Both
//! are checked here exactly as Panthor checks them (`panthor_job_create()` and
//! `panthor_check_sync_op()`), so that Mesa's panvk/panfrost behave the same on both drivers.
//!
//! Once checked, a job becomes the payload ([`TyrJob`]) of a job in its queue's
//! [`JobQueue`](kernel::drm::jobqueue::JobQueue); see [`crate::queue`].

use core::ops::Range;

use kernel::{
    dma_fence::FenceAllocation,
    prelude::*,
    uapi, //
};

/// The user's command stream of a job, as checked by [`CallInfo::from_uapi`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallInfo {
    /// GPU address of the command stream: 64-byte aligned, below 2^48.
    pub(crate) start: u64,
    /// Size of the command stream in bytes, a multiple of 8 (the size of an instruction); 0 for
    /// a job that only synchronises.
    pub(crate) size: u32,
    /// The GPU's flush ID when userspace built the stream: the cache flush before the call is
    /// skipped if one happened since.
    pub(crate) latest_flush: u32,
}

impl CallInfo {
    /// The highest GPU address bit plus one: `MOV48` takes 48-bit immediates.
    const VA_BITS: u32 = 48;

    /// Checks the command stream of a `drm_panthor_queue_submit`.
    ///
    /// Fails with `EINVAL` where Panthor does: a non-zero pad, only one of address and size zero,
    /// an address not aligned to 64 bytes, a size not aligned to 8 bytes, or bits 24 to 30 of
    /// the flush ID set. Also rejects addresses of more than 48 bits, which Panthor would let
    /// overflow into the opcode of the instruction that loads them.
    pub(crate) fn from_uapi(args: &uapi::drm_panthor_queue_submit) -> Result<Self> {
        const FLUSH_ID_RESERVED: u32 = 0x7f << 24;

        if args.pad != 0
            || (args.stream_size == 0) != (args.stream_addr == 0)
            || args.stream_addr % 64 != 0
            || args.stream_size % 8 != 0
            || args.stream_addr >> Self::VA_BITS != 0
            || args.latest_flush & FLUSH_ID_RESERVED != 0
        {
            return Err(EINVAL);
        }
        Ok(Self {
            start: args.stream_addr,
            size: args.stream_size,
            latest_flush: args.latest_flush,
        })
    }

    /// Returns whether the job only synchronises: it has no command stream, nothing goes on the
    /// ring, and its done fence signals once the jobs before it on the queue are done.
    pub(crate) fn is_sync_only(&self) -> bool {
        self.size == 0
    }
}

/// What a [`SyncOp`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyncOpKind {
    /// The job waits for the fence of the syncobj (point) before it runs.
    Wait,
    /// The job's done fence is attached to the syncobj (point) once the job is submitted.
    Signal,
}

/// A synchronisation operation of a job, as checked by [`SyncOp::from_uapi`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SyncOp {
    /// Wait or signal.
    pub(crate) kind: SyncOpKind,
    /// The syncobj handle, in the DRM file's handle table.
    pub(crate) handle: u32,
    /// The timeline point; always 0 for a binary syncobj.
    pub(crate) point: u64,
    /// Whether the handle is a timeline syncobj.
    pub(crate) timeline: bool,
}

impl SyncOp {
    /// Checks a `drm_panthor_sync_op` (Panthor's `panthor_check_sync_op()`).
    ///
    /// Fails with `EINVAL` for unknown flags, an unknown handle type, or a timeline value on a
    /// binary syncobj.
    pub(crate) fn from_uapi(op: &uapi::drm_panthor_sync_op) -> Result<Self> {
        const TYPE_MASK: u32 =
            uapi::drm_panthor_sync_op_flags_DRM_PANTHOR_SYNC_OP_HANDLE_TYPE_MASK as u32;
        const SIGNAL: u32 = uapi::drm_panthor_sync_op_flags_DRM_PANTHOR_SYNC_OP_SIGNAL as u32;
        const SYNCOBJ: u32 =
            uapi::drm_panthor_sync_op_flags_DRM_PANTHOR_SYNC_OP_HANDLE_TYPE_SYNCOBJ as u32;
        const TIMELINE: u32 =
            uapi::drm_panthor_sync_op_flags_DRM_PANTHOR_SYNC_OP_HANDLE_TYPE_TIMELINE_SYNCOBJ as u32;

        if op.flags & !(TYPE_MASK | SIGNAL) != 0 {
            return Err(EINVAL);
        }
        let timeline = match op.flags & TYPE_MASK {
            SYNCOBJ if op.timeline_value == 0 => false,
            TIMELINE => true,
            _ => return Err(EINVAL),
        };
        Ok(Self {
            kind: if op.flags & SIGNAL != 0 {
                SyncOpKind::Signal
            } else {
                SyncOpKind::Wait
            },
            handle: op.handle,
            point: op.timeline_value,
            timeline,
        })
    }

    /// Returns whether `self` and `other` name the same syncobj point.
    pub(crate) fn same_point(&self, other: &SyncOp) -> bool {
        self.handle == other.handle && self.point == other.point
    }
}

/// One `drm_panthor_queue_submit` of a GROUP_SUBMIT, checked.
pub(crate) struct QueueSubmit {
    /// The queue of the group the job goes to.
    pub(crate) queue_index: u32,
    /// The user's command stream.
    pub(crate) call: CallInfo,
    /// The job's synchronisation operations, in the order userspace gave them.
    pub(crate) syncs: KVec<SyncOp>,
}

impl QueueSubmit {
    /// Checks `args` and the sync operations the ioctl copied from `args.syncs`.
    ///
    /// Copying the array from userspace (honouring its `stride`, as Panthor's
    /// `PANTHOR_UOBJ_GET_ARRAY()` does) is the ioctl's job; it needs nothing beyond
    /// [`UserSlice`](kernel::uaccess::UserSlice).
    pub(crate) fn from_uapi(
        args: &uapi::drm_panthor_queue_submit,
        syncs: &[uapi::drm_panthor_sync_op],
    ) -> Result<Self> {
        let call = CallInfo::from_uapi(args)?;
        let mut ops = KVec::with_capacity(syncs.len(), GFP_KERNEL)?;
        for op in syncs {
            ops.push(SyncOp::from_uapi(op)?, GFP_KERNEL)?;
        }
        Ok(Self {
            queue_index: args.queue_index,
            call,
            syncs: ops,
        })
    }
}

/// The payload of a job in a queue's [`JobQueue`](kernel::drm::jobqueue::JobQueue).
///
/// `V` is the reference the job holds on its group's GPU VM: it keeps the mappings the command
/// stream uses alive until the job has finished, when the job queue drops the payload (in process
/// context). See [`QueueHw::Vm`](crate::queue::QueueHw::Vm) for why it is not an
/// `Arc<Vm<'drm>>` yet.
pub(crate) struct TyrJob<V> {
    /// The user's command stream.
    pub(crate) call: CallInfo,
    /// Which profiling samples the job takes; decides its credits.
    pub(crate) profile_mask: u32,
    /// The memory of the job's hardware fence, allocated at creation: the run path does not
    /// allocate. [`None`] for sync-only jobs and once the job has run.
    pub(super) hw_fence: Option<FenceAllocation>,
    /// Where the job's instructions are in the ring buffer, as insert pointer values; empty until
    /// it runs, and for sync-only jobs.
    pub(super) ringbuf: Range<u64>,
    _vm: V,
}

impl<V> TyrJob<V> {
    /// A job that runs `call` in the VM `vm`, taking the `profile_mask` samples.
    pub(crate) fn new(call: CallInfo, profile_mask: u32, vm: V) -> Result<Self> {
        let hw_fence = if call.is_sync_only() {
            None
        } else {
            Some(FenceAllocation::new(GFP_KERNEL)?)
        };
        Ok(Self {
            call,
            profile_mask,
            hw_fence,
            ringbuf: 0..0,
            _vm: vm,
        })
    }

    /// Returns where the job's instructions are in the ring buffer.
    pub(crate) fn ringbuf(&self) -> Range<u64> {
        self.ringbuf.clone()
    }
}
