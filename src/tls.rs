//! The serving certificate: loading, and reloading when cert-manager rotates it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::locks::lock;
use crate::metrics::{Metrics, ResultLabels};

/// The TLS layer's error.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key")]
    NoKey { path: PathBuf },
    #[error("certificate {cert} and key {key} do not make a TLS configuration")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path} holds no CA certificate that client certificates can be checked against")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: Option<rustls::server::VerifierBuilderError>,
    },
    #[error("the certificate reload was cancelled")]
    Cancelled,
}

impl TlsError {
    /// The label of this error in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "read",
            TlsError::NoCertificate { .. } => "no-certificate",
            TlsError::NoKey { .. } => "no-key",
            TlsError::Config { .. } => "config",
            TlsError::ClientCa { .. } => "client-ca",
            TlsError::Cancelled => "cancelled",
        }
    }
}

/// Where the certificate and key live, and the CA whose client certificates are required.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, every connection must present a client certificate this CA signed: the API
    /// server's, as its AdmissionConfiguration names it (`--client-ca`).
    pub client_ca: Option<PathBuf>,
}

/// A TLS configuration ready to serve, and when its certificate expires (Unix seconds).
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub not_after: Option<i64>,
    /// The content hash of the certificate and key files.
    pub digest: [u8; 32],
}

impl TlsFiles {
    /// Reads both files and builds the server configuration (ALPN `h2`, `http/1.1`).
    pub fn load(&self) -> Result<Loaded, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let ca_pem = match &self.client_ca {
            Some(path) => read(path)?,
            None => Vec::new(),
        };
        let digest = crate::watch::digest(&[&cert_pem, &key_pem, &ca_pem]);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
            path: self.key.clone(),
        })?;
        let not_after = x509_parser::parse_x509_certificate(&certs[0])
            .ok()
            .map(|(_, c)| c.validity().not_after.timestamp());
        let config_err = |source| TlsError::Config {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                builder.with_client_cert_verifier(client_verifier(path, &read, provider)?)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(config_err)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Loaded {
            config: Arc::new(config),
            not_after,
            digest,
        })
    }

    /// The files a reload reads.
    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert.as_path(), self.key.as_path()];
        files.extend(self.client_ca.as_deref());
        files
    }

    /// Re-reads the files whenever they change (or the kubelet swaps its `..data` link), and
    /// swaps the new configuration into `target` only when it is valid and differs from
    /// `loaded`, the one in force; open connections keep the old one.
    pub fn watch(
        &self,
        target: axum_server::tls_rustls::RustlsConfig,
        loaded: [u8; 32],
        metrics: Metrics,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let files = self.clone();
        let in_force = Arc::new(std::sync::Mutex::new(loaded));
        crate::watch::on_change(&self.files(), move || {
            let (files, target, metrics) = (files.clone(), target.clone(), metrics.clone());
            let in_force = in_force.clone();
            async move { files.reload_into(&target, &in_force, &metrics).await }
        })
    }

    async fn reload_into(
        &self,
        target: &axum_server::tls_rustls::RustlsConfig,
        in_force: &std::sync::Mutex<[u8; 32]>,
        metrics: &Metrics,
    ) {
        let files = self.clone();
        let loaded = tokio::task::spawn_blocking(move || files.load())
            .await
            .unwrap_or(Err(TlsError::Cancelled));
        let mut current = lock(in_force);
        let result = match loaded {
            Ok(loaded) if loaded.digest == *current => {
                tracing::debug!(cert = %self.cert.display(), "serving certificate unchanged");
                "unchanged"
            }
            Ok(loaded) => {
                *current = loaded.digest;
                target.reload_from_config(loaded.config);
                if let Some(t) = loaded.not_after {
                    metrics.certificate_expiry.set(t);
                }
                tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                "success"
            }
            Err(e) => {
                tracing::error!(error = %crate::error::Report(&e),
                    "serving certificate not reloaded; keeping the old one");
                "failure"
            }
        };
        metrics
            .certificate_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// Requires a client certificate signed by a CA in `path`.
fn client_verifier(
    path: &Path,
    read: &dyn Fn(&Path) -> Result<Vec<u8>, TlsError>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let pem = read(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
        // A certificate that is no CA is refused here, not at the first handshake.
        roots.add(cert).map_err(|_| TlsError::ClientCa {
            path: path.to_path_buf(),
            source: None,
        })?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: path.to_path_buf(),
            source: Some(e),
        })
}
