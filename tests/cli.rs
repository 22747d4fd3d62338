//! The commands as an operator meets them, through the real binary: `certs`, `check-config`,
//! `explain`, flags and variables.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"))
}

fn run(args: &[&str]) -> Output {
    binary().args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// (not before, not after) of the first certificate in `pem`, in Unix seconds.
fn validity(pem: &str) -> (i64, i64) {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let v = cert.validity();
    (v.not_before.timestamp(), v.not_after.timestamp())
}

/// Whether the serving certificate in `dir` verifies, for `name`, against the CA in `dir`, as
/// a TLS client would check it.
fn verifies(dir: &Path, name: &str) -> bool {
    common::init();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(read(&dir.join("ca.crt")).as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder(roots.into())
        .build()
        .unwrap();
    let cert = CertificateDer::from_pem_slice(read(&dir.join("tls.crt")).as_bytes()).unwrap();
    verifier
        .verify_server_cert(
            &cert,
            &[],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_ok()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const DAY: i64 = 86_400;

#[test]
fn certs_last_as_real_ones_and_a_second_run_keeps_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let o = out.to_str().unwrap();
    let first = run(&["certs", "--out", o]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("made a new CA"),
        "{}",
        stderr(&first)
    );
    let ca = read(&out.join("ca.crt"));
    let (from, until) = validity(&read(&out.join("tls.crt")));
    assert!(
        from <= now() && from > now() - 3600,
        "starts now, less a skew: {from}"
    );
    assert!(
        (until - now() - 365 * DAY).abs() < 3600,
        "about a year: {until}"
    );
    let (_, ca_until) = validity(&ca);
    assert!(
        (ca_until - now() - 3650 * DAY).abs() < 3600,
        "ten years: {ca_until}"
    );
    assert!(verifies(
        &out,
        "image-mirror-webhook.image-mirror-system.svc"
    ));
    // The printed caBundle is the CA's.
    let bundle = String::from_utf8(first.stdout).unwrap();
    let decoded =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, bundle.trim()).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), ca);

    // Again, with other names and a shorter life: the CA stays, the serving certificate is new.
    let served = read(&out.join("tls.crt"));
    let second = run(&[
        "certs",
        "--out",
        o,
        "--days",
        "30",
        "--dns",
        "a.example.com",
        "b.example.com",
        "--dns",
        "c.example.com,10.1.2.3",
    ]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("kept the CA"),
        "{}",
        stderr(&second)
    );
    assert_eq!(read(&out.join("ca.crt")), ca);
    assert_ne!(read(&out.join("tls.crt")), served);
    let (_, until) = validity(&read(&out.join("tls.crt")));
    assert!((until - now() - 30 * DAY).abs() < 3600);
    for name in [
        "a.example.com",
        "b.example.com",
        "c.example.com",
        "10.1.2.3",
    ] {
        assert!(verifies(&out, name), "{name}");
        assert!(stderr(&second).contains(name), "{}", stderr(&second));
    }

    // --force makes a new CA.
    let third = run(&["certs", "--out", o, "--force"]);
    assert!(third.status.success());
    assert_ne!(read(&out.join("ca.crt")), ca);
    assert!(verifies(&out, "localhost"));
}

#[cfg(unix)]
#[test]
fn keys_are_private_even_when_the_file_was_there() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    for file in ["tls.key", "ca.key"] {
        std::fs::write(dir.path().join(file), "old").unwrap();
        std::fs::set_permissions(
            dir.path().join(file),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let out = run(&["certs", "--out", dir.path().to_str().unwrap(), "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in ["tls.key", "ca.key"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn certs_refuse_what_cannot_be_a_name_and_a_ca_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().to_str().unwrap();
    let out = run(&["certs", "--out", o, "--dns", "ok.example.com", "not_a_name"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\"not_a_name\" is neither a DNS name nor an IP address"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("tls.crt").exists(), "nothing written");
    assert!(run(&["certs", "--out", o]).status.success());
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let out = run(&["certs", "--out", o]);
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(
        said.contains("ca.crt is there without its key") && said.contains("--force"),
        "{said}"
    );
}

#[test]
fn serve_with_a_broken_table_makes_no_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("table.yaml"), "mirrors: [").unwrap();
    let out = binary()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--config", "table.yaml"])
        .current_dir(dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("IMAGE_MIRROR_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("table.yaml"), "{}", stderr(&out));
    assert!(!dir.path().join("certs").exists(), "certificates were made");
}
