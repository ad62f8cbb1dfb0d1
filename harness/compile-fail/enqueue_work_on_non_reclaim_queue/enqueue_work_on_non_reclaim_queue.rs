// SPDX-License-Identifier: GPL-2.0

//! Must not compile: an `EnqueueWork` fence callback is given a workqueue without
//! `WQ_MEM_RECLAIM`. `system_dfl()` has no rescuer thread: under memory pressure the work that
//! signals fences may wait for a new worker, whose creation may wait for reclaim, which may wait
//! for those fences. `EnqueueWork::new` takes only an `Arc<FenceWorkqueue>`, which is always
//! `WQ_MEM_RECLAIM` and never BH. (Before issue 10 it took any `&'static Queue`, and this
//! compiled.)

use kernel::dma_fence::{
    EnqueueWork,
    FenceCallback, //
};
use kernel::prelude::*;
use kernel::sync::Arc;
use kernel::workqueue::{
    self,
    impl_has_work,
    new_work,
    Work,
    WorkItem, //
};

module! {
    type: M,
    name: "enqueue_work_on_non_reclaim_queue",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

#[pin_data]
struct Retire {
    #[pin]
    work: Work<Retire>,
}

impl_has_work! {
    impl HasWork<Self> for Retire { self.work }
}

impl WorkItem for Retire {
    type Pointer = Arc<Retire>;

    fn run(_this: Arc<Retire>) {}
}

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let item = Arc::pin_init(
            pin_init!(Retire { work <- new_work!("Retire::work") }),
            GFP_KERNEL,
        )?;
        let _cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(workqueue::system_dfl(), item)),
            GFP_KERNEL,
        )?;
        Ok(M)
    }
}
