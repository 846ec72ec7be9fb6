//! TLS for the tests: a throwaway CA (rcgen), certificates it signs written
//! to PEM files, rustls clients that trust only it, `wss://` sessions to the
//! proxy, and a TLS front for echo backends (a `wss://` backend: TLS
//! terminated here, bytes relayed to the plain echo backend behind).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::listen::{Served, serve};
use super::{STEP, Ws, replace_file, within};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

/// A certificate signed by a [`TestCa`], with its key.
#[derive(Clone)]
pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses) with serial `serial`.
    pub fn leaf(&self, names: &[&str], serial: u64) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test leaf {serial}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.pem).unwrap();
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }

    /// A rustls client trusting this CA only, offering ALPN `http/1.1`.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Leaf {
    /// Write the pair, each file replaced atomically (a rename), the key
    /// first: a reader sees the old pair, a new key with the old
    /// certificate (refused, and read again when the certificate changes),
    /// or the new pair.
    pub fn write(&self, cert: &Path, key: &Path) {
        replace_file(key, self.key_pem.as_bytes());
        replace_file(cert, self.cert_pem.as_bytes());
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        use rustls::pki_types::pem::PemObject;
        PrivatePkcs8KeyDer::from_pem_slice(self.key_pem.as_bytes())
            .unwrap()
            .into()
    }
}

/// A TLS connection to `addr` (SNI `localhost`), and the leaf certificate
/// the server presented.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(TlsStream<TcpStream>, CertificateDer<'static>)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .expect("the server presented a certificate");
    Ok((tls, leaf))
}

/// The certificate a new TLS connection to `addr` is served.
pub async fn served_cert(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> CertificateDer<'static> {
    let (_, leaf) = within(STEP, "a TLS handshake", tls_connect(addr, config.clone()))
        .await
        .expect("TLS handshake");
    leaf
}

/// A tungstenite `wss://` session on `addr` at `/v1/stream`, and the leaf
/// certificate presented.
pub async fn connect_wss(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> (Ws, CertificateDer<'static>) {
    within(STEP, format_args!("connecting to wss://{addr}"), async {
        let (tls, leaf) = tls_connect(addr, config.clone())
            .await
            .expect("TLS handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "ALPN"
        );
        let url = format!("wss://localhost:{}/v1/stream", addr.port());
        let (ws, _): (WebSocketStream<_>, _) =
            tokio_tungstenite::client_async(url, MaybeTlsStream::Rustls(tls))
                .await
                .expect("websocket upgrade over TLS");
        (ws, leaf)
    })
    .await
}

/// A `wss://` backend: a TLS listener that relays each connection's
/// plaintext to a plain backend at `target` (set once it is known). Its
/// tasks end when it is dropped.
pub struct TlsFront {
    /// Dropped with the front: ends the accept loop and every relay.
    served: Served,
    target: Arc<OnceLock<SocketAddr>>,
}

impl TlsFront {
    pub async fn start(config: Arc<rustls::ServerConfig>) -> Self {
        let target = Arc::new(OnceLock::<SocketAddr>::new());
        let to = target.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let served = serve(move |tcp| {
            let acceptor = acceptor.clone();
            let target = to.get().copied();
            async move {
                // No plain backend yet: the connection is dropped.
                let Some(target) = target else { return };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            }
        })
        .await;
        Self { served, target }
    }

    /// Relay to the plain backend `ws://ADDR`.
    pub fn relay_to(&self, plain_url: &str) {
        let addr: SocketAddr = plain_url.trim_start_matches("ws://").parse().unwrap();
        let _ = self.target.set(addr);
    }

    pub fn url(&self) -> String {
        format!("wss://{}", self.served.addr)
    }
}
