//! What the integration tests share: real registries on loopback ([`registry`]), reviews,
//! fixtures and a webhook to send them to ([`webhook`]), and a real API server ([`envtest`]).
#![allow(dead_code)]

pub mod envtest;
pub mod header_proxy;
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
    if v["message"] != "serving" {
        return None;
    }
    let addr = |key: &str| v[key].as_str()?.parse().ok();
    Some((addr("addr")?, addr("metrics_addr")?))
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
