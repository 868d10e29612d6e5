//! Checkpoints in the C2SP *signed note* format, signed with Ed25519:
//!
//! ```text
//! <origin>
//! <tree size>
//! <base64 root hash>
//!
//! — <key name> <base64(key id ‖ signature)>
//! ```
//!
//! The key id is the first 4 bytes of SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key); the signature
//! covers the text above the blank line, final newline included. A verifier key is written
//! `<name>+<hex key id>+<base64(0x01 ‖ public key)>`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

const ED25519: u8 = 0x01;

pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ED25519]);
    h.update(key.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// A public key that verifies notes, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    pub name: String,
    pub id: [u8; 4],
    pub key: VerifyingKey,
}

impl VerifierKey {
    pub fn new(name: &str, key: VerifyingKey) -> VerifierKey {
        VerifierKey { name: name.to_string(), id: key_id(name, &key), key }
    }

    /// `name+hexid+base64(0x01 ‖ key)`.
    pub fn encode(&self) -> String {
        let mut raw = vec![ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{}+{}", self.name, hex::encode(self.id), B64.encode(raw))
    }

    pub fn parse(text: &str) -> Result<VerifierKey, String> {
        let text = text.trim();
        // Names never contain '+'; base64 may.
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("a verifier key is name+keyid+base64key".into());
        };
        let raw = B64.decode(key).map_err(|_| "the verifier key is not base64")?;
        if raw.len() != 33 || raw[0] != ED25519 {
            return Err("the verifier key is not an Ed25519 key".into());
        }
        let key =
            VerifyingKey::from_bytes(raw[1..].try_into().expect("32 bytes")).map_err(|_| "not a valid Ed25519 key")?;
        let vk = VerifierKey::new(name, key);
        if hex::encode(vk.id) != id {
            return Err("the verifier key's id does not match its name and key".into());
        }
        Ok(vk)
    }
}

/// Signs a checkpoint; returns the whole note.
pub fn sign_checkpoint(origin: &str, size: u64, root: &Hash, name: &str, key: &SigningKey) -> String {
    let body = format!("{origin}\n{size}\n{}\n", B64.encode(root));
    let signature = key.sign(body.as_bytes());
    let mut blob = key_id(name, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&signature.to_bytes());
    format!("{body}\n— {name} {}\n", B64.encode(blob))
}

/// A checkpoint whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// The key that signed it.
    pub key_name: String,
    pub key_id: [u8; 4],
}

/// Parses a note and checks it is signed by one of `keys`. Signature lines by unknown keys are
/// ignored, as the format wants; at least one known, valid signature is required.
pub fn verify_checkpoint(note: &str, keys: &[VerifierKey]) -> Result<Checkpoint, String> {
    let (body, sigs) = note.split_once("\n\n").ok_or("the checkpoint has no signature block")?;
    let body = format!("{body}\n");
    let mut lines = body.lines();
    let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next()) else {
        return Err("the checkpoint needs origin, size and root lines".into());
    };
    let size: u64 = size.parse().map_err(|_| "the checkpoint size is not a number")?;
    let root: Hash = B64
        .decode(root)
        .ok()
        .and_then(|r| r.try_into().ok())
        .ok_or("the checkpoint root is not a base64 SHA-256 hash")?;
    let mut known_but_bad = false;
    for line in sigs.lines().filter(|l| !l.is_empty()) {
        let rest = line.strip_prefix("— ").ok_or("a signature line must start with an em dash")?;
        let (name, blob) = rest.split_once(' ').ok_or("a signature line is name and signature")?;
        let blob = B64.decode(blob).map_err(|_| "a signature is not base64")?;
        if blob.len() != 68 {
            continue; // not an Ed25519 signature: not ours to judge
        }
        let id: [u8; 4] = blob[..4].try_into().expect("4 bytes");
        let Some(key) = keys.iter().find(|k| k.name == name && k.id == id) else { continue };
        let sig = Signature::from_slice(&blob[4..]).map_err(|_| "malformed signature")?;
        if key.key.verify_strict(body.as_bytes(), &sig).is_ok() {
            return Ok(Checkpoint { origin: origin.into(), size, root, key_name: name.into(), key_id: id });
        }
        known_but_bad = true;
    }
    Err(if known_but_bad {
        "the checkpoint's signature does not verify: it was altered or forged".into()
    } else {
        "the checkpoint is not signed by any trusted key".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let vk = VerifierKey::new("dalil.example/log", key.verifying_key());
        let root = [7u8; 32];
        let note = sign_checkpoint("dalil.example/log", 42, &root, "dalil.example/log", &key);
        assert!(note.starts_with("dalil.example/log\n42\n"));
        let cp = verify_checkpoint(&note, std::slice::from_ref(&vk)).unwrap();
        assert_eq!((cp.size, cp.root), (42, root));
        assert!(verify_checkpoint(&note.replace("\n42\n", "\n43\n"), std::slice::from_ref(&vk)).is_err());
        let other = VerifierKey::new("dalil.example/log", SigningKey::from_bytes(&[4u8; 32]).verifying_key());
        assert_eq!(verify_checkpoint(&note, &[other]).unwrap_err(), "the checkpoint is not signed by any trusted key");
    }

    #[test]
    fn verifier_keys_round_trip() {
        for seed in 0..64u8 {
            // Some of these keys have '+' in their base64.
            let vk = VerifierKey::new("dalil.example/log", SigningKey::from_bytes(&[seed; 32]).verifying_key());
            assert_eq!(VerifierKey::parse(&vk.encode()).unwrap(), vk);
        }
        let vk = VerifierKey::new("dalil.example/log", SigningKey::from_bytes(&[9u8; 32]).verifying_key());
        let mut bad = vk.encode();
        bad.replace_range(bad.len() - 3..bad.len() - 2, "A");
        assert!(VerifierKey::parse(&bad).is_err());
    }
}
