//! TLS for the test API server, in kubeadm's shape: one cluster CA signs the serving
//! certificate of every API server, and clients trust that CA alone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// Why a certificate or a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A cluster CA (kubeadm's `ca.crt`).
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// The names kubeadm puts in an API server's serving certificate, besides its own and the
/// control-plane endpoint's addresses: never 127.0.0.1.
pub const KUBEADM_NAMES: [&str; 4] = [
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// A serving certificate and its key, ready to serve.
#[derive(Clone)]
pub struct ServingCert {
    pub(crate) config: Arc<rustls::ServerConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Authority {
    pub fn new() -> Result<Authority, TlsError> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "kubernetes");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;
        Ok(Authority { issuer })
    }

    /// The CA certificate, PEM (what a kubeconfig's `certificate-authority` names).
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn serving(&self, names: &[&str]) -> Result<ServingCert, TlsError> {
        let mut p =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<String>>())?;
        p.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(ServingCert {
            config: Arc::new(config),
        })
    }

    /// `GET path` over HTTPS/1.0 to `addr`, verifying the server's certificate for `name`
    /// against this CA; the whole answer (status line, headers, body). Blocking, so it can
    /// run inside a network namespace's thread.
    pub fn get(&self, addr: SocketAddr, name: &str, path: &str) -> std::io::Result<String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.issuer.der().to_vec()))
            .map_err(std::io::Error::other)?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
        let conn = rustls::ClientConnection::new(Arc::new(config), server)
            .map_err(std::io::Error::other)?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        write!(s, "GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n")?;
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) => Ok(out),
            // A server that closes without close_notify: the answer is complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => Ok(out),
            Err(e) => Err(e),
        }
    }
}
