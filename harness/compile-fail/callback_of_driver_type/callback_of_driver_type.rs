// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a driver type is given to `FenceCallback::new` as the callback's kind.
//! `FenceCallback::new` requires `CallbackKind`, which only the kernel crate's audited kinds
//! implement, so a payload of the driver's (here a vector, whose drop frees memory) can never be
//! what a fence callback owns and acts on.

use kernel::dma_fence::FenceCallback;
use kernel::prelude::*;

module! {
    type: M,
    name: "callback_of_driver_type",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

/// A driver type with a payload that must not be dropped in atomic context.
struct MyDriverType(KVec<u8>);

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let _cb = KBox::pin_init(FenceCallback::new(MyDriverType(KVec::new())), GFP_KERNEL)?;
        Ok(M)
    }
}
