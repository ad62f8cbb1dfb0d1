// SPDX-License-Identifier: GPL-2.0

//! DMA fences.
//!
//! A DMA fence (`struct dma_fence`) is a one-shot completion event of an operation, usually of a
//! GPU: it starts unsignalled and is signalled exactly once, optionally with an error. Fences are
//! shared across drivers and with userspace (through sync files and DRM syncobjs), which is why
//! the rules around them are strict: every fence must eventually signal, fences of one timeline
//! signal in order, and nothing that can wait for a fence may run in the path that signals one.
//!
//! # Producers and consumers
//!
//! - A [`FenceContext`] is a timeline: it hands out fences with increasing sequence numbers. Its
//!   memory is allocated up front with [`FenceAllocation`] so that creating a fence in the
//!   signalling path never allocates.
//! - A [`UniqueFence`] is the producer's handle on a fence it has to signal. It cannot be
//!   cloned; [`UniqueFence::signal`] consumes it, so a fence cannot be signalled twice, and
//!   dropping it unsignalled signals `-ECANCELED`, so a fence cannot be forgotten.
//! - A [`DmaFence`] is any fence, made in Rust or in C, as a consumer sees it: always behind an
//!   [`ARef`], exportable to C with [`DmaFence::as_raw`] for syncobjs and sync files.
//!
//! # Callbacks
//!
//! A fence runs its callbacks when it signals, with its spinlock held and often in hardirq
//! context. Whatever a Rust callback owns could be dropped there implicitly, and a drop may take
//! a sleeping lock, allocate, or free an object whose last reference takes a mutex; nothing
//! catches that at compile time. Drivers therefore cannot write fence callbacks: the
//! [`CallbackKind`] trait is sealed, and this module offers a fixed set of kinds whose code is
//! audited here once:
//!
//! | kind | what happens when the fence signals |
//! |---|---|
//! | [`WakeTask`] | a task is woken up |
//! | [`CompleteCompletion`] | a [`Completion`] is completed (`complete_all`) |
//! | [`EnqueueWork`] | a [`WorkItem`] is enqueued on a [`FenceWorkqueue`], for process context |
//! | [`QueueKthreadWork`] | a [`KthreadWorkItem`] is queued on a [`kthread::Worker`] |
//! | [`ProxyFence`] | another fence signals, with the same error |
//!
//! A [`ProxyFence`]'s hooks are sealed too ([`ProxyHooks`]): [`NoHook`], [`EnqueueWork`] on an
//! earlier deadline, and [`ReturnCredits`], which also gives a job's credits back to its ring's
//! [`RingCredits`] when the source signals the proxy, and wakes a taker that waits for them.
//!
//! A [`FenceCallback`] holds one kind and the memory the C side needs. It is allocated and
//! initialised before use, armed on a fence with [`FenceCallback::arm`], and removed from the
//! fence when disarmed or dropped. Its payload (the task, the work item, ...) is only ever dropped
//! with the [`FenceCallback`], never in the callback. Arming on a fence that has already signalled
//! runs the action at once, in the caller's context, so the action always happens exactly once
//! after the fence signalled, unless the callback is disarmed first. Every action is told the
//! fence's result, read in order with the signaller (under the fence lock).
//!
//! Work that signals fences runs on a [`FenceWorkqueue`] (`WQ_MEM_RECLAIM`, never in softirq),
//! and a [`SignallingWorkItem`] runs inside a [`SignallingSection`] without having to ask.
//!
//! # Leaks and module unload
//!
//! The fence operations and the function the C side calls for every callback live in vmlinux.
//! What lives in a module (the names of a [`FenceContext`], the code of a callback kind
//! instantiated there) is pinned while it can be reached: an unsignalled fence holds a reference
//! on the module of its names, an armed callback on the module of its code. A fence or callback
//! leaked with [`core::mem::forget`], [`KBox::leak`] or a reference cycle therefore keeps its
//! module loaded instead of leaving the C side pointers into freed memory. What is left to the
//! user: a module must still flush the work items it queued before it unloads, as always.
//!
//! # Lock classes and nesting
//!
//! Fences created here use the spinlock embedded in `struct dma_fence`, with a lockdep class per
//! nesting level of their context (see [`NestedFenceContext`]). A
//! [`ProxyFence`] signals its fence from the callback of its source, inside the source's lock, so
//! its level must be above the source's: lockdep then sees nesting, not recursion, as it does for
//! `dma_fence_array` and `dma_fence_chain`. [`SignallingSection`] annotates fence signalling
//! critical sections for lockdep.
//!
//! # Examples
//!
//! ```
//! use kernel::dma_fence::{FenceCallback, FenceContext, CompleteCompletion};
//! use kernel::sync::{Arc, Completion};
//!
//! let ctx = FenceContext::new(c"example", c"example-timeline");
//! let fence = ctx.new_fence(GFP_KERNEL)?;
//!
//! // A consumer waits for the fence through a completion.
//! let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
//! let mut cb = KBox::pin_init(
//!     FenceCallback::new(CompleteCompletion::new(done.clone())),
//!     GFP_KERNEL,
//! )?;
//! cb.as_mut().arm(fence.to_aref());
//!
//! // The producer signals it, with an error.
//! let consumer_view = fence.to_aref();
//! fence.signal(Err(EIO));
//! done.wait_for_completion();
//! assert_eq!(consumer_view.status(), Some(Err(EIO)));
//! # Ok::<(), Error>(())
//! ```
//!
//! C header: [`include/linux/dma-fence.h`](srctree/include/linux/dma-fence.h)

use crate::{
    alloc::{
        AllocError,
        Flags, //
    },
    bindings,
    kthread::{
        self,
        HasKthreadWork,
        KthreadWorkItem, //
    },
    prelude::*,
    sync::{
        aref::{
            ARef,
            AlwaysRefCounted, //
        },
        atomic::{
            ordering,
            Atomic, //
        },
        Arc,
        ArcBorrow,
        Completion,
        LockClassKey, //
    },
    task::Task,
    time::{
        msecs_to_jiffies,
        Delta,
        Instant,
        Monotonic, //
    },
    types::{
        NotThreadSafe,
        Opaque, //
    },
    workqueue::{
        HasWork,
        OwnedQueue,
        Queue,
        WorkItem, //
    }, //
};
use core::{
    cell::UnsafeCell,
    mem::{
        ManuallyDrop,
        MaybeUninit, //
    },
    ptr::{
        self,
        NonNull, //
    }, //
};

/// The highest nesting level a [`FenceContext`] can have.
pub const MAX_NESTING_LEVEL: u32 = 7;

const LEVELS: usize = MAX_NESTING_LEVEL as usize + 1;

/// One lockdep class per nesting level for the locks of fences created here.
static LOCK_CLASSES: [LockClassKey; LEVELS] = [const {
    // SAFETY: The keys are in static memory, which is pinned, and are never dropped.
    unsafe { LockClassKey::new_static() }
}; LEVELS];

static LOCK_NAMES: [&CStr; LEVELS] = [
    c"rust_dma_fence_lock/0",
    c"rust_dma_fence_lock/1",
    c"rust_dma_fence_lock/2",
    c"rust_dma_fence_lock/3",
    c"rust_dma_fence_lock/4",
    c"rust_dma_fence_lock/5",
    c"rust_dma_fence_lock/6",
    c"rust_dma_fence_lock/7",
];

/// The memory of a fence created by a [`FenceContext`].
///
/// It is freed by the C side with `dma_fence_free()` (`kfree_rcu()` of the `struct dma_fence`)
/// when the last reference goes, so `base` comes first and no field needs dropping. The names are
/// kept as thin pointers: a `&CStr` is twice the size, and with two of them the fence would take
/// the next kmalloc size (128 bytes instead of 96 without lockdep).
///
/// The nesting level is kept in three of the flag bits that `struct dma_fence` leaves to its
/// producer (from `DMA_FENCE_FLAG_USER_BITS`), for the same reason.
///
/// # Invariants
///
/// - `driver_name` and `timeline_name` point to NUL-terminated strings of `'static` lifetime, in
///   vmlinux or in the memory of the module `owner`.
/// - `owner` is null, or a module on which the fence holds a reference until it has signalled.
/// - The bits [`LEVEL_SHIFT`] to [`LEVEL_SHIFT`] + 2 of `base.flags` hold the nesting level of the
///   fence's context; they were written before the fence could be shared and never change.
/// - `deadline` is null, or points to the [`DeadlineSlot`] of the live [`ProxyFence`] that drives
///   the fence. It is only read and written under the fence's lock.
#[repr(C)]
struct RawFence {
    base: Opaque<bindings::dma_fence>,
    driver_name: *const c_char,
    timeline_name: *const c_char,
    owner: *mut bindings::module,
    deadline: *mut DeadlineSlot,
}

/// The first flag bit of a [`RawFence`]'s nesting level.
const LEVEL_SHIFT: u32 = bindings::dma_fence_flag_bits_DMA_FENCE_FLAG_USER_BITS;
/// The flag bits of a [`RawFence`]'s nesting level, once shifted down.
const LEVEL_MASK: usize = 0b111;
static_assert!(MAX_NESTING_LEVEL as usize <= LEVEL_MASK);

/// Returns the nesting level of a fence created here.
///
/// # Safety
///
/// `fence` must point to a valid fence created by [`FenceContext::init_fence`].
unsafe fn raw_level(fence: *mut bindings::dma_fence) -> u32 {
    // SAFETY: The caller guarantees that `fence` is valid; `flags` is an `unsigned long`, the size
    // and alignment of `usize`, that the C side only changes with atomic bit operations once the
    // fence is shared, so an atomic load is no data race.
    let flags = unsafe { Atomic::<usize>::from_ptr(ptr::addr_of_mut!((*fence).flags).cast()) }
        .load(ordering::Relaxed);
    // By the invariants of `RawFence` these bits hold the level, which is at most `LEVEL_MASK`.
    ((flags >> LEVEL_SHIFT) & LEVEL_MASK) as u32
}

/// The operations of every fence created here.
///
/// There is neither `release` nor `wait`, so the C side detaches the fence from these operations
/// when it signals: a signalled fence no longer depends on this code or on the names of its
/// context, and may outlive both.
static FENCE_OPS: bindings::dma_fence_ops = bindings::dma_fence_ops {
    get_driver_name: Some(fence_driver_name),
    get_timeline_name: Some(fence_timeline_name),
    enable_signaling: None,
    signaled: None,
    wait: None,
    release: None,
    set_deadline: Some(fence_set_deadline),
};

/// # Safety
///
/// `fence` must be a valid fence that uses [`FENCE_OPS`].
unsafe extern "C" fn fence_driver_name(fence: *mut bindings::dma_fence) -> *const c_char {
    // SAFETY: Fences that use `FENCE_OPS` are the `base` of a `RawFence` (at offset 0, since it is
    // `repr(C)`), and the caller guarantees that `fence` is valid. By the invariants of
    // `RawFence`, the name is a static string.
    unsafe { (*fence.cast::<RawFence>()).driver_name }
}

/// # Safety
///
/// `fence` must be a valid fence that uses [`FENCE_OPS`].
unsafe extern "C" fn fence_timeline_name(fence: *mut bindings::dma_fence) -> *const c_char {
    // SAFETY: As in `fence_driver_name`.
    unsafe { (*fence.cast::<RawFence>()).timeline_name }
}

/// The `set_deadline` operation: records the deadline in the [`ProxyFence`] that drives the
/// fence, if any and if it is earlier than the one it has, runs the proxy's deadline hook
/// (`ProxyHooks::deadline`), and passes the deadline on to the proxy's source, as drm_sched's
/// finished fence does with its parent. A fence no proxy drives ignores deadlines.
///
/// Called by `dma_fence_set_deadline()` in any context, inside an RCU read-side critical section
/// and without the fence lock, possibly after the fence signalled.
///
/// # Safety
///
/// `fence` must be a valid fence that uses [`FENCE_OPS`].
unsafe extern "C" fn fence_set_deadline(
    fence: *mut bindings::dma_fence,
    deadline: bindings::ktime_t,
) {
    let raw = fence.cast::<RawFence>();
    // SAFETY: The caller guarantees that `fence` is valid, and it is the `base` of a `RawFence`.
    // By its invariants `deadline` is read under the fence lock, and while we hold the lock the
    // slot it points to is alive: the proxy clears the pointer under this lock before it goes.
    // The slot's fields are only accessed under the same lock, so these accesses race with
    // nothing. The proxy's callback holds a reference on `source` while it is in the slot (the
    // proxy clears it first, under this lock, whenever it lets go of its source), so it is valid
    // here and `dma_fence_get()` keeps it valid past the unlock. `notify` is the hook of the
    // proxy, whose module the slot pins, and `ProxyHooks::deadline` may run with this lock held.
    let source = unsafe {
        let flags = bindings::dma_fence_lock_irqsave(fence);
        let slot = (*raw).deadline;
        let mut source = ptr::null_mut();
        if !slot.is_null() && deadline < (*slot).deadline {
            (*slot).deadline = deadline;
            if !(*slot).source.is_null() {
                source = bindings::dma_fence_get((*slot).source);
            }
            ((*slot).notify)(slot);
        }
        bindings::dma_fence_unlock_irqrestore(fence, flags);
        source
    };
    if !source.is_null() {
        // SAFETY: We own the reference taken above; `dma_fence_set_deadline()` may be called
        // from any context, and `dma_fence_put()` from any context a fence signals in.
        unsafe {
            bindings::dma_fence_set_deadline(source, deadline);
            bindings::dma_fence_put(source);
        }
    }
}

/// Converts the `error` field of a signalled fence into a [`Result`].
fn error_to_result(error: c_int) -> Result {
    if error == 0 {
        Ok(())
    } else if error < 0 && error >= -(bindings::MAX_ERRNO as c_int) {
        Err(Error::from_errno(error))
    } else {
        // Not a negative errno: only a broken C producer writes such a value.
        Err(EINVAL)
    }
}

/// Signals `fence` with `result`, unless it was signalled already, and lets go of the module
/// that holds its names.
///
/// # Safety
///
/// `fence` must point to a valid fence created by [`FenceContext::init_fence`] (the `base` of a
/// `RawFence`), on which the caller holds a reference.
unsafe fn signal_raw(fence: *mut bindings::dma_fence, result: Result) {
    let _section = SignallingSection::begin();
    // SAFETY: The caller guarantees that `fence` is valid. Setting the error and signalling under
    // the fence lock, only if it is not signalled yet, means `dma_fence_set_error()` never warns.
    let signalled_now = unsafe {
        let flags = bindings::dma_fence_lock_irqsave(fence);
        let pending = !bindings::dma_fence_test_signaled_flag(fence);
        if pending {
            if let Err(e) = result {
                bindings::dma_fence_set_error(fence, e.to_errno());
            }
            bindings::dma_fence_signal_locked(fence);
        }
        bindings::dma_fence_unlock_irqrestore(fence, flags);
        pending
    };
    if signalled_now {
        // SAFETY: The fence is the `base` of a `RawFence`, alive while the caller's reference is.
        // It has signalled, so its operations no longer read the names, and by the invariants of
        // `RawFence` its reference on `owner` is given up now, once.
        unsafe { module_put((*fence.cast::<RawFence>()).owner) };
    }
}

/// A fence, made in Rust or in C, as its consumers see it.
///
/// Wraps the kernel's `struct dma_fence`. It is always reference counted: owned handles are
/// [`ARef<DmaFence>`].
///
/// # Invariants
///
/// The wrapped `struct dma_fence` is initialised and its reference count is non-zero for as long
/// as the [`DmaFence`] can be accessed.
#[repr(transparent)]
pub struct DmaFence(Opaque<bindings::dma_fence>);

// SAFETY: `struct dma_fence` is designed to be used from any thread: its state changes under its
// own spinlock or with atomic operations.
unsafe impl Send for DmaFence {}
// SAFETY: As above, concurrent access through shared references is synchronised by the C side.
unsafe impl Sync for DmaFence {}

// SAFETY: The C side keeps the fence alive while its reference count is non-zero.
unsafe impl AlwaysRefCounted for DmaFence {
    #[inline]
    fn inc_ref(&self) {
        // SAFETY: By the type invariants the reference count is non-zero.
        unsafe { bindings::dma_fence_get(self.as_raw()) };
    }

    #[inline]
    unsafe fn dec_ref(obj: NonNull<Self>) {
        // SAFETY: The caller owns a reference to the fence. Putting it may free the fence, which
        // happens through `dma_fence_release()`; that is allowed in any context.
        unsafe { bindings::dma_fence_put(obj.cast().as_ptr()) }
    }
}

impl DmaFence {
    /// Returns a reference to a fence given as a raw pointer.
    ///
    /// # Safety
    ///
    /// `ptr` must be non-null and point to an initialised `struct dma_fence` on which a reference
    /// is held for the whole lifetime `'a`.
    #[inline]
    pub unsafe fn from_raw<'a>(ptr: *const bindings::dma_fence) -> &'a Self {
        // SAFETY: `DmaFence` is a transparent wrapper of `struct dma_fence`, and the caller
        // guarantees that the fence stays alive during `'a`.
        unsafe { &*ptr.cast() }
    }

    /// Takes a new reference to a fence given as a raw pointer, which may be null.
    ///
    /// Returns [`None`] for a null pointer, for example the result of a C function that found no
    /// fence.
    ///
    /// # Safety
    ///
    /// `ptr` must be null, or point to an initialised `struct dma_fence` on which the caller holds
    /// a reference for the duration of the call.
    pub unsafe fn get_raw(ptr: *mut bindings::dma_fence) -> Option<ARef<Self>> {
        // SAFETY: The caller guarantees that a non-null `ptr` is a valid, referenced fence.
        NonNull::new(ptr).map(|p| ARef::from(unsafe { Self::from_raw(p.as_ptr()) }))
    }

    /// Returns the raw `struct dma_fence` pointer, for example to hand the fence to C code.
    ///
    /// The pointer is valid as long as a reference is held; C code that keeps it must take its
    /// own reference with `dma_fence_get()`.
    #[inline]
    pub fn as_raw(&self) -> *mut bindings::dma_fence {
        self.0.get()
    }

    /// Returns the kernel's stub fence: a fence that is always signalled.
    pub fn stub() -> ARef<Self> {
        // SAFETY: `dma_fence_get_stub()` always returns a valid fence with a new reference, which
        // `ARef` takes over.
        unsafe {
            ARef::from_raw(NonNull::new_unchecked(
                bindings::dma_fence_get_stub().cast(),
            ))
        }
    }

    /// Returns the context (timeline) of the fence.
    #[inline]
    pub fn context(&self) -> u64 {
        // SAFETY: By the type invariants the fence is valid; `context` never changes.
        unsafe { (*self.as_raw()).context }
    }

    /// Returns the sequence number of the fence in its context.
    #[inline]
    pub fn seqno(&self) -> u64 {
        // SAFETY: By the type invariants the fence is valid; `seqno` never changes.
        unsafe { (*self.as_raw()).seqno }
    }

    /// Returns whether the fence has signalled.
    ///
    /// Like `dma_fence_is_signaled()`, this may ask the producer and signal the fence. It reads the
    /// signalled bit without the fence lock: it can be `true` while the signaller is still running
    /// the fence's callbacks, and nothing orders it before the fence's error. A decision that
    /// depends on the result or on what the callbacks did must use [`DmaFence::status`].
    #[inline]
    pub fn is_signaled(&self) -> bool {
        // SAFETY: By the type invariants the fence is valid.
        unsafe { bindings::dma_fence_is_signaled(self.as_raw()) }
    }

    /// Returns [`None`] while the fence is pending, and the result it signalled with once it has
    /// signalled.
    ///
    /// It takes the fence lock, so once it returns a result, the signaller's callbacks have run
    /// and its error is read in order.
    pub fn status(&self) -> Option<Result> {
        // SAFETY: By the type invariants the fence is valid.
        match unsafe { bindings::dma_fence_get_status(self.as_raw()) } {
            0 => None,
            status if status > 0 => Some(Ok(())),
            error => Some(error_to_result(error)),
        }
    }

    /// Returns when the fence signalled, or [`None`] while it is pending.
    ///
    /// Also [`None`] if the producer passed `dma_fence_signal_timestamp()` a time that is not a
    /// `CLOCK_MONOTONIC` time of the past (negative or later than now): C producers are trusted
    /// with the clock, but an [`Instant`] must be valid.
    pub fn timestamp(&self) -> Option<Instant<Monotonic>> {
        let raw = self.as_raw();
        // SAFETY: By the type invariants the fence is valid. The signaller sets the signalled bit
        // and the timestamp inside the fence lock, so under it a signalled fence has its
        // timestamp: `dma_fence_timestamp()` neither warns nor spins, and reads it in order.
        let ktime = unsafe {
            let flags = bindings::dma_fence_lock_irqsave(raw);
            let ktime = bindings::dma_fence_test_signaled_flag(raw)
                .then(|| bindings::dma_fence_timestamp(raw));
            bindings::dma_fence_unlock_irqrestore(raw, flags);
            ktime
        }?;
        // SAFETY: `ktime_get()` can be called from any context.
        let now = unsafe { bindings::ktime_get() };
        if !(0..=now).contains(&ktime) {
            return None;
        }
        // SAFETY: `ktime` was just checked to be between 0 and now, which is below `KTIME_MAX`.
        Some(unsafe { Instant::from_ktime(ktime) })
    }

    /// Returns whether this fence is later on its timeline than `other`.
    ///
    /// Fails with `EINVAL` if the fences belong to different contexts: their sequence numbers
    /// cannot be compared. Sequence numbers of fences made with `dma_fence_init()` wrap around at
    /// 32 bits, those of [`FenceContext`] fences are 64-bit.
    pub fn is_later(&self, other: &DmaFence) -> Result<bool> {
        if self.context() != other.context() {
            return Err(EINVAL);
        }
        // SAFETY: Both fences are valid, and they have the same context, so
        // `dma_fence_is_later()` does not warn.
        Ok(unsafe { bindings::dma_fence_is_later(self.as_raw(), other.as_raw()) })
    }

    /// Asks the producer to signal the fence as soon as it can (`dma_fence_enable_signaling()`).
    pub fn enable_signaling(&self) {
        // SAFETY: By the type invariants the fence is valid.
        unsafe { bindings::dma_fence_enable_signaling(self.as_raw()) }
    }

    /// Tells the fence's producer that a waiter would like it to signal by `deadline`
    /// (`dma_fence_set_deadline()`): a hint, which the producer may use to raise clocks or
    /// choose what runs first, or ignore. Can be called from any context.
    pub fn set_deadline(&self, deadline: Instant<Monotonic>) {
        // SAFETY: By the type invariants the fence is valid. `dma_fence_set_deadline()` can be
        // called from any context.
        unsafe { bindings::dma_fence_set_deadline(self.as_raw(), deadline.as_nanos()) };
    }

    fn wait_raw(&self, interruptible: bool, timeout: Option<Delta>) -> Result {
        let jiffies = match timeout {
            None => crate::task::MAX_SCHEDULE_TIMEOUT,
            Some(t) => {
                let ms = t.as_millis_ceil().clamp(0, i64::from(u32::MAX >> 1));
                // Cannot overflow: `ms` fits in 31 bits.
                msecs_to_jiffies(ms as u32) as c_long
            }
        };
        let fence = self.as_raw();
        // SAFETY: By the type invariants the fence is valid; `jiffies` is not negative.
        let ret = unsafe { bindings::dma_fence_wait_timeout(fence, interruptible, jiffies) };
        match ret {
            r if r > 0 => Ok(()),
            0 => Err(ETIMEDOUT),
            e => Err(Error::from_errno(e as c_int)),
        }
    }

    /// Waits until the fence signals, interruptibly.
    ///
    /// Returns `Ok(())` once the fence has signalled, whatever its result (see
    /// [`DmaFence::status`]), or `ERESTARTSYS` if a signal is pending. Sleeps: must not be called
    /// in a fence signalling critical section.
    pub fn wait(&self) -> Result {
        self.wait_raw(true, None)
    }

    /// Waits until the fence signals or `timeout` passes, interruptibly.
    ///
    /// Returns `Ok(())` once the fence has signalled, `ETIMEDOUT` if the timeout passed first, or
    /// `ERESTARTSYS` if a signal is pending.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::dma_fence::FenceContext;
    /// use kernel::time::Delta;
    ///
    /// let ctx = FenceContext::new(c"example", c"never");
    /// let fence = ctx.new_fence(GFP_KERNEL)?;
    /// assert_eq!(fence.wait_timeout(Delta::from_millis(10)), Err(ETIMEDOUT));
    /// fence.signal(Ok(()));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn wait_timeout(&self, timeout: Delta) -> Result {
        self.wait_raw(true, Some(timeout))
    }

    /// Waits until the fence signals or `timeout` passes, not interruptible by signals.
    ///
    /// Returns `Ok(())` once the fence has signalled or `ETIMEDOUT`.
    pub fn wait_uninterruptible_timeout(&self, timeout: Delta) -> Result {
        self.wait_raw(false, Some(timeout))
    }

    /// Returns the nesting level of the fence if it was created by a [`FenceContext`] and has not
    /// signalled yet, and 0 for every other fence.
    fn nesting_level(&self) -> u32 {
        // SAFETY: By the type invariants the fence is valid. `ops` is only compared, never
        // dereferenced, so it needs no RCU protection.
        let ops = unsafe { ptr::read_volatile(ptr::addr_of!((*self.as_raw()).ops)) };
        if ptr::eq(ops, &FENCE_OPS) {
            // SAFETY: Fences that use `FENCE_OPS` were created by `FenceContext::init_fence`, and
            // by the type invariants this one is valid.
            unsafe { raw_level(self.as_raw()) }
        } else {
            0
        }
    }
}

/// Memory for one fence, allocated ahead of time.
///
/// Turning it into a fence with [`FenceContext::init_fence`] cannot fail and does not allocate,
/// so fences can be created in a fence signalling critical section (for example when a job is
/// pushed to the hardware) from memory allocated before.
pub struct FenceAllocation(KBox<MaybeUninit<RawFence>>);

// SAFETY: The allocation is uninitialised memory that nothing else points to.
unsafe impl Send for FenceAllocation {}
// SAFETY: As above; a shared reference gives no access to the memory.
unsafe impl Sync for FenceAllocation {}

impl FenceAllocation {
    /// Allocates the memory of one fence.
    pub fn new(flags: Flags) -> Result<Self, AllocError> {
        Ok(Self(KBox::new_uninit(flags)?))
    }
}

/// A timeline of fences (a DMA fence context).
///
/// It owns a context number from `dma_fence_context_alloc()`, hands out increasing sequence
/// numbers, and names the driver and the timeline in debug output and traces. The fences of a
/// timeline must signal in the order of their sequence numbers: other drivers rely on that to
/// tell which fence is later. Its fences have nesting level 0; [`NestedFenceContext`] makes
/// fences of higher levels.
///
/// # Fences and module unload
///
/// The names are `'static` and only read while a fence is unsignalled, under RCU
/// (`dma_fence_driver_name()`, `dma_fence_timeline_name()`). Fences of a context detach from its
/// code and names when they signal (they have neither `release` nor `wait` operations, and their
/// operations live in vmlinux), so signalled fences may outlive the context and the module that
/// created them: unloading a module waits for an RCU grace period (`synchronize_rcu()` in
/// `free_module()`) before its memory goes. An unsignalled fence holds a reference on the module
/// whose memory holds its context's driver name (or, if that is in vmlinux, its timeline name):
/// a fence that is never signalled, because its [`UniqueFence`] was leaked with
/// [`core::mem::forget`] or in a reference cycle, keeps that module loaded (`rmmod` fails with
/// `EBUSY`) instead of leaving a fence that points into freed memory. What remains the user's
/// duty: both names must live in the same module (or in vmlinux), since only one is pinned.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::FenceContext;
///
/// let ctx = FenceContext::new(c"example", c"ring0");
/// let first = ctx.new_fence(GFP_KERNEL)?;
/// let second = ctx.new_fence(GFP_KERNEL)?;
/// assert_eq!(first.context(), ctx.context());
/// assert!(second.is_later(&first)?);
/// first.signal(Ok(()));
/// second.signal(Ok(()));
/// # Ok::<(), Error>(())
/// ```
///
/// # Invariants
///
/// `owner` is the module whose memory holds `driver_name`, or else `timeline_name`, or null if
/// both are in vmlinux. `level` is at most [`MAX_NESTING_LEVEL`].
pub struct FenceContext {
    context: u64,
    seqno: Atomic<u64>,
    driver_name: &'static CStr,
    timeline_name: &'static CStr,
    owner: *mut bindings::module,
    level: u32,
}

// SAFETY: `owner` is only passed to `__module_get()`, which works from any thread; the rest is
// plain data and an atomic counter.
unsafe impl Send for FenceContext {}
// SAFETY: As above; shared references only read the fields and increment the atomic counter.
unsafe impl Sync for FenceContext {}

impl FenceContext {
    /// Creates a new timeline whose fences have nesting level 0.
    pub fn new(driver_name: &'static CStr, timeline_name: &'static CStr) -> Self {
        Self::with_level(driver_name, timeline_name, 0)
    }

    /// Creates a new timeline whose fences have nesting level `level`, at most
    /// [`MAX_NESTING_LEVEL`].
    fn with_level(driver_name: &'static CStr, timeline_name: &'static CStr, level: u32) -> Self {
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let context = unsafe { bindings::dma_fence_context_alloc(1) };
        let owner = match module_of(driver_name.as_char_ptr().cast()) {
            owner if owner.is_null() => module_of(timeline_name.as_char_ptr().cast()),
            owner => owner,
        };
        // INVARIANT: `owner` was looked up from the names; the callers pass a valid level.
        Self {
            context,
            seqno: Atomic::new(0),
            driver_name,
            timeline_name,
            owner,
            level,
        }
    }

    /// Returns the context number of the timeline.
    #[inline]
    pub fn context(&self) -> u64 {
        self.context
    }

    /// Returns the nesting level of the timeline's fences.
    #[inline]
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Returns the sequence number of the last fence created, 0 if there was none.
    #[inline]
    pub fn last_seqno(&self) -> u64 {
        self.seqno.load(ordering::Relaxed)
    }

    /// Allocates and initialises a new unsignalled fence on this timeline.
    pub fn new_fence(&self, flags: Flags) -> Result<UniqueFence> {
        Ok(self.init_fence(FenceAllocation::new(flags)?))
    }

    /// Initialises a new unsignalled fence on this timeline in preallocated memory.
    ///
    /// Does not allocate and cannot fail. The fence gets the next sequence number.
    pub fn init_fence(&self, alloc: FenceAllocation) -> UniqueFence {
        let seqno = self.seqno.fetch_add(1, ordering::Relaxed) + 1;
        let raw = KBox::into_raw(alloc.0).cast::<RawFence>();
        // CAST: `base` is the first field of the `repr(C)` `RawFence`.
        let fence = raw.cast::<bindings::dma_fence>();
        // By the type invariants the level is at most `MAX_NESTING_LEVEL`: it indexes the arrays.
        let level = self.level as usize;
        // SAFETY: The names are in `self.owner`'s memory, which is loaded while they are used, as
        // `'static` names of a module are: the reference keeps it loaded until the fence signals.
        unsafe { module_get(self.owner) };
        // SAFETY: `raw` is a valid allocation for a `RawFence`, which we own. The names are written
        // before `dma_fence_init64()`, which may already read them (trace point). The memory comes
        // from kmalloc, so the C side can free it with `dma_fence_free()`. The lock class key is
        // static and the lock was just initialised by `dma_fence_init64()`, before any use.
        // INVARIANT: The names come from `&'static CStr`s held by `self.owner` or vmlinux, the
        // fence holds the reference on `self.owner` just taken, its level bits are set before it
        // is shared, and no proxy drives it yet.
        unsafe {
            ptr::addr_of_mut!((*raw).driver_name).write(self.driver_name.as_char_ptr());
            ptr::addr_of_mut!((*raw).timeline_name).write(self.timeline_name.as_char_ptr());
            ptr::addr_of_mut!((*raw).owner).write(self.owner);
            ptr::addr_of_mut!((*raw).deadline).write(ptr::null_mut());
            bindings::dma_fence_init64(fence, &FENCE_OPS, ptr::null_mut(), self.context, seqno);
            // Nothing else sees the fence yet: a plain write of the level bits is fine.
            (*fence).flags |= (self.level as c_ulong) << LEVEL_SHIFT;
            bindings::dma_fence_set_lock_class(
                fence,
                LOCK_CLASSES[level].as_ptr(),
                LOCK_NAMES[level].as_char_ptr(),
            );
        }
        // INVARIANT: The fence was just initialised, is unsignalled, and the initial reference of
        // `dma_fence_init64()` is handed to the `UniqueFence`.
        UniqueFence {
            // SAFETY: `fence` is non-null, and we own its initial reference.
            fence: ManuallyDrop::new(unsafe {
                ARef::from_raw(NonNull::new_unchecked(fence.cast()))
            }),
        }
    }
}

/// A timeline whose fences have a nesting level of at least 1: the fences a [`ProxyFence`]
/// drives.
///
/// A fence of level `n` may be signalled from the signalling path of fences of levels below `n`
/// (as a [`ProxyFence`] is), and each level has its own lockdep class, as `dma_fence_array` and
/// `dma_fence_chain` have for theirs.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{NestedFenceContext, MAX_NESTING_LEVEL};
///
/// let done = NestedFenceContext::new(c"example", c"done", 1)?;
/// assert_eq!(done.level(), 1);
/// assert_eq!(NestedFenceContext::new(c"example", c"flat", 0).err(), Some(EINVAL));
/// assert!(NestedFenceContext::new(c"example", c"deep", MAX_NESTING_LEVEL + 1).is_err());
/// # Ok::<(), Error>(())
/// ```
///
/// # Invariants
///
/// The level of `ctx` is between 1 and [`MAX_NESTING_LEVEL`].
pub struct NestedFenceContext {
    ctx: FenceContext,
}

impl NestedFenceContext {
    /// Creates a new timeline whose fences have nesting level `level`.
    ///
    /// Fails with `EINVAL` if `level` is 0 (use [`FenceContext`]) or above
    /// [`MAX_NESTING_LEVEL`].
    pub fn new(
        driver_name: &'static CStr,
        timeline_name: &'static CStr,
        level: u32,
    ) -> Result<Self> {
        if !(1..=MAX_NESTING_LEVEL).contains(&level) {
            return Err(EINVAL);
        }
        // INVARIANT: `level` was just checked.
        Ok(Self {
            ctx: FenceContext::with_level(driver_name, timeline_name, level),
        })
    }

    /// Returns the context number of the timeline.
    #[inline]
    pub fn context(&self) -> u64 {
        self.ctx.context()
    }

    /// Returns the nesting level of the timeline's fences.
    #[inline]
    pub fn level(&self) -> u32 {
        self.ctx.level()
    }

    /// Returns the sequence number of the last fence created, 0 if there was none.
    #[inline]
    pub fn last_seqno(&self) -> u64 {
        self.ctx.last_seqno()
    }

    /// Allocates and initialises a new unsignalled fence on this timeline.
    pub fn new_fence(&self, flags: Flags) -> Result<NestedFence> {
        Ok(self.init_fence(FenceAllocation::new(flags)?))
    }

    /// Initialises a new unsignalled fence on this timeline in preallocated memory.
    ///
    /// Does not allocate and cannot fail. The fence gets the next sequence number.
    pub fn init_fence(&self, alloc: FenceAllocation) -> NestedFence {
        // INVARIANT: By the type invariants the level of `self.ctx` is at least 1.
        NestedFence(self.ctx.init_fence(alloc))
    }
}

/// The producer's handle on an unsignalled fence of a [`NestedFenceContext`].
///
/// A [`UniqueFence`] whose nesting level is at least 1, which is what a [`ProxyFence`] needs.
///
/// # Invariants
///
/// The fence of the [`UniqueFence`] has a nesting level of at least 1.
pub struct NestedFence(UniqueFence);

impl NestedFence {
    /// Signals the fence: see [`UniqueFence::signal`].
    pub fn signal(self, result: Result) {
        self.0.signal(result)
    }

    /// Returns a new consumer handle on the fence.
    #[inline]
    pub fn to_aref(&self) -> ARef<DmaFence> {
        self.0.to_aref()
    }

    /// Returns the producer's handle, forgetting the level guarantee.
    pub fn into_unique(self) -> UniqueFence {
        self.0
    }
}

impl core::ops::Deref for NestedFence {
    type Target = DmaFence;

    #[inline]
    fn deref(&self) -> &DmaFence {
        &self.0
    }
}

/// The producer's handle on an unsignalled fence.
///
/// Created by a [`FenceContext`]. It cannot be cloned, and [`UniqueFence::signal`] consumes it:
/// a fence is signalled at most once by construction. Dropping it unsignalled signals the fence
/// with `-ECANCELED` and logs a warning, so it is signalled at least once too. Consumers get their
/// own handles with [`UniqueFence::to_aref`] (or through [`Deref`](core::ops::Deref)).
///
/// # Invariants
///
/// `fence` is a fence created by [`FenceContext::init_fence`] (the `base` of a `RawFence`), the
/// handle owns one reference to it, and only this handle signals it.
pub struct UniqueFence {
    fence: ManuallyDrop<ARef<DmaFence>>,
}

impl UniqueFence {
    /// Signals the fence: successfully for `Ok(())`, with the error for `Err(_)`.
    ///
    /// Runs the fence's callbacks, in the caller's context. Can be called from any context,
    /// including hardirq.
    pub fn signal(self, result: Result) {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: By the type invariants the fence is valid and only this handle signals it.
        unsafe { signal_raw(this.fence.as_raw(), result) };
        // SAFETY: `this` is never used again, so its reference can be dropped.
        unsafe { ManuallyDrop::drop(&mut this.fence) };
    }

    /// Returns a new consumer handle on the fence.
    #[inline]
    pub fn to_aref(&self) -> ARef<DmaFence> {
        ARef::from(&**self.fence)
    }
}

impl core::ops::Deref for UniqueFence {
    type Target = DmaFence;

    #[inline]
    fn deref(&self) -> &DmaFence {
        &self.fence
    }
}

impl Drop for UniqueFence {
    fn drop(&mut self) {
        pr_warn!(
            "dma_fence: fence {}:{} dropped unsignalled, signalling -ECANCELED\n",
            self.context(),
            self.seqno()
        );
        // SAFETY: By the type invariants the fence is valid and only this handle signals it.
        unsafe { signal_raw(self.fence.as_raw(), Err(ECANCELED)) };
        // SAFETY: The fence is not used after this point.
        unsafe { ManuallyDrop::drop(&mut self.fence) };
    }
}

/// An annotation of a fence signalling critical section for lockdep.
///
/// Code between [`SignallingSection::begin`] and the drop of the returned guard is code a fence
/// signal depends on: it must not wait for fences, take locks held while waiting for fences, or
/// allocate memory in a way that can enter reclaim. With `CONFIG_LOCKDEP`, lockdep checks that
/// (`dma_fence_begin_signalling()`/`dma_fence_end_signalling()`); otherwise it costs nothing.
/// Sections nest.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{FenceContext, SignallingSection};
///
/// let ctx = FenceContext::new(c"example", c"ring0");
/// let fence = ctx.new_fence(GFP_KERNEL)?;
/// {
///     let _section = SignallingSection::begin();
///     // Only non-blocking work here until the fence is signalled.
///     fence.signal(Ok(()));
/// }
/// # Ok::<(), Error>(())
/// ```
pub struct SignallingSection {
    cookie: bool,
    _not_send: NotThreadSafe,
}

impl SignallingSection {
    /// Begins a fence signalling critical section; it ends when the guard is dropped.
    #[inline]
    #[must_use = "the section ends when the guard is dropped"]
    pub fn begin() -> Self {
        Self {
            // SAFETY: `dma_fence_begin_signalling()` can be called from any context.
            cookie: unsafe { bindings::dma_fence_begin_signalling() },
            _not_send: NotThreadSafe,
        }
    }
}

impl Drop for SignallingSection {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: The cookie comes from the matching `dma_fence_begin_signalling()` on this
        // thread, as the guard cannot be sent to another one.
        unsafe { bindings::dma_fence_end_signalling(self.cookie) }
    }
}

mod private {
    /// Seals [`super::CallbackKind`] and [`super::ProxyHooks`]: only this module can implement
    /// them.
    pub trait Sealed {}

    /// Proves that a [`super::CallbackKind`] or [`super::ProxyHooks`] method is called by this
    /// module.
    pub struct Token(pub(super) ());
}

/// What a [`FenceCallback`] does when its fence signals.
///
/// This trait is sealed: the kinds are the ones of this module, audited for running in atomic
/// context with the fence lock held. Drivers pick one; they cannot implement their own.
pub trait CallbackKind: private::Sealed + Send + Sync {
    /// Performs the action for a fence that signalled with `result`. Called at most once per
    /// arming, in atomic (possibly hardirq) context with the fence lock held, or in the context of
    /// [`FenceCallback::arm`] if the fence had signalled already. Must not sleep, allocate, or
    /// drop anything.
    #[doc(hidden)]
    fn signalled(&self, result: Result, token: private::Token);
}

/// Whether [`FenceCallback::arm`] left the callback waiting or ran it at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// The fence was pending: the action runs when it signals.
    Waiting,
    /// The fence had signalled already: the action ran during [`FenceCallback::arm`].
    RanNow,
}

/// Returns the module whose memory holds `addr`, or null for vmlinux. Takes no reference.
fn module_of(addr: *const c_void) -> *mut bindings::module {
    // SAFETY: The helper only looks the address up, under RCU, and never dereferences it.
    unsafe { bindings::dma_fence_module_of(addr) }
}

/// Takes a reference on `owner` unless it is null (vmlinux).
///
/// # Safety
///
/// `owner` must be null or a module that is not freed during the call.
unsafe fn module_get(owner: *mut bindings::module) {
    // SAFETY: The caller guarantees that `owner` is null or a live module. `__module_get()` works
    // in any context and in every module state.
    unsafe { bindings::dma_fence_module_get(owner) }
}

/// Drops a reference taken with [`module_get`]. `module_put()` is allowed in any context.
///
/// # Safety
///
/// `owner` must be null or a module on which the caller owns a reference, which it gives up.
unsafe fn module_put(owner: *mut bindings::module) {
    // SAFETY: `module_put()` accepts null; otherwise the caller owns a reference on `owner`.
    unsafe { bindings::dma_fence_module_put(owner) }
}

/// The part of a [`FenceCallback`] that the C side and `fence_callback` use.
///
/// It is the first field of the `repr(C)` [`FenceCallback`], so a pointer to it, derived from a
/// pointer to the whole callback, is also a pointer to the callback.
#[repr(C)]
struct CallbackHeader {
    cb: bindings::dma_fence_cb,
    /// `FenceCallback::<K>::run` of the callback this header starts.
    run: unsafe fn(*const CallbackHeader, Result),
    /// The module whose text holds `run`, or null for vmlinux: it stays loaded while the callback
    /// is linked into a fence.
    owner: *mut bindings::module,
}

/// The function every [`FenceCallback`] registers with the C side.
///
/// It lives in vmlinux: a callback left armed on a fence (leaked, for example) never makes the
/// C side call into the text of an unloaded module, because the module of the kind's code is
/// pinned while the callback is linked, and the reference is dropped here, after that code
/// returned.
///
/// # Safety
///
/// Called by `dma_fence_signal_timestamp_locked()` with the fence lock held, for a `cb` that
/// [`FenceCallback::arm`] linked into `fence`: the `cb` of a [`CallbackHeader`], reached through a
/// pointer derived from its whole [`FenceCallback`], which stays valid while it is linked.
unsafe extern "C" fn fence_callback(
    fence: *mut bindings::dma_fence,
    cb: *mut bindings::dma_fence_cb,
) {
    // CAST: `cb` is the first field of the `repr(C)` `CallbackHeader`.
    let header = cb.cast::<CallbackHeader>();
    // SAFETY: By the safety requirements `header` points to a valid `CallbackHeader`. `new` wrote
    // `run` and `owner`, which never change, before `arm` could link `cb`; `arm` linked it under
    // the fence lock, which this runs under, so the writes are visible here.
    let (run, owner) = unsafe { ((*header).run, (*header).owner) };
    // SAFETY: The fence is valid and has signalled, and this runs on the signalling thread with
    // the fence lock still held. The error was written before the signal: by this module on this
    // thread under the same lock (`signal_raw`), or by a C producer, which dma-fence.h requires to
    // call `dma_fence_set_error()` before it signals. Nobody writes it afterwards, so the read
    // races with no writer.
    let result = error_to_result(unsafe { (*fence).error });
    // SAFETY: `run` belongs to the callback `header` starts, by the invariants of `FenceCallback`,
    // and the callback stays valid until it returns: its owner can only free it after
    // `dma_fence_remove_callback()`, which waits for the fence lock.
    unsafe { run(header, result) };
    // SAFETY: `arm` took a reference on `owner` for this linking of `cb`, which ends here: `cb`
    // was unlinked by the C side before it called us.
    unsafe { module_put(owner) };
}

/// Returns the result of a fence that has signalled.
///
/// The error is read under the fence lock: a lock-free check of the signalled bit (as in
/// `dma_fence_add_callback()`) is not ordered before a plain read of the error on weakly
/// ordered CPUs, but the signaller sets both inside the lock.
fn signalled_result(fence: &DmaFence) -> Result {
    let raw = fence.as_raw();
    // SAFETY: By the type invariants the fence is valid. Taking its lock orders this read after
    // the signaller's write of `error`, which happened before it released the lock; a signalled
    // fence's error is never written again.
    let error = unsafe {
        let flags = bindings::dma_fence_lock_irqsave(raw);
        let error = (*raw).error;
        bindings::dma_fence_unlock_irqrestore(raw, flags);
        error
    };
    error_to_result(error)
}

/// A callback of kind `K` that can be armed on a fence.
///
/// It owns the `struct dma_fence_cb` the C side links into the fence, a reference to the fence it
/// is armed on, and the kind's payload. Allocate it where it can stay pinned (in a `KBox`, or
/// embedded in a pinned structure) before it is needed: arming does not allocate. Dropping or
/// disarming it removes it from the fence (`dma_fence_remove_callback()`); the payload is dropped
/// with the [`FenceCallback`], never in the callback.
///
/// While it is armed, the module whose code runs the action cannot be unloaded: a callback that
/// is leaked armed (with [`core::mem::forget`] or a reference cycle) keeps that module in memory
/// instead of leaving the fence a pointer into freed text.
///
/// # Invariants
///
/// - `header` was initialised by [`FenceCallback::new`]: its `run` is `Self::run` and its `owner`
///   the module whose text holds it (null for vmlinux).
/// - `kind` is initialised and only ever accessed through shared references until the callback is
///   dropped. The C side and `fence_callback` only access `header` and `kind`, both of which are
///   in [`Opaque`] (an `UnsafeCell` that is `!Unpin`): a `&mut FenceCallback` held by the owner
///   while the action runs on another CPU does not claim exclusive access to them.
/// - If `fence` is `Some`, `header.cb` was passed to `dma_fence_add_callback()` for that fence
///   through a pointer derived from the whole callback, and is either still linked in its callback
///   list, with a reference on `owner` taken for it, or has been unlinked by the C side (the
///   fence signalled and `fence_callback` ran or runs, or it was never added because the fence
///   had signalled).
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{Armed, CompleteCompletion, FenceCallback, FenceContext};
/// use kernel::sync::{Arc, Completion};
///
/// let ctx = FenceContext::new(c"example", c"ring0");
/// let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
/// let mut cb = KBox::pin_init(
///     FenceCallback::new(CompleteCompletion::new(done.clone())),
///     GFP_KERNEL,
/// )?;
///
/// // Arming on a signalled fence runs the action at once.
/// assert_eq!(cb.as_mut().arm(kernel::dma_fence::DmaFence::stub()), Armed::RanNow);
/// done.wait_for_completion();
///
/// // Disarming before the fence signals removes the callback.
/// let fence = ctx.new_fence(GFP_KERNEL)?;
/// assert_eq!(cb.as_mut().arm(fence.to_aref()), Armed::Waiting);
/// assert!(cb.as_mut().disarm());
/// fence.signal(Ok(()));
/// # Ok::<(), Error>(())
/// ```
#[pin_data(PinnedDrop)]
#[repr(C)]
pub struct FenceCallback<K> {
    #[pin]
    header: Opaque<CallbackHeader>,
    fence: Option<ARef<DmaFence>>,
    #[pin]
    kind: Opaque<K>,
}

// SAFETY: The `struct dma_fence_cb` is only touched by the C side under the fence lock and by
// `arm`/`disarm`, which need exclusive access; the module pointer is only passed to the module
// reference functions, which work from any thread; the payload is `Send`.
unsafe impl<K: Send> Send for FenceCallback<K> {}
// SAFETY: Shared references only give access to the fence (`Sync`) and to the payload, which is
// `Sync` as every `CallbackKind` is.
unsafe impl<K: Sync> Sync for FenceCallback<K> {}

impl<K> FenceCallback<K> {
    /// Returns the callback's action and payload.
    #[inline]
    pub fn kind(&self) -> &K {
        // SAFETY: By the type invariants `kind` is initialised and only accessed through shared
        // references while `self` exists.
        unsafe { &*self.kind.get() }
    }

    /// Returns the fence the callback is armed on, if any.
    #[inline]
    pub fn fence(&self) -> Option<&DmaFence> {
        self.fence.as_deref()
    }

    /// Returns a pointer to the header of the callback `this` points to, with the provenance of
    /// `this`.
    ///
    /// # Safety
    ///
    /// `this` must point to a valid [`FenceCallback`].
    #[inline]
    unsafe fn raw_header(this: *const Self) -> *mut CallbackHeader {
        // SAFETY: The caller guarantees that `this` is valid; no reference is created.
        Opaque::cast_into(unsafe { ptr::addr_of!((*this).header) })
    }

    /// Disarms the callback.
    ///
    /// Returns `true` if the callback was removed before its action ran, `false` if it was not
    /// armed or the action has run. When this returns, the action is not running on another CPU
    /// either.
    pub fn disarm(self: Pin<&mut Self>) -> bool {
        // SAFETY: Nothing is moved out of the pinned callback; only a raw pointer is derived.
        let this: *mut Self = unsafe { Pin::get_unchecked_mut(self) };
        // SAFETY: `this` comes from a valid, pinned callback to which we have exclusive access.
        unsafe { Self::disarm_raw(this) }
    }

    /// Removes the callback from its fence, before anything of it is borrowed.
    ///
    /// # Safety
    ///
    /// `this` must point to a valid, pinned [`FenceCallback`] to which the caller has exclusive
    /// access, apart from the C side and `fence_callback`.
    unsafe fn disarm_raw(this: *mut Self) -> bool {
        // SAFETY: `fence` is only accessed by the owner, who has exclusive access; the C side and
        // `fence_callback` never touch it.
        let slot = unsafe { &mut *ptr::addr_of_mut!((*this).fence) };
        let Some(fence) = slot.take() else {
            return false;
        };
        // SAFETY: `this` is valid.
        let header = unsafe { Self::raw_header(this) };
        // SAFETY: By the type invariants `cb` was passed to `dma_fence_add_callback()` for `fence`,
        // which is valid, through a pointer with the provenance of the whole callback, as `header`
        // has. The C side takes the fence lock, so an action running on another CPU has returned
        // once this returns.
        let removed = unsafe { bindings::dma_fence_remove_callback(fence.as_raw(), header.cast()) };
        if removed {
            // SAFETY: `cb` was still linked, so by the type invariants a reference on `owner` was
            // taken for it; nothing will call `fence_callback` for it any more.
            unsafe { module_put((*header).owner) };
        }
        removed
    }
}

impl<K: CallbackKind> FenceCallback<K> {
    /// Creates an unarmed callback that will perform `kind`.
    pub fn new(kind: K) -> impl PinInit<Self> {
        let run: unsafe fn(*const CallbackHeader, Result) = Self::run;
        let owner = module_of(run as *const c_void);
        // INVARIANT: `run` is `Self::run` and `owner` the module that holds its text; `kind` is
        // initialised.
        pin_init!(Self {
            header <- Opaque::ffi_init(move |slot: *mut CallbackHeader| {
                // SAFETY: `slot` is valid for writes. `cb` is left uninitialised until `arm`
                // links it; `run` and `owner` are written here and never change.
                unsafe {
                    ptr::addr_of_mut!((*slot).run).write(run);
                    ptr::addr_of_mut!((*slot).owner).write(owner);
                }
            }),
            fence: None,
            kind: Opaque::new(kind),
        })
    }

    /// Arms the callback on `fence`, disarming it first if it was armed.
    ///
    /// If the fence has signalled already, the action runs at once, in the caller's context, and
    /// [`Armed::RanNow`] is returned. Otherwise it runs when the fence signals.
    pub fn arm(self: Pin<&mut Self>, fence: ARef<DmaFence>) -> Armed {
        // SAFETY: Nothing is moved out of the pinned callback; only a raw pointer is derived, so
        // that every pointer handed to the C side has the provenance of the whole callback.
        let this: *mut Self = unsafe { Pin::get_unchecked_mut(self) };
        // SAFETY: `this` comes from a valid, pinned callback to which we have exclusive access.
        unsafe { Self::disarm_raw(this) };
        // SAFETY: `this` is valid.
        let header = unsafe { Self::raw_header(this) };
        // SAFETY: `owner` was written by `new` and never changes.
        let owner = unsafe { (*header).owner };
        let raw_fence = fence.as_raw();
        // SAFETY: The callback is disarmed, so only we access `fence`.
        unsafe { *ptr::addr_of_mut!((*this).fence) = Some(fence) };
        // SAFETY: `owner` holds the text of `Self::run`, which is running code of ours: it is
        // loaded. The reference is for the linking below.
        unsafe { module_get(owner) };
        // SAFETY: The fence is valid and referenced by `(*this).fence` while the callback may be
        // linked. `header` derives from the whole pinned callback, which stays valid until the
        // callback is removed in `disarm_raw`, which `drop` calls; `cb` is its first field.
        let ret = unsafe {
            bindings::dma_fence_add_callback(raw_fence, header.cast(), Some(fence_callback))
        };
        // INVARIANT: `cb` was passed to `dma_fence_add_callback()` for `(*this).fence`, with a
        // reference on `owner` if it is now linked.
        if ret == 0 {
            return Armed::Waiting;
        }
        // Not linked: the reference is not needed.
        // SAFETY: We took it above and nothing else will drop it.
        unsafe { module_put(owner) };
        // SAFETY: `(*this).fence` holds a reference for the duration of the call.
        let fence = unsafe { DmaFence::from_raw(raw_fence) };
        let result = if ret == ENOENT.to_errno() {
            signalled_result(fence)
        } else {
            // `dma_fence_add_callback()` only fails otherwise for a null fence or function,
            // which it is never given. Run the action all the same, so that it happens.
            crate::warn_on!(true);
            Err(EINVAL)
        };
        // SAFETY: `this` is valid and the callback is not linked, so the action is not running
        // anywhere else.
        unsafe { Self::run(header, result) };
        Armed::RanNow
    }

    /// Runs the action of the callback `header` starts.
    ///
    /// # Safety
    ///
    /// `header` must be the header of a valid `FenceCallback<K>`, reached through a pointer derived
    /// from the whole callback, and the action must not run for the current arming elsewhere.
    unsafe fn run(header: *const CallbackHeader, result: Result) {
        // CAST: `header` is the first field of the `repr(C)` `FenceCallback<K>`, and its pointer
        // has the provenance of the whole callback.
        let this = header.cast::<Self>();
        // SAFETY: By the safety requirements `this` is valid; by the type invariants `kind` is
        // initialised and only shared references to it exist.
        let kind = unsafe { &*Opaque::cast_into(ptr::addr_of!((*this).kind)) };
        kind.signalled(result, private::Token(()));
    }
}

#[pinned_drop]
impl<K> PinnedDrop for FenceCallback<K> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: Nothing is moved out of the pinned callback.
        let this: *mut Self = unsafe { Pin::get_unchecked_mut(self) };
        // SAFETY: `this` is valid, pinned and ours; the drop glue drops nothing of it before this.
        unsafe { Self::disarm_raw(this) };
        // SAFETY: The callback is not linked any more and the action is not running (see
        // `disarm`), so nothing refers to `kind`; `Opaque` does not drop it, so it is dropped once,
        // here, in the owner's context.
        unsafe { ptr::drop_in_place(Opaque::cast_into(ptr::addr_of!((*this).kind))) };
    }
}

/// A [`CallbackKind`] that wakes a task up.
///
/// The task must set its state before it checks the fence (or its own condition) and goes to
/// sleep, as for any wake-up: a wake-up between the check and the sleep is lost otherwise.
pub struct WakeTask {
    task: ARef<Task>,
}

impl WakeTask {
    /// Wakes `task` when the fence signals.
    pub fn new(task: ARef<Task>) -> Self {
        Self { task }
    }

    /// Wakes the current task when the fence signals.
    pub fn current() -> Self {
        let current = current!();
        let task: &Task = current;
        Self::new(task.into())
    }

    /// Returns the task that is woken.
    pub fn task(&self) -> &Task {
        &self.task
    }
}

impl private::Sealed for WakeTask {}

impl CallbackKind for WakeTask {
    fn signalled(&self, _result: Result, _: private::Token) {
        // `wake_up_process()` takes the runqueue lock with interrupts disabled: fine in any
        // context. The task reference is only read.
        self.task.wake_up();
    }
}

/// A [`CallbackKind`] that completes a [`Completion`] with `complete_all()`.
pub struct CompleteCompletion {
    completion: Arc<Completion>,
}

impl CompleteCompletion {
    /// Completes `completion` when the fence signals.
    pub fn new(completion: Arc<Completion>) -> Self {
        Self { completion }
    }

    /// Returns the completion.
    pub fn completion(&self) -> &Completion {
        &self.completion
    }
}

impl private::Sealed for CompleteCompletion {}

impl CallbackKind for CompleteCompletion {
    fn signalled(&self, _result: Result, _: private::Token) {
        // `complete_all()` takes the completion's wait queue lock with interrupts disabled: fine
        // in any context. The `Arc` is only read.
        self.completion.complete_all();
    }
}

/// A workqueue for work that fences depend on: the only kind [`EnqueueWork`] queues on.
///
/// Work that a fence signal waits for must make progress when memory is short: the queue has a
/// rescuer thread (`WQ_MEM_RECLAIM`), as drm_sched's queues have, so it does not wait for the
/// allocation of a worker that may wait for reclaim, which may wait for the fence. Its work
/// runs in process context (never `WQ_BH`, whose work runs in softirq), where it may sleep.
///
/// # Invariants
///
/// `queue` was allocated with `WQ_MEM_RECLAIM` and without `WQ_BH`.
pub struct FenceWorkqueue {
    queue: OwnedQueue,
}

impl FenceWorkqueue {
    /// Allocates an ordered workqueue for fence work, named `name`.
    pub fn new_ordered(name: &CStr) -> Result<Self> {
        // INVARIANT: `OwnedQueue::new_ordered()` allocates with `WQ_MEM_RECLAIM` and not `WQ_BH`.
        Ok(Self {
            queue: OwnedQueue::new_ordered(name)?,
        })
    }

    /// Allocates an unordered, unbound workqueue for fence work, named `name`.
    pub fn new_unbound(name: &CStr) -> Result<Self> {
        // INVARIANT: `OwnedQueue::new_unbound()` allocates with `WQ_MEM_RECLAIM` and not `WQ_BH`.
        Ok(Self {
            queue: OwnedQueue::new_unbound(name)?,
        })
    }

    /// Waits until every work item queued so far has finished running.
    ///
    /// Must not be called from a work item running on this queue.
    pub fn flush(&self) {
        self.queue.flush();
    }
}

impl core::ops::Deref for FenceWorkqueue {
    type Target = Queue;

    fn deref(&self) -> &Queue {
        &self.queue
    }
}

/// A work item whose job is to signal fences: its `run` is a fence signalling critical section.
///
/// Implementing it implements [`WorkItem`] with an [`Arc`] pointer: the work item begins a
/// [`SignallingSection`] and hands it to [`SignallingWorkItem::run`], so lockdep checks that
/// nothing the work does waits for a fence or allocates in a way that can wait for reclaim.
/// Queue it with [`EnqueueWork`] or on a [`FenceWorkqueue`].
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{
///     EnqueueWork, FenceCallback, FenceContext, FenceWorkqueue, SignallingSection,
///     SignallingWorkItem, UniqueFence,
/// };
/// use kernel::sync::{Arc, ArcBorrow, SpinLock};
/// use kernel::workqueue::{impl_has_work, new_work, Work};
/// use kernel::{new_spinlock, sync::aref::ARef};
///
/// /// Signals `out` once its input fence has signalled.
/// #[pin_data]
/// struct Relay {
///     #[pin]
///     work: Work<Relay>,
///     #[pin]
///     out: SpinLock<Option<UniqueFence>>,
/// }
///
/// impl_has_work! {
///     impl HasWork<Self> for Relay { self.work }
/// }
///
/// impl SignallingWorkItem for Relay {
///     fn run(this: ArcBorrow<'_, Relay>, _section: &SignallingSection) {
///         if let Some(fence) = this.out.lock().take() {
///             fence.signal(Ok(()));
///         }
///     }
/// }
///
/// let ctx = FenceContext::new(c"example", c"relay");
/// let (input, out) = (ctx.new_fence(GFP_KERNEL)?, ctx.new_fence(GFP_KERNEL)?);
/// let out_view = out.to_aref();
/// let relay = Arc::pin_init(
///     pin_init!(Relay { work <- new_work!("Relay::work"), out <- new_spinlock!(Some(out)) }),
///     GFP_KERNEL,
/// )?;
/// let wq = Arc::new(FenceWorkqueue::new_ordered(c"example-relay")?, GFP_KERNEL)?;
/// let mut cb = KBox::pin_init(FenceCallback::new(EnqueueWork::new(wq, relay)), GFP_KERNEL)?;
/// cb.as_mut().arm(input.to_aref());
/// input.signal(Ok(()));
/// out_view.wait()?;
/// # Ok::<(), Error>(())
/// ```
pub trait SignallingWorkItem<const ID: u64 = 0>: Sized {
    /// Does the work, inside `section`.
    ///
    /// The work item's reference is dropped after the section ended, so that the last reference
    /// to a driver's object is never dropped inside it.
    fn run(this: ArcBorrow<'_, Self>, section: &SignallingSection);
}

impl<T, const ID: u64> WorkItem<ID> for T
where
    T: SignallingWorkItem<ID> + HasWork<T, ID> + Send + Sync,
{
    type Pointer = Arc<T>;

    fn run(this: Arc<T>) {
        {
            let section = SignallingSection::begin();
            <T as SignallingWorkItem<ID>>::run(this.as_arc_borrow(), &section);
        }
        drop(this);
    }
}

/// A [`CallbackKind`] that enqueues a work item on a [`FenceWorkqueue`].
///
/// This is the kind to use for anything but the simplest actions: the work item runs in process
/// context, where it may sleep and drop what it likes (outside a [`SignallingSection`]). If the
/// work item is still pending when the fence signals, it is not queued a second time.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{EnqueueWork, FenceCallback, FenceContext, FenceWorkqueue};
/// use kernel::sync::{Arc, Completion};
/// use kernel::workqueue::{impl_has_work, new_work, Work, WorkItem};
///
/// #[pin_data]
/// struct Retire {
///     #[pin]
///     work: Work<Retire>,
///     #[pin]
///     done: Completion,
/// }
///
/// impl_has_work! {
///     impl HasWork<Self> for Retire { self.work }
/// }
///
/// impl WorkItem for Retire {
///     type Pointer = Arc<Retire>;
///
///     fn run(this: Arc<Retire>) {
///         // Process context: sleeping and freeing memory are fine here.
///         this.done.complete_all();
///     }
/// }
///
/// let retire = Arc::pin_init(
///     pin_init!(Retire { work <- new_work!("Retire::work"), done <- Completion::new() }),
///     GFP_KERNEL,
/// )?;
/// let ctx = FenceContext::new(c"example", c"ring0");
/// let fence = ctx.new_fence(GFP_KERNEL)?;
/// let wq = Arc::new(FenceWorkqueue::new_ordered(c"example-retire")?, GFP_KERNEL)?;
/// let mut cb = KBox::pin_init(
///     FenceCallback::new(EnqueueWork::new(wq, retire.clone())),
///     GFP_KERNEL,
/// )?;
/// cb.as_mut().arm(fence.to_aref());
/// fence.signal(Ok(()));
/// retire.done.wait_for_completion();
/// # Ok::<(), Error>(())
/// ```
pub struct EnqueueWork<T, const ID: u64 = 0> {
    queue: Arc<FenceWorkqueue>,
    item: Arc<T>,
}

impl<T, const ID: u64> EnqueueWork<T, ID>
where
    T: WorkItem<ID, Pointer = Arc<T>> + HasWork<T, ID> + Send + Sync + 'static,
{
    /// Enqueues `item` on `queue` when the fence signals.
    pub fn new(queue: Arc<FenceWorkqueue>, item: Arc<T>) -> Self {
        Self { queue, item }
    }

    /// Returns the work item.
    pub fn item(&self) -> &Arc<T> {
        &self.item
    }

    /// Returns the workqueue.
    pub fn queue(&self) -> &Arc<FenceWorkqueue> {
        &self.queue
    }
}

impl<T, const ID: u64> private::Sealed for EnqueueWork<T, ID> where
    T: WorkItem<ID, Pointer = Arc<T>> + HasWork<T, ID> + Send + Sync + 'static
{
}

impl<T, const ID: u64> CallbackKind for EnqueueWork<T, ID>
where
    T: WorkItem<ID, Pointer = Arc<T>> + HasWork<T, ID> + Send + Sync + 'static,
{
    fn signalled(&self, _result: Result, _: private::Token) {
        // `queue_work_on()` can be called from any context. The clone only increments a
        // reference count. If the item is already pending, `enqueue` hands the clone back and it
        // is dropped here: that only decrements the count, never to zero, because `self.item`
        // holds a reference for as long as this callback exists.
        let _ = self.queue.enqueue(self.item.clone());
    }
}

/// A [`CallbackKind`] that queues work on a [`kthread::Worker`].
///
/// Like [`EnqueueWork`], for drivers that run their work on a dedicated kernel thread (for
/// example with a real-time priority).
///
/// # Invariants
///
/// `item` is bound to `worker`: queuing it there fails only while it is pending.
pub struct QueueKthreadWork<T, const ID: u64 = 0> {
    worker: Arc<kthread::Worker>,
    item: Arc<T>,
}

impl<T, const ID: u64> QueueKthreadWork<T, ID>
where
    T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>,
{
    /// Queues `item` on `worker` when the fence signals.
    ///
    /// Binds the work item to `worker` now, so that the fence's signal cannot fail to queue it.
    /// Fails with `EINVAL` if the work item is bound to another worker: it was queued there, or
    /// another `QueueKthreadWork` bound it.
    pub fn new(worker: Arc<kthread::Worker>, item: Arc<T>) -> Result<Self> {
        worker.bind(&item)?;
        // INVARIANT: `item` was just bound to `worker`, for good.
        Ok(Self { worker, item })
    }

    /// Returns the work item.
    pub fn item(&self) -> &Arc<T> {
        &self.item
    }
}

impl<T, const ID: u64> private::Sealed for QueueKthreadWork<T, ID> where
    T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>
{
}

impl<T, const ID: u64> CallbackKind for QueueKthreadWork<T, ID>
where
    T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>,
{
    fn signalled(&self, _result: Result, _: private::Token) {
        // `kthread_queue_work()` takes the worker's raw spinlock with interrupts disabled: fine in
        // any context. By the type invariants the item is bound to this worker, so queuing fails
        // only if it is pending already, which runs it all the same; the clone handed back then
        // never drops the last reference, which `self.item` holds.
        let _ = self.worker.queue::<T, ID>(self.item.clone());
    }
}

/// The action of a [`ProxyFence`]: run the proxy's `ProxyHooks::followed`, signal the proxy's
/// fence with the source's result, then run `ProxyHooks::after_signal` if `followed` asked for
/// it.
///
/// # Invariants
///
/// - `target` is only accessed by the action (at most once per arming, serialised with
///   [`FenceCallback::disarm`] by the source's lock), by [`FenceCallback::arm`] when it runs the
///   action at once, or by the owner of the [`ProxyFence`] after disarming it.
/// - `hooks` points to the hooks of the [`ProxyFence`] whose callback this is, which are only
///   accessed through shared references and dropped only once the callback is disarmed.
struct SignalProxy<H> {
    target: UnsafeCell<Option<NestedFence>>,
    hooks: *const H,
}

// SAFETY: `NestedFence` is `Send`, and `hooks` is only used for shared references to an `H`,
// which is `Sync`; see below for the shared access to `target`.
unsafe impl<H: Sync> Send for SignalProxy<H> {}
// SAFETY: By the type invariants the accesses to `target` never overlap, and `hooks` is only used
// for shared references to an `H`, which is `Sync`.
unsafe impl<H: Sync> Sync for SignalProxy<H> {}

impl<H> private::Sealed for SignalProxy<H> {}

impl<H: ProxyHooks> CallbackKind for SignalProxy<H> {
    fn signalled(&self, result: Result, _: private::Token) {
        // SAFETY: By the type invariants nothing else accesses `target` now.
        let target = unsafe { &mut *self.target.get() };
        if let Some(fence) = target.take() {
            // SAFETY: By the type invariants `hooks` is valid while this action can run, and only
            // shared references to it exist.
            let hooks = unsafe { &*self.hooks };
            // Before the signal: whoever sees the fence signalled sees what the hooks did.
            let then = hooks.followed(result, private::Token(()));
            // Signalling takes the target's lock, of a higher lockdep class than the source's, and
            // runs its callbacks, which are kinds of this module. Dropping `fence` only puts a
            // reference: the proxy keeps another one.
            fence.signal(result);
            // The hooks are still valid: the proxy's drop disarms the callback before it drops
            // them, and disarming waits for this action, under the source's lock; when `arm` runs
            // the action at once, its caller holds the proxy.
            if then {
                hooks.after_signal(private::Token(()));
            }
        }
    }
}

/// What a [`ProxyFence`] does besides signalling its fence: its *hooks*.
///
/// This trait is sealed, as [`CallbackKind`] is: the hooks are audited here for the contexts they
/// run in. They are [`NoHook`]; [`EnqueueWork`], which enqueues its work item each time an
/// earlier deadline is set on the proxy's fence; and [`ReturnCredits`], which also gives back a
/// job's credits on its ring when the hardware fence signals the proxy.
pub trait ProxyHooks: private::Sealed + Send + Sync {
    /// An earlier deadline was recorded on the proxy's fence: called in the context of whoever
    /// set it, with the proxy fence's lock held. Must not sleep, allocate, or drop anything.
    #[doc(hidden)]
    fn deadline(&self, token: private::Token);

    /// The source signalled `result`, which the proxy's fence signals right after this returns:
    /// called from the source's signalling path, with the source's lock held (possibly in hardirq
    /// context), or in the context of [`ProxyFence::follow`] if the source had signalled already.
    /// Whoever sees the proxy's fence signalled sees what this did. Not called when the proxy's
    /// fence signals otherwise ([`ProxyFence::signal`], the drop of the proxy). Must not sleep,
    /// allocate, or drop anything. Returns whether [`ProxyHooks::after_signal`] is to run.
    #[doc(hidden)]
    fn followed(&self, result: Result, token: private::Token) -> bool;

    /// The proxy's fence has signalled, after [`ProxyHooks::followed`] asked for this: called in
    /// the same context, right after the signal, so that the fence's waiters are woken first.
    /// Must not sleep, allocate, or drop anything.
    #[doc(hidden)]
    fn after_signal(&self, token: private::Token);
}

impl<T, const ID: u64> ProxyHooks for EnqueueWork<T, ID>
where
    T: WorkItem<ID, Pointer = Arc<T>> + HasWork<T, ID> + Send + Sync + 'static,
{
    fn deadline(&self, token: private::Token) {
        // The callback's action, which may run in any context (see `CallbackKind`).
        self.signalled(Ok(()), token);
    }

    fn followed(&self, _result: Result, _: private::Token) -> bool {
        false
    }

    fn after_signal(&self, _: private::Token) {}
}

/// The credits of a ring: the room of a queue of limited size, such as a GPU's firmware ring,
/// which jobs take when they are handed to it and give back when their hardware fence signals.
///
/// The credits are taken by whoever hands jobs to the ring ([`RingCredits::take_or_wait`]) and
/// given back from the signalling path of the jobs' fences, by the [`ReturnCredits`] hooks of
/// their [`ProxyFence`]s, without a lock. A taker that finds too few registers as waiting: the
/// next return of credits wakes it (enqueues its work item on [`RingCredits::workqueue`]), and
/// no return wakes anyone while no taker waits.
///
/// Several takers may wait at once: the returns wake the one work item they share.
///
/// # Invariants
///
/// `in_use <= capacity`.
pub struct RingCredits {
    capacity: u32,
    in_use: Atomic<u32>,
    /// A taker found too few credits and waits for the next return.
    waiting: Atomic<bool>,
    wq: Arc<FenceWorkqueue>,
}

impl RingCredits {
    /// Creates the credits of a ring of `capacity`, none taken; returns of credits wake a waiting
    /// taker on `wq`.
    pub fn new(capacity: u32, wq: Arc<FenceWorkqueue>) -> Self {
        // INVARIANT: None are in use.
        Self {
            capacity,
            in_use: Atomic::new(0),
            waiting: Atomic::new(false),
            wq,
        }
    }

    /// Returns the number of credits of the ring.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Returns the number of credits taken and not given back, as of now.
    pub fn in_use(&self) -> u32 {
        self.in_use.load(ordering::Relaxed)
    }

    /// Returns the workqueue that the returns of credits enqueue a waiting taker's work on.
    pub fn workqueue(&self) -> &Arc<FenceWorkqueue> {
        &self.wq
    }

    /// Takes `n` credits if the ring has room for them and returns `true`. Otherwise registers
    /// the caller as waiting and returns `false`: the next return of credits wakes it.
    ///
    /// A caller that registered, and then finds room when it looks again, may be woken once for
    /// nothing.
    pub fn take_or_wait(&self, n: u32) -> bool {
        let mut in_use = self.in_use.load(ordering::Acquire);
        loop {
            // By the type invariants `in_use <= capacity`: this does not overflow.
            if n <= self.capacity - in_use {
                // Acquire: pairs with the release of `give_back`, so that what the hardware did
                // with the credits happens before whatever the caller puts in their place.
                // INVARIANT: At most `capacity` are in use after the exchange.
                match self.in_use.cmpxchg(in_use, in_use + n, ordering::Acquire) {
                    Ok(_) => return true,
                    Err(now) => {
                        in_use = now;
                        continue;
                    }
                }
            }
            // Full: the store of `waiting` comes before the load below, as the decrement of
            // `give_back` comes before its load of `waiting`. Either `give_back` sees `waiting`
            // and wakes us, or the load below sees the credits it gave back.
            self.waiting.xchg(true, ordering::Full);
            let now = self.in_use.load(ordering::Acquire);
            if n > self.capacity - now {
                return false;
            }
            in_use = now;
        }
    }

    /// Gives back `n` credits taken with [`RingCredits::take_or_wait`]. Returns `true` if a taker
    /// was waiting: the caller must wake it. Can be called from any context.
    ///
    /// Giving back more than are in use is a bug of the caller: it warns, and none are left in
    /// use.
    #[must_use]
    pub fn give_back(&self, n: u32) -> bool {
        let mut in_use = self.in_use.load(ordering::Relaxed);
        loop {
            let left = in_use.checked_sub(n).unwrap_or_else(|| {
                crate::warn_on!(true);
                0
            });
            // Full: releases what the job did with the credits to the next taker, and orders the
            // decrement before the load of `waiting` (see `take_or_wait`).
            // INVARIANT: The credits in use only go down.
            match self.in_use.cmpxchg(in_use, left, ordering::Full) {
                Ok(_) => break,
                Err(now) => in_use = now,
            }
        }
        self.waiting.load(ordering::Relaxed) && self.waiting.xchg(false, ordering::Relaxed)
    }
}

/// An object whose [`RingCredits`] the [`ReturnCredits`] hooks of its jobs give credits back to.
///
/// # Safety
///
/// [`HasRingCredits::ring_credits`] only returns a reference to a field of `self`: it runs in
/// fence callbacks, in atomic context, where it must not do anything else.
pub unsafe trait HasRingCredits {
    /// Returns the credits of the ring.
    fn ring_credits(&self) -> &RingCredits;
}

/// The [`ProxyHooks`] of the done fence of a job on a ring with [`RingCredits`]: when the job's
/// hardware fence signals, the job's credits go back to the ring before the done fence signals,
/// so that a done fence seen signalled has its credits back. If a taker waits for them, the work
/// item `WAKE` of `T` is enqueued right after the done fence signalled, so that the fence's
/// waiters are woken first, as drm_sched signals a job's finished fence before it queues its
/// work. An earlier deadline on the done fence enqueues the work item `DEADLINE`. Both go on
/// the credits' workqueue.
///
/// The credits go back only when the source signals the proxy: a job whose done fence is
/// signalled otherwise ([`ProxyFence::signal`], [`ProxyFence::detach`] followed by a drop), or
/// that never followed its hardware fence, still holds them, and its owner gives them back with
/// [`RingCredits::give_back`]. For a proxy that followed its source until then,
/// [`ProxyFence::detach`] returning `false` says that the hooks have given them back.
pub struct ReturnCredits<T, const WAKE: u64, const DEADLINE: u64> {
    item: Arc<T>,
    credits: u32,
}

impl<T, const WAKE: u64, const DEADLINE: u64> ReturnCredits<T, WAKE, DEADLINE> {
    /// Gives `credits` back to the ring of `item` when the source signals the proxy.
    pub fn new(item: Arc<T>, credits: u32) -> Self {
        Self { item, credits }
    }
}

impl<T, const W: u64, const D: u64> private::Sealed for ReturnCredits<T, W, D> {}

impl<T, const WAKE: u64, const DEADLINE: u64> ProxyHooks for ReturnCredits<T, WAKE, DEADLINE>
where
    T: HasRingCredits
        + WorkItem<WAKE, Pointer = Arc<T>>
        + HasWork<T, WAKE>
        + WorkItem<DEADLINE, Pointer = Arc<T>>
        + HasWork<T, DEADLINE>
        + Send
        + Sync
        + 'static,
{
    fn deadline(&self, _: private::Token) {
        // As in `EnqueueWork`: `queue_work_on()` can be called from any context, and the clone
        // handed back if the item is pending never drops the last reference, which `self.item`
        // holds. `ring_credits` only returns a field (`HasRingCredits`' safety requirements).
        let wq = self.item.ring_credits().workqueue();
        let _ = wq.enqueue::<Arc<T>, DEADLINE>(self.item.clone());
    }

    fn followed(&self, _result: Result, _: private::Token) -> bool {
        // Atomic operations only. A waiting taker is woken once the done fence has signalled.
        self.item.ring_credits().give_back(self.credits)
    }

    fn after_signal(&self, _: private::Token) {
        // Enqueueing as in `deadline`.
        let wq = self.item.ring_credits().workqueue();
        let _ = wq.enqueue::<Arc<T>, WAKE>(self.item.clone());
    }
}

/// A fence that signals when another fence does, with the same result.
///
/// It owns its fence (a [`NestedFence`], whose nesting level is above its source's) and a
/// callback that signals it from the signalling path of the source: the proxy's consumers see it
/// signal with no deferral. Its fence can be shared before the source is known, which is what a
/// job queue's done fence needs: it exists at submission, the hardware fence only when the job
/// runs.
///
/// If the proxy is dropped while its fence is unsignalled, the fence signals `-ECANCELED`.
///
/// # Deadlines
///
/// A deadline set on the proxy's fence (`dma_fence_set_deadline()`, [`DmaFence::set_deadline`])
/// while the proxy drives it is kept, the earliest one, and passed on to the source, now or when
/// the proxy follows one, as drm_sched passes the deadlines of its finished fences on to the
/// hardware fences. The deadline hook of the proxy's hooks ([`ProxyHooks`], given to
/// [`ProxyFence::with_hooks`]) runs each time an earlier deadline is recorded, in the context of
/// whoever set it, with the proxy fence's lock held, a context the hooks are audited for.
/// [`ProxyFence::deadline`] reads the deadline. Deadlines set before the proxy was created, or
/// after it was dropped, are ignored.
///
/// # Sources and their nesting levels
///
/// The proxy signals inside the source's lock, so lockdep must see the proxy's lock as nested
/// in the source's: the proxy's level must be above the source's. A fence of this module has the
/// level of its context. A fence made in C has no level that Rust can read: it counts as level
/// 0, which is right for fences that are signalled outside any fence's signalling path (from an
/// interrupt handler, a work item, a thread). A C fence that is signalled from a fence callback
/// (drm_sched's finished fence is signalled from its hardware fence's callback) is one level
/// above the fence whose callback signals it: follow it with [`ProxyFence::follow_nested`] and
/// that level. Lockdep tells locks apart by class, not by fence, and the fences of a C producer
/// share the class of its lock: declare one level for all fences of a producer. Declaring a level
/// that is too low, or two levels for one producer, is what is left to the caller; lockdep then
/// reports a possible recursive locking or a circular dependency.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{FenceContext, NestedFenceContext, ProxyFence};
///
/// let hw = FenceContext::new(c"example", c"hw-ring");
/// let done = NestedFenceContext::new(c"example", c"done", 1)?;
///
/// let mut proxy = KBox::pin_init(ProxyFence::new(done.new_fence(GFP_KERNEL)?), GFP_KERNEL)?;
/// let done_fence = proxy.fence().clone();
///
/// let hw_fence = hw.new_fence(GFP_KERNEL)?;
/// proxy.as_mut().follow(hw_fence.to_aref())?;
/// hw_fence.signal(Err(ETIMEDOUT));
/// assert_eq!(done_fence.status(), Some(Err(ETIMEDOUT)));
/// # Ok::<(), Error>(())
/// ```
///
/// # Invariants
///
/// - `fence` is the fence of the [`NestedFence`] the proxy was created with: the `base` of a
///   `RawFence` whose level is at least 1, whose `deadline` points to the slot of `deadline`
///   from the end of the proxy's initialisation until the start of its drop.
/// - The slot's `notify` is `Self::notify` and its `owner` the module that holds its text, on
///   which the proxy holds a reference for as long as the fence points to the slot.
/// - The slot's `source` is null or the fence `callback` is armed on (and holds a reference to).
/// - The `hooks` of `callback`'s kind point to the `hook` of `deadline`, which is dropped only
///   after `callback` is disarmed for good.
#[pin_data(PinnedDrop)]
pub struct ProxyFence<H> {
    #[pin]
    callback: FenceCallback<SignalProxy<H>>,
    fence: ARef<DmaFence>,
    #[pin]
    deadline: Opaque<DeadlineState<H>>,
}

// SAFETY: The slot's pointers are only used under the fence lock, from any thread, and the hook
// is only used through shared references, from any thread: it is `Sync`. The other fields are
// `Send`.
unsafe impl<H: Send + Sync> Send for ProxyFence<H> {}
// SAFETY: Shared references only read the fence and, under its lock, the slot.
unsafe impl<H: Send + Sync> Sync for ProxyFence<H> {}

/// What the `set_deadline` operation of a fence driven by a [`ProxyFence`] reaches.
///
/// Its fields are only accessed under the lock of the proxy's fence.
#[repr(C)]
struct DeadlineSlot {
    /// The earliest deadline set on the fence, `KTIME_MAX` if none was.
    deadline: bindings::ktime_t,
    /// The source the proxy follows, or null.
    source: *mut bindings::dma_fence,
    /// `ProxyFence::<H>::notify` for the proxy this slot is in.
    notify: unsafe fn(*mut DeadlineSlot),
    /// The module whose text holds `notify`, or null for vmlinux.
    owner: *mut bindings::module,
}

/// The deadline slot of a [`ProxyFence`] and its hooks; the slot comes first, so a pointer to it
/// derived from a pointer to the whole is a pointer to the whole.
#[repr(C)]
struct DeadlineState<H> {
    slot: DeadlineSlot,
    hook: H,
}

/// The hooks of a [`ProxyFence`] that has none: does nothing.
pub struct NoHook;

impl private::Sealed for NoHook {}

impl ProxyHooks for NoHook {
    fn deadline(&self, _: private::Token) {}

    fn followed(&self, _result: Result, _: private::Token) -> bool {
        false
    }

    fn after_signal(&self, _: private::Token) {}
}

impl ProxyFence<NoHook> {
    /// Creates a proxy that will drive `fence`, without hooks.
    pub fn new(fence: NestedFence) -> impl PinInit<Self> {
        Self::with_hooks(fence, NoHook)
    }
}

impl<H: ProxyHooks> ProxyFence<H> {
    /// Creates a proxy that will drive `fence` and run `hook`: when an earlier deadline is set on
    /// the fence (see [Deadlines](Self#deadlines)), and when the source signals it.
    pub fn with_hooks(fence: NestedFence, hook: H) -> impl PinInit<Self> {
        let shared = fence.to_aref();
        let notify: unsafe fn(*mut DeadlineSlot) = Self::notify;
        let owner = module_of(notify as *const c_void);
        pin_init!(&this in Self {
            callback <- FenceCallback::new(SignalProxy {
                target: UnsafeCell::new(Some(fence)),
                // INVARIANT: The hooks are the `hook` of `deadline`, initialised below.
                // SAFETY: `this` points to the proxy being initialised: the place is in bounds,
                // and only its address is taken.
                hooks: unsafe {
                    let state = Opaque::cast_into(ptr::addr_of!((*this.as_ptr()).deadline));
                    ptr::addr_of!((*state.cast::<DeadlineState<H>>()).hook)
                },
            }),
            fence: shared,
            deadline: Opaque::new(DeadlineState {
                slot: DeadlineSlot {
                    deadline: bindings::ktime_t::MAX,
                    source: ptr::null_mut(),
                    notify,
                    owner,
                },
                hook,
            }),
        })
        .pin_chain(move |this| {
            let raw = this.fence.as_raw();
            // SAFETY: `owner` holds the text of `Self::notify`, which is in the same module as the
            // code running now: it is loaded. The reference is for the fence's pointer to the
            // slot, set below.
            unsafe { module_get(owner) };
            let slot = Opaque::cast_into(ptr::addr_of!(this.deadline)).cast::<DeadlineSlot>();
            // SAFETY: `fence` is the `base` of a `RawFence`, whose `deadline` is only written under
            // its lock. The slot is pinned with the proxy, which clears the pointer in its drop.
            // INVARIANT: The fence points to the slot from now on, with the module reference
            // just taken.
            unsafe {
                let flags = bindings::dma_fence_lock_irqsave(raw);
                (*raw.cast::<RawFence>()).deadline = slot;
                bindings::dma_fence_unlock_irqrestore(raw, flags);
            }
            Ok(())
        })
    }

    /// Makes the proxy's fence signal when `source` does, with its result.
    ///
    /// If `source` has signalled already, the proxy's fence signals now. Replaces the previous
    /// source, if any. Fails with `EINVAL`, leaving the proxy unchanged, if the nesting level of
    /// `source` is not below the proxy's: signalling the proxy inside the source's lock would then
    /// be lock recursion. A C fence counts as level 0 (see the [type documentation](Self)).
    pub fn follow(self: Pin<&mut Self>, source: ARef<DmaFence>) -> Result {
        self.follow_nested(source, 0)
    }

    /// Like [`ProxyFence::follow`], for a source whose nesting level is at least `level`.
    ///
    /// For a C fence, `level` is the level the caller declares for it: one above the fences
    /// whose callbacks signal it. For a fence of this module the higher of its own level and
    /// `level` counts.
    pub fn follow_nested(mut self: Pin<&mut Self>, source: ARef<DmaFence>, level: u32) -> Result {
        if source.nesting_level().max(level) >= self.level() {
            return Err(EINVAL);
        }
        let raw_source = source.as_raw();
        // Arming drops the reference on the previous source.
        self.set_source(ptr::null_mut());
        self.as_mut().project().callback.arm(source);
        // The slot's lock orders this with `fence_set_deadline()`: either a deadline set from now
        // on finds the source, or we find the deadline.
        let deadline = self.set_source(raw_source);
        if let Some(deadline) = deadline {
            // SAFETY: The callback holds a reference on the source; `dma_fence_set_deadline()`
            // can be called from any context.
            unsafe { bindings::dma_fence_set_deadline(raw_source, deadline) };
        }
        Ok(())
    }

    /// Runs the deadline hook of the proxy whose slot is `slot` (`ProxyHooks::deadline`).
    ///
    /// # Safety
    ///
    /// `slot` must be the slot of a live `ProxyFence<H>`, reached through a pointer derived from
    /// its whole `DeadlineState<H>`.
    unsafe fn notify(slot: *mut DeadlineSlot) {
        // CAST: `slot` is the first field of the `repr(C)` `DeadlineState<H>`.
        let state = slot.cast::<DeadlineState<H>>();
        // SAFETY: By the safety requirements `state` is valid; `hook` is only ever accessed
        // through shared references.
        let hook = unsafe { &*ptr::addr_of!((*state).hook) };
        hook.deadline(private::Token(()));
    }
}

impl<H> ProxyFence<H> {
    /// Returns the nesting level of the proxy's fence.
    fn level(&self) -> u32 {
        // SAFETY: By the type invariants `fence` was created by `FenceContext::init_fence`, and
        // the proxy holds a reference to it.
        unsafe { raw_level(self.fence.as_raw()) }
    }

    /// Runs `f` on the deadline slot, under the lock of the proxy's fence.
    fn with_slot<R>(&self, f: impl FnOnce(&mut DeadlineSlot) -> R) -> R {
        let raw = self.fence.as_raw();
        let slot = Opaque::cast_into(ptr::addr_of!(self.deadline)).cast::<DeadlineSlot>();
        // SAFETY: By the type invariants the slot's fields are only accessed under the lock of
        // `fence`, which is valid while the proxy holds its reference; `f` cannot reach the fence
        // lock's other users.
        unsafe {
            let flags = bindings::dma_fence_lock_irqsave(raw);
            let ret = f(&mut *slot);
            bindings::dma_fence_unlock_irqrestore(raw, flags);
            ret
        }
    }

    /// Records `source` as the fence deadlines go to; returns the deadline to pass on to it.
    fn set_source(&self, source: *mut bindings::dma_fence) -> Option<bindings::ktime_t> {
        // INVARIANT: The callers pass null, or the fence `callback` was just armed on.
        self.with_slot(|slot| {
            slot.source = source;
            (!source.is_null() && slot.deadline != bindings::ktime_t::MAX).then_some(slot.deadline)
        })
    }

    /// Returns the earliest deadline set on the proxy's fence while the proxy drove it, if any.
    ///
    /// A deadline before the boot (which only a broken caller sets) reads as the boot.
    pub fn deadline(&self) -> Option<Instant<Monotonic>> {
        let ktime = self.with_slot(|slot| slot.deadline);
        if ktime == bindings::ktime_t::MAX {
            return None;
        }
        // SAFETY: The value is clamped to the range `Instant` requires.
        Some(unsafe { Instant::from_ktime(ktime.max(0)) })
    }

    /// Returns the proxy's fence, the one its consumers wait for.
    #[inline]
    pub fn fence(&self) -> &ARef<DmaFence> {
        &self.fence
    }

    /// Stops following the source, without signalling the proxy's fence.
    ///
    /// Returns `true` if the proxy's fence has not signalled: it then signals only through a
    /// later [`ProxyFence::follow`], [`ProxyFence::signal`] or the drop of the proxy. Returns
    /// `false` if the source had signalled it already.
    pub fn detach(self: Pin<&mut Self>) -> bool {
        // Disarming drops the reference on the source.
        self.set_source(ptr::null_mut());
        let mut callback = self.project().callback;
        callback.as_mut().disarm();
        // SAFETY: The callback is disarmed, so by the invariants of `SignalProxy` we are the only
        // user of `target`.
        unsafe { (*callback.kind().target.get()).is_some() }
    }

    /// Signals the proxy's fence now with `result`, detaching it from its source.
    ///
    /// Returns `false` if the fence had already signalled (its source signalled first).
    pub fn signal(self: Pin<&mut Self>, result: Result) -> bool {
        // Disarming drops the reference on the source.
        self.set_source(ptr::null_mut());
        let mut callback = self.project().callback;
        callback.as_mut().disarm();
        // SAFETY: The callback is disarmed, so by the invariants of `SignalProxy` we are the only
        // user of `target`.
        let target = unsafe { &mut *callback.kind().target.get() };
        match target.take() {
            Some(fence) => {
                fence.signal(result);
                true
            }
            None => false,
        }
    }
}

#[pinned_drop]
impl<H> PinnedDrop for ProxyFence<H> {
    fn drop(mut self: Pin<&mut Self>) {
        let raw = self.fence.as_raw();
        let owner = self.with_slot(|slot| {
            // SAFETY: By the type invariants the fence points to our slot until now, and
            // `with_slot` holds its lock: clearing the pointer under it means
            // `fence_set_deadline()` no longer reaches the slot, the hooks or the source once the
            // lock is dropped, before the callback lets go of the source below.
            unsafe { (*raw.cast::<RawFence>()).deadline = ptr::null_mut() };
            slot.owner
        });
        // The source can no longer run the action, and with it the hooks, which go below.
        self.as_mut().project().callback.disarm();
        // SAFETY: The fence no longer points to the slot and the callback is disarmed, so nothing
        // else accesses the hooks; `Opaque` does not drop them, so they are dropped once, here,
        // before their module may go.
        unsafe { ptr::drop_in_place(Opaque::cast_into(ptr::addr_of!(self.deadline))) };
        // SAFETY: By the type invariants the proxy held a reference on `owner` for the fence's
        // pointer to the slot, which is gone.
        unsafe { module_put(owner) };
    }
}

#[cfg(CONFIG_RUST_DMA_FENCE_KUNIT_TEST)]
#[kunit_tests(rust_dma_fence)]
mod tests {
    use super::*;
    use crate::{
        impl_has_hr_timer,
        kthread::impl_has_kthread_work,
        new_spinlock_irq,
        sync::SpinLockIrq,
        time::hrtimer::{
            ArcHrTimerHandle,
            HrTimer,
            HrTimerCallback,
            HrTimerCallbackContext,
            HrTimerPointer,
            HrTimerRestart,
            RelativeMode, //
        },
        workqueue::{
            self,
            impl_has_work,
            new_work,
            Work, //
        },
    };

    /// Signals a fence from an hrtimer, that is, from hardirq context.
    #[pin_data]
    struct IrqSignaller {
        #[pin]
        timer: HrTimer<Self>,
        #[pin]
        fence: SpinLockIrq<Option<(UniqueFence, Result)>>,
        fired_in_hardirq: Atomic<bool>,
    }

    impl_has_hr_timer! {
        impl HasHrTimer<Self> for IrqSignaller {
            mode: RelativeMode<Monotonic>, field: self.timer
        }
    }

    impl HrTimerCallback for IrqSignaller {
        type Pointer<'a> = Arc<Self>;

        fn run(
            this: crate::sync::ArcBorrow<'_, Self>,
            _ctx: HrTimerCallbackContext<'_, Self>,
        ) -> HrTimerRestart {
            // SAFETY: Reading the preempt count has no requirements.
            let hardirq = unsafe { bindings::in_hardirq() };
            this.fired_in_hardirq.store(hardirq, ordering::Relaxed);
            let taken = this.fence.lock().take();
            if let Some((fence, result)) = taken {
                fence.signal(result);
            }
            HrTimerRestart::NoRestart
        }
    }

    impl IrqSignaller {
        /// Signals `fence` with `result` from hardirq context after `delay`.
        fn start(
            fence: UniqueFence,
            result: Result,
            delay: Delta,
        ) -> Result<(Arc<Self>, ArcHrTimerHandle<Self>)> {
            let this = Arc::pin_init(
                pin_init!(Self {
                    timer <- HrTimer::new(),
                    fence <- new_spinlock_irq!(Some((fence, result))),
                    fired_in_hardirq: Atomic::new(false),
                }),
                GFP_KERNEL,
            )?;
            let handle = this.clone().start(delay);
            Ok((this, handle))
        }
    }

    /// A work item counting its runs.
    #[pin_data]
    struct Counter {
        #[pin]
        work: Work<Counter>,
        #[pin]
        kwork: kthread::KthreadWork<Counter>,
        runs: Atomic<u32>,
        #[pin]
        ran: Completion,
    }

    impl_has_work! {
        impl HasWork<Self> for Counter { self.work }
    }

    impl_has_kthread_work! {
        impl HasKthreadWork<Self> for Counter { self.kwork }
    }

    impl WorkItem for Counter {
        type Pointer = Arc<Counter>;

        fn run(this: Arc<Counter>) {
            this.runs.add(1, ordering::Relaxed);
            this.ran.complete_all();
        }
    }

    impl KthreadWorkItem for Counter {
        fn run(this: Arc<Counter>) {
            this.runs.add(1, ordering::Relaxed);
            this.ran.complete_all();
        }
    }

    impl Counter {
        fn new() -> Result<Arc<Self>> {
            Arc::pin_init(
                pin_init!(Self {
                    work <- new_work!("dma_fence_test::Counter"),
                    kwork <- kthread::KthreadWork::new(),
                    runs: Atomic::new(0),
                    ran <- Completion::new(),
                }),
                GFP_KERNEL,
            )
        }
    }

    fn ctx() -> FenceContext {
        FenceContext::new(c"rust_dma_fence_test", c"test")
    }

    #[test]
    fn signal_ok_and_error() -> Result {
        let ctx = ctx();
        let a = ctx.new_fence(GFP_KERNEL)?;
        let b = ctx.new_fence(GFP_KERNEL)?;
        let (va, vb) = (a.to_aref(), b.to_aref());
        assert_eq!(va.status(), None);
        assert!(!va.is_signaled());
        assert!(va.timestamp().is_none());
        let before = Instant::<Monotonic>::now();
        a.signal(Ok(()));
        b.signal(Err(ENODEV));
        assert!(va.is_signaled());
        assert_eq!(va.status(), Some(Ok(())));
        assert_eq!(vb.status(), Some(Err(ENODEV)));
        let stamp = va.timestamp().ok_or(EINVAL)?;
        assert!(!(stamp - before).is_negative());
        assert!(!(Instant::now() - stamp).is_negative());
        assert_eq!(
            (va.context(), va.seqno(), vb.seqno()),
            (ctx.context(), 1, 2)
        );
        Ok(())
    }

    #[test]
    fn drop_unsignalled_gives_ecanceled() -> Result {
        let fence = ctx().new_fence(GFP_KERNEL)?;
        let view = fence.to_aref();
        drop(fence);
        assert_eq!(view.status(), Some(Err(ECANCELED)));
        Ok(())
    }

    #[test]
    fn preallocated_fences() -> Result {
        let ctx = ctx();
        let alloc = FenceAllocation::new(GFP_KERNEL)?;
        let _section = SignallingSection::begin();
        // No allocation from here on.
        let fence = ctx.init_fence(alloc);
        assert_eq!(fence.seqno(), ctx.last_seqno());
        fence.signal(Ok(()));
        Ok(())
    }

    #[test]
    fn wait_timeout_and_wait_from_irq() -> Result {
        let ctx = ctx();
        let fence = ctx.new_fence(GFP_KERNEL)?;
        let view = fence.to_aref();
        assert_eq!(view.wait_timeout(Delta::from_millis(20)), Err(ETIMEDOUT));
        assert_eq!(
            view.wait_uninterruptible_timeout(Delta::from_millis(1)),
            Err(ETIMEDOUT)
        );
        let (signaller, _timer) = IrqSignaller::start(fence, Err(EIO), Delta::from_millis(5))?;
        assert_eq!(view.wait_timeout(Delta::from_secs(30)), Ok(()));
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        assert_eq!(view.status(), Some(Err(EIO)));
        // Waiting on a signalled fence returns at once.
        assert_eq!(view.wait(), Ok(()));
        Ok(())
    }

    #[test]
    fn wake_task_from_irq() -> Result {
        let fence = ctx().new_fence(GFP_KERNEL)?;
        let view = fence.to_aref();
        let mut cb = KBox::pin_init(FenceCallback::new(WakeTask::current()), GFP_KERNEL)?;
        assert_eq!(cb.as_mut().arm(view.clone()), Armed::Waiting);
        let (signaller, _timer) = IrqSignaller::start(fence, Ok(()), Delta::from_millis(50))?;
        let start = Instant::<Monotonic>::now();
        loop {
            // The state is set before the check: a wake-up after the check makes the sleep below
            // return at once instead of being lost.
            // SAFETY: Setting the current task's state has no requirements.
            unsafe { bindings::set_current_state(bindings::TASK_UNINTERRUPTIBLE as c_int) };
            if view.status().is_some() {
                break;
            }
            // A lost wake-up would sleep for the whole 10 s.
            // SAFETY: Sleeping is allowed in a test.
            unsafe { bindings::schedule_timeout(msecs_to_jiffies(10_000) as c_long) };
        }
        // SAFETY: As above.
        unsafe { bindings::set_current_state(bindings::TASK_RUNNING as c_int) };
        assert!(start.elapsed() < Delta::from_secs(5));
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        Ok(())
    }

    #[test]
    fn complete_completion_from_irq() -> Result {
        let fence = ctx().new_fence(GFP_KERNEL)?;
        let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(CompleteCompletion::new(done.clone())),
            GFP_KERNEL,
        )?;
        assert_eq!(cb.as_mut().arm(fence.to_aref()), Armed::Waiting);
        let (signaller, _timer) = IrqSignaller::start(fence, Ok(()), Delta::from_millis(2))?;
        done.wait_for_completion();
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        // The callback ran: nothing is left to remove.
        assert!(!cb.as_mut().disarm());
        Ok(())
    }

    #[test]
    fn enqueue_work_from_irq() -> Result {
        let counter = Counter::new()?;
        let fence = ctx().new_fence(GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(fence_wq()?, counter.clone())),
            GFP_KERNEL,
        )?;
        assert_eq!(cb.as_mut().arm(fence.to_aref()), Armed::Waiting);
        let (signaller, _timer) = IrqSignaller::start(fence, Ok(()), Delta::from_millis(2))?;
        counter.ran.wait_for_completion();
        counter.work.flush();
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        assert_eq!(counter.runs.load(ordering::Relaxed), 1);
        Ok(())
    }

    #[test]
    fn kthread_work_from_irq() -> Result {
        let worker = Arc::new(kthread::Worker::new(c"rust_dma_fence_test")?, GFP_KERNEL)?;
        let counter = Counter::new()?;
        let fence = ctx().new_fence(GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(QueueKthreadWork::new(worker.clone(), counter.clone())?),
            GFP_KERNEL,
        )?;
        assert_eq!(cb.as_mut().arm(fence.to_aref()), Armed::Waiting);
        let (signaller, _timer) = IrqSignaller::start(fence, Ok(()), Delta::from_millis(2))?;
        counter.ran.wait_for_completion();
        worker.flush();
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        assert_eq!(counter.runs.load(ordering::Relaxed), 1);
        Ok(())
    }

    #[test]
    fn arm_after_signal_runs_at_once() -> Result {
        let signalled = ctx().new_fence(GFP_KERNEL)?;
        let view = signalled.to_aref();
        signalled.signal(Err(EIO));

        let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(CompleteCompletion::new(done.clone())),
            GFP_KERNEL,
        )?;
        assert_eq!(cb.as_mut().arm(view.clone()), Armed::RanNow);
        done.wait_for_completion();

        let counter = Counter::new()?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(fence_wq()?, counter.clone())),
            GFP_KERNEL,
        )?;
        assert_eq!(cb.as_mut().arm(view.clone()), Armed::RanNow);
        counter.ran.wait_for_completion();

        let mut cb = KBox::pin_init(FenceCallback::new(WakeTask::current()), GFP_KERNEL)?;
        assert_eq!(cb.as_mut().arm(view.clone()), Armed::RanNow);

        let mut proxy = KBox::pin_init(
            ProxyFence::new(nested(1)?.new_fence(GFP_KERNEL)?),
            GFP_KERNEL,
        )?;
        proxy.as_mut().follow(view)?;
        assert_eq!(proxy.fence().status(), Some(Err(EIO)));
        Ok(())
    }

    /// Signals a fence with its result from a work item, on another CPU when there is one, once
    /// `go` is set.
    #[pin_data]
    struct RemoteSignaller {
        #[pin]
        work: Work<RemoteSignaller>,
        #[pin]
        fence: SpinLockIrq<Option<(UniqueFence, Result)>>,
        started: Atomic<bool>,
        go: Atomic<bool>,
    }

    impl_has_work! {
        impl HasWork<Self> for RemoteSignaller { self.work }
    }

    impl WorkItem for RemoteSignaller {
        type Pointer = Arc<RemoteSignaller>;

        fn run(this: Arc<RemoteSignaller>) {
            this.started.store(true, ordering::Release);
            while !this.go.load(ordering::Acquire) {
                crate::processor::cpu_relax();
            }
            let taken = this.fence.lock().take();
            if let Some((fence, result)) = taken {
                fence.signal(result);
            }
        }
    }

    #[test]
    fn remove_racing_signal() -> Result {
        const ITERATIONS: u32 = 4000;
        let ctx = ctx();
        let counter = Counter::new()?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(fence_wq()?, counter.clone())),
            GFP_KERNEL,
        )?;
        let remote = Arc::pin_init(
            pin_init!(RemoteSignaller {
                work <- new_work!("dma_fence_test::RemoteSignaller"),
                fence <- new_spinlock_irq!(None),
                started: Atomic::new(false),
                go: Atomic::new(false),
            }),
            GFP_KERNEL,
        )?;
        // The remote signaller spins on another CPU: only with more than one.
        let smp = crate::cpu::nr_cpu_ids() > 1;
        let mut removed = 0;
        for i in 0..ITERATIONS {
            let fence = ctx.new_fence(GFP_KERNEL)?;
            cb.as_mut().arm(fence.to_aref());
            // A quarter disarms once the signal is certainly over, a quarter before it can have
            // started, the rest races.
            let spin = Delta::from_nanos(i64::from(i % 8) * 300);
            if i % 4 == 1 && cb.as_mut().disarm() {
                removed += 1;
            }
            if i % 2 == 0 || !smp {
                // Signal from hardirq after 0 to 15 us while this CPU disarms.
                let delay = Delta::from_micros(i64::from(i % 16));
                let (signaller, timer) = IrqSignaller::start(fence, Ok(()), delay)?;
                if i % 4 == 0 {
                    while signaller.fence.lock().is_some() {
                        crate::processor::cpu_relax();
                    }
                }
                crate::time::delay::udelay(spin);
                if cb.as_mut().disarm() {
                    removed += 1;
                }
                // Dropping the handle would cancel the timer: wait until it fired.
                while signaller.fence.lock().is_some() {
                    crate::processor::cpu_relax();
                }
                drop(timer);
            } else {
                // Signal from a worker spinning on another CPU.
                *remote.fence.lock() = Some((fence, Ok(())));
                remote.started.store(false, ordering::Relaxed);
                remote.go.store(false, ordering::Relaxed);
                let _ = workqueue::system_dfl().enqueue(remote.clone());
                while !remote.started.load(ordering::Acquire) {
                    crate::processor::cpu_relax();
                }
                remote.go.store(true, ordering::Release);
                crate::time::delay::udelay(spin);
                if cb.as_mut().disarm() {
                    removed += 1;
                }
                remote.work.flush();
            }
            counter.work.flush();
        }
        let ran = counter.runs.load(ordering::Relaxed);
        pr_info!("remove_racing_signal: {ran} callbacks ran, {removed} removed first\n");
        // Every arming ended exactly once: removed, or ran.
        assert_eq!(ran + removed, ITERATIONS);
        assert!(ran >= ITERATIONS / 4 && removed >= ITERATIONS / 4);
        Ok(())
    }

    fn nested(level: u32) -> Result<NestedFenceContext> {
        NestedFenceContext::new(c"rust_dma_fence_test", c"nested", level)
    }

    /// A workqueue for the tests' fence work.
    fn fence_wq() -> Result<Arc<FenceWorkqueue>> {
        Ok(Arc::new(
            FenceWorkqueue::new_ordered(c"rust_dma_fence_test")?,
            GFP_KERNEL,
        )?)
    }

    #[test]
    fn proxy_chain_carries_error() -> Result {
        let levels = [nested(1)?, nested(2)?, nested(3)?];
        let mut chain = KVec::new();
        for ctx in &levels {
            chain.push(
                KBox::pin_init(ProxyFence::new(ctx.new_fence(GFP_KERNEL)?), GFP_KERNEL)?,
                GFP_KERNEL,
            )?;
        }
        let source = ctx().new_fence(GFP_KERNEL)?;
        let mut previous = source.to_aref();
        for proxy in chain.iter_mut() {
            proxy.as_mut().follow(previous)?;
            previous = proxy.fence().clone();
        }
        // Waiting is done through a callback on the last link.
        let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(CompleteCompletion::new(done.clone())),
            GFP_KERNEL,
        )?;
        cb.as_mut().arm(previous.clone());
        let (signaller, _timer) = IrqSignaller::start(source, Err(EPIPE), Delta::from_millis(2))?;
        done.wait_for_completion();
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        for proxy in &chain {
            assert_eq!(proxy.fence().status(), Some(Err(EPIPE)));
        }
        Ok(())
    }

    #[test]
    fn proxy_rejects_bad_nesting_and_can_be_signalled() -> Result {
        let level1 = nested(1)?;
        let mut proxy = KBox::pin_init(ProxyFence::new(level1.new_fence(GFP_KERNEL)?), GFP_KERNEL)?;
        let same = level1.new_fence(GFP_KERNEL)?;
        assert_eq!(proxy.as_mut().follow(same.to_aref()), Err(EINVAL));
        assert_eq!(nested(MAX_NESTING_LEVEL + 1).err(), Some(EINVAL));
        assert_eq!(nested(0).err(), Some(EINVAL));

        // Signalled by its owner while following a pending source.
        let source = ctx().new_fence(GFP_KERNEL)?;
        proxy.as_mut().follow(source.to_aref())?;
        assert!(proxy.as_mut().signal(Err(ECANCELED)));
        assert_eq!(proxy.fence().status(), Some(Err(ECANCELED)));
        // The source signalling later has no effect on the proxy, and signalling again is a no-op.
        source.signal(Ok(()));
        assert!(!proxy.as_mut().signal(Ok(())));
        assert_eq!(proxy.fence().status(), Some(Err(ECANCELED)));
        same.signal(Ok(()));

        // Dropped while pending: its fence signals -ECANCELED.
        let source = ctx().new_fence(GFP_KERNEL)?;
        let mut proxy = KBox::pin_init(ProxyFence::new(level1.new_fence(GFP_KERNEL)?), GFP_KERNEL)?;
        proxy.as_mut().follow(source.to_aref())?;
        let view = proxy.fence().clone();
        drop(proxy);
        assert_eq!(view.status(), Some(Err(ECANCELED)));
        source.signal(Ok(()));
        Ok(())
    }

    /// `struct dma_fence_ops` for fences made with the C API in these tests.
    static C_OPS: bindings::dma_fence_ops = bindings::dma_fence_ops {
        get_driver_name: Some(c_name),
        get_timeline_name: Some(c_name),
        enable_signaling: None,
        signaled: None,
        wait: None,
        release: None,
        set_deadline: None,
    };

    /// # Safety
    ///
    /// Called by the C side with a valid fence; the fence is not used.
    unsafe extern "C" fn c_name(_fence: *mut bindings::dma_fence) -> *const c_char {
        c"c-fence".as_char_ptr()
    }

    /// Makes a fence with the C API: `dma_fence_init()`, 32-bit sequence numbers.
    fn c_fence(context: u64, seqno: u64) -> Result<ARef<DmaFence>> {
        c_fence_with(&C_OPS, context, seqno)
    }

    /// Like [`c_fence`], with `ops`, which has no `release`.
    fn c_fence_with(
        ops: &'static bindings::dma_fence_ops,
        context: u64,
        seqno: u64,
    ) -> Result<ARef<DmaFence>> {
        let mem = KBox::<MaybeUninit<bindings::dma_fence>>::new_uninit(GFP_KERNEL)?;
        let raw = KBox::into_raw(mem).cast::<bindings::dma_fence>();
        // SAFETY: `raw` is a kmalloc'ed `struct dma_fence` (freed with `kfree_rcu()` by
        // `dma_fence_free()` since `ops` has no `release`). The initial reference goes to the
        // `ARef`.
        unsafe {
            bindings::dma_fence_init(raw, ops, ptr::null_mut(), context, seqno);
            Ok(ARef::from_raw(NonNull::new_unchecked(raw.cast())))
        }
    }

    /// `struct dma_fence_ops` of a C producer that records the deadlines it is given.
    static C_DEADLINE_OPS: bindings::dma_fence_ops = bindings::dma_fence_ops {
        get_driver_name: Some(c_name),
        get_timeline_name: Some(c_name),
        enable_signaling: None,
        signaled: None,
        wait: None,
        release: None,
        set_deadline: Some(c_record_deadline),
    };

    /// How many deadlines fences of `C_DEADLINE_OPS` were given, and the last one.
    static C_DEADLINES: Atomic<u32> = Atomic::new(0);
    static C_LAST_DEADLINE: Atomic<i64> = Atomic::new(0);

    /// # Safety
    ///
    /// Called by the C side with a valid fence; the fence is not used.
    unsafe extern "C" fn c_record_deadline(
        _fence: *mut bindings::dma_fence,
        deadline: bindings::ktime_t,
    ) {
        C_LAST_DEADLINE.store(deadline, ordering::Relaxed);
        C_DEADLINES.add(1, ordering::Relaxed);
    }

    /// A deadline as a number, for comparisons (`Monotonic` has no `PartialEq`).
    fn ns(deadline: Option<Instant<Monotonic>>) -> Option<i64> {
        deadline.map(|d| d.as_nanos())
    }

    #[test]
    fn deadlines_reach_the_source_and_the_hook() -> Result {
        let base = Instant::<Monotonic>::now() + Delta::from_secs(100);
        let at = |ms: i64| base + Delta::from_millis(ms);
        let wq = fence_wq()?;
        let hooked = Counter::new()?;
        let hook_runs = |expected: u32| {
            wq.flush();
            assert_eq!(hooked.runs.load(ordering::Relaxed), expected);
        };
        C_DEADLINES.store(0, ordering::Relaxed);

        // Fences no proxy drives ignore deadlines.
        let plain = ctx().new_fence(GFP_KERNEL)?;
        plain.set_deadline(at(1));
        let level2 = nested(2)?;
        let unproxied = level2.new_fence(GFP_KERNEL)?;
        unproxied.set_deadline(at(1));

        let mut proxy = KBox::pin_init(
            ProxyFence::with_hooks(unproxied, EnqueueWork::new(wq.clone(), hooked.clone())),
            GFP_KERNEL,
        )?;
        assert_eq!(ns(proxy.deadline()), None);
        // Before the proxy follows anything: recorded, the hook runs.
        proxy.fence().set_deadline(at(50));
        assert_eq!(ns(proxy.deadline()), Some(at(50).as_nanos()));
        hook_runs(1);

        // Following a source passes the deadline on.
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let context = unsafe { bindings::dma_fence_context_alloc(1) };
        let source = c_fence_with(&C_DEADLINE_OPS, context, 1)?;
        proxy.as_mut().follow(source.clone())?;
        assert_eq!(C_DEADLINES.load(ordering::Relaxed), 1);
        assert_eq!(C_LAST_DEADLINE.load(ordering::Relaxed), at(50).as_nanos());

        // A later deadline changes nothing; an earlier one goes through at once.
        proxy.fence().set_deadline(at(80));
        assert_eq!(ns(proxy.deadline()), Some(at(50).as_nanos()));
        assert_eq!(C_DEADLINES.load(ordering::Relaxed), 1);
        hook_runs(1);
        proxy.fence().set_deadline(at(20));
        assert_eq!(ns(proxy.deadline()), Some(at(20).as_nanos()));
        assert_eq!(C_DEADLINES.load(ordering::Relaxed), 2);
        assert_eq!(C_LAST_DEADLINE.load(ordering::Relaxed), at(20).as_nanos());
        hook_runs(2);

        // Through a chain of proxies.
        let mut outer = KBox::pin_init(
            ProxyFence::new(nested(3)?.new_fence(GFP_KERNEL)?),
            GFP_KERNEL,
        )?;
        outer.as_mut().follow(proxy.fence().clone())?;
        outer.fence().set_deadline(at(10));
        assert_eq!(ns(outer.deadline()), Some(at(10).as_nanos()));
        assert_eq!(ns(proxy.deadline()), Some(at(10).as_nanos()));
        assert_eq!(C_DEADLINES.load(ordering::Relaxed), 3);
        assert_eq!(C_LAST_DEADLINE.load(ordering::Relaxed), at(10).as_nanos());
        hook_runs(3);

        // Detached, the proxy still records deadlines but no longer passes them on.
        assert!(proxy.as_mut().detach());
        proxy.fence().set_deadline(at(5));
        assert_eq!(ns(proxy.deadline()), Some(at(5).as_nanos()));
        assert_eq!(C_DEADLINES.load(ordering::Relaxed), 3);
        hook_runs(4);
        // Following again passes the recorded deadline on.
        proxy.as_mut().follow(source.clone())?;
        assert_eq!(C_DEADLINES.load(ordering::Relaxed), 4);
        assert_eq!(C_LAST_DEADLINE.load(ordering::Relaxed), at(5).as_nanos());

        // SAFETY: `source` is valid and pending.
        unsafe { bindings::dma_fence_signal(source.as_raw()) };
        assert_eq!(outer.fence().status(), Some(Ok(())));
        // Signalled fences take no deadlines, before or after their proxy is gone.
        let view = proxy.fence().clone();
        view.set_deadline(at(1));
        drop(proxy);
        view.set_deadline(at(1));
        assert_eq!(C_DEADLINES.load(ordering::Relaxed), 4);
        hook_runs(4);
        plain.signal(Ok(()));
        Ok(())
    }

    /// A ring whose credits [`ReturnCredits`] give back: counts the wake-ups of its taker (work
    /// item 1) and of its deadline work (work item 2).
    #[pin_data]
    struct Ring {
        credits: RingCredits,
        #[pin]
        wake: Work<Ring, 1>,
        #[pin]
        deadline: Work<Ring, 2>,
        wakes: Atomic<u32>,
        deadlines: Atomic<u32>,
    }

    impl_has_work! {
        impl HasWork<Self, 1> for Ring { self.wake }
        impl HasWork<Self, 2> for Ring { self.deadline }
    }

    // SAFETY: `ring_credits` returns a field of `self` and does nothing else.
    unsafe impl HasRingCredits for Ring {
        fn ring_credits(&self) -> &RingCredits {
            &self.credits
        }
    }

    impl WorkItem<1> for Ring {
        type Pointer = Arc<Ring>;

        fn run(this: Arc<Ring>) {
            this.wakes.add(1, ordering::Relaxed);
        }
    }

    impl WorkItem<2> for Ring {
        type Pointer = Arc<Ring>;

        fn run(this: Arc<Ring>) {
            this.deadlines.add(1, ordering::Relaxed);
        }
    }

    #[test]
    fn credits_come_back_when_the_source_signals() -> Result {
        let wq = fence_wq()?;
        let credits = RingCredits::new(3, wq.clone());
        let ring = Arc::pin_init(
            pin_init!(Ring {
                credits,
                wake <- new_work!("dma_fence_test::Ring::wake"),
                deadline <- new_work!("dma_fence_test::Ring::deadline"),
                wakes: Atomic::new(0),
                deadlines: Atomic::new(0),
            }),
            GFP_KERNEL,
        )?;
        let credits = &ring.credits;
        let done = nested(1)?;
        let job = |n: u32| -> Result<Pin<KBox<ProxyFence<ReturnCredits<Ring, 1, 2>>>>> {
            let hooks = ReturnCredits::new(ring.clone(), n);
            KBox::pin_init(
                ProxyFence::with_hooks(done.new_fence(GFP_KERNEL)?, hooks),
                GFP_KERNEL,
            )
        };
        let counts = || {
            wq.flush();
            (
                credits.in_use(),
                ring.wakes.load(ordering::Relaxed),
                ring.deadlines.load(ordering::Relaxed),
            )
        };

        // Two jobs fill the ring; a third taker waits.
        let (mut a, mut b) = (job(1)?, job(2)?);
        assert!(credits.take_or_wait(1) && credits.take_or_wait(2));
        assert!(!credits.take_or_wait(1));
        let (hw_a, hw_b) = (ctx().new_fence(GFP_KERNEL)?, ctx().new_fence(GFP_KERNEL)?);
        a.as_mut().follow(hw_a.to_aref())?;
        b.as_mut().follow(hw_b.to_aref())?;
        assert_eq!(counts(), (3, 0, 0));

        // From hardirq: the credit comes back before the done fence signals, and the taker is
        // woken after it.
        let (signaller, timer) = IrqSignaller::start(hw_a, Ok(()), Delta::from_millis(2))?;
        a.fence().wait()?;
        let in_use = credits.in_use();
        // Cancelling the timer waits for its callback, and with it the wake-up, to return.
        drop(timer);
        assert_eq!(in_use, 2);
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        assert_eq!(counts(), (2, 1, 0));
        // With no taker waiting, a return wakes no one, whatever the result.
        hw_b.signal(Err(EIO));
        assert_eq!(counts(), (0, 1, 0));

        // A done fence signalled otherwise than by its source leaves the credits to the owner.
        let mut c = job(3)?;
        assert!(credits.take_or_wait(3));
        let hw_c = ctx().new_fence(GFP_KERNEL)?;
        c.as_mut().follow(hw_c.to_aref())?;
        assert!(c.as_mut().detach());
        hw_c.signal(Ok(()));
        assert!(c.as_mut().signal(Err(ECANCELED)));
        drop(c);
        assert!(!credits.take_or_wait(1));
        assert_eq!(counts(), (3, 1, 0));
        // Given back by the owner: the waiting taker is for the owner to wake.
        assert!(credits.give_back(3));
        assert!(!credits.give_back(0));
        assert_eq!(counts(), (0, 1, 0));

        // A source that signalled already gives the credits back in `follow()`, and wakes the
        // taker that waits then. A deadline wakes the deadline work.
        let mut d = job(2)?;
        assert!(credits.take_or_wait(2) && !credits.take_or_wait(2));
        d.fence()
            .set_deadline(Instant::<Monotonic>::now() + Delta::from_secs(100));
        let hw_d = ctx().new_fence(GFP_KERNEL)?;
        let hw_d_view = hw_d.to_aref();
        hw_d.signal(Ok(()));
        d.as_mut().follow(hw_d_view)?;
        assert_eq!(counts(), (0, 2, 1));
        Ok(())
    }

    #[test]
    fn c_fences_as_inputs() -> Result {
        // The stub fence is signalled.
        let stub = DmaFence::stub();
        assert_eq!(stub.status(), Some(Ok(())));
        let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(CompleteCompletion::new(done.clone())),
            GFP_KERNEL,
        )?;
        assert_eq!(cb.as_mut().arm(stub), Armed::RanNow);

        // A pending C fence drives a proxy and a work item.
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let context = unsafe { bindings::dma_fence_context_alloc(1) };
        let cf = c_fence(context, 1)?;
        let mut proxy = KBox::pin_init(
            ProxyFence::new(nested(1)?.new_fence(GFP_KERNEL)?),
            GFP_KERNEL,
        )?;
        proxy.as_mut().follow(cf.clone())?;
        let counter = Counter::new()?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(fence_wq()?, counter.clone())),
            GFP_KERNEL,
        )?;
        assert_eq!(cb.as_mut().arm(cf.clone()), Armed::Waiting);
        // SAFETY: `cf` is valid and pending; the error is a negative errno.
        unsafe {
            bindings::dma_fence_set_error(cf.as_raw(), ENOSPC.to_errno());
            bindings::dma_fence_signal(cf.as_raw());
        }
        counter.ran.wait_for_completion();
        assert_eq!(proxy.fence().status(), Some(Err(ENOSPC)));
        assert_eq!(cf.status(), Some(Err(ENOSPC)));

        // Null pointers from C give `None`.
        // SAFETY: A null pointer is allowed.
        assert!(unsafe { DmaFence::get_raw(ptr::null_mut()) }.is_none());
        // SAFETY: `cf` is a valid fence on which we hold a reference.
        let again = unsafe { DmaFence::get_raw(cf.as_raw()) }.ok_or(EINVAL)?;
        assert_eq!(again.seqno(), 1);
        Ok(())
    }

    #[test]
    fn seqno_ordering_and_wrap() -> Result {
        let ctx = ctx();
        let a = ctx.new_fence(GFP_KERNEL)?;
        let b = ctx.new_fence(GFP_KERNEL)?;
        assert_eq!(b.is_later(&a), Ok(true));
        assert_eq!(a.is_later(&b), Ok(false));
        assert_eq!(a.is_later(&a), Ok(false));
        let other = FenceContext::new(c"rust_dma_fence_test", c"other").new_fence(GFP_KERNEL)?;
        assert_eq!(a.is_later(&other), Err(EINVAL));

        // C fences compare 32-bit sequence numbers, modulo wrap-around.
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let context = unsafe { bindings::dma_fence_context_alloc(1) };
        let before_wrap = c_fence(context, 0xffff_fff0)?;
        let after_wrap = c_fence(context, 0x10)?;
        assert_eq!(after_wrap.is_later(&before_wrap), Ok(true));
        assert_eq!(before_wrap.is_later(&after_wrap), Ok(false));
        for f in [&before_wrap, &after_wrap] {
            // SAFETY: The fences are valid and pending.
            unsafe { bindings::dma_fence_signal(f.as_raw()) };
        }
        a.signal(Ok(()));
        b.signal(Ok(()));
        other.signal(Ok(()));
        Ok(())
    }

    #[test]
    fn invalid_errors_are_unrepresentable() {
        // Fences take an `Error`, which is always a negative errno; a C fence's error field that
        // is not one reads back as `EINVAL` instead of being passed on.
        assert_eq!(error_to_result(0), Ok(()));
        assert_eq!(error_to_result(-5), Err(EIO));
        assert_eq!(error_to_result(5), Err(EINVAL));
        assert_eq!(error_to_result(-100_000), Err(EINVAL));
    }

    /// Issue 10, defect 1: a proxy that follows a source while the source signals an error on
    /// another CPU must carry the error, whether `follow` found the source pending or signalled.
    #[test]
    fn proxy_follow_races_error_signal() -> Result {
        const ITERATIONS: u32 = 2000;
        let level1 = nested(1)?;
        let signaller = Arc::pin_init(
            pin_init!(RemoteSignaller {
                work <- new_work!("dma_fence_test::RemoteSignaller"),
                fence <- new_spinlock_irq!(None),
                started: Atomic::new(false),
                // It signals as soon as it runs.
                go: Atomic::new(true),
            }),
            GFP_KERNEL,
        )?;
        let (mut ran_now, mut waited) = (0, 0);
        for i in 0..ITERATIONS {
            let source = ctx().new_fence(GFP_KERNEL)?;
            let view = source.to_aref();
            let mut proxy =
                KBox::pin_init(ProxyFence::new(level1.new_fence(GFP_KERNEL)?), GFP_KERNEL)?;
            *signaller.fence.lock() = Some((source, Err(EIO)));
            signaller.started.store(false, ordering::Relaxed);
            let _ = workqueue::system_dfl().enqueue(signaller.clone());
            while !signaller.started.load(ordering::Acquire) {
                crate::processor::cpu_relax();
            }
            crate::time::delay::udelay(Delta::from_nanos(i64::from(i % 16) * 100));
            let pending = view.status().is_none();
            proxy.as_mut().follow(view)?;
            if pending {
                waited += 1;
            } else {
                ran_now += 1;
            }
            signaller.work.flush();
            assert_eq!(proxy.fence().status(), Some(Err(EIO)));
        }
        pr_info!("proxy_follow_races_error_signal: {ran_now} signalled first, {waited} pending\n");
        Ok(())
    }

    /// Issue 10, defect 3: a kthread work item bound to one worker cannot be given to a fence
    /// callback that queues it on another: the callback would silently do nothing.
    #[test]
    fn kthread_work_bound_to_other_worker() -> Result {
        let first = Arc::new(kthread::Worker::new(c"rust_dma_fence_test_a")?, GFP_KERNEL)?;
        let second = Arc::new(kthread::Worker::new(c"rust_dma_fence_test_b")?, GFP_KERNEL)?;
        let counter = Counter::new()?;
        first.queue(counter.clone()).map_err(|_| EBUSY)?;
        first.flush();
        assert_eq!(
            QueueKthreadWork::new(second.clone(), counter.clone()).err(),
            Some(EINVAL)
        );
        // Binding happens at creation: the item is then refused by other workers, and every
        // callback that was created queues it when its fence signals.
        let fresh = Counter::new()?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(QueueKthreadWork::new(second.clone(), fresh.clone())?),
            GFP_KERNEL,
        )?;
        assert_eq!(
            QueueKthreadWork::new(first, fresh.clone()).err(),
            Some(EINVAL)
        );
        assert_eq!(cb.as_mut().arm(DmaFence::stub()), Armed::RanNow);
        fresh.ran.wait_for_completion();
        second.flush();
        assert_eq!(fresh.runs.load(ordering::Relaxed), 1);
        Ok(())
    }

    /// A work item whose job is to signal, recording whether it ran inside a signalling section.
    #[pin_data]
    struct SectionProbe {
        #[pin]
        work: Work<SectionProbe>,
        nested: Atomic<u32>,
        #[pin]
        ran: Completion,
    }

    impl_has_work! {
        impl HasWork<Self> for SectionProbe { self.work }
    }

    impl SignallingWorkItem for SectionProbe {
        fn run(this: ArcBorrow<'_, SectionProbe>, _section: &SignallingSection) {
            // The cookie of a section begun inside another one says so.
            let inner = SignallingSection::begin();
            this.nested
                .store(u32::from(inner.cookie) + 1, ordering::Relaxed);
            drop(inner);
            this.ran.complete_all();
        }
    }

    /// Issue 10, defect 4: the work of a fence callback whose job is to signal runs inside a
    /// signalling section without the driver having to remember it.
    #[test]
    fn signalling_work_runs_in_section() -> Result {
        let probe = Arc::pin_init(
            pin_init!(SectionProbe {
                work <- new_work!("dma_fence_test::SectionProbe"),
                nested: Atomic::new(0),
                ran <- Completion::new(),
            }),
            GFP_KERNEL,
        )?;
        let fence = ctx().new_fence(GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(fence_wq()?, probe.clone())),
            GFP_KERNEL,
        )?;
        cb.as_mut().arm(fence.to_aref());
        let (_signaller, _timer) = IrqSignaller::start(fence, Ok(()), Delta::from_millis(1))?;
        probe.ran.wait_for_completion();
        // 2: the probe's section was nested in the one the work item began.
        assert_eq!(probe.nested.load(ordering::Relaxed), 2);
        Ok(())
    }

    /// Signals the C fence in `data` from the callback of the fence it is armed on, as drm_sched
    /// signals its finished fence from its hardware fence's callback.
    #[repr(C)]
    struct SignalCFence {
        cb: bindings::dma_fence_cb,
        target: *mut bindings::dma_fence,
    }

    /// # Safety
    ///
    /// `cb` is the `cb` of a live `SignalCFence` whose `target` is a valid fence.
    unsafe extern "C" fn signal_c_fence(
        _fence: *mut bindings::dma_fence,
        cb: *mut bindings::dma_fence_cb,
    ) {
        // SAFETY: `cb` is the first field of a `repr(C)` `SignalCFence`, valid by the safety
        // requirements; `dma_fence_signal()` may be called from a fence callback.
        unsafe { bindings::dma_fence_signal((*cb.cast::<SignalCFence>()).target) };
    }

    /// The lock class of the C producer of `c_fence_signalled_from_rust_callback`, whose fences
    /// are signalled from the callbacks of level-1 fences.
    static NESTED_C_PRODUCER: LockClassKey =
        // SAFETY: The key is in static memory, which is pinned, and is never dropped.
        unsafe { LockClassKey::new_static() };

    /// Issue 10, defect 5: a C fence signalled from the callback of a level-1 Rust fence is
    /// itself of level 2; a proxy that follows it must be above that, and lockdep stays quiet.
    ///
    /// Lockdep sees lock classes, not fences: all fences of a C producer share the class of its
    /// lock, so they must all be declared at the same level. This producer has a class of its
    /// own, as drm_sched's fences have (the class of the entity's fence lock).
    #[test]
    fn c_fence_signalled_from_rust_callback() -> Result {
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let context = unsafe { bindings::dma_fence_context_alloc(1) };
        let c_fence = c_fence(context, 1)?;
        // SAFETY: The fence is unused so far and its lock is not held; the key is static.
        unsafe {
            bindings::dma_fence_set_lock_class(
                c_fence.as_raw(),
                NESTED_C_PRODUCER.as_ptr(),
                c"rust_dma_fence_test_c_producer".as_char_ptr(),
            )
        };
        let hw = nested(1)?.new_fence(GFP_KERNEL)?;
        let mut relay = KBox::new(
            SignalCFence {
                // SAFETY: An all-zero `dma_fence_cb` is valid: it is initialised when added.
                cb: unsafe { core::mem::zeroed() },
                target: c_fence.as_raw(),
            },
            GFP_KERNEL,
        )?;
        let relay_ptr: *mut SignalCFence = &mut *relay;
        // SAFETY: `hw` is pending; `relay` outlives the callback, which runs when `hw` signals
        // below, and `c_fence` is kept alive by its `ARef`. `cb` is the first field of the
        // `repr(C)` `SignalCFence`, and its pointer has the provenance of the whole.
        let ret = unsafe {
            bindings::dma_fence_add_callback(hw.as_raw(), relay_ptr.cast(), Some(signal_c_fence))
        };
        assert_eq!(ret, 0);

        // The C fence counts as level 0 unless declared: a level-2 proxy may not follow it when
        // it is declared at level 2, a level-3 proxy may.
        let mut low = KBox::pin_init(
            ProxyFence::new(nested(2)?.new_fence(GFP_KERNEL)?),
            GFP_KERNEL,
        )?;
        assert_eq!(low.as_mut().follow_nested(c_fence.clone(), 2), Err(EINVAL));
        // A Rust fence keeps its own level when a lower one is declared.
        let level2 = nested(2)?.new_fence(GFP_KERNEL)?;
        assert_eq!(low.as_mut().follow_nested(level2.to_aref(), 0), Err(EINVAL));
        level2.signal(Ok(()));
        assert!(low.as_mut().signal(Ok(())));
        let mut proxy = KBox::pin_init(
            ProxyFence::new(nested(3)?.new_fence(GFP_KERNEL)?),
            GFP_KERNEL,
        )?;
        proxy.as_mut().follow_nested(c_fence.clone(), 2)?;
        // rust_dma_fence_lock/1 -> the C fence's lock -> rust_dma_fence_lock/3: nesting.
        let (signaller, _timer) =
            IrqSignaller::start(hw.into_unique(), Err(EIO), Delta::from_millis(1))?;
        proxy.fence().wait()?;
        assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
        assert_eq!(c_fence.status(), Some(Ok(())));
        assert_eq!(proxy.fence().status(), Some(Ok(())));
        Ok(())
    }

    /// Issue 10, defect 7: a C producer's timestamp that is not a past `CLOCK_MONOTONIC` time
    /// gives no `Instant`.
    #[test]
    fn timestamp_of_c_producer_checked() -> Result {
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let context = unsafe { bindings::dma_fence_context_alloc(1) };
        let (negative, future, good) = (
            c_fence(context, 1)?,
            c_fence(context, 2)?,
            c_fence(context, 3)?,
        );
        assert!(good.timestamp().is_none());
        // SAFETY: The fences are valid and pending.
        unsafe {
            bindings::dma_fence_signal_timestamp(negative.as_raw(), -1);
            bindings::dma_fence_signal_timestamp(future.as_raw(), i64::MAX);
            bindings::dma_fence_signal(good.as_raw());
        }
        assert!(negative.timestamp().is_none());
        assert!(future.timestamp().is_none());
        let stamp = good.timestamp().ok_or(EINVAL)?;
        assert!(!(Instant::now() - stamp).is_negative());
        Ok(())
    }
}
