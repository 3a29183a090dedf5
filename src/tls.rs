//! rustls set-up for both sides: the server's certificate (re-read when its files change,
//! as cert-manager rotates a mounted Secret) and optional client-certificate check; the
//! client's trust (the Mozilla roots built in, `--ca-file`, `--insecure`) and certificate.
//! Failures are one-line errors that name the file and what is wrong with it.

use std::fmt;
use std::fs;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::stream::SharedStream;

/// How often a connection may make the server look at its certificate files again.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(std::iter::Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|error| format!("cannot read certificates from {}: {error}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|error| format!("cannot read a private key from {}: {error}", path.display()))
}

/// Certificates in `paths` as a root store.
fn root_store(paths: &[PathBuf], with_builtin: bool) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if with_builtin {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for path in paths {
        for cert in load_certs(path)? {
            roots
                .add(cert)
                .map_err(|error| format!("{}: not a CA certificate: {error}", path.display()))?;
        }
    }
    Ok(roots)
}

/// The server's certificate chain and key, checked to belong together.
fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = load_certs(cert)?;
    let certified =
        CertifiedKey::from_der(chain, load_key(key)?, &provider()).map_err(|error| {
            format!(
                "{} and {} do not make a usable certificate: {error}",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Arc::new(certified))
}

/// The server's TLS settings: what every accepted socket's handshake uses.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// Loads the certificate chain and key (PEM), and with `client_ca` requires client
    /// certificates issued by it (mTLS).
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, String> {
        let resolver = Arc::new(ReloadingCert::load(cert, key)?);
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?;
        let builder = match client_ca {
            Some(ca) => {
                let roots = root_store(&[ca.to_path_buf()], false)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|error| format!("{}: {error}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// `tcp` with a new server-side session (its handshake not done yet).
    // Not inlined: the session (over 1 KiB) is built on the stack before it is boxed, and a
    // connection thread's deepest frame decides how much of its stack stays resident.
    #[inline(never)]
    pub fn wrap(&self, tcp: TcpStream) -> io::Result<Arc<SharedStream>> {
        let session =
            rustls::ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        Ok(SharedStream::with_tls(tcp, session))
    }
}

/// The server certificate, re-read when its files change: new connections get the new
/// one, live ones keep theirs. A change that does not load (a half-written file) keeps the
/// old certificate and is logged.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    stamp: (FileStamp, FileStamp),
    checked: Instant,
}

/// What tells that a file changed: its modification time and size (Kubernetes swaps a
/// Secret's files through a symlink, so both change).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Option<(SystemTime, u64)>);

impl FileStamp {
    fn of(path: &Path) -> Self {
        FileStamp(
            fs::metadata(path)
                .ok()
                .and_then(|meta| Some((meta.modified().ok()?, meta.len()))),
        )
    }
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let stamp = (FileStamp::of(cert), FileStamp::of(key));
        Ok(ReloadingCert {
            current: Mutex::new(Current {
                key: certified_key(cert, key)?,
                stamp,
                checked: Instant::now(),
            }),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let stamp = (FileStamp::of(&self.cert), FileStamp::of(&self.key));
            if stamp != current.stamp {
                match certified_key(&self.cert, &self.key) {
                    Ok(key) => {
                        info!("TLS certificate reloaded from {}", self.cert.display());
                        current.key = key;
                        current.stamp = stamp;
                    }
                    Err(error) => {
                        warn!("TLS certificate not reloaded, keeping the old one: {error}");
                    }
                }
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What the client trusts and shows.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsOptions {
    /// Extra CA certificates (PEM files) to trust.
    pub ca_files: Vec<PathBuf>,
    /// Trust only `ca_files`, not the built-in Mozilla roots.
    pub no_builtin_roots: bool,
    /// A client certificate chain and key (PEM) for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Accept any server certificate.
    pub insecure: bool,
}

/// The client's TLS settings.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    /// Builds the settings: roots, optional client certificate, optional `insecure`.
    pub fn load(options: &ClientTlsOptions) -> Result<Self, String> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?;
        let builder = if options.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
        } else {
            let roots = root_store(&options.ca_files, !options.no_builtin_roots)?;
            if roots.is_empty() {
                return Err("no CA certificate to trust: give --ca-file".into());
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match &options.client_cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|error| {
                    format!(
                        "{} and {} do not make a usable client certificate: {error}",
                        cert.display(),
                        key.display()
                    )
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// `tcp` with a new client-side session for `server_name` (SNI and the name the
    /// certificate must carry); its handshake not done yet.
    // Not inlined, for the reason given at [`ServerTls::wrap`].
    #[inline(never)]
    pub fn wrap(&self, tcp: TcpStream, server_name: &str) -> io::Result<Arc<SharedStream>> {
        let name = ServerName::try_from(server_name.to_owned()).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{server_name:?} is not a valid TLS server name: {error}"),
            )
        })?;
        let session =
            rustls::ClientConnection::new(self.config.clone(), name).map_err(io::Error::other)?;
        Ok(SharedStream::with_tls(tcp, session))
    }
}

/// `--insecure`: any certificate is accepted, but the handshake's signatures are still
/// checked (the session is encrypted, just not authenticated).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS failure as a person should read it: what is wrong and what to do about it.
pub struct Explained<'a>(pub &'a rustls::Error);

impl fmt::Display for Explained<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => f.write_str(
                "TLS: the server's certificate is from an unknown issuer (trust its CA with --ca-file, or --insecure)",
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => f.write_str(
                "TLS: the server's certificate is not valid for this name (see --tls-server-name)",
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => f.write_str("TLS: the server's certificate has expired"),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => f.write_str("TLS: the server's certificate is not valid yet"),
            rustls::Error::NoCertificatesPresented => {
                f.write_str("TLS: the peer sent no certificate (a client certificate is required)")
            }
            rustls::Error::AlertReceived(alert) => write!(f, "TLS: the peer refused the handshake ({alert:?})"),
            rustls::Error::InvalidMessage(_) => {
                f.write_str("TLS: the peer does not speak TLS (plain HTTP on a TLS port?)")
            }
            other => write!(f, "TLS: {other}"),
        }
    }
}
