// SPDX-License-Identifier: GPL-2.0

//! Leaks unsignalled fences and an armed callback at init: unloading the module must be refused.
//!
//! The fences' names are in this module's .rodata and the callback's function is code of this
//! module (`FenceCallback::<CompleteCompletion>::callback` is instantiated here), so after an
//! unload a read of the names (a sync_file's info ioctl, a trace point) or a late signal would
//! touch freed memory. The post-test init of `harness/run test` loads the module and tries to
//! unload it (case `module_unload_barrier`). The leaked objects stay referenced from the statics
//! below, so kmemleak finds nothing while the module is loaded. The statics are `#[used]`: nothing
//! reads them, and without it the compiler drops them with their stores (kmemleak then reported
//! the forgotten fence whenever no stale stack slot happened to point to it).

use core::{
    ptr,
    sync::atomic::{
        AtomicPtr,
        Ordering, //
    }, //
};
use kernel::dma_fence::{
    Armed,
    CompleteCompletion,
    DmaFence,
    FenceCallback,
    FenceContext,
    UniqueFence, //
};
use kernel::prelude::*;
use kernel::sync::{
    Arc,
    Completion, //
};

module! {
    type: FenceLeak,
    name: "fence_leak",
    authors: ["Rust DRM job queue authors"],
    description: "harness: unsignalled fences and an armed callback leaked",
    license: "GPL",
}

/// The fence given to `core::mem::forget`.
#[used]
static FORGOTTEN: AtomicPtr<DmaFence> = AtomicPtr::new(ptr::null_mut());
/// The fence leaked with `KBox::leak`.
#[used]
static LEAKED: AtomicPtr<UniqueFence> = AtomicPtr::new(ptr::null_mut());
/// The callback armed on `LEAKED`, given to `core::mem::forget`.
#[used]
static CALLBACK: AtomicPtr<FenceCallback<CompleteCompletion>> = AtomicPtr::new(ptr::null_mut());

struct FenceLeak;

impl kernel::Module for FenceLeak {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let ctx = FenceContext::new(c"fence_leak", c"leaked");

        let forgotten = ctx.new_fence(GFP_KERNEL)?;
        FORGOTTEN.store(
            ptr::from_ref::<DmaFence>(&forgotten).cast_mut(),
            Ordering::Relaxed,
        );
        core::mem::forget(forgotten);

        let leaked = KBox::leak(KBox::new(ctx.new_fence(GFP_KERNEL)?, GFP_KERNEL)?);
        LEAKED.store(ptr::from_mut(leaked), Ordering::Relaxed);

        let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
        let mut callback = KBox::pin_init(
            FenceCallback::new(CompleteCompletion::new(done)),
            GFP_KERNEL,
        )?;
        if callback.as_mut().arm(leaked.to_aref()) != Armed::Waiting {
            return Err(EINVAL);
        }
        CALLBACK.store(ptr::from_ref(&*callback).cast_mut(), Ordering::Relaxed);
        core::mem::forget(callback);

        pr_info!("two fences left unsignalled, one callback left armed\n");
        Ok(FenceLeak)
    }
}
