//! What the integration tests share: real registries on loopback ([`registry`]), reviews,
//! fixtures and a webhook to send them to ([`webhook`]), and a real API server ([`envtest`]).
#![allow(dead_code)]

pub mod aws;
pub mod envtest;
pub mod header_proxy;
pub mod helm;
pub mod python;
pub mod registry;
pub mod strategies;
pub mod webhook;

#[allow(unused_imports)]
pub use header_proxy::RateLimitProxy;
#[allow(unused_imports)]
pub use registry::*;
#[allow(unused_imports)]
pub use webhook::*;

/// The binary's `serve` on loopback ports the system chooses, logging JSON, with this
/// certificate, key and table; a caller adds its own flags and environment.
pub fn serve_command(
    cert: &std::path::Path,
    key: &std::path::Path,
    table: &std::path::Path,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_image-mirror-webhook"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .args(["--log-format", "json"])
    .arg("--tls-cert")
    .arg(cert)
    .arg("--tls-key")
    .arg(key)
    .arg("--config")
    .arg(table);
    cmd
}

/// The admission and metrics addresses from `serve`'s JSON "serving" line; `None` for any
/// other line.
pub fn serving_addrs(line: &str) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["msg"] != "serving" {
        return None;
    }
    let addr = |key: &str| v[key].as_str()?.parse().ok();
    Some((addr("addr")?, addr("metricsAddr")?))
}

/// Starts `serve` from `cmd` (from [`serve_command`]) quiet but for warnings and its startup
/// line, and waits at most a minute for that line: the admission and metrics addresses. The
/// rest of its standard error is drained; the process dies with the returned handle.
pub async fn start_serve(
    cmd: std::process::Command,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::from(cmd)
        .env("RUST_LOG", "warn,image_mirror_webhook::app=info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let addrs = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addrs) = serving_addrs(&line) {
                return Some(addrs);
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        None
    })
    .await;
    let Ok(Some((addr, metrics_addr))) = addrs else {
        panic!("serve did not say where it listens within a minute; it said:\n{seen}");
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr, metrics_addr)
}

/// One sample of a Prometheus scrape (0 when absent); `series` as written, labels included.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
}

/// The resident memory of process `pid`, in MiB (0 when it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Waits for an event: polls `f` every 20 ms until it gives something, and fails after `secs`
/// saying `what` did not happen. The one polling loop of the tests that run without envtest
/// (`envtest::Hook::eventually` adds the webhook's log to the failure).
pub async fn until<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits out `d` to show that something did *not* happen: the one fixed pause the tests take,
/// used only where no event (a metric, a log line, a watch, a registry's count) can show an
/// absence, or where the product itself waits a set time. `why` names what is waited out.
pub async fn quiet_period(d: std::time::Duration, why: &str) {
    eprintln!("waiting {d:?}: {why}");
    tokio::time::sleep(d).await;
}

/// [`quiet_period`] for a test without a runtime.
pub fn quiet_period_blocking(d: std::time::Duration, why: &str) {
    eprintln!("waiting {d:?}: {why}");
    std::thread::sleep(d);
}

/// Runs `cmd` with `stdin` written to its standard input (none without), and collects its
/// output.
pub fn output_with_input(
    cmd: &mut std::process::Command,
    stdin: Option<&str>,
) -> std::io::Result<std::process::Output> {
    use std::io::Write as _;
    use std::process::Stdio;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes())?;
    }
    child.wait_with_output()
}

pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// One JSON log line, refused when any object in it has a key twice (serde_json's `Value`
/// would keep the last silently, as jq, Loki and Elasticsearch do).
pub fn strict_json(line: &str) -> Result<serde_json::Value, String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Strict;
    impl<'de> DeserializeSeed<'de> for Strict {
        type Value = serde_json::Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Strict {
        type Value = serde_json::Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(key) = map.next_key::<String>()? {
                let value = map.next_value_seed(Strict)?;
                if out.insert(key.clone(), value).is_some() {
                    return Err(serde::de::Error::custom(format!("key {key:?} twice")));
                }
            }
            Ok(serde_json::Value::Object(out))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element_seed(Strict)? {
                out.push(v);
            }
            Ok(serde_json::Value::Array(out))
        }
        fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(serde_json::Value::Null)
        }
    }
    let mut d = serde_json::Deserializer::from_str(line);
    Strict
        .deserialize(&mut d)
        .map_err(|e| format!("{e}: {line}"))
}

/// Every line of a JSON log: no key twice, klog's keys (`ts`, `level`, `msg`, `logger`) on each,
/// and every line about a review names it (`uid`) and its Pod (`pod: {name, namespace}`).
pub fn check_json_log(log: &str) {
    let mut reviews = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v = strict_json(line).unwrap_or_else(|e| panic!("{e}"));
        for key in ["ts", "level", "msg", "logger"] {
            assert!(v.get(key).is_some(), "no {key}: {line}");
        }
        assert!(
            v.get("error").is_none() && v.get("message").is_none(),
            "{line}"
        );
        if v.get("uid").is_some() {
            reviews += 1;
            assert!(
                v["pod"]["name"].is_string() && v["pod"]["namespace"].is_string(),
                "a review line without its Pod: {line}"
            );
        }
        if ["admission", "copy queued", "refused (strict)"]
            .contains(&v["msg"].as_str().unwrap_or(""))
        {
            assert!(
                v.get("uid").is_some(),
                "a review line without its uid: {line}"
            );
        }
    }
    assert!(reviews > 0, "no review was logged:\n{log}");
}

/// A copy of the directory tree `from` at `to`, symlinks as symlinks (a test edits the copy).
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if meta.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `kubectl kustomize` of a directory: the rendered YAML (the machine's kubectl, offline).
pub fn kustomize_text(dir: &std::path::Path) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl is on the machine");
    assert!(
        out.status.success(),
        "kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// [`kustomize_text`] as objects.
pub fn kustomize(dir: &std::path::Path) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple(&kustomize_text(dir)).unwrap()
}
