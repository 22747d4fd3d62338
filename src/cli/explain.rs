//! `explain` and `check-config`: what an image would become and why, and whether a table is
//! valid.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;

use super::{ExplainArgs, ExportArgs, OutputFormat};
use crate::config::Config;
use crate::export::Export;
use crate::mapping::{Decision, KeepReason, MirrorKind, SwapPolicy, Table};

/// One `explain` result; the JSON field names are part of the CLI's contract.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub input: String,
    pub valid: bool,
    pub error: Option<String>,
    pub normalized: Option<String>,
    pub registry: Option<String>,
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub familiar: Option<String>,
    pub target: Option<String>,
    pub mirror: Option<String>,
    pub matched: Option<String>,
    pub reason: Option<String>,
    /// Whether `export-policy`'s MutatingAdmissionPolicy makes this rewrite (null when the
    /// image is not rewritten), and why not.
    pub exportable: Option<bool>,
    pub not_exportable: Option<String>,
}

impl Explanation {
    pub fn new(input: &str, table: &Table) -> Self {
        Explanation::with_export(input, table, &Export::of(table))
    }

    /// [`Explanation::new`] with the table's export worked out once for many images.
    pub fn with_export(input: &str, table: &Table, export: &Export) -> Self {
        let decision = table.decide(input);
        let source = decision.source();
        let mut e = Explanation {
            input: input.to_string(),
            valid: source.is_some(),
            error: None,
            normalized: source.map(ToString::to_string),
            registry: source.map(|s| s.registry().to_string()),
            repository: source.map(|s| s.path().to_string()),
            tag: source.and_then(|s| s.tag()).map(str::to_string),
            digest: source.and_then(|s| s.digest()).map(str::to_string),
            familiar: source.map(|s| s.familiar()),
            target: None,
            mirror: None,
            matched: None,
            reason: None,
            exportable: None,
            not_exportable: None,
        };
        if let Some(verdict) = crate::export::explain(export, table, input) {
            e.exportable = Some(verdict.is_ok());
            e.not_exportable = verdict.err();
        }
        match &decision {
            Decision::Rewrite(rw) => {
                e.target = Some(rw.target.to_string());
                e.mirror = rw.mirror.map(|m| m.name.clone());
                e.matched = Some(rw.matched.to_string());
                let swap = match rw.policy.swap {
                    SwapPolicy::Always => "always",
                    SwapPolicy::IfPresent => "if the mirror has the image",
                };
                let pin = match rw.policy.pin {
                    crate::mapping::Pin::Tag => "",
                    crate::mapping::Pin::Digest => {
                        ", pinned to the tag's digest upstream at admission"
                    }
                };
                e.reason = Some(format!("matched {}; rewritten {swap}{pin}", rw.matched));
            }
            Decision::Keep(keep) => {
                if let KeepReason::Unparsable(err) = &keep.reason {
                    e.error = Some(err.to_string());
                }
                e.reason = Some(keep.reason.to_string());
            }
        }
        e
    }
}

pub(super) fn explain(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let table = crate::config::load(args.config.as_deref())?.table;
    let export = Export::of(&table);
    let mut out = std::io::stdout().lock();
    for image in &args.images {
        let e = Explanation::with_export(image, &table, &export);
        match args.output {
            OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&e)?)?,
            OutputFormat::Text => {
                writeln!(out, "{}", e.input)?;
                match &e.normalized {
                    Some(n) => writeln!(out, "  normalized: {n}")?,
                    None => writeln!(out, "  invalid:    {}", e.error.as_deref().unwrap_or(""))?,
                }
                match (&e.target, &e.mirror) {
                    (Some(t), m) => {
                        writeln!(out, "  target:     {t}")?;
                        if let Some(m) = m {
                            writeln!(out, "  mirror:     {m}")?;
                        }
                    }
                    (None, _) => writeln!(out, "  target:     (unchanged)")?,
                }
                writeln!(out, "  why:        {}", e.reason.as_deref().unwrap_or(""))?;
                match (e.exportable, &e.not_exportable) {
                    (Some(true), _) => writeln!(
                        out,
                        "  policy:     exportable (export-policy makes this rewrite)"
                    )?,
                    (Some(false), why) => writeln!(
                        out,
                        "  policy:     not exportable: {}",
                        why.as_deref().unwrap_or("")
                    )?,
                    (None, _) => {}
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn check_config(file: &Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    match Config::parse(&file.display().to_string(), &text) {
        Ok(config) => {
            print!("{}", summary(&config));
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            for p in &err.problems {
                eprintln!("{p}");
            }
            eprintln!("{}: {} problem(s)", file.display(), err.problems.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The one-screen summary `check-config` prints for a valid table.
pub fn summary(config: &Config) -> String {
    use std::fmt::Write as _;
    let table = &config.table;
    let mut s = String::new();
    let _ = writeln!(s, "{}: OK", table.source_name());
    let _ = writeln!(s, "mirrors ({}):", table.mirrors().len());
    for m in table.mirrors() {
        let secret = match (&m.pull_secret, &m.pull_secret_from) {
            (Some(s), Some(from)) => format!("{s} (from {from})"),
            (Some(s), None) => s.clone(),
            (None, _) => "none".to_string(),
        };
        match &m.kind {
            MirrorKind::Repository { prefix, naming } => {
                let _ = writeln!(
                    s,
                    "  {:<12} repository    {}/{prefix} naming={naming} pullSecret={secret}",
                    m.name, m.registry
                );
            }
            MirrorKind::PullThrough { upstreams } => {
                let ups: Vec<String> = upstreams.iter().map(|(u, c)| format!("{u}→{c}")).collect();
                let _ = writeln!(
                    s,
                    "  {:<12} pull-through  {} [{}] pullSecret={secret}",
                    m.name,
                    m.registry,
                    ups.join(", ")
                );
            }
        }
    }
    let _ = writeln!(s, "exact entries: {}", table.entries().len());
    let _ = writeln!(s, "rules ({}):", table.rules().len());
    for r in table.rules() {
        let _ = writeln!(
            s,
            "  {:<16} {} → {}{}",
            r.name,
            r.matches.join(", "),
            table.rule_mirror(r).name,
            if r.excludes.is_empty() {
                String::new()
            } else {
                format!(" (except {})", r.excludes.join(", "))
            }
        );
    }
    let mut ns: Vec<&str> = table.excluded_namespaces().collect();
    ns.sort_unstable();
    let _ = writeln!(s, "excluded namespaces: {}", ns.join(", "));
    let (c, q) = (config.settings.checks, config.settings.copies);
    let _ = writeln!(
        s,
        "checks: presentTtl={:?} absentTtl={:?} timeout={:?}",
        c.present_ttl, c.absent_ttl, c.timeout
    );
    let _ = writeln!(
        s,
        "copies: concurrency={} queueSize={} retryBackoff={:?} maxAttempts={} runner={}{}",
        q.concurrency,
        q.queue_size,
        q.retry_backoff,
        q.max_attempts,
        q.runner.label(),
        match q.runner {
            crate::settings::Runner::Job => format!(
                " jobTtl={:?} jobImage={}",
                q.job_ttl,
                config
                    .settings
                    .job_image
                    .as_deref()
                    .unwrap_or("(the webhook's own)")
            ),
            crate::settings::Runner::InProcess => String::new(),
        }
    );
    let hosts: Vec<&str> = config
        .settings
        .registries()
        .keys()
        .map(String::as_str)
        .collect();
    let _ = writeln!(s, "registries: {}", hosts.join(", "));
    // Every setting applies on reload; say so where operators look.
    let _ = writeln!(s, "reload: every setting above applies without a restart");
    s
}

pub(super) fn export_policy(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let table = crate::config::load(args.config.as_deref())?.table;
    let export = Export::of(&table);
    let (policy, binding) = export.manifests(&args.name);
    let yaml = serde_saphyr::to_string_multiple(&[policy, binding])
        .context("cannot write the policy as YAML")?;
    print!("{yaml}");
    let mut err = std::io::stderr().lock();
    for l in &export.left_out {
        writeln!(err, "not exported: {}: {}", l.what, l.reason)?;
    }
    Ok(ExitCode::SUCCESS)
}
