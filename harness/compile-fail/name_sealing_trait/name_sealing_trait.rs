// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a module names the trait that seals the fence callback kinds, to make its own
//! type a kind. `Sealed` lives in the private module `kernel::dma_fence::private`, so no path to it
//! exists outside the kernel crate; without it `CallbackKind` cannot be implemented either (see
//! `implement_callback_kind`), and driver code never runs in a fence's signalling path.

use kernel::prelude::*;

module! {
    type: M,
    name: "name_sealing_trait",
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

/// A driver type that would run its own code, and drop its own data, in a fence callback.
struct DropsInAtomic(KVec<u8>);

impl kernel::dma_fence::private::Sealed for DropsInAtomic {}
