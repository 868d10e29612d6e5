//! RFC 9162 (Certificate Transparency v2) Merkle tree hashing, inclusion and consistency
//! proofs, and their verification.
//!
//! The algorithms never hold the tree: they ask a [`NodeStore`] for the hashes of *perfect*
//! subtrees (node `(level, idx)` covers leaves `[idx·2^level, (idx+1)·2^level)`), which the
//! evidence log keeps in PostgreSQL. Every range RFC 9162's recursion visits is aligned, so a
//! root or a proof needs O(log n) stored nodes whatever the size of the log. Because the control
//! flow never depends on hash values, a first pass with [`Recorder`] lists exactly the nodes a
//! computation needs, so they can be fetched in one query.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two smaller than `n` (n ≥ 2): RFC 9162's split point.
pub fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

pub trait NodeStore {
    /// The hash of the perfect subtree `(level, idx)`; level 0 is a leaf hash.
    fn node(&self, level: u32, idx: u64) -> Hash;
}

/// Records which nodes a computation asks for (and answers zeros).
#[derive(Default)]
pub struct Recorder(RefCell<BTreeSet<(u32, u64)>>);

impl Recorder {
    pub fn into_keys(self) -> BTreeSet<(u32, u64)> {
        self.0.into_inner()
    }
}

impl NodeStore for Recorder {
    fn node(&self, level: u32, idx: u64) -> Hash {
        self.0.borrow_mut().insert((level, idx));
        [0; 32]
    }
}

impl NodeStore for HashMap<(u32, u64), Hash> {
    fn node(&self, level: u32, idx: u64) -> Hash {
        *self.get(&(level, idx)).unwrap_or_else(|| panic!("node ({level}, {idx}) was not loaded"))
    }
}

/// MTH of leaves `[start, end)`.
fn subtree(store: &impl NodeStore, start: u64, end: u64) -> Hash {
    let n = end - start;
    if n.is_power_of_two() && start % n == 0 {
        return store.node(n.trailing_zeros(), start / n);
    }
    let k = split(n);
    node_hash(&subtree(store, start, start + k), &subtree(store, start + k, end))
}

/// The root of the first `size` leaves.
pub fn root(store: &impl NodeStore, size: u64) -> Hash {
    if size == 0 {
        empty_root()
    } else {
        subtree(store, 0, size)
    }
}

/// The audit path of leaf `index` in the tree of `size` leaves (RFC 9162 §2.1.3.1).
pub fn inclusion_proof(store: &impl NodeStore, index: u64, size: u64) -> Vec<Hash> {
    assert!(index < size, "index {index} outside a tree of {size}");
    let mut proof = Vec::new();
    path(store, index, 0, size, &mut proof);
    proof
}

fn path(store: &impl NodeStore, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) {
    let n = end - start;
    if n == 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(store, m, start, start + k, out);
        out.push(subtree(store, start + k, end));
    } else {
        path(store, m - k, start + k, end, out);
        out.push(subtree(store, start, start + k));
    }
}

/// The proof that the tree of `old` leaves is a prefix of the tree of `new` (§2.1.4.1).
pub fn consistency_proof(store: &impl NodeStore, old: u64, new: u64) -> Vec<Hash> {
    assert!(old <= new, "old size {old} beyond new size {new}");
    let mut proof = Vec::new();
    if old > 0 && old < new {
        subproof(store, old, 0, new, true, &mut proof);
    }
    proof
}

fn subproof(store: &impl NodeStore, m: u64, start: u64, end: u64, whole: bool, out: &mut Vec<Hash>) {
    let n = end - start;
    if m == n {
        if !whole {
            out.push(subtree(store, start, end));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(store, m, start, start + k, whole, out);
        out.push(subtree(store, start + k, end));
    } else {
        subproof(store, m - k, start + k, end, false, out);
        out.push(subtree(store, start, start + k));
    }
}

/// RFC 9162 §2.1.3.2.
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode, mut r) = (index, size - 1, *leaf);
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// RFC 9162 §2.1.4.2.
pub fn verify_consistency(old: u64, new: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if old > new {
        return false;
    }
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    if old == 0 {
        return proof.is_empty();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut fnode, mut snode) = (old - 1, new - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    fr == *old_root && sr == *new_root && snode == 0
}

/// Builds the perfect nodes above a run of new leaves. `frontier` is the right edge of the tree
/// before them (the perfect subtrees of the binary decomposition of `first`, largest first);
/// returns every completed node of level ≥ 1 as `(level, idx, hash)`.
pub fn extend(frontier: Vec<(u32, u64, Hash)>, first: u64, leaves: &[Hash]) -> Vec<(u32, u64, Hash)> {
    let mut stack = frontier;
    let mut created = Vec::with_capacity(leaves.len());
    for (i, leaf) in leaves.iter().enumerate() {
        stack.push((0, first + i as u64, *leaf));
        while stack.len() >= 2 && stack[stack.len() - 1].0 == stack[stack.len() - 2].0 {
            let (level, _, right) = stack.pop().expect("two on the stack");
            let (_, left_idx, left) = stack.pop().expect("two on the stack");
            let parent = (level + 1, left_idx / 2, node_hash(&left, &right));
            created.push(parent);
            stack.push(parent);
        }
    }
    created
}

/// The perfect subtrees whose concatenation is a tree of `size` leaves, largest first.
pub fn frontier_keys(size: u64) -> Vec<(u32, u64)> {
    let mut keys = Vec::new();
    let mut start = 0u64;
    for level in (0..64).rev() {
        if size & (1 << level) != 0 {
            keys.push((level as u32, start >> level));
            start += 1 << level;
        }
    }
    keys
}

/// An in-memory tree over leaf hashes (tests and offline tools).
pub struct MemoryTree {
    nodes: HashMap<(u32, u64), Hash>,
    size: u64,
}

impl MemoryTree {
    pub fn new(leaves: &[Hash]) -> MemoryTree {
        let mut nodes: HashMap<(u32, u64), Hash> =
            leaves.iter().enumerate().map(|(i, h)| ((0, i as u64), *h)).collect();
        for (level, idx, h) in extend(Vec::new(), 0, leaves) {
            nodes.insert((level, idx), h);
        }
        MemoryTree { nodes, size: leaves.len() as u64 }
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl NodeStore for MemoryTree {
    fn node(&self, level: u32, idx: u64) -> Hash {
        self.nodes.node(level, idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The RFC 6962 reference leaves that Certificate Transparency implementations test against.
    fn reference_tree() -> MemoryTree {
        let leaves: Vec<Hash> =
            ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
                .iter()
                .map(|l| leaf_hash(&hex::decode(l).unwrap()))
                .collect();
        MemoryTree::new(&leaves)
    }

    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn roots_match_the_reference_for_every_size() {
        let t = reference_tree();
        for (size, want) in ROOTS.iter().enumerate() {
            assert_eq!(hex::encode(root(&t, size as u64)), *want, "size {size}");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference() {
        let t = reference_tree();
        let cases: [(u64, u64, &[&str]); 4] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (2, 3, &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (index, size, want) in cases {
            let proof = inclusion_proof(&t, index, size);
            assert_eq!(proof.iter().map(hex::encode).collect::<Vec<_>>(), want, "({index}, {size})");
            let leaf = t.node(0, index);
            assert!(verify_inclusion(index, size, &leaf, &proof, &h(ROOTS[size as usize])));
        }
    }

    #[test]
    fn consistency_proofs_match_the_reference() {
        let t = reference_tree();
        let cases: [(u64, u64, &[&str]); 4] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (old, new, want) in cases {
            let proof = consistency_proof(&t, old, new);
            assert_eq!(proof.iter().map(hex::encode).collect::<Vec<_>>(), want, "({old}, {new})");
            assert!(verify_consistency(old, new, &h(ROOTS[old as usize]), &h(ROOTS[new as usize]), &proof));
        }
    }

    #[test]
    fn every_proof_of_every_shape_verifies_and_tampering_fails() {
        let leaves: Vec<Hash> = (0..37u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let full = MemoryTree::new(&leaves);
        for n in 1..=leaves.len() as u64 {
            let r = root(&full, n);
            assert_eq!(r, root(&MemoryTree::new(&leaves[..n as usize]), n), "incremental and fresh roots agree");
            for i in 0..n {
                let proof = inclusion_proof(&full, i, n);
                assert!(verify_inclusion(i, n, &leaves[i as usize], &proof, &r));
                if n > 1 {
                    assert!(!verify_inclusion((i + 1) % n, n, &leaves[i as usize], &proof, &r), "wrong index");
                    let mut bad = proof.clone();
                    bad[0][0] ^= 1;
                    assert!(!verify_inclusion(i, n, &leaves[i as usize], &bad, &r), "tampered path");
                }
            }
            for m in 1..=n {
                let proof = consistency_proof(&full, m, n);
                assert!(verify_consistency(m, n, &root(&full, m), &r, &proof), "({m}, {n})");
                if m < n {
                    let mut bad = proof.clone();
                    let last = bad.len() - 1;
                    bad[last][31] ^= 1;
                    assert!(!verify_consistency(m, n, &root(&full, m), &r, &bad));
                }
            }
        }
    }

    #[test]
    fn a_rewritten_log_is_not_consistent_with_its_old_checkpoint() {
        let leaves: Vec<Hash> = (0..20u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let old_root = root(&MemoryTree::new(&leaves[..13]), 13);
        let mut rewritten = leaves.clone();
        rewritten[4] = leaf_hash(b"back-dated");
        let new_tree = MemoryTree::new(&rewritten);
        let proof = consistency_proof(&new_tree, 13, 20);
        assert!(!verify_consistency(13, 20, &old_root, &root(&new_tree, 20), &proof));
    }

    #[test]
    fn the_recorder_lists_only_logarithmically_many_nodes() {
        let rec = Recorder::default();
        inclusion_proof(&rec, 123_456, 1_000_000);
        let keys = rec.into_keys();
        assert!(keys.len() <= 2 * 20 * 20, "{} nodes", keys.len());
        let rec = Recorder::default();
        root(&rec, 1_000_000);
        assert_eq!(rec.into_keys().len(), frontier_keys(1_000_000).len());
    }

    #[test]
    fn split_is_the_largest_power_of_two_below() {
        for (n, k) in [(2, 1), (3, 2), (4, 2), (5, 4), (8, 4), (9, 8), (1000, 512)] {
            assert_eq!(split(n), k);
        }
    }
}
