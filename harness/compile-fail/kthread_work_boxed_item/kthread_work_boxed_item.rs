// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a `QueueKthreadWork` fence callback for a kthread work item held in a box.
//! The callback queues a clone of the item's pointer, and a refused queueing (pending, or bound to
//! another worker) drops that clone in the callback; with a box that clone would be the driver's
//! payload itself. `QueueKthreadWork::new` takes only an `Arc`, whose clone never drops the last
//! reference there.

use kernel::dma_fence::QueueKthreadWork;
use kernel::kthread::{
    impl_has_kthread_work,
    KthreadWork,
    KthreadWorkItem,
    Worker, //
};
use kernel::prelude::*;
use kernel::sync::Arc;

module! {
    type: M,
    name: "kthread_work_boxed_item",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

/// A kthread work item that owns a payload.
#[pin_data]
struct Job {
    #[pin]
    work: KthreadWork<Job>,
    payload: KVec<u8>,
}

impl_has_kthread_work! {
    impl HasKthreadWork<Self> for Job { self.work }
}

impl KthreadWorkItem for Job {
    fn run(_this: Arc<Job>) {}
}

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let worker = Arc::new(Worker::new(c"kthread_work_boxed_item")?, GFP_KERNEL)?;
        let job = KBox::pin_init(
            pin_init!(Job { work <- KthreadWork::new(), payload: KVec::new() }),
            GFP_KERNEL,
        )?;
        let _kind = QueueKthreadWork::new(worker, job);
        Ok(M)
    }
}
