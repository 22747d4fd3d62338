//! Development certificates: a CA and a serving certificate signed by it, valid for as long as
//! real ones are (a year, the CA ten, as kubeadm makes them), so that the expiry metric and its
//! alert behave as they will in production. An existing CA is kept: every caBundle made from it
//! stays good, and only the serving certificate is issued again.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// How long the serving certificate is valid by default (kubeadm's choice).
pub const SERVING_DAYS: u32 = 365;
/// How long the CA is valid by default (kubeadm's choice).
pub const CA_DAYS: u32 = 3650;
/// Certificates start this long before now, so that a peer whose clock is a little behind
/// does not see them as not yet valid.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// What the serving certificate is for, and how long each certificate lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertOptions {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
    pub ca_days: u32,
}

impl Default for CertOptions {
    fn default() -> Self {
        CertOptions::for_names(default_dns_names())
    }
}

impl CertOptions {
    /// `dns` names and the loopback addresses, with the default lifetimes.
    pub fn for_names(dns: Vec<String>) -> Self {
        CertOptions {
            dns,
            ips: ["127.0.0.1", "::1"]
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .collect(),
            days: SERVING_DAYS,
            ca_days: CA_DAYS,
        }
    }

    /// The serving certificate's names as a user gives them (several per flag, flags repeated,
    /// or comma-separated): DNS names, and IP addresses, which go into IP SANs.
    pub fn with_names(mut self, names: &[String]) -> Result<Self, CertError> {
        let (mut dns, mut ips) = (Vec::new(), Vec::new());
        for name in names
            .iter()
            .flat_map(|n| n.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            match name.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) if valid_dns_name(name) => dns.push(name.to_string()),
                Err(_) => return Err(CertError::Name(name.to_string())),
            }
        }
        if dns.is_empty() && ips.is_empty() {
            return Err(CertError::Name(String::new()));
        }
        self.dns = dns;
        self.ips = ips;
        Ok(self)
    }
}

/// A DNS name a certificate can hold: labels of letters, digits and `-` (not at either end),
/// at most 63 each and 253 in all, the first one possibly a `*` wildcard.
pub fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .enumerate()
            .all(|(i, l)| label(l) || (i == 0 && l == "*" && name.contains('.')))
}

/// A serving certificate with its key, and the CA that signed it, all PEM.
pub struct DevCerts {
    pub ca_pem: String,
    /// The CA's key when the CA was made now (a kept CA's key stays as it was on disk).
    pub ca_key_pem: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
    /// When the serving certificate stops being valid.
    pub not_after: time::OffsetDateTime,
    /// When the CA stops being valid, when it was made now.
    pub ca_not_after: Option<time::OffsetDateTime>,
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
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{cert} is there without its key {key}: a new CA would break every caBundle made from \
         the old one; put the key back, or pass --force to make a new CA"
    )]
    CaWithoutKey { cert: PathBuf, key: PathBuf },
    #[error("{cert} and {key} are not a CA certificate and its key")]
    BadCa {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0:?} is neither a DNS name nor an IP address")]
    Name(String),
}

/// Whether [`DevCerts::in_dir`] kept the CA there or made a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ca {
    Made,
    Kept,
}

/// `now + days` (and a skew back for the start).
fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + time::Duration::days(i64::from(days));
}

impl DevCerts {
    /// A new CA and a serving certificate for `dns` names and the loopback addresses, with the
    /// default lifetimes.
    pub fn generate(dns: &[String]) -> Result<DevCerts, CertError> {
        DevCerts::new_ca(&CertOptions::for_names(dns.to_vec()))
    }

    /// A new CA, and a serving certificate it signed.
    pub fn new_ca(opts: &CertOptions) -> Result<DevCerts, CertError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = name("image-mirror-webhook development CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca_params, opts.ca_days);
        let ca_not_after = ca_params.not_after;
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut certs = DevCerts::signed_by(&issuer, ca_cert.pem(), opts)?;
        certs.ca_key_pem = Some(ca_key_pem);
        certs.ca_not_after = Some(ca_not_after);
        Ok(certs)
    }

    /// A serving certificate for `opts`, signed by `issuer` (whose certificate is `ca_pem`).
    fn signed_by(
        issuer: &Issuer<'_, KeyPair>,
        ca_pem: String,
        opts: &CertOptions,
    ) -> Result<DevCerts, CertError> {
        let mut params = CertificateParams::new(opts.dns.clone())?;
        params
            .subject_alt_names
            .extend(opts.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let common = opts
            .dns
            .first()
            .cloned()
            .or_else(|| opts.ips.first().map(IpAddr::to_string))
            .unwrap_or_else(|| "image-mirror-webhook".to_string());
        params.distinguished_name = name(&common);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, opts.days);
        let not_after = params.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, issuer)?;
        Ok(DevCerts {
            ca_pem,
            ca_key_pem: None,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
            ca_not_after: None,
        })
    }

    /// The certificates of `dir` for `opts`: a serving certificate signed by the CA already
    /// there (`ca.crt`, `ca.key`), or, when there is none or `force`, a new CA too. Nothing is
    /// written: see [`DevCerts::write`].
    pub fn in_dir(
        dir: &Path,
        opts: &CertOptions,
        force: bool,
    ) -> Result<(DevCerts, Ca), CertError> {
        let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if force || !cert.exists() {
            return Ok((DevCerts::new_ca(opts)?, Ca::Made));
        }
        if !key.exists() {
            return Err(CertError::CaWithoutKey { cert, key });
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CertError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let (ca_pem, key_pem) = (read(&cert)?, read(&key)?);
        let bad = |source| CertError::BadCa {
            cert: cert.clone(),
            key: key.clone(),
            source,
        };
        let ca_key = KeyPair::from_pem(&key_pem).map_err(bad)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(bad)?;
        Ok((DevCerts::signed_by(&issuer, ca_pem, opts)?, Ca::Kept))
    }

    /// Writes `tls.crt` and `tls.key`, and `ca.crt` and `ca.key` when the CA is new, into
    /// `dir`; keys with mode 0600, also when the file was there before.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CertError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut files = vec![
            ("tls.crt", &self.cert_pem, false),
            ("tls.key", &self.key_pem, true),
        ];
        if let Some(ca_key) = &self.ca_key_pem {
            files.push(("ca.crt", &self.ca_pem, false));
            files.push(("ca.key", ca_key, true));
        }
        for (file, text, private) in files {
            let path = dir.join(file);
            let written = if private {
                write_private(&path, text)
            } else {
                std::fs::write(&path, text)
            };
            written.map_err(io(&path))?;
        }
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
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode above is for a new file only: one that was there keeps its own unless told.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validity_of(pem: &str) -> (i64, i64) {
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let v = cert.validity();
        (v.not_before.timestamp(), v.not_after.timestamp())
    }

    use rustls::pki_types::pem::PemObject as _;

    #[test]
    fn certificates_last_a_year_and_the_ca_ten_starting_now() {
        let certs = DevCerts::generate(&["localhost".into()]).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let day = 86_400;
        let (from, until) = validity_of(&certs.cert_pem);
        assert!((now - 600..=now).contains(&from), "{from} {now}");
        assert!((until - now - 365 * day).abs() < 60, "{until}");
        let (from, until) = validity_of(&certs.ca_pem);
        assert!((now - 600..=now).contains(&from));
        assert!((until - now - 3650 * day).abs() < 60);
        let short = CertOptions {
            days: 30,
            ..CertOptions::default()
        };
        let (_, until) = validity_of(&DevCerts::new_ca(&short).unwrap().cert_pem);
        assert!((until - now - 30 * day).abs() < 60);
    }

    #[test]
    fn names_are_dns_names_or_ip_addresses() {
        let opts = CertOptions::default()
            .with_names(&[
                "a.example.com".into(),
                "b.example.com,10.0.0.1".into(),
                "::1".into(),
            ])
            .unwrap();
        assert_eq!(opts.dns, ["a.example.com", "b.example.com"]);
        assert_eq!(opts.ips.len(), 2);
        assert!(CertOptions::default()
            .with_names(&["*.svc.local".into()])
            .is_ok());
        for bad in ["a_b", "-x.com", "x..com", "*", "a.*.com", &"a".repeat(64)] {
            let e = CertOptions::default()
                .with_names(&[bad.to_string()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
