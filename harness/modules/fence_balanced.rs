// SPDX-License-Identifier: GPL-2.0

//! Creates, signals and drops fences and callbacks at init, leaving nothing behind: unloading the
//! module must succeed. The counterpart of `fence_leak`, which must not unload; both are loaded and
//! unloaded by the post-test init of `harness/run test` (case `module_unload_balanced`).

use kernel::dma_fence::{
    Armed,
    CompleteCompletion,
    FenceCallback,
    FenceContext,
    WakeTask, //
};
use kernel::prelude::*;
use kernel::sync::{
    Arc,
    Completion, //
};

module! {
    type: FenceBalanced,
    name: "fence_balanced",
    authors: ["Rust DRM job queue authors"],
    description: "harness: every fence signalled, every callback ran or disarmed",
    license: "GPL",
}

struct FenceBalanced;

impl kernel::Module for FenceBalanced {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        // The names live in this module's .rodata.
        let ctx = FenceContext::new(c"fence_balanced", c"balanced");
        let fence = ctx.new_fence(GFP_KERNEL)?;
        let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
        let mut complete = KBox::pin_init(
            FenceCallback::new(CompleteCompletion::new(done.clone())),
            GFP_KERNEL,
        )?;
        let mut wake = KBox::pin_init(FenceCallback::new(WakeTask::current()), GFP_KERNEL)?;
        if complete.as_mut().arm(fence.to_aref()) != Armed::Waiting
            || wake.as_mut().arm(fence.to_aref()) != Armed::Waiting
        {
            return Err(EINVAL);
        }
        // One callback is disarmed before the fence signals, the other one runs.
        if !wake.as_mut().disarm() {
            return Err(EINVAL);
        }
        fence.signal(Ok(()));
        done.wait_for_completion();
        pr_info!("fence signalled, one callback ran, one disarmed\n");
        Ok(FenceBalanced)
    }
}
