//! The command line: `serve`, `explain`, `check-config`, `certs`.
//!
//! Every `serve` flag also reads an environment variable, so the Deployment can set either.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::mapping::{Decision, Table};

#[derive(Debug, Parser)]
#[command(
    name = "image-mirror-webhook",
    version,
    about = "Rewrites Pod images to a mirror"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the admission webhook over TLS, with metrics on a separate port.
    Serve(ServeArgs),
    /// Write a development CA and serving certificate, and print the caBundle.
    Certs(CertsArgs),
    /// Explain what each image reference would become, and why.
    Explain(ExplainArgs),
    /// Validate a mapping table and summarise it.
    CheckConfig {
        /// The table to check.
        file: PathBuf,
    },
    /// Copy one image (every platform, or those chosen) between registries.
    Copy(CopyArgs),
    /// Copy every exact entry of the table whose target is missing.
    Sync(SyncArgs),
}

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The image to copy, as written in a Pod spec (e.g. nginx:1.27).
    pub source: String,
    /// Where to put it (e.g. ghcr.io/acme/mirror/nginx:1.27).
    pub target: String,
    /// Copy only this platform (os/arch[/variant]); repeat for more. Default: all.
    #[arg(long = "platform", value_parser = platform)]
    pub platforms: Vec<crate::mapping::Platform>,
    /// Mapping table whose `registries` settings give credentials, CAs and insecure hosts.
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Skip TLS verification for this registry (HOST:PORT), or use plain HTTP when it does not
    /// speak TLS, as skopeo's --tls-verify=false does; repeat for more.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// Mapping table (default: the embedded table).
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Also re-copy tags whose upstream digest moved.
    #[arg(long)]
    pub refresh: bool,
    /// Only say what would be copied.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip TLS verification for this registry (HOST:PORT), or use plain HTTP when it does not
    /// speak TLS, as skopeo's --tls-verify=false does; repeat for more.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
}

fn platform(s: &str) -> Result<crate::mapping::Platform, String> {
    crate::mapping::Platform::parse(s)
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the HTTPS admission endpoint.
    #[arg(long, env = "IMAGE_MIRROR_LISTEN", default_value = crate::server::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// Address of the plain-HTTP metrics endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "IMAGE_MIRROR_METRICS_LISTEN", default_value = crate::server::DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: std::net::SocketAddr,
    /// Serving certificate (PEM). Default: certs/tls.crt, generated when absent.
    #[arg(long, env = "IMAGE_MIRROR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Serving key (PEM). Default: certs/tls.key, generated when absent.
    #[arg(long, env = "IMAGE_MIRROR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mapping table (YAML). Default: the embedded table.
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "IMAGE_MIRROR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Time budget of one review; past it the Pod is admitted unchanged.
    #[arg(long, env = "IMAGE_MIRROR_ADMISSION_BUDGET", default_value = "2s", value_parser = duration)]
    pub admission_budget: std::time::Duration,
    /// On SIGTERM, how long /readyz reports unready before draining starts.
    #[arg(long, env = "IMAGE_MIRROR_SHUTDOWN_DELAY", default_value = "5s", value_parser = duration)]
    pub shutdown_delay: std::time::Duration,
    /// How long in-flight requests may take to finish while draining.
    #[arg(long, env = "IMAGE_MIRROR_DRAIN_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub drain_timeout: std::time::Duration,
    /// Refuse a Pod instead of admitting it unchanged on an internal error, an unknown mirror
    /// state (slow or failing registry) or an unparsable image. Off by default.
    #[arg(long, env = "IMAGE_MIRROR_STRICT")]
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Directory for ca.crt, tls.crt and tls.key.
    #[arg(long, default_value = DEFAULT_CERT_DIR)]
    pub out: PathBuf,
    /// DNS names of the serving certificate (default: localhost and the in-cluster Service names).
    #[arg(long)]
    pub dns: Vec<String>,
}

/// Where `serve` looks for (and `certs` writes) development certificates.
pub const DEFAULT_CERT_DIR: &str = "certs";

fn duration(s: &str) -> Result<std::time::Duration, String> {
    crate::mapping::parse_duration(s)
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Mapping table (default: the embedded table).
    #[arg(long, env = "IMAGE_MIRROR_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Image references, as written in a Pod spec.
    #[arg(required = true)]
    pub images: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Runs a command and maps its outcome to the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Certs(args) => certs(&args),
        Command::Explain(args) => explain(&args),
        Command::CheckConfig { file } => check_config(&file),
        Command::Copy(args) => copy(&args),
        Command::Sync(args) => sync(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

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
}

impl Explanation {
    pub fn new(input: &str, table: &Table) -> Self {
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
        };
        match &decision {
            Decision::Rewrite(rw) => {
                e.target = Some(rw.target.to_string());
                e.mirror = rw.mirror.map(|m| m.name.clone());
                e.matched = Some(rw.matched.to_string());
                let swap = match rw.policy.swap {
                    crate::mapping::SwapPolicy::Always => "always",
                    crate::mapping::SwapPolicy::IfPresent => "if the mirror has the image",
                };
                e.reason = Some(format!("matched {}; rewritten {swap}", rw.matched));
            }
            Decision::Keep(keep) => {
                if let crate::mapping::KeepReason::Unparsable(err) = &keep.reason {
                    e.error = Some(err.to_string());
                }
                e.reason = Some(keep.reason.to_string());
            }
        }
        e
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_tracing(args.log_format);
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => crate::tls::TlsFiles { cert, key },
        _ => {
            let dir = PathBuf::from(DEFAULT_CERT_DIR);
            let files = crate::tls::TlsFiles {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
            };
            if !files.cert.exists() || !files.key.exists() {
                crate::certs::DevCerts::generate(&crate::certs::default_dns_names())?
                    .write(&dir)?;
                tracing::info!(dir = %dir.display(), "generated development certificates");
            }
            files
        }
    };
    let opts = crate::server::ServeOptions {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        tls,
        config: args.config,
        budget: args.admission_budget,
        shutdown_delay: args.shutdown_delay,
        drain_timeout: args.drain_timeout,
        strict: args.strict,
    };
    let runtime = runtime()?;
    runtime.block_on(async move {
        let mirrors =
            crate::server::Mirrors::Registries(crate::registry::RegistryOptions::default());
        let running = crate::server::start(opts, mirrors).await?;
        running.run_until_signal().await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn registries(insecure: &[String]) -> crate::registry::Registries {
    let mut registries = crate::registry::Registries::new(Default::default(), None);
    for host in insecure {
        registries.allow_insecure(host);
    }
    registries
}

fn copy(args: &CopyArgs) -> anyhow::Result<ExitCode> {
    init_tracing(LogFormat::Text);
    let table = crate::config::load(args.config.as_deref())?;
    let parse = |what: &str, s: &str| {
        crate::reference::Reference::parse(s)
            .map_err(|e| anyhow::anyhow!("{what} {s:?} is not an image reference: {e}"))
    };
    let source = parse("source", &args.source)?;
    let target = parse("target", &args.target)?;
    let registries = registries(&args.insecure_registries);
    let runtime = runtime()?;
    let started = std::time::Instant::now();
    let bar = crate::sync::byte_progress();
    let work = registries.copy(
        &table,
        &source,
        &target,
        &args.platforms,
        bar.as_ref().map(|(_, p)| p.clone()),
    );
    // A panic inside a library becomes an error message, not a crash.
    let report = runtime
        .block_on(futures::FutureExt::catch_unwind(
            std::panic::AssertUnwindSafe(work),
        ))
        .map_err(|_| anyhow::anyhow!("copy of {source} failed: internal error (panic)"))?;
    if let Some((bar, _)) = bar {
        bar.finish_and_clear();
    }
    let report = report?;
    crate::sync::print_report(
        &mut std::io::stdout().lock(),
        &source,
        &target,
        &report,
        started.elapsed(),
    )?;
    Ok(ExitCode::SUCCESS)
}

fn sync(args: &SyncArgs) -> anyhow::Result<ExitCode> {
    init_tracing(LogFormat::Text);
    let table = crate::config::load(args.config.as_deref())?;
    let registries = registries(&args.insecure_registries);
    let runtime = runtime()?;
    let mut out = std::io::stdout();
    let failures = runtime.block_on(crate::sync::sync_all(
        &registries,
        &table,
        args.refresh,
        args.dry_run,
        &mut out,
    ))?;
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{} images failed:", failures.len());
    for (item, why) in &failures {
        eprintln!("  {} → {}: {why}", item.source, item.target);
    }
    Ok(ExitCode::FAILURE)
}

fn certs(args: &CertsArgs) -> anyhow::Result<ExitCode> {
    let dns = if args.dns.is_empty() {
        crate::certs::default_dns_names()
    } else {
        args.dns.clone()
    };
    let certs = crate::certs::DevCerts::generate(&dns)?;
    certs.write(&args.out)?;
    eprintln!(
        "wrote {0}/ca.crt, {0}/tls.crt and {0}/tls.key for {1}",
        args.out.display(),
        dns.join(", ")
    );
    eprintln!("caBundle for the MutatingWebhookConfiguration:");
    println!("{}", certs.ca_bundle());
    Ok(ExitCode::SUCCESS)
}

fn explain(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let table = crate::config::load(args.config.as_deref())?;
    let mut out = std::io::stdout().lock();
    for image in &args.images {
        let e = Explanation::new(image, &table);
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
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_config(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    match Table::parse(&file.display().to_string(), &text) {
        Ok(table) => {
            print!("{}", summary(&table));
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
pub fn summary(table: &Table) -> String {
    use crate::mapping::MirrorKind;
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{}: OK", table.source_name());
    let _ = writeln!(s, "mirrors ({}):", table.mirrors().len());
    for m in table.mirrors() {
        let secret = m.pull_secret.as_deref().unwrap_or("none");
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
            table
                .mirrors()
                .get(r.mirror_index())
                .map_or("?", |m| m.name.as_str()),
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
    let c = table.checks();
    let _ = writeln!(
        s,
        "checks: presentTtl={:?} absentTtl={:?} timeout={:?}; copies: concurrency={}",
        c.present_ttl,
        c.absent_ttl,
        c.timeout,
        table.copies().concurrency
    );
    s
}
