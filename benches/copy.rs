//! Copy throughput and memory against real loopback registries (Debian's `docker-registry`):
//! our `copy` against `skopeo copy --all` on the same image, a second copy that must move no
//! blob bytes, and peak RSS while copying a 1 GiB layer. Needs `docker-registry`, `skopeo` and
//! GNU `time` (`scripts/test.sh` installs the first two). Run: `cargo bench --bench copy`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::{Registry, TestImage};

const MIB: usize = 1024 * 1024;

struct Run {
    seconds: f64,
    max_rss_kib: u64,
    stdout: String,
}

/// Runs a command under GNU time; wall seconds and peak RSS.
fn timed(program: &str, args: &[String]) -> Run {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M", "--"])
        .arg(program)
        .args(args)
        .output()
        .expect("GNU time is installed (Debian package `time`)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} failed: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let mut it = last.split_whitespace();
    let seconds = it.next().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    let max_rss_kib = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Run {
        seconds,
        max_rss_kib,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

fn ours(src: &Registry, dst: &Registry, from: &str, to: &str) -> Run {
    ours_with(src, dst, from, to, None)
}

/// With `table`, the registries' settings come from it (e.g. `uploadMode`).
fn ours_with(
    src: &Registry,
    dst: &Registry,
    from: &str,
    to: &str,
    table: Option<&std::path::Path>,
) -> Run {
    let mut args = vec![
        "copy".to_string(),
        format!("{}/{from}", src.host()),
        format!("{}/{to}", dst.host()),
        "--insecure-registry".into(),
        src.host(),
        "--insecure-registry".into(),
        dst.host(),
    ];
    if let Some(t) = table {
        args.push("--config".into());
        args.push(t.display().to_string());
    }
    timed(env!("CARGO_BIN_EXE_image-mirror-webhook"), &args)
}

fn skopeo(src: &Registry, dst: &Registry, from: &str, to: &str) -> Run {
    let args = vec![
        "copy".to_string(),
        "--all".into(),
        "--quiet".into(),
        "--src-tls-verify=false".into(),
        "--dest-tls-verify=false".into(),
        format!("docker://{}/{from}", src.host()),
        format!("docker://{}/{to}", dst.host()),
    ];
    timed("skopeo", &args)
}

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB as f64 / seconds
}

#[tokio::main]
async fn main() {
    common::init();
    let upstream = Registry::plain();
    let image = TestImage::generate(&["linux/amd64", "linux/arm64"], 300 * MIB);
    let total = image.total_bytes();
    upstream.push("bench/big", "1", &image).await;
    println!(
        "image: 2 platforms, {:.1} MiB of blobs",
        total as f64 / MIB as f64
    );

    // Each round copies into fresh registries, so neither tool finds anything in place.
    let mut ratios = Vec::new();
    let mut rss = Vec::new();
    let mut skopeo_rss = Vec::new();
    for round in 1..=3 {
        let (a, b) = (Registry::plain(), Registry::plain());
        let s = skopeo(&upstream, &b, "bench/big:1", "mirror/big:1");
        let o = ours(&upstream, &a, "bench/big:1", "mirror/big:1");
        println!(
            "round {round}: ours {:.2} s ({:.0} MiB/s, peak RSS {} MiB); skopeo copy --all {:.2} s ({:.0} MiB/s, peak RSS {} MiB); ratio {:.2}",
            o.seconds,
            mib_per_s(total, o.seconds),
            o.max_rss_kib / 1024,
            s.seconds,
            mib_per_s(total, s.seconds),
            s.max_rss_kib / 1024,
            s.seconds / o.seconds
        );
        ratios.push(s.seconds / o.seconds);
        rss.push(o.max_rss_kib / 1024);
        skopeo_rss.push(s.max_rss_kib / 1024);
        let again = ours(&upstream, &a, "bench/big:1", "mirror/big:1");
        let moved = again
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with("bytes:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        println!("round {round}: second copy {:.2} s, {moved}", again.seconds);

        let c = Registry::plain();
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("table.yaml");
        std::fs::write(
            &table,
            format!("registries:\n  \"{}\": {{uploadMode: chunked}}\n", c.host()),
        )
        .unwrap();
        let m = ours_with(&upstream, &c, "bench/big:1", "mirror/big:1", Some(&table));
        println!(
            "round {round}: ours with uploadMode: chunked {:.2} s ({:.0} MiB/s, peak RSS {} MiB)",
            m.seconds,
            mib_per_s(total, m.seconds),
            m.max_rss_kib / 1024
        );
    }

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    rss.sort_unstable();
    skopeo_rss.sort_unstable();
    println!(
        "median of 3: ours {:.2}x skopeo copy --all (target ≥ 1.5x); peak RSS {} MiB against skopeo's {} MiB",
        median(&mut ratios),
        rss[1],
        skopeo_rss[1]
    );

    drop(image);
    let huge = TestImage::generate(&["linux/amd64"], 1024 * MIB);
    upstream.push("bench/huge", "1", &huge).await;
    drop(huge);
    let dst = Registry::plain();
    let o = ours(&upstream, &dst, "bench/huge:1", "mirror/huge:1");
    println!(
        "1 GiB layer: ours {:.2} s, peak RSS {} MiB (target ≤ 64 MiB)",
        o.seconds,
        o.max_rss_kib / 1024
    );
}
