// SPDX-License-Identifier: GPL-2.0

//! Must not compile: an `EnqueueWork` fence callback for a work item whose pointer type is a
//! `KBox`. The callback keeps the item and enqueues a clone of its pointer; a box cannot be
//! cloned, and a refused enqueue (the item already pending) would hand the box back inside the
//! callback, which would drop the driver's payload in atomic context. `EnqueueWork` requires
//! `WorkItem<Pointer = Arc<T>>`: a refused clone of an `Arc` only decrements a count that the
//! callback's own reference keeps above zero.

use kernel::dma_fence::{
    EnqueueWork,
    FenceWorkqueue, //
};
use kernel::prelude::*;
use kernel::sync::Arc;
use kernel::workqueue::{
    impl_has_work,
    Work,
    WorkItem, //
};

module! {
    type: M,
    name: "enqueue_boxed_work_item",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

/// A work item that owns a payload and is queued as a box.
#[pin_data]
struct Boxed {
    #[pin]
    work: Work<Boxed>,
    payload: KVec<u8>,
}

impl_has_work! {
    impl HasWork<Self> for Boxed { self.work }
}

impl WorkItem for Boxed {
    type Pointer = Pin<KBox<Boxed>>;

    fn run(_this: Pin<KBox<Boxed>>) {}
}

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        Ok(M)
    }
}

/// The item is even given as an `Arc`: the bound on its `WorkItem::Pointer` refuses it.
fn enqueue_boxed(queue: Arc<FenceWorkqueue>, item: Arc<Boxed>) -> EnqueueWork<Boxed> {
    EnqueueWork::new(queue, item)
}
