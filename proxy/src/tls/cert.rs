//! Reading PEM certificates and keys from files into rustls' types.

use std::path::Path;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::TlsError;

/// The whole file; certificate and key files are a few KiB.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in `pem` (read from `path`), in order; at least one.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The first private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.display().to_string(),
        },
        e => TlsError::Pem {
            path: path.display().to_string(),
            reason: e.to_string(),
        },
    })
}

/// A certificate chain with its key, checked to belong together (the key's
/// public half is the leaf certificate's), so that a mismatched pair is
/// refused here instead of failing every handshake later.
pub fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = parse_certs(cert_path, cert_pem)?;
    let key = parse_key(key_path, key_pem)?;
    let (cert, key_name) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let certified =
        CertifiedKey::from_der(chain, key, provider).map_err(|source| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert.clone(),
                    key: key_name.clone(),
                }
            }
            source => TlsError::Key {
                cert: cert.clone(),
                key: key_name.clone(),
                source,
            },
        })?;
    // `from_der` lets a key whose public half it cannot compute pass; ring
    // computes it for every key type it loads, so a pass here is a match.
    Ok(certified)
}
