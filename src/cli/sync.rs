//! `copy` and `sync`: one image, or every exact entry of the table, copied to its mirror ahead
//! of time (the GHCR runbook's weekly mirroring job).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};

use super::{init_tracing, runtime, CopyArgs, LogFormat, SyncArgs, TimeoutArgs};
use crate::error::Report;
use crate::mapping::{Decision, Table};
use crate::mirror::{CopyMode, CopyRequest, COPY_PERMANENT_FAILURE};
use crate::reference::Reference;
use crate::registry::{CopyReport, Failure, Progress, Registries};
use crate::settings::Settings;

fn registries(settings: Arc<Settings>, insecure: &[String], timeouts: &TimeoutArgs) -> Registries {
    let options = crate::registry::RegistryOptions {
        timeouts: Some(timeouts.over(settings.timeouts)),
        ..Default::default()
    };
    let mut registries = Registries::new(settings, options, None);
    for host in insecure {
        registries.allow_insecure(host);
    }
    registries
}

pub(super) fn copy(args: &CopyArgs) -> anyhow::Result<ExitCode> {
    init_tracing(LogFormat::Text);
    let config = crate::config::load(args.config.as_deref())?;
    let parse = |what: &str, s: &str| {
        Reference::parse(s).with_context(|| format!("{what} {s:?} is not an image reference"))
    };
    let target = parse("target", &args.target)?;
    // A pull-through cache is not pushed into: one pull through it makes it fetch the image.
    let warm_up = config
        .table
        .mirror_of_target(&target)
        .is_some_and(|m| m.is_pull_through());
    let request = CopyRequest {
        source: parse("source", &args.source)?,
        target,
        platforms: args.platforms.clone(),
        referrers: !args.no_referrers,
        mode: if warm_up {
            CopyMode::WarmUp
        } else {
            CopyMode::Copy
        },
    };
    let registries = registries(config.settings, &args.insecure_registries, &args.timeouts);
    let runtime = runtime()?;
    let started = std::time::Instant::now();
    // The budget before the copy (a HEAD, which Docker Hub does not count).
    let budget = runtime.block_on(registries.rate_limit(&request.source));
    let bar = byte_progress();
    let work = request.run(&registries, bar.as_ref().map(|(_, p)| p.clone()));
    let report = runtime.block_on(work);
    if let Some((bar, _)) = bar {
        bar.finish_and_clear();
    }
    let report = match report {
        Ok(report) => report,
        Err(e) if e.permanent() => {
            eprintln!("error: {}", Report(&e));
            return Ok(ExitCode::from(COPY_PERMANENT_FAILURE));
        }
        Err(e) => return Err(e.into()),
    };
    let (source, target) = (&request.source, &request.target);
    if warm_up {
        println!("warmed up {target} (pull-through cache of {source})");
        println!("  digest:    {}", report.digest);
        return Ok(ExitCode::SUCCESS);
    }
    print_report(
        &mut std::io::stdout().lock(),
        source,
        target,
        &report,
        started.elapsed(),
    )?;
    if let Some(b) = budget {
        let window = b
            .window
            .map(|w| format!(" per {}", humantime_secs(w.as_secs())))
            .unwrap_or_default();
        let limit = b.limit.map(|l| format!(" of {l}")).unwrap_or_default();
        println!(
            "  budget:    {} pulls left{limit}{window} at {} before the copy",
            b.remaining,
            request.source.canonical().registry()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn sync(args: &SyncArgs) -> anyhow::Result<ExitCode> {
    init_tracing(LogFormat::Text);
    let config = crate::config::load(args.config.as_deref())?;
    let concurrency = config.settings.copies.concurrency;
    let registries = registries(
        config.settings.clone(),
        &args.insecure_registries,
        &args.timeouts,
    );
    let runtime = runtime()?;
    let mut out = std::io::stdout();
    let failures = runtime.block_on(sync_all(
        &registries,
        &config.table,
        concurrency,
        SyncFlags {
            refresh: args.refresh,
            dry_run: args.dry_run,
            no_referrers: args.no_referrers,
        },
        &mut out,
    ))?;
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // Each failure was printed on its own line, with why.
    Ok(ExitCode::FAILURE)
}

/// Images a dry run asks about at once (at least; `copies.concurrency` when larger).
const DRY_RUN_AT_ONCE: usize = 32;

/// What happened to one image.
#[derive(Debug)]
pub enum SyncOutcome {
    UpToDate,
    Copied(CopyReport),
    WarmedUp,
    /// `--dry-run`: what would have been done.
    WouldCopy(&'static str),
    Failed(String),
}

/// Every exact entry of the table that names one image, as the copy that fills its mirror.
pub fn sync_items(table: &Table) -> Vec<CopyRequest> {
    let mut items: Vec<CopyRequest> = Vec::new();
    for entry in table.entries() {
        let Some(source) = entry.concrete_source() else {
            continue;
        };
        if let Decision::Rewrite(rw) = table.decide(source.as_str()) {
            if !items.iter().any(|i| i.target == rw.target) {
                items.push(CopyRequest::for_rewrite(&rw));
            }
        }
    }
    items
}

/// Brings one image up to date.
pub async fn sync_one(
    registries: &Registries,
    item: &CopyRequest,
    refresh: bool,
    dry_run: bool,
    progress: Option<Progress>,
) -> SyncOutcome {
    fn fail(e: &(dyn std::error::Error + 'static)) -> SyncOutcome {
        SyncOutcome::Failed(Report(e).to_string())
    }
    let have = match registries.manifest_digest(&item.target).await {
        Ok(d) => Some(d),
        Err(e) if e.failure() == Some(Failure::NotFound) => None,
        Err(e) => return fail(&e),
    };
    if item.mode == CopyMode::WarmUp {
        return match (have, dry_run) {
            (Some(_), _) => SyncOutcome::UpToDate,
            (None, true) => SyncOutcome::WouldCopy("would warm up"),
            (None, false) => match item.run(registries, None).await {
                Ok(_) => SyncOutcome::WarmedUp,
                Err(e) => fail(&e),
            },
        };
    }
    let would = match have {
        None => "would copy (missing)",
        Some(_) if !refresh || item.source.digest().is_some() => return SyncOutcome::UpToDate,
        Some(have) => match registries.manifest_digest(&item.source).await {
            // Signatures made since the last copy still come along.
            Ok(upstream) if upstream == have && item.referrers && !dry_run => {
                return match item.run(registries, progress).await {
                    Ok(report) if report.referrers > 0 => SyncOutcome::Copied(report),
                    Ok(_) => SyncOutcome::UpToDate,
                    Err(e) => fail(&e),
                };
            }
            // A platform-filtered copy has its own index digest, so it is compared by copying:
            // the copy skips every blob and manifest the target already has.
            Ok(upstream) if upstream == have => return SyncOutcome::UpToDate,
            Ok(_) => "would copy (upstream digest moved)",
            Err(e) => return fail(&e),
        },
    };
    if dry_run {
        return SyncOutcome::WouldCopy(would);
    }
    match item.run(registries, progress).await {
        Ok(report) => SyncOutcome::Copied(report),
        Err(e) => fail(&e),
    }
}

/// `sync`'s switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncFlags {
    /// Also re-copy tags whose upstream digest moved (and bring new signatures).
    pub refresh: bool,
    pub dry_run: bool,
    pub no_referrers: bool,
}

/// `sync`: every item, `concurrency` at a time; a bar on a terminal, a line per image otherwise.
/// Returns the images that failed.
pub async fn sync_all(
    registries: &Registries,
    table: &Table,
    concurrency: usize,
    flags: SyncFlags,
    out: &mut (dyn Write + Send),
) -> std::io::Result<Vec<(CopyRequest, String)>> {
    let SyncFlags {
        refresh,
        dry_run,
        no_referrers,
    } = flags;
    let mut items = sync_items(table);
    if no_referrers {
        for item in &mut items {
            item.referrers = false;
        }
    }
    let skipped = table.entries().len() - items.len();
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(items.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} images  {msg}  [{elapsed}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut results = futures::stream::iter(items.iter())
        .map(|item| async move {
            // A panic inside a library fails this image, not the whole run.
            let work = sync_one(registries, item, refresh, dry_run, None);
            let outcome = std::panic::AssertUnwindSafe(work)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| SyncOutcome::Failed("internal error (panic)".into()));
            (item, outcome)
        })
        // A dry run only asks, and asks every registry at once: a silent one then costs the run
        // one timeout, not one per image.
        .buffer_unordered(if dry_run {
            concurrency.max(DRY_RUN_AT_ONCE)
        } else {
            concurrency
        });
    let mut failures = Vec::new();
    let (mut copied, mut current, mut bytes, mut would) = (0usize, 0usize, 0u64, 0usize);
    while let Some((item, outcome)) = results.next().await {
        let line = match &outcome {
            SyncOutcome::UpToDate => {
                current += 1;
                format!("up to date  {}", item.target)
            }
            SyncOutcome::WarmedUp => {
                copied += 1;
                format!("warmed up   {}", item.target)
            }
            SyncOutcome::Copied(r) => {
                copied += 1;
                bytes += r.bytes;
                let tag = r.tag_left.as_ref().map_or(String::new(), |t| {
                    format!("; tag {} left alone: {}", t.tag, t.why)
                });
                format!(
                    "copied      {} → {} ({} blobs, {} skipped, {}{tag})",
                    item.source,
                    item.target,
                    r.blobs_copied,
                    r.blobs_skipped,
                    human_bytes(r.bytes)
                )
            }
            SyncOutcome::WouldCopy(what) => {
                would += 1;
                format!("{what}  {} → {}", item.source, item.target)
            }
            SyncOutcome::Failed(why) => {
                failures.push((item.clone(), why.clone()));
                format!("FAILED      {} → {}: {why}", item.source, item.target)
            }
        };
        match &bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(item.target.familiar());
                if matches!(outcome, SyncOutcome::Failed(_)) {
                    bar.println(&line);
                }
            }
            None => writeln!(out, "{line}")?,
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let left = if skipped > 0 {
        format!("; {skipped} entries name no single image (tag globs, any tag) and were left")
    } else {
        String::new()
    };
    let took = started.elapsed().as_secs_f64();
    if dry_run {
        writeln!(
            out,
            "{} images: {would} would be copied, {current} up to date, {} could not be asked \
             (dry run, {took:.1} s){left}",
            items.len(),
            failures.len(),
        )?;
    } else {
        writeln!(
            out,
            "{} images: {copied} copied, {current} up to date, {} failed ({} moved in {took:.1} s){left}",
            items.len(),
            failures.len(),
            human_bytes(bytes),
        )?;
    }
    Ok(failures)
}

/// The `copy` command's report.
pub fn print_report(
    out: &mut dyn Write,
    source: &Reference,
    target: &Reference,
    r: &CopyReport,
    took: Duration,
) -> std::io::Result<()> {
    writeln!(out, "copied {source} → {target}")?;
    writeln!(out, "  digest:    {}", r.digest)?;
    if !r.platforms.is_empty() {
        writeln!(
            out,
            "  platforms: {}{}",
            r.platforms.join(", "),
            if r.filtered {
                " (index rebuilt for these)"
            } else {
                ""
            }
        )?;
    }
    if let Some(left) = &r.tag_left {
        writeln!(
            out,
            "  tag:       {} left alone ({}); the image is on the mirror by digest only",
            left.tag, left.why
        )?;
    }
    writeln!(
        out,
        "  manifests: {} copied, {} already there",
        r.manifests_copied, r.manifests_skipped
    )?;
    writeln!(
        out,
        "  blobs:     {} copied, {} already there",
        r.blobs_copied, r.blobs_skipped
    )?;
    writeln!(
        out,
        "  referrers: {} copied (signatures, attestations, SBOMs, OCI referrers)",
        r.referrers
    )?;
    let secs = took.as_secs_f64().max(0.001);
    writeln!(
        out,
        "  bytes:     {} ({} B) in {:.2} s, {}/s",
        human_bytes(r.bytes),
        r.bytes,
        secs,
        human_bytes((r.bytes as f64 / secs) as u64)
    )
}

/// `21600` → `6h`, `90` → `90s`.
fn humantime_secs(secs: u64) -> String {
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A byte counter for a terminal progress bar while one image copies.
pub fn byte_progress() -> Option<(indicatif::ProgressBar, Progress)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {bytes} copied ({bytes_per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let counter = bar.clone();
    Some((bar, Arc::new(move |n| counter.inc(n))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(300 * 1024 * 1024), "300.0 MiB");
    }

    #[test]
    fn sync_covers_exact_entries_only() {
        let table = crate::config::Config::parse(
            "t.yaml",
            r#"
mirrors:
  m: {type: repository, registry: mirror.local, prefix: p, naming: flatten}
  ecr:
    type: pull-through
    registry: 1.dkr.ecr.eu-west-1.amazonaws.com
    upstreams: {quay.io: quay}
images:
  - {source: "nginx:1.27", target: "mirror.local/p/nginx:1.27"}
  - {source: "busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000", target: "mirror.local/p/busybox"}
  - {source: "redis:7-*", target: "mirror.local/p/redis:7-*"}
  - {source: "grafana/loki", target: "mirror.local/p/loki"}
  - {source: "quay.io/prometheus/node-exporter:v1.8.0", target: "1.dkr.ecr.eu-west-1.amazonaws.com/quay/prometheus/node-exporter:v1.8.0"}
"#,
        ).map(|c| c.table)
        .unwrap();
        let items = sync_items(&table);
        let names: Vec<(String, String, bool)> = items
            .iter()
            .map(|i| {
                let warm_up = i.mode == CopyMode::WarmUp;
                (i.source.to_string(), i.target.to_string(), warm_up)
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("docker.io/library/nginx:1.27".into(), "mirror.local/p/nginx:1.27".into(), false),
                (
                    "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
                    "mirror.local/p/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
                    false
                ),
                (
                    "quay.io/prometheus/node-exporter:v1.8.0".into(),
                    "1.dkr.ecr.eu-west-1.amazonaws.com/quay/prometheus/node-exporter:v1.8.0".into(),
                    true
                ),
            ]
        );
    }
}
