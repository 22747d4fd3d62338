//! `explain` and `check-config`: what an image would become and why, and whether a table is
//! valid.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;

use super::{CheckConfigArgs, ExplainArgs, ExportArgs, OutputFormat};
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
    /// Where the credentials for the target's registry come from (checks, copies).
    pub credentials: Option<String>,
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
            credentials: None,
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
    let config = crate::config::load(args.config.as_deref())?;
    let table = &config.table;
    let export = Export::of(table);
    let mut out = std::io::stdout().lock();
    for image in &args.images {
        let mut e = Explanation::with_export(image, table, &export);
        if let Some(target) = e
            .target
            .as_deref()
            .and_then(|t| crate::reference::Reference::parse(t).ok())
        {
            let host = target.registry();
            e.credentials = Some(credentials_source(host, config.settings.access(host)));
        }
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
                        if let Some(c) = &e.credentials {
                            writeln!(out, "  credentials: {c}")?;
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

pub(super) fn check_config(args: &CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let Some(file) = args.file.as_ref().or(args.config.as_ref()) else {
        anyhow::bail!(
            "no table to check: give its path (check-config FILE, --config FILE, or \
             IMAGE_MIRROR_CONFIG)"
        );
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let config = match Config::parse(&file.display().to_string(), &text) {
        Ok(config) => config,
        Err(err) => {
            for p in &err.problems {
                eprintln!("error: {p}");
            }
            eprintln!("{}: {} problem(s)", file.display(), err.problems.len());
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", summary(&config));
    if args.online {
        let problems = super::runtime()?.block_on(crate::aws::cache_rule_problems(
            &config.table,
            &config.settings,
            None,
        ));
        for p in &problems {
            eprintln!("error: {p}");
        }
        if !problems.is_empty() {
            eprintln!("{}: {} problem(s) online", file.display(), problems.len());
            return Ok(ExitCode::FAILURE);
        }
        println!("online: every pull-through prefix has its cache rule");
    }
    let warnings = config.table.warnings();
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if !warnings.is_empty() && args.strict {
        eprintln!(
            "{}: {} warning(s), refused with --strict",
            file.display(),
            warnings.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `600s` → `10m`, `1500ms` → `1500ms`: as the table writes durations.
fn duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_string(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// Where a registry's credentials come from, as `check-config` and `explain` say it.
pub fn credentials_source(host: &str, access: Option<&crate::settings::RegistryAccess>) -> String {
    match access {
        Some(a) if a.docker_config.is_some() => format!(
            "docker config {} (anonymous while it is absent)",
            a.docker_config.as_deref().unwrap_or_default()
        ),
        Some(a) if a.username_env.is_some() => format!(
            "environment {} and {} (anonymous while unset)",
            a.username_env.as_deref().unwrap_or_default(),
            a.password_env.as_deref().unwrap_or_default()
        ),
        _ => match crate::settings::ecr_registry(host, access) {
            Some(registry) => format!(
                "AWS: an ECR token for {registry} from the webhook's own identity (here: {})",
                crate::aws::identity_sources()
            ),
            None => "anonymous".to_string(),
        },
    }
}

/// The summary `check-config` prints for a valid table: every setting that changes what the
/// webhook does, with its defaults filled in.
pub fn summary(config: &Config) -> String {
    use std::fmt::Write as _;
    let table = &config.table;
    let settings = &config.settings;
    let mut s = String::new();
    let _ = writeln!(s, "{}: OK", table.source_name());
    let _ = writeln!(s, "mirrors ({}):", table.mirrors().len());
    for m in table.mirrors() {
        let secret = match (&m.pull_secret, &m.pull_secret_from) {
            (Some(s), Some(from)) => format!("{s} (copied from {from})"),
            (Some(s), None) => s.clone(),
            (None, _) => "none".to_string(),
        };
        let place = match &m.kind {
            MirrorKind::Repository { prefix, naming } => {
                format!("repository    {}/{prefix} naming={naming}", m.registry)
            }
            MirrorKind::PullThrough { upstreams } => {
                let ups: Vec<String> = upstreams.iter().map(|(u, c)| format!("{u}→{c}")).collect();
                format!(
                    "pull-through  {} upstreams=[{}]",
                    m.registry,
                    ups.join(", ")
                )
            }
        };
        let _ = writeln!(s, "  {:<12} {place} pullSecret={secret}", m.name);
        let _ = writeln!(s, "  {:<12} {}", "", table.mirror_policy(m));
    }
    let _ = writeln!(s, "exact entries ({}):", table.entries().len());
    for e in table.entries() {
        let mirror = table
            .entry_mirror(e)
            .map_or("(no mirror)", |m| m.name.as_str());
        let _ = writeln!(
            s,
            "  {} → {} [{mirror}] {}",
            e.source,
            e.target,
            table.entry_policy(e)
        );
    }
    let _ = writeln!(s, "rules ({}), first match wins:", table.rules().len());
    for r in table.rules() {
        let except = if r.excludes.is_empty() {
            String::new()
        } else {
            format!(" except {}", r.excludes.join(", "))
        };
        let _ = writeln!(
            s,
            "  {:<16} {}{except} → {}",
            r.name,
            r.matches.join(", "),
            table.rule_mirror(r).name
        );
        let _ = writeln!(s, "  {:<16} {}", "", table.rule_policy(r));
    }
    let mut ns: Vec<&str> = table.excluded_namespaces().collect();
    ns.sort_unstable();
    let _ = writeln!(
        s,
        "namespaces excluded: {}",
        if ns.is_empty() {
            "none".to_string()
        } else {
            ns.join(", ")
        }
    );
    let _ =
        writeln!(
            s,
            "pull secrets go to: {}",
            table.pull_secret_namespaces().map_or(
                "every opted-in namespace".to_string(),
                |f| format!("opted-in namespaces matching {}", f.describe())
            )
        );
    let _ = writeln!(s, "registries:");
    let mut hosts: Vec<&str> = table
        .mirrors()
        .iter()
        .map(|m| m.registry.as_str())
        .collect();
    hosts.extend(settings.registries().keys().map(String::as_str));
    hosts.sort_unstable();
    hosts.dedup();
    for host in hosts {
        let access = settings.access(host);
        let mut how = vec![format!("credentials: {}", credentials_source(host, access))];
        if let Some(a) = access {
            if a.insecure {
                how.push("plain HTTP".to_string());
            }
            if let Some(ca) = &a.ca_file {
                how.push(format!("CA {ca}"));
            }
            how.push(format!("upload={}", a.upload().label()));
            if let Some(n) = a.rate_limit_reserve {
                how.push(format!("rateLimitReserve={n}"));
            }
        }
        let _ = writeln!(s, "  {host:<24} {}", how.join("; "));
    }
    let c = settings.checks;
    let _ = writeln!(
        s,
        "checks: presentTtl={} absentTtl={} unknownTtl={} timeout={} circuitThreshold={} \
         circuitBackoff={} circuitMaxBackoff={}",
        duration(c.present_ttl),
        duration(c.absent_ttl),
        duration(c.unknown_ttl),
        duration(c.timeout),
        c.circuit_threshold,
        duration(c.circuit_backoff),
        duration(c.circuit_max_backoff)
    );
    let q = settings.copies;
    let _ = writeln!(
        s,
        "copies: concurrency={} queueSize={} retryBackoff={} maxAttempts={} maxImageSize={} \
         runner={}{}",
        q.concurrency,
        q.queue_size,
        duration(q.retry_backoff),
        q.max_attempts,
        q.max_image_size
            .map_or("none".to_string(), super::sync::human_bytes),
        q.runner.label(),
        match q.runner {
            crate::settings::Runner::Job => format!(
                " jobTtl={} jobDeadline={} jobImage={}",
                duration(q.job_ttl),
                duration(q.job_deadline),
                settings
                    .job_image
                    .as_deref()
                    .unwrap_or("(the webhook's own)")
            ),
            crate::settings::Runner::InProcess => String::new(),
        }
    );
    let t = settings.timeouts;
    let _ = writeln!(
        s,
        "timeouts: connect={} response={} idle={}",
        duration(t.connect),
        duration(t.response),
        duration(t.idle)
    );
    let r = settings.records;
    let _ = writeln!(
        s,
        "mirroredImages: writesPerSecond={} usedEvery={} retention={} (with the MirroredImage component)",
        r.writes_per_second,
        duration(r.used_every),
        duration(r.retention)
    );
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

/// `crd`: the MirroredImage CRD as YAML.
pub(super) fn crd() -> anyhow::Result<ExitCode> {
    print!("{}", crate::cluster::images::crd::crd_yaml()?);
    Ok(ExitCode::SUCCESS)
}

/// `declare`: every exact entry of the table as a declared MirroredImage, one YAML document
/// each.
pub(super) fn declare(args: &super::DeclareArgs) -> anyhow::Result<ExitCode> {
    use crate::cluster::images::crd::{object_name, MirroredImage, MirroredImageSpec};
    if let Some(r) = &args.refresh {
        crate::settings::parse_duration(r).map_err(|e| anyhow::anyhow!("--refresh: {e}"))?;
    }
    let table = crate::config::load(args.config.as_deref())?.table;
    let items = super::sync::sync_items(&table);
    let skipped = table.entries().len() - items.len();
    let objects: Vec<MirroredImage> = items
        .iter()
        .map(|copy| {
            let mut o = MirroredImage::new(
                &object_name(&copy.source, &copy.target),
                MirroredImageSpec {
                    source: copy.source.to_string(),
                    target: Some(copy.target.to_string()),
                    platforms: copy.platforms.iter().map(|p| p.to_string()).collect(),
                    refresh: args.refresh.clone(),
                    retain: true,
                },
            );
            o.metadata.labels = None;
            o
        })
        .collect();
    if !objects.is_empty() {
        print!("{}", serde_saphyr::to_string_multiple(&objects)?);
    }
    eprintln!(
        "{} declared image(s){}",
        objects.len(),
        if skipped > 0 {
            format!("; {skipped} entries name no single image (tag globs, any tag) and were left")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
