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
//! | [`EnqueueWork`] | a [`WorkItem`] is enqueued on a workqueue, to work in process context |
//! | [`QueueKthreadWork`] | a [`KthreadWorkItem`] is queued on a [`kthread::Worker`] |
//! | [`ProxyFence`] | another fence signals, with the same error |
//!
//! A [`FenceCallback`] holds one kind and the memory the C side needs. It is allocated and
//! initialised before use, armed on a fence with [`FenceCallback::arm`], and removed from the
//! fence when disarmed or dropped. Its payload (the task, the work item, ...) is only ever dropped
//! with the [`FenceCallback`], never in the callback. Arming on a fence that has already signalled
//! runs the action at once, in the caller's context, so the action always happens exactly once
//! after the fence signalled, unless the callback is disarmed first.
//!
//! # Lock classes and nesting
//!
//! Fences created here use the spinlock embedded in `struct dma_fence`, with a lockdep class per
//! nesting level of their [`FenceContext`] (see [`FenceContext::new_nested`]). A
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
    container_of,
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
    marker::PhantomPinned,
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
/// # Invariants
///
/// `driver_name` and `timeline_name` point to NUL-terminated strings of `'static` lifetime.
#[repr(C)]
struct RawFence {
    base: Opaque<bindings::dma_fence>,
    driver_name: *const c_char,
    timeline_name: *const c_char,
    level: u32,
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
    set_deadline: None,
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

/// Signals `fence` with `result`, unless it was signalled already.
///
/// # Safety
///
/// `fence` must point to a valid fence.
unsafe fn signal_raw(fence: *mut bindings::dma_fence, result: Result) {
    let _section = SignallingSection::begin();
    // SAFETY: The caller guarantees that `fence` is valid. Setting the error and signalling under
    // the fence lock, only if it is not signalled yet, means `dma_fence_set_error()` never warns.
    unsafe {
        let flags = bindings::dma_fence_lock_irqsave(fence);
        if !bindings::dma_fence_test_signaled_flag(fence) {
            if let Err(e) = result {
                bindings::dma_fence_set_error(fence, e.to_errno());
            }
            bindings::dma_fence_signal_locked(fence);
        }
        bindings::dma_fence_unlock_irqrestore(fence, flags);
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
    /// Like `dma_fence_is_signaled()`, this may ask the producer and signal the fence.
    #[inline]
    pub fn is_signaled(&self) -> bool {
        // SAFETY: By the type invariants the fence is valid.
        unsafe { bindings::dma_fence_is_signaled(self.as_raw()) }
    }

    /// Returns [`None`] while the fence is pending, and the result it signalled with once it has
    /// signalled.
    pub fn status(&self) -> Option<Result> {
        // SAFETY: By the type invariants the fence is valid.
        match unsafe { bindings::dma_fence_get_status(self.as_raw()) } {
            0 => None,
            status if status > 0 => Some(Ok(())),
            error => Some(error_to_result(error)),
        }
    }

    /// Returns when the fence signalled, or [`None`] while it is pending.
    pub fn timestamp(&self) -> Option<Instant<Monotonic>> {
        // SAFETY: By the type invariants the fence is valid.
        if !unsafe { bindings::dma_fence_test_signaled_flag(self.as_raw()) } {
            return None;
        }
        // SAFETY: The fence is valid and signalled, so `dma_fence_timestamp()` does not warn and
        // returns a `CLOCK_MONOTONIC` time, which is not negative.
        Some(unsafe { Instant::from_ktime(bindings::dma_fence_timestamp(self.as_raw())) })
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
            // SAFETY: Fences that use `FENCE_OPS` are the `base` of a `RawFence`; `level` is never
            // written after initialisation and the memory lives as long as the fence.
            unsafe { (*self.as_raw().cast::<RawFence>()).level }
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
/// tell which fence is later.
///
/// The names are `'static` and only read while a fence is unsignalled, under RCU
/// (`dma_fence_driver_name()`, `dma_fence_timeline_name()`). Fences of a context detach from its
/// code and names when they signal (they have neither `release` nor `wait` operations), and
/// unloading a module waits for an RCU grace period (`synchronize_rcu()` in `free_module()`)
/// before its memory goes, so signalled fences may outlive the context and the module that
/// created them. Every fence of a module is signalled before it unloads: a [`UniqueFence`]
/// signals `-ECANCELED` when dropped.
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
pub struct FenceContext {
    context: u64,
    seqno: Atomic<u64>,
    driver_name: &'static CStr,
    timeline_name: &'static CStr,
    level: u32,
}

impl FenceContext {
    /// Creates a new timeline whose fences have nesting level 0.
    pub fn new(driver_name: &'static CStr, timeline_name: &'static CStr) -> Self {
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let context = unsafe { bindings::dma_fence_context_alloc(1) };
        Self {
            context,
            seqno: Atomic::new(0),
            driver_name,
            timeline_name,
            level: 0,
        }
    }

    /// Creates a new timeline whose fences have nesting level `level`.
    ///
    /// A fence of level `n` may be signalled from the signalling path of fences of levels below
    /// `n` (as a [`ProxyFence`] is), and each level has its own lockdep class. Fails with `EINVAL`
    /// if `level` is above [`MAX_NESTING_LEVEL`].
    pub fn new_nested(
        driver_name: &'static CStr,
        timeline_name: &'static CStr,
        level: u32,
    ) -> Result<Self> {
        if level > MAX_NESTING_LEVEL {
            return Err(EINVAL);
        }
        Ok(Self {
            level,
            ..Self::new(driver_name, timeline_name)
        })
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
        // The level is at most `MAX_NESTING_LEVEL`, so it indexes the arrays.
        let level = self.level as usize;
        // SAFETY: `raw` is a valid allocation for a `RawFence`, which we own. The names are written
        // before `dma_fence_init64()`, which may already read them (trace point). The memory comes
        // from kmalloc, so the C side can free it with `dma_fence_free()`. The lock class key is
        // static and the lock was just initialised by `dma_fence_init64()`, before any use.
        // INVARIANT: The names come from `&'static CStr`s.
        unsafe {
            ptr::addr_of_mut!((*raw).driver_name).write(self.driver_name.as_char_ptr());
            ptr::addr_of_mut!((*raw).timeline_name).write(self.timeline_name.as_char_ptr());
            ptr::addr_of_mut!((*raw).level).write(self.level);
            bindings::dma_fence_init64(fence, &FENCE_OPS, ptr::null_mut(), self.context, seqno);
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
    /// Seals [`super::CallbackKind`]: only this module can implement it.
    pub trait Sealed {}

    /// Proves that a [`super::CallbackKind`] method is called by this module.
    pub struct Token(pub(super) ());
}

/// What a [`FenceCallback`] does when its fence signals.
///
/// This trait is sealed: the kinds are the ones of this module, audited for running in atomic
/// context with the fence lock held. Drivers pick one; they cannot implement their own.
pub trait CallbackKind: private::Sealed + Send + Sync {
    /// Performs the action. Called at most once per arming, in atomic (possibly hardirq) context
    /// with the fence lock held, or in the context of [`FenceCallback::arm`] if the fence had
    /// signalled already. Must not sleep, allocate, or drop anything.
    #[doc(hidden)]
    fn signalled(&self, fence: &DmaFence, token: private::Token);
}

/// Whether [`FenceCallback::arm`] left the callback waiting or ran it at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// The fence was pending: the action runs when it signals.
    Waiting,
    /// The fence had signalled already: the action ran during [`FenceCallback::arm`].
    RanNow,
}

/// A callback of kind `K` that can be armed on a fence.
///
/// It owns the `struct dma_fence_cb` the C side links into the fence, a reference to the fence it
/// is armed on, and the kind's payload. Allocate it where it can stay pinned (in a `KBox`, or
/// embedded in a pinned structure) before it is needed: arming does not allocate. Dropping or
/// disarming it removes it from the fence (`dma_fence_remove_callback()`); the payload is dropped
/// with the [`FenceCallback`], never in the callback.
///
/// # Invariants
///
/// If `fence` is `Some`, `cb` was passed to `dma_fence_add_callback()` for that fence, and is
/// either still linked in its callback list or has been unlinked by the C side (signalled, or
/// never added because the fence had signalled).
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
pub struct FenceCallback<K> {
    #[pin]
    cb: Opaque<bindings::dma_fence_cb>,
    fence: Option<ARef<DmaFence>>,
    kind: K,
    #[pin]
    _pin: PhantomPinned,
}

// SAFETY: The `struct dma_fence_cb` is only touched by the C side under the fence lock and by
// `arm`/`disarm`, which need exclusive access; the payload is `Send`.
unsafe impl<K: Send> Send for FenceCallback<K> {}
// SAFETY: Shared references only give access to the fence (`Sync`) and to the payload, which is
// `Sync` as every `CallbackKind` is.
unsafe impl<K: Sync> Sync for FenceCallback<K> {}

impl<K> FenceCallback<K> {
    /// Returns the callback's action and payload.
    #[inline]
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// Returns the fence the callback is armed on, if any.
    #[inline]
    pub fn fence(&self) -> Option<&DmaFence> {
        self.fence.as_deref()
    }

    /// Disarms the callback.
    ///
    /// Returns `true` if the callback was removed before its action ran, `false` if it was not
    /// armed or the action has run. When this returns, the action is not running on another CPU
    /// either.
    pub fn disarm(self: Pin<&mut Self>) -> bool {
        let this = self.project();
        let Some(fence) = this.fence.take() else {
            return false;
        };
        // SAFETY: By the type invariants `cb` was passed to `dma_fence_add_callback()` for
        // `fence`, which is valid. The C side takes the fence lock, so a callback running on
        // another CPU has returned once this returns.
        unsafe { bindings::dma_fence_remove_callback(fence.as_raw(), this.cb.get()) }
    }
}

impl<K: CallbackKind> FenceCallback<K> {
    /// Creates an unarmed callback that will perform `kind`.
    pub fn new(kind: K) -> impl PinInit<Self> {
        pin_init!(Self {
            cb: Opaque::uninit(),
            fence: None,
            kind,
            _pin: PhantomPinned,
        })
    }

    /// Arms the callback on `fence`, disarming it first if it was armed.
    ///
    /// If the fence has signalled already, the action runs at once, in the caller's context, and
    /// [`Armed::RanNow`] is returned. Otherwise it runs when the fence signals.
    pub fn arm(mut self: Pin<&mut Self>, fence: ARef<DmaFence>) -> Armed {
        self.as_mut().disarm();
        let this = self.project();
        let raw_fence = fence.as_raw();
        let cb = this.cb.get();
        *this.fence = Some(fence);
        // SAFETY: The fence is valid and referenced by `this.fence` while the callback may be
        // linked. `cb` is pinned and stays valid until it is removed in `disarm`, which `drop`
        // calls. `Self::callback` matches `cb`'s containing type.
        let ret = unsafe { bindings::dma_fence_add_callback(raw_fence, cb, Some(Self::callback)) };
        // INVARIANT: `cb` was passed to `dma_fence_add_callback()` for `this.fence`.
        if ret == 0 {
            Armed::Waiting
        } else {
            // `-ENOENT`: the fence had signalled and the callback was not added. (`-EINVAL` is
            // only returned for a null fence or function.)
            // SAFETY: The fence is valid for the duration of the call.
            let fence = unsafe { DmaFence::from_raw(raw_fence) };
            this.kind.signalled(fence, private::Token(()));
            Armed::RanNow
        }
    }

    /// The function the C side calls when the fence signals.
    ///
    /// # Safety
    ///
    /// Only called by the C side, for a `cb` added by [`FenceCallback::arm`] to `fence`.
    unsafe extern "C" fn callback(
        fence: *mut bindings::dma_fence,
        cb: *mut bindings::dma_fence_cb,
    ) {
        // SAFETY: `cb` is the `cb` field of a `FenceCallback<K>`, which stays valid and pinned
        // while the callback is linked: it is only freed after `disarm` removed it or the callback
        // ran, and `disarm` waits for the callback by taking the fence lock.
        let this = unsafe { container_of!(Opaque::cast_from(cb), Self, cb) };
        // SAFETY: `this` is valid as argued above; only a shared reference to `kind` is created,
        // and no one mutates `kind` while the callback is armed.
        let kind = unsafe { &*ptr::addr_of!((*this).kind) };
        // SAFETY: The C side passes the fence being signalled, which it holds a reference on.
        let fence = unsafe { DmaFence::from_raw(fence) };
        kind.signalled(fence, private::Token(()));
    }
}

#[pinned_drop]
impl<K> PinnedDrop for FenceCallback<K> {
    fn drop(self: Pin<&mut Self>) {
        self.disarm();
    }
}

/// A [`CallbackKind`] that wakes a task up.
///
/// The task must check the fence (or its own condition) after setting its state and before
/// sleeping, as for any wake-up.
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
    fn signalled(&self, _fence: &DmaFence, _: private::Token) {
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
    fn signalled(&self, _fence: &DmaFence, _: private::Token) {
        // `complete_all()` takes the completion's wait queue lock with interrupts disabled: fine
        // in any context. The `Arc` is only read.
        self.completion.complete_all();
    }
}

/// A workqueue that an [`EnqueueWork`] callback queues on.
#[derive(Clone)]
pub enum WorkQueueRef {
    /// A workqueue that lives for ever, such as [`workqueue::system`](crate::workqueue::system).
    Static(&'static Queue),
    /// A workqueue owned by the user, kept alive by the callback.
    Owned(Arc<OwnedQueue>),
}

impl WorkQueueRef {
    /// Returns the workqueue.
    pub fn queue(&self) -> &Queue {
        match self {
            Self::Static(queue) => queue,
            Self::Owned(queue) => queue,
        }
    }
}

impl From<&'static Queue> for WorkQueueRef {
    fn from(queue: &'static Queue) -> Self {
        Self::Static(queue)
    }
}

impl From<Arc<OwnedQueue>> for WorkQueueRef {
    fn from(queue: Arc<OwnedQueue>) -> Self {
        Self::Owned(queue)
    }
}

/// A [`CallbackKind`] that enqueues a work item on a workqueue.
///
/// This is the kind to use for anything but the simplest actions: the work item runs in process
/// context, where it may sleep and drop what it likes. If the work item is still pending when the
/// fence signals, it is not queued a second time.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{EnqueueWork, FenceCallback, FenceContext};
/// use kernel::sync::{Arc, Completion};
/// use kernel::workqueue::{self, impl_has_work, new_work, Work, WorkItem};
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
/// let mut cb = KBox::pin_init(
///     FenceCallback::new(EnqueueWork::new(workqueue::system_dfl(), retire.clone())),
///     GFP_KERNEL,
/// )?;
/// cb.as_mut().arm(fence.to_aref());
/// fence.signal(Ok(()));
/// retire.done.wait_for_completion();
/// # Ok::<(), Error>(())
/// ```
pub struct EnqueueWork<T, const ID: u64 = 0> {
    queue: WorkQueueRef,
    item: Arc<T>,
}

impl<T, const ID: u64> EnqueueWork<T, ID>
where
    T: WorkItem<ID, Pointer = Arc<T>> + HasWork<T, ID> + Send + Sync + 'static,
{
    /// Enqueues `item` on `queue` when the fence signals.
    pub fn new(queue: impl Into<WorkQueueRef>, item: Arc<T>) -> Self {
        Self {
            queue: queue.into(),
            item,
        }
    }

    /// Returns the work item.
    pub fn item(&self) -> &Arc<T> {
        &self.item
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
    fn signalled(&self, _fence: &DmaFence, _: private::Token) {
        // `queue_work_on()` can be called from any context. The clone only increments a
        // reference count. If the item is already pending, `enqueue` hands the clone back and it
        // is dropped here: that only decrements the count, never to zero, because `self.item`
        // holds a reference for as long as this callback exists.
        let _ = self.queue.queue().enqueue(self.item.clone());
    }
}

/// A [`CallbackKind`] that queues work on a [`kthread::Worker`].
///
/// Like [`EnqueueWork`], for drivers that run their work on a dedicated kernel thread (for
/// example with a real-time priority).
pub struct QueueKthreadWork<T, const ID: u64 = 0> {
    worker: Arc<kthread::Worker>,
    item: Arc<T>,
}

impl<T, const ID: u64> QueueKthreadWork<T, ID>
where
    T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>,
{
    /// Queues `item` on `worker` when the fence signals.
    pub fn new(worker: Arc<kthread::Worker>, item: Arc<T>) -> Self {
        Self { worker, item }
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
    fn signalled(&self, _fence: &DmaFence, _: private::Token) {
        // `kthread_queue_work()` takes the worker's raw spinlock with interrupts disabled: fine in
        // any context. As in `EnqueueWork`, a clone handed back because the item is pending never
        // drops the last reference, which `self.item` holds.
        let _ = self.worker.queue::<T, ID>(self.item.clone());
    }
}

/// The action of a [`ProxyFence`]: signal the proxy's fence with the source's result.
///
/// # Invariants
///
/// `target` is only accessed by the callback (at most once per arming, serialised with
/// [`FenceCallback::disarm`] by the source's lock), by [`FenceCallback::arm`] when it runs the
/// action at once, or by the owner of the [`ProxyFence`] after disarming it.
struct SignalProxy {
    target: UnsafeCell<Option<UniqueFence>>,
}

// SAFETY: `UniqueFence` is `Send`; see below for the shared access.
unsafe impl Send for SignalProxy {}
// SAFETY: By the type invariants the accesses to `target` never overlap.
unsafe impl Sync for SignalProxy {}

impl private::Sealed for SignalProxy {}

impl CallbackKind for SignalProxy {
    fn signalled(&self, source: &DmaFence, _: private::Token) {
        // SAFETY: By the type invariants nothing else accesses `target` now.
        let target = unsafe { &mut *self.target.get() };
        if let Some(fence) = target.take() {
            // SAFETY: The source is valid and signalled, so its error is final.
            let error = unsafe { (*source.as_raw()).error };
            // Signalling takes the target's lock, of a higher lockdep class than the source's, and
            // runs its callbacks, which are kinds of this module. Dropping `fence` only puts a
            // reference: the proxy keeps another one.
            fence.signal(error_to_result(error));
        }
    }
}

/// A fence that signals when another fence does, with the same result.
///
/// It owns its fence (a [`UniqueFence`] of a nesting level above its source's) and a callback
/// that signals it from the signalling path of the source: the proxy's consumers see it signal
/// with no deferral. Its fence can be shared before the source is known, which is what a job
/// queue's done fence needs: it exists at submission, the hardware fence only when the job runs.
///
/// If the proxy is dropped while its fence is unsignalled, the fence signals `-ECANCELED`.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{FenceContext, ProxyFence};
///
/// let hw = FenceContext::new(c"example", c"hw-ring");
/// let done = FenceContext::new_nested(c"example", c"done", 1)?;
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
/// `fence` is the fence of the [`UniqueFence`] the proxy was created with: the `base` of a
/// `RawFence`.
#[pin_data]
pub struct ProxyFence {
    #[pin]
    callback: FenceCallback<SignalProxy>,
    fence: ARef<DmaFence>,
}

impl ProxyFence {
    /// Creates a proxy that will drive `fence`.
    pub fn new(fence: UniqueFence) -> impl PinInit<Self> {
        let shared = fence.to_aref();
        // INVARIANT: `shared` is the fence of `fence`.
        pin_init!(Self {
            callback <- FenceCallback::new(SignalProxy {
                target: UnsafeCell::new(Some(fence)),
            }),
            fence: shared,
        })
    }

    /// Returns the nesting level of the proxy's fence.
    fn level(&self) -> u32 {
        // SAFETY: By the type invariants `fence` is the `base` of a `RawFence`, which lives as long
        // as the reference the proxy holds; its `level` does not change after initialisation.
        unsafe { (*self.fence.as_raw().cast::<RawFence>()).level }
    }

    /// Returns the proxy's fence, the one its consumers wait for.
    #[inline]
    pub fn fence(&self) -> &ARef<DmaFence> {
        &self.fence
    }

    /// Makes the proxy's fence signal when `source` does, with its result.
    ///
    /// If `source` has signalled already, the proxy's fence signals now. Replaces the previous
    /// source, if any. Fails with `EINVAL`, leaving the proxy unchanged, if `source` is a fence of
    /// this module whose nesting level is not below the proxy's: signalling the proxy inside the
    /// source's lock would then be lock recursion.
    pub fn follow(self: Pin<&mut Self>, source: ARef<DmaFence>) -> Result {
        if source.nesting_level() >= self.level() {
            return Err(EINVAL);
        }
        self.project().callback.arm(source);
        Ok(())
    }

    /// Stops following the source, without signalling the proxy's fence.
    ///
    /// Returns `true` if the proxy's fence has not signalled: it then signals only through a
    /// later [`ProxyFence::follow`], [`ProxyFence::signal`] or the drop of the proxy. Returns
    /// `false` if the source had signalled it already.
    pub fn detach(self: Pin<&mut Self>) -> bool {
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
        while !view.is_signaled() {
            // A lost wake-up would sleep for the whole 10 s.
            // SAFETY: Sleeping is allowed in a test.
            unsafe {
                bindings::schedule_timeout_uninterruptible(msecs_to_jiffies(10_000) as c_long)
            };
        }
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
        let owned = Arc::new(OwnedQueue::new_ordered(c"rust_dma_fence_test")?, GFP_KERNEL)?;
        for queue in [WorkQueueRef::from(workqueue::system_dfl()), owned.into()] {
            let counter = Counter::new()?;
            let fence = ctx().new_fence(GFP_KERNEL)?;
            let mut cb = KBox::pin_init(
                FenceCallback::new(EnqueueWork::new(queue, counter.clone())),
                GFP_KERNEL,
            )?;
            assert_eq!(cb.as_mut().arm(fence.to_aref()), Armed::Waiting);
            let (signaller, _timer) = IrqSignaller::start(fence, Ok(()), Delta::from_millis(2))?;
            counter.ran.wait_for_completion();
            counter.work.flush();
            assert!(signaller.fired_in_hardirq.load(ordering::Relaxed));
            assert_eq!(counter.runs.load(ordering::Relaxed), 1);
        }
        Ok(())
    }

    #[test]
    fn kthread_work_from_irq() -> Result {
        let worker = Arc::new(kthread::Worker::new(c"rust_dma_fence_test")?, GFP_KERNEL)?;
        let counter = Counter::new()?;
        let fence = ctx().new_fence(GFP_KERNEL)?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(QueueKthreadWork::new(worker.clone(), counter.clone())),
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
            FenceCallback::new(EnqueueWork::new(workqueue::system_dfl(), counter.clone())),
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

    /// Signals a fence from a work item, on another CPU when there is one.
    #[pin_data]
    struct RemoteSignaller {
        #[pin]
        work: Work<RemoteSignaller>,
        #[pin]
        fence: SpinLockIrq<Option<UniqueFence>>,
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
            if let Some(fence) = taken {
                fence.signal(Ok(()));
            }
        }
    }

    #[test]
    fn remove_racing_signal() -> Result {
        const ITERATIONS: u32 = 4000;
        let ctx = ctx();
        let counter = Counter::new()?;
        let mut cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(workqueue::system_dfl(), counter.clone())),
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
                *remote.fence.lock() = Some(fence);
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

    fn nested(level: u32) -> Result<FenceContext> {
        FenceContext::new_nested(c"rust_dma_fence_test", c"nested", level)
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
        let mem = KBox::<MaybeUninit<bindings::dma_fence>>::new_uninit(GFP_KERNEL)?;
        let raw = KBox::into_raw(mem).cast::<bindings::dma_fence>();
        // SAFETY: `raw` is a kmalloc'ed `struct dma_fence` (freed with `kfree_rcu()` by
        // `dma_fence_free()` since `C_OPS` has no `release`). The initial reference goes to the
        // `ARef`.
        unsafe {
            bindings::dma_fence_init(raw, &C_OPS, ptr::null_mut(), context, seqno);
            Ok(ARef::from_raw(NonNull::new_unchecked(raw.cast())))
        }
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
            FenceCallback::new(EnqueueWork::new(workqueue::system_dfl(), counter.clone())),
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
}
