// SPDX-License-Identifier: GPL-2.0

//! Kthread workers: work items run one after the other on a kernel thread of their own.
//!
//! A kthread worker (`struct kthread_worker`) is a kernel thread that runs the work items queued
//! on it in the order they were queued, one at a time. Unlike a [workqueue], the thread belongs to
//! its user: it runs nothing else, and its scheduling policy and priority are the user's to set.
//!
//! # Design
//!
//! - [`Worker`] owns a kthread worker and its thread. Dropping it runs every work item still
//!   queued on it, then stops the thread.
//! - [`KthreadWork`] wraps `struct kthread_work`. It is embedded in a struct that implements
//!   [`HasKthreadWork`] (with [`impl_has_kthread_work!`]) and [`KthreadWorkItem`].
//! - [`Worker::queue`] takes an [`Arc<T>`] of that struct. While the work item is queued, the C
//!   side owns that reference; the worker thread hands it to [`KthreadWorkItem::run`].
//!
//! As in the [workqueue] API, the `ID` const parameter lets a struct embed several
//! [`KthreadWork`] fields, one per `ID`.
//!
//! # Lifecycle of a work item
//!
//! ```text
//!                  queue() -> Ok
//!   +------+ ---------------------> +---------+ <--+
//!   | Idle |                        | Pending |    | queue() -> Err(item)
//!   +------+ <---+                  +---------+ ---+
//!                |                     |   ^
//!   run()        |    worker thread    |   | queue() -> Ok
//!   returns      |    calls run()      v   |
//!                |                  +---------+
//!                +----------------- | Running |
//!                                   +---------+
//! ```
//!
//! A work item may be queued again while it runs: it then runs once more after `run()` returns.
//!
//! A `struct kthread_work` must only ever be used with one worker: the C code keeps a pointer to
//! the last worker a work item was queued on and takes that worker's lock to flush it, and queuing
//! it on a second worker while it is pending on the first would corrupt the first worker's list.
//! [`KthreadWork`] enforces this: the first [`Worker::queue`] binds the work item to that worker
//! for good, and queuing it on any other worker hands it back.
//!
//! # Context
//!
//! [`Worker::queue`] may be called from any context, hard interrupt handlers included: it does not
//! allocate, and it only takes the worker's raw spinlock with interrupts disabled. If it hands the
//! item back, dropping that [`Arc`] may run the item's destructor in the same context when it was
//! the last reference. Creating, flushing and dropping a [`Worker`] sleep.
//!
//! # Examples
//!
//! ```
//! use kernel::kthread::{
//!     impl_has_kthread_work,
//!     KthreadWork,
//!     KthreadWorkItem,
//!     Worker, //
//! };
//! use kernel::sync::{
//!     atomic::{
//!         Atomic,
//!         Relaxed, //
//!     },
//!     Arc, //
//! };
//!
//! #[pin_data]
//! struct Job {
//!     value: u32,
//!     result: Atomic<u32>,
//!     #[pin]
//!     work: KthreadWork<Job>,
//! }
//!
//! impl_has_kthread_work! {
//!     impl HasKthreadWork<Self> for Job { self.work }
//! }
//!
//! impl KthreadWorkItem for Job {
//!     fn run(this: Arc<Job>) {
//!         this.result.store(this.value * 2, Relaxed);
//!     }
//! }
//!
//! let worker = Worker::new(c"example_worker")?;
//! let job = Arc::pin_init(
//!     pin_init!(Job { value: 21, result: Atomic::new(0), work <- KthreadWork::new() }),
//!     GFP_KERNEL,
//! )?;
//! worker.queue(job.clone()).map_err(|_| EBUSY)?;
//! worker.flush();
//! assert_eq!(job.result.load(Relaxed), 42);
//! # Ok::<(), Error>(())
//! ```
//!
//! [workqueue]: crate::workqueue
//!
//! C header: [`include/linux/kthread.h`](srctree/include/linux/kthread.h)

use crate::{
    container_of,
    error::from_err_ptr,
    prelude::*,
    sync::{
        atomic::{
            Atomic,
            Relaxed, //
        },
        Arc, //
    },
    types::Opaque,
};
use core::{
    marker::PhantomData,
    ptr::{
        self,
        NonNull, //
    },
};

/// An owned kthread worker: a kernel thread that runs queued work items in order.
///
/// Dropping a [`Worker`] runs every work item still queued on it, then stops its thread. It sleeps,
/// and must not happen from a work item running on this worker, which would wait for itself.
///
/// # Invariants
///
/// `ptr` points at a worker created by `kthread_run_worker()`, owned by this object, whose thread
/// runs until `kthread_destroy_worker()` in [`Drop`].
///
/// # Examples
///
/// A [`Worker`] shared through an [`Arc`] can be used by several threads:
///
/// ```
/// use kernel::kthread::Worker;
/// use kernel::sync::Arc;
///
/// let worker = Arc::new(Worker::new(c"example_shared")?, GFP_KERNEL)?;
/// let other = worker.clone();
/// other.flush();
/// drop(worker);
/// // The thread stops when the last reference goes away.
/// drop(other);
/// # Ok::<(), Error>(())
/// ```
pub struct Worker {
    ptr: NonNull<bindings::kthread_worker>,
}

// SAFETY: A kthread worker can be used and destroyed from any thread: queuing and flushing take
// the worker's lock, and `kthread_destroy_worker()` has no thread affinity.
unsafe impl Send for Worker {}

// SAFETY: The methods taking `&self` call `kthread_queue_work()`, `kthread_flush_work()` and
// `kthread_flush_worker()`, which may run concurrently on the same worker: they serialise on the
// worker's lock.
unsafe impl Sync for Worker {}

impl Worker {
    /// Creates a kthread worker and starts its thread, named `name`.
    ///
    /// The name is copied. Must be called from a context that may sleep.
    ///
    /// # Errors
    ///
    /// `ENOMEM` if the worker or its thread cannot be allocated, `EINTR` if the calling task was
    /// killed meanwhile.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::kthread::Worker;
    ///
    /// let worker = Worker::new(c"example_new")?;
    /// # drop(worker);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn new(name: &CStr) -> Result<Self> {
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call, and
        // `kthread_run_worker()` copies it into the thread's name.
        let ptr = from_err_ptr(unsafe { bindings::kthread_run_worker(0, name.as_char_ptr()) })?;

        // INVARIANT: `kthread_run_worker()` returned a worker whose thread is running, and nobody
        // else has a pointer to it.
        Ok(Self {
            ptr: NonNull::new(ptr).ok_or(ENOMEM)?,
        })
    }

    /// Returns the raw `struct kthread_worker` pointer.
    ///
    /// It is valid as long as `self` is.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::kthread::Worker;
    ///
    /// let worker = Worker::new(c"example_as_raw")?;
    /// assert!(!worker.as_raw().is_null());
    /// # Ok::<(), Error>(())
    /// ```
    #[inline]
    pub fn as_raw(&self) -> *mut bindings::kthread_worker {
        self.ptr.as_ptr()
    }

    /// Queues a work item on this worker.
    ///
    /// On success the worker owns the reference `item`, and its thread passes it to
    /// [`KthreadWorkItem::run`].
    ///
    /// May be called from any context, including hard interrupt handlers: it does not allocate
    /// or sleep. If `item` is handed back and it was the last reference, dropping it runs `T`'s
    /// destructor in that context.
    ///
    /// # Errors
    ///
    /// Hands `item` back if the work item is already pending, or if it was queued on another
    /// worker before: a work item is bound to the first worker it is queued on.
    ///
    /// # Examples
    ///
    /// ```
    /// # use kernel::kthread::{impl_has_kthread_work, KthreadWork, KthreadWorkItem};
    /// # use kernel::sync::{atomic::{Atomic, Relaxed}, Arc};
    /// use kernel::kthread::Worker;
    ///
    /// # #[pin_data]
    /// # struct Job {
    /// #     runs: Atomic<u32>,
    /// #     #[pin]
    /// #     work: KthreadWork<Job>,
    /// # }
    /// # impl_has_kthread_work! {
    /// #     impl HasKthreadWork<Self> for Job { self.work }
    /// # }
    /// # impl KthreadWorkItem for Job {
    /// #     fn run(this: Arc<Job>) {
    /// #         this.runs.add(1, Relaxed);
    /// #     }
    /// # }
    /// # let job = Arc::pin_init(
    /// #     pin_init!(Job { runs: Atomic::new(0), work <- KthreadWork::new() }),
    /// #     GFP_KERNEL,
    /// # )?;
    /// let worker = Worker::new(c"example_queue")?;
    /// // `job` is an `Arc<Job>`; `Job` implements `KthreadWorkItem`.
    /// if worker.queue(job.clone()).is_err() {
    ///     pr_info!("the job was already pending\n");
    /// }
    /// worker.flush();
    /// assert_eq!(job.runs.load(Relaxed), 1);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn queue<T, const ID: u64>(&self, item: Arc<T>) -> Result<(), Arc<T>>
    where
        T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>,
    {
        let ptr = Arc::into_raw(item).cast_mut();

        // SAFETY: `ptr` comes from `Arc::into_raw()`, so it points at a valid `T`.
        let work = unsafe { T::raw_get_kthread_work(ptr) };

        // SAFETY: `work` points into the `T` that we hold a reference to, so it is valid for the
        // duration of the call.
        if !unsafe { (*work).bind(self.ptr.as_ptr()) } {
            // SAFETY: `ptr` comes from `Arc::into_raw()` above and nobody took over its reference.
            return Err(unsafe { Arc::from_raw(ptr) });
        }

        // SAFETY:
        // - By the type invariants `self.ptr` is a running worker.
        // - `work` is valid as shown above, and by the type invariants of `KthreadWork` its
        //   `kthread_work` is initialised and has only ever been queued on `self`, to which it is
        //   now bound: it is on no other worker's list.
        // - If this returns `true`, the worker takes over the reference that `Arc::into_raw()`
        //   gave up above: it stays valid until the worker calls the work item's function, which
        //   is `KthreadWork::<T, ID>::run()` by the type invariants of `KthreadWork<T, ID>`, and
        //   which reclaims it.
        if unsafe { bindings::kthread_queue_work(self.ptr.as_ptr(), KthreadWork::raw_get(work)) } {
            Ok(())
        } else {
            // SAFETY: The work item was already pending, so the worker did not take over the
            // reference that `Arc::into_raw()` gave up above.
            Err(unsafe { Arc::from_raw(ptr) })
        }
    }

    /// Binds `item` to this worker for good, without queuing it.
    ///
    /// Afterwards [`Worker::queue`] fails for `item` only while it is pending. This lets code
    /// that queues the item later, where it cannot handle an error (a fence callback), check at
    /// creation that the item is not bound to another worker.
    ///
    /// # Errors
    ///
    /// `EINVAL` if the work item is bound to another worker.
    pub fn bind<T, const ID: u64>(&self, item: &Arc<T>) -> Result
    where
        T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>,
    {
        // SAFETY: `item` points at a valid `T`, which stays alive for the call.
        let work = unsafe { T::raw_get_kthread_work(Arc::as_ptr(item).cast_mut()) };
        // SAFETY: `work` points into the `T` that `item` holds a reference to.
        if unsafe { (*work).bind(self.ptr.as_ptr()) } {
            Ok(())
        } else {
            Err(EINVAL)
        }
    }

    /// Waits until every work item queued on this worker so far has run.
    ///
    /// Must be called from a context that may sleep, and not from a work item running on this
    /// worker, which would wait for itself.
    ///
    /// # Examples
    ///
    /// ```
    /// use kernel::kthread::Worker;
    ///
    /// let worker = Worker::new(c"example_flush")?;
    /// worker.flush();
    /// # Ok::<(), Error>(())
    /// ```
    pub fn flush(&self) {
        // SAFETY: By the type invariants `self.ptr` is a running worker.
        unsafe { bindings::kthread_flush_worker(self.ptr.as_ptr()) }
    }

    /// Waits until `item`'s last queuing on this worker has run, if it is pending or running.
    ///
    /// Returns at once if `item` was never queued on this worker. Must be called from a context
    /// that may sleep, and not from a work item running on this worker.
    ///
    /// # Examples
    ///
    /// ```
    /// # use kernel::kthread::{impl_has_kthread_work, KthreadWork, KthreadWorkItem};
    /// # use kernel::sync::{atomic::{Atomic, Relaxed}, Arc};
    /// use kernel::kthread::Worker;
    ///
    /// # #[pin_data]
    /// # struct Job {
    /// #     runs: Atomic<u32>,
    /// #     #[pin]
    /// #     work: KthreadWork<Job>,
    /// # }
    /// # impl_has_kthread_work! {
    /// #     impl HasKthreadWork<Self> for Job { self.work }
    /// # }
    /// # impl KthreadWorkItem for Job {
    /// #     fn run(this: Arc<Job>) {
    /// #         this.runs.add(1, Relaxed);
    /// #     }
    /// # }
    /// # let job = Arc::pin_init(
    /// #     pin_init!(Job { runs: Atomic::new(0), work <- KthreadWork::new() }),
    /// #     GFP_KERNEL,
    /// # )?;
    /// let worker = Worker::new(c"example_flush_work")?;
    /// worker.queue(job.clone()).map_err(|_| EBUSY)?;
    /// worker.flush_work(&*job);
    /// assert_eq!(job.runs.load(Relaxed), 1);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn flush_work<T, const ID: u64>(&self, item: &T)
    where
        T: HasKthreadWork<T, ID>,
    {
        // SAFETY: `item` is a valid `T`.
        let work = unsafe { T::raw_get_kthread_work(ptr::from_ref(item).cast_mut()) };

        // SAFETY: `work` points into `item`, which is valid for the duration of this method.
        let work = unsafe { &*work };

        // Relaxed is enough: if the binding to `self` is not visible yet, neither is the queuing
        // that follows it, so there is nothing to wait for.
        if work.worker.load(Relaxed) != self.ptr.as_ptr() {
            return;
        }

        // SAFETY: By the type invariants of `KthreadWork` its `kthread_work` is initialised, and
        // the C code's pointer to its worker is null or `self.ptr` since the work item is bound to
        // `self`; by the type invariants of `Self` that worker is running.
        unsafe { bindings::kthread_flush_work(work.work.get()) }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: By the type invariants `self.ptr` is a running worker owned by `self`, and it is
        // not used after this. Nothing can queue work on it while it is destroyed: queuing takes a
        // `&Worker`, of which none is left, and work items, being `'static`, cannot borrow it
        // either. So `kthread_destroy_worker()` leaves no work behind: it runs the pending work
        // items, whose functions reclaim the references that `Worker::queue()` gave the worker,
        // then stops the thread.
        unsafe { bindings::kthread_destroy_worker(self.ptr.as_ptr()) }
    }
}

/// A work item that runs on a [`Worker`].
///
/// Implement it for a struct that embeds a [`KthreadWork`] and implements [`HasKthreadWork`], and
/// queue an [`Arc`] of that struct with [`Worker::queue`].
///
/// # Examples
///
/// ```
/// use kernel::kthread::{
///     impl_has_kthread_work,
///     KthreadWork,
///     KthreadWorkItem,
///     Worker, //
/// };
/// use kernel::sync::{
///     Arc,
///     Completion, //
/// };
///
/// #[pin_data]
/// struct Signal {
///     #[pin]
///     done: Completion,
///     #[pin]
///     work: KthreadWork<Signal>,
/// }
///
/// impl_has_kthread_work! {
///     impl HasKthreadWork<Self> for Signal { self.work }
/// }
///
/// impl KthreadWorkItem for Signal {
///     fn run(this: Arc<Signal>) {
///         this.done.complete_all();
///     }
/// }
///
/// let worker = Worker::new(c"example_item")?;
/// let signal = Arc::pin_init(
///     pin_init!(Signal { done <- Completion::new(), work <- KthreadWork::new() }),
///     GFP_KERNEL,
/// )?;
/// worker.queue(signal.clone()).map_err(|_| EBUSY)?;
/// signal.done.wait_for_completion();
/// # Ok::<(), Error>(())
/// ```
pub trait KthreadWorkItem<const ID: u64 = 0>: Send + Sync + 'static {
    /// Runs the work item on the worker's thread.
    ///
    /// `this` is the reference that [`Worker::queue`] gave the worker.
    fn run(this: Arc<Self>);
}

/// Links for a work item queued on a [`Worker`].
///
/// Wraps the kernel's C `struct kthread_work`, and the worker the work item is bound to.
///
/// # Invariants
///
/// - `work` is initialised by `kthread_init_work()` with `KthreadWork::<T, ID>::run` as its
///   function.
/// - `worker` is null until the work item is first queued, and then holds for good the address
///   of the worker it was queued on. `work` is only ever queued on that worker: the C code's
///   pointer to its worker is null or equal to `worker`.
///
/// # Examples
///
/// ```
/// use kernel::kthread::{
///     impl_has_kthread_work,
///     KthreadWork,
///     KthreadWorkItem, //
/// };
/// use kernel::sync::Arc;
///
/// #[pin_data]
/// struct Job {
///     id: u32,
///     #[pin]
///     work: KthreadWork<Job>,
/// }
///
/// impl_has_kthread_work! {
///     impl HasKthreadWork<Self> for Job { self.work }
/// }
///
/// impl KthreadWorkItem for Job {
///     fn run(this: Arc<Job>) {
///         pr_info!("job {} ran\n", this.id);
///     }
/// }
///
/// let job = Arc::pin_init(pin_init!(Job { id: 1, work <- KthreadWork::new() }), GFP_KERNEL)?;
/// # drop(job);
/// # Ok::<(), Error>(())
/// ```
#[pin_data]
pub struct KthreadWork<T, const ID: u64 = 0> {
    #[pin]
    work: Opaque<bindings::kthread_work>,
    worker: Atomic<*mut bindings::kthread_worker>,
    _inner: PhantomData<T>,
}

// SAFETY: A `struct kthread_work` can be used and freed from any thread, and the `T` parameter is
// only a marker: a `KthreadWork<T, ID>` does not contain a `T`.
unsafe impl<T, const ID: u64> Send for KthreadWork<T, ID> {}

// SAFETY: Shared references only bind, queue and flush the work item: binding is an atomic
// operation, and the C code serialises queuing and flushing with the lock of the one worker the
// work item is bound to.
unsafe impl<T, const ID: u64> Sync for KthreadWork<T, ID> {}

impl<T, const ID: u64> KthreadWork<T, ID> {
    /// Creates a new, idle [`KthreadWork`].
    ///
    /// # Examples
    ///
    /// ```
    /// # use kernel::kthread::{impl_has_kthread_work, KthreadWorkItem};
    /// # use kernel::sync::Arc;
    /// use kernel::kthread::KthreadWork;
    ///
    /// # #[pin_data]
    /// # struct Job {
    /// #     #[pin]
    /// #     work: KthreadWork<Job>,
    /// # }
    /// # impl_has_kthread_work! {
    /// #     impl HasKthreadWork<Self> for Job { self.work }
    /// # }
    /// # impl KthreadWorkItem for Job {
    /// #     fn run(_this: Arc<Job>) {}
    /// # }
    /// let job = Arc::pin_init(pin_init!(Job { work <- KthreadWork::new() }), GFP_KERNEL)?;
    /// # drop(job);
    /// # Ok::<(), Error>(())
    /// ```
    #[inline]
    pub fn new() -> impl PinInit<Self>
    where
        T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>,
    {
        pin_init!(Self {
            // INVARIANT: `kthread_init_work()` sets `Self::run` as the function, and zeroes the C
            // code's pointer to the worker, like `worker` below.
            work <- Opaque::ffi_init(|slot| {
                // SAFETY: `slot` is valid for writes, and `kthread_init_work()` initialises all of
                // it. `Self::run` may be the function: `Worker::queue()` only ever queues a
                // `KthreadWork<T, ID>` found with `T::raw_get_kthread_work()` in the `T` of an
                // `Arc<T>` whose reference the worker took over, as `Self::run` requires.
                unsafe { bindings::kthread_init_work(slot, Some(Self::run)) }
            }),
            worker: Atomic::new(ptr::null_mut()),
            _inner: PhantomData,
        })
    }

    /// Returns a pointer to the `struct kthread_work`.
    ///
    /// # Safety
    ///
    /// `ptr` must be properly aligned and not dangling.
    #[inline]
    unsafe fn raw_get(ptr: *const Self) -> *mut bindings::kthread_work {
        // SAFETY: The caller promises that `ptr` is aligned and not dangling.
        Opaque::cast_into(unsafe { &raw const (*ptr).work })
    }

    /// Binds the work item to `worker` unless it is bound to another worker already.
    ///
    /// Returns whether the work item is bound to `worker`.
    fn bind(&self, worker: *mut bindings::kthread_worker) -> bool {
        // INVARIANT: `self.worker` only changes from null, before `self.work` was ever queued.
        //
        // Relaxed is enough: the compare-exchange only picks the one worker that may ever queue
        // `self.work`, and the queuing itself is ordered by that worker's lock.
        let old = self.worker.cmpxchg(ptr::null_mut(), worker, Relaxed);

        // Bound just now, or bound to `worker` before.
        old.is_ok() || old == Err(worker)
    }

    /// The function of every `KthreadWork<T, ID>`: gives the work item's reference back to `T`.
    ///
    /// # Safety
    ///
    /// `ptr` must point at the `struct kthread_work` of a `KthreadWork<T, ID>` that
    /// `T::raw_get_kthread_work()` returned for the `T` of an `Arc<T>` whose reference the caller
    /// owns (the worker took it over in [`Worker::queue`]), and that reference must not be used
    /// afterwards.
    unsafe extern "C" fn run(ptr: *mut bindings::kthread_work)
    where
        T: KthreadWorkItem<ID> + HasKthreadWork<T, ID>,
    {
        // CAST: `Opaque<T>` has the layout of `T`.
        let work = Opaque::cast_from(ptr).cast_mut();

        // SAFETY: By the safety requirements `work` is the `work` field of a `KthreadWork<T, ID>`.
        let work = unsafe { container_of!(work, Self, work) };

        // SAFETY: By the safety requirements `work` was returned by `T::raw_get_kthread_work()`.
        let item = unsafe { T::kthread_work_container_of(work) };

        // SAFETY: By the safety requirements `item` is the pointer of an `Arc<T>` whose reference
        // we now own, which `Worker::queue()` got from `Arc::into_raw()`.
        T::run(unsafe { Arc::from_raw(item) })
    }
}

/// Declares that a type contains a [`KthreadWork<T, ID>`].
///
/// Implement it with [`impl_has_kthread_work!`], which checks the field's type.
///
/// # Safety
///
/// [`raw_get_kthread_work`] and [`kthread_work_container_of`] must return valid pointers and be
/// true inverses of each other:
/// - `kthread_work_container_of(raw_get_kthread_work(ptr)) == ptr` for any `ptr: *mut Self`;
/// - `raw_get_kthread_work(kthread_work_container_of(ptr)) == ptr` for any
///   `ptr: *mut KthreadWork<T, ID>`.
///
/// [`raw_get_kthread_work`]: HasKthreadWork::raw_get_kthread_work
/// [`kthread_work_container_of`]: HasKthreadWork::kthread_work_container_of
///
/// # Examples
///
/// ```
/// use kernel::kthread::{
///     impl_has_kthread_work,
///     HasKthreadWork,
///     KthreadWork, //
/// };
///
/// struct Job {
///     work: KthreadWork<Job>,
/// }
///
/// impl_has_kthread_work! {
///     impl HasKthreadWork<Self> for Job { self.work }
/// }
///
/// fn embeds_kthread_work<T: HasKthreadWork<T>>() {}
///
/// embeds_kthread_work::<Job>();
/// # Ok::<(), Error>(())
/// ```
pub unsafe trait HasKthreadWork<T, const ID: u64 = 0> {
    /// Returns a pointer to the [`KthreadWork<T, ID>`] field.
    ///
    /// # Safety
    ///
    /// `ptr` must point at a valid `Self`.
    unsafe fn raw_get_kthread_work(ptr: *mut Self) -> *mut KthreadWork<T, ID>;

    /// Returns a pointer to the struct containing the [`KthreadWork<T, ID>`] field.
    ///
    /// # Safety
    ///
    /// `ptr` must point at the [`KthreadWork<T, ID>`] field of a `Self`.
    unsafe fn kthread_work_container_of(ptr: *mut KthreadWork<T, ID>) -> *mut Self;
}

/// Implements [`HasKthreadWork<T, ID>`] for a struct, given its [`KthreadWork<T, ID>`] field.
///
/// # Examples
///
/// ```
/// use kernel::kthread::{
///     impl_has_kthread_work,
///     KthreadWork, //
/// };
///
/// struct TwoJobs<T> {
///     first: KthreadWork<TwoJobs<T>, 1>,
///     second: KthreadWork<TwoJobs<T>, 2>,
///     data: T,
/// }
///
/// impl_has_kthread_work! {
///     impl{T} HasKthreadWork<TwoJobs<T>, 1> for TwoJobs<T> { self.first }
///     impl{T} HasKthreadWork<TwoJobs<T>, 2> for TwoJobs<T> { self.second }
/// }
/// # Ok::<(), Error>(())
/// ```
#[macro_export]
macro_rules! impl_has_kthread_work {
    ($(impl$({$($generics:tt)*})?
       HasKthreadWork<$work_type:ty $(, $id:tt)?>
       for $self:ty
       { self.$field:ident }
    )*) => {$(
        // SAFETY: `raw_get_kthread_work` only compiles if the field has the right type, and
        // `kthread_work_container_of` is its inverse.
        unsafe impl$(<$($generics)+>)? $crate::kthread::HasKthreadWork<$work_type $(, $id)?>
            for $self
        {
            #[inline]
            unsafe fn raw_get_kthread_work(
                ptr: *mut Self,
            ) -> *mut $crate::kthread::KthreadWork<$work_type $(, $id)?> {
                // SAFETY: The caller promises that `ptr` points at a valid `Self`.
                unsafe { &raw mut (*ptr).$field }
            }

            #[inline]
            unsafe fn kthread_work_container_of(
                ptr: *mut $crate::kthread::KthreadWork<$work_type $(, $id)?>,
            ) -> *mut Self {
                // SAFETY: The caller promises that `ptr` points at the `$field` field of a
                // `Self`.
                unsafe { $crate::container_of!(ptr, Self, $field) }
            }
        }
    )*};
}
pub use impl_has_kthread_work;

#[cfg(CONFIG_RUST_KTHREAD_KUNIT_TEST)]
#[kunit_tests(rust_kthread_worker)]
mod tests {
    use super::*;
    use crate::{
        impl_has_hr_timer,
        sync::{
            atomic::{
                Acquire,
                Full,
                Release, //
            },
            ArcBorrow,
            Completion, //
        },
        task::Task,
        time::{
            delay::fsleep,
            hrtimer::{
                HrTimer,
                HrTimerCallback,
                HrTimerCallbackContext,
                HrTimerPointer,
                HrTimerRestart,
                RelativeHardMode, //
            },
            Delta,
            Monotonic, //
        },
        workqueue,
    };

    /// Counters shared by the probes of one test.
    struct Stats {
        runs: Atomic<u32>,
        drops: Atomic<u32>,
    }

    impl Stats {
        fn new() -> Result<Arc<Self>> {
            Ok(Arc::new(
                Stats {
                    runs: Atomic::new(0),
                    drops: Atomic::new(0),
                },
                GFP_KERNEL,
            )?)
        }
    }

    /// A work item that records where and how often it ran, and when it is freed.
    #[pin_data(PinnedDrop)]
    struct Probe {
        runs: Atomic<u32>,
        ran_on: Atomic<*mut bindings::task_struct>,
        stats: Arc<Stats>,
        /// If set, `run()` waits for it first, holding up the worker.
        gate: Option<Arc<Completion>>,
        /// If set, `run()` sleeps that long first.
        sleep: Option<Delta>,
        #[pin]
        work: KthreadWork<Probe>,
    }

    impl_has_kthread_work! {
        impl HasKthreadWork<Self> for Probe { self.work }
    }

    impl KthreadWorkItem for Probe {
        fn run(this: Arc<Probe>) {
            if let Some(gate) = &this.gate {
                gate.wait_for_completion();
            }
            if let Some(sleep) = this.sleep {
                fsleep(sleep);
            }
            this.ran_on.store(Task::current_raw(), Relaxed);
            this.runs.add(1, Relaxed);
            this.stats.runs.add(1, Relaxed);
        }
    }

    #[pinned_drop]
    impl PinnedDrop for Probe {
        fn drop(self: Pin<&mut Self>) {
            self.stats.drops.add(1, Relaxed);
        }
    }

    impl Probe {
        fn with(
            stats: &Arc<Stats>,
            gate: Option<Arc<Completion>>,
            sleep: Option<Delta>,
        ) -> Result<Arc<Self>> {
            Arc::pin_init(
                pin_init!(Probe {
                    runs: Atomic::new(0),
                    ran_on: Atomic::new(ptr::null_mut()),
                    stats: stats.clone(),
                    gate,
                    sleep,
                    work <- KthreadWork::new(),
                }),
                GFP_KERNEL,
            )
        }

        fn new(stats: &Arc<Stats>) -> Result<Arc<Self>> {
            Self::with(stats, None, None)
        }

        fn runs(&self) -> u32 {
            self.runs.load(Relaxed)
        }
    }

    fn new_gate() -> Result<Arc<Completion>> {
        Arc::pin_init(Completion::new(), GFP_KERNEL)
    }

    /// Polls `cond` for up to about ten seconds; returns its last value.
    fn wait_for(cond: impl Fn() -> bool) -> bool {
        for _ in 0..10_000 {
            if cond() {
                return true;
            }
            fsleep(Delta::from_millis(1));
        }
        cond()
    }

    /// The thread of `worker`.
    fn worker_task(worker: &Worker) -> *mut bindings::task_struct {
        // SAFETY: `worker.as_raw()` is a running worker. Its thread only writes `task` when it
        // starts, before it runs any work, and when it stops; callers have seen work run on it.
        unsafe { (*worker.as_raw()).task }
    }

    #[test]
    fn work_runs_on_worker_thread() -> Result {
        let stats = Stats::new()?;
        let worker = Worker::new(c"rust_kthread_t1")?;
        let probe = Probe::new(&stats)?;

        assert!(worker.queue(probe.clone()).is_ok());
        worker.flush();

        assert_eq!(probe.runs(), 1);
        let ran_on = probe.ran_on.load(Relaxed);
        assert!(!ran_on.is_null());
        assert!(ran_on != Task::current_raw());
        assert!(ran_on == worker_task(&worker));
        Ok(())
    }

    #[test]
    fn queue_pending_item_hands_it_back() -> Result {
        let stats = Stats::new()?;
        let worker = Worker::new(c"rust_kthread_t2")?;
        let gate = new_gate()?;
        let blocker = Probe::with(&stats, Some(gate.clone()), None)?;
        let probe = Probe::new(&stats)?;

        assert!(worker.queue(blocker.clone()).is_ok());
        assert!(worker.queue(probe.clone()).is_ok());

        // `probe` waits behind `blocker`, so it is still pending.
        let back = worker.queue(probe.clone());
        assert!(back.as_ref().is_err_and(|p| Arc::ptr_eq(p, &probe)));
        drop(back);

        gate.complete_all();
        worker.flush();
        assert_eq!(blocker.runs(), 1);
        assert_eq!(probe.runs(), 1);

        // Idle again: it can be queued once more.
        assert!(worker.queue(probe.clone()).is_ok());
        worker.flush();
        assert_eq!(probe.runs(), 2);
        Ok(())
    }

    #[test]
    fn flush_waits_for_queued_work() -> Result {
        const ITEMS: usize = 8;
        let stats = Stats::new()?;
        let worker = Worker::new(c"rust_kthread_t3")?;
        let mut probes = KVec::with_capacity(ITEMS, GFP_KERNEL)?;

        for _ in 0..ITEMS {
            let probe = Probe::with(&stats, None, Some(Delta::from_millis(2)))?;
            assert!(worker.queue(probe.clone()).is_ok());
            probes.push(probe, GFP_KERNEL)?;
        }
        worker.flush();

        for probe in &probes {
            assert_eq!(probe.runs(), 1);
        }
        Ok(())
    }

    #[test]
    fn flush_work_waits_for_item() -> Result {
        let stats = Stats::new()?;
        let first = Worker::new(c"rust_kthread_t4a")?;
        let second = Worker::new(c"rust_kthread_t4b")?;
        let probe = Probe::with(&stats, None, Some(Delta::from_millis(5)))?;

        // Never queued: nothing to wait for.
        first.flush_work(&*probe);

        assert!(first.queue(probe.clone()).is_ok());
        first.flush_work(&*probe);
        assert_eq!(probe.runs(), 1);

        // The work item is bound to `first` now.
        assert!(second.queue(probe.clone()).is_err());
        second.flush_work(&*probe);
        assert!(first.queue(probe.clone()).is_ok());
        first.flush_work(&*probe);
        assert_eq!(probe.runs(), 2);
        assert!(probe.ran_on.load(Relaxed) == worker_task(&first));
        Ok(())
    }

    #[test]
    fn items_from_several_queuers_run_once() -> Result {
        const QUEUERS: u32 = 4;
        const PER_QUEUER: usize = 16;
        let stats = Stats::new()?;
        let worker = Arc::new(Worker::new(c"rust_kthread_t5")?, GFP_KERNEL)?;
        // Every queuer also races to queue this one.
        let contended = Probe::new(&stats)?;
        let accepted = Arc::new(Atomic::new(0u32), GFP_KERNEL)?;
        let rejected = Arc::new(Atomic::new(0u32), GFP_KERNEL)?;
        let finished = Arc::new(Atomic::new(0u32), GFP_KERNEL)?;
        let done = new_gate()?;
        let mut all = KVec::new();

        for _ in 0..QUEUERS {
            let mut mine = KVec::with_capacity(PER_QUEUER, GFP_KERNEL)?;
            for _ in 0..PER_QUEUER {
                let probe = Probe::new(&stats)?;
                all.push(probe.clone(), GFP_KERNEL)?;
                mine.push(probe, GFP_KERNEL)?;
            }
            let worker = worker.clone();
            let contended = contended.clone();
            let (accepted, rejected) = (accepted.clone(), rejected.clone());
            let (finished, done) = (finished.clone(), done.clone());
            workqueue::system_unbound().try_spawn(GFP_KERNEL, move || {
                for probe in mine {
                    if worker.queue(probe).is_err() {
                        rejected.add(1, Relaxed);
                    }
                    if worker.queue(contended.clone()).is_ok() {
                        accepted.add(1, Relaxed);
                    }
                }
                // Full ordering: the last queuer's completion must publish every queuer's counts.
                if finished.fetch_add(1, Full) + 1 == QUEUERS {
                    done.complete_all();
                }
            })?;
        }

        done.wait_for_completion();
        worker.flush();

        assert_eq!(rejected.load(Relaxed), 0);
        for probe in &all {
            assert_eq!(probe.runs(), 1);
        }
        let accepted = accepted.load(Relaxed);
        assert!(accepted >= 1);
        assert_eq!(contended.runs(), accepted);
        Ok(())
    }

    /// Queues `probe` on `worker` from a hard interrupt handler.
    #[pin_data]
    struct IrqQueuer {
        #[pin]
        timer: HrTimer<Self>,
        worker: Arc<Worker>,
        probe: Arc<Probe>,
        /// 0 before the timer ran, then 1 if queuing succeeded, 2 if it failed.
        result: Atomic<u32>,
    }

    impl_has_hr_timer! {
        impl HasHrTimer<Self> for IrqQueuer {
            mode: RelativeHardMode<Monotonic>, field: self.timer
        }
    }

    impl HrTimerCallback for IrqQueuer {
        type Pointer<'a> = Arc<Self>;

        fn run(
            this: ArcBorrow<'_, Self>,
            _ctx: HrTimerCallbackContext<'_, Self>,
        ) -> HrTimerRestart {
            // SAFETY: `lockdep_assert_irqs_disabled()` can be called from any context.
            unsafe { bindings::lockdep_assert_irqs_disabled() };

            let result = match this.worker.queue(this.probe.clone()) {
                Ok(()) => 1,
                Err(_) => 2,
            };
            this.result.store(result, Release);
            HrTimerRestart::NoRestart
        }
    }

    #[test]
    fn queue_from_hardirq() -> Result {
        let stats = Stats::new()?;
        let worker = Arc::new(Worker::new(c"rust_kthread_t6")?, GFP_KERNEL)?;
        let probe = Probe::new(&stats)?;
        let (queuer_worker, queuer_probe) = (worker.clone(), probe.clone());
        let queuer = Arc::pin_init(
            pin_init!(IrqQueuer {
                timer <- HrTimer::new(),
                worker: queuer_worker,
                probe: queuer_probe,
                result: Atomic::new(0),
            }),
            GFP_KERNEL,
        )?;

        let handle = queuer.clone().start(Delta::from_micros(100));
        assert!(wait_for(|| queuer.result.load(Acquire) != 0));
        drop(handle);
        assert_eq!(queuer.result.load(Relaxed), 1);

        worker.flush();
        assert_eq!(probe.runs(), 1);
        assert!(probe.ran_on.load(Relaxed) == worker_task(&worker));
        Ok(())
    }

    #[test]
    fn drop_runs_pending_work() -> Result {
        const ITEMS: u32 = 8;
        let stats = Stats::new()?;
        let worker = Worker::new(c"rust_kthread_t7")?;
        let gate = new_gate()?;

        // The worker holds the only reference to each item.
        let blocker = Probe::with(&stats, Some(gate.clone()), None)?;
        assert!(worker.queue(blocker).is_ok());
        for _ in 0..ITEMS {
            let probe = Probe::new(&stats)?;
            assert!(worker.queue(probe).is_ok());
        }
        // All of them wait behind the first one.
        assert_eq!(stats.runs.load(Relaxed), 0);
        assert_eq!(stats.drops.load(Relaxed), 0);

        gate.complete_all();
        drop(worker);

        assert_eq!(stats.runs.load(Relaxed), ITEMS + 1);
        assert_eq!(stats.drops.load(Relaxed), ITEMS + 1);
        Ok(())
    }
}
