//! Development certificates: a CA and a serving certificate signed by it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The names the webhook's Service answers to, plus loopback for local use.
pub fn default_dns_names() -> Vec<String> {
    let svc = "image-mirror-webhook";
    let ns = "image-mirror-system";
    vec![
        "localhost".to_string(),
        svc.to_string(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ]
}

/// A CA certificate and a serving certificate with its key, all PEM.
pub struct DevCerts {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The certificate generator's error.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate certificates")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DevCerts {
    /// Generates a CA and a serving certificate for `dns` names and the loopback addresses.
    pub fn generate(dns: &[String]) -> Result<DevCerts, CertError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = name("image-mirror-webhook development CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params = CertificateParams::new(dns.to_vec())?;
        for ip in ["127.0.0.1", "::1"] {
            if let Ok(addr) = ip.parse::<IpAddr>() {
                params.subject_alt_names.push(SanType::IpAddress(addr));
            }
        }
        params.distinguished_name = name(dns.first().map_or("image-mirror-webhook", |s| s));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(DevCerts {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.crt`, `tls.crt` and `tls.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CertError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for (file, text) in [("ca.crt", &self.ca_pem), ("tls.crt", &self.cert_pem)] {
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        let key_path = dir.join("tls.key");
        write_private(&key_path, &self.key_pem).map_err(io(&key_path))?;
        Ok(())
    }

    /// The `caBundle` of a MutatingWebhookConfiguration: the CA PEM, base64-encoded.
    pub fn ca_bundle(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.ca_pem)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}
