//! The live load the core keeps and a policy reads in `choose`.

/// Tunnels per gateway now, indexed by gateway id (ids count up from 1 and
/// are never reused, so a flat vector is both the cheapest lookup and what
/// a wasm policy's store copies before a call).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    by_id: Vec<u64>,
}

impl Load {
    /// Tunnels on gateway `id`; 0 for an id never counted.
    pub fn tunnels(&self, id: u32) -> u64 {
        self.by_id.get(id as usize).copied().unwrap_or(0)
    }

    /// One more (`delta` 1) or one fewer (-1) tunnel on `id`.
    pub fn add(&mut self, id: u32, delta: i64) {
        let i = id as usize;
        if self.by_id.len() <= i {
            self.by_id.resize(i + 1, 0);
        }
        self.by_id[i] = self.by_id[i].saturating_add_signed(delta);
    }

    /// Become a copy of `other`, keeping this one's allocation (a wasm
    /// policy's store takes the live load this way before each call).
    pub fn copy_from(&mut self, other: &Load) {
        self.by_id.clone_from(&other.by_id);
    }
}

impl segwlb_policy_sdk::Load for Load {
    fn tunnels(&self, id: u32) -> u64 {
        Load::tunnels(self, id)
    }
}
