//! Citizens' identity: a JWT from the national identity provider, signed with Ed25519
//! (`alg: EdDSA`), verified against the provider's public key; `sub` is the PINFL.
//!
//! For development a local key pair stands in for the provider: generated on first run
//! (never committed), used by `dalil admin citizen-token` to mint tokens.

use std::path::Path;

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::config::IdentitySettings;
use crate::domain::Pinfl;

/// Clock skew tolerated between the provider and us.
const LEEWAY_SECS: i64 = 30;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: serde_json::Value,
    pub exp: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub iat: Option<i64>,
}

#[derive(Clone)]
pub struct Verifier {
    key: VerifyingKey,
    issuer: String,
    audience: String,
}

impl Verifier {
    pub fn load(settings: &IdentitySettings) -> anyhow::Result<Verifier> {
        if settings.dev_keys {
            ensure_dev_keys(settings)?;
        }
        let pem = std::fs::read_to_string(&settings.public_key_file).with_context(|| {
            format!("reading the identity provider's public key {}", settings.public_key_file.display())
        })?;
        let key =
            VerifyingKey::from_public_key_pem(&pem).context("the identity key is not an Ed25519 public key PEM")?;
        Ok(Verifier { key, issuer: settings.issuer.clone(), audience: settings.audience.clone() })
    }

    /// The PINFL of a valid token; a reason otherwise (never the token itself).
    pub fn verify(&self, token: &str, now: i64) -> Result<Pinfl, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err("not a JWT".into());
        };
        let header: Header = decode_part(h).ok_or("malformed token header")?;
        if header.alg != "EdDSA" {
            return Err("token algorithm must be EdDSA".into());
        }
        let sig_bytes = B64URL.decode(s).map_err(|_| "malformed token signature")?;
        let signature = Signature::from_slice(&sig_bytes).map_err(|_| "malformed token signature")?;
        self.key
            .verify_strict(format!("{h}.{p}").as_bytes(), &signature)
            .map_err(|_| "token signature does not verify")?;
        let claims: Claims = decode_part(p).ok_or("malformed token claims")?;
        if claims.iss != self.issuer {
            return Err("token issuer is not trusted".into());
        }
        let aud_ok = match &claims.aud {
            serde_json::Value::String(a) => *a == self.audience,
            serde_json::Value::Array(list) => list.iter().any(|a| a.as_str() == Some(self.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err("token is not for this audience".into());
        }
        if claims.exp + LEEWAY_SECS < now {
            return Err("token expired".into());
        }
        if claims.nbf.is_some_and(|nbf| nbf - LEEWAY_SECS > now) {
            return Err("token not yet valid".into());
        }
        Pinfl::parse(&claims.sub).map_err(|_| "token subject is not a PINFL".into())
    }
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Option<T> {
    serde_json::from_slice(&B64URL.decode(part).ok()?).ok()
}

/// Creates the development key pair when it is missing. Processes that start together (as
/// `dalil bench` starts serve, relay, scheduler and workers) agree on one pair: the private key
/// is published with a hard link, which only one process can win, and the public key with a
/// rename after it, so nobody reads a half-written file or a key of another pair.
pub fn ensure_dev_keys(settings: &IdentitySettings) -> anyhow::Result<()> {
    if !settings.dev_private_key_file.exists() {
        let signing = SigningKey::generate(&mut rand::rngs::OsRng);
        let public = signing.verifying_key().to_public_key_pem(Default::default()).context("encoding public key")?;
        let suffix = format!(".{}.{}.tmp", std::process::id(), uuid::Uuid::new_v4().simple());
        let private_tmp = with_suffix(&settings.dev_private_key_file, &suffix);
        let public_tmp = with_suffix(&settings.public_key_file, &suffix);
        write_private(&private_tmp, &signing)?;
        if let Some(dir) = settings.public_key_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&public_tmp, public)?;
        let won = match std::fs::hard_link(&private_tmp, &settings.dev_private_key_file) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e).context("publishing the development private key"),
        };
        let _ = std::fs::remove_file(&private_tmp);
        if won {
            std::fs::rename(&public_tmp, &settings.public_key_file)?;
            tracing::info!(path = %settings.dev_private_key_file.display(), "generated the development identity key pair");
            return Ok(());
        }
        let _ = std::fs::remove_file(&public_tmp);
    }
    // Another process made the pair: its public key follows its private key at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !settings.public_key_file.exists() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the development private key {} exists but its public key {} does not",
            settings.dev_private_key_file.display(),
            settings.public_key_file.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

fn write_private(path: &Path, key: &SigningKey) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let pem = key.to_pkcs8_pem(Default::default()).context("encoding private key")?;
    std::fs::write(path, pem.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// Mints a token with the development key (what `dalil admin citizen-token` prints).
pub fn mint_dev_token(settings: &IdentitySettings, pinfl: &Pinfl, ttl_secs: i64) -> anyhow::Result<String> {
    anyhow::ensure!(settings.dev_keys, "identity.dev_keys is off: tokens come from the identity provider");
    ensure_dev_keys(settings)?;
    let pem = std::fs::read_to_string(&settings.dev_private_key_file)?;
    let key = SigningKey::from_pkcs8_pem(&pem).context("the development key is not an Ed25519 PKCS#8 PEM")?;
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: pinfl.to_string(),
        iss: settings.issuer.clone(),
        aud: serde_json::Value::String(settings.audience.clone()),
        exp: now + ttl_secs,
        nbf: None,
        iat: Some(now),
    };
    Ok(sign(&key, &claims))
}

pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let header = Header { alg: "EdDSA".into(), typ: Some("JWT".into()) };
    let h = B64URL.encode(serde_json::to_vec(&header).expect("header"));
    let p = B64URL.encode(serde_json::to_vec(claims).expect("claims"));
    let sig = key.sign(format!("{h}.{p}").as_bytes());
    format!("{h}.{p}.{}", B64URL.encode(sig.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SigningKey, Verifier) {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let v = Verifier { key: key.verifying_key(), issuer: "idp".into(), audience: "dalil".into() };
        (key, v)
    }

    #[test]
    fn processes_that_start_together_agree_on_one_development_key_pair() {
        let dir = std::env::temp_dir().join(format!("dalil-devkeys-{}", uuid::Uuid::new_v4().simple()));
        let settings = IdentitySettings {
            public_key_file: dir.join("idp.pub.pem"),
            issuer: "idp".into(),
            audience: "dalil".into(),
            dev_keys: true,
            dev_private_key_file: dir.join("idp.key.pem"),
        };
        // Threads stand in for processes: each loads as `Verifier::load` does at start-up.
        let keys: Vec<VerifyingKey> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| Verifier::load(&settings).unwrap().key)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let private = std::fs::read_to_string(&settings.dev_private_key_file).unwrap();
        let signing = SigningKey::from_pkcs8_pem(&private).unwrap();
        assert!(keys.iter().all(|k| *k == signing.verifying_key()), "every start-up read the one pair");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn claims(sub: &str, exp: i64) -> Claims {
        Claims { sub: sub.into(), iss: "idp".into(), aud: "dalil".into(), exp, nbf: None, iat: None }
    }

    #[test]
    fn a_valid_token_yields_its_pinfl() {
        let (key, v) = setup();
        let pinfl = Pinfl::with_check_digit("3120588010012");
        let token = sign(&key, &claims(pinfl.as_str(), 2_000));
        assert_eq!(v.verify(&token, 1_000).unwrap(), pinfl);
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let (key, v) = setup();
        let pinfl = Pinfl::with_check_digit("3120588010012");
        assert_eq!(v.verify(&sign(&key, &claims(pinfl.as_str(), 100)), 1_000).unwrap_err(), "token expired");
        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert!(v.verify(&sign(&other, &claims(pinfl.as_str(), 2_000)), 1_000).is_err());
        let mut c = claims(pinfl.as_str(), 2_000);
        c.aud = "someone-else".into();
        assert!(v.verify(&sign(&key, &c), 1_000).is_err());
        assert!(v.verify("a.b", 1_000).is_err());
    }
}
