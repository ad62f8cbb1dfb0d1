// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a module outside the kernel crate implements a fence callback.

use kernel::dma_fence::CallbackKind;
use kernel::prelude::*;

module! {
    type: M,
    name: "implement_callback_kind",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        Ok(M)
    }
}

/// A driver trying to run its own code in the fence signalling path.
struct DropsInAtomic(KVec<u8>);

// The method cannot be written either: its last parameter is a type the kernel crate does not
// export.
impl CallbackKind for DropsInAtomic {}
