// SPDX-License-Identifier: GPL-2.0

//! Leaks a callback armed on a pending fence that holds nothing of this module: unloading the
//! module must be refused.
//!
//! The fence's names are allocated on the heap and leaked, so only the callback ties the fence to
//! this module: its function, `FenceCallback::<WakeTask>::callback`, is instantiated here, and a
//! late signal after an unload would call into freed module text. `fence_leak` proves the same for
//! fences whose names are in the module. The post-test init of `harness/run test` loads the module
//! and tries to unload it (case `module_unload_callback_barrier`). The leaked objects stay
//! referenced from the statics below, so kmemleak finds nothing while the module is loaded; they
//! are `#[used]`, or the compiler would drop them (nothing reads them).

use core::{
    ptr,
    sync::atomic::{
        AtomicPtr,
        Ordering, //
    }, //
};
use kernel::dma_fence::{
    Armed,
    FenceCallback,
    FenceContext,
    UniqueFence,
    WakeTask, //
};
use kernel::prelude::*;

module! {
    type: CallbackLeak,
    name: "callback_leak",
    authors: ["Rust DRM job queue authors"],
    description: "harness: an armed callback leaked on a fence whose names are not in the module",
    license: "GPL",
}

/// The pending fence, leaked with `KBox::leak`.
#[used]
static FENCE: AtomicPtr<UniqueFence> = AtomicPtr::new(ptr::null_mut());
/// The callback armed on `FENCE`, given to `core::mem::forget`.
#[used]
static CALLBACK: AtomicPtr<FenceCallback<WakeTask>> = AtomicPtr::new(ptr::null_mut());

struct CallbackLeak;

/// Returns a copy of the NUL-terminated `name` on the heap that is never freed.
fn heap_name<const N: usize>(name: &[u8; N]) -> Result<&'static CStr> {
    let copy: &'static [u8; N] = KBox::leak(KBox::new(*name, GFP_KERNEL)?);
    CStr::from_bytes_with_nul(copy).map_err(|_| EINVAL)
}

impl kernel::Module for CallbackLeak {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let ctx = FenceContext::new(heap_name(b"callback_leak\0")?, heap_name(b"heap\0")?);
        let fence = KBox::leak(KBox::new(ctx.new_fence(GFP_KERNEL)?, GFP_KERNEL)?);
        FENCE.store(ptr::from_mut(fence), Ordering::Relaxed);

        let mut callback = KBox::pin_init(FenceCallback::new(WakeTask::current()), GFP_KERNEL)?;
        if callback.as_mut().arm(fence.to_aref()) != Armed::Waiting {
            return Err(EINVAL);
        }
        CALLBACK.store(ptr::from_ref(&*callback).cast_mut(), Ordering::Relaxed);
        core::mem::forget(callback);

        pr_info!("one fence with heap names left unsignalled, one callback left armed\n");
        Ok(CallbackLeak)
    }
}
