//! The keys JWTs are verified with: read from files (an HS256 secret, RSA and
//! EC public keys in PEM, a JWKS document), checked when read, and reloaded
//! when a file's content changes.
//!
//! Invariant: the [`KeyStore`] only ever holds a key set that loaded
//! completely. A file that is missing, half written or wrong leaves the
//! previous set in place; the failure is logged (with the file and the
//! reason, never key material) and counted once per distinct failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, OutcomeLabel};

/// HS256 secrets shorter than the hash (RFC 7518 §3.2) are refused.
pub const MIN_SECRET_BYTES: usize = 32;

/// The files keys are read from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFiles {
    pub hs256_secret: Option<PathBuf>,
    pub rsa_public_keys: Vec<PathBuf>,
    pub ec_public_keys: Vec<PathBuf>,
    pub jwks: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Hs256Secret,
    RsaPem,
    EcPem,
    Jwks,
}

impl KeyFiles {
    fn all(&self) -> Vec<(FileKind, &Path)> {
        let mut files = Vec::new();
        files.extend(
            self.hs256_secret
                .as_deref()
                .map(|p| (FileKind::Hs256Secret, p)),
        );
        files.extend(
            self.rsa_public_keys
                .iter()
                .map(|p| (FileKind::RsaPem, p.as_path())),
        );
        files.extend(
            self.ec_public_keys
                .iter()
                .map(|p| (FileKind::EcPem, p.as_path())),
        );
        files.extend(self.jwks.as_deref().map(|p| (FileKind::Jwks, p)));
        files
    }

    pub fn is_empty(&self) -> bool {
        self.all().is_empty()
    }
}

/// Why keys could not be loaded. Messages name the file, never key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("no usable key in the configured files")]
    NoKeys,
}

/// One key a token may be verified with.
#[derive(Clone)]
pub struct VerifyKey {
    /// The JWK's `kid`; keys from PEM files have none and match any `kid`.
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Every key loaded from the files at one time.
#[derive(Debug, Default)]
pub struct KeySet {
    pub keys: Vec<VerifyKey>,
}

impl KeySet {
    /// The keys that may verify a token with this `alg` and `kid`.
    pub fn candidates<'a>(
        &'a self,
        alg: Algorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys.iter().filter(move |k| {
            k.alg == alg
                && match (&k.kid, kid) {
                    (Some(key_kid), Some(kid)) => key_kid == kid,
                    _ => true,
                }
        })
    }

    /// Whether some key verifies `alg` (else a token with it is refused
    /// before any key is tried).
    pub fn supports(&self, alg: Algorithm) -> bool {
        self.keys.iter().any(|k| k.alg == alg)
    }
}

/// The files' contents as read at one time: the unit compared to notice a
/// change, so a rewrite within the same second (or of the same size) counts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents(Vec<Vec<u8>>);

fn read_all(files: &KeyFiles) -> Result<Contents, KeyError> {
    files
        .all()
        .into_iter()
        .map(|(_, path)| {
            std::fs::read(path).map_err(|e| KeyError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()
        .map(Contents)
}

fn parse_all(files: &KeyFiles, contents: &Contents) -> Result<KeySet, KeyError> {
    let mut keys = Vec::new();
    for ((kind, path), bytes) in files.all().into_iter().zip(&contents.0) {
        let invalid = |reason: String| KeyError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        match kind {
            FileKind::Hs256Secret => {
                let secret = bytes.trim_ascii();
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(invalid(format!(
                        "an HS256 secret must be at least {MIN_SECRET_BYTES} bytes, this one \
                         is {}",
                        secret.len()
                    )));
                }
                keys.push(
                    checked(None, Algorithm::HS256, DecodingKey::from_secret(secret))
                        .map_err(invalid)?,
                );
            }
            FileKind::RsaPem => keys.push(
                checked(None, Algorithm::RS256, DecodingKey::from_rsa_pem(bytes))
                    .map_err(invalid)?,
            ),
            FileKind::EcPem => keys.push(
                checked(None, Algorithm::ES256, DecodingKey::from_ec_pem(bytes))
                    .map_err(invalid)?,
            ),
            FileKind::Jwks => keys.extend(parse_jwks(bytes).map_err(invalid)?),
        }
    }
    if keys.is_empty() {
        return Err(KeyError::NoKeys);
    }
    Ok(KeySet { keys })
}

/// A key as jsonwebtoken's backend will use it: building its verifier parses
/// the key, so a bad key fails here, at load, not on the first token.
fn checked(
    kid: Option<String>,
    alg: Algorithm,
    key: jsonwebtoken::errors::Result<DecodingKey>,
) -> Result<VerifyKey, String> {
    let key = key.map_err(|e| format!("not a {alg:?} key: {e}"))?;
    let provider = jsonwebtoken::crypto::CryptoProvider::try_get_default()
        .ok_or("no JWT crypto provider is built in")?;
    (provider.verifier_factory)(&alg, &key).map_err(|e| format!("not a {alg:?} key: {e}"))?;
    Ok(VerifyKey { kid, alg, key })
}

/// The keys of a JWKS document (RFC 7517) this proxy can use: RSA (RS256),
/// EC P-256 (ES256) and symmetric (HS256) keys meant for signatures. Keys for
/// another algorithm, curve or use are skipped (logged); a key that claims a
/// supported algorithm but does not parse fails the whole document.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<VerifyKey>, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.clone();
        let name = kid.clone().unwrap_or_else(|| format!("#{i}"));
        let natural = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Some(Algorithm::ES256)
            }
            AlgorithmParameters::OctetKey(_) => Some(Algorithm::HS256),
            _ => None,
        };
        let alg = match (jwk.common.key_algorithm, natural) {
            (None, Some(alg)) => alg,
            (Some(KeyAlgorithm::RS256), Some(Algorithm::RS256)) => Algorithm::RS256,
            (Some(KeyAlgorithm::ES256), Some(Algorithm::ES256)) => Algorithm::ES256,
            (Some(KeyAlgorithm::HS256), Some(Algorithm::HS256)) => Algorithm::HS256,
            (declared, _) => {
                tracing::warn!(key = %name, alg = ?declared, "JWKS key skipped: not an RS256, ES256 (P-256) or HS256 key");
                continue;
            }
        };
        if matches!(&jwk.common.public_key_use, Some(u) if *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
        {
            tracing::warn!(key = %name, "JWKS key skipped: its use is not sig");
            continue;
        }
        let key = checked(kid, alg, DecodingKey::from_jwk(jwk))
            .map_err(|e| format!("key {name}: {e}"))?;
        if alg == Algorithm::HS256
            && key.key.try_get_as_bytes().map_or(0, <[u8]>::len) < MIN_SECRET_BYTES
        {
            return Err(format!(
                "key {name}: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// The current key set, swapped whole on a successful reload.
#[derive(Debug)]
pub struct KeyStore {
    files: KeyFiles,
    current: RwLock<Arc<KeySet>>,
}

impl KeyStore {
    /// Read and check every file now: a proxy does not start with keys it
    /// cannot use. The [`KeyWatch`] is what [`watch`] needs to reload them.
    pub fn load(files: KeyFiles) -> Result<KeyWatch, KeyError> {
        let contents = read_all(&files)?;
        let set = parse_all(&files, &contents)?;
        let store = Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(set)),
        });
        Ok(KeyWatch {
            store,
            last_seen: Ok(contents),
        })
    }

    /// The keys as of now (the lock is held only to clone the `Arc`).
    pub fn current(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Keys in use now (the `sttproxy_jwt_keys` gauge).
    pub fn key_count(&self) -> i64 {
        i64::try_from(self.current().keys.len()).unwrap_or(i64::MAX)
    }

    fn replace(&self, set: KeySet) {
        let set = Arc::new(set);
        match self.current.write() {
            Ok(mut g) => *g = set,
            Err(p) => *p.into_inner() = set,
        }
    }
}

/// A store and what its reload task last saw, to act once per change.
#[derive(Debug)]
pub struct KeyWatch {
    pub store: Arc<KeyStore>,
    /// The contents last read, or the read error last seen.
    last_seen: Result<Contents, KeyError>,
}

/// Poll the key files every `interval` until `stop`; apply a changed set
/// that loads, keep the old one otherwise. Counted in
/// `sttproxy_jwt_key_reloads_total{outcome="ok"|"error"}`.
pub async fn watch(
    mut seen: KeyWatch,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let store = seen.store.clone();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        // File reads and key parsing are blocking work: off the runtime's
        // workers. Keys are parsed only when the bytes changed.
        let files = store.files.clone();
        let contents = match off_runtime(&stop, move || read_all(&files)).await {
            Some(Ok(c)) => c,
            Some(Err(())) => continue,
            None => return,
        };
        if contents == seen.last_seen {
            continue;
        }
        let parsed = match &contents {
            Err(e) => Err(e.clone()),
            Ok(c) => {
                let (files, c) = (store.files.clone(), c.clone());
                match off_runtime(&stop, move || parse_all(&files, &c)).await {
                    Some(Ok(parsed)) => parsed,
                    Some(Err(())) => continue,
                    None => return,
                }
            }
        };
        seen.last_seen = contents;
        let outcome = match parsed {
            Ok(set) => {
                let n = set.keys.len();
                store.replace(set);
                metrics.jwt_keys.set(store.key_count());
                tracing::info!(keys = n, "JWT keys reloaded");
                "ok"
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWT key files changed but do not load; keeping the previous keys");
                "error"
            }
        };
        metrics
            .jwt_key_reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

/// Run `f` on the blocking pool: `None` when `stop` fires first,
/// `Some(Err(()))` (logged) when it panicked.
async fn off_runtime<T: Send + 'static>(
    stop: &CancellationToken,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<Result<T, ()>> {
    tokio::select! {
        biased;
        () = stop.cancelled() => None,
        r = tokio::task::spawn_blocking(f) => Some(r.map_err(|e| {
            tracing::error!(error = %e, "JWT key reload failed");
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sttproxy-keys-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn pem_files_load_with_their_algorithm() {
        let files = KeyFiles {
            rsa_public_keys: vec![keys_dir().join("rsa_a.pub.pem")],
            ec_public_keys: vec![keys_dir().join("ec_a.pub.pem")],
            hs256_secret: Some(temp_file("secret", &[b'k'; 40])),
            jwks: None,
        };
        let store = KeyStore::load(files).unwrap().store;
        let algs: Vec<_> = store.current().keys.iter().map(|k| k.alg).collect();
        assert_eq!(algs, [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256]);
    }

    #[test]
    fn wrong_or_weak_keys_are_refused_naming_the_file() {
        let cases = [
            (
                KeyFiles {
                    hs256_secret: Some(temp_file("short", b"too short\n")),
                    ..KeyFiles::default()
                },
                "at least 32 bytes",
            ),
            (
                KeyFiles {
                    // An EC key given as an RSA key.
                    rsa_public_keys: vec![keys_dir().join("ec_a.pub.pem")],
                    ..KeyFiles::default()
                },
                "ec_a.pub.pem",
            ),
            (
                KeyFiles {
                    ec_public_keys: vec![temp_file("garbage.pem", b"-----BEGIN nothing")],
                    ..KeyFiles::default()
                },
                "garbage.pem",
            ),
            (
                KeyFiles {
                    jwks: Some(temp_file("jwks.json", br#"{"keys": 3}"#)),
                    ..KeyFiles::default()
                },
                "not a JWKS",
            ),
            (
                KeyFiles {
                    jwks: Some(temp_file("empty.json", br#"{"keys": []}"#)),
                    ..KeyFiles::default()
                },
                "no usable key",
            ),
            (
                KeyFiles {
                    rsa_public_keys: vec!["/nonexistent/key.pem".into()],
                    ..KeyFiles::default()
                },
                "reading /nonexistent/key.pem",
            ),
        ];
        for (files, expected) in cases {
            let err = KeyStore::load(files).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} (expected {expected})");
        }
    }

    #[test]
    fn jwks_keys_of_other_algorithms_are_skipped() {
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "h", "k": "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS1rZXk"},
            {"kty": "oct", "kid": "h512", "alg": "HS512", "k": "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS1rZXk"},
            {"kty": "oct", "kid": "enc", "use": "enc", "k": "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleS1rZXk"},
        ]});
        let files = KeyFiles {
            jwks: Some(temp_file("jwks.json", jwks.to_string().as_bytes())),
            ..KeyFiles::default()
        };
        let store = KeyStore::load(files).unwrap().store;
        let set = store.current();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid.as_deref(), Some("h"));
        assert_eq!(set.candidates(Algorithm::HS256, Some("h")).count(), 1);
        assert_eq!(set.candidates(Algorithm::HS256, Some("other")).count(), 0);
        assert_eq!(set.candidates(Algorithm::RS256, None).count(), 0);
    }
}
