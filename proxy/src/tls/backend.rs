//! The proxy as a TLS client of `wss://` backends: which servers it trusts
//! and which certificate (if any) it shows them.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::sign::SingleCertAndKey;

use super::{TlsError, cert};

/// Files that extend the defaults toward backends: by default the Mozilla
/// roots (webpki-roots) and no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendTlsFiles {
    /// PEM certificates trusted in addition to the Mozilla roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its key, for backends that ask for one
    /// (mutual TLS). Both or neither (checked by the settings).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// rustls client settings for `wss://` backends (ring, TLS 1.2 and 1.3).
pub fn client_config(files: &BackendTlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = super::provider();
    let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &files.ca_file {
        let pem = cert::read_file(path)?;
        for ca in cert::parse_certs(path, &pem)? {
            roots.add(ca).map_err(|source| TlsError::Ca {
                path: path.display().to_string(),
                source,
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    let config = match (&files.client_cert, &files.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let key = cert::certified_key(
                cert_path,
                &cert::read_file(cert_path)?,
                key_path,
                &cert::read_file(key_path)?,
                &provider,
            )?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key)))
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
