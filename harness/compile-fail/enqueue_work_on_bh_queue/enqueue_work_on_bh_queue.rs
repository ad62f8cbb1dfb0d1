// SPDX-License-Identifier: GPL-2.0

//! Must not compile: an `EnqueueWork` fence callback is given a BH workqueue. `system_bh()` runs
//! its work in softirq, so `Retire::run`, which may sleep, and the drop of the last `Arc<Retire>`
//! in it (the driver's payload) would run in atomic context. `EnqueueWork::new` takes only an
//! `Arc<FenceWorkqueue>`, which is always `WQ_MEM_RECLAIM` and never BH. (Before issue 10 it
//! took any `&'static Queue`, and this compiled.)

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
    name: "enqueue_work_on_bh_queue",
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
            FenceCallback::new(EnqueueWork::new(workqueue::system_bh(), item)),
            GFP_KERNEL,
        )?;
        Ok(M)
    }
}
