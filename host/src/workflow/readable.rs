//! Which steps one step's templates may read ([`Readable`]): made by the
//! plan (`Plan::readable_by`), consulted by the template `Scope`. A module of
//! its own, below both, so that the plan and the templates use it and not
//! each other.

use std::collections::HashMap;
use std::sync::Arc;

/// The steps one step may read, from `Plan::readable_by`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Readable {
    index: Arc<HashMap<String, usize>>,
    bits: Arc<[u64]>,
}

impl Readable {
    /// Step `i` of `index` is readable when bit `i` of `bits` is set.
    pub(crate) fn new(index: Arc<HashMap<String, usize>>, bits: Arc<[u64]>) -> Readable {
        Readable { index, bits }
    }

    /// Whether `id` is a step of the plan that this step may read.
    pub fn allows(&self, id: &str) -> bool {
        self.index
            .get(id)
            .is_some_and(|&i| self.bits[i / 64] & (1 << (i % 64)) != 0)
    }

    /// Whether `id` is a step of the plan that this step may not read.
    pub fn forbids(&self, id: &str) -> bool {
        self.index.contains_key(id) && !self.allows(id)
    }
}
