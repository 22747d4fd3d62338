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

/// `check-config` on `yaml`: its exit code, standard output and standard error.
fn check_config(yaml: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = binary()
        .arg("check-config")
        .arg(&path)
        .args(extra)
        .env_remove("IMAGE_MIRROR_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "table.yaml"),
    )
}

const MIRROR: &str =
    "mirrors:\n  m: {type: repository, registry: r.io, prefix: p, naming: preserve}\n";
const ECR: &str = "mirrors:\n  e: {type: pull-through, registry: 1.dkr.ecr.eu-west-1.amazonaws.com, upstreams: {docker.io: docker-hub}}\n";

/// Tables that cannot work are refused, each problem said once, on its field, with what to do.
#[test]
fn check_config_refuses_every_broken_table() {
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "table.yaml: the table is empty"),
        ("# only a comment\n".into(), "table.yaml: the table is empty"),
        (
            format!("{MIRROR}rules:\n  - {{name: a, match: [\"docker.io/**\"], mirror: m}}\n  - {{name: a, match: [\"quay.io/**\"], mirror: m}}\n"),
            "table.yaml:5: rules[1].name: \"a\" is the name of rules[0] too",
        ),
        (
            format!("{MIRROR}rules:\n  - {{match: [nginx], mirror: m}}\n"),
            "table.yaml:4: rules[0].match[0]: \"nginx\" can never match: globs match normalized names, which begin with a registry (docker.io/library/nginx); did you mean \"docker.io/library/nginx\"?",
        ),
        (
            format!("{MIRROR}rules:\n  - {{match: [\"grafana/*\"], mirror: m}}\n"),
            "did you mean \"docker.io/grafana/*\"?",
        ),
        (
            format!("{ECR}rules:\n  - {{match: [\"quay.io/**\"], mirror: e}}\n"),
            "table.yaml:4: rules[0].match[0]: mirror e has no cache prefix for quay.io",
        ),
        (
            "mirrors:\n  e: {type: pull-through, registry: 1.dkr.ecr.eu-west-1.amazonaws.com, upstreams: {docker.io: }}\n".into(),
            "mirrors.e.upstreams.docker.io: has no cache prefix",
        ),
        ("checks: {timeout: 0s}\n".into(), "table.yaml:1: checks.timeout: must be more than 0"),
        (
            "registries:\n  \"r.io:99999\": {insecure: true}\n".into(),
            "table.yaml:2: registries.r.io:99999: port 99999 is out of range (1-65535)",
        ),
        (
            "mirrors:\n  m: {type: repository, registry: \"r.io:0\", prefix: p}\n".into(),
            "mirrors.m.registry: port 0 is out of range",
        ),
        (
            "namespaces: {exclude: [Kube_System]}\n".into(),
            "table.yaml:1: namespaces.exclude[0]: \"Kube_System\" is not a namespace name",
        ),
        (
            "mirrors:\n  m: {type: repository, registry: r.io, prefix: p, platforms: [linux/amd65]}\n".into(),
            "mirrors.m.platforms[0]: invalid platform \"linux/amd65\": unknown architecture \"amd65\"",
        ),
        (
            "mirrors:\n  m: {type: repository, registry: r.io, prefix: p, platforms: [linux/arm64/v7]}\n".into(),
            "unknown variant \"v7\"",
        ),
        (
            format!("{MIRROR}rules:\n  - name: x\n    mirror: m\n"),
            "table.yaml:4: rules[0].match: missing: the globs the rule applies to",
        ),
        (
            format!("{MIRROR}mirrors: {{}}\n"),
            "table.yaml:3: mirrors: key \"mirrors\" appears twice in this mapping; keep one",
        ),
        (
            "images:\n  - {source: \"a@sha256:123\", target: \"r.io/p/a\"}\n".into(),
            "images[0].source: invalid digest \"sha256:123\": a sha256 digest is 64 hexadecimal characters, not 3",
        ),
    ];
    for (yaml, want) in &cases {
        let (code, out, err) = check_config(yaml, &[]);
        assert_eq!(code, Some(1), "{yaml}\n{out}{err}");
        assert!(err.contains(want), "{yaml}\nwant {want:?}\ngot {err}");
        // No advice to the programmer of a library the user never called.
        assert!(
            !err.contains("DuplicateKeyPolicy") && !err.contains("Option<"),
            "{err}"
        );
    }
}

/// One run reports every problem in the file, each once, with file, line and field.
#[test]
fn check_config_reports_every_problem_at_once() {
    let yaml = format!(
        "{MIRROR}rules:\n  - match: [\"docker.io/**\"]\n    mirror: nope\n    swap: sometimes\n    copy: often\n"
    );
    let (code, _, err) = check_config(&yaml, &[]);
    assert_eq!(code, Some(1));
    for want in [
        "table.yaml:5: rules[0].mirror: unknown mirror \"nope\"; the table's mirrors: m",
        "table.yaml:6: rules[0].swap: \"sometimes\" is not one of always, if-present",
        "table.yaml:7: rules[0].copy: \"often\" is not one of on-demand, off",
        "table.yaml: 3 problem(s)",
    ] {
        assert_eq!(err.matches(want).count(), 1, "{want}\n{err}");
    }
}

/// What is valid but probably not meant is a warning: exit 0, unless --strict.
#[test]
fn check_config_warns_and_strict_refuses_warnings() {
    let yaml = format!("{MIRROR}images:\n  - {{source: nginx:1, target: other.io/x/nginx:1}}\n");
    let (code, out, err) = check_config(&yaml, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("warning: table.yaml:4: images[0].target: other.io/x/nginx:1 lies under no mirror's registry/prefix"),
        "{err}"
    );
    let (code, _, err) = check_config(&yaml, &["--strict"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("1 warning(s), refused with --strict"), "{err}");
}

/// `--config` and IMAGE_MIRROR_CONFIG as for every other command; the summary names every
/// setting that changes what the webhook does.
#[test]
fn check_config_takes_the_table_as_other_commands_do_and_says_every_setting() {
    let table = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/components/ghcr/config.yaml"
    );
    for how in [
        binary()
            .args(["check-config", "--config", table])
            .output()
            .unwrap(),
        binary()
            .arg("check-config")
            .env("IMAGE_MIRROR_CONFIG", table)
            .output()
            .unwrap(),
    ] {
        let out = String::from_utf8_lossy(&how.stdout);
        assert!(how.status.success(), "{out}{}", stderr(&how));
        for setting in [
            "swap=if-present copy=on-demand platforms=all referrers=true pin=tag",
            "swap=if-present copy=off",
            "docker.io                credentials: environment DOCKERHUB_USERNAME and DOCKERHUB_TOKEN",
            "rateLimitReserve=20",
            "checks: presentTtl=10m absentTtl=30s unknownTtl=15s timeout=1s",
            "copies: concurrency=4 queueSize=256 retryBackoff=30s maxAttempts=6 maxImageSize=4.0 GiB runner=in-process",
            "timeouts: connect=5s response=10s idle=30s",
            "pull secrets go to: every opted-in namespace",
        ] {
            assert!(out.contains(setting), "{setting}\n{out}");
        }
    }
}

/// Every boolean variable takes the usual spellings, and a bad one is named as it was given.
#[test]
fn boolean_variables_take_the_usual_spellings() {
    for value in ["1", "true", "yes", "on", "0", "false", "no", "off"] {
        let out = binary()
            .args(["serve", "--help"])
            .env("IMAGE_MIRROR_STRICT", value)
            .output()
            .unwrap();
        assert!(out.status.success(), "{value}: {}", stderr(&out));
    }
    let dir = tempfile::tempdir().unwrap();
    let out = binary()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("IMAGE_MIRROR_STRICT", "maybe")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("\"maybe\" is not a boolean for --strict or IMAGE_MIRROR_STRICT"),
        "{}",
        stderr(&out)
    );
    // And `explain -o json` as the help says.
    let out = run(&["explain", "-o", "json", "nginx"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.is_array() || v.is_object(), "{v}");
}

/// The README is a contract: every complete table in it passes `check-config`, and its
/// Commands section is what each command's `-h` says.
#[test]
fn the_readme_tables_pass_check_config_and_its_commands_are_the_binary_s() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut tables = 0;
    for block in readme.split("```yaml").skip(1) {
        let (info, rest) = block.split_once('\n').unwrap();
        let body = rest.split("```").next().unwrap();
        // Fragments say so; Kubernetes manifests are not tables.
        if info.trim() == "fragment" || body.contains("apiVersion:") {
            continue;
        }
        // A block in a list item is indented as a whole.
        let indent = body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let body: String = body
            .lines()
            .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
            .collect();
        let (code, out, err) = check_config(&body, &[]);
        assert_eq!(
            code,
            Some(0),
            "a README table is refused:\n{body}\n{out}{err}"
        );
        tables += 1;
    }
    assert!(tables >= 1, "no table found in the README");
    for command in [
        "serve",
        "certs",
        "explain",
        "check-config",
        "copy",
        "sync",
        "export-policy",
        "crd",
        "declare",
    ] {
        let out = binary().args([command, "-h"]).env_clear().output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        let block = format!("### `{command}`\n\n```text\n{}\n```", help.trim_end());
        assert!(
            readme.contains(&block),
            "README's Commands section differs from `{command} -h`; it should read:\n{block}"
        );
    }
}

/// `declare` turns the table's exact entries into declared MirroredImage objects (no
/// `recorded-by` label, `retain`, the `--refresh` given), named as the webhook names them.
#[test]
fn declare_prints_the_exact_entries_as_declared_objects() {
    use image_mirror_webhook::cluster::images::crd::{object_name, MirroredImage};
    use image_mirror_webhook::Reference;
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table.yaml");
    std::fs::write(
        &table,
        "images:\n  - source: nginx:1.27\n    target: ghcr.io/acme/mirror/nginx:1.27\n\
         \x20 - source: docker.io/grafana/grafana:12.1.0\n    target: ghcr.io/acme/mirror/grafana:12.1.0\n",
    )
    .unwrap();
    let out = binary()
        .args(["declare", "--refresh", "6h", "--config"])
        .arg(&table)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let objects: Vec<MirroredImage> =
        serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(objects.len(), 2);
    for o in &objects {
        let target = o.spec.target.as_deref().unwrap();
        assert!(target.starts_with("ghcr.io/acme/mirror/"), "{target}");
        assert_eq!(
            o.metadata.name.as_deref().unwrap(),
            object_name(
                &Reference::parse(&o.spec.source).unwrap(),
                &Reference::parse(target).unwrap()
            )
        );
        assert!(o.metadata.labels.is_none() && o.spec.retain);
        assert_eq!(o.spec.refresh.as_deref(), Some("6h"));
    }
    assert!(
        stderr(&out).contains("2 declared image(s)"),
        "{}",
        stderr(&out)
    );
    let bad = binary()
        .args(["declare", "--refresh", "soon", "--config"])
        .arg(&table)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--refresh: invalid duration \"soon\""),
        "{}",
        stderr(&bad)
    );
}
